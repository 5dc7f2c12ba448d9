"""The serving side: an ASGI app over ONNX Runtime. Imports neither pandas, scikit-learn nor MLflow:
the serving image carries none of them (import-linter contract in pyproject.toml)."""
