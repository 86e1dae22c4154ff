"""`make bench` in miniature: the report's fields exist and are finite (speed is measured by benchmarks)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_writes_a_complete_report(tiny_build: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--smoke", "--build", str(tiny_build),
                          "--checkpoint", str(tiny_ckpt), "--out", str(out), "--workdir", str(tmp_path / "w")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["bandwidth"]["read_gbs"] > 0
    backends = [r["backend"] for r in report["tiny"]]
    assert backends == ["torch eager", "onnxruntime fp32"]
    for row in report["tiny"]:
        for key in ("step_ms_median", "step_ms_p90", "tokens_per_forward", "understand_tokens_per_s",
                    "host_fraction", "step_speedup_vs_torch", "peak_rss_bytes"):
            assert math.isfinite(row[key]) and row[key] >= 0, key
        assert {"backbone", "dit", "vae", "total"} <= set(row["t2i_stages_ms"])
    assert (out / "bench.md").read_text().startswith("# llada-edge latency benchmark")
    assert (out / "bench.png").stat().st_size > 1000
