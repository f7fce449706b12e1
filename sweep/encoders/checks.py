"""Checks of a pipeline's encoder settings that need the model's architecture: the module paths in
`extract.layers` / `baselines[].layers` and the timesteps against a checkpoint's noise schedule.

They run before any stage starts work (and in `sweep validate`), so that a typo in a layer name is a config
error naming its key at once, not a failure of the extract stage after minutes of pretraining. The models
are built on PyTorch's meta device: names and structure only, no memory, no weights read.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from sweep.config import ConfigError, PipelineConfig


def _local_unet_config(folder: str) -> tuple[dict, dict] | None:
    """(U-Net config, scheduler config or {}) of a local diffusers folder in either layout; None when the
    folder is remote or holds no U-Net config (the extract stage reports that with its own hint)."""
    if "://" in folder:
        return None
    root = Path(folder)
    for unet_dir, sched_dir in ((root, root), (root / "unet", root / "scheduler")):
        if (unet_dir / "config.json").is_file():
            sched = sched_dir / "scheduler_config.json"
            return (json.loads((unet_dir / "config.json").read_text()),
                    json.loads(sched.read_text()) if sched.is_file() else {})
    return None


def _diffusion_architecture(config: PipelineConfig, checkpoint: str | None):
    """The U-Net (on the meta device) that the extract stage will load for a diffusion encoder, with the
    number of training timesteps of a checkpoint folder's schedule (None for the U-Net `pretrain` builds:
    the config checks its own schedule); None where the U-Net is not known before the stage runs."""
    import torch
    from diffusers import UNet2DModel

    from sweep.encoders.diffusion import build_unet

    folder = checkpoint or config.pretrain.init_from  # else: the U-Net `pretrain` trains from pretrain.model
    with torch.device("meta"):
        if folder is None:
            m = config.pretrain.model
            return build_unet(config.data.image_size, config.data.channels, m.block_out_channels,
                              m.layers_per_block, m.attention), None
        found = _local_unet_config(folder)
        if found is None:
            return None
        unet_config, scheduler_config = found
        try:
            unet = UNet2DModel.from_config(unet_config)
        except Exception:  # noqa: BLE001 - not this check's business: the extract stage reports a bad folder
            return None
        return unet, int(scheduler_config.get("num_train_timesteps", 1000))


def _check_diffusion(config: PipelineConfig, checkpoint: str | None, where: str) -> None:
    from sweep.encoders.diffusion import resolve_layers

    built = _diffusion_architecture(config, checkpoint)
    if built is None:
        return
    unet, num_train_timesteps = built
    try:
        resolve_layers(unet, config.extract.layers)
    except ValueError as e:
        raise ConfigError(f"extract.layers: {e} ({where})") from None
    late = [t for t in config.extract.timesteps if num_train_timesteps is not None and t >= num_train_timesteps]
    if late:
        raise ConfigError(f"extract.timesteps: {late} not below {num_train_timesteps}, the number of training "
                          f"timesteps of {where}'s noise schedule")


def _check_baseline(config: PipelineConfig, index: int) -> None:
    import torch

    from sweep.encoders import zoo
    from sweep.encoders.base import unknown_module_error
    from sweep.encoders.resnet import build_resnet

    b = config.baselines[index]
    if not zoo.is_builtin(b.arch):
        # an external arch is built (imports and all) by the stages only; its package must be here at least
        module = b.arch.partition(":")[0]
        if importlib.util.find_spec(module.split(".")[0]) is None:
            raise ConfigError(f"baselines.{index}.arch: {b.arch!r} needs the Python module {module!r}, which is "
                              f"not installed in this environment ({sys.executable})")
        return
    if not b.layers:
        return  # the default layers
    with torch.device("meta"):
        model = build_resnet(b.arch, num_classes=0, in_channels=config.data.channels)
    modules = dict(model.named_modules())
    for name in b.layers:
        if name not in modules:
            raise ConfigError(f"baselines.{index}.layers: {unknown_module_error(model, name)}")


def check_encoder_settings(config: PipelineConfig) -> None:
    """Raise ConfigError (naming the key) when an encoder the pipeline extracts cannot give the requested
    layers or timesteps."""
    names = {b.name: i for i, b in enumerate(config.baselines)}
    for spec in config.encoder_specs():
        if spec.kind == "diffusion":
            where = f"the U-Net at {spec.checkpoint}" if spec.checkpoint else (
                f"the U-Net of pretrain.init_from ({config.pretrain.init_from})" if config.pretrain.init_from
                else "the U-Net of pretrain.model")
            _check_diffusion(config, spec.checkpoint, where)
        elif spec.name in names:
            _check_baseline(config, names[spec.name])
