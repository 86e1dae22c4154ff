"""The registry: every component of a model, in build order, found by name, kind or group."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from llada_edge.buildfolder import Manifest
from llada_edge.components.backbone import HEAD_KINDS, Embed, Head, Layer, SampleHead
from llada_edge.components.base import Component
from llada_edge.components.image import DIT_MODES, DiT, SigVQ, VaeDecoder, VisionTokenizer
from llada_edge.config import ModelConfig
from llada_edge.errors import InputError


class Registry:
    """The components of one model config. Image side first (small), then the backbone."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.vision_tokenizer = VisionTokenizer(config)
        self.sigvq = SigVQ(config)
        self.dits = {mode: DiT(config, mode) for mode in DIT_MODES}
        self.vae_decoder = VaeDecoder(config)
        self.embed = Embed(config)
        self.layers = [Layer(config, i) for i in range(config.backbone.num_hidden_layers)]
        self.heads = {kind: Head(config, kind) for kind in HEAD_KINDS}
        self.sample_heads = {kind: SampleHead(config, kind) for kind in HEAD_KINDS}
        order: list[Component] = [self.vision_tokenizer, self.sigvq, *self.dits.values(), self.vae_decoder,
                                  self.embed, *self.layers, *self.heads.values(), *self.sample_heads.values()]
        self._by_name = {c.name: c for c in order}

    @classmethod
    def of_build(cls, build_dir: str | Path) -> Registry:
        """The registry of a build folder's model (its ``model/`` configs)."""
        return cls(ModelConfig.from_folder(Path(build_dir) / "model"))

    def exported(self, manifest: Manifest) -> list[Component]:
        """The components a build holds an fp32 graph of, in build order (names come from here, not the file)."""
        return [c for c in self if (e := manifest.components.get(c.name)) is not None and e.kind == "onnx"]

    def __iter__(self) -> Iterator[Component]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def __getitem__(self, name: str) -> Component:
        if name not in self._by_name:
            raise InputError(f"unknown component {name!r} (components: {', '.join(self._by_name)}; groups: "
                             f"{', '.join(self.groups)})")
        return self._by_name[name]

    @property
    def backbone(self) -> list[Component]:
        """What every build must hold to run a request: the embedding, the layers and the two heads."""
        return [self.embed, *self.layers, *self.heads.values()]

    @property
    def groups(self) -> dict[str, list[str]]:
        heads = [c.name for c in (*self.heads.values(), *self.sample_heads.values())]
        layers = [c.name for c in self.layers]
        dit = [c.name for c in self.dits.values()]
        return {"layers": layers, "heads": heads, "dit": dit, "backbone": [self.embed.name, *layers, *heads],
                "image": [self.vision_tokenizer.name, self.sigvq.name, *dit, self.vae_decoder.name]}

    def select(self, requested: list[str] | None) -> list[Component]:
        """Components by name or group (``layers``, ``heads``, ``dit``, ``backbone``, ``image``), in build order."""
        if not requested:
            return list(self)
        groups = self.groups
        chosen = {name for item in requested for name in groups.get(item, [item])}
        for name in chosen:
            self[name]  # an unknown name is an InputError listing the components and groups
        return [c for c in self if c.name in chosen]
