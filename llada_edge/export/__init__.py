"""ONNX export of every component, numeric validation, and graph checks."""
