"""An on-disk cache of frozen-encoder embeddings: each preprocessed slice is encoded once, ever.

Training the decoder side on a frozen foundation encoder (LiteMedSAM's TinyViT, ~2 s per slice on
two CPU cores) is only fast if no slice is encoded twice. An entry is keyed by the sha256 of the
exact encoder input (the (3, S, S) float32 tensor after windowing and letterboxing), the encoder's
tensor hash and the compute recipe, so:
- the same slice reached from another dataset listing, task or process finds its entry;
- a change of window, preprocessing or weights is a different key, never a stale hit;
- a missing, truncated or foreign entry is simply encoded again (the cache is rebuilt on use),
  and an interrupted fill resumes where it stopped (entries are written whole or not at all).

Layout: ``<root>/<encoder id[:16]>/<key[:2]>/<key>.safetensors``, holding ``embedding`` (float16)
and any requested stage outputs (``stage<i>``), with the key, encoder id and the slice's origin in
its metadata. The root is `default_cache_root()` unless given: `KPRISM_EMBEDDING_CACHE`, else the
kprism user cache (`kprism.user_cache`), outside any repository.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_path
from .model.tiny_vit import TinyViT, fast_float32_encoder
from .user_cache import user_cache_dir

CACHE_ENV = "KPRISM_EMBEDDING_CACHE"
KEY_VERSION = "kprism-embedding/1"
STORED_DTYPE = torch.float16  # halves the disk; rounding (≤ 5e-4 on values ≲ 1) is far below the fp16-weights effect
RECIPES = ("fp32", "bf16")  # how the encoder runs: float32, or bfloat16 autocast (1.6× faster on a CPU, ~0.1 off)


def default_cache_root() -> Path:
    return Path(os.environ[CACHE_ENV]).expanduser() if os.environ.get(CACHE_ENV) else user_cache_dir("embeddings")


def content_key(image: torch.Tensor, encoder_id: str, recipe: str = "fp32") -> str:
    """sha256 of the encoder input's float32 bytes, its shape, the encoder's tensor hash and the compute recipe."""
    pixels = image.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256()
    digest.update(json.dumps([KEY_VERSION, encoder_id, recipe, list(pixels.shape)]).encode())
    digest.update(memoryview(pixels.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


@dataclass(frozen=True)
class CachedEmbedding:
    key: str
    embedding: torch.Tensor  # (D, G, G) float16
    stages: dict[int, torch.Tensor] = field(default_factory=dict)  # stage index → (C, H, W) float16
    info: dict[str, str] = field(default_factory=dict)  # where the slice came from (dataset, case, slice, window …)


class EmbeddingCache:
    """Embeddings of one encoder (weights + recipe), read from disk or computed and stored on first use."""

    def __init__(
        self,
        encoder: TinyViT,
        encoder_id: str,
        root: str | os.PathLike | None = None,
        stages: Sequence[int] = (),
        recipe: str = "fp32",
        batch_size: int = 1,
    ):
        if recipe not in RECIPES:
            raise ValueError(f"Unknown encoder recipe {recipe!r}; choose one of {', '.join(RECIPES)}.")
        if not encoder_id:
            raise ValueError("EmbeddingCache needs the encoder's tensor hash as encoder_id (its weights file records it).")
        unknown = sorted(set(stages) - set(range(len(encoder.config.widths))))
        if unknown:
            raise ValueError(f"Stages {unknown} do not exist; this encoder has stages 0–{len(encoder.config.widths) - 1}.")
        self.encoder = encoder.eval()
        self._fast: TinyViT | None = None  # built on the first encode: a cache that only reads never pays for it
        self.encoder_id, self.recipe = encoder_id, recipe
        self.stages = tuple(sorted(set(stages)))
        self.batch_size = max(1, batch_size)
        self.root = Path(root).expanduser() if root is not None else default_cache_root()
        self.folder = self.root / encoder_id[:16]
        self.encoded = 0  # slices this object ran through the encoder (the rest were read back)

    @classmethod
    def from_encoder_file(cls, path: str | os.PathLike, **options) -> "EmbeddingCache":
        """A cache for the encoder in a converted weights file (`kprism.encoder_weights`), keyed by its tensor hash."""
        from .encoder_weights import load_tiny_vit

        encoder, metadata = load_tiny_vit(path)
        return cls(encoder, metadata["tensors_sha256"], **options)

    def key(self, image: torch.Tensor) -> str:
        return content_key(image, self.encoder_id, self.recipe)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def has(self, image: torch.Tensor) -> bool:
        return self.load(self.key(image)) is not None

    def load(self, key: str) -> CachedEmbedding | None:
        """The stored entry, or None if it is missing, unreadable, foreign or lacks a requested stage."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                metadata, names = f.metadata() or {}, set(f.keys())
                wanted = {"embedding"} | {f"stage{i}" for i in self.stages}
                if metadata.get("key") != key or metadata.get("encoder") != self.encoder_id or not wanted <= names:
                    return None
                tensors = {name: f.get_tensor(name) for name in wanted}
        except (SafetensorError, OSError):  # truncated or damaged: encode again
            return None
        info = json.loads(metadata.get("info", "{}"))
        stages = {i: tensors[f"stage{i}"] for i in self.stages}
        return CachedEmbedding(key, tensors["embedding"], stages, info)

    def get(self, image: torch.Tensor, info: Mapping[str, str] | None = None) -> CachedEmbedding:
        return self.get_many([image], [info or {}])[0]

    def get_many(self, images: Sequence[torch.Tensor], infos: Sequence[Mapping[str, str]] | None = None) -> list[CachedEmbedding]:
        """One entry per (3, S, S) image, in order; only the missing ones are encoded (in batches) and stored."""
        infos = list(infos) if infos is not None else [{} for _ in images]
        if len(infos) != len(images):
            raise ValueError(f"get_many: {len(images)} images but {len(infos)} infos.")
        keys = [self.key(image) for image in images]
        found: dict[str, CachedEmbedding | None] = {key: self.load(key) for key in dict.fromkeys(keys)}
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        missing = [i for key, i in first.items() if found[key] is None]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            for i, entry in zip(chunk, self._encode([images[i] for i in chunk], [keys[i] for i in chunk], [infos[i] for i in chunk])):
                found[keys[i]] = entry
        return [found[key] for key in keys]  # type: ignore[misc]

    @torch.no_grad()
    def _encode(self, images: list[torch.Tensor], keys: list[str], infos: list[Mapping[str, str]]) -> list[CachedEmbedding]:
        batch = torch.stack([image.to(torch.float32) for image in images])
        if self._fast is None:
            # Entries are float16, so the fast float32 form (≤ 5e-6 away) stores the same numbers in 60 % of the time;
            # folded batch norms, channels-last (under autocast for bf16). A copy: the encoder is frozen.
            self._fast = fast_float32_encoder(self.encoder)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.recipe == "bf16"):
            features = self._fast(batch.contiguous(memory_format=torch.channels_last))
        self.encoded += len(images)
        entries = []
        for b, (key, info) in enumerate(zip(keys, infos)):
            tensors = {"embedding": features.embedding[b].to(STORED_DTYPE).contiguous()}
            tensors.update({f"stage{i}": features.stages[i][b].to(STORED_DTYPE).contiguous() for i in self.stages})
            self._store(key, tensors, info)
            stages = {i: tensors[f"stage{i}"] for i in self.stages}
            entries.append(CachedEmbedding(key, tensors["embedding"], stages, {k: str(v) for k, v in info.items()}))
        return entries

    def _store(self, key: str, tensors: dict[str, torch.Tensor], info: Mapping[str, str]) -> None:
        metadata = {"key": key, "encoder": self.encoder_id, "recipe": self.recipe,
                    "info": json.dumps({k: str(v) for k, v in info.items()})}
        with atomic_path(self.path(key), suffix=".safetensors") as temporary:
            save_file(tensors, temporary, metadata=metadata)
