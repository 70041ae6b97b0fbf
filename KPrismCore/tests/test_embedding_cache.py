"""The on-disk embedding cache of the frozen `medsam` encoder: key, reuse, resume, rebuild, and its slices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from kprism.data.slices import build_slice_bank
from kprism.model.tiny_vit import TinyViT, TinyViTConfig
from kprism.embedding_cache import CACHE_ENV, EmbeddingCache, content_key, default_cache_root
from kprism.train.encoder_slices import encoder_training_slices
from kprism.user_cache import CACHE_ENV as USER_CACHE_ENV

from .synthetic import make_shapes_dataset

SMALL = TinyViTConfig(
    image_size=32, widths=(8, 16, 20, 40), depths=(1, 1, 1, 1), heads=(1, 2, 2, 4), windows=(3, 3, 4, 3),
    merge_strides=(2, 2, 1), embed_dim=16,
)


@pytest.fixture
def encoder() -> TinyViT:
    torch.manual_seed(0)
    return TinyViT(SMALL).eval()


def images(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 32, 32, generator=generator) for _ in range(count)]


# ----------------------------------------------------------------------------------------------- key


def test_key_depends_on_content_shape_encoder_and_recipe_only():
    x = torch.rand(3, 32, 32)
    key = content_key(x, "enc")
    assert key == content_key(x.clone(), "enc") == content_key(x.double(), "enc")  # same values, other tensor
    changed = x.clone()
    changed[1, 5, 7] += 1e-6
    assert content_key(changed, "enc") != key
    assert content_key(x.reshape(3, 16, 64), "enc") != key  # same bytes, other shape
    assert content_key(x, "other encoder") != key
    assert content_key(x, "enc", recipe="bf16") != key
    assert len(key) == 64 and int(key, 16) >= 0


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "embeddings"))
    assert default_cache_root() == tmp_path / "embeddings"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv(USER_CACHE_ENV, str(tmp_path / "kprism"))
    assert default_cache_root() == tmp_path / "kprism" / "embeddings"


# ----------------------------------------------------------------------------------------------- reuse, resume, rebuild


def test_a_slice_is_encoded_once_and_read_back_by_another_process(encoder, tmp_path):
    x = images(1)[0]
    first = EmbeddingCache(encoder, "enc-a", root=tmp_path)
    entry = first.get(x, {"dataset": "d", "slice": 3})
    with torch.no_grad():
        expected = encoder(x[None]).embedding[0]
    assert first.encoded == 1 and entry.embedding.dtype == torch.float16
    assert torch.allclose(entry.embedding.float(), expected, atol=2e-3, rtol=1e-3)  # float16 storage
    second = EmbeddingCache(encoder, "enc-a", root=tmp_path)  # a fresh object: only the disk is shared
    again = second.get(x)
    assert second.encoded == 0
    assert torch.equal(again.embedding, entry.embedding)
    assert again.info == {"dataset": "d", "slice": "3"}


def test_an_interrupted_fill_resumes_with_only_the_missing_slices(encoder, tmp_path):
    batch = images(5)
    EmbeddingCache(encoder, "enc-a", root=tmp_path).get_many(batch[:2])  # "interrupted" after two
    resumed = EmbeddingCache(encoder, "enc-a", root=tmp_path, batch_size=2)
    entries = resumed.get_many(batch + [batch[4].clone()])  # a repeated slice is encoded once
    assert resumed.encoded == 3
    assert entries[4].key == entries[5].key
    with torch.no_grad():
        expected = encoder(torch.stack(batch)).embedding
    for entry, want in zip(entries, expected):
        assert torch.allclose(entry.embedding.float(), want, atol=2e-3, rtol=1e-3)


def test_missing_damaged_or_foreign_entries_are_rebuilt(encoder, tmp_path):
    a, b, c = images(3)
    cache = EmbeddingCache(encoder, "enc-a", root=tmp_path)
    entries = cache.get_many([a, b, c])
    good = entries[0].embedding.clone()
    cache.path(entries[0].key).unlink()  # missing
    cache.path(entries[1].key).write_bytes(b"\x00" * 100)  # truncated
    other = EmbeddingCache(encoder, "enc-b", root=tmp_path)  # another encoder's entry under this key's name
    other_entry = other.get(c)
    cache.path(entries[2].key).write_bytes(other.path(other_entry.key).read_bytes())
    fresh = EmbeddingCache(encoder, "enc-a", root=tmp_path)
    rebuilt = fresh.get_many([a, b, c])
    assert fresh.encoded == 3
    assert torch.equal(rebuilt[0].embedding, good)
    assert EmbeddingCache(encoder, "enc-a", root=tmp_path).load(entries[1].key) is not None  # replaced by a valid entry


def test_the_whole_cache_folder_can_be_deleted(encoder, tmp_path):
    import shutil

    x = images(1)[0]
    cache = EmbeddingCache(encoder, "enc-a", root=tmp_path / "cache")
    cache.get(x)
    shutil.rmtree(tmp_path / "cache")
    assert not cache.has(x)
    cache.get(x)
    assert cache.encoded == 2 and cache.has(x)


def test_requested_stage_outputs_are_stored_and_an_entry_without_them_is_completed(encoder, tmp_path):
    x = images(1)[0]
    EmbeddingCache(encoder, "enc-a", root=tmp_path).get(x)
    with_stage = EmbeddingCache(encoder, "enc-a", root=tmp_path, stages=[1])
    entry = with_stage.get(x)
    assert with_stage.encoded == 1 and entry.stages[1].shape == (16, 16, 16)
    assert EmbeddingCache(encoder, "enc-a", root=tmp_path).load(entry.key) is not None  # still serves embedding-only readers
    with pytest.raises(ValueError, match=r"Stages \[7\] do not exist"):
        EmbeddingCache(encoder, "enc-a", root=tmp_path, stages=[7])


# ----------------------------------------------------------------------------------------------- which slices


def make_ct_dataset(root: Path) -> Path:
    """One 8-slice CT volume whose label covers slices 3 and 4."""
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    hu = np.full((8, 20, 24), -1000, np.int16)
    hu[:, 4:16, 4:20] = 40
    labels = np.zeros(hu.shape, np.uint8)
    labels[3:5, 6:12, 6:12] = 1
    for array, path in ((hu, root / "imagesTr" / "ct1_0000.nii.gz"), (labels, root / "labelsTr" / "ct1.nii.gz")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.8, 0.8, 2.5))
        sitk.WriteImage(image, str(path))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "numTraining": 1,
        "file_ending": ".nii.gz", "modality": "CT"}))
    return root


def test_encoder_slices_are_the_training_slices_with_each_ct_window(tmp_path):
    roots = [make_shapes_dataset(tmp_path / "Dataset901_Shapes", cases=3, size=40), make_ct_dataset(tmp_path / "Dataset902_CT")]
    slices = list(encoder_training_slices(roots, ct_windows=("soft_tissue", "lung"), size=32))
    bank = build_slice_bank(roots, 32)  # the tiny model's training slices, same default generator
    expected = [(r.dataset, r.case_id, r.slice_index) for r in bank.records]
    got = [(s.dataset, s.case_id, s.slice_index) for s in slices if s.window in ("", "soft_tissue")]
    assert got == expected
    ct = [s for s in slices if s.dataset == "Dataset902_CT"]
    assert [(s.slice_index, s.window) for s in ct][:2] == [(ct[0].slice_index, "soft_tissue"), (ct[0].slice_index, "lung")]
    assert {3, 4} <= {s.slice_index for s in ct} and len(ct) == 2 * 4  # 2 labelled + 2 empty slices, 2 windows
    # 20×24 letterboxed to 32: 27 rows × 32 columns, padding below.
    assert ct[0].letterbox == (27, 32) and torch.all(ct[0].image[:, 27:] == 0)
    soft, lung = ct[0].image, ct[1].image
    assert not torch.equal(soft, lung)


def test_stretched_layout_gives_one_soft_tissue_input_per_ct_slice_filling_the_grid(tmp_path):
    roots = [make_ct_dataset(tmp_path / "Dataset902_CT")]
    letterboxed = list(encoder_training_slices(roots, ct_windows=("soft_tissue",), size=32))
    stretched = list(encoder_training_slices(roots, size=32, layout="stretched"))
    assert [s.slice_index for s in stretched] == [s.slice_index for s in letterboxed]
    x = stretched[0].image
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert float(x[-1].max()) > 0  # no padding: the 20×24 slice is stretched over the whole grid
    # Soft-tissue window, min–max scaled: air 0, tissue 1, and the tissue block keeps its share of the slice (12×16 of 20×24).
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert abs(float(x[0].mean()) - 0.4) < 0.05
    assert not torch.equal(x, letterboxed[0].image)
    with pytest.raises(ValueError, match="Unknown encoder input layout"):
        next(encoder_training_slices(roots, layout="crop"))


def test_a_bfloat16_recipe_is_its_own_entry_close_to_float32_and_an_unknown_recipe_is_refused(encoder, tmp_path):
    image = images(1)[0]
    exact = EmbeddingCache(encoder, "enc", root=tmp_path).get(image)
    fast_cache = EmbeddingCache(encoder, "enc", root=tmp_path, recipe="bf16")
    fast = fast_cache.get(image)
    assert fast.key != exact.key and fast_cache.encoded == 1  # never a float32 entry read back as bfloat16
    a, b = exact.embedding.float().flatten(), fast.embedding.float().flatten()
    assert torch.cosine_similarity(a, b, dim=0) > 0.99 and not torch.equal(a, b)
    with pytest.raises(ValueError, match="Unknown encoder recipe 'int8'"):
        EmbeddingCache(encoder, "enc", root=tmp_path, recipe="int8")
