"""The one interface every frozen encoder implements, and the hook machinery they share.

Pure torch/numpy: no Ray here (stages wire encoders into Ray Data).
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from sweep.storage import checkpoint_hash  # noqa: F401 - also imported from here; lives where no torch is imported


@dataclasses.dataclass(frozen=True)
class FeatureColumn:
    """One feature column of the store; ``to_dict`` is exactly a manifest ``columns`` entry."""

    column: str
    layer: str
    timestep: int | None
    dim: int
    resolution: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Encoder(abc.ABC):
    """A frozen image encoder that turns a batch of preprocessed images into named feature vectors.

    Subclasses set ``name``, ``kind`` ("diffusion", "supervised", "simclr", "pretrained") and ``checkpoint``
    (the path whose content hash goes into the feature manifest).
    """

    name: str
    kind: str
    checkpoint: str | None = None

    @property
    @abc.abstractmethod
    def columns(self) -> list[FeatureColumn]:
        """Every feature column ``encode`` returns, in a stable order."""

    @abc.abstractmethod
    def encode(self, images: torch.Tensor, image_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Map images (B, C, H, W) float32 in [-1, 1] (as from ``sweep.data.preprocess``) to
        column name -> float16 array (B, dim). ``image_ids`` are the stable ids of the store's rows."""

    @property
    def column_names(self) -> list[str]:
        return [c.column for c in self.columns]

    @property
    def checkpoint_hash(self) -> str:
        # Cached: hashing a large checkpoint takes seconds and the files do not change under a live encoder.
        cached = self.__dict__.get("_checkpoint_hash")
        if cached is None:
            if self.checkpoint is None:
                raise ValueError(f"encoder {self.name!r} has no checkpoint path to hash")
            # Resolves to the module-level function: class attributes are not in a method's scope.
            cached = self.__dict__["_checkpoint_hash"] = checkpoint_hash(self.checkpoint)
        return cached


class _StopForward(Exception):
    """Raised from the hook of the last requested module to skip the rest of the forward."""


def _first_tensor(output: Any, path: str) -> torch.Tensor:
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"module {path!r} returns {type(output).__name__}, not a tensor: it cannot be a feature layer")
    if output.ndim < 2:
        raise ValueError(f"module {path!r} returns a tensor of shape {tuple(output.shape)}: need (B, C, ...)")
    return output


def _pool(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W...) -> mean over the spatial dims; (B, tokens, C), a transformer block's output (ViT,
    or a linear layer inside an attention block) -> mean over the tokens; (B, C) as is."""
    # Average in float32 even under autocast: bf16 sums over a 32x32 map would lose the low bits.
    t = t.float()
    if t.ndim == 3:
        return t.mean(dim=1)
    return t.mean(dim=tuple(range(2, t.ndim))) if t.ndim > 2 else t


class UnknownLayerError(ValueError):
    """A requested layer that is no module path of the model: the config's layers are wrong, not the model."""


def unknown_module_error(model: nn.Module, bad: str) -> UnknownLayerError:
    names = [n for n, _ in model.named_modules() if n]
    near = difflib.get_close_matches(bad, names, n=5, cutoff=0.5) or names[:8]
    hint = ""
    if bad == "blocks":
        hint = ' ("blocks" stands alone: extract.layers: blocks, not in a list)'
    elif bad.startswith("layer") and type(model).__name__ == "UNet2DModel":
        hint = " (a ResNet baseline's layers go in baselines[].layers)"
    return UnknownLayerError(f"unknown layer {bad!r}: not a module path of {type(model).__name__}; e.g. "
                             f"{', '.join(near)}{hint}")


class PooledFeatureHooks:
    """Record the spatially mean-pooled outputs of named modules in one forward, stopping right after the
    last of them runs.

    One dry forward on ``example_args``/``example_kwargs`` at construction finds the execution order and
    each output's shape; that order decides where later forwards stop, so no work after the last requested
    module (e.g. a U-Net decoder) is ever done. A module that runs more than once in a forward is recorded
    at its first call. Hooks are attached only for the duration of a call, leaving the model clean.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], *example_args: Any, **example_kwargs: Any):
        if isinstance(layers, str):
            layers = [layers]
        layers = list(layers)
        if not layers:
            raise ValueError("no layers requested")
        dupes = sorted({n for n in layers if layers.count(n) > 1})
        if dupes:
            raise ValueError(f"layers requested twice: {dupes}")
        modules = dict(model.named_modules())
        for n in layers:
            if n == "" or n not in modules:
                raise unknown_module_error(model, n)
        self.model = model
        self._modules = {n: modules[n] for n in layers}

        order: list[str] = []
        shapes: dict[str, tuple[int, ...]] = {}

        def probe(path: str):
            def hook(_module, _inputs, output):
                if path in shapes:
                    return
                shapes[path] = tuple(_first_tensor(output, path).shape[1:])
                order.append(path)
                if len(order) == len(layers):
                    raise _StopForward

            return hook

        with torch.no_grad():
            self._run(probe, example_args, example_kwargs)
        missing = [n for n in layers if n not in shapes]
        if missing:
            raise ValueError(f"layers never ran in a forward pass of {type(model).__name__}: {missing}")
        self.layers: list[str] = order  # execution order
        self.shapes: dict[str, tuple[int, ...]] = shapes  # per-sample output shape, e.g. (C, H, W)

    def dim(self, layer: str) -> int:
        shape = self.shapes[layer]
        return shape[1] if len(shape) == 2 else shape[0]  # (tokens, C): channels last

    def resolution(self, layer: str) -> int:
        """Spatial side of the layer's output (its height; for (tokens, C), the side of a square token
        grid, rounded down; 1 for a flat (B, C) output)."""
        shape = self.shapes[layer]
        if len(shape) == 2:
            return max(1, int(shape[0] ** 0.5))
        return shape[1] if len(shape) > 1 else 1

    def _run(self, make_hook, args, kwargs) -> None:
        handles = [m.register_forward_hook(make_hook(n)) for n, m in self._modules.items()]
        try:
            self.model(*args, **kwargs)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Run the model on the inputs; return layer -> pooled features (B, C) float32, on the model's device."""
        feats: dict[str, torch.Tensor] = {}
        last = self.layers[-1]

        def record(path: str):
            def hook(_module, _inputs, output):
                if path not in feats:
                    feats[path] = _pool(_first_tensor(output, path))
                if path == last:
                    raise _StopForward

            return hook

        self._run(record, args, kwargs)
        if len(feats) != len(self.layers):
            # Only reachable if the model's control flow depends on its input.
            missing = [n for n in self.layers if n not in feats]
            raise RuntimeError(f"layers did not run in this forward: {missing}")
        return {n: feats[n] for n in self.layers}
