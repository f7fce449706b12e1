"""Checks of a pipeline's encoder settings that need the model's architecture: the module paths in
`extract.layers` / `baselines[].layers`, the timesteps against a checkpoint's noise schedule, and a pretrained
baseline's weights file against its arch.

They run before any stage starts work (and in `sweep validate`), so that a typo in a layer name is a config
error naming its key at once, not a failure of the extract stage after minutes of pretraining. The models
are built on PyTorch's meta device: names and structure only, no memory; of the weights, a pretrained
baseline's file is read to compare its keys and shapes with the model (nothing is loaded into it).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from sweep.config import ConfigError, PipelineConfig


def local_unet_config(folder: str) -> tuple[dict, dict] | None:
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
        found = local_unet_config(folder)
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


def _baseline_architecture(config: PipelineConfig, index: int):
    """Baseline `index`'s model as the baselines stage builds it, on the meta device; for a pretrained
    baseline, its weights file checked against it by the stage's own checks (`zoo.pretrained_model`: the
    ResNet layout against `arch`, the factory, every key and shape) and ConfigError naming the setting to fix.
    None where the model is not known before the stage runs (its module does not import here)."""
    import torch

    from sweep.encoders import zoo
    from sweep.encoders.resnet import build_resnet, read_state_dict

    b = config.baselines[index]
    if not zoo.is_builtin(b.arch):
        # an external arch is built (imports and all) by the stages; its package must be here at least
        module = b.arch.partition(":")[0]
        if importlib.util.find_spec(module.split(".")[0]) is None:
            raise ConfigError(f"baselines.{index}.arch: {b.arch!r} needs the Python module {module!r}, which is "
                              f"not installed in this environment ({sys.executable})")
    if b.kind != "pretrained":
        with torch.device("meta"):
            return build_resnet(b.arch, num_classes=0, in_channels=config.data.channels)
    if not Path(b.weights).is_file():
        return None  # a cluster's file (`sweep submit`): checked there
    try:
        state = read_state_dict(b.weights)
    except Exception as e:  # noqa: BLE001 - the stage would stop at the same read
        raise ConfigError(f"baselines.{index}.weights: {b.weights} cannot be read: {type(e).__name__}: {e}") from None
    try:
        with torch.device("meta"):
            model, _, _ = zoo.pretrained_model(b.arch, b.arch_args, state, config.data.channels, b.small_input,
                                               source=b.weights)
    except zoo.ArchImportError:
        return None  # found but not importable here: the stage says why, where it builds the model
    except zoo.ArchError as e:
        raise ConfigError(f"baselines.{index}.{e.key}: {e}") from None
    except Exception as e:  # noqa: BLE001
        if not zoo.is_builtin(b.arch):
            return None  # a factory that cannot build on the meta device: the stage builds it
        raise ConfigError(f"baselines.{index}.weights: {b.weights}: {type(e).__name__}: {e}") from None
    return model


def _check_baseline(config: PipelineConfig, index: int, layers: bool = True) -> None:
    from sweep.encoders.base import unknown_module_error

    b = config.baselines[index]
    model = _baseline_architecture(config, index)
    if model is None or not layers or not b.layers:
        return  # unknown here, or the default layers
    modules = dict(model.named_modules())
    for name in b.layers:
        if name not in modules:
            raise ConfigError(f"baselines.{index}.layers: {unknown_module_error(model, name)}")


def check_encoder_settings(config: PipelineConfig, stages: tuple[str, ...] | list[str] = ("baselines", "extract")) \
        -> None:
    """Raise ConfigError (naming the key) when an encoder the pipeline extracts cannot give the requested
    layers or timesteps, or a pretrained baseline's weights do not fit its arch. `stages`: those about to
    run: the baselines stage builds every baseline, extract needs the layers of those it extracts."""
    if "extract" in stages:
        for spec in config.encoder_specs():
            if spec.kind == "diffusion":
                where = f"the U-Net at {spec.checkpoint}" if spec.checkpoint else (
                    f"the U-Net of pretrain.init_from ({config.pretrain.init_from})" if config.pretrain.init_from
                    else "the U-Net of pretrain.model")
                _check_diffusion(config, spec.checkpoint, where)
    extracted = {s.name for s in config.encoder_specs()} if "extract" in stages else set()
    for i, b in enumerate(config.baselines):
        if "baselines" in stages or b.name in extracted:
            _check_baseline(config, i, layers=b.name in extracted)


def planned_columns(config: PipelineConfig) -> dict[str, int | None]:
    """The feature columns each encoder the pipeline extracts will have (one probe trial each), from its
    architecture as `check_encoder_settings` builds it; None where that is not known before the stages run
    (a checkpoint folder elsewhere, a model whose module does not import here)."""
    from sweep.encoders import zoo
    from sweep.encoders.cnn import DEFAULT_LAYERS
    from sweep.encoders.diffusion import resolve_layers

    index = {b.name: i for i, b in enumerate(config.baselines)}
    planned: dict[str, int | None] = {}
    for spec in config.encoder_specs():
        if spec.kind == "diffusion":
            built = _diffusion_architecture(config, spec.checkpoint)
            planned[spec.name] = None if built is None else \
                len(resolve_layers(built[0], config.extract.layers)) * len(config.extract.timesteps)
            continue
        i = index.get(spec.name)
        b = config.baselines[i] if i is not None else None
        if b is None:
            planned[spec.name] = None  # a baseline folder named by extract.encoders[].checkpoint only
        elif b.layers:
            planned[spec.name] = len(b.layers)
        elif zoo.is_builtin(b.arch):
            planned[spec.name] = len(DEFAULT_LAYERS)
        else:
            model = _baseline_architecture(config, i)
            planned[spec.name] = None if model is None else len(zoo.default_layers(model))
    return planned
