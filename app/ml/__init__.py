"""The only package that imports super-gradients and torch.

Light, importable anywhere (standard library and pydantic only): `types` (plain data and constants),
`params` (the training parameters and a run's configuration), `sg_setup` (SG's environment and the
device rule; torch inside `setup_device` only), `model_server` (its top level is the API's side of
the inference process), `training` (SG imported inside functions).

Heavy, imported only inside the training process (`worker.train_process`) or the inference process
(`python -m app.ml.model_server`): `checkpoints` (torch), `callbacks` and `sg_logger` (torch and
super-gradients), `inference` and `export` (numpy at the top; torch and SG inside functions, and
only meaningful in the inference process).
"""
