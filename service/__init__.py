"""Ferry: serve MLflow-registered PyTorch and ONNX models over HTTP."""

__version__ = "0.1.0"
