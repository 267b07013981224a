"""Sigma schedules and samplers: pure functions over a denoiser ``x0 = denoise(x, sigma)``."""
