"""``llada-edge``: one subcommand per public function.

* ``synth``     -> :func:`llada_edge.synthetic.synthesize` (``--preset tiny-trained``:
  :func:`llada_edge.training.cache.tiny_trained`)
* ``inspect``   -> :func:`llada_edge.summary.summarize_checkpoint`
* ``reference`` -> :func:`llada_edge.reference.run_reference`
* ``run``       -> :meth:`llada_edge.runtime.Pipeline.run` on the typed request of :func:`run_request`
* ``export``    -> :func:`llada_edge.export.build.export_build`
* ``demo``      -> :func:`llada_edge.demo.run_demo`
* ``build``     -> :func:`llada_edge.engines.build.build_engines`
* ``calibrate`` -> :func:`llada_edge.calibration.capture.calibrate_build`
* ``quantize``  -> :func:`llada_edge.engines.build.quantize_build` (TensorRT Q/DQ graphs, on the CPU)
* ``report``    -> :func:`llada_edge.engines.accuracy.accuracy_report` (exit code 3 when a threshold fails)
* ``serve``     -> :func:`llada_edge.serve.app.create_app` under uvicorn (``--ray``:
  :func:`llada_edge.serve.ray_app.run`)

Bad input (a broken folder, a wrong size...) and a failing environment (a full disk, a read-only
folder) exit with code 2 and a one-line reason on stderr, never a traceback; an export whose numeric
validation fails, and an internal error, exit with code 1 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llada_edge.errors import InputError, LladaEdgeError

if TYPE_CHECKING:
    from llada_edge.runtime.requests import Request

EXIT_USAGE = 2
EXIT_INTERNAL = 1


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------


def cmd_synth(args: argparse.Namespace) -> int:
    from llada_edge.synthetic import COMPONENTS, synthesize

    if args.preset == "tiny-trained":
        from llada_edge.training.cache import tiny_trained

        fixed = [flag for flag, value in (("--layers", args.layers), ("--experts-dtype", args.experts_dtype != "bf16"),
                                          ("--components", args.components != list(COMPONENTS))) if value]
        if fixed:
            raise InputError(f"{fixed[0]} does not apply to --preset tiny-trained (it is the whole tiny preset, "
                             "trained); use --preset tiny")
        tiny_trained(args.out, args.seed, cache=args.cache, force=args.force, progress=_progress)
        return 0
    synthesize(args.out, args.preset, layers=args.layers, seed=args.seed, expert_dtype=args.experts_dtype,
               components=args.components, force=args.force, progress=_progress)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from llada_edge.summary import summarize_checkpoint

    summary = summarize_checkpoint(args.folder)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.format())
    return 0


def cmd_reference(args: argparse.Namespace) -> int:
    from llada_edge.reference import run_reference

    results = run_reference(args.model, args.height, args.width, args.seed, progress=_progress)
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        for r in results:
            print(f"{r.name:<26} {r.seconds * 1000:>9.1f} ms  {r.output}")
    return 0


def _fields_given(args: argparse.Namespace, kind: type, **dests: str) -> dict[str, Any]:
    """The fields of dataclass ``kind`` the user set (flags default to None, so the dataclass holds the default);
    ``dests`` names the flag of a field whose flag is named differently."""
    given = {f.name: getattr(args, dests.get(f.name, f.name), None) for f in dataclasses.fields(kind)}
    return {name: value for name, value in given.items() if value is not None}


def _require(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) is None:
            raise InputError(f"'run {args.task}' needs --{name.replace('_', '-')}")


def run_request(args: argparse.Namespace) -> Request:
    """The typed request a ``run`` command line describes."""
    from llada_edge.runtime.requests import (
        ChatRequest,
        EditOptions,
        EditRequest,
        T2IOptions,
        T2IRequest,
        TextOptions,
        UnderstandRequest,
    )
    from llada_edge.runtime.sampler import SprintConfig

    sprint = None
    if args.use_sprint:
        sprint = SprintConfig(**_fields_given(args, SprintConfig, threshold="sprint_threshold"))
    _require(args, "prompt", *(["image"] if args.task in ("understand", "edit") else []))
    if args.task == "understand":
        options = TextOptions(**_fields_given(args, TextOptions), sprint=sprint)
        return UnderstandRequest(args.image, args.prompt, options)
    if args.task == "chat":
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        return ChatRequest(messages, TextOptions(**_fields_given(args, TextOptions), sprint=sprint))
    if args.task == "t2i":
        return T2IRequest(args.prompt, T2IOptions(**_fields_given(args, T2IOptions), sprint=sprint))
    return EditRequest(args.image, args.prompt, EditOptions(**_fields_given(args, EditOptions)))


def cmd_run(args: argparse.Namespace) -> int:
    from llada_edge.runtime import BackendOptions, ImageResult, Pipeline
    from llada_edge.runtime.images import output_format
    from llada_edge.runtime.pipeline import stderr_progress

    request = run_request(args)  # bad options fail before any model is loaded
    out = Path(args.out or f"{args.task}.png")
    if args.task in ("t2i", "edit"):
        output_format(out)  # and an output that cannot be written fails before the generation, not after
    pipe = Pipeline.load(args.model, backend=args.backend, progress=None if args.quiet else stderr_progress,
                         options=BackendOptions(args.precision, args.device, args.dtype,
                                                cuda_graphs=args.cuda_graphs, fp8=args.fp8))
    result = pipe.run(request)
    outputs: list[str] = []
    if isinstance(result, ImageResult):
        outputs.append(str(result.save(out)))
    payload = result.to_dict()
    payload.update({"task": args.task, "backend": pipe.backend.name, "outputs": outputs})
    if args.json:
        print(json.dumps(payload))
    else:
        print(outputs[0] if outputs else payload["text"])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from llada_edge.export.build import export_build

    manifest = export_build(args.checkpoint, args.out, args.components, moe=args.moe, opset=args.opset,
                            validate=not args.no_validate, progress=_progress)
    exported = sum(1 for entry in manifest.components.values() if entry.kind == "onnx")
    print(f"{args.out}: {exported} components"
          + (f", validation: {Path(args.out) / 'reports' / 'validation.md'}" if not args.no_validate else ""))
    if args.dtype != "fp32":
        from llada_edge.engines.build import prepare_half_graphs

        half = prepare_half_graphs(args.out, args.dtype, _progress, args.components)
        print(f"{args.out}: {len(half)} {args.dtype} GPU graphs (quant/{args.dtype}/)")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from llada_edge.calibration.recipes import get_recipe, parse_overrides
    from llada_edge.engines.build import build_engines

    overrides = parse_overrides(args.override)
    manifest = build_engines(args.build, args.target, args.precision, overrides,
                             report=not args.no_report, progress=_progress, sm=args.sm, components=args.components)
    name = get_recipe(args.precision, overrides).name  # the report of this recipe, overrides included
    report = manifest.reports.get(f"accuracy-{name}") if args.target == "onnxruntime" else None
    if report:
        print(f"{args.build}: {args.target} {name} engines; accuracy report {report['path']}: "
              f"{'pass' if report['passed'] else 'FAIL'}")
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    from llada_edge.calibration.recipes import parse_overrides
    from llada_edge.engines.streaming import stream_build

    stats = stream_build(args.checkpoint, args.out, args.precision, moe=args.moe, components=args.components,
                         overrides=parse_overrides(args.override), keep_graphs=args.keep_graphs,
                         validate=not args.no_validate, progress=_progress)
    print(f"{args.out}: {', '.join(args.precision)} engines; build folder {stats.final_disk_bytes / 1e9:.2f} GB "
          f"(peak {stats.peak_disk_bytes / 1e9:.2f} GB), peak RSS {stats.peak_rss_bytes / 1e9:.2f} GB")
    if args.stats:
        Path(args.stats).write_text(json.dumps(stats.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from llada_edge.calibration.capture import calibrate_build

    calibrate_build(args.build, checkpoint=args.checkpoint, stride=args.stride, max_samples=args.max_samples,
                    progress=_progress)
    print(Path(args.build) / "calibration")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from llada_edge.calibration.recipes import parse_overrides
    from llada_edge.engines.build import quantize_build

    sources = quantize_build(args.build, args.precision, parse_overrides(args.override), _progress)
    print(f"{args.build}: {sum(1 for p in sources.values() if 'quant' in p.parts)} GPU graphs for TensorRT")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from llada_edge.calibration.recipes import get_recipe, parse_overrides
    from llada_edge.engines.accuracy import accuracy_report

    name = get_recipe(args.precision, parse_overrides(args.override)).name
    report = accuracy_report(args.build, name, _progress, graphs=args.graphs)
    print(f"{args.build}: accuracy of {name} ({report['graphs']}): {'pass' if report['passed'] else 'FAIL'}")
    return 0 if report["passed"] else 3


def cmd_demo(args: argparse.Namespace) -> int:
    from llada_edge.demo import format_table, run_demo
    from llada_edge.runtime.pipeline import stderr_progress

    backend, rows = run_demo(args.model, args.out, args.backend, args.size, progress=stderr_progress,
                             precision=args.precision)
    print(format_table(rows, backend))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from llada_edge.serve.config import ServeConfig
        from llada_edge.serve.ray_app import RayOptions
    except ImportError as exc:
        raise InputError(f"serve needs the server's packages: pip install 'llada-edge[serve]' ({exc})") from exc

    config = ServeConfig(args.model, args.backend, args.precision, args.device, args.workers, args.queue_size,
                         args.timeout, tuple(args.image_dir), args.output_dir, args.model_name, args.threads)
    if args.ray or args.write_config:
        from llada_edge.serve import ray_app

        ray = RayOptions(args.replicas, args.replica_cpus, args.replica_gpus)
        if args.write_config:
            Path(args.write_config).write_text(ray_app.config_file(config, ray, args.host, args.port))
            print(f"{args.write_config}: apply with `serve deploy {args.write_config}` on the cluster's head node")
            return 0
        _progress(f"llada-edge serve: {ray.replicas} Ray Serve replica(s) on http://{args.host}:{args.port}")
        ray_app.run(config, ray, args.host, args.port)
        return 0
    import uvicorn

    from llada_edge.serve.app import create_app

    _progress(f"llada-edge serve: http://{args.host}:{args.port} (GET /health says when the engines are loaded)")
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level)
    return 0


# ----------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from llada_edge.config import MAX_CONFIG_BYTES, MAX_EXPERTS, MAX_LAYERS
    from llada_edge.synthetic import COMPONENTS, PRESETS

    parser = argparse.ArgumentParser(
        prog="llada-edge",
        description="Export toolchain and lean runtime for LLaDA2.0-Uni. Each subcommand has its own --help. "
        "Bad input exits with code 2 and one line naming the file and key; an internal error exits with code 1 "
        f"and a short message. Configs are refused beyond {MAX_LAYERS} layers, {MAX_EXPERTS} experts or "
        f"{MAX_CONFIG_BYTES >> 20} MiB.")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an internal error (also: LLADA_EDGE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a deterministic synthetic checkpoint in the upstream layout",
                       description="Write a synthetic LLaDA2.0-Uni checkpoint folder (same files, keys, shapes, "
                       "dtypes, sharding and special-token ids as upstream, seeded random values). The folder "
                       "is written under a temporary name and renamed when complete.")
    p.add_argument("--preset", choices=[*sorted(PRESETS), "tiny-trained"], default="tiny",
                   help="tiny: every structural feature at test size; uni: the real dimensions; tiny-trained: "
                   "tiny, trained here on the standard library's docstrings and captioned procedural scenes "
                   "(seed 0 in a clone of the repository: rebuilt in seconds from the patch committed under "
                   "artifacts/ when it matches the code; otherwise trained, 10-20 minutes on 2 cores; then copied "
                   "from the cache; its quality figures are in OUT/training_report.json)")
    p.add_argument("--layers", type=int, default=None,
                   help="backbone layers (also caps the ViT and DiT depth); default: tiny 3, uni 2")
    p.add_argument("--seed", type=int, default=0, help="seed of every tensor (default 0)")
    p.add_argument("--experts-dtype", choices=("bf16", "fp8"), default="bf16",
                   help="store routed experts as bf16 or float8_e4m3fn (the upstream -FP8 variant)")
    p.add_argument("--components", nargs="+", choices=COMPONENTS, default=list(COMPONENTS), metavar="NAME",
                   help=f"which weights to write (configs and tokenizer always): {' '.join(COMPONENTS)}")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="tiny-trained: where trained checkpoints are kept, keyed by their fingerprint (seed, "
                   "settings, corpus, code and torch versions); default $LLADA_EDGE_CACHE or ~/.cache/llada-edge")
    p.add_argument("--out", required=True, help="the checkpoint folder to create")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("inspect", help="validate a checkpoint folder and summarise it",
                       description="Validate every config, tensor key, shape and dtype of a checkpoint folder "
                       "(headers only) and print components, parameter counts, dtypes and shards. Exit code 2 "
                       "and a message naming the file and key when something is wrong.")
    p.add_argument("folder", help="checkpoint folder in the upstream layout")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("reference", help="run each PyTorch reference component once (smoke check)",
                       description="Load each component of a checkpoint folder with the PyTorch reference "
                       "modules and run it once on deterministic inputs; prints outputs and timings.")
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--height", type=int, default=256, help="test image height (multiple of 32)")
    p.add_argument("--width", type=int, default=256, help="test image width (multiple of 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.set_defaults(func=cmd_reference)

    _add_run_parser(sub)
    _add_serve_parser(sub)

    p = sub.add_parser("export", help="export every component to ONNX, validated against the reference",
                       description="Export the components of a checkpoint folder to ONNX graphs in a build folder "
                       "(manifest.json, onnx/<component>/, reports/). One component at a time from only its own "
                       "tensors (bounded memory); each is validated on ONNX Runtime CPU against the PyTorch "
                       "reference. Re-running skips what is up to date; a changed checkpoint or option rebuilds "
                       "only what it affects.")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder in the upstream layout")
    p.add_argument("--out", required=True, help="build folder to create or update")
    p.add_argument("--components", nargs="+", metavar="NAME",
                   help="components or groups (default all): vision_tokenizer sigvq dit_turbo dit_normal "
                   "vae_decoder embed layer_N head_text head_image; groups: layers heads dit backbone image")
    p.add_argument("--moe", choices=("dense", "ort"), default="dense",
                   help="MoE lowering: dense (standard ONNX, for TensorRT) or ort (com.microsoft.MoE, fast on "
                   "ONNX Runtime CPU)")
    p.add_argument("--opset", type=int, default=20, help="ONNX opset (default 20)")
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs reference comparison")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="float type of the GPU graphs (default fp32: the CPU reference only). fp16/bf16 also write "
                   "quant/<dtype>/<component> (ModelOpt AutoCast; norms, softmax, router, RoPE kept fp32, see "
                   "engines/half.py), fp16 ones validated against fp32 on ONNX Runtime; quantized TensorRT recipes "
                   "then keep their unquantized parts in this type")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="one t2i, one understanding and one edit request, with a timing table")
    p.add_argument("--model", required=True, help="build folder (onnxruntime) or checkpoint folder (torch)")
    p.add_argument("--backend", default="auto", help="auto, torch or onnxruntime")
    p.add_argument("--size", type=int, default=256, help="t2i image size (default 256)")
    p.add_argument("--precision", default="fp32", help="onnxruntime engines to use (default fp32)")
    p.add_argument("--out", default="build/demo", help="where the PNGs go (default build/demo)")
    p.set_defaults(func=cmd_demo)

    from llada_edge.calibration.recipes import KINDS, RECIPES
    from llada_edge.calibration.requests import DEFAULT_MAX_SAMPLES, DEFAULT_STRIDE

    p = sub.add_parser("build", help="engines for a target and precision, with an accuracy report",
                       description="Build engines from an exported build folder. onnxruntime: weights rewritten to "
                       "QMoE (experts) / MatMulNBits (dense) / fp8 storage per the recipe, then an accuracy report "
                       "against fp32 on held-out requests (reports/accuracy-<precision>.md). tensorrt / tensorrt-rtx: "
                       "strongly typed engines from ModelOpt Q/DQ graphs in fp16/bf16, each with an engine census "
                       "(the format every GEMM's weights ended up in; a GEMM wider than the recipe asked fails the "
                       "build). tensorrt needs TensorRT and an NVIDIA GPU; tensorrt-rtx builds without a GPU for "
                       "the compute capabilities of --sm (engines run on RTX GPUs).")
    p.add_argument("--build", required=True, help="build folder made by `llada-edge export`")
    p.add_argument("--target", choices=("onnxruntime", "tensorrt", "tensorrt-rtx"), default="onnxruntime")
    p.add_argument("--precision", choices=list(RECIPES), default="int4",
                   help="recipe (default int4); fp16 and bf16 are for the tensorrt targets")
    p.add_argument("--override", nargs="+", metavar="KIND=FORMAT",
                   help=f"per-kind formats, e.g. dit=fp8 (kinds: {' '.join(KINDS)}; formats: fp32 fp8 int8 int4), "
                   "or dtype=bf16 (the float type of a tensorrt recipe's unquantized parts; default: the export's "
                   "--dtype, else fp16), int4_method=awq_clip|awq_lite|rtn_dq (tensorrt targets' int4 weights), "
                   "int4_block=16|32|64|128 (int4 block along K, default 128 or the largest that divides K), "
                   "int4_scale=max|mse (onnxruntime's int4 expert scales: amax, or the clip with least error)")
    p.add_argument("--sm", nargs="+", metavar="SM", help="tensorrt-rtx: compute capabilities to build for "
                   "(sm75 sm80 sm86 sm89 sm120 sm121; default sm89 sm120; fp8 needs sm89+)")
    p.add_argument("--components", nargs="+", metavar="NAME", help="tensorrt targets: only these components or "
                   "groups (default all), e.g. layer_1 dit_turbo")
    p.add_argument("--no-report", action="store_true", help="skip the accuracy report")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("stream", help="checkpoint -> ONNX Runtime engines one component at a time (bounded disk)",
                       description="Export, build and clean up one component at a time: each component (the "
                       "backbone one layer at a time) is exported to fp32 ONNX, rewritten into the engines of every "
                       "--precision, then its fp32 graph is deleted, so peak disk is the finished build plus one "
                       "component's fp32 graph, and peak memory one component's. Resumable: a re-run (after a crash "
                       "or Ctrl-C) continues from the first component not finished, and never trusts a partial file. "
                       "The result runs like any build (`llada-edge run --model OUT --precision P`). The accuracy "
                       "report compares each engine with its fp32 graph, so it needs --keep-graphs and then "
                       "`llada-edge report`.")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder in the upstream layout (bf16 or the FP8 "
                   "experts variant)")
    p.add_argument("--out", required=True, help="build folder to create or continue")
    p.add_argument("--precision", nargs="+", choices=[r for r, recipe in RECIPES.items() if not recipe.is_float
                                                      and recipe.dtype == "fp32"], default=["int4"],
                   help="recipes to build engines for (default int4); all are built before a graph is deleted")
    p.add_argument("--override", nargs="+", metavar="KIND=FORMAT", help="per-kind formats for every precision, as in "
                   "`llada-edge build`, e.g. lm_head=int8")
    p.add_argument("--components", nargs="+", metavar="NAME", help="components or groups (default all), as in "
                   "`llada-edge export`")
    p.add_argument("--moe", choices=("dense", "ort"), default="ort",
                   help="MoE lowering (default ort: QMoE engines; dense gives per-expert MatMulNBits)")
    p.add_argument("--keep-graphs", action="store_true", help="keep the fp32 graphs (then `report` can run)")
    p.add_argument("--no-validate", action="store_true", help="skip each export's ONNX Runtime vs reference check")
    p.add_argument("--stats", metavar="FILE", help="write what the build cost (seconds per stage, peak disk and RSS) "
                   "as JSON")
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("calibrate", help="capture calibration activations inside the real sampling loops",
                       description="Run the shipped calibration requests (t2i, understanding, chat, editing; CFG rows "
                       "included) on the PyTorch reference and save every component's graph inputs to "
                       "BUILD/calibration (ModelOpt's .npz format) plus expert_coverage.json.")
    p.add_argument("--build", required=True, help="build folder")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the one the build was exported from)")
    p.add_argument("--stride", type=int, default=DEFAULT_STRIDE,
                   help=f"capture every N-th denoising step (default {DEFAULT_STRIDE})")
    p.add_argument("--max-samples", type=int, default=DEFAULT_MAX_SAMPLES,
                   help=f"samples kept per component (default {DEFAULT_MAX_SAMPLES})")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("quantize", help="the GPU graphs of a recipe for TensorRT (runs on the CPU)",
                       description="Write BUILD/quant/<precision>/<component> with NVIDIA ModelOpt's ONNX PTQ from the "
                       "dense fp32 graphs and the calibration data (captured first if missing), then in the recipe's "
                       "fp16/bf16; each graph is checked against the TensorRT operator allow-list.")
    p.add_argument("--build", required=True, help="build folder exported with --moe dense")
    p.add_argument("--precision", choices=[r for r in RECIPES if r != "fp32"], default="fp8")
    p.add_argument("--override", nargs="+", metavar="KIND=FORMAT", help="per-kind formats, e.g. dit=fp8")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("report", help="the accuracy report of a recipe against fp32 (held-out requests)",
                       description="Measure a recipe's graphs against the fp32 export of the same build on held-out "
                       "requests (teacher-forced logits, perplexity, expert selection, generation, tokenizer ids, "
                       "decoder) and check the recipe's thresholds; writes BUILD/reports/accuracy[-gpu]-<recipe>."
                       "{json,md}. `build --target onnxruntime` runs it for its engines already. Exit code 3 when a "
                       "threshold fails.")
    p.add_argument("--build", required=True, help="build folder")
    p.add_argument("--precision", choices=[r for r in RECIPES if r != "fp32"], default="int4")
    p.add_argument("--override", nargs="+", metavar="KIND=FORMAT", help="the overrides the graphs were built with")
    p.add_argument("--graphs", choices=("engines", "gpu"), default="engines",
                   help="engines: the ONNX Runtime engines (build --target onnxruntime); gpu: the GPU graphs that "
                   "TensorRT engines are built from (quantize; ModelOpt Q/DQ in fp16), run on ONNX Runtime's CPU "
                   "provider, so their numerics and not TensorRT's kernels")
    p.set_defaults(func=cmd_report)
    return parser


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="an OpenAI-style HTTP server (chat, understanding, images), optionally on Ray Serve",
        description="Serve a build folder (or a checkpoint folder on the torch backend) over HTTP: POST "
        "/v1/chat/completions (text messages: chat; one user message with an image_url part: understanding; "
        "stream: true for server-sent progress), POST /v1/images/generations, POST /v1/images/edits (multipart), "
        "GET /health (200 once the engines are loaded), GET /metrics (Prometheus), GET /v1/models. Each worker "
        "owns one pipeline and runs one request at a time; at most --queue-size requests wait, more are answered "
        "429 with Retry-After. Request options and limits are those of `llada-edge run`. Listens on 127.0.0.1 "
        "unless told otherwise.")
    p.add_argument("--model", required=True, help="build folder (onnxruntime, tensorrt) or checkpoint folder (torch)")
    p.add_argument("--backend", default="auto", help="auto, torch, onnxruntime or tensorrt (default auto)")
    p.add_argument("--precision", default="fp32", help="which engines of the build (default fp32)")
    p.add_argument("--device", default="cpu", help="torch backend: cpu or cuda")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--workers", type=int, default=1, help="pipelines, each with its own engines and KV cache "
                   "(default 1; each holds the model's weights in memory)")
    p.add_argument("--queue-size", type=int, default=8, help="requests that may wait for a worker (default 8)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request, waiting included (default 600)")
    p.add_argument("--image-dir", action="append", default=[], metavar="DIR",
                   help="a folder whose images requests may name by path (repeatable; default: none, data URLs only)")
    p.add_argument("--output-dir", help="where response_format 'path' writes images (default: b64_json only)")
    p.add_argument("--model-name", help="the model id clients see (default: the model folder's name)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads per worker (default: the CPUs shared among "
                   "the workers; with --ray, each replica's --replica-cpus)")
    p.add_argument("--log-level", default="info", help="uvicorn's log level (default info)")
    p.add_argument("--ray", action="store_true", help="run on Ray Serve (a local instance, or RAY_ADDRESS)")
    p.add_argument("--replicas", type=int, default=1, help="--ray: replicas, each with its own workers (default 1)")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="--ray: CPUs per replica (default 1)")
    p.add_argument("--replica-gpus", type=float, default=0.0, help="--ray: GPUs per replica (default 0)")
    p.add_argument("--write-config", metavar="FILE", help="write a Ray Serve config file for `serve deploy` and "
                   "exit (the multi-node form)")
    p.set_defaults(func=cmd_serve)


def _default(kind: type, name: str) -> Any:
    """A dataclass field's default, for help texts (the flag itself defaults to None: "not given")."""
    return next(f.default for f in dataclasses.fields(kind) if f.name == name)


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    from llada_edge.runtime.backends import BACKENDS, BackendOptions
    from llada_edge.runtime.decode import DECODE_MODES, MAX_DECODE_STEPS
    from llada_edge.runtime.images import MAX_INPUT_PIXELS
    from llada_edge.runtime.requests import (
        MAX_GUIDANCE,
        T2I_MODES,
        EditOptions,
        ImageOptions,
        T2IOptions,
        TextOptions,
    )
    from llada_edge.runtime.sampler import SamplingConfig, SprintConfig

    def dflt(kind: type, name: str) -> str:
        return f"default {_default(kind, name)}"

    p = sub.add_parser(
        "run", help="run a request: understand, chat, t2i, edit",
        description="Run one request through the runtime. Text goes to stdout, images to a PNG (--out); --json "
        "prints one JSON object with the generated token ids, text, output paths, timings and forward passes. "
        "Progress goes to stderr. Every option maps onto a field of the typed requests in "
        "llada_edge.runtime.requests, which hold the defaults. Limits: input images up to "
        f"{MAX_INPUT_PIXELS:,} pixels, decoder steps up to {MAX_DECODE_STEPS}, guidance scales within "
        f"+-{MAX_GUIDANCE:g}, threshold in [0, 1], the prompt plus the generation within the model's positions.")
    p.add_argument("task", choices=("understand", "chat", "t2i", "edit"))
    p.add_argument("--model", required=True, help="checkpoint folder (torch) or build folder (onnxruntime)")
    p.add_argument("--backend", default="auto", help=f"engine backend: {', '.join(BACKENDS)} (default auto: "
                   "onnxruntime for a build folder, torch for a checkpoint folder)")
    p.add_argument("--device", default=BackendOptions.device, help="torch backend: cpu or cuda")
    p.add_argument("--dtype", default=BackendOptions.dtype, choices=("float32", "bfloat16"),
                   help="torch backend dtype")
    p.add_argument("--cuda-graphs", action="store_true", help="torch backend on --device cuda: one CUDA graph per "
                   "step shape, static shapes and the sparse grouped MoE (not run on a GPU by this project yet; "
                   "benchmarks/gpu_check.py checks it)")
    p.add_argument("--fp8", choices=("token", "tensor"), help="torch backend: FP8 e4m3 projections with per-channel "
                   "weight scales and per-token or per-tensor activation scales (CUDA compute capability >= 8.9, "
                   "or the CPU, slowly)")
    p.add_argument("--precision", default=BackendOptions.precision, help="onnxruntime/tensorrt backends: which "
                   "engines of the build (fp32, fp8, int8, int4, mixed; see `llada-edge build`)")
    p.add_argument("--image", help="input image (understand, edit)")
    p.add_argument("--prompt", help="question (understand), message (chat), prompt (t2i), instruction (edit)")
    p.add_argument("--system", help="chat: system prompt (default: the understanding assistant prompt)")
    p.add_argument("--height", type=int, help=f"t2i output height, multiple of 32 ({dflt(T2IOptions, 'height')})")
    p.add_argument("--width", type=int, help=f"t2i output width, multiple of 32 ({dflt(T2IOptions, 'width')})")
    p.add_argument("--steps", type=int, help=f"denoising steps per {_default(SamplingConfig, 'block_size')}-token "
                   f"block (default: {_default(ImageOptions, 'steps')} images, {_default(TextOptions, 'steps')} text)")
    p.add_argument("--threshold", type=float, help=f"confidence acceptance threshold "
                   f"({dflt(SamplingConfig, 'threshold')})")
    p.add_argument("--temperature", type=float, help="0 = greedy argmax (default)")
    p.add_argument("--max-new-tokens", type=int,
                   help=f"text: generation budget ({dflt(TextOptions, 'max_new_tokens')})")
    p.add_argument("--cfg-scale", type=float, help=f"t2i guidance scale (1 = no CFG; {dflt(T2IOptions, 'cfg_scale')})")
    p.add_argument("--cfg-text-scale", type=float, help=f"edit text guidance ({dflt(EditOptions, 'cfg_text_scale')})")
    p.add_argument("--cfg-image-scale", type=float,
                   help=f"edit image guidance ({dflt(EditOptions, 'cfg_image_scale')}: 0 runs 2 rows)")
    p.add_argument("--cfg-rescale", type=float, help="CFG rescale phi (off by default; SGO uses 0.7)")
    p.add_argument("--mode", choices=T2I_MODES, help="t2i: thinking mode first writes its reasoning, then the image "
                   f"({dflt(T2IOptions, 'mode')})")
    p.add_argument("--decode-mode", choices=sorted(DECODE_MODES),
                   help="image decoder: turbo (8 steps) or normal (50 steps with CFG) "
                   f"({dflt(ImageOptions, 'decode_mode')})")
    p.add_argument("--decode-steps", type=int,
                   help=f"decoder steps, up to {MAX_DECODE_STEPS} (default: turbo 8, normal 50)")
    p.add_argument("--sprint", dest="use_sprint", action="store_true",
                   help="SPRINT acceleration (understand, chat, t2i)")
    p.add_argument("--keep-ratio", type=float, help=f"SPRINT prefix keep ratio ({dflt(SprintConfig, 'keep_ratio')})")
    p.add_argument("--image-keep-ratio", type=float, help="SPRINT keep ratio for image tokens (default: --keep-ratio)")
    p.add_argument("--text-keep-ratio", type=float, help="SPRINT keep ratio for text tokens (default: --keep-ratio)")
    p.add_argument("--sprint-threshold", type=float,
                   help=f"SPRINT batch acceptance ({dflt(SprintConfig, 'threshold')})")
    p.add_argument("--seed", type=int, help="seed of sampling and decoder noise (default 0)")
    p.add_argument("--out", help="output image (t2i, edit): the suffix picks the format (.png, .jpg, .webp); "
                   "default <task>.png")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    debug = args.debug or os.environ.get("LLADA_EDGE_DEBUG") == "1"
    where = f"llada-edge {args.command}"
    try:
        return func(args)
    except LladaEdgeError as exc:
        print(f"{where}: error: {exc}", file=sys.stderr)
        return 1 if type(exc).__name__ == "ValidationFailed" else EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the environment: a full disk, a read-only file system, a permission
        if debug:
            raise
        target = f"{exc.filename}: " if exc.filename else ""
        print(f"{where}: error: {target}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug: one line, the traceback on request
        if debug:
            raise
        message = str(exc).splitlines()[0][:300] if str(exc) else ""
        print(f"{where}: internal error: {type(exc).__name__}: {message} (run `llada-edge --debug "
              f"{args.command} ...` for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
