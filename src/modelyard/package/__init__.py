"""Packaging: ONNX export with proven parity, the signed bundle, the serving image."""
