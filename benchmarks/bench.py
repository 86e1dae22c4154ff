"""``make bench``: latency side by side with the PyTorch eager reference, and against the memory roofline.

One process, in two parts (ratios are measured in the same run; absolute times on shared machines are
noisy):

1. **Pipelines on the tiny preset.** The torch eager reference, ONNX Runtime fp32 and each built
   ORT precision run the same requests: per-step latency (median, p90) of text-to-image block steps,
   tokens per forward pass, understanding tokens/s, t2i latency by stage, host overhead (time outside
   engine calls), peak RSS, and each ratio to torch eager.
2. **Real dimensions on this CPU** (``uni`` preset, 2 layers: a dense layer 0 and a MoE layer 1):
   the INT4 ORT engines vs PyTorch eager bf16 and fp32 per layer, at T = 32 and T = 64 (two CFG rows)
   against a 1024-token cache; the per-step latency extrapolated to 20 layers (1 dense + 19 MoE +
   the image head); and the roofline: the weight bytes a step actually reads (the distinct experts
   the measured routing picks, plus every dense weight) over the machine's measured memory bandwidth.

Writes ``<out>/bench.json``, ``bench.md`` and ``bench.png``.

    python benchmarks/bench.py [--out benchmarks/results] [--workdir /tmp/llada-edge-bench] [--smoke]

``--smoke`` (the test suite's): the tiny part only, few steps, fp32 engines of an existing build.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llada_edge.config import BLOCK_SIZE as BLOCK

if TYPE_CHECKING:  # annotations only: the heavy imports stay lazy (inside the functions)
    import onnx
    import torch

    from llada_edge.config import BackboneConfig
    from llada_edge.runtime import Pipeline
    from llada_edge.runtime.sampler import GenerationResult

PAST = 1024
REAL_LAYERS = 20


def rss_peak_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def memory_bandwidth_gbs(size_mb: int = 512, repeats: int = 5) -> dict[str, float]:
    """Streaming read (sum) and copy bandwidth, best of ``repeats``; ``read_gbs`` is what the engines can use.

    numpy's sum runs on one thread and is bound by its own adds on a slow core (7 GB/s on one of these VMs,
    where two threads read 21 GB/s), which would put the roofline too low and flatter every kernel measured
    against it. So the read figure is the best of numpy on one thread and torch's sum on every core (torch
    where installed), and both are reported.
    """
    a = np.ones(size_mb * 2**20 // 4, np.float32)
    b = np.empty_like(a)
    read = min(_timed(lambda: a.sum()) for _ in range(repeats))
    copy = min(_timed(lambda: np.copyto(b, a)) for _ in range(repeats))
    found = {"read_gbs_numpy_1thread": a.nbytes / read / 1e9, "copy_gbs": 2 * a.nbytes / copy / 1e9}
    try:
        import torch
    except ImportError:
        threaded = 0.0
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)
        t = torch.from_numpy(a)
        threaded = a.nbytes / min(_timed(lambda: t.sum()) for _ in range(repeats)) / 1e9
        torch.set_num_threads(threads)
        found["read_gbs_torch_all_cores"] = threaded
    found["read_gbs"] = max(found["read_gbs_numpy_1thread"], threaded)
    return found


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Part 1: pipelines on the tiny preset
# ----------------------------------------------------------------------------------------------


def t2i_tokens(pipe: Pipeline, prompt: str, image_size: int, steps: int) -> tuple[GenerationResult, float]:
    """The t2i backbone stage alone (two-row CFG, scale 2): the image tokens and the seconds they took."""
    from llada_edge.runtime import prompts
    from llada_edge.runtime.sampler import BlockDiffusionSampler, SamplingConfig, left_pad

    tok = pipe.tokenizer
    gh = gw = image_size // 32
    rows = left_pad([prompts.t2i_prompt(tok, prompt, gh, gw), prompts.t2i_unconditional_prompt(tok, gh, gw)],
                    pipe.config.backbone.mask_token_id)
    start = time.perf_counter()
    gen = BlockDiffusionSampler(pipe.backend, "image", SamplingConfig(steps=steps)).generate(rows, gh * gw, [2.0, -1.0])
    return gen, time.perf_counter() - start


def run_pipeline(pipe: Pipeline, image_size: int, text_tokens: int, steps: int) -> dict:
    gen, _ = t2i_tokens(pipe, "a lighthouse at dusk", image_size, steps)
    t2i = pipe.generate_image("a lighthouse at dusk", image_size, image_size, steps=steps)
    start = time.perf_counter()
    text = pipe.understand(t2i.image, "What is in this picture?", max_new_tokens=text_tokens, steps=steps)
    understand_s = time.perf_counter() - start
    step_ms = [s * 1000 for s in gen.step_seconds]
    return {"step_ms_median": statistics.median(step_ms), "step_ms_p90": percentile(step_ms, 90),
            "tokens_per_forward": gen.tokens.size / gen.forward_passes, "host_fraction": gen.host_fraction,
            "understand_tokens_per_s": max(len(text.tokens), 1) / understand_s,
            "t2i_stages_ms": {k: v * 1000 for k, v in t2i.timings.items()}, "peak_rss_bytes": rss_peak_bytes()}


def tiny_part(args: argparse.Namespace) -> list[dict]:
    from llada_edge.engines.build import build_engines
    from llada_edge.export.build import export_build
    from llada_edge.runtime import Pipeline
    from llada_edge.synthetic import synthesize

    ckpt, build = args.workdir / "tiny-ckpt", args.workdir / "tiny-build"
    if args.build:
        build = args.build
    else:
        if not (ckpt / "config.json").is_file():
            synthesize(ckpt, "tiny", force=True, progress=lambda _m: None)
        export_build(ckpt, build, moe="ort", validate=False, progress=print)
    precisions = ["fp32"] if args.smoke else ["fp32", "int8", "int4"]
    for precision in precisions[1:]:
        build_engines(build, "onnxruntime", precision, report=False, progress=print)
    checkpoint = args.checkpoint or Path(json.loads((build / "manifest.json").read_text())["checkpoint"]["path"])
    runs = [("torch eager", Pipeline.load(checkpoint, backend="torch"))]
    runs += [(f"onnxruntime {p}", Pipeline.load(build, precision=p)) for p in precisions]
    rows = []
    for label, pipe in runs:
        print(f"bench: {label} ...", flush=True)
        result = run_pipeline(pipe, args.image_size, args.text_tokens, args.steps)
        rows.append({"backend": label, **result})
    base = rows[0]
    for row in rows:
        row["step_speedup_vs_torch"] = base["step_ms_median"] / row["step_ms_median"]
        row["understand_speedup_vs_torch"] = row["understand_tokens_per_s"] / base["understand_tokens_per_s"]
    return rows


# ----------------------------------------------------------------------------------------------
# Part 2: real dimensions, this CPU
# ----------------------------------------------------------------------------------------------


def _layer_feeds(cfg: BackboneConfig, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"hidden": rng.standard_normal((rows, BLOCK, cfg.hidden_size)).astype(np.float32),
            "positions": np.tile(np.arange(PAST, PAST + BLOCK), (rows, 1)),
            "past_k": rng.standard_normal((rows, cfg.num_key_value_heads, PAST, cfg.head_dim)).astype(np.float32),
            "past_v": rng.standard_normal((rows, cfg.num_key_value_heads, PAST, cfg.head_dim)).astype(np.float32),
            "attn_mask": np.ones((rows, BLOCK, PAST + BLOCK), bool)}


def _torch_layer_ms(layer: torch.nn.Module, cfg: BackboneConfig, feeds: dict[str, np.ndarray], dtype: torch.dtype,
                    repeats: int) -> float:
    import torch

    from llada_edge.model.backbone import mask_to_bias, rope_cos_sin, rope_inv_freq

    with torch.inference_mode():
        h = torch.from_numpy(feeds["hidden"]).to(dtype)
        cos, sin = rope_cos_sin(torch.from_numpy(feeds["positions"]), rope_inv_freq(cfg), dtype)
        bias = mask_to_bias(torch.from_numpy(feeds["attn_mask"])[:, None])
        pk, pv = (torch.from_numpy(feeds[k]).to(dtype) for k in ("past_k", "past_v"))
        return median_ms(lambda: layer(h, cos, sin, bias, pk, pv), repeats)


def _distinct_experts(ckpt: Path, cfg: BackboneConfig, rows: int) -> float:
    """Distinct experts a block routes to: layer 1's gate on the hidden states of real layers 0 and 1
    over embedded token blocks (mean of 8 blocks)."""
    import torch

    from llada_edge.checkpoint import CheckpointFolder
    from llada_edge.model import load_backbone_layer
    from llada_edge.model.backbone import MoE, mask_to_bias, rope_cos_sin, rope_inv_freq

    layer0, layer1 = load_backbone_layer(ckpt, 0), load_backbone_layer(ckpt, 1)
    assert isinstance(layer1.mlp, MoE)  # layer 0 is the only dense layer
    embeddings = CheckpointFolder(ckpt).backbone.get("model.word_embeddings.weight", torch.float32)
    routed: list[torch.Tensor] = []
    hook = layer1.mlp.gate.register_forward_hook(lambda _m, _a, out: routed.append(out[1]))
    rng = np.random.default_rng(0)
    counts = []
    with torch.inference_mode():
        for _ in range(8):
            ids = torch.from_numpy(rng.integers(0, 157184, (rows, BLOCK)))
            cos, sin = rope_cos_sin(torch.arange(BLOCK).repeat(rows, 1), rope_inv_freq(cfg), torch.float32)
            bias = mask_to_bias(torch.ones(rows, 1, BLOCK, BLOCK, dtype=torch.bool))
            h, _, _ = layer0(embeddings[ids], cos, sin, bias)
            layer1(h, cos, sin, bias)
            counts.append(len(torch.unique(routed.pop())))
    hook.remove()
    return float(np.mean(counts))


def uni_part(args: argparse.Namespace, bandwidth: dict[str, float]) -> dict:
    import onnx
    import onnxruntime as ort
    import torch

    from llada_edge.buildfolder import Artifact
    from llada_edge.config import load_backbone_config
    from llada_edge.engines.build import build_engines
    from llada_edge.export.build import export_build
    from llada_edge.model import load_backbone_layer
    from llada_edge.synthetic import synthesize

    ckpt, build = args.workdir / "uni2", args.workdir / "uni2-build"
    if not (ckpt / "config.json").is_file():
        synthesize(ckpt, "uni", layers=2, components=["backbone"], force=True, progress=print)
    export_build(ckpt, build, ["layer_0", "layer_1", "head_image"], moe="ort", validate=False, progress=print)
    build_engines(build, "onnxruntime", "int4", report=False, progress=print)  # skipped when up to date
    cfg = load_backbone_config(ckpt)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sessions, weight_bytes = {}, {}
    for name in ("layer_0", "layer_1", "head_image"):
        engine = build / Artifact.ort_engine("int4", name).folder
        sessions[name] = ort.InferenceSession(str(engine / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        weight_bytes[name] = _initializer_bytes(onnx.load(str(engine / "model.onnx")))
    rng = np.random.default_rng(0)
    layers = {dtype: {i: load_backbone_layer(ckpt, i, dtype) for i in (0, 1)} for dtype in (torch.bfloat16,
                                                                                            torch.float32)}
    cases = []
    for rows in (1, 2):
        feeds = _layer_feeds(cfg, rows, rng)
        case: dict[str, float] = {"tokens": rows * BLOCK}
        for i in (0, 1):
            case[f"layer{i}_ort_int4_ms"] = median_ms(partial(sessions[f"layer_{i}"].run, None, feeds), args.repeats)
            for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
                case[f"layer{i}_torch_{tag}_ms"] = _torch_layer_ms(layers[dtype][i], cfg, feeds, dtype, args.repeats)
        head_feed = {"hidden": feeds["hidden"]}
        case["head_image_ort_int4_ms"] = median_ms(partial(sessions["head_image"].run, None, head_feed), args.repeats)
        moe_layers = REAL_LAYERS - 1  # layer 0 is the only dense layer
        for tag in ("ort_int4", "torch_bf16", "torch_fp32"):
            case[f"step_{tag}_ms_20_layers"] = case[f"layer0_{tag}_ms"] + moe_layers * case[f"layer1_{tag}_ms"] + (
                case["head_image_ort_int4_ms"] if tag == "ort_int4" else 0.0)
        case["speedup_vs_bf16"] = case["layer1_torch_bf16_ms"] / case["layer1_ort_int4_ms"]
        case["speedup_vs_fp32"] = case["layer1_torch_fp32_ms"] / case["layer1_ort_int4_ms"]
        # roofline of the MoE layer: bytes actually read per step
        distinct = _distinct_experts(ckpt, cfg, rows)
        expert_bytes = weight_bytes["layer_1"]["qmoe"] / cfg.num_experts
        touched = weight_bytes["layer_1"]["other"] + distinct * expert_bytes
        floor_ms = touched / (bandwidth["read_gbs"] * 1e9) * 1000
        case.update({"distinct_experts": distinct, "moe_layer_bytes_touched": touched, "roofline_ms": floor_ms,
                     "roofline_ratio": case["layer1_ort_int4_ms"] / floor_ms})
        cases.append(case)
        print(json.dumps(case), flush=True)
    return {"past": PAST, "threads": os.cpu_count(), "cases": cases}


def _initializer_bytes(model: onnx.ModelProto) -> dict[str, int]:
    from onnx import numpy_helper

    qmoe_inputs = {i for n in model.graph.node if n.op_type == "QMoE" for i in n.input[2:]}
    out = {"qmoe": 0, "other": 0}
    for t in model.graph.initializer:
        size = numpy_helper.to_array(t).nbytes
        out["qmoe" if t.name in qmoe_inputs else "other"] += size
    return out


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# llada-edge latency benchmark", "",
             f"Memory bandwidth (this machine): read {report['bandwidth']['read_gbs']:.1f} GB/s, "
             f"copy {report['bandwidth']['copy_gbs']:.1f} GB/s. Run took {report['seconds']:.0f} s.", "",
             "## Pipelines, tiny preset", "",
             "| backend | step ms (median / p90) | vs torch | tokens/forward | understand tok/s | host share | "
             "t2i backbone / dit / vae ms | peak RSS GB |", "|---|---|---|---|---|---|---|---|"]
    for r in report["tiny"]:
        st = r["t2i_stages_ms"]
        lines.append(f"| {r['backend']} | {r['step_ms_median']:.1f} / {r['step_ms_p90']:.1f} | "
                     f"{r['step_speedup_vs_torch']:.2f}x | {r['tokens_per_forward']:.2f} | "
                     f"{r['understand_tokens_per_s']:.1f} | {r['host_fraction']:.1%} | "
                     f"{st.get('backbone', 0):.0f} / {st.get('dit', 0):.0f} / {st.get('vae', 0):.0f} | "
                     f"{r['peak_rss_bytes'] / 1e9:.2f} |")
    if report.get("uni"):
        lines += ["", "## Real dimensions (uni preset), this CPU, cache 1024 tokens", "",
                  "| tokens/step | MoE layer: ORT int4 / torch bf16 / torch fp32 ms | speed-up vs bf16 / fp32 | "
                  "distinct experts | bytes read | roofline ms | vs roofline | 20-layer step: ORT int4 / bf16 ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in report["uni"]["cases"]:
            lines.append(f"| {c['tokens']} | {c['layer1_ort_int4_ms']:.1f} / {c['layer1_torch_bf16_ms']:.1f} / "
                         f"{c['layer1_torch_fp32_ms']:.1f} | "
                         f"{c['speedup_vs_bf16']:.1f}x / {c['speedup_vs_fp32']:.1f}x | "
                         f"{c['distinct_experts']:.0f} | {c['moe_layer_bytes_touched'] / 1e6:.0f} MB | "
                         f"{c['roofline_ms']:.1f} | {c['roofline_ratio']:.2f}x | "
                         f"{c['step_ort_int4_ms_20_layers']:.0f} / {c['step_torch_bf16_ms_20_layers']:.0f} |")
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    _plot(out / "bench.png", report)


def _plot(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if report.get("uni") else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4))
    axes = np.atleast_1d(axes)
    labels = [r["backend"] for r in report["tiny"]]
    axes[0].bar(labels, [r["step_ms_median"] for r in report["tiny"]], color="tab:blue")
    axes[0].set_ylabel("ms per block step (median)")
    axes[0].set_title("tiny preset, t2i block step")
    axes[0].tick_params(axis="x", rotation=20)
    if panels == 2:
        cases = report["uni"]["cases"]
        x = np.arange(len(cases))
        width = 0.2
        series = (("layer1_torch_bf16_ms", "torch bf16"), ("layer1_torch_fp32_ms", "torch fp32"),
                  ("layer1_ort_int4_ms", "ORT int4"), ("roofline_ms", "roofline"))
        for k, (key, label) in enumerate(series):
            axes[1].bar(x + (k - 1.5) * width, [c[key] for c in cases], width, label=label)
        axes[1].set_xticks(x, [f"T={c['tokens']}" for c in cases])
        axes[1].set_ylabel("ms per MoE layer")
        axes[1].set_yscale("log")
        axes[1].set_title("real dimensions, this CPU")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llada-edge-bench"))
    parser.add_argument("--build", type=Path, help="an existing tiny build folder (skip synth + export)")
    parser.add_argument("--checkpoint", type=Path, help="its checkpoint (default: the manifest's)")
    parser.add_argument("--smoke", action="store_true", help="tiny part only, fp32, few steps (seconds)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--full", type=Path, metavar="BUILD", help="also the full-model section (full_model.py) on "
                        "this existing real-size build (`make bench FULL=BUILD`)")
    parser.add_argument("--full-precision", default="int4", help="the full build's engines to run (default int4)")
    args = parser.parse_args()
    if args.smoke:
        args.image_size, args.text_tokens, args.steps = 64, 16, 4
    start = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    bandwidth = memory_bandwidth_gbs(64 if args.smoke else 512)
    report: dict[str, object] = {"bandwidth": bandwidth, "tiny": tiny_part(args)}
    if not args.smoke:
        report["uni"] = uni_part(args, bandwidth)
    report["seconds"] = time.perf_counter() - start
    write_report(args.out, report)
    print((args.out / "bench.md").read_text())
    if args.full:
        import full_model

        full = full_model.full_part(args.full, args.full_precision)
        full_model.write(args.out, full)
        print(full_model.markdown(full))


if __name__ == "__main__":
    main()
