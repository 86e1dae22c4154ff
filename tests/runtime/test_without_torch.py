"""The runtime core imports and runs without torch (design.md §2): torch is made unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent('''
    import sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")

    sys.meta_path.insert(0, NoTorch())
    import numpy as np
    from llada_edge.config import ModelConfig
    from llada_edge.runtime import Pipeline, SamplingConfig, SprintConfig  # noqa: F401
    from llada_edge.runtime.text import TextTokenizer

    root = sys.argv[1]
    config = ModelConfig.from_folder(root)

    class NumpyBackend:
        """A stand-in engine: deterministic pseudo-random outputs with the protocol's shapes."""
        name = "numpy"
        fused_head_kinds = ()
        fused_step_kinds = ()
        provides_key_importance = True

        def __init__(self):
            self.config, self._len, self._passes = config, 0, 0
        def start(self, rows, capacity, block_size=32): self._len = 0
        def prefill(self, ids, positions, valid): self._len += ids.shape[1]; self._passes += 1
        def forward_block(self, ids, positions, valid, key_importance=False):
            self._passes += 1
            imp = np.ones((ids.shape[0], self._len)) if key_importance else None
            return (np.sin(ids[..., None] * np.arange(1, 9)) + positions[..., None]).astype(np.float32), imp
        def commit(self, ids, positions, valid): self._len += ids.shape[1]; self._passes += 1
        def set_cache_mask(self, keep): pass
        cache_len = property(lambda self: self._len)
        forward_passes = property(lambda self: self._passes)
        def head_text(self, h): return np.cos(h.sum(-1, keepdims=True) * np.arange(1000)).astype(np.float32)
        def head_image(self, h): return np.cos(h.sum(-1, keepdims=True) * np.arange(16384)).astype(np.float32)
        def require(self, components, task): pass  # every graph is computed above
        def tokenize_image(self, pixels):
            return np.arange(pixels.shape[2] // 16 * (pixels.shape[3] // 16)) % 16384
        def sigvq(self, ids): return np.ones((ids.shape[0], 64), np.float32)
        def dit(self, mode, latent, t, cap): return -latent
        def vae_decode(self, latent):
            return np.full((1, 3, latent.shape[2] * 8, latent.shape[3] * 8), 0.5, np.float32)

    pipe = Pipeline(NumpyBackend(), TextTokenizer.from_file(f"{root}/tokenizer.json"))
    image = pipe.generate_image("a boat", 64, 64, steps=4)
    assert image.image.size == (64, 64) and len(image.vq_tokens) == 4
    answer = pipe.understand(image.image, "what?", max_new_tokens=16, steps=8)
    assert answer.forward_passes > 0
    assert "torch" not in sys.modules
    print("ok", len(answer.tokens))
''')


def test_runtime_imports_and_runs_without_torch(tiny_ckpt: Path) -> None:
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_ckpt)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok")
