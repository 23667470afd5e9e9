"""Scoring: the diffusion-classifier math (pure tensors) and the packed-batch engine."""
