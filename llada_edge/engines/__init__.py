"""Engine builders (ONNX Runtime CPU rewrites, ModelOpt Q/DQ graphs, TensorRT plans) and the accuracy report."""
