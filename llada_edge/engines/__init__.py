"""Build folders: the manifest, and engine builders for TensorRT and ONNX Runtime."""
