"""Frozen encoders behind one interface (``Encoder``): diffusion U-Nets here, CNN baselines alongside.

Names are loaded on first use (PEP 562), so importing a light submodule such as ``sweep.encoders.zoo``
(what a config check needs) does not import torch and diffusers.
"""

import importlib

_EXPORTS = {
    "Encoder": "base", "FeatureColumn": "base", "PooledFeatureHooks": "base", "checkpoint_hash": "base",
    "DiffusionEncoder": "diffusion", "build_scheduler": "diffusion", "build_unet": "diffusion",
    "noise_for": "diffusion",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"sweep.encoders.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'sweep.encoders' has no attribute {name!r}")
