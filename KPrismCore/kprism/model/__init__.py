"""The KPrism network: one model for semantic, in-context and interactive segmentation."""

from .config import PRESETS, KPrismConfig, preset
from .encoder import ImageFeatures
from .kprism import KPrismModel, Prediction, build_model, upsample_logits
from .moe import ExpertUsage
from .prompts import MODES, Prompts

__all__ = ["KPrismConfig", "PRESETS", "preset", "ImageFeatures", "KPrismModel", "Prediction", "build_model", "upsample_logits",
           "MODES", "Prompts", "ExpertUsage"]
