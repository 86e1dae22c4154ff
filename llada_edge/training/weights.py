"""Write trained tensors back into a checkpoint folder, keeping its exact upstream layout.

Every file keeps its keys, shapes, dtypes, sharding and metadata: only the values change. Each file
is replaced atomically (temp name + rename), so an interrupted write leaves the old weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llada_edge.buildfolder import atomic_write_bytes
from llada_edge.errors import CheckpointError


def rewrite_safetensors(path: Path, updates: dict[str, torch.Tensor]) -> None:
    """Replace some tensors of one ``.safetensors`` file; each keeps its stored shape and dtype."""
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    unknown = sorted(set(updates) - set(tensors))
    if unknown:
        raise CheckpointError(f"{path}: no tensor named {unknown[0]!r} to replace")
    for key, value in updates.items():
        old = tensors[key]
        if tuple(value.shape) != tuple(old.shape):
            raise CheckpointError(f"{path}: {key} has shape {list(old.shape)}, the update {list(value.shape)}")
        tensors[key] = value.detach().to(old.dtype).contiguous()
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def rewrite_sharded(folder: Path, updates: dict[str, torch.Tensor],
                    index_name: str = "model.safetensors.index.json") -> None:
    """Replace tensors of a sharded checkpoint, one shard file at a time (found through the index)."""
    weight_map: dict[str, str] = json.loads((folder / index_name).read_text())["weight_map"]
    by_file: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in updates.items():
        if key not in weight_map:
            raise CheckpointError(f"{folder / index_name}: no tensor named {key!r} to replace")
        by_file.setdefault(weight_map[key], {})[key] = value
    for name, part in sorted(by_file.items()):
        rewrite_safetensors(folder / name, part)


def rewrite_torch_state(path: Path, updates: dict[str, torch.Tensor]) -> None:
    """Replace tensors of a ``torch.save``-d state dict (``sigvq_embedding.pt``), keeping dtypes."""
    import io

    state = torch.load(path, map_location="cpu", weights_only=True)
    for key, value in updates.items():
        if key not in state:
            raise CheckpointError(f"{path}: no tensor named {key!r} to replace")
        if tuple(value.shape) != tuple(state[key].shape):
            raise CheckpointError(f"{path}: {key} has shape {list(state[key].shape)}, the update {list(value.shape)}")
        state[key] = value.detach().to(state[key].dtype).contiguous()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())
