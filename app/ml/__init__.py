"""The only package that imports super-gradients and torch.

Everything heavy is imported inside functions, so importing `app.ml` (or `app.ml.types`) costs nothing;
the API never imports the training modules, only the worker's training process does.
"""
