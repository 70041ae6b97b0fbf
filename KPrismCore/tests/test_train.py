"""The trainer learns on generated data, and a resumed run continues exactly like an unbroken one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kprism.train.tasks import TaskConfig
from kprism.train.trainer import TrainConfig, Trainer, load_config, warmup_cosine
from kprism.weights import load_model

from .synthetic import make_shapes_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "Dataset900_Shapes")


def config(dataset, tmp_path, **overrides) -> TrainConfig:
    values = dict(datasets=[str(dataset)], output=str(tmp_path / "model.safetensors"), run_dir=str(tmp_path / "run"),
                  model_overrides={"image_size": 64}, steps=6, batch_size=4, warmup_steps=2, checkpoint_every=3,
                  log_every=1, threads=1, lr=2e-3, val_every=0)
    values.update(overrides)
    return TrainConfig(**values)


def test_loss_falls_within_a_few_dozen_steps(dataset, tmp_path):
    cfg = config(dataset, tmp_path, steps=40, warmup_steps=5, task=TaskConfig(semantic=1.0, in_context=0.0, interactive=0.0, knowledge_then_clicks=0.0))
    trainer = Trainer(cfg, show_progress=False)
    losses = [trainer.train_step(trainer.sampler.sample(cfg.batch_size))["mask"] for _ in range(cfg.steps)]
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8]), losses


def test_resume_continues_exactly(dataset, tmp_path):
    straight = Trainer(config(dataset, tmp_path / "a"), show_progress=False)
    straight.fit()
    first = Trainer(config(dataset, tmp_path / "b"), show_progress=False)
    assert first.fit(until=3) is None
    resumed = Trainer(config(dataset, tmp_path / "b", steps=6), show_progress=False)
    resumed.fit()
    assert resumed.step == 6
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_from_another_config_is_refused(dataset, tmp_path):
    Trainer(config(dataset, tmp_path), show_progress=False).fit(until=3)
    other = Trainer(config(dataset, tmp_path, steps=6, lr=5e-4), show_progress=False)
    with pytest.raises(ValueError, match="different training config"):
        other.fit()


def test_exported_weights_load_strictly_with_the_catalog(dataset, tmp_path):
    cfg = config(dataset, tmp_path, steps=2)
    path = Trainer(cfg, show_progress=False).fit()
    model, catalog, checkpoint = load_model(path)
    assert catalog.names == ["disk", "square"]
    assert checkpoint.training["steps"] == 2
    assert model.config.image_size == 64


def test_every_mode_and_first_prompt_trains(dataset, tmp_path):
    trainer = Trainer(config(dataset, tmp_path), show_progress=False)
    for mode, first in [("semantic", "none"), ("in_context", "none"), ("interactive", "click"),
                        ("interactive", "box"), ("interactive", "scribble")]:
        batch = trainer.sampler.sample(2)
        batch.mode, batch.first_prompt, batch.correction_rounds = mode, first, 2
        if mode != "semantic":
            batch.class_ids = None
        if mode == "in_context" and batch.ref_ids is None:
            refs = [trainer.sampler._reference(n, q) for n, q in zip(batch.class_names, batch.query_ids)]
            batch.ref_ids = [[r] for r, _ in refs]
            batch.ref_masks = torch.stack([trainer.bank.mask(r, v)[None] for r, v in refs])
        if mode == "semantic" and batch.class_ids is None:
            batch.class_ids = torch.tensor([trainer.catalog.index(n) for n in batch.class_names])
        parts = trainer.train_step(batch)
        assert np.isfinite(parts["loss"]), (mode, first)


def test_config_files_resolve_paths_relative_to_themselves(tmp_path, dataset):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "train.yaml"
    path.write_text(f"datasets: [{dataset}]\noutput: out/model.safetensors\nrun_dir: run\nsteps: 5\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.output == str(tmp_path / "cfg" / "out" / "model.safetensors")
    assert cfg.run_dir == str(tmp_path / "cfg" / "run")


def test_config_without_datasets_names_the_missing_field(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"steps": 5}', encoding="utf-8")
    with pytest.raises(ValueError, match="datasets"):
        load_config(path)


def test_learning_rate_never_starts_at_zero():
    assert warmup_cosine(0, 100, 1000) > 0
    assert warmup_cosine(99, 100, 1000) == pytest.approx(1.0)
    assert warmup_cosine(1000, 100, 1000) == pytest.approx(0.02)


def test_validation_writes_dice_per_dataset_and_mode(tmp_path):
    root = make_shapes_dataset(tmp_path / "Dataset901_Split", cases=8)
    (root / "imagesTs").mkdir()
    (root / "labelsTs").mkdir()
    for path in sorted((root / "imagesTr").glob("case0[67]_0000.png")):  # move two cases to a test split
        case = path.name.replace("_0000.png", "")
        path.rename(root / "imagesTs" / path.name)
        (root / "labelsTr" / f"{case}.png").rename(root / "labelsTs" / f"{case}.png")
    import json

    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    meta["numTraining"] = 6
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    trainer = Trainer(config(root, tmp_path, steps=2, val_every=2, val_per_dataset=2), show_progress=False)
    trainer.fit()
    rows = (tmp_path / "run" / "val.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "step,dataset,mode,dice"
    modes = {r.split(",")[2] for r in rows[1:]}
    assert modes == {"semantic", "in_context", "click"}
    assert all(0 <= float(r.split(",")[3]) <= 1 for r in rows[1:])


def test_a_class_without_training_slices_is_named(dataset, tmp_path):
    with pytest.raises(ValueError, match=r"No training slices for classes \['liver'\]"):
        Trainer(config(dataset, tmp_path, classes=["disk", "liver"]), show_progress=False)


def test_learning_curve_figure_is_drawn_from_the_logs(dataset, tmp_path):
    from kprism.train.curves import plot_learning_curve

    Trainer(config(dataset, tmp_path, steps=4), show_progress=False).fit()
    (tmp_path / "run" / "val.csv").write_text("step,dataset,mode,dice\n2,d,semantic,0.5\n4,d,semantic,0.7\n", encoding="utf-8")
    figure = plot_learning_curve(tmp_path / "run", tmp_path / "curve.png")
    assert figure.stat().st_size > 20_000
    staged = plot_learning_curve([tmp_path / "run", tmp_path / "run"], tmp_path / "stages.png")  # stage 2 continues the axis
    assert staged.stat().st_size > 20_000


def test_model_card_carries_hash_steps_classes_and_the_evaluation(dataset, tmp_path):
    from kprism.cli import main as cli
    from kprism.train.card import model_card

    weights = Trainer(config(dataset, tmp_path, steps=2), show_progress=False).fit()
    assert cli(["eval", "--dataset", str(dataset), "--model", str(weights), "--clicks", "2", "--max-cases", "2",
                "--json", str(tmp_path / "eval.json"), "--threads", "1"]) == 0
    import json

    evaluation = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))
    card = model_card(weights, evaluation, ["configs/x.yaml"], None, "Notes here.")
    assert load_model(weights)[2].sha256 in card
    assert "disk, square" in card and "| Dataset900_Shapes |" in card and "Notes here." in card
    assert "| 1 | `kprism train configs/x.yaml` | 2 | 4 |" in card
    tuned = Trainer(config(dataset, tmp_path / "stage2", steps=3, init_from=str(weights)), show_progress=False).fit()
    card = model_card(tuned, evaluation, ["configs/x.yaml", "configs/y.yaml"], None, "",
                      speed=[{"config": "y.yaml", "steps_per_hour": 12345, "batch_size": 4, "max_correction_rounds": 2, "threads": 2}])
    assert "| 1 | `kprism train configs/x.yaml` | 2 |" in card and "| 2 | `kprism train configs/y.yaml` | 3 |" in card
    assert "**12345 steps per hour**" in card
    with pytest.raises(ValueError, match="one --config per run"):
        model_card(tuned, evaluation, ["configs/y.yaml"], None, "")


def test_soft_targets_keep_a_one_pixel_line_that_nearest_resizing_breaks(tmp_path):
    import json

    from PIL import Image

    from kprism.data.slices import build_slice_bank

    root = tmp_path / "Dataset902_Line"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    labels = np.zeros((101, 101), np.uint8)
    labels[:, 50] = 1  # a one-pixel vertical vessel
    Image.fromarray((labels * 200 + 20).astype(np.uint8)).save(root / "imagesTr" / "c_0000.png")
    Image.fromarray(labels).save(root / "labelsTr" / "c.png")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "x"}, "labels": {"background": 0, "vessel": 1},
                                                   "numTraining": 1, "file_ending": ".png"}), encoding="utf-8")
    hard = build_slice_bank([root], 64).mask(0, 1)
    soft = build_slice_bank([root], 64, label_scale=2).mask(0, 1)
    assert hard.sum() == 0  # nearest resizing from 101 to 64 columns never samples column 50
    assert soft.max() < 1 and (soft > 0).any(dim=1).all()  # every row keeps part of the line, as coverage


def test_validation_handles_soft_targets_with_no_pixel_above_half(tmp_path):
    """A thin structure's soft target can stay below 0.5 everywhere; validation still places its click."""
    from kprism.catalog import ClassCatalog
    from kprism.data.slices import SliceBank
    from kprism.model import build_model, preset
    from kprism.train.validate import ValidationItem, validate

    bank = SliceBank(32, label_scale=2)
    labels = torch.zeros(64, 64, dtype=torch.uint8)
    labels[:, 31] = 1  # one column at twice the resolution: coverage 0.5 at most, mostly less after pooling
    from kprism.data.slices import SliceRecord

    bank.add(torch.zeros(3, 32, 32), labels, SliceRecord("d", "c", 0, 1), {1: "vessel"})
    catalog = ClassCatalog.from_names(["vessel"])
    model = build_model(preset("tiny", image_size=32, num_classes=1))
    scores = validate(model, [ValidationItem("d", "vessel", 0, 1, 0)], bank, bank, catalog)
    assert set(scores) == {("d", "semantic"), ("d", "in_context"), ("d", "click")}


def _two_dataset_bank():
    from kprism.data.slices import SliceBank, SliceRecord

    bank = SliceBank(size=8)
    image = torch.zeros(3, 8, 8)
    for i in range(10):  # dataset A: 'big' on 9 slices, 'small' on 1
        labels = torch.zeros(8, 8, dtype=torch.uint8)
        labels[:4] = 1 if i < 9 else 2
        bank.add(image, labels, SliceRecord("A", f"a{i}", 0, 1), {1: "big", 2: "small"})
    for i in range(3):
        labels = torch.zeros(8, 8, dtype=torch.uint8)
        labels[2:] = 1
        bank.add(image, labels, SliceRecord("B", f"b{i}", 0, 1), {1: "other"})
    return bank


def _draw_counts(task: TaskConfig, draws: int = 3000) -> dict[str, int]:
    from collections import Counter

    from kprism.catalog import ClassCatalog
    from kprism.train.tasks import TaskSampler

    bank = _two_dataset_bank()
    sampler = TaskSampler(bank, ClassCatalog.from_names(bank.class_names), task, seed=0)
    return Counter(name for _ in range(draws // 4) for name in sampler.sample(4).class_names)


def test_dataset_weights_and_sqrt_slice_class_weighting_shape_the_draws():
    semantic = dict(semantic=1.0, in_context=0.0, interactive=0.0, negative_rate=0.0)
    uniform = _draw_counts(TaskConfig(**semantic))
    assert abs(uniform["big"] - uniform["small"]) < 150 and abs(uniform["other"] - 1500) < 150
    weighted = _draw_counts(TaskConfig(**semantic, dataset_weights={"A": 3.0}, class_weighting="sqrt_slices"))
    # A is drawn 3/4 of the time; inside A, 'big' has sqrt(9) : sqrt(1) = 3 : 1 the weight of 'small'.
    assert abs(weighted["other"] - 750) < 120
    assert abs(weighted["big"] - 3 * weighted["small"]) < 0.25 * weighted["big"], weighted


def test_unknown_dataset_weight_or_class_weighting_is_named():
    with pytest.raises(ValueError, match=r"\['C'\].*known: \['A', 'B'\]"):
        _draw_counts(TaskConfig(dataset_weights={"C": 2.0}), draws=4)
    with pytest.raises(ValueError, match="class_weighting"):
        _draw_counts(TaskConfig(class_weighting="by_volume"), draws=4)


def test_fine_tuning_starts_from_the_given_weights_and_records_them(dataset, tmp_path):
    base = Trainer(config(dataset, tmp_path / "base", steps=2), show_progress=False).fit()
    tuned = Trainer(config(dataset, tmp_path / "tuned", steps=2, init_from=str(base)), show_progress=False)
    _, _, start = load_model(base)
    for name, value in tuned.model.state_dict().items():
        assert torch.equal(value, start.state_dict[name]), name
    _, _, result = load_model(tuned.fit())
    assert result.training["init_from"]["sha256"] == start.sha256
    assert result.training["init_from"]["training"]["steps"] == 2


def test_fine_tuning_from_weights_of_other_classes_is_refused(dataset, tmp_path):
    base = Trainer(config(dataset, tmp_path / "base", steps=1), show_progress=False).fit()
    with pytest.raises(ValueError, match="other classes"):
        Trainer(config(dataset, tmp_path / "tuned", classes=["disk"], init_from=str(base)), show_progress=False)


def test_resume_is_refused_when_the_starting_weights_changed(dataset, tmp_path):
    first = Trainer(config(dataset, tmp_path / "w1", steps=1), show_progress=False).fit()
    second = Trainer(config(dataset, tmp_path / "w2", steps=1, seed=5), show_progress=False).fit()
    Trainer(config(dataset, tmp_path / "run", init_from=str(first)), show_progress=False).fit(until=1)
    with pytest.raises(ValueError, match="different training config"):
        Trainer(config(dataset, tmp_path / "run", init_from=str(second)), show_progress=False).fit()


def test_class_head_stage_trains_only_the_head_and_keeps_prompted_results(dataset, tmp_path):
    base = Trainer(config(dataset, tmp_path / "base", steps=2), show_progress=False).fit()
    cfg = config(dataset, tmp_path / "head", steps=30, batch_size=4, lr=5e-3, init_from=str(base),
                 model_overrides={"image_size": 64, "class_head": True}, objective="class_head", train_only=["class_head"],
                 task=TaskConfig(semantic=1.0, in_context=0.0, interactive=0.0, knowledge_then_clicks=0.0))
    trainer = Trainer(cfg, show_progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    losses = [trainer.train_step(trainer.sampler.sample(cfg.batch_size))["loss"] for _ in range(cfg.steps)]
    assert np.mean(losses[-6:]) < 0.8 * np.mean(losses[:6]), losses
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("class_head.") for k in changed), sorted(changed)[:5]
    trainer.step = cfg.steps - 1
    model, catalog, _ = load_model(trainer.fit())
    assert model.config.class_head and catalog.names == ["disk", "square"]
    with torch.no_grad():
        logits = model.segment_all(model.encode(torch.zeros(2, 3, 64, 64)))
    assert logits.shape == (2, 2, 32, 32)


def test_class_head_objective_without_the_head_or_unknown_module_is_refused(dataset, tmp_path):
    with pytest.raises(ValueError, match="class_head: true"):
        Trainer(config(dataset, tmp_path / "a", objective="class_head"), show_progress=False)
    with pytest.raises(ValueError, match=r"train_only names \['decoderr'\]"):
        Trainer(config(dataset, tmp_path / "b", train_only=["decoderr"]), show_progress=False)


def test_class_head_targets_treat_other_modalities_classes_as_absent():
    from kprism.catalog import ClassCatalog
    from kprism.data.slices import SliceBank, SliceRecord
    from kprism.train.class_head import ClassTargetBuilder

    bank = SliceBank(size=8)
    image, labels = torch.zeros(3, 8, 8), torch.zeros(8, 8, dtype=torch.uint8)
    labels[:2] = 1
    for dataset, name in (("CT1", "liver"), ("MR1", "heart"), ("MR2", "kidney"), ("XR", "lung")):
        bank.add(image, labels, SliceRecord(dataset, "c", 0, 1), {1: name})
    bank.modality.update({"CT1": "ct", "MR1": "mri", "MR2": "mri", "XR": "x-ray"})
    catalog = ClassCatalog.from_names(["heart", "kidney", "liver", "lung"])
    builder = ClassTargetBuilder(bank, catalog)
    known = {d: sorted(catalog.names[i] for i in builder.known[d].tolist()) for d in ("CT1", "MR1", "XR")}
    assert known["CT1"] == ["heart", "kidney", "liver", "lung"]  # no other CT set: everything else is absent
    assert known["MR1"] == ["heart", "liver", "lung"]  # kidney is labelled on another MRI set: unknown here
    assert known["XR"] == ["heart", "kidney", "liver", "lung"]


def test_class_head_scores_present_classes_and_a_few_known_absent_ones():
    from kprism.train.class_head import ClassTargets, choose_channels

    targets = ClassTargets(torch.zeros(2, 3, 8, 8), present=[torch.tensor([3]), torch.tensor([], dtype=torch.long)],
                           masks=[torch.ones(1, 8, 8), torch.zeros(0, 8, 8)],
                           known=[torch.tensor([0, 1, 3, 5, 6]), torch.tensor([2, 4])])
    channels = choose_channels(targets, (4, 4), absent=2, rng=np.random.default_rng(0))
    assert channels.classes.shape == (2, 3)
    assert channels.classes[0, 0] == 3 and channels.present[0].tolist() == [True, False, False]
    assert set(channels.classes[0, 1:].tolist()) <= {0, 1, 5, 6} and channels.valid[0].all()
    assert set(channels.classes[1, :2].tolist()) == {2, 4} and channels.valid[1].tolist() == [True, True, False]
    assert channels.masks[0, 0].min() == 1 and channels.masks[0, 1:].abs().sum() == 0
