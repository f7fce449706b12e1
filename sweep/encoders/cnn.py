"""A frozen baseline CNN as a feature encoder, loaded from ``baselines/<name>/final/``.

A baseline folder holds ``model.safetensors`` (the model's state dict: torchvision-format for the built-in
ResNets) and ``baseline.json`` (``arch``, ``in_channels``, ``small_input``, ``num_classes``, ``kind``,
``image_size``, optional input normalisation, ``classes`` for a supervised baseline; for a torchvision / timm /
factory ``arch`` (`sweep.encoders.zoo`) also ``model_in_channels``: a grey image is repeated to the model's
3 channels). Columns are named by the layer (``layer3``), with no
timestep; features are the spatial mean of each layer's output, from one forward stopped after the last
requested layer, stored as float16.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sweep.encoders import zoo
from sweep.encoders.base import Encoder, FeatureColumn, PooledFeatureHooks
from sweep.encoders.resnet import build_resnet, load_resnet_weights, read_state_dict

META_FILE = "baseline.json"
WEIGHTS_FILE = "model.safetensors"
# No `avgpool`: its output is the spatial mean of layer4, which layer4's (mean-pooled) column already holds
# (a store made with it, before 2026-11-24, serves these columns: FeatureStore.served_columns).
DEFAULT_LAYERS = ("layer1", "layer2", "layer3", "layer4")
PRECISIONS = ("fp32", "bf16")


def read_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"no baseline at {folder}: {META_FILE} is missing (run `sweep baselines` first)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise ValueError(f"{meta_path}: not JSON ({e})") from None
    # written by the baselines stage; an edited or hand-made one failed later as a bare KeyError: 'arch'
    lacking = [key for key in ("arch", "in_channels") if key not in meta] if isinstance(meta, dict) else ["arch"]
    if lacking:
        raise ValueError(f"{meta_path}: lacks {', '.join(map(repr, lacking))}: not a baseline folder written by "
                         f"`sweep baselines`")
    return meta


def load_baseline(folder: str | Path) -> tuple[torch.nn.Module, dict]:
    """The network of a baseline folder (float32, CPU, eval mode) and its ``baseline.json``."""
    folder = Path(folder)
    meta = read_meta(folder)
    if not zoo.is_builtin(meta["arch"]):
        model = zoo.build(meta["arch"], meta.get("arch_args"))
        zoo.load_state_strict(model, read_state_dict(folder / WEIGHTS_FILE), source=str(folder / WEIGHTS_FILE))
        return model.eval(), meta
    model = build_resnet(meta["arch"], num_classes=int(meta.get("num_classes", 0)),
                         in_channels=int(meta["in_channels"]), small_input=bool(meta["small_input"]))
    load_resnet_weights(model, read_state_dict(folder / WEIGHTS_FILE), source=str(folder / WEIGHTS_FILE))
    return model.eval(), meta


def input_transform(meta: dict):
    """Images in [-1, 1] -> what the network was trained on. Trained baselines see [-1, 1] as is; a
    pretrained one may carry per-channel ``input_mean``/``input_std`` for [0, 1] intensities (ImageNet's),
    an ``input_size`` the images are resized to (bilinear, antialiased when shrinking: weights trained at
    224 px see the image at about the scale they learned), and grey images are repeated to the channels of a
    model that expects more (``model_in_channels``)."""
    mean, std = meta.get("input_mean"), meta.get("input_std")
    repeat = int(meta.get("model_in_channels") or meta["in_channels"]) // int(meta["in_channels"])
    size = meta.get("input_size")
    if (mean is None or std is None) and repeat == 1 and not size:
        return lambda x: x
    m = s = None
    if mean is not None and std is not None:
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def apply(x: torch.Tensor) -> torch.Tensor:
        if size and tuple(x.shape[-2:]) != (size, size):
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                                antialias=size < x.shape[-1])
        if repeat > 1:
            x = x.repeat(1, repeat, 1, 1)
        return x if m is None else ((x + 1) / 2 - m.to(x.device)) / s.to(x.device)

    return apply


class CNNEncoder(Encoder):
    """Features of a frozen baseline (a built-in ResNet, or a torchvision / timm / ``<module>:<callable>``
    model): one column per layer, ``timestep`` None. Layers: any ``named_modules()`` paths; by default
    ``layer1``..``layer4`` of a built-in ResNet, ``zoo.default_layers`` of any other model.
    ``kind`` is the baseline's kind (supervised, simclr, pretrained)."""

    def __init__(
        self,
        checkpoint: str | Path,
        layers: Sequence[str] | str | None = None,
        name: str | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.checkpoint = str(checkpoint)
        model, meta = load_baseline(checkpoint)
        self.meta = meta
        self.name = name or meta.get("name") or Path(checkpoint).parent.name
        self.kind = meta["kind"]
        self.device = torch.device(device)
        self.model = model.to(self.device).requires_grad_(False)
        self._transform = input_transform(meta)
        self._autocast = precision == "bf16" and self.device.type == "cuda"
        if precision == "bf16" and not self._autocast:
            warnings.warn(f"precision bf16 applies on CUDA only; running fp32 on {self.device}", stacklevel=2)
        if layers is None:
            layers = list(DEFAULT_LAYERS) if zoo.is_builtin(meta["arch"]) else zoo.default_layers(model)
        elif isinstance(layers, str):
            layers = [layers]
        self.layers = list(layers)
        self.in_channels = int(meta["in_channels"])
        size = int(meta.get("input_size") or meta.get("image_size") or 32)  # what the network is given
        model_in = int(meta.get("model_in_channels") or self.in_channels)
        example = torch.zeros((1, model_in, size, size), device=self.device)
        self._hooks = PooledFeatureHooks(self.model, self.layers, example)
        self._columns = [
            FeatureColumn(column=layer, layer=layer, timestep=None, dim=self._hooks.dim(layer),
                          resolution=self._hooks.resolution(layer))
            for layer in self.layers
        ]

    @property
    def columns(self) -> list[FeatureColumn]:
        return list(self._columns)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, image_ids: Sequence[str]) -> dict[str, np.ndarray]:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"images must have shape (B, {self.in_channels}, H, W) for this baseline, "
                             f"got {tuple(images.shape)}")
        if len(image_ids) != images.shape[0]:
            raise ValueError(f"{len(image_ids)} image ids for {images.shape[0]} images")
        x = self._transform(images.to(self.device, torch.float32))
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self._autocast else contextlib.nullcontext()
        with amp:
            feats = self._hooks(x)
        return {c.column: feats[c.layer].to(torch.float16).cpu().numpy() for c in self._columns}
