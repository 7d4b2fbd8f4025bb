"""Noise schedules, samplers and probability-flow likelihoods that work with any denoiser."""
