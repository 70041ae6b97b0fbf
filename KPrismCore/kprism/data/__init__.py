"""Datasets (nnU-Net v2 / Decathlon readers) and simulated interactions shared by training and evaluation."""
