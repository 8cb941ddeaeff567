"""Weights: registered YOLO-NAS checkpoints a job can start from and /predict can use."""
