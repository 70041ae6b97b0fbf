"""The KPrism trainer: three-mode tasks, correction rounds, exact resume, data-parallel with torchrun.

Run it with `kprism train CONFIG` (one process) or `torchrun --nproc_per_node N -m kprism.cli train CONFIG`
(each rank samples its own tasks; gradients are averaged with torch.distributed all-reduce).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from monai.transforms import Compose
from tqdm.auto import tqdm

from ..atomic import write_atomically
from ..catalog import ClassCatalog
from ..data.slices import SliceBank, build_slice_bank
from ..model.encoder import ImageFeatures
from ..model import KPrismModel, Prompts, build_model, preset, upsample_logits
from ..runtime import autocast, resolve_device
from ..weights import Checkpoint, file_sha256, read_checkpoint, save_checkpoint
from .augment import augment_batch, build_augmentation
from .class_head import ClassTargetBuilder, choose_channels, class_head_loss
from .embedded_bank import EmbeddedSliceBank, build_embedded_bank
from .interactions import correction_clicks, first_prompts
from .losses import total_loss
from .tasks import TaskBatch, TaskConfig, TaskSampler
from .validate import validate, validation_items


ABSENT_CLASSES_PER_SAMPLE = 8  # class-head training: known-absent classes scored per sample


@dataclass
class TrainConfig:
    datasets: list[str]
    output: str  # final weights (.safetensors)
    run_dir: str = "runs/kprism"
    preset: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    classes: Optional[list[str]] = None  # default: every class found in the datasets
    steps: int = 10000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 300
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    log_every: int = 50
    val_every: int = 1000  # 0 turns validation off
    val_per_dataset: int = 4
    seed: int = 0
    threads: int = 2
    device: str = "auto"
    reference_gradients: bool = False
    soft_targets: bool = True  # area-averaged targets from labels at 2× resolution: thin structures survive
    init_from: Optional[str] = None  # weights to start from (fine-tuning); same preset and classes, loaded strictly
    # "prompts": the three-mode tasks; "class_head": only the one-pass class head (needs model_overrides
    # class_head: true), every labelled class of a slice at once.
    objective: str = "prompts"
    train_only: Optional[list[str]] = None  # top-level module names to train; the rest is frozen (and kept in eval mode)
    loss_weights: dict[str, float] = field(default_factory=lambda: {"mask": 1.0, "deep": 0.4, "balance": 0.01, "quality": 0.5})
    # Presets with a frozen foundation encoder (`medsam`) train on its cached embeddings:
    foundation_encoder: Optional[str] = None  # converted encoder weights (default: the kprism user cache's LiteMedSAM file)
    embedding_cache: Optional[str] = None  # cache root (default: $KPRISM_EMBEDDING_CACHE or the kprism user cache)
    encode_missing: bool = False  # encode slices missing from the cache (slow on a CPU) instead of leaving them out
    held_out_cases: list[str] = field(default_factory=list)  # case ids ("dataset/case" or "case") kept out of training
    task: TaskConfig = field(default_factory=TaskConfig)

    @classmethod
    def from_dict(cls, values: dict[str, Any], base_dir: Path = Path(".")) -> "TrainConfig":
        values = dict(values)
        if "datasets" not in values or "output" not in values:
            raise ValueError("A training config needs at least 'datasets' (list of folders) and 'output' (weights file).")
        values["task"] = TaskConfig(**values.get("task", {}))
        # Relative paths in a config file are relative to that file, so configs work from any directory.
        def anchor(path: str) -> str:
            return str((base_dir / path).resolve())  # an absolute path passes through unchanged

        values["datasets"] = [anchor(d) for d in values["datasets"]]
        for key in ("output", "run_dir", "init_from", "foundation_encoder", "embedding_cache"):
            if key in values:
                values[key] = anchor(values[key])
        return cls(**values)

    def fingerprint(self) -> str:
        """What must match for a resume to be the same run (steps and logging may change)."""
        core = {k: v for k, v in asdict(self).items() if k not in ("steps", "checkpoint_every", "log_every", "val_every", "val_per_dataset", "threads", "device", "run_dir", "output", "init_from", "foundation_encoder", "embedding_cache", "encode_missing")}
        if self.init_from:  # the starting weights' content matters, not where the file lies
            core["init_sha256"] = file_sha256(self.init_from)
        return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_config(path: str | os.PathLike) -> TrainConfig:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text)
    else:
        values = json.loads(text)
    return TrainConfig.from_dict(values, base_dir=path.parent)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier stepped per iteration; starts above zero (an LR of 0 wastes the first steps)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, config: TrainConfig, bank: Optional[SliceBank] = None, show_progress: bool = True):
        self.config = config
        self.rank, self.world = _distributed_rank()
        torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed + self.rank)
        self.run_dir = Path(config.run_dir)
        model_config = preset(config.preset, **config.model_overrides)
        label_scale = 2 if config.soft_targets else 1
        self.embedding_cache, encoder_tensors = _foundation_cache(config) if model_config.foundation else (None, None)
        if bank is None and self.embedding_cache is not None:
            bank = build_embedded_bank(config.datasets, self.embedding_cache, model_config.image_size, label_scale=label_scale,
                                       held_out_cases=config.held_out_cases, encode_missing=config.encode_missing)
        self.bank = bank or build_slice_bank(config.datasets, model_config.image_size, label_scale=label_scale)
        self.catalog = ClassCatalog.from_names(config.classes or self.bank.class_names)
        model_config = preset(config.preset, **{**config.model_overrides, "num_classes": len(self.catalog)})
        self.device = resolve_device(config.device)
        # channels_last: oneDNN's convolutions run ~30% faster in this layout on the CPU (measured).
        self.model: KPrismModel = build_model(model_config)
        if encoder_tensors is not None:
            self.model.encoder.vit.load_state_dict(encoder_tensors, strict=True)  # exported with the model
        self.init_checkpoint = _load_initial_weights(self.model, config.init_from, self.catalog) if config.init_from else None
        self.model = self.model.to(self.device, memory_format=torch.channels_last)
        if config.objective not in ("prompts", "class_head"):
            raise ValueError(f"objective must be 'prompts' or 'class_head', not {config.objective!r}.")
        if config.objective == "class_head" and self.model.class_head is None:
            raise ValueError("objective 'class_head' needs a model with the class head: add model_overrides: {class_head: true}.")
        self.class_targets = ClassTargetBuilder(self.bank, self.catalog) if config.objective == "class_head" else None
        trainable = self._freeze(config.train_only)
        # Mixed precision on CUDA only; on the CPU the scaler is a no-op.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda")
        self.sampler = TaskSampler(self.bank, self.catalog, config.task, seed=config.seed + 1000 * self.rank)
        self.rng = np.random.default_rng(config.seed + 7 + 1000 * self.rank)
        # Cached embeddings fix each slice's pixels: geometric or intensity changes would no longer match them.
        self.augmentation = (Compose([]) if isinstance(self.bank, EmbeddedSliceBank)
                             else build_augmentation(model_config.image_size, config.seed + self.rank))
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, config.warmup_steps, config.steps))
        self.step = 0
        self.show_progress = show_progress and self.rank == 0
        self.val_bank, self.val_items = None, []
        if config.val_every and self.rank == 0:
            self.val_bank = build_slice_bank(config.datasets, model_config.image_size, split="test", label_scale=self.bank.label_scale)
            self.val_items = validation_items(self.val_bank, self.bank, self.catalog, config.val_per_dataset, config.seed)

    def _freeze(self, train_only: Optional[list[str]]) -> list[torch.nn.Parameter]:
        """Freezes every top-level module not in `train_only`; returns the parameters left to train."""
        if not train_only:
            return [p for p in self.model.parameters() if p.requires_grad]  # a foundation encoder stays frozen
        modules = dict(self.model.named_children())
        unknown = [name for name in train_only if modules.get(name) is None]
        if unknown:
            raise ValueError(f"train_only names {unknown}, which this model does not have; it has {sorted(k for k, v in modules.items() if v is not None)}.")
        for name, module in modules.items():
            if module is not None:
                module.requires_grad_(name in train_only)
        return [p for p in self.model.parameters() if p.requires_grad]

    def _train_mode(self) -> None:
        """Frozen modules stay in eval mode: their batch-norm statistics must not drift either."""
        if not self.config.train_only:
            self.model.train()
            return
        self.model.eval()
        for name in self.config.train_only:
            getattr(self.model, name).train()

    # -------------------------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        return {
            "fingerprint": self.config.fingerprint(),
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state(),
            "rng": self.rng.bit_generator.state,
            "augmentation": self.augmentation,  # pickled whole: nested transforms keep RNGs of their own
            "torch_rng": torch.get_rng_state(),
            "scaler": self.scaler.state_dict(),
        }

    def save_state(self) -> Path:
        """Atomically write the resumable state (model, optimizer, scheduler, every RNG)."""
        state = self.state()
        return write_atomically(self.run_dir / "last.pt", lambda temporary: torch.save(state, temporary), suffix=".pt")

    def resume(self) -> bool:
        """Continue from run_dir/last.pt if present; a checkpoint of another config is refused."""
        path = self.run_dir / "last.pt"
        if not path.exists():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["fingerprint"] != self.config.fingerprint():
            raise ValueError(
                f"{path} was written by a different training config (fingerprint {state['fingerprint']}, "
                f"this config {self.config.fingerprint()}); use another run_dir or the original config."
            )
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.set_state(state["sampler"])
        self.rng.bit_generator.state = state["rng"]
        self.augmentation = state["augmentation"]
        torch.set_rng_state(state["torch_rng"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        return True

    # -------------------------------------------------------------------------------- steps
    def train_step(self, batch: TaskBatch) -> dict[str, float]:
        self._train_mode()
        if self.class_targets is not None:
            return self._class_head_step(batch)
        query, prompts, targets = self._encode(batch)
        numpy_targets = (targets > 0.5).cpu().numpy()
        clicks: list[list] = [[] for _ in range(len(batch.query_ids))]
        if batch.mode == "interactive":
            clicks = first_prompts(prompts, numpy_targets, batch.first_prompt, self.rng)
        for _ in range(batch.correction_rounds):
            # Rounds run without gradients, like a user looking at the result before clicking again.
            with torch.no_grad(), autocast(self.device):
                logits = upsample_logits(self.model.decode(query, prompts.to(self.device)).logits.float(), targets.shape[-2:])
            correction_clicks(prompts, logits.cpu(), numpy_targets, clicks, self.rng)
        with autocast(self.device):
            prediction = self.model.decode(query, prompts.to(self.device), deep_supervision=True)
            parts = total_loss(prediction, targets, self.config.loss_weights)
        self._optimise(parts["loss"])
        return {k: float(v.detach()) for k, v in parts.items()}

    def _class_head_step(self, batch: TaskBatch) -> dict[str, float]:
        targets = self.class_targets.build(batch.query_ids, self.augmentation)
        with autocast(self.device):
            with torch.set_grad_enabled(self.model.encoder.training):
                features = self._features(targets.images, batch.query_ids)
            pixels = self.model.class_head.pixel_features(features)
            channels = choose_channels(targets, tuple(pixels.shape[-2:]), ABSENT_CLASSES_PER_SAMPLE, self.rng)
            logits = self.model.class_head.logits_for(pixels, channels.classes.to(self.device))
            loss = class_head_loss(logits.float(), channels)
        self._optimise(loss)
        value = float(loss.detach())
        return {"loss": value, "mask": value, "deep": 0.0, "balance": 0.0, "quality": 0.0}

    def _encode(self, batch: TaskBatch):
        """Augment and encode the queries (and references); returns features, base prompts, targets."""
        images, targets = augment_batch(self.augmentation, torch.stack([self.bank.images[i] for i in batch.query_ids]), batch.targets)
        images, targets = images.to(self.device, memory_format=torch.channels_last), targets.to(self.device)
        prompts = Prompts(class_ids=batch.class_ids)
        with autocast(self.device):
            query = self._features(images, batch.query_ids)
            if batch.ref_ids is not None:
                b, k = len(batch.ref_ids), len(batch.ref_ids[0])
                ref_images = torch.stack([self.bank.images[i] for refs in batch.ref_ids for i in refs])
                ref_images, ref_masks = augment_batch(self.augmentation, ref_images, batch.ref_masks.flatten(0, 1))
                # References are encoded without gradients: the query path trains the shared encoder,
                # the fusion layers still learn from them, and a step costs a third less.
                with torch.set_grad_enabled(self.config.reference_gradients):
                    embedding = self._features(ref_images, [i for refs in batch.ref_ids for i in refs]).embedding
                prompts.ref_features = embedding.view(b, k, *embedding.shape[1:])
                prompts.ref_masks = ref_masks.view(b, k, 1, *ref_masks.shape[-2:])
        return query, prompts, targets

    def _features(self, images: torch.Tensor, slice_ids: list[int]) -> ImageFeatures:
        """Encoded slices; with a foundation encoder, from its cached embeddings instead of running it."""
        images = images.to(self.device, memory_format=torch.channels_last)
        if isinstance(self.bank, EmbeddedSliceBank):
            return self.model.encoder.from_embedding(images, self.bank.embeddings(slice_ids).to(self.device))
        return self.model.encode(images)

    def _optimise(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.world > 1:
            _average_gradients(self.model, self.world)
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1

    def fit(self, until: Optional[int] = None) -> Optional[Path]:
        """Train to `config.steps` (or pause at step `until`), checkpointing as it goes.

        Returns the exported weights path; None when paused before the end (resume with `fit()`) and on
        every distributed rank but 0.
        """
        resumed = self.resume()
        log_path = self.run_dir / "log.csv"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=self.config.steps, initial=self.step, disable=not self.show_progress, desc="train", unit="step")
        started, start_step = time.time(), self.step
        with open(log_path, "a", newline="", encoding="utf-8") as log:
            writer = csv.writer(log)
            if not resumed and self.rank == 0:
                writer.writerow(["step", "mode", "loss", "mask", "deep", "balance", "quality", "lr", "elapsed_s"])
            while self.step < min(self.config.steps, until or self.config.steps):
                batch = self.sampler.sample(self.config.batch_size)
                parts = self.train_step(batch)
                bar.update(1)
                bar.set_postfix(loss=f"{parts['loss']:.3f}", mode=batch.mode[:5])
                if self.rank == 0 and self.step % self.config.log_every == 0:
                    writer.writerow([self.step, batch.mode] + [round(parts[k], 5) for k in ("loss", "mask", "deep", "balance", "quality")]
                                    + [self.scheduler.get_last_lr()[0], round(time.time() - started, 1)])
                    log.flush()
                if self.rank == 0 and self.step % self.config.checkpoint_every == 0:
                    self.save_state()
                if self.val_items and self.step % self.config.val_every == 0:
                    self.log_validation()
        bar.close()
        if self.rank != 0:
            return None  # rank 0 writes the checkpoint and the weights
        self.save_state()
        if self.step < self.config.steps:
            return None
        elapsed = time.time() - started
        training = {"steps": self.step, "preset": self.config.preset, "datasets": [Path(d).name for d in self.config.datasets],
                    "batch_size": self.config.batch_size, "wall_time_s_this_run": round(elapsed, 1),
                    "steps_per_hour": round((self.step - start_step) / max(elapsed, 1e-9) * 3600)}
        if self.init_checkpoint is not None:
            training["init_from"] = {"file": self.init_checkpoint.path.name, "sha256": self.init_checkpoint.sha256,
                                     "training": self.init_checkpoint.training}
        save_checkpoint(self.model.cpu(), self.config.output, self.model.config, self.catalog, training=training)
        return Path(self.config.output)


    def log_validation(self) -> dict:
        """Appends Dice per dataset and mode at this step to run_dir/val.csv (the learning curve)."""
        scores = validate(self.model, self.val_items, self.val_bank, self.bank, self.catalog)
        path = self.run_dir / "val.csv"
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["step", "dataset", "mode", "dice"])
            for (dataset, mode), value in sorted(scores.items()):
                writer.writerow([self.step, dataset, mode, round(value, 4)])
        return scores


def _load_initial_weights(model: KPrismModel, path: str, catalog: ClassCatalog) -> Checkpoint:
    """Strictly loads fine-tuning start weights; another preset or class list is refused with the reason."""
    checkpoint = read_checkpoint(path)
    adds_class_head = model.config.class_head and not checkpoint.config.class_head
    if checkpoint.catalog.names != catalog.names:
        extra, missing = set(checkpoint.catalog.names) - set(catalog.names), set(catalog.names) - set(checkpoint.catalog.names)
        raise ValueError(f"init_from {path} was trained on other classes (only in the weights: {sorted(extra)}; only in "
                         f"this training: {sorted(missing)}; or another order). Train with the same datasets or classes.")
    if dataclasses.replace(checkpoint.config, class_head=model.config.class_head) != model.config:
        raise ValueError(f"init_from {path} is a different model ({checkpoint.config}) from this config's ({model.config}).")
    if adds_class_head:
        # Only the new head may be missing: every other weight must be in the file and fit exactly.
        result = model.load_state_dict(checkpoint.state_dict, strict=False)
        stray = [k for k in result.missing_keys if not k.startswith("class_head.")] + list(result.unexpected_keys)
        if stray:
            raise ValueError(f"init_from {path} does not fit this model beyond the new class head: {stray[:5]}")
    else:
        model.load_state_dict(checkpoint.state_dict, strict=True)
    return checkpoint


def _foundation_cache(config: TrainConfig):
    """The embedding cache of the foundation encoder named by the config, and that encoder's tensors."""
    from ..encoder_weights import load_tiny_vit
    from ..user_cache import user_cache_dir
    from ..embedding_cache import EmbeddingCache

    path = config.foundation_encoder or user_cache_dir("encoders", "litemedsam-tinyvit-fp16.safetensors")
    encoder, metadata = load_tiny_vit(path)  # checks the file's format and tensor hash
    # Keyed by the file's tensor hash, as `scripts/fill_embedding_cache.py` fills it.
    return EmbeddingCache(encoder, metadata["tensors_sha256"], root=config.embedding_cache), encoder.state_dict()


def _distributed_rank() -> tuple[int, int]:
    """Joins the torchrun process group when launched by torchrun; a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _average_gradients(model: torch.nn.Module, world: int) -> None:
    """Tasks differ per rank (different prompt kinds), so some parameters get no gradient on a rank.
    DistributedDataParallel would hang waiting for those; an explicit all-reduce treats them as zero."""
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world
