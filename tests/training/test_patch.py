"""The trained checkpoint as a patch on its synthetic base: byte-identical round trip, damage detected, and the
cache's order (cache, committed patch, training)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llada_edge.training import cache as cache_mod
from llada_edge.training.patch import (
    OVER_BASE,
    OVER_ZEROS,
    PATCH_NAME,
    TENSORS_NAME,
    WHOLE,
    PatchMismatch,
    apply_patch,
    make_patch,
)
from llada_edge.training.weights import rewrite_safetensors, rewrite_sharded, rewrite_torch_state


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def pretend_trained(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset changed the ways training changes it: a few embedding rows, a text head of zeros but for a
    few rows, a whole VAE tensor, a SigVQ tensor (torch.save file), and a new report file."""
    out = tmp_path_factory.mktemp("pretend") / "trained"
    shutil.copytree(tiny_ckpt, out)
    gen = torch.Generator().manual_seed(1)
    emb = load_file(str(out / "model-00001-of-00003.safetensors"))["model.word_embeddings.weight"]
    head = torch.zeros(emb.shape, dtype=emb.dtype)
    head[[3, 70, 71]] = torch.randn(3, emb.shape[1], generator=gen).to(emb.dtype)
    emb = emb.clone()
    emb[[5, 9]] = torch.randn(2, emb.shape[1], generator=gen).to(emb.dtype)
    emb[11, 0] = -0.0 if emb[11, 0] == 0 else emb[11, 0] * -1  # a one-element change (sign bit) is a change
    rewrite_sharded(out, {"model.word_embeddings.weight": emb, "lm_head.weight": head})
    vae_path = out / "vae" / "diffusion_pytorch_model.safetensors"
    vae = load_file(str(vae_path))
    key = sorted(vae)[0]
    vae[key] = torch.randn(vae[key].shape, generator=gen).to(vae[key].dtype)
    rewrite_safetensors(vae_path, {key: vae[key]})
    sigvq_path = out / "image_tokenizer" / "sigvq_embedding.pt"
    state = torch.load(sigvq_path, weights_only=True)
    first = sorted(state)[0]
    rewrite_torch_state(sigvq_path, {first: state[first] + 1})
    (out / "training_report.json").write_text(json.dumps({"seed": 0, "note": "pretend"}) + "\n")
    return out


@pytest.fixture(scope="module")
def patch(pretend_trained: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    dest = tmp_path_factory.mktemp("artifacts") / "patch"
    record = make_patch(pretend_trained, dest, preset="tiny", seed=0, fingerprint="pretend")
    return dest, record


def test_patch_stores_only_what_changed_and_rebuilds_the_same_bytes(pretend_trained, patch, tmp_path) -> None:
    dest, record = patch
    shard = "model-00001-of-00003.safetensors"
    assert record["tensors"][shard] == {"model.word_embeddings.weight": OVER_BASE}
    assert record["tensors"]["model-00003-of-00003.safetensors"] == {"lm_head.weight": OVER_ZEROS}
    assert set(record["tensors"]["vae/diffusion_pytorch_model.safetensors"].values()) == {WHOLE}
    assert list(record["tensors"]["image_tokenizer/sigvq_embedding.pt"]) == [sorted(torch.load(
        pretend_trained / "image_tokenizer" / "sigvq_embedding.pt", weights_only=True))[0]]
    assert record["whole_files"] == ["training_report.json"]
    stored = load_file(str(dest / TENSORS_NAME))
    assert stored[f"{shard}::model.word_embeddings.weight::rows"].tolist() == [5, 9, 11]
    assert _size(dest) < 0.2 * _size(pretend_trained)

    out = tmp_path / "rebuilt"
    apply_patch(dest, out)
    assert _hashes(out) == _hashes(pretend_trained)


def test_a_damaged_patch_names_the_file_that_came_out_different(patch, tmp_path) -> None:
    dest, _ = patch
    damaged = tmp_path / "damaged"
    shutil.copytree(dest, damaged)
    stored = load_file(str(damaged / TENSORS_NAME))
    name = "model-00003-of-00003.safetensors::lm_head.weight::values"
    stored[name] = stored[name] * 2
    save_file(stored, str(damaged / TENSORS_NAME))
    with pytest.raises(PatchMismatch, match=re.escape("model-00003-of-00003.safetensors came out different")):
        apply_patch(damaged, tmp_path / "out")

    record = json.loads((damaged / PATCH_NAME).read_text())
    record["version"] = 99
    (damaged / PATCH_NAME).write_text(json.dumps(record))
    with pytest.raises(PatchMismatch, match="patch version 99"):
        apply_patch(damaged, tmp_path / "out2")


def test_cache_takes_the_committed_patch_and_trains_when_it_does_not_reproduce(patch, pretend_trained, tmp_path,
                                                                               monkeypatch) -> None:
    dest, _ = patch
    shipped = tmp_path / "artifacts"
    shutil.copytree(dest, shipped / cache_mod.entry_name(0))

    def no_training(*_args, **_kwargs):
        raise AssertionError("trained although the committed patch reproduces the checkpoint")

    monkeypatch.setattr(cache_mod, "train_tiny", no_training)
    messages: list[str] = []
    entry = cache_mod.cached_checkpoint(0, cache=tmp_path / "cache", shipped=shipped, progress=messages.append)
    assert entry.name == cache_mod.entry_name(0)
    assert _hashes(entry) == _hashes(pretend_trained)
    assert "from the committed patch" in messages[-1]

    # Damaged: reported, then trained (here a stand-in that writes a marker).
    stored = load_file(str(shipped / entry.name / TENSORS_NAME))
    key = next(k for k in stored if k.endswith("::values"))
    stored[key] = stored[key] + 1
    save_file(stored, str(shipped / entry.name / TENSORS_NAME))

    def stand_in(out: Path, *_args, **_kwargs) -> dict:
        (out / "trained.txt").write_text("stand-in")
        return {"total_seconds": 0.0}

    monkeypatch.setattr(cache_mod, "train_tiny", stand_in)
    messages.clear()
    with pytest.warns(UserWarning, match="does not reproduce"):
        entry2 = cache_mod.cached_checkpoint(0, cache=tmp_path / "cache2", shipped=shipped, progress=messages.append)
    assert (entry2 / "trained.txt").is_file()
    assert any("does not reproduce" in m and "came out different" in m for m in messages)

    # A repository whose artifacts/ has no patch of this fingerprint (the code changed): warned, then trained.
    shutil.rmtree(shipped / entry.name)
    with pytest.warns(UserWarning, match=f"holds no patch for {entry.name}"):
        entry3 = cache_mod.cached_checkpoint(0, cache=tmp_path / "cache3", shipped=shipped, progress=messages.append)
    assert (entry3 / "trained.txt").is_file()


def test_patches_of_other_fingerprints_are_stale(tmp_path) -> None:
    (tmp_path / cache_mod.entry_name(0)).mkdir()
    (tmp_path / "tiny-trained-0123456789abcdef").mkdir()
    assert [p.name for p in cache_mod.stale_patches(0, tmp_path)] == ["tiny-trained-0123456789abcdef"]
    assert cache_mod.shipped_patch(0, tmp_path) is None  # a folder without patch.json is not a patch


def test_compare_trainings_lists_byte_identical_files_and_scaled_report_changes(tmp_path) -> None:
    from llada_edge.training.patch import compare_trainings

    a, b = tmp_path / "a", tmp_path / "b"
    for folder, weights, ppl, acc in ((a, b"same", 15.0, 0.25), (b, b"same", 15.3, 0.26)):
        (folder / "vae").mkdir(parents=True)
        (folder / "vae" / "w.safetensors").write_bytes(weights)
        (folder / "model-1.safetensors").write_bytes(folder.name.encode())
        (folder / "report.json").write_text(json.dumps({"after": {"perplexity": ppl, "accuracy": acc},
                                                        "seconds": {"backbone": 300 + ppl}, "vae_s": ppl,
                                                        "steps": 2000}))
    result = compare_trainings(a, b, "report.json")
    assert result["identical"] == ["vae/w.safetensors"]
    assert result["differ"] == ["model-1.safetensors"]
    changes = result["report_changes"]
    assert set(changes) == {"after.perplexity", "after.accuracy", "steps"}  # seconds measure the machine
    assert changes["after.perplexity"] == pytest.approx(0.3 / 15.0)  # relative where |figure| > 1
    assert changes["after.accuracy"] == pytest.approx(0.01)  # absolute below 1
    assert changes["steps"] == 0.0
