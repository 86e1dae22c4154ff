"""GPU check of the CUDA-graph path of the torch backend (run on a machine with a CUDA device).

    python benchmarks/gpu_check.py --out $OUT [--preset tiny|uni] [--layers 2]

For each configuration it runs the same text-to-image block loop with eager CUDA execution and with one
captured CUDA graph per step shape, checks that both produce the same tokens and that a replayed step
equals the eager step (max abs difference of the hidden states), and times both (median per step).
Writes ``gpu_check.json`` to --out. Exits 0 with a note when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--preset", choices=("tiny", "uni"), default="tiny")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llada-edge-gpu-check"))
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        report["note"] = "no CUDA device: nothing checked"
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        print(report["note"])
        return 0
    from llada_edge.runtime import prompts
    from llada_edge.runtime.backends.torch_backend import TorchBackend
    from llada_edge.runtime.sampler import BlockDiffusionSampler, SamplingConfig, left_pad
    from llada_edge.runtime.text import TextTokenizer
    from llada_edge.synthetic import COMPONENTS, synthesize

    ckpt = args.workdir / f"{args.preset}{args.layers}"
    if not (ckpt / "config.json").is_file():
        components: tuple[str, ...] = ("backbone",) if args.preset == "uni" else COMPONENTS  # synthesize's default
        synthesize(ckpt, args.preset, layers=args.layers, components=components, force=True)
    report["device"] = torch.cuda.get_device_name(0)
    tok = TextTokenizer.from_file(ckpt / "tokenizer.json")
    results = {}
    for label, graphs in (("eager", False), ("cuda_graphs", True)):
        backend = TorchBackend(ckpt, device="cuda", dtype=args.dtype, static_shapes=True, cuda_graphs=graphs)
        prompt_rows = [prompts.t2i_prompt(tok, "a lighthouse", 16, 16), prompts.t2i_unconditional_prompt(tok, 16, 16)]
        rows = left_pad(prompt_rows, backend.config.backbone.mask_token_id)
        sampler = BlockDiffusionSampler(backend, "image", SamplingConfig(steps=8, fused_head=True))
        sampler.generate(rows, 256, [2.0, -1.0])  # warm-up (and capture)
        torch.cuda.synchronize()
        start = time.perf_counter()
        gen = sampler.generate(rows, 256, [2.0, -1.0])
        torch.cuda.synchronize()
        results[label] = {"tokens": gen.tokens.tolist(), "seconds": time.perf_counter() - start,
                          "step_ms_median": statistics.median(s * 1000 for s in gen.step_seconds),
                          "forward_passes": gen.forward_passes, "fallbacks": backend.graph_fallbacks,
                          "graphs": len(backend._graphs)}
        # one step compared directly: replay vs eager on identical inputs
        backend.start(2, 96)
        ids = np.full((2, 32), backend.config.backbone.mask_token_id)
        pos = np.tile(np.arange(32), (2, 1))
        hidden, _ = backend.forward_block(ids, pos, np.ones((2, 32), bool))
        results[label]["probe_hidden"] = hidden
    diff = float(np.abs(results["eager"].pop("probe_hidden") - results["cuda_graphs"].pop("probe_hidden")).max())
    report.update({
        "same_tokens": results["eager"]["tokens"] == results["cuda_graphs"]["tokens"],
        "replay_vs_eager_max_abs_hidden": diff,
        "speedup_per_step": results["eager"]["step_ms_median"] / results["cuda_graphs"]["step_ms_median"],
        **{k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in results.items()}})
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if report["same_tokens"] and diff < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
