"""Which experts each MoE layer graph chose: the accuracy report's expert-selection agreement.

In the ONNX Runtime lowering the routing stays in plain fp32 ONNX and reaches the ``MoE`` / ``QMoE`` op
as its ``router_probs`` input: log(weight) on the chosen experts and -1e9 elsewhere (``model.backbone.MoE``);
in the dense lowering (the TensorRT graphs) it ends in the combine weights that multiply the expert
outputs, zero outside the chosen experts.
A probe is an instrumented copy of a layer graph with that tensor as one more output, run by the same
backend in place of the layer's own session, so the layers see exactly the inputs the pipeline gives
them. The copy is written to a temporary folder inside the build folder (same file system) next to hard
links of the original's weight files (ONNX Runtime refuses external data reached through a symlink that
leaves the model's folder), and the folder is removed as soon as the session has loaded it.
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

from llada_edge.components import Component
from llada_edge.engines.half import routing_subgraph
from llada_edge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

MOE_OPS = ("MoE", "QMoE")
CHOSEN_ABOVE = -1e8  # router entries of chosen experts are log(weight) >= log(1e-30); the rest are -1e9


def router_tensor(model: onnx.ModelProto, component: Component) -> tuple[str, str] | None:
    """(tensor, encoding) that says which experts a layer graph chose, or None (no MoE in the graph).

    "log": the MoE/QMoE op's router input (ORT lowering), log(weight) on chosen experts, -1e9 elsewhere.
    "weights": the dense lowering's combine weights [N, E, 1], zero outside the chosen experts: the tensor
    where the routing subgraph (:func:`~llada_edge.engines.half.routing_subgraph`) meets the expert outputs.
    """
    for node in model.graph.node:
        if node.domain == "com.microsoft" and node.op_type in MOE_OPS:
            return node.input[1], "log"
    weights = {t.name for t in model.graph.initializer}
    routers = [node for node in model.graph.node if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1
               and node.input[1] in weights and component.weight_kind(node.input[1], False) == "router"]
    if not routers:
        return None
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {out: node for node in model.graph.node for out in node.output}
    inside = set(routing_subgraph(routers[0], consumers, producers))
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.name not in inside:
            for name in node.input:
                if name in producers and producers[name].name in inside and producers[name] is not routers[0]:
                    return name, "weights"
    return None


class _ProbeSession:
    """An InferenceSession whose IO-bound runs also fetch the router tensor into ``chosen``."""

    def __init__(self, session: Any, router: str, encoding: str, experts: int) -> None:
        self._session = session
        self._router = router
        self._encoding = encoding
        self._experts = experts
        self.chosen: list[np.ndarray] = []  # per run: [tokens, experts] bool

    def io_binding(self) -> Any:
        return self._session.io_binding()

    def run_with_iobinding(self, binding: Any) -> None:
        binding.bind_output(self._router, "cpu")
        self._session.run_with_iobinding(binding)
        router = binding.get_outputs()[-1].numpy().reshape(-1, self._experts)
        self.chosen.append(router > (CHOSEN_ABOVE if self._encoding == "log" else 0))


def _instrumented(path: Path, router: str, folder: Path, model: onnx.ModelProto) -> Path:
    """``model`` with ``router`` as an extra output, saved in ``folder`` next to links to its weight files."""
    for entry in os.listdir(path.parent):
        if entry != path.name and (path.parent / entry).is_file():
            try:
                os.link(path.parent / entry, folder / entry)
            except OSError:  # a file system without hard links
                shutil.copyfile(path.parent / entry, folder / entry)
    model.graph.output.append(helper.make_tensor_value_info(router, _elem_type(model, router), None))
    out = folder / path.name
    out.write_bytes(model.SerializeToString())
    return out


def _elem_type(model: onnx.ModelProto, name: str) -> int:
    """The element type of a graph tensor (fp16 behind a half graph's casts): a Cast's target, else inferred."""
    for node in model.graph.node:
        if name in node.output and node.op_type == "Cast":
            return int(next(a.i for a in node.attribute if a.name == "to"))
    inferred = onnx.shape_inference.infer_shapes(model)
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        if info.name == name:
            return int(info.type.tensor_type.elem_type)
    return int(TensorProto.FLOAT)


def install_probes(backend: OnnxRuntimeBackend) -> dict[str, _ProbeSession]:
    """Replace each MoE layer's session of ``backend`` by a probe; returns them by layer name."""
    import onnxruntime as ort

    probes = {}
    for layer in backend.registry.layers:
        path = backend.graph_path(layer.name)
        model = onnx.load(str(path), load_external_data=False)
        found = router_tensor(model, layer)
        if found is None:
            continue
        router, encoding = found
        with tempfile.TemporaryDirectory(prefix=".routing-probe-", dir=backend.build_dir) as folder:
            probe_path = _instrumented(path, router, Path(folder), model)
            session = ort.InferenceSession(str(probe_path), backend.session_options, providers=backend.providers)
        probes[layer.name] = _ProbeSession(session, router, encoding, backend.config.backbone.num_experts)
        backend.replace_session(layer.name, probes[layer.name])
    return probes


def selection_agreement(ref: np.ndarray, other: np.ndarray) -> float:
    """Mean over tokens of |chosen by both| / |chosen by the reference| (1.0: identical expert sets)."""
    both = (ref & other).sum(-1)
    return float(np.mean(both / np.maximum(ref.sum(-1), 1)))
