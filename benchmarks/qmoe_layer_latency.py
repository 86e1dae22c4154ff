"""CPU latency of one real-dimension MoE decoder layer: INT4 QMoE on ONNX Runtime vs PyTorch eager.

    python benchmarks/qmoe_layer_latency.py [--workdir /tmp/qmoe-bench] [--past 1024] [--repeats 10]

Writes a ``uni`` checkpoint with 2 layers (layer 1 is a MoE layer: 256 experts, top-8, hidden 2048),
exports layer 1 with the ``ort`` MoE lowering, builds its int4 engine (QMoE block 128 with
accuracy_level 4 for the experts, MatMulNBits for attention and the shared expert) and times one block
step -- T = 32 (one row) and T = 64 (two CFG rows of 32) against a cache of ``--past`` tokens -- next to
the PyTorch eager reference layer (experts looped over the selected ones) in bf16 and fp32, same inputs,
same process, interleaved. Reports medians and ratios (JSON to --out).
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llada-edge-qmoe-bench"))
    parser.add_argument("--past", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/qmoe_layer_latency.json"))
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    from bench import median_ms  # this folder's shared timing helper (the script's directory is on sys.path)

    from llada_edge.buildfolder import Artifact
    from llada_edge.engines.build import build_engines
    from llada_edge.export.build import export_build
    from llada_edge.model import load_backbone_layer
    from llada_edge.model.backbone import mask_to_bias, rope_cos_sin, rope_inv_freq
    from llada_edge.synthetic import synthesize

    ckpt, build = args.workdir / "uni2", args.workdir / "build"
    if not (ckpt / "config.json").is_file():
        synthesize(ckpt, "uni", layers=2, components=["backbone"], force=True, progress=print)
    export_build(ckpt, build, ["layer_1"], moe="ort", validate=False, progress=print)
    build_engines(build, "onnxruntime", "int4", report=False, progress=print)  # skipped when up to date
    engine = build / Artifact.ort_engine("int4", "layer_1").folder
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(engine / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    layer = {dtype: load_backbone_layer(ckpt, 1, dtype) for dtype in (torch.bfloat16, torch.float32)}
    from llada_edge.config import load_backbone_config

    cfg = load_backbone_config(ckpt)
    rng = np.random.default_rng(0)
    results = {"past": args.past, "threads": torch.get_num_threads(), "cases": []}
    for rows in (1, 2):  # T = 32 and T = 64 tokens per step
        t = 32
        feeds = {"hidden": rng.standard_normal((rows, t, cfg.hidden_size)).astype(np.float32),
                 "positions": np.tile(np.arange(args.past, args.past + t), (rows, 1)),
                 "past_k": rng.standard_normal((rows, 4, args.past, 128)).astype(np.float32),
                 "past_v": rng.standard_normal((rows, 4, args.past, 128)).astype(np.float32),
                 "attn_mask": np.ones((rows, t, args.past + t), bool)}
        ort_ms = median_ms(partial(session.run, None, feeds), args.repeats)
        case = {"tokens": rows * t, "onnxruntime_int4_ms": ort_ms}
        with torch.inference_mode():
            for dtype, name in ((torch.bfloat16, "torch_eager_bf16_ms"), (torch.float32, "torch_eager_fp32_ms")):
                h = torch.from_numpy(feeds["hidden"]).to(dtype)
                cos, sin = rope_cos_sin(torch.from_numpy(feeds["positions"]), rope_inv_freq(cfg), dtype)
                bias = mask_to_bias(torch.from_numpy(feeds["attn_mask"])[:, None])
                pk, pv = (torch.from_numpy(feeds[k]).to(dtype) for k in ("past_k", "past_v"))
                case[name] = median_ms(partial(layer[dtype], h, cos, sin, bias, pk, pv), args.repeats)
        case["speedup_vs_bf16"] = case["torch_eager_bf16_ms"] / ort_ms
        case["speedup_vs_fp32"] = case["torch_eager_fp32_ms"] / ort_ms
        results["cases"].append(case)
        print(json.dumps(case))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
