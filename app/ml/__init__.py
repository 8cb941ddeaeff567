"""The only package that imports super-gradients and torch.

Light, importable anywhere (standard library and pydantic only): `types` (plain data and constants),
`params` (the training parameters and a run's configuration), `sg_setup` (SG's environment and the
device rule; torch inside `setup_device` only), `model_server` (its top level is the API's side of
the inference process), `batcher` (the inference process's per-model batching, standard library),
`layout` (file names), `training` (SG imported inside functions).

Heavy, imported only inside the training process (`worker.train_process`) or the inference process
(`python -m app.ml.model_server`): `checkpoints` (torch), `callbacks` and `sg_logger` (torch and
super-gradients), `inference`, `ort` and `export` (numpy at the top; onnxruntime, torch and SG
inside functions; `ort` never imports torch or SG, so a process serving ONNX files alone does not).
"""
