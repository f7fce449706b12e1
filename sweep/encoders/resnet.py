"""ResNet-18/34/50 with torchvision's exact module names and state-dict keys, plus a small-image stem.

torchvision is not a dependency (its wheels pin one torch build each), so the architecture is written out here.
Module paths and parameter/buffer names are those of ``torchvision.models.resnet`` (``conv1``, ``bn1``,
``relu``, ``maxpool``, ``layer1``..``layer4`` of ``BasicBlock``/``Bottleneck`` blocks with ``conv1``/``bn1``/
``conv2``/``bn2`` [``conv3``/``bn3``] and ``downsample.0``/``downsample.1``, ``avgpool``, ``fc``), so weight
files saved by torchvision or timm load unchanged, and the layers users name for feature extraction are the
familiar ones. If torchvision happens to be importable it is not needed either: this module is the one source.

Two departures, both opt-in and both recorded next to saved weights:

- ``in_channels`` 1 or 3. A 3-channel weight file loads into a 1-channel model by summing ``conv1``'s
  weights over the input channels (a grey image replicated to RGB gives the same ``conv1`` output), and a
  1-channel file into a 3-channel model by spreading the weights equally over the channels.
- ``small_input=True``: the stem is a 3x3 convolution with stride 1 and no max-pool (``maxpool`` is an
  ``nn.Identity``, so no key changes; ``conv1.weight`` is (64, C, 3, 3) instead of (64, C, 7, 7)). The
  ImageNet stem divides the side by 4 before ``layer1``: a 32 px image would reach ``layer4`` at 1x1. This
  is the usual CIFAR-style stem; the baselines use it for images of at most 64 px (``SMALL_INPUT_MAX``).

``num_classes=0`` builds a backbone without a classifier (``fc`` is an ``nn.Identity``, as in timm), whose
state dict has no ``fc.*`` keys: the SimCLR and feature-only baselines are saved that way.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

SMALL_INPUT_MAX = 64  # images of at most this side get the small stem by default

ARCHS: dict[str, tuple[str, list[int]]] = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
}


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        small_input: bool = False,
    ):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no classifier), got {num_classes}")
        self.in_channels = in_channels
        self.small_input = bool(small_input)
        self.inplanes = 64
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = 512 * block.expansion
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

        # torchvision's initialisation (zero_init_residual=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled, flattened output of ``avgpool``: (B, num_features)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def build_resnet(arch: str = "resnet18", num_classes: int = 1000, in_channels: int = 3,
                 small_input: bool = False) -> ResNet:
    """A randomly initialised ResNet (``arch`` one of ``ARCHS``)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    kind, layers = ARCHS[arch]
    block = BasicBlock if kind == "basic" else Bottleneck
    return ResNet(block, layers, num_classes=num_classes, in_channels=in_channels, small_input=small_input)


def default_small_input(image_size: int) -> bool:
    return image_size <= SMALL_INPUT_MAX


# ---------------------------------------------------------------------------------------- weight files

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weight file: ``.safetensors`` or a torch file (``.pt``/``.pth``/``.bin``) holding a state
    dict, possibly wrapped (``{"state_dict": ...}``, ``{"model": ...}``) and possibly saved from a DDP model
    (``module.`` prefix). Loaded on the CPU; torch files with ``weights_only=True`` (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Mapping = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
                state = state[wrapper]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    out = {}
    for k, v in state.items():
        out[k.removeprefix("module.")] = v
    return out


def infer_layout(state: Mapping[str, torch.Tensor]) -> dict:
    """What a ResNet state dict implies: ``in_channels``, ``small_input`` (3x3 stem), ``num_classes`` (0
    without ``fc``) and ``arch`` (from the block layout)."""
    if "conv1.weight" not in state:
        raise ValueError("not a torchvision/timm ResNet state dict: no 'conv1.weight' key")
    w = state["conv1.weight"]
    blocks = []
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        idx = {int(k.split(".")[1]) for k in state if k.startswith(f"{layer}.") and k.split(".")[1].isdigit()}
        blocks.append(max(idx) + 1 if idx else 0)
    bottleneck = "layer1.0.conv3.weight" in state
    arch = next((name for name, (kind, layers) in ARCHS.items()
                 if layers == blocks and (kind == "bottleneck") == bottleneck), None)
    return {
        "in_channels": int(w.shape[1]),
        "small_input": tuple(w.shape[2:]) == (3, 3),
        "num_classes": int(state["fc.weight"].shape[0]) if "fc.weight" in state else 0,
        "arch": arch,
    }


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """``conv1.weight`` for another number of input channels: 3 -> 1 sums over the channels; 1 -> C spreads
    the weights evenly (each input channel gets weight / C)."""
    have = weight.shape[1]
    if have == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    if have == 1:
        return weight.repeat(1, in_channels, 1, 1) / in_channels
    raise ValueError(f"cannot adapt conv1 from {have} to {in_channels} input channels")


def fitted_resnet_state(model: ResNet, state: Mapping[str, torch.Tensor], source: str = "weights") -> dict:
    """``state`` (torchvision/timm format) as ``model`` loads it, or ValueError naming what does not fit:
    ``conv1`` adapted to the model's input channels, a classifier the model lacks (``num_classes=0``)
    dropped; a classifier the model has must be in the file. Loads nothing (``model`` may be on the meta
    device)."""
    state = dict(state)
    held = tuple(state["conv1.weight"].shape) if "conv1.weight" in state else None
    if "conv1.weight" in state:
        state["conv1.weight"] = adapt_input_conv(state["conv1.weight"], model.in_channels)
    if model.num_classes == 0:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"{source}: state dict does not match {type(model).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            hint, shape = "", tuple(state[k].shape)
            if k == "conv1.weight":  # the file's shape, not the one adapted to the model's channels
                shape = held
                hint = (f" (its input channels are adapted to the model's {model.in_channels}; a 7x7 stem is "
                        f"small_input: false, a 3x3 stem small_input: true)")
            raise ValueError(f"{source}: {k} has shape {shape}, the model needs {tuple(v.shape)}{hint}")
    return state


def load_resnet_weights(model: ResNet, state: Mapping[str, torch.Tensor], source: str = "weights") -> None:
    """Load a torchvision/timm-format state dict into ``model`` strictly (every key, every shape), adapting
    ``conv1`` to the model's input channels (`fitted_resnet_state`)."""
    model.load_state_dict(fitted_resnet_state(model, state, source), strict=True)
