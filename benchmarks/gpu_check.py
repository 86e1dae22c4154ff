"""One device run that checks and times the torch backend's GPU path (an H200 is what this project can borrow).

    python benchmarks/gpu_check.py --out DIR                 # on the GPU machine: real dimensions
    python benchmarks/gpu_check.py --out DIR --device cpu --preset tiny --layers 2 --short-layers 1 \\
        --context 64 --steps 3 --rows 1 2                    # the same code on a CPU, in miniature (CI)

Without CUDA (and without ``--device cpu``) it writes a one-line note and exits 0.

In one process, with only torch and this project (nothing is downloaded), at real dimensions (``uni``: the
checkpoint is synthesized with ``--layers`` and ``--short-layers`` backbone layers; a 20-layer step is
extrapolated linearly from the two, the numbers of layers are in the JSON):

* device copy bandwidth (a 1 GiB device-to-device copy): what the floors below assume (4.3 TB/s);
* per-step latency (median, p90) of a fused block step (backbone + head on the device, x0 and p back) at
  T = 32 x rows (rows 1 / 2 / 3: plain, CFG, edit) over a ``--context``-token cache, for
  ``upstream_eager`` (bf16, HF-style: the Python loop over the chosen experts, the whole prefix recomputed at
  every step, no cache), ``cached_loop_eager`` (the same loop with a KV cache sliced to its length: the
  stricter baseline), ``eager`` (bf16, static shapes, grouped sparse MoE), ``graphs_bf16`` and ``graphs_fp8``
  (CUDA graphs of the same, FP8 with per-token activation scales); each against the H200 floors of
  performance-notes §3.3;
* host synchronisations per replayed step (``torch.cuda.set_sync_debug_mode``: the D2H of x0 and p is one);
* graph replay vs eager: the tokens of a short CFG text-to-image loop, and one step's hidden states;
* FP8 (per-token and per-tensor activation scales) vs bf16: logit cosine and top-1 agreement on the masked
  positions of one block (random weights: a check of the numerics, not of a trained model's quality);
* a whole 1024x1024 text-to-image request: the backbone from the T=64 step (64x64 codes = 128 blocks, 8 steps
  each), plus one turbo decode (8 DiT evaluations) timed on the real decoder architecture with random bf16
  weights built on the device (a real-size decoder checkpoint is too large to synthesize and load within the
  run's budget), plus the VAE decode when diffusers is importable (it is not on the lent H200).

Every section records its error instead of stopping the run; ``gpu_check.json`` and ``gpu_check.md`` go to --out.
The exit code is 1 when a check fails (replayed tokens differ from eager, a capture fell back, a section raised),
else 0. FP8 agreement is reported, not judged: on random weights the logits are too flat for a bound to mean
anything (the trained tiny checkpoint's bounds are in tests/runtime/test_torch_fp8.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project, without installing it

# performance-notes.md §3.3: H200 floors of one block step of the 20-layer backbone (batch 1, bf16 LM head,
# 4.3 TB/s), by tokens per step: text T=32 (2k context), t2i CFG T=64, edit T=96.
FLOORS_MS = {32: {"bf16": 4.85, "fp8": 2.50}, 64: {"bf16": 6.36, "fp8": 3.19}, 96: {"bf16": 6.98, "fp8": 3.50}}
FULL_LAYERS = 20
VARIANTS: dict[str, dict[str, Any]] = {  # name -> TorchBackend keywords (dtype bf16 for all)
    "upstream_eager": {"moe_impl": "loop", "kv_cache": False},
    "cached_loop_eager": {"moe_impl": "loop"},
    "eager": {"static_shapes": True},
    "graphs_bf16": {"cuda_graphs": True},
    "graphs_fp8": {"cuda_graphs": True, "fp8": "token"},
}
GRAPH_VARIANTS = ("graphs_bf16", "graphs_fp8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the same code in miniature)")
    p.add_argument("--preset", choices=("tiny", "uni"), default="uni")
    p.add_argument("--layers", type=int, default=4, help="backbone layers of the main checkpoint")
    p.add_argument("--short-layers", type=int, default=2, help="layers of the second one (for the per-layer slope)")
    p.add_argument("--context", type=int, default=1024, help="cached tokens before the timed block")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3], help="rows per step (T = 32 x rows)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration (after warm-up)")
    p.add_argument("--image-size", type=int, default=1024, help="side of the t2i whose decode is timed")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/llada-edge-gpu-check"))
    return p.parse_args(argv)


def checkpoint(args: argparse.Namespace, layers: int) -> Path:
    from llada_edge.synthetic import synthesize

    path = args.workdir / f"{args.preset}-{layers}"
    if not (path / "config.json").is_file():
        synthesize(path, args.preset, layers=layers, components=("backbone",), force=True, progress=lambda _m: None)
    return path


def section(report: dict[str, Any], out: Path, name: str, fn: Callable[[], Any]) -> Any:
    """Run one part of the check; its result (or its error) goes into the report under ``name``, and the report
    so far is written at once (a run killed at its time limit still leaves every finished section)."""
    start = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as exc:  # a device run must bring back everything it can
        report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}
    print(f"[{time.perf_counter() - start:6.1f} s] {name}", flush=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    return report[name]


# -- helpers on a backend ------------------------------------------------------------------------


def open_backend(ckpt: Path, device: str, **kwargs: Any) -> Any:
    from llada_edge.runtime.backends.torch_backend import TorchBackend

    backend = TorchBackend(ckpt, device=device, dtype="bfloat16", **kwargs)
    backend.backbone  # noqa: B018 - load now, so load time is not a step time
    return backend


def release() -> None:
    """Free the GPU memory of backends the caller has dropped (``del`` its names first)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def start_with_context(backend: Any, rows: int, context: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """A request of ``rows`` rows whose first ``context`` tokens are cached; returns the next block's inputs."""
    cfg = backend.config.backbone
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.image_token_offset, (rows, context))
    pos = np.tile(np.arange(context + 32), (rows, 1))
    backend.start(rows, context + 64)
    backend.prefill(ids, pos[:, :context], np.ones((rows, context), bool))
    block = np.full((rows, 32), cfg.mask_token_id)
    return block, pos[:, context:], np.ones((rows, 32), bool)


def head_of(rows: int) -> str:
    return "text" if rows == 1 else "image"


def row_weights(rows: int) -> np.ndarray:
    return np.array([1.0] if rows == 1 else [3.0, -2.0] if rows == 2 else [2.0, 0.5, -1.5], np.float32)


def time_steps(backend: Any, rows: int, context: int, steps: int) -> dict[str, float]:
    block, pos, valid = start_with_context(backend, rows, context)
    weights = row_weights(rows)
    for _ in range(3):  # warm-up (and capture)
        backend.forward_sample(head_of(rows), block, pos, valid, weights)
    times = []
    for _ in range(steps):  # forward_sample ends with the device-to-host copy: each time is a whole step
        start = time.perf_counter()
        backend.forward_sample(head_of(rows), block, pos, valid, weights)
        times.append((time.perf_counter() - start) * 1000)
    return {"median_ms": statistics.median(times), "p90_ms": float(np.percentile(times, 90))}


# -- the sections --------------------------------------------------------------------------------


def environment(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "device": device}
    if device == "cuda":
        info.update(name=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                    has_grouped_mm=hasattr(torch, "_grouped_mm"),
                    has_scaled_grouped_mm=hasattr(torch, "_scaled_grouped_mm"))
        src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            dst.copy_(src)
        torch.cuda.synchronize()
        info["copy_tb_per_s"] = round(2 * 10 * 2**30 / (time.perf_counter() - start) / 1e12, 3)  # read + write
        del src, dst
    return info


def step_latency(args: argparse.Namespace, variants: list[str], ckpts: dict[int, Path]) -> dict[str, Any]:
    """Median and p90 per variant, row count and layer count; extrapolated to 20 layers; ratios."""
    out: dict[str, Any] = {"layers": sorted(ckpts), "context": args.context, "steps": args.steps, "variants": {}}
    for name in variants:
        per_rows: dict[str, Any] = {}
        for layers, ckpt in ckpts.items():
            try:
                backend = open_backend(ckpt, args.device, **VARIANTS[name])
                for rows in args.rows:
                    per_rows.setdefault(str(32 * rows), {})[f"{layers}_layers"] = time_steps(
                        backend, rows, args.context, args.steps)
                fallbacks = list(backend.graph_fallbacks)
                del backend
                release()
            except Exception as exc:
                per_rows["error"] = f"{type(exc).__name__}: {exc}"
                break
            if fallbacks:
                per_rows["graph_fallbacks"] = fallbacks
        out["variants"][name] = per_rows
        print(f"  {name}: {json.dumps(per_rows)[:300]}", flush=True)
    long, short = max(ckpts), min(ckpts)
    for name, per_rows in out["variants"].items():
        for tokens, row in per_rows.items():
            if not isinstance(row, dict) or f"{long}_layers" not in row:
                continue
            t_long, t_short = row[f"{long}_layers"]["median_ms"], row[f"{short}_layers"]["median_ms"]
            per_layer = (t_long - t_short) / (long - short) if long != short else t_long / long
            row["per_layer_ms"] = per_layer
            row["extrapolated_20_layers_ms"] = t_long + (FULL_LAYERS - long) * per_layer
            floors = FLOORS_MS.get(int(tokens)) if args.device == "cuda" else None  # H200 floors: GPU runs only
            if floors:
                floor = floors["fp8" if name.endswith("fp8") else "bf16"]
                row["floor_ms"] = floor
                row["ratio_to_floor"] = row["extrapolated_20_layers_ms"] / floor
    out["speedups"] = speedups(out["variants"])
    out["speedups_vs_cached_loop"] = speedups(out["variants"], "cached_loop_eager")
    return out


def speedups(variants: dict[str, Any], baseline: str = "upstream_eager") -> dict[str, float]:
    """Per tokens per step: each variant's 20-layer step against the baseline's."""
    base = variants.get(baseline, {})
    result = {}
    for name, per_rows in variants.items():
        for tokens, row in per_rows.items():
            ref = base.get(tokens)
            if name != baseline and isinstance(row, dict) and isinstance(ref, dict) \
                    and "extrapolated_20_layers_ms" in row and "extrapolated_20_layers_ms" in ref:
                result[f"{name}_T{tokens}"] = ref["extrapolated_20_layers_ms"] / row["extrapolated_20_layers_ms"]
    return result


def syncs_per_step(args: argparse.Namespace, ckpt: Path) -> dict[str, Any]:
    """Host synchronisations torch reports during replayed fused steps (expected: 1, the x0/p copy)."""
    import torch

    backend = open_backend(ckpt, args.device, cuda_graphs=True)
    block, pos, valid = start_with_context(backend, 2, args.context)
    for _ in range(3):
        backend.forward_sample("image", block, pos, valid, row_weights(2))
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(5):
                backend.forward_sample("image", block, pos, valid, row_weights(2))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    messages = sorted({str(w.message).splitlines()[0] for w in caught})
    del backend
    release()
    return {"syncs_per_step": len(caught) / 5, "kinds": messages}


def replay_equals_eager(args: argparse.Namespace, ckpt: Path) -> dict[str, Any]:
    """A short CFG t2i loop (8x8 codes) through eager static steps and through graphs: the same tokens?"""
    from llada_edge.runtime import prompts
    from llada_edge.runtime.sampler import BlockDiffusionSampler, SamplingConfig, left_pad
    from llada_edge.runtime.text import TextTokenizer

    tok = TextTokenizer.from_file(ckpt / "tokenizer.json")
    result: dict[str, Any] = {}
    tokens, hidden = {}, {}
    for name in ("eager", "graphs_bf16") if args.device == "cuda" else ("eager",):
        backend = open_backend(ckpt, args.device, **VARIANTS[name])
        rows = left_pad([prompts.t2i_prompt(tok, "a lighthouse", 8, 8), prompts.t2i_unconditional_prompt(tok, 8, 8)],
                        backend.config.backbone.mask_token_id)
        sampler = BlockDiffusionSampler(backend, "image", SamplingConfig(steps=8))
        gen = sampler.generate(rows, 64, [3.0, -2.0])
        tokens[name] = gen.tokens.tolist()
        result[f"{name}_forward_passes"] = gen.forward_passes
        block, pos, valid = start_with_context(backend, 2, 64)
        for _ in range(2):  # the second call replays the captured block step
            hidden[name] = backend.forward_block(block, pos, valid)[0]
        result[f"{name}_graph_fallbacks"] = list(backend.graph_fallbacks)
        del backend, sampler
        release()
    if "graphs_bf16" in tokens:
        result["same_tokens"] = tokens["eager"] == tokens["graphs_bf16"]
        result["max_abs_hidden"] = float(np.abs(hidden["eager"] - hidden["graphs_bf16"]).max())
    result["tokens_generated"] = len(tokens["eager"])
    return result


def fp8_agreement(args: argparse.Namespace, ckpt: Path) -> dict[str, Any]:
    """FP8 against bf16 on the same inputs: image-head logits of one masked block of 2 rows."""
    ref = open_backend(ckpt, args.device, static_shapes=True)
    block, pos, valid = start_with_context(ref, 2, args.context)
    base = ref.head_image(ref.forward_block(block, pos, valid)[0]).reshape(-1, ref.config.backbone.num_image_tokens)
    del ref
    release()
    result = {}
    for scaling in ("token", "tensor"):
        fp8 = open_backend(ckpt, args.device, static_shapes=True, fp8=scaling)
        block, pos, valid = start_with_context(fp8, 2, args.context)
        logits = fp8.head_image(fp8.forward_block(block, pos, valid)[0]).reshape(base.shape)
        del fp8
        release()
        a, b = base.astype(np.float64), logits.astype(np.float64)
        cosine = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
        result[scaling] = {"logit_cosine": float(cosine.mean()),
                           "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
                           "positions": int(a.shape[0])}
    return result


def random_module(make: Callable[[], Any], device: str) -> Any:
    """A module built on the meta device, then given seeded random bf16 weights on ``device`` (no checkpoint:
    a real-size decoder is too large to synthesize and load within the run's budget; timing needs no values)."""
    import torch

    with torch.device("meta"):
        module = make()
    module = module.to_empty(device=device).to(torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02, generator=generator)
    return module.eval()


def decoder_time(args: argparse.Namespace, ckpt: Path) -> dict[str, Any]:
    """One turbo decode at the request size: 8 DiT evaluations (no CFG) on random bf16 weights of the real
    architecture, and the VAE decode when diffusers is importable (it is not on the lent H200)."""
    import torch

    from llada_edge.config import ModelConfig
    from llada_edge.model.dit import ZImageDiT

    config = ModelConfig.from_folder(ckpt)
    cfg = config.decoders["turbo"]
    side = args.image_size
    latent_side, codes = side // 8, (side // 16) ** 2
    dit = random_module(lambda: ZImageDiT(cfg), args.device)
    latent = torch.randn(1, cfg.in_channels, 1, latent_side, latent_side, device=args.device)
    cap = torch.randn(1, codes, cfg.cap_feat_dim, device=args.device)
    ht = latent_side // cfg.patch_size
    rope = tuple(t.to(args.device) for t in dit.rope_tables(ht, ht, codes))
    t = torch.full((1,), 0.5, device=args.device)

    def decode(model: Any) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for _ in range(8):
                model(latent, t, cap, rope)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    decode(dit)  # warm-up
    seconds = [decode(dit) for _ in range(2)]
    result: dict[str, Any] = {"image_side": side, "image_tokens": ht * ht, "caption_tokens": codes,
                              "dit_params": sum(p.numel() for p in dit.parameters()),
                              "turbo_8_steps_s": min(seconds)}
    del dit
    release()
    try:
        from diffusers import AutoencoderKL

        from llada_edge.model.vae import VaeDecoder
    except ImportError:
        result["vae"] = "not measured: diffusers is not installed here (carry its wheel to time it)"
        return result
    vae = VaeDecoder(random_module(lambda: AutoencoderKL.from_config(config.vae.raw), args.device))
    z = torch.randn(1, cfg.in_channels, latent_side, latent_side, device=args.device)
    with torch.inference_mode():
        vae(z)
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        vae(z)
        if args.device == "cuda":
            torch.cuda.synchronize()
    result["vae_s"] = time.perf_counter() - start
    return result


def t2i_estimate(latency: dict[str, Any], decoder: dict[str, Any], side: int) -> dict[str, Any]:
    """A whole t2i at ``side``: backbone seconds (codes / 32 blocks, 8 steps each, CFG: the T=64 step) per variant,
    plus the measured turbo decode (and VAE when it was measured)."""
    blocks, steps = -(-((side // 16) ** 2) // 32), 8
    out: dict[str, Any] = {"image_side": side, "blocks": blocks, "steps_per_block": steps}
    decode_s = decoder.get("turbo_8_steps_s", 0.0) + decoder.get("vae_s", 0.0) if "error" not in decoder else None
    out["decode_s"] = decode_s
    for name, per_rows in latency.get("variants", {}).items():
        row = per_rows.get("64")
        if isinstance(row, dict) and "extrapolated_20_layers_ms" in row:
            backbone = blocks * steps * row["extrapolated_20_layers_ms"] / 1000
            out[f"{name}_backbone_s"] = backbone
            if decode_s is not None:
                out[f"{name}_total_s"] = backbone + decode_s
    return out


def verdict(report: dict[str, Any]) -> list[str]:
    """The failed checks (empty: all passed)."""
    failed = []
    replay = report.get("replay_vs_eager", {})
    if replay.get("same_tokens") is False:
        failed.append("graph replay gave other tokens than eager")
    if replay.get("graphs_bf16_graph_fallbacks"):  # then "same tokens" compared eager with eager
        failed.append(f"replay check fell back to eager: {replay['graphs_bf16_graph_fallbacks'][0]}")
    for name, per_rows in report.get("step_latency", {}).get("variants", {}).items():
        if "error" in per_rows or per_rows.get("graph_fallbacks"):
            failed.append(f"{name}: {per_rows.get('error') or per_rows['graph_fallbacks'][0]}")
    failed += [f"{name}: {part['error']}" for name, part in report.items()
               if isinstance(part, dict) and "error" in part]
    return failed


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# gpu_check: {env.get('name', env.get('device', '?'))}, torch {env.get('torch', '?')}", ""]
    latency = report.get("step_latency", {})
    if "variants" in latency:
        lines += [f"Per fused block step (ms), {latency['context']}-token cache, layers {latency['layers']} measured, "
                  f"20 extrapolated; floors from performance-notes §3.3.", "",
                  "| variant | T | median | p90 | 20 layers | floor | x floor | vs upstream | vs cached loop |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, per_rows in latency["variants"].items():
            for tokens, row in per_rows.items():
                if not isinstance(row, dict) or "per_layer_ms" not in row:
                    continue
                measured = row[f"{max(latency['layers'])}_layers"]
                ratios = [latency[key].get(f"{name}_T{tokens}") for key in ("speedups", "speedups_vs_cached_loop")]
                lines.append(f"| {name} | {tokens} | {measured['median_ms']:.2f} | {measured['p90_ms']:.2f} | "
                             f"{row['extrapolated_20_layers_ms']:.2f} | {row.get('floor_ms', '-')} | "
                             f"{row.get('ratio_to_floor', float('nan')):.2f} | "
                             + " | ".join("-" if r is None else f"{r:.2f}x" for r in ratios) + " |")
    lines += ["", "```json", json.dumps({k: v for k, v in report.items() if k != "step_latency"}, indent=1)[:6000],
              "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        note = "gpu_check: no CUDA device here, nothing checked (use --device cpu for the miniature run)"
        (args.out / "gpu_check.json").write_text(json.dumps({"cuda": False, "note": note}, indent=2))
        print(note)
        return 0
    started = time.perf_counter()
    report: dict[str, Any] = {"cuda": args.device == "cuda"}
    section(report, args.out, "environment", lambda: environment(args.device))
    ckpts = {n: checkpoint(args, n) for n in sorted({args.layers, args.short_layers})}
    main_ckpt = ckpts[args.layers]
    fp8_ok = args.device != "cuda" or torch.cuda.get_device_capability(0) >= (8, 9)
    variants = [v for v in VARIANTS if (args.device == "cuda" or v not in GRAPH_VARIANTS)
                and (fp8_ok or not v.endswith("fp8"))]
    section(report, args.out, "replay_vs_eager", lambda: replay_equals_eager(args, main_ckpt))
    if args.device == "cuda":
        section(report, args.out, "host_syncs", lambda: syncs_per_step(args, main_ckpt))
    if fp8_ok:
        section(report, args.out, "fp8_vs_bf16", lambda: fp8_agreement(args, main_ckpt))
    latency = section(report, args.out, "step_latency", lambda: step_latency(args, variants, ckpts))
    decoder = section(report, args.out, "decoder", lambda: decoder_time(args, main_ckpt))
    report["t2i"] = t2i_estimate(latency if isinstance(latency, dict) else {}, decoder, args.image_size)
    report["failed_checks"] = verdict(report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 1 if report["failed_checks"] else 0


if __name__ == "__main__":
    sys.exit(main())
