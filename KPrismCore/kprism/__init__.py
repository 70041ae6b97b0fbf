"""KPrism: one promptable segmentation model for semantic, in-context and interactive knowledge."""

__version__ = "0.1.0"
