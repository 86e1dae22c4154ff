"""Position ids and RoPE tables of the Z-Image decoder, in numpy (shared by the reference, the export
and the torch-free runtime, which feeds them to exported graphs as inputs).

Upstream (model-spec §6.2): caption token i (pads included) -> (1+i, 0, 0); image token (h, w) ->
(Lc_pad+1, h, w); image pad rows -> (0, 0, 0); both sequences padded to multiples of 32. Per axis of
dim d: ``freq_j = theta^(-2j/d)`` in float64, angle = pos * freq cast to fp32, then cos/sin in fp32.
"""

from __future__ import annotations

import numpy as np

SEQ_MULTIPLE = 32


def pad_to_multiple(n: int, multiple: int = SEQ_MULTIPLE) -> int:
    return n + (-n) % multiple


def caption_pos_ids(cap_len_padded: int) -> np.ndarray:
    pos = np.zeros((cap_len_padded, 3), dtype=np.int64)
    pos[:, 0] = np.arange(1, cap_len_padded + 1)
    return pos


def image_pos_ids(ht: int, wt: int, cap_len_padded: int) -> np.ndarray:
    n = ht * wt
    pos = np.zeros((pad_to_multiple(n), 3), dtype=np.int64)
    pos[:n, 0] = cap_len_padded + 1
    pos[:n, 1] = np.repeat(np.arange(ht), wt)
    pos[:n, 2] = np.tile(np.arange(wt), ht)
    return pos


def rope_angles(pos_ids: np.ndarray, axes_dims: list[int], theta: float) -> np.ndarray:
    """pos_ids [L, 3] -> angles [L, sum(axes_dims)/2] in fp32 (float64 frequencies, as upstream)."""
    parts = []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        parts.append((pos_ids[:, axis].astype(np.float64)[:, None] * freqs).astype(np.float32))
    return np.concatenate(parts, axis=-1)


def dit_rope_tables(ht: int, wt: int, cap_len: int, axes_dims: list[int], theta: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(img_cos, img_sin, cap_cos, cap_sin), fp32 [padded length, head_dim/2], for an ht x wt patch grid."""
    cap_pad = pad_to_multiple(cap_len)
    img = rope_angles(image_pos_ids(ht, wt, cap_pad), axes_dims, theta)
    cap = rope_angles(caption_pos_ids(cap_pad), axes_dims, theta)
    return np.cos(img), np.sin(img), np.cos(cap), np.sin(cap)
