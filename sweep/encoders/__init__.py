"""Frozen encoders behind one interface (``Encoder``): diffusion U-Nets here, CNN baselines alongside."""

from sweep.encoders.base import Encoder, FeatureColumn, PooledFeatureHooks, checkpoint_hash
from sweep.encoders.diffusion import DiffusionEncoder, build_scheduler, build_unet, noise_for

__all__ = [
    "DiffusionEncoder",
    "Encoder",
    "FeatureColumn",
    "PooledFeatureHooks",
    "build_scheduler",
    "build_unet",
    "checkpoint_hash",
    "noise_for",
]
