"""A job's files: listing, download and ONNX export."""
