"""The accuracy report of a precision recipe: its quantized graphs vs the fp32 graphs of the same build.

Measured on held-out content nothing was trained or calibrated on: docstrings of held-out standard-library
modules (``training.corpus``), held-out captioned scenes (``training.scenes``) and the "evaluation" requests of
``calibration_set.json``:

* ``logit_cosine`` / ``top1_agreement`` (and per task: ``_chat``, ``_understand``, ``_t2i``): backbone logits
  at masked positions of partially masked sequences (mask ratios 0.25 / 0.5 / 0.9; t2i image codes through the
  image head, answers through the text head). Teacher-forced: both sides see the same tokens.
* ``perplexity_fp32`` / ``perplexity`` / ``perplexity_ratio``: of the true held-out text at those masked
  positions (full-vocabulary softmax); ``masked_accuracy_fp32`` / ``masked_accuracy``: top-1 == the truth.
* ``expert_agreement_<layer>``: the share of each token's fp32 expert choice the quantized layer also makes,
  read by routing probes (:mod:`llada_edge.engines.routing_probe`); ``expert_agreement`` is the worst layer.
* ``generated_agreement_understand`` / ``generated_agreement_t2i``: share of positions where the full
  pipelines generate the same token (errors compound: the strictest measure).
* ``tokenizer_id_agreement``: VQ ids of the held-out images.
* ``dit_velocity_rel_error``: ||v_q - v|| / ||v|| of one decoder evaluation (turbo and normal).
* ``decode_psnr_db``: the same VQ ids decoded by both sides; ``t2i_psnr_db``: both full pipelines.

Each recipe has thresholds (:data:`THRESHOLDS` for the ONNX Runtime engines, :data:`GPU_THRESHOLDS` for the GPU
graphs); the report says which passed. They are set from the trained tiny checkpoint (``synth --preset
tiny-trained``), whose logits are peaked and whose routers prefer experts, so that they separate a good recipe
from a mediocre or broken one; the reasoning is next to them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from llada_edge.buildfolder import Manifest, atomic_write_bytes
from llada_edge.calibration.requests import RequestSet, load_request_set, procedural_image
from llada_edge.engines.routing_probe import install_probes, selection_agreement
from llada_edge.runtime import Pipeline
from llada_edge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from llada_edge.runtime.images import smart_resize, to_pixels
from llada_edge.runtime.text import TextTokenizer
from llada_edge.training import corpus, scenes
from llada_edge.training.sequences import (
    Example,
    SceneTokens,
    chat_example,
    t2i_example,
    understand_example,
    window_to_raster,
)

MASK_RATIOS = (0.25, 0.5, 0.9)
HELD_OUT_PASSAGES = 12  # docstring paragraphs of held-out standard-library modules
HELD_OUT_SCENES = 6  # captioned scenes per task (understanding, text-to-image)

# metric -> bound ("min" for agreements/cosines/PSNR, "max" for errors and ratios), for the ONNX Runtime engines.
#
# Set from the trained tiny checkpoint (`synth --preset tiny-trained`, `llada-edge build --precision P` on its ORT
# export; README "Accuracy"), measured / bound. Since 2026-12-02 every run tests the same weights: the patch
# committed under artifacts/ (fingerprint 6ff5a65e), whose figures are the first four rows:
#
#              top-1   top-1 t2i  ppl ratio  experts  cosine   tok ids  DiT err  decode dB
#   fp8        0.982   0.937      1.000      0.9985   1.0000   0.95     0.046    30.3
#   int8       0.992   0.969      1.000      0.9994   1.0000   0.975    0.016    39.9
#   int4       0.964   0.851      0.999      0.9994   0.9999   0.975    0.016    39.9
#   mixed      0.957   0.846      0.999      0.9985   0.9999   0.95     0.046    30.3
#   int4, int4 everywhere (the former recipe)     0.921  0.783  1.006  0.9935  0.9996   0.975  0.161  15.5
#   int4 + expert scales 8/7 too large (bug)      0.918  0.702  1.005  0.9985  0.9993   -      -      -
#   int4 + expert K blocks reversed (bug)         0.735  0.278  1.055  0.9978  0.9876   -      -      -
#
# Earlier trainings (each CI run trained its own then; the backbone's training is not byte-deterministic), t2i
# top-1: fp8 0.958 / 0.914 / 0.929 / 0.940 / 0.956, int8 0.971 / 0.969, int4 0.924 / 0.893 / 0.895 / 0.942 / 0.901,
# mixed 0.922 / 0.893; the committed training's int4 0.851 and mixed 0.846 are the lowest of six, so their bound
# moved 0.86 -> 0.83. Top-1 overall moved by at most 0.012 (int4 0.969 / 0.963 / 0.957 / 0.974 / 0.972 / 0.964).
# The fp8 DiT's decode PSNR: 30.3 dB on three trainings, 24.5 dB on two of 2026-12-02 (fingerprint d7ea3b0f) at
# the same velocity error (0.045 vs 0.046), while int8/int4's rose 39.9 -> 47.3 dB. Those two ran on one machine,
# slower than the others and perhaps another CPU model: a CPU-dependent float path in the decoder's training is
# the likelier cause than the fingerprint, but neither was established (no DiT, VAE or recipe code changed). The
# fp8 bound is 22 dB: 2.5 dB under the lowest, still far above an int4 DiT's 15.5 dB.
#
# Reasoning: the bounds sit about 0.02 or more under the lowest measurement of each shipped recipe (t2i, the least
# stable figure, 0.016-0.021 under the committed training) and above both planted bugs and the former int4-everywhere
# recipe, so the report separates a good recipe from a mediocre one, which the random preset could not (its top-1
# agreement was 0.49-0.91 for the same recipes). Top-1 agreement carries the separation; t2i top-1 is the most sensitive
# task (16384-way image head, flatter than text) and gets its own bound; the perplexity ratio bounds what the
# disagreements cost on true text; the cosine stays near 1 for every recipe and only catches gross breakage. Expert
# agreement is >= 0.99 everywhere (trained routers are decisive) and bounds rerouting. Generated agreement (32 tokens,
# compounding) is reported but too coarse to bound.
THRESHOLDS: dict[str, dict[str, tuple[str, float]]] = {
    "fp8": {"top1_agreement": ("min", 0.95), "top1_agreement_t2i": ("min", 0.89), "perplexity_ratio": ("max", 1.01),
            "expert_agreement": ("min", 0.99), "logit_cosine": ("min", 0.999), "tokenizer_id_agreement": ("min", 0.9),
            "dit_velocity_rel_error": ("max", 0.08), "decode_psnr_db": ("min", 22.0)},
    "int8": {"top1_agreement": ("min", 0.97), "top1_agreement_t2i": ("min", 0.94), "perplexity_ratio": ("max", 1.01),
             "expert_agreement": ("min", 0.99), "logit_cosine": ("min", 0.999),
             "tokenizer_id_agreement": ("min", 0.93), "dit_velocity_rel_error": ("max", 0.03),
             "decode_psnr_db": ("min", 35.0)},
    "int4": {"top1_agreement": ("min", 0.94), "top1_agreement_t2i": ("min", 0.83), "perplexity_ratio": ("max", 1.015),
             "expert_agreement": ("min", 0.99), "logit_cosine": ("min", 0.999),
             "tokenizer_id_agreement": ("min", 0.93), "dit_velocity_rel_error": ("max", 0.03),
             "decode_psnr_db": ("min", 35.0)},
    "mixed": {"top1_agreement": ("min", 0.94), "top1_agreement_t2i": ("min", 0.83),
              "perplexity_ratio": ("max", 1.015), "expert_agreement": ("min", 0.99), "logit_cosine": ("min", 0.999),
              "tokenizer_id_agreement": ("min", 0.9), "dit_velocity_rel_error": ("max", 0.08),
              "decode_psnr_db": ("min", 22.0)},
}
# The GPU graphs (``--graphs gpu``: ModelOpt Q/DQ in fp16, run on ONNX Runtime's CPU provider), measured / bound:
#
#              top-1   top-1 t2i  ppl ratio  experts  cosine   tok ids  DiT err  decode dB
#   fp16       0.995   0.987      1.000      0.9999   1.0000   1.0      0.001    60.0
#   fp8        0.949   0.887      1.000      0.9974   0.9999   0.843    0.067    27.0
#   int4       0.936   0.819      1.013      0.9945   0.9996   0.914    0.044    32.4
#   mixed      0.936   0.819      1.013      0.9945   0.9996   0.843    0.067    27.0
#   int4 with round-to-nearest weights (int4_method=rtn_dq instead of AWQ)   0.916  0.767  1.009  0.9920
#
# Lower than the ONNX Runtime engines, for known reasons: fp8 here is W8A8 (activations quantized too, where the
# CPU engines store fp8 weights only), the half type adds its own rounding (the fp16 column), and a GPU graph has
# one Q/DQ mode per graph, so the attention and shared-expert weights of an int4 or mixed layer are int4 as well
# (int4 and mixed layers are the same graphs; the README's "int4: before and after" shows what that costs). The
# bounds sit 0.02-0.04 under the measurements; AWQ's lead over round-to-nearest (t2i 0.819 vs 0.767) is inside
# the int4 bounds, so an int4 build that silently fell back to round-to-nearest fails t2i top-1.
GPU_THRESHOLDS: dict[str, dict[str, tuple[str, float]]] = {
    "fp16": {"top1_agreement": ("min", 0.98), "top1_agreement_t2i": ("min", 0.96), "perplexity_ratio": ("max", 1.005),
             "expert_agreement": ("min", 0.995), "logit_cosine": ("min", 0.9995),
             "tokenizer_id_agreement": ("min", 0.97), "dit_velocity_rel_error": ("max", 0.01),
             "decode_psnr_db": ("min", 45.0)},
    "fp8": {"top1_agreement": ("min", 0.92), "top1_agreement_t2i": ("min", 0.85), "perplexity_ratio": ("max", 1.015),
            "expert_agreement": ("min", 0.99), "logit_cosine": ("min", 0.999), "tokenizer_id_agreement": ("min", 0.8),
            "dit_velocity_rel_error": ("max", 0.1), "decode_psnr_db": ("min", 23.0)},
    "int4": {"top1_agreement": ("min", 0.91), "top1_agreement_t2i": ("min", 0.79), "perplexity_ratio": ("max", 1.025),
             "expert_agreement": ("min", 0.985), "logit_cosine": ("min", 0.999),
             "tokenizer_id_agreement": ("min", 0.87), "dit_velocity_rel_error": ("max", 0.07),
             "decode_psnr_db": ("min", 28.0)},
    "mixed": {"top1_agreement": ("min", 0.91), "top1_agreement_t2i": ("min", 0.79),
              "perplexity_ratio": ("max", 1.025), "expert_agreement": ("min", 0.985), "logit_cosine": ("min", 0.999),
              "tokenizer_id_agreement": ("min", 0.8), "dit_velocity_rel_error": ("max", 0.1),
              "decode_psnr_db": ("min", 23.0)},
}

Progress = Callable[[str], None]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def held_out_sequences(pipe: Pipeline, evaluation: RequestSet) -> list[tuple[str, Example]]:
    """(kind, sequence) pairs nothing was trained or calibrated on, with their true continuations.

    chat: held-out standard-library docstrings (``training.corpus``) as answers; understand: held-out
    captioned scenes with the evaluation set's questions, the caption as the answer; t2i: the caption,
    then the scene's codes in raster order (the image head). Targets are real text and real image codes,
    so a trained checkpoint's logits are peaked on them and perplexity means something.
    """
    tok, cfg = pipe.tokenizer, pipe.config
    offset = cfg.backbone.image_token_offset
    mean, std = cfg.preprocessor.image_mean, cfg.preprocessor.image_std
    out = [("chat", chat_example(tok, p)) for p in corpus.held_out_passages()[:HELD_OUT_PASSAGES]]
    seeds = scenes.held_out_seeds(2 * HELD_OUT_SCENES)
    for i, seed in enumerate(seeds[:HELD_OUT_SCENES]):
        img, caption = scenes.scene(seed, 128, 128)
        pixels = to_pixels(smart_resize(Image.fromarray(img)), mean, std)
        tokens = SceneTokens(caption, pipe.backend.tokenize_image(pixels).tolist(), pixels.shape[2] // 16,
                             pixels.shape[3] // 16)
        question = evaluation.understand[i % len(evaluation.understand)]
        out.append(("understand", understand_example(tok, tokens, question, offset)))
    for i, seed in enumerate(seeds[HELD_OUT_SCENES:]):
        side = 64 if i % 2 else 128  # 4x4 and 8x8 code grids
        img, caption = scenes.scene(seed, side, side)
        gh = side // 16
        ids = pipe.backend.tokenize_image(to_pixels(Image.fromarray(img), mean, std))
        if pipe.config.preprocessor.token_order == "window":
            ids = window_to_raster(ids, gh, gh)
        out.append(("t2i", t2i_example(tok, SceneTokens(caption, ids.tolist(), gh, gh), offset)))
    return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


class _Tally:
    """Per-kind lists of what the teacher-forced pass measures."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, name: str, values: np.ndarray | list[float]) -> None:
        self.values.setdefault(name, []).extend(np.asarray(values, np.float64).ravel().tolist())

    def mean(self, name: str) -> float:
        return float(np.mean(self.values[name]))


def teacher_forced_agreement(ref: Pipeline, quant: Pipeline, evaluation: RequestSet) -> dict[str, float]:
    """Both sides see the same partially masked held-out sequences (mask ratios :data:`MASK_RATIOS`); any two
    pipelines (ONNX Runtime engines against fp32 graphs here, the torch backend FP8 against bf16 in its tests)."""
    rng = np.random.default_rng(0)
    mask = ref.config.backbone.mask_token_id
    probes = [install_probes(p.backend) if isinstance(p.backend, OnnxRuntimeBackend) else {} for p in (ref, quant)]
    tally = _Tally()
    for kind, example in held_out_sequences(ref, evaluation):
        seq = np.asarray(example.ids)
        for ratio in MASK_RATIOS:
            ids = seq.copy()
            masked = np.zeros(len(ids), bool)
            masked[example.start:] = rng.random(len(ids) - example.start) < ratio
            ids[masked] = mask
            feeds = (ids[None], np.arange(len(ids))[None], np.ones((1, len(ids)), bool))
            logits = []
            for pipe in (ref, quant):
                hidden = pipe.backend.hidden_states(*feeds)[:, masked]
                run_head = pipe.backend.head_image if example.head == "image" else pipe.backend.head_text
                logits.append(run_head(hidden)[0].copy())
            truth = seq[masked] - (ref.config.backbone.image_token_offset if example.head == "image" else 0)
            agree = logits[0].argmax(-1) == logits[1].argmax(-1)
            for name in ("all", kind):
                tally.add(f"cosine_{name}", _cosine(logits[0], logits[1]))
                tally.add(f"agree_{name}", agree)
            for side, lg in zip(("fp32", "quant"), logits, strict=True):
                tally.add(f"correct_{side}", lg.argmax(-1) == truth)
                if kind == "chat":
                    tally.add(f"nll_{side}", -np.take_along_axis(_log_softmax(lg), truth[:, None], -1))
            for name, probe in probes[0].items():
                if name in probes[1]:
                    chosen_ref, chosen_quant = probe.chosen.pop(), probes[1][name].chosen.pop()
                    tally.add(f"experts_{name}", [selection_agreement(chosen_ref, chosen_quant)])
    metrics = {"logit_cosine": tally.mean("cosine_all"), "top1_agreement": tally.mean("agree_all"),
               "masked_positions": float(len(tally.values["agree_all"]))}
    for kind in ("chat", "understand", "t2i"):
        metrics[f"top1_agreement_{kind}"] = tally.mean(f"agree_{kind}")
    metrics["masked_accuracy_fp32"] = tally.mean("correct_fp32")
    metrics["masked_accuracy"] = tally.mean("correct_quant")
    metrics["perplexity_fp32"] = float(np.exp(tally.mean("nll_fp32")))
    metrics["perplexity"] = float(np.exp(tally.mean("nll_quant")))
    metrics["perplexity_ratio"] = metrics["perplexity"] / metrics["perplexity_fp32"]
    layers = sorted(k for k in tally.values if k.startswith("experts_"))
    for key in layers:
        metrics[f"expert_agreement_{key.removeprefix('experts_')}"] = tally.mean(key)
    if layers:
        metrics["expert_agreement"] = min(tally.mean(key) for key in layers)
    return metrics


def _generation(ref: Pipeline, quant: Pipeline, evaluation: RequestSet) -> dict[str, float]:
    img = Image.fromarray(procedural_image(128, 128, evaluation.image_seeds[1]))
    a, b = (p.understand(img, evaluation.understand[0], max_new_tokens=32, steps=8) for p in (ref, quant))
    n = max(len(a.tokens), len(b.tokens), 1)
    understand = sum(x == y for x, y in zip(a.tokens, b.tokens, strict=False)) / n
    ta, tb = (p.generate_image(evaluation.t2i[0], 128, 128, steps=4) for p in (ref, quant))
    t2i = float(np.mean(np.asarray(ta.vq_tokens) == np.asarray(tb.vq_tokens)))
    return {"generated_agreement_understand": float(understand), "generated_agreement_t2i": t2i,
            "t2i_psnr_db": _psnr(np.asarray(ta.image), np.asarray(tb.image))}


def _image_side(ref: Pipeline, quant: Pipeline, evaluation: RequestSet) -> dict[str, float]:
    cfg = ref.config
    agree = []
    for seed in evaluation.image_seeds:
        img = smart_resize(Image.fromarray(procedural_image(160, 224, seed)))
        pixels = to_pixels(img, cfg.preprocessor.image_mean, cfg.preprocessor.image_std)
        agree.append(float(np.mean(ref.backend.tokenize_image(pixels) == quant.backend.tokenize_image(pixels))))
    rng = np.random.default_rng(1)
    errors = {}
    for mode, rows in (("turbo", 1), ("normal", 2)):
        dec = cfg.decoders[mode]
        latent = rng.standard_normal((rows, dec.in_channels, 1, 16, 16)).astype(np.float32)
        cap = rng.standard_normal((rows, 64, dec.cap_feat_dim)).astype(np.float32)
        t = np.full(rows, 0.4, np.float32)
        va, vb = (p.backend.dit(mode, latent, t, cap) for p in (ref, quant))
        errors[mode] = float(np.linalg.norm(vb - va) / np.linalg.norm(va))
    tokens = rng.integers(0, cfg.vision.num_embeddings, 16).tolist()
    da, db = (p.decode(tokens, 128, 128, seed=3) for p in (ref, quant))
    return {"tokenizer_id_agreement": float(np.mean(agree)), "dit_velocity_rel_error": max(errors.values()),
            "dit_velocity_rel_error_turbo": errors["turbo"], "dit_velocity_rel_error_normal": errors["normal"],
            "decode_psnr_db": _psnr(np.asarray(da.image), np.asarray(db.image))}


def check_thresholds(precision: str, metrics: dict[str, float], graphs: str = "engines") -> dict[str, dict[str, Any]]:
    checks = {}
    table = THRESHOLDS if graphs == "engines" else GPU_THRESHOLDS
    for metric, (kind, bound) in table.get(precision.split("+")[0], {}).items():
        if metric not in metrics:  # expert agreement needs the MoE op's router input (ORT lowering)
            continue
        value = metrics[metric]
        ok = value >= bound if kind == "min" else value <= bound
        checks[metric] = {"value": value, kind: bound, "passed": bool(ok)}
    return checks


def report_name(precision: str, graphs: str = "engines") -> str:
    """``accuracy-<precision>`` (ONNX Runtime engines) or ``accuracy-gpu-<precision>`` (the GPU graphs)."""
    return f"accuracy-{precision}" if graphs == "engines" else f"accuracy-gpu-{precision}"


def accuracy_report(build_dir: str | Path, precision: str, progress: Progress = print,
                    graphs: str = "engines") -> dict[str, Any]:
    """Measure a precision against fp32 on the held-out set; write reports/<report_name>.{json,md}.

    ``graphs``: "engines" measures the ONNX Runtime engines (``build --target onnxruntime``); "gpu" the GPU graphs
    the TensorRT engines are built from (``quantize``: ModelOpt Q/DQ in fp16), run on ONNX Runtime's CPU
    provider: their numerics, not TensorRT's kernels.
    """
    build_dir = Path(build_dir)
    name = report_name(precision, graphs)
    evaluation = load_request_set("evaluation")
    tokenizer = TextTokenizer.from_file(build_dir / "model" / "tokenizer.json")
    # verified like `run` does: a report on tampered graphs must not say "pass"
    ref = Pipeline(OnnxRuntimeBackend(build_dir, "fp32"), tokenizer)
    quant = Pipeline(OnnxRuntimeBackend(build_dir, precision, graphs=graphs), tokenizer)
    progress(f"{name}: teacher-forced logits ...")
    metrics = teacher_forced_agreement(ref, quant, evaluation)
    progress(f"{name}: generation ...")
    metrics.update(_generation(ref, quant, evaluation))
    progress(f"{name}: tokenizer, decoder ...")
    metrics.update(_image_side(ref, quant, evaluation))
    checks = check_thresholds(precision, metrics, graphs)
    what = "ONNX Runtime engines" if graphs == "engines" else "GPU graphs (ModelOpt Q/DQ, fp16) on ONNX Runtime CPU"
    report = {"precision": precision, "graphs": what, "reference": "fp32 graphs of the same build",
              "metrics": metrics, "thresholds": checks, "passed": all(c["passed"] for c in checks.values())}
    _write(build_dir / "reports", name, report)
    manifest = Manifest.load(build_dir)
    manifest.reports[name] = {"path": f"reports/{name}.json", "passed": report["passed"], **metrics}
    manifest.save(build_dir)
    progress(f"{name}: {'pass' if report['passed'] else 'FAIL'} "
             f"(cosine {metrics['logit_cosine']:.4f}, top-1 {metrics['top1_agreement']:.3f})")
    return report


def _write(reports: Path, name: str, report: dict[str, Any]) -> None:
    atomic_write_bytes(reports / f"{name}.json", (json.dumps(report, indent=2) + "\n").encode())
    lines = [f"# Accuracy: {report['precision']} ({report['graphs']}) vs fp32, held-out requests", "",
             "| metric | value | bound | result |", "|---|---|---|---|"]
    for metric, value in report["metrics"].items():
        check = report["thresholds"].get(metric)
        bound = "" if check is None else (f">= {check['min']}" if "min" in check else f"<= {check['max']}")
        result = "" if check is None else ("pass" if check["passed"] else "FAIL")
        lines.append(f"| {metric} | {value:.4g} | {bound} | {result} |")
    atomic_write_bytes(reports / f"{name}.md", ("\n".join(lines) + "\n").encode())
