"""Flax Linen modules: CLIP text encoders, UNet, VAE. Params are plain pytrees."""
