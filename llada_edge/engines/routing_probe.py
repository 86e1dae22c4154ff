"""Which experts each MoE layer graph chose: the accuracy report's expert-selection agreement.

In the ONNX Runtime lowering the routing stays in plain fp32 ONNX and reaches the ``MoE`` / ``QMoE`` op
as its ``router_probs`` input: log(weight) on the chosen experts and -1e9 elsewhere (``model.backbone.MoE``).
A probe is an instrumented copy of a layer graph with that tensor as one more output, run by the same
backend in place of the layer's own session, so the layers see exactly the inputs the pipeline gives
them. The copy is written to a temporary folder inside the build folder (same file system) next to hard
links of the original's weight files (ONNX Runtime refuses external data reached through a symlink that
leaves the model's folder), and the folder is removed as soon as the session has loaded it.

Only the ORT lowering names its router input; a graph without a MoE/QMoE node (the dense lowering of
the TensorRT builds) has no probe, and the report leaves the metric out.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from llada_edge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

MOE_OPS = ("MoE", "QMoE")
CHOSEN_ABOVE = -1e8  # router entries of chosen experts are log(weight) >= log(1e-30); the rest are -1e9


def router_tensor(model: onnx.ModelProto) -> str | None:
    """The name of the tensor feeding the MoE/QMoE op's router input, if the graph has one."""
    for node in model.graph.node:
        if node.domain == "com.microsoft" and node.op_type in MOE_OPS:
            return node.input[1]
    return None


class _ProbeSession:
    """An InferenceSession whose IO-bound runs also fetch the router tensor into ``chosen``."""

    def __init__(self, session: Any, router: str) -> None:
        self._session = session
        self._router = router
        self.chosen: list[np.ndarray] = []  # per run: [tokens, experts] bool

    def io_binding(self) -> Any:
        return self._session.io_binding()

    def run_with_iobinding(self, binding: Any) -> None:
        binding.bind_output(self._router, "cpu")
        self._session.run_with_iobinding(binding)
        router = binding.get_outputs()[-1].numpy()
        self.chosen.append(router.reshape(-1, router.shape[-1]) > CHOSEN_ABOVE)


def _instrumented(path: Path, router: str, folder: Path, model: onnx.ModelProto) -> Path:
    """``model`` with ``router`` as an extra output, saved in ``folder`` next to links to its weight files."""
    for entry in os.listdir(path.parent):
        if entry != path.name and (path.parent / entry).is_file():
            try:
                os.link(path.parent / entry, folder / entry)
            except OSError:  # a file system without hard links
                shutil.copyfile(path.parent / entry, folder / entry)
    model.graph.output.append(helper.make_tensor_value_info(router, TensorProto.FLOAT, None))
    out = folder / path.name
    out.write_bytes(model.SerializeToString())
    return out


def install_probes(backend: OnnxRuntimeBackend) -> dict[str, _ProbeSession]:
    """Replace each MoE layer's session of ``backend`` by a probe; returns them by layer name."""
    import onnxruntime as ort

    probes = {}
    for layer in backend.registry.layers:
        path = backend.graph_path(layer.name)
        model = onnx.load(str(path), load_external_data=False)
        router = router_tensor(model)
        if router is None:
            continue
        with tempfile.TemporaryDirectory(prefix=".routing-probe-", dir=backend.build_dir) as folder:
            probe_path = _instrumented(path, router, Path(folder), model)
            session = ort.InferenceSession(str(probe_path), backend.session_options, providers=backend.providers)
        probes[layer.name] = _ProbeSession(session, router)
        backend.replace_session(layer.name, probes[layer.name])
    return probes


def selection_agreement(ref: np.ndarray, other: np.ndarray) -> float:
    """Mean over tokens of |chosen by both| / |chosen by the reference| (1.0: identical expert sets)."""
    both = (ref & other).sum(-1)
    return float(np.mean(both / np.maximum(ref.sum(-1), 1)))
