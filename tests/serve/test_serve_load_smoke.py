"""benchmarks/serve_load.py in miniature (no Ray: test_serve_ray covers the replicas and the fault): every
request answered, the burst beyond the queue answered 429 with Retry-After, the report complete. Figures come
from the benchmark, not from here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_load_smoke_loses_nothing(tiny_build: Path, tmp_path: Path) -> None:
    out = tmp_path / "load"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--model", str(tiny_build),
                           "--out", str(out), "--smoke", "--skip-ray"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "serve_load.json").read_text())
    for run in ("direct", "server", "soak"):
        assert report[run]["status"] == {"200": report[run]["requests"]}, run
        assert 0 < report[run]["p50_s"] <= report[run]["p95_s"]
    burst = report["burst"]
    capacity = report["workers"] + report["queue_size"]
    assert burst["lost"] == 0 and burst["requests"] == 4 * capacity
    assert burst["status"]["200"] + burst["status"]["429"] == burst["requests"] and burst["status"]["429"] > 0
    assert burst["retry_after_present"]
    assert len(report["soak"]["rss_mb"]) == 10 and "ray" not in report
    assert (out / "serve_load.md").read_text().startswith("# llada-edge serve: load and fault test")
