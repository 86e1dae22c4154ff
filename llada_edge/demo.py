"""``llada-edge demo``: one text-to-image, one understanding and one editing request, with a timing table.

What ``make engines`` ends with: proof that a build folder runs end to end, and where the time goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llada_edge.runtime import BackendOptions, Pipeline
from llada_edge.runtime.pipeline import Progress


@dataclass
class DemoRow:
    task: str
    output: str
    forward_passes: int
    timings: dict[str, float]


STAGES = ("tokenizer", "thinking", "backbone", "sigvq", "dit", "vae", "total")


def run_demo(model: str | Path, out_dir: str | Path, backend: str = "auto", size: int = 256,
             progress: Progress | None = None, precision: str = "fp32") -> tuple[str, list[DemoRow]]:
    """Run the three requests; returns the backend that ran them and one row per request."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline.load(model, backend=backend, progress=progress, options=BackendOptions(precision=precision))
    rows = []
    t2i = pipe.generate_image("a lighthouse on a cliff at dusk", size, size)
    rows.append(DemoRow("t2i", str(t2i.save(out_dir / "t2i.png")), t2i.forward_passes, t2i.timings))
    text = pipe.understand(t2i.image, "What is in this picture?", max_new_tokens=64)
    rows.append(DemoRow("understand", repr(text.text[:40]), text.forward_passes, text.timings))
    edit = pipe.edit(t2i.image, "make it night", source_size=size)
    rows.append(DemoRow("edit", str(edit.save(out_dir / "edit.png")), edit.forward_passes, edit.timings))
    return pipe.backend.name, rows


def format_table(rows: list[DemoRow], backend: str) -> str:
    head = f"| task ({backend}) | passes | " + " | ".join(f"{s} ms" for s in STAGES) + " | output |"
    lines = [head, "|" + "---|" * (len(STAGES) + 3)]
    for r in rows:
        cells = " | ".join(f"{r.timings[s] * 1000:.0f}" if s in r.timings else "-" for s in STAGES)
        lines.append(f"| {r.task} | {r.forward_passes} | {cells} | {r.output} |")
    return "\n".join(lines)
