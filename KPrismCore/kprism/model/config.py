"""Model configuration: every size and switch of a KPrism network, with named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .checked_dict import from_checked_dict
from .tiny_vit import LITE_MEDSAM

_LITE_MEDSAM_JSON = LITE_MEDSAM.to_json()


@dataclass(frozen=True)
class KPrismConfig:
    """Hyper-parameters of a KPrism model. Travels inside every checkpoint."""

    image_size: int = 256
    in_channels: int = 3
    encoder_channels: tuple[int, int, int, int] = (16, 32, 64, 128)  # strides 2, 4, 8, 16
    encoder_blocks: tuple[int, int, int, int] = (1, 1, 2, 2)
    embed_dim: int = 128  # token and stride-16 feature width
    decoder_layers: int = 2
    decoder_heads: int = 4
    num_experts: int = 4
    expert_top_k: int = 2  # 0 = dense soft routing over all experts
    expert_hidden: int = 256
    num_classes: int = 1  # size of the semantic class-token table
    max_references: int = 4
    dropout: float = 0.0
    class_head: bool = False  # the one-pass all-class head (`KPrismModel.segment_all`)
    # A pretrained, frozen TinyViT as the image encoder: its config as JSON (`TinyViTConfig.to_json`);
    # empty = our own convolutional encoder. See `foundation_encoder.py`.
    foundation: str = ""
    # Normalisation in the dense prompt encoder: "batch" (as trained for tiny) or "none". A training batch
    # holds one task mode, so batch statistics mix batches without any dense prompt (variance 0) and
    # batches with clicks and priors; at inference the running variance (~1e-3 after 450 medsam steps)
    # then amplifies a prior mask ~30× and the mask floods the slice. "none" has no batch statistics.
    prompt_norm: str = "batch"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "KPrismConfig":
        return from_checked_dict(cls, values, "model")


PRESETS: dict[str, KPrismConfig] = {
    # CPU default: answers a click in ~10-20 ms on two cores (see benchmarks/).
    "tiny": KPrismConfig(),
    # GPU-sized: wider encoder and decoder, 512² input.
    "base": KPrismConfig(
        image_size=512,
        encoder_channels=(32, 64, 128, 256),
        encoder_blocks=(2, 2, 4, 4),
        embed_dim=256,
        decoder_layers=4,
        decoder_heads=8,
        num_experts=8,
        expert_hidden=1024,
    ),
    # LiteMedSAM's pretrained medical TinyViT (frozen, 256×64×64 embedding) under K-Prism's decoder side.
    # Wider skips than tiny: the stride-4 skip carries the foundation embedding itself.
    "medsam": KPrismConfig(
        encoder_channels=(24, 64, 96, 128),
        encoder_blocks=(1, 1, 0, 0),  # the trainable high-resolution stem (strides 2 and 4) beside the foundation
        foundation=_LITE_MEDSAM_JSON,
        class_head=True,
        prompt_norm="none",
    ),
}


def preset(name: str, **overrides: Any) -> KPrismConfig:
    """A named preset, optionally with some fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return KPrismConfig.from_dict({**PRESETS[name].to_dict(), **overrides})
