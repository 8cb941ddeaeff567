"""Serving trained models: /predict."""
