"""ONNX export of every component (one build step each), numeric validation, Polygraphy files, TensorRT op checks."""
