"""The full-model section of ``make bench`` (``make bench FULL=BUILD``): requests on an existing real-size build.

    python benchmarks/full_model.py --build BUILD [--precision int4] [--out benchmarks/results]

Nothing is rebuilt. Reports, in one run:

* **build**: what the folder holds and its size on disk; the streaming build's cost when it was made by
  ``llada-edge stream --stats BUILD/reports/stream.json`` (seconds per stage, peak disk, peak RSS per process);
* **requests**, each in a fresh process so that each peak RSS is its own: ``understand`` (a 256x256 image),
  ``chat``, and ``t2i`` image tokens with two-row CFG (a backbone-only build has no decoder; ``--t2i-size``):
  per-stage time, per-step latency (median, p90), tokens per forward pass, tokens/s, peak RSS;
* **the PyTorch reference per layer** (the whole bf16 model is 33 GB, beyond a 24 GB machine): the checkpoint's
  layer 1 in bf16 eager against the build's layer 1 engine at T = 32 on a 1024-token cache, same inputs.

Writes ``<out>/full_model.json`` and ``full_model.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # bench.py's helpers, also when imported from elsewhere

from bench import PAST, _layer_feeds, _torch_layer_ms, median_ms, percentile, rss_peak_bytes

TASKS = ("understand", "chat", "t2i")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def build_part(build: Path) -> dict[str, Any]:
    """What the build holds (per kind of artifact) and, when recorded, what the streaming build cost."""
    manifest = json.loads((build / "manifest.json").read_text())
    kinds: dict[str, int] = {}
    for entry in manifest["components"].values():
        kinds[entry["kind"]] = kinds.get(entry["kind"], 0) + sum(f["size"] for f in entry["files"])
    out: dict[str, Any] = {"disk_bytes": _folder_bytes(build), "bytes_by_kind": kinds,
                           "layers": sum(1 for n in manifest["components"] if n.startswith("layer_")),
                           "options": manifest.get("options", {})}
    stats = build / "reports" / "stream.json"
    if stats.is_file():
        out["stream"] = json.loads(stats.read_text())
    return out


def _image() -> Any:
    from PIL import Image

    y, x = np.mgrid[0:256, 0:256]
    rgb = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def run_request(build: str, precision: str, task: str, max_new_tokens: int, t2i_size: int) -> dict[str, Any]:
    """One request in this (fresh) process: load, run, and what it cost."""
    from llada_edge.runtime import Pipeline

    start = time.perf_counter()
    pipe = Pipeline.load(build, precision=precision)
    load_s = time.perf_counter() - start
    if task == "t2i":
        from bench import t2i_tokens

        gen, seconds = t2i_tokens(pipe, "a lighthouse at dusk", t2i_size, steps=8)
        generated, passes, steps_s = gen.tokens.size, gen.forward_passes, gen.step_seconds
        stages = {"backbone": seconds}
    else:
        if task == "understand":
            result = pipe.understand(_image(), "What is in this picture?", max_new_tokens=max_new_tokens)
        else:
            result = pipe.chat([{"role": "user", "content": "What does json.dumps do?"}],
                               max_new_tokens=max_new_tokens)
        generated, passes, steps_s = len(result.tokens), result.forward_passes, result.step_seconds
        stages = dict(result.timings)
    step_ms = [s * 1000 for s in steps_s]
    return {"task": task, "load_s": load_s, "stages_s": stages, "generated_tokens": generated,
            "forward_passes": passes, "tokens_per_forward": generated / max(passes, 1),
            "tokens_per_s": generated / stages["backbone"], "steps": len(step_ms),
            "step_ms_median": statistics.median(step_ms), "step_ms_p90": percentile(step_ms, 90),
            "peak_rss_bytes": rss_peak_bytes()}


def _in_fresh_process(function: Any, *args: Any) -> Any:
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def reference_layer_part(build: Path, precision: str, repeats: int) -> dict[str, Any]:
    """Layer 1 of the checkpoint in bf16 eager vs the build's layer 1 engine, T = 32, 1024-token cache."""
    import onnxruntime as ort
    import torch

    from llada_edge.buildfolder import Artifact
    from llada_edge.config import load_backbone_config
    from llada_edge.model import load_backbone_layer

    ckpt = Path(json.loads((build / "manifest.json").read_text())["checkpoint"]["path"])
    if not (ckpt / "config.json").is_file():
        return {"skipped": f"the build's checkpoint {ckpt} is not here"}
    cfg = load_backbone_config(ckpt)
    feeds = _layer_feeds(cfg, 1, np.random.default_rng(0))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    engine = build / Artifact.ort_engine(precision, "layer_1").folder / "model.onnx"
    session = ort.InferenceSession(str(engine), opts, providers=["CPUExecutionProvider"])
    ort_ms = median_ms(partial(session.run, None, feeds), repeats)
    del session
    layer = load_backbone_layer(ckpt, 1, torch.bfloat16)
    torch_ms = _torch_layer_ms(layer, cfg, feeds, torch.bfloat16, repeats)
    return {"tokens": 32, "past": PAST, f"layer1_ort_{precision}_ms": ort_ms, "layer1_torch_bf16_ms": torch_ms,
            "speedup_vs_bf16": torch_ms / ort_ms}


def full_part(build: Path, precision: str = "int4", max_new_tokens: int = 64, t2i_size: int = 512,
              repeats: int = 5) -> dict[str, Any]:
    report: dict[str, Any] = {"build": build_part(build), "precision": precision, "requests": []}
    components = json.loads((build / "manifest.json").read_text())["components"]
    for task in TASKS:
        if task == "understand" and "vision_tokenizer" not in components:
            report["requests"].append({"task": task, "skipped": "the build has no vision_tokenizer"})
            continue
        print(f"full model: {task} ...", flush=True)
        row = _in_fresh_process(run_request, str(build), precision, task, max_new_tokens, t2i_size)
        report["requests"].append(row)
        print(json.dumps(row), flush=True)
    print("full model: layer 1 vs the PyTorch reference ...", flush=True)
    report["reference_layer"] = _in_fresh_process(reference_layer_part, build, precision, repeats)
    return report


def markdown(report: dict[str, Any]) -> str:
    b = report["build"]
    lines = [f"## Full model ({b['layers']} layers, {report['precision']})", "",
             f"Build folder: {b['disk_bytes'] / 1e9:.2f} GB on disk "
             f"({', '.join(f'{k} {v / 1e9:.2f} GB' for k, v in sorted(b['bytes_by_kind'].items()))}).", ""]
    stream = b.get("stream")
    if stream:
        stages: dict[str, float] = {}
        for per in stream["seconds"].values():
            for stage, s in per.items():
                stages[stage] = stages.get(stage, 0.0) + s
        children = [p for peaks in stream.get("child_rss_bytes", {}).values() for p in peaks]
        lines += [f"Streaming build: {', '.join(f'{k} {v / 60:.1f} min' for k, v in stages.items())}; peak disk "
                  f"{stream['peak_disk_bytes'] / 1e9:.2f} GB (final {stream['final_disk_bytes'] / 1e9:.2f} GB); "
                  f"peak RSS {stream['peak_rss_bytes'] / 1e9:.2f} GB"
                  + (f" (largest single process {max(children) / 1e9:.2f} GB)" if children else "") + ".", ""]
    lines += ["| request | load s | stages s | steps | step ms median / p90 | tokens | tokens / forward | tokens/s "
              "| peak RSS GB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["requests"]:
        if "skipped" in r:
            lines.append(f"| {r['task']} | {r['skipped']} | | | | | | | |")
            continue
        stages_text = ", ".join(f"{k} {v:.1f}" for k, v in r["stages_s"].items())
        lines.append(f"| {r['task']} | {r['load_s']:.1f} | {stages_text} | {r['steps']} | {r['step_ms_median']:.0f} "
                     f"/ {r['step_ms_p90']:.0f} | {r['generated_tokens']} | {r['tokens_per_forward']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['peak_rss_bytes'] / 1e9:.2f} |")
    ref = report.get("reference_layer", {})
    if "speedup_vs_bf16" in ref:
        ort_key = next(k for k in ref if k.startswith("layer1_ort_"))
        lines += ["", f"Layer 1 at T = 32 (1024-token cache): engine {ref[ort_key]:.1f} ms, PyTorch bf16 eager "
                  f"{ref['layer1_torch_bf16_ms']:.1f} ms ({ref['speedup_vs_bf16']:.1f}x)."]
    elif ref:
        lines += ["", f"Reference layer: {ref.get('skipped')}"]
    return "\n".join(lines) + "\n"


def write(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "full_model.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "full_model.md").write_text(markdown(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, required=True, help="a real-size build (e.g. from `llada-edge stream`)")
    parser.add_argument("--precision", default="int4")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--t2i-size", type=int, default=512, help="t2i image size whose tokens are generated")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    report = full_part(args.build, args.precision, args.max_new_tokens, args.t2i_size, args.repeats)
    write(args.out, report)
    print(markdown(report))


if __name__ == "__main__":
    main()
