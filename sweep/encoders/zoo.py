"""Architectures for `pretrained` baselines: the built-in ResNets, any torchvision or timm model, or any
factory callable, built WITHOUT weights (the weights always come from the local file the user names).

``arch`` forms:

- ``resnet18`` / ``resnet34`` / ``resnet50``: the built-in ResNets (`sweep.encoders.resnet`), which read
  torchvision- and timm-format ResNet weights and need neither package.
- ``torchvision:<name>``: ``torchvision.models.get_model(name, weights=None)``, e.g.
  ``torchvision:convnext_tiny``.
- ``timm:<name>``: ``timm.create_model(name, pretrained=False)``, e.g. ``timm:efficientnet_b0``.
- ``<module>:<callable>``: ``import module; callable()`` returns an ``nn.Module``, for architectures of
  your own (``mylab.nets:plankton_cnn``).

torchvision and timm are optional: they are imported only for the forms that name them, and a missing or
broken install is reported with the baseline's ``arch``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a model is built: checking a config needs no torch
    from torch import nn

BUILTIN = ("resnet18", "resnet34", "resnet50")
_CLASSIFIER_NAMES = {"fc", "classifier", "head", "heads", "last_linear"}


class ArchError(ValueError):
    """What does not fit; ``key``: the baseline setting to fix (``arch``, or ``weights`` for a file whose keys or
    shapes are not the architecture's)."""

    def __init__(self, message: str, key: str = "arch"):
        super().__init__(message)
        self.key = key


class ArchImportError(ArchError):
    """The arch's module does not import here (`sweep validate` leaves that to the stage that builds it)."""


def is_builtin(arch: str) -> bool:
    return arch in BUILTIN


def check_arch(arch: str) -> str:
    """Syntax of an ``arch`` value (what a config file can be checked for without importing anything)."""
    if is_builtin(arch):
        return arch
    provider, sep, name = arch.partition(":")
    if not sep or not provider or not name or any(c.isspace() for c in arch):
        raise ArchError(f"arch {arch!r}: expected one of {', '.join(BUILTIN)}, torchvision:<model name>, "
                        f"timm:<model name> or <module>:<callable>")
    return arch


def _import(module: str, arch: str):
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - ImportError, or a binary that does not match this torch
        hint = (" (install the torchvision release built for your torch, e.g. torch 2.14.1 with torchvision "
                "0.29.1)" if module.split(".")[0] in ("torchvision", "timm") else "")
        raise ArchImportError(f"arch {arch!r} needs the Python module {module!r}, which cannot be imported here: "
                        f"{type(e).__name__}: {e}{hint}") from e


def build(arch: str, kwargs: dict | None = None) -> nn.Module:
    """The architecture named by ``arch`` (not a built-in ResNet), randomly initialised, in eval mode;
    ``kwargs`` go to the constructor (``img_size=32`` for a timm ViT, ``num_classes=...``)."""
    from torch import nn

    check_arch(arch)
    kwargs = dict(kwargs or {})
    provider, _, name = arch.partition(":")
    if provider == "torchvision":
        models = _import("torchvision.models", arch)
        try:
            model = models.get_model(name, weights=None, **kwargs)
        except (ValueError, TypeError) as e:
            raise ArchError(f"arch {arch!r}: {e}") from e
    elif provider == "timm":
        timm = _import("timm", arch)
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except (RuntimeError, TypeError) as e:  # timm: "Unknown model (...)"
            raise ArchError(f"arch {arch!r}: {e}") from e
    else:
        factory = getattr(_import(provider, arch), name, None)
        if not callable(factory):
            raise ArchError(f"arch {arch!r}: module {provider!r} has no callable {name!r}")
        try:
            model = factory(**kwargs)
        except TypeError as e:
            raise ArchError(f"arch {arch!r}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ArchError(f"arch {arch!r} built a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def input_channels(model: nn.Module) -> int:
    """Channels the model's first convolution (a ViT's patch embedding is one too) expects."""
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    raise ArchError(f"{type(model).__name__}: no Conv2d found, cannot tell how many input channels it expects")


def default_layers(model: nn.Module) -> list[str]:
    """Layers probed when the baseline lists none: timm's own feature stages (``feature_info``), else the
    model's top-level children minus its classifier (fc/classifier/head, linear, dropout, flatten), with a
    torchvision-style ``features`` trunk (VGG, EfficientNet, MobileNet, ConvNeXt, DenseNet) split into its
    stages ``features.0``, ``features.1``, ... A global average pool (``avgpool``) is left out: its output
    is the spatial mean of the layer before it, which that layer's column already holds (columns are
    spatially mean-pooled)."""
    from torch import nn

    info = getattr(model, "feature_info", None)
    if info is not None:
        try:
            names = [f["module"] for f in info]
        except (TypeError, KeyError):
            names = []
        modules = dict(model.named_modules())
        names = [n for n in names if n in modules and n]
        if names:
            return list(dict.fromkeys(names))
    names = []
    for n, m in model.named_children():
        if n in _CLASSIFIER_NAMES or isinstance(m, (nn.Linear, nn.Dropout, nn.Flatten, nn.Identity)):
            continue
        if names and isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
            continue  # the previous layer's column, again
        if n == "features" and isinstance(m, nn.Sequential) and len(m) > 1:
            names += [f"features.{k}" for k, _ in m.named_children()]
        else:
            names.append(n)
    if not names:
        raise ArchError(f"{type(model).__name__}: no default layers; list module paths in the baseline's `layers`")
    return names


def check_state(model: nn.Module, state: dict, source: str) -> None:
    """ArchError (key ``weights``) unless ``state`` has every key and every shape of ``model`` (a classifier
    included) and no other key. Loads nothing: ``model`` may be on the meta device."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ArchError(f"{source}: state dict does not match {type(model).__name__}: "
                        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                        f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}", key="weights")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ArchError(f"{source}: {k} has shape {tuple(state[k].shape)}, the model needs {tuple(v.shape)}",
                            key="weights")


def load_state_strict(model: nn.Module, state: dict, source: str) -> None:
    """Every key and every shape of ``model`` from ``state`` (a classifier included), or a clear error."""
    check_state(model, state, source)
    model.load_state_dict(state, strict=True)


def pretrained_model(arch: str, arch_args: dict | None, state: dict, channels: int, small_input: bool | None,
                     source: str) -> tuple[nn.Module, dict, dict]:
    """A pretrained baseline's model for the state dict ``state`` (read from ``source``) and images of
    ``channels`` channels: (model, the state to load into it, what baseline.json records: ``small_input``,
    ``num_classes``, ``model_in_channels`` for a non-built-in arch). Every check of the weights against the
    arch is made here, nothing is loaded: the baselines stage loads the state, `sweep validate` builds the
    model on the meta device to find a mismatch before any stage runs. ArchError naming what does not fit."""
    if not is_builtin(arch):
        model = build(arch, arch_args)
        check_state(model, state, source)
        model_in = input_channels(model)
        if model_in != channels and channels != 1:  # grey images are repeated to the model's channels
            raise ArchError(f"{arch} takes {model_in}-channel images, the data has {channels} (data.channels)")
        return model, state, {"small_input": None, "num_classes": None, "model_in_channels": model_in}
    from sweep.encoders.resnet import build_resnet, fitted_resnet_state, infer_layout

    try:
        layout = infer_layout(state)
    except ValueError as e:
        raise ArchError(f"{source}: {e}", key="weights") from None
    if layout["arch"] and layout["arch"] != arch:
        raise ArchError(f"arch is {arch} but {source} holds a {layout['arch']}")
    small = layout["small_input"] if small_input is None else bool(small_input)
    model = build_resnet(arch, num_classes=layout["num_classes"], in_channels=channels, small_input=small)
    try:
        fitted = fitted_resnet_state(model, state, source)
    except ValueError as e:
        raise ArchError(str(e), key="weights") from None
    return model, fitted, {"small_input": small, "num_classes": layout["num_classes"]}
