"""Datasets for training and checking sdjax models (synthetic, generated on the fly, no downloads)."""
