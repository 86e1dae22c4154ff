"""The INT4 MoE layer against its memory roofline: where the time goes, and what moves it.

    python benchmarks/moe_kernel.py [--checkpoint CKPT] [--workdir /tmp/llada-edge-moe] [--blocks 32 64 128]
                                    [--threads 1 2] [--out benchmarks/results]

Layer 1 (256 experts, top-8, hidden 2048) of a real-dimension checkpoint (default: a 2-layer ``uni`` one written
into the workdir) is built into ONNX Runtime int4 engines, one per expert block size (``--override int4_block=B``),
with ``llada-edge stream --keep-graphs``. Then, at T = 32 tokens on a 1024-token cache, in one process:

* latency (median) per block size and per intra-op thread count;
* ONNX Runtime's profiler on the default engine: time per operator type (QMoE, MatMulNBits, attention, ...) and
  the host time outside the kernels;
* the roofline: the bytes a step must read (the distinct experts that the layer's routing picks for real token
  blocks, plus every other weight) over this machine's measured read bandwidth, and each latency's ratio to it.

Writes ``<out>/moe_kernel.json`` and ``moe_kernel.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))

from bench import (
    PAST,
    _distinct_experts,
    _initializer_bytes,
    _layer_feeds,
    median_ms,
    memory_bandwidth_gbs,
)


def _session(path: Path, threads: int, profile: str | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def profile_by_op(path: Path, feeds: dict[str, np.ndarray], threads: int, runs: int) -> dict[str, float]:
    """Mean milliseconds per run by operator type, from ONNX Runtime's profiler (plus "total" for the whole run)."""
    with tempfile.TemporaryDirectory() as tmp:
        session = _session(path, threads, str(Path(tmp) / "moe"))
        session.run(None, feeds)  # warm-up (its events are dropped below by counting only the last runs)
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs_seen = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][-runs:]
    first = runs_seen[0]["ts"]
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1000 / runs
    by_op = dict(sorted(by_op.items(), key=lambda kv: -kv[1]))
    by_op["total"] = sum(e["dur"] for e in runs_seen) / 1000 / runs
    by_op["outside kernels"] = by_op["total"] - sum(v for k, v in by_op.items() if k != "total")
    return by_op


def qmoe_alone(model: onnx.ModelProto, tokens: int, folder: Path) -> tuple[Path, dict[str, Any]]:
    """The layer's QMoE node alone, same attributes and weight shapes, random weights (speed does not depend on
    them), saved under ``folder``; also returns the node's shapes."""
    from onnx import TensorProto, helper, numpy_helper

    node = next(n for n in model.graph.node if n.op_type == "QMoE")
    dims = {t.name: (list(t.dims), t.data_type) for t in model.graph.initializer}
    rng = np.random.default_rng(0)
    weights = []
    for name in node.input[2:]:
        if name:
            shape, dtype = dims[name]
            value = (rng.integers(0, 256, shape, dtype=np.uint8) if dtype == TensorProto.UINT8
                     else (rng.random(shape) * 0.01).astype(np.float32))
            weights.append(numpy_helper.from_array(value, name))
    experts, hidden = dims[node.input[2]][0][0], dims[node.input[5]][0][1]
    alone = helper.make_node("QMoE", ["x", "router", *node.input[2:]], ["y"], domain="com.microsoft")
    alone.attribute.extend(node.attribute)
    graph = helper.make_graph([alone], "qmoe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, hidden]),
                                                helper.make_tensor_value_info("router", TensorProto.FLOAT,
                                                                              [tokens, experts])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights)
    path = folder / "qmoe.onnx"
    onnx.save(helper.make_model(graph, opset_imports=list(model.opset_import)), str(path),
              save_as_external_data=True, location="qmoe.data")
    top_k = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "k")
    return path, {"experts": experts, "hidden": hidden, "top_k": top_k,
                  "bytes_per_expert": sum(len(w.raw_data) for w in weights) // experts}


def qmoe_sweep(model: onnx.ModelProto, threads: int, repeats: int, distinct: tuple[int, ...] = (8, 32, 100, 256)
               ) -> list[dict[str, float]]:
    """QMoE alone at T = 32 with the same top-k spread over ``distinct`` experts: the same token-expert pairs
    (the same multiply-adds) over more and more expert bytes. At 8 experts (13 MB) the time is almost all compute;
    what each further expert adds is its bytes."""
    tokens = 32
    with tempfile.TemporaryDirectory() as tmp:
        path, shapes = qmoe_alone(model, tokens, Path(tmp))
        session = _session(path, threads)
        rng = np.random.default_rng(1)
        x = rng.standard_normal((tokens, shapes["hidden"])).astype(np.float32)
        found = []
        for count in distinct:
            pool = rng.choice(shapes["experts"], count, replace=False)
            router = np.full((tokens, shapes["experts"]), -1e9, np.float32)  # the builder's log-weight encoding
            for row in router:
                row[rng.choice(pool, shapes["top_k"], replace=False)] = np.log(1 / shapes["top_k"])
            ms = median_ms(partial(session.run, None, {"x": x, "router": router}), repeats)
            mb = count * shapes["bytes_per_expert"] / 1e6
            found.append({"distinct_experts": count, "ms": ms, "expert_mb": mb, "gbs": mb / ms})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="real-dimension checkpoint (default: synth uni, 2 layers)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llada-edge-moe"))
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per engine")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--baseline", type=Path, help="another build's int4 layer_1 engine folder (e.g. built at an "
                        "earlier commit from the same checkpoint), timed in this run beside block 128")
    args = parser.parse_args()

    from llada_edge.buildfolder import Artifact
    from llada_edge.calibration.recipes import get_recipe
    from llada_edge.config import load_backbone_config
    from llada_edge.engines.streaming import stream_build
    from llada_edge.synthetic import synthesize

    ckpt = args.checkpoint or args.workdir / "uni2"
    if not (ckpt / "config.json").is_file():
        synthesize(ckpt, "uni", layers=2, components=["backbone"], force=True, progress=print)
    build = args.workdir / "build"
    engines = {}
    for block in args.blocks:
        overrides = {} if block == 128 else {"int4_block": str(block)}
        stream_build(ckpt, build, ["int4"], components=["layer_1"], overrides=overrides, keep_graphs=True,
                     validate=False, progress=print)
        engines[block] = build / Artifact.ort_engine(get_recipe("int4", overrides).name, "layer_1").folder

    cfg = load_backbone_config(ckpt)
    feeds = _layer_feeds(cfg, 1, np.random.default_rng(0))
    bandwidth = memory_bandwidth_gbs(512)
    weights = _initializer_bytes(onnx.load(str(engines[128] / "model.onnx")))
    distinct = _distinct_experts(ckpt, cfg, 1)
    touched = weights["other"] + distinct * weights["qmoe"] / cfg.num_experts
    floor_ms = touched / (bandwidth["read_gbs"] * 1e9) * 1000
    candidates: dict[int | str, Path] = {block: folder / "model.onnx" for block, folder in engines.items()}
    if args.baseline:
        candidates[f"baseline {args.baseline}"] = args.baseline / "model.onnx"
    cases = []
    for threads in args.threads:
        # Interleaved rounds, median of the rounds' medians: this machine's speed drifts by 10-20% within minutes,
        # so timing one engine after the other would compare the drift, not the engines
        runs = {name: partial(_session(path, threads).run, None, feeds) for name, path in candidates.items()}
        rounds: dict[int | str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                rounds[name].append(median_ms(run, args.repeats))
        for name, found in rounds.items():
            ms = float(np.median(found))
            cases.append({"block": name, "threads": threads, "ms": ms, "rounds_ms": found,
                          "vs_roofline": ms / floor_ms})
            print(json.dumps(cases[-1]), flush=True)
    profile = {t: profile_by_op(engines[128] / "model.onnx", feeds, t, args.repeats) for t in args.threads}
    layer = onnx.load(str(engines[128] / "model.onnx"), load_external_data=False)  # the QMoE node and shapes
    sweep = {t: qmoe_sweep(layer, t, args.repeats) for t in args.threads}
    report = {"tokens": 32, "past": PAST, "cores": os.cpu_count(), "bandwidth": bandwidth,
              "distinct_experts": distinct, "bytes_touched": touched, "roofline_ms": floor_ms, "cases": cases,
              "profile_block128": profile, "qmoe_alone_block128": sweep}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moe_kernel.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# INT4 MoE layer vs the roofline (T = 32, cache {PAST})", "",
             f"Roofline: {touched / 1e6:.0f} MB touched ({distinct:.0f} distinct experts + other weights) at "
             f"{bandwidth['read_gbs']:.1f} GB/s read = {floor_ms:.1f} ms "
             f"(numpy, one thread: {bandwidth['read_gbs_numpy_1thread']:.1f} GB/s).", "",
             "| int4 block | threads | ms | vs roofline |", "|---|---|---|---|"]
    lines += [f"| {c['block']} | {c['threads']} | {c['ms']:.1f} | {c['vs_roofline']:.2f}x |" for c in cases]
    for threads, ops in profile.items():
        lines += ["", f"Profile, block 128, {threads} thread(s), ms per run: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in ops.items())]
    for threads, rows in sweep.items():
        lines += ["", f"QMoE alone, block 128, {threads} thread(s), the same 32 x top-k pairs over N distinct experts: "
                  + ", ".join(f"{r['distinct_experts']}: {r['ms']:.1f} ms ({r['gbs']:.1f} GB/s)" for r in rows)]
    (args.out / "moe_kernel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
