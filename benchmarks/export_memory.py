"""Peak RSS of exporting the real-dimension backbone (``uni`` preset) as the layer count grows.

    python benchmarks/export_memory.py --layers 2 4 --workdir /tmp/uni-export [--moe dense]

For each N: write a backbone-only ``uni`` checkpoint with N layers, then in a fresh process export
``embed``, every layer and both heads (each validated on ONNX Runtime), and report that process's
peak RSS (VmHWM) next to the checkpoint and build sizes. Bounded memory means the peak stays about
flat as N grows (one component in memory at a time). Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Large components are exported in spawned processes: the peak is the largest of this process (VmHWM)
# and its waited-for descendants (RUSAGE_CHILDREN, in KiB on Linux).
CHILD = """
import resource, sys
from llada_edge.export.build import export_build
export_build(sys.argv[1], sys.argv[2], ["backbone"], moe=sys.argv[3], progress=lambda m: print(m, flush=True))
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print("VMHWM", int(line.split()[1]) * 1024)
print("CHILDREN", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(layers: int, workdir: Path, moe: str) -> dict:
    from llada_edge.synthetic import synthesize

    ckpt, build = workdir / f"uni{layers}", workdir / f"uni{layers}-build"
    for p in (ckpt, build):
        shutil.rmtree(p, ignore_errors=True)
    synthesize(ckpt, "uni", layers=layers, components=["backbone"], progress=lambda _m: None)
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(build), moe], capture_output=True, text=True,
                         check=True)
    lines = res.stdout.splitlines()
    own = next(int(line.split()[1]) for line in lines if line.startswith("VMHWM"))
    children = next(int(line.split()[1]) for line in lines if line.startswith("CHILDREN"))
    peak = max(own, children)
    out = {"layers": layers, "moe": moe, "peak_rss_bytes": peak, "parent_peak_rss_bytes": own,
           "largest_component_process_peak_rss_bytes": children, "checkpoint_bytes": folder_bytes(ckpt),
           "build_bytes": folder_bytes(build), "seconds": round(time.perf_counter() - start, 1),
           "log": [line for line in res.stdout.splitlines() if line.startswith("export")]}
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(build, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llada-edge-export-memory"))
    parser.add_argument("--moe", choices=("dense", "ort"), default="dense")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export_memory.json"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.layers:
        r = measure(n, args.workdir, args.moe)
        results.append(r)
        print(f"{n} layers: peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB, checkpoint "
              f"{r['checkpoint_bytes'] / 2**30:.2f} GiB, build {r['build_bytes'] / 2**30:.2f} GiB, {r['seconds']} s",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
