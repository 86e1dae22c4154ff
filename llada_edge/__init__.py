"""llada-edge: export toolchain and lean runtime for LLaDA2.0-Uni (see README.md, "Layout").

Nothing is imported here: ``llada_edge.runtime`` must stay importable without torch, and the
toolchain packages (export, engines, calibration) load torch and ONNX only when used.
"""
