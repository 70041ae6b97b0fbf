"""The `medsam` preset on a small random TinyViT: input conversion, frozen encoder, strict files,
training from cached embeddings, and the tasks where what is asked decides the answer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kprism.catalog import ClassCatalog
from kprism.data.slices import SliceBank, SliceRecord
from kprism.encoder_weights import save_encoder
from kprism.medsam_preprocess import encoder_input
from kprism.model import Prompts, build_model, preset
from kprism.model.foundation_input import foundation_input, looks_like_ct
from kprism.model.tiny_vit import TinyViTConfig
from kprism.preprocess import normalize_slice, resize_image
from kprism.train.embedded_bank import build_embedded_bank, cached_key
from kprism.embedding_cache import EmbeddingCache
from kprism.train.tasks import TaskConfig, TaskSampler
from kprism.train.trainer import TrainConfig, Trainer
from kprism.weights import WeightsError, load_model, save_checkpoint

from .synthetic import make_shapes_dataset
from .test_tiny_vit import random_tiny_vit

# 64² input: grids 64, 32, 16, 16 — the embedding sits at stride 4, as LiteMedSAM's does at 256².
VIT = TinyViTConfig(image_size=64, widths=(8, 16, 20, 40), depths=(1, 1, 1, 1), heads=(1, 2, 2, 4), windows=(3, 4, 4, 4),
                    merge_strides=(2, 2, 1), embed_dim=16)


def small_medsam(num_classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(preset("medsam", image_size=64, foundation=VIT.to_json(), num_classes=num_classes))
    model.encoder.vit.load_state_dict(random_tiny_vit(VIT, seed).state_dict())
    return model.eval()


def ct_slice(size: int = 64, seed: int = 0) -> np.ndarray:
    """Air around a body with soft tissue, two lungs and a bone, plus noise (Hounsfield units)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    hu = np.full((size, size), -1000.0)
    hu[(yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.16] = 40.0
    hu[(yy - 0.45) ** 2 / 0.04 + (xx - 0.3) ** 2 / 0.01 < 1] = -850.0
    hu[(yy - 0.45) ** 2 / 0.04 + (xx - 0.7) ** 2 / 0.01 < 1] = -850.0
    hu[(yy - 0.75) ** 2 + (xx - 0.5) ** 2 < 0.005] = 700.0
    return hu + rng.normal(0, 30, hu.shape)


# ------------------------------------------------------------------------------------- encoder input


def test_ct_slice_reaches_the_encoder_in_the_soft_tissue_window_as_litemedsam_prepares_it():
    hu = ct_slice()
    ours = foundation_input(resize_image(normalize_slice(hu, "ct"), 64)[None])[0]
    theirs, _ = encoder_input(hu, "ct", window="soft_tissue", size=64)
    assert torch.allclose(ours, theirs, atol=1e-5)
    lung_window, _ = encoder_input(hu, "ct", window="lung", size=64)
    assert (ours - lung_window).abs().max() > 0.3  # the window really was chosen


def test_grey_and_rgb_slices_pass_unchanged_and_are_not_taken_for_ct():
    rng = np.random.default_rng(1)
    mr = rng.gamma(2.0, 100.0, (64, 64))
    photo = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    grey = resize_image(normalize_slice(mr, "mri"), 64)[None]
    rgb = resize_image(normalize_slice(photo, "rgb", is_rgb=True), 64)[None]
    ct = resize_image(normalize_slice(ct_slice(), "ct"), 64)[None]
    assert looks_like_ct(torch.cat([grey, rgb, ct]) * 0.25 + 0.5).tolist() == [False, False, True]
    assert torch.allclose(foundation_input(grey)[0], encoder_input(mr, "mri", size=64)[0], atol=1e-5)
    assert torch.allclose(foundation_input(rgb)[0], encoder_input(photo, "rgb", is_rgb=True, size=64)[0], atol=1e-5)


# ------------------------------------------------------------------------------------- the model


def test_features_from_a_cached_embedding_equal_running_the_encoder_and_the_vit_stays_frozen():
    model = small_medsam()
    images = resize_image(normalize_slice(ct_slice(), "ct"), 64)[None]
    direct = model.encode(images)
    cached = model.encoder.from_embedding(images, model.encoder.embed(images).half().float())
    assert torch.allclose(direct.embedding, cached.embedding, atol=2e-2)  # the cache stores float16
    assert [tuple(s.shape[-2:]) for s in direct.skips] == [(32, 32), (16, 16), (8, 8)] and direct.embedding.shape[-1] == 4
    blind = model.encoder.from_embedding(images, torch.zeros_like(model.encoder.embed(images)))
    assert (blind.embedding - direct.embedding).abs().mean() > 1e-2 and (blind.skips[1] - direct.skips[1]).abs().mean() > 1e-2

    model.train().encoder.requires_grad_(True)  # what a trainer unfreezing the encoder does
    assert not model.encoder.vit.training and not any(p.requires_grad for p in model.encoder.vit.parameters())
    model.requires_grad_(True)  # even then no gradient reaches the released weights
    before = {k: v.clone() for k, v in model.encoder.vit.state_dict().items()}
    prediction = model(images, Prompts(points=torch.tensor([[[20.0, 30.0]]]), point_labels=torch.tensor([[1]])))
    prediction.logits.mean().backward()
    assert all(p.grad is None for p in model.encoder.vit.parameters())
    assert model.encoder.stem[0][0].weight.grad is not None
    assert all(torch.equal(before[k], v) for k, v in model.encoder.vit.state_dict().items())  # batch norms did not move


@pytest.mark.filterwarnings("ignore::kprism.weights.MissingTensorHashWarning")  # the broken copy carries none on purpose
def test_one_file_holds_the_whole_model_and_loads_strictly(tmp_path):
    model = small_medsam()
    path = tmp_path / "medsam.safetensors"
    save_checkpoint(model, path, model.config, ClassCatalog.from_names(["a", "b", "c"]))
    loaded, catalog, _ = load_model(path, embedding_cache=False)  # bit-equal: no float16 embeddings from disk
    assert any(k.startswith("encoder.vit.") for k in loaded.state_dict())
    images = resize_image(normalize_slice(ct_slice(), "ct"), 64)[None]
    prompts = Prompts(class_ids=torch.tensor([1]))
    with torch.no_grad():
        assert torch.equal(model(images, prompts).logits, loaded(images, prompts).logits)

    from safetensors.torch import load_file, save_file
    tensors = load_file(path)
    tensors.pop("encoder.vit.neck.0.weight")
    save_file(tensors, tmp_path / "broken.safetensors", metadata={**json.loads(json.dumps(_metadata(path)))})
    with pytest.raises(WeightsError, match="encoder.vit.neck.0.weight"):
        load_model(tmp_path / "broken.safetensors")


def test_a_loaded_model_reads_a_slice_seen_before_from_disk_under_the_training_fills_key(tmp_path, monkeypatch):
    monkeypatch.setenv("KPRISM_EMBEDDING_CACHE", str(tmp_path / "cache"))
    model = small_medsam()
    with torch.no_grad():  # weights as the float16 encoder file holds them
        for tensor in model.encoder.vit.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    save_encoder({k: v.half() if v.is_floating_point() else v for k, v in model.encoder.vit.state_dict().items()},
                 tmp_path / "vit.safetensors", VIT, {"source": "test"})
    path = tmp_path / "medsam.safetensors"
    save_checkpoint(model, path, model.config, ClassCatalog.from_names(["a", "b", "c"]))
    images = resize_image(normalize_slice(ct_slice(), "ct"), 64)[None]
    prompts = Prompts(class_ids=torch.tensor([1]))

    from safetensors.torch import load_file
    stored = load_file(path)  # the float16-exact encoder is stored as float16 (half the file), losslessly
    assert stored["encoder.vit.neck.0.weight"].dtype == torch.float16
    first, _, _ = load_model(path)
    assert torch.equal(first.encoder.vit.neck[0].weight, model.encoder.vit.neck[0].weight)
    with torch.no_grad():
        expected, got_first = model(images, prompts).logits, first(images, prompts).logits
    assert first.encoder.disk_cache.encoded == 1
    fill = EmbeddingCache.from_encoder_file(tmp_path / "vit.safetensors")  # what the training fill would use
    assert fill.folder == first.encoder.disk_cache.folder and fill.has(foundation_input(images)[0])

    reopened, _, _ = load_model(path)  # a new session on the same case: read, not encoded
    with torch.no_grad():
        got_again = reopened(images, prompts).logits
    assert reopened.encoder.disk_cache.encoded == 0
    assert torch.equal(got_again, got_first)
    assert (got_first - expected).abs().max() < 0.05 * expected.abs().max()  # float16 embedding, same answer

    monkeypatch.setenv("KPRISM_EMBEDDING_CACHE", "off")
    assert load_model(path)[0].encoder.disk_cache is None

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("KPRISM_EMBEDDING_CACHE", str(blocked))
    unwritable, _, _ = load_model(path)
    with pytest.warns(RuntimeWarning, match="cannot be written"), torch.no_grad():
        logits = unwritable(images, prompts).logits  # the segmentation still runs, without the disk cache
    assert unwritable.encoder.disk_cache is None
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()


def _metadata(path) -> dict[str, str]:
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
    meta.pop("tensors_sha256")  # the file is changed on purpose: let the key check speak
    return meta


# ------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "Dataset900_Shapes")


@pytest.fixture()
def encoder_file(tmp_path):
    path = tmp_path / "vit.safetensors"
    save_encoder(random_tiny_vit(VIT).state_dict(), path, VIT, {"source": "random test weights"})
    return path


def test_bank_keeps_only_cached_slices_and_leaves_held_out_cases_out(shapes, encoder_file, tmp_path):
    cache = EmbeddingCache.from_encoder_file(encoder_file, root=tmp_path / "cache")
    with pytest.raises(ValueError, match="cached embedding"):
        build_embedded_bank([shapes], cache, 64)
    full = build_embedded_bank([shapes], cache, 64, encode_missing=True, held_out_cases=["case00"])
    assert len(full.records) == 11 and "case00" not in {r.case_id for r in full.records} and cache.encoded == 11
    again = build_embedded_bank([shapes], EmbeddingCache.from_encoder_file(encoder_file, root=tmp_path / "cache"), 64)
    assert again.keys == full.keys  # found in the cache, nothing encoded again
    assert again.embeddings([0, 1]).shape == (2, 16, 16, 16)


def test_square_slices_use_the_fills_letterboxed_entries_and_other_slices_their_stretched_input(encoder_file, tmp_path):
    cache = EmbeddingCache.from_encoder_file(encoder_file, root=tmp_path / "cache")
    rng = np.random.default_rng(2)
    for shape, reusable in (((64, 64), True), ((40, 64), False)):
        mr = rng.gamma(2.0, 100.0, shape)
        standard = resize_image(normalize_slice(mr, "mri"), 64)
        letterboxed, _ = encoder_input(mr, "mri", size=64)
        filled = cache.get(letterboxed)  # what scripts/fill_embedding_cache.py stores
        key = cached_key(cache, standard, letterboxed, square=shape[0] == shape[1])
        assert (key == filled.key) is reusable and (key is None) is not reusable
        if not reusable:  # the stretched picture the model sees at inference has an embedding of its own
            own = cache.get(foundation_input(standard[None])[0])
            assert cached_key(cache, standard, letterboxed, square=False) == own.key
            assert own.key != filled.key and cache.encoded == 3  # two fills, one stretched input


def test_training_from_cached_embeddings_lowers_the_loss_and_exports_one_strict_file(shapes, encoder_file, tmp_path):
    cfg = TrainConfig(datasets=[str(shapes)], output=str(tmp_path / "medsam.safetensors"), run_dir=str(tmp_path / "run"),
                      preset="medsam", model_overrides={"image_size": 64, "foundation": VIT.to_json(), "class_head": False},
                      foundation_encoder=str(encoder_file), embedding_cache=str(tmp_path / "cache"), encode_missing=True,
                      steps=40, batch_size=4, warmup_steps=5, threads=1, lr=2e-3, val_every=0, checkpoint_every=100,
                      task=TaskConfig(semantic=1.0, in_context=0.0, interactive=0.0, knowledge_then_clicks=0.0))
    trainer = Trainer(cfg, show_progress=False)
    vit_before = {k: v.clone() for k, v in trainer.model.encoder.vit.state_dict().items()}
    losses = [trainer.train_step(trainer.sampler.sample(cfg.batch_size))["mask"] for _ in range(cfg.steps)]
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8]), losses
    assert all(torch.equal(vit_before[k], v) for k, v in trainer.model.encoder.vit.state_dict().items())
    trainer.config.steps = trainer.step  # export now
    model, catalog, _ = load_model(trainer.fit())
    assert catalog.names == ["disk", "square"]
    for name, tensor in random_tiny_vit(VIT).state_dict().items():  # the released encoder travels in the file
        assert torch.equal(model.encoder.vit.state_dict()[name], tensor.float()), name


# ------------------------------------------------------------------------------------- tasks where "what" decides


def two_part_bank() -> SliceBank:
    """Four 32² slices of one dataset: 'lung' in two parts (left and right) and a 'heart'; and one of another."""
    bank = SliceBank(32)
    for n in range(4):
        labels = torch.zeros(32, 32, dtype=torch.uint8)
        labels[8:24, 3 + n:10 + n] = 1
        labels[8:24, 20:28] = 1
        labels[26:30, 12:18] = 2
        bank.add(torch.zeros(3, 32, 32), labels, SliceRecord("Chest", f"c{n}", 0, 1), {1: "lung", 2: "heart"})
    bank.add(torch.zeros(3, 32, 32), (torch.arange(32)[:, None] < 10).expand(32, 32).to(torch.uint8) * 1,
             SliceRecord("Skin", "s0", 0, 1), {1: "lesion"})
    return bank


def test_an_absent_class_gets_an_empty_target_and_a_class_the_slice_does_not_show():
    bank = two_part_bank()
    sampler = TaskSampler(bank, ClassCatalog.from_names(bank.class_names),
                          TaskConfig(semantic=1.0, in_context=0.0, interactive=0.0, negative_rate=0.0, absent_class_rate=1.0))
    for _ in range(10):
        batch = sampler.sample(4)
        for query, name, target in zip(batch.query_ids, batch.class_names, batch.targets):
            assert name not in {n for n, pairs in bank.by_class.items() if any(i == query for i, _ in pairs)}
            assert target.sum() == 0


def test_a_foreign_reference_asks_for_nothing_and_a_part_reference_for_the_same_part():
    bank = two_part_bank()
    catalog = ClassCatalog.from_names(bank.class_names)
    foreign = TaskSampler(bank, catalog, TaskConfig(semantic=0.0, in_context=1.0, interactive=0.0, foreign_reference_rate=1.0))
    batch = foreign.sample(4)
    for query, refs, target in zip(batch.query_ids, batch.ref_ids, batch.targets):
        assert bank.records[refs[0]].dataset != bank.records[query].dataset and target.sum() == 0

    parts = TaskSampler(bank, catalog, TaskConfig(semantic=0.0, in_context=1.0, interactive=0.0, part_reference_rate=1.0,
                                                  references=2), seed=3)
    seen_sides = set()
    for _ in range(6):
        batch = parts.sample(4)
        for name, query, refs, masks, target in zip(batch.class_names, batch.query_ids, batch.ref_ids, batch.ref_masks,
                                                    batch.targets):
            if name != "lung":
                continue
            full = bank.mask(query, 1)
            assert 0 < target.sum() < full.sum() and torch.all(target <= full)  # one lung of the two
            side = lambda m: float((m.sum(0) * torch.arange(32)).sum() / m.sum()) < 16  # noqa: E731 - left half?
            assert side(target) == side(masks[0]) == side(masks[1])  # the same lung as every reference marks
            assert all(0 < m.sum() < bank.mask(r, 1).sum() for m, r in zip(masks, refs))  # each marks one lung only
            seen_sides.add(side(target))
    assert seen_sides == {True, False}


def test_medsam_dense_prompts_have_no_batch_statistics_so_a_prior_means_the_same_in_training_and_use():
    model = small_medsam()
    prompts = Prompts(prior_logits=torch.randn(2, 1, 64, 64) * 4, points=torch.tensor([[[10.0, 12.0]], [[40.0, 30.0]]]),
                      point_labels=torch.tensor([[1], [0]]))
    used = model.dense(prompts, 2)
    model.train()
    for _ in range(3):  # training batches without any dense prompt must not change what a prior means later
        model.dense(Prompts(class_ids=torch.tensor([0, 1])), 2)
    trained = model.dense(prompts, 2)
    assert all(torch.equal(a, b) for a, b in zip(used, trained))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.dense.modules())
