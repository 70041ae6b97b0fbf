"""Evaluation: protocols over nnU-Net datasets and summaries, shared by `kprism eval` and model cards."""
