"""Backend implementations. Each imports its engine library (torch, onnxruntime, tensorrt) itself."""
