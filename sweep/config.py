"""Pydantic models of a pipeline YAML, `--set KEY=VALUE` overrides and the config hash.

Every stage reads one `PipelineConfig`. Unknown keys are errors (a typo must not silently fall back to a
default), and every error names the dotted key that is wrong.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


class ConfigError(ValueError):
    """An invalid pipeline file or override; the CLI turns it into exit code 2."""


class ArgumentError(ConfigError):
    """A command-line argument that does not fit the pipeline (exit 2, like an invalid config)."""


class _Model(BaseModel):
    # no NaN or infinity in any number: a NaN compares false (the grids' `x <= 0` let it through) and
    # infinity passes any lower bound
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, v, info):
        """A number is not a boolean: YAML reads true/yes/on as one, and pydantic took it for 1 (`epochs: yes`
        trained one epoch, `timesteps: [true]` was timestep 1)."""
        if _wants_number(cls.model_fields[info.field_name].annotation):
            for i, item in enumerate(v) if isinstance(v, list) else [(None, v)]:
                if isinstance(item, bool):
                    # a scalar's value is shown by the error formatting, a list item's here
                    raise ValueError("expected a number, not a boolean" if i is None else
                                     f"item {i}: expected a number, not a boolean (got {item})")
        return v


def _wants_number(annotation) -> bool:
    """Whether a field holds numbers (int, float, a Literal of ints; in a list or union), and no booleans."""
    import typing

    leaves, stack = set(), [annotation]
    while stack:
        t = stack.pop()
        if typing.get_origin(t) is Literal:
            leaves |= {type(a) for a in typing.get_args(t)}
        elif typing.get_args(t):
            stack.extend(typing.get_args(t))
        else:
            leaves.add(t)
    return bool(leaves & {int, float}) and bool not in leaves and Any not in leaves


def _is_remote(path: str) -> bool:
    return "://" in path


# Off while `sweep submit` validates a pipeline for a cluster: its data and checkpoints may exist only there.
_CHECK_LOCAL_PATHS: contextvars.ContextVar[bool] = contextvars.ContextVar("check_local_paths", default=True)


def _missing(path: str, kind: Literal["file", "folder", "path"]) -> bool:
    """Whether a local `path` that must exist does not (never for a remote one, or while paths are not
    checked)."""
    if _is_remote(path) or not _CHECK_LOCAL_PATHS.get():
        return False
    p = Path(path)
    return not (p.is_file() if kind == "file" else p.is_dir() if kind == "folder" else p.exists())


def _home(path: str | None) -> str | None:
    """A local path with a leading `~` expanded, as a shell would; storage and data paths were, checkpoints,
    weights and split files were not ("checkpoint folder does not exist: ~/..."). Validators assign it only to a
    path starting with `~`: an assignment validates the model again (`validate_assignment`), which recursed."""
    return os.path.expanduser(path) if path and path.startswith("~") else path


def not_utf8(path, e: UnicodeDecodeError) -> str:
    """The message for a text file that is not UTF-8 (a spreadsheet's Latin-1 export, say)."""
    return f"{path} is not UTF-8 text (byte {e.object[e.start]:#x} at position {e.start}): save it as UTF-8"


def _diffusers_folder(path: str | None) -> str | None:
    """A local diffusers U-Net folder must exist and hold its config.json (itself or in unet/)."""
    if path == "":  # not None: the checks of the U-Net pretrain builds looked for None and were skipped
        raise ValueError("an empty path: leave the key out (or null) for none")
    path = _home(path)
    if path and _missing(path, "folder"):
        raise ValueError(f"checkpoint folder does not exist: {path}")
    if path and not _is_remote(path) and _CHECK_LOCAL_PATHS.get() \
            and not any((Path(path) / sub / "config.json").is_file() for sub in ("", "unet")):
        raise ValueError(f"{path} holds no config.json (itself or in unet/): not a diffusers UNet2DModel folder")
    return path


def _state_dict_file_problem(path: str) -> str | None:
    """Why a local weights file is not one torch.save or safetensors wrote (its first bytes), or None. Loaded
    only in the baselines stage, after pretraining, such a file failed there with torch's advice to load it
    unsafely."""
    import zipfile

    p = Path(path)
    if not p.is_file():
        return None  # not checked here (`sweep submit`: it may exist only on the cluster)
    with p.open("rb") as f:
        head = f.read(9)
    if p.suffix.lower() == ".safetensors":
        n = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
        return None if 0 < n <= p.stat().st_size - 8 and head[8:9] == b"{" else "not a safetensors file"
    if zipfile.is_zipfile(p) or head[:1] == b"\x80":  # torch.save: a zip archive (legacy: a pickle)
        return None
    return "not a state dict file (torch.save's .pth/.pt or a .safetensors)"


def _safe_name(value: str, what: str) -> str:
    """Names become folder names and MLflow tag values: keep them to a safe alphabet, and start them with a
    letter, digit or '_' ('..' as an OOD dataset put its shards in the encoders' common folder, where each
    encoder overwrote the other's; a leading '.' makes a hidden folder, a leading '-' reads as an option)."""
    if not value or not all(c.isalnum() or c in "-_." for c in value) or not (value[0].isalnum() or value[0] == "_"):
        raise ValueError(f"{what} must be letters, digits, '-', '_' or '.', starting with a letter, digit or '_', "
                         f"got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------- data

class Splits(_Model):
    """Fractions (stratified per class by the pipeline seed) or files listing each split's members.

    A split file has one image per line, `IMAGE_ID [LABEL]` (IMAGE_ID as the source names it, e.g. the
    path relative to an imagefolder root). With files, `train` may be omitted: then every image that is
    in neither `val` nor `test` is a training image.
    """

    val: float | str = 0.15
    test: float | str = 0.15
    train: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "Splits":
        for name in ("val", "test", "train"):
            v = getattr(self, name)
            if isinstance(v, str) and v.startswith("~"):
                setattr(self, name, _home(v))
        fractions = [v for v in (self.val, self.test) if isinstance(v, float)]
        files = [v for v in (self.val, self.test, self.train) if isinstance(v, str)]
        if fractions and files:
            quoted = [v for v in files if v.replace(".", "", 1).isdigit()]
            raise ValueError("use either fractions (val: 0.15) or split files (val: path/val.txt), not both"
                             + (f"; {quoted[0]!r} is quoted: as text it names a file" if quoted else ""))
        for name in ("val", "test"):
            v = getattr(self, name)
            if isinstance(v, float) and not 0.0 <= v < 1.0:
                raise ValueError(f"{name} fraction must be in [0, 1), got {v}")
        if fractions and sum(fractions) >= 1.0:
            raise ValueError(f"val + test fractions must be below 1, got {sum(fractions)}")
        for f in files:
            if _missing(f, "file"):
                raise ValueError(f"split file does not exist: {f}")
        return self

    @property
    def from_files(self) -> bool:
        return isinstance(self.val, str) or isinstance(self.test, str)


Source = Literal["imagefolder", "manifest", "fashion-mnist", "demo"]


class DatasetSpec(_Model):
    """Where a dataset's images come from. `path` is required except for `demo` (the vendored plankton
    images) and `fashion-mnist` (default: Debian's dataset-fashion-mnist folder)."""

    name: str = "main"
    source: Source
    path: str | None = None
    limit: int | None = Field(None, ge=1, description="keep at most this many images (stratified sample)")

    _name = field_validator("name")(lambda v: _safe_name(v, "dataset name"))

    @model_validator(mode="after")
    def _path(self) -> "DatasetSpec":
        if self.source == "fashion-mnist" and self.path is None:
            self.path = DEFAULT_FASHION_MNIST
        if self.source in ("imagefolder", "manifest") and not self.path:
            raise ValueError(f"source {self.source!r} needs a path")
        if self.path and self.path.startswith("~"):
            self.path = _home(self.path)
        if self.path and _missing(self.path, "path"):
            hint = (" (apt-get install dataset-fashion-mnist puts the idx files there, or set path)"
                    if self.source == "fashion-mnist" else "")
            raise ValueError(f"path does not exist: {self.path}{hint}")
        return self


class TrainDataset(DatasetSpec):
    splits: Splits = Splits()
    regime: Literal["natural", "balanced"] = "natural"
    per_class: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _regime(self) -> "TrainDataset":
        if self.regime == "balanced" and self.per_class is None:
            raise ValueError("regime 'balanced' needs per_class (the cap of images per class)")
        return self


class OodDataset(DatasetSpec):
    """An evaluation-only dataset: named (its metrics are ood_<name>_acc ...), never "main" by default."""

    name: str


class DataConfig(_Model):
    image_size: int = Field(32, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    train: TrainDataset
    ood: list[OodDataset] = []

    @model_validator(mode="after")
    def _names(self) -> "DataConfig":
        names = [self.train.name] + [d.name for d in self.ood]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"dataset names must be unique, repeated: {sorted(dup)}")
        return self


# ------------------------------------------------------------------------------------------ pretrain

class UNetConfig(_Model):
    block_out_channels: list[int] = Field([32, 64, 64], min_length=1)
    # capped: diffusers' U-Nets use 1-3, and a typo of thousands hung `validate` building the model
    layers_per_block: int = Field(1, ge=1, le=32)
    attention: list[bool] = [False, False, True]

    @model_validator(mode="after")
    def _lengths(self) -> "UNetConfig":
        if len(self.attention) != len(self.block_out_channels):
            raise ValueError(
                f"attention has {len(self.attention)} entries but block_out_channels has "
                f"{len(self.block_out_channels)}: give one per level"
            )
        if any(c < 1 for c in self.block_out_channels):
            raise ValueError("block_out_channels must be positive")
        return self


class SchedulerConfig(_Model):
    num_train_timesteps: int = Field(1000, ge=1)
    beta_schedule: Literal["linear", "cosine"] = "linear"


class PretrainConfig(_Model):
    model: UNetConfig = UNetConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    init_from: str | None = None
    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2.0e-4, gt=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="gradient norm clip; null: none")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    checkpoint_every: int = Field(100, ge=1)
    max_failures: int = Field(0, ge=-1, description="worker failures Ray Train recovers from (-1: no limit)")
    workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    augment: bool = True
    sample_grid: int = Field(16, ge=0, description="generated samples logged to MLflow at the end; 0 = none")
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = Field(
        "none", description="torch.compile mode of the U-Net's training forward on GPU workers (CPU workers run "
                            "eager); reduce-overhead: CUDA graphs, for the launch-bound steps of a small U-Net")

    @field_validator("init_from")
    @classmethod
    def _init_from(cls, v: str | None) -> str | None:
        return _diffusers_folder(v)


# ----------------------------------------------------------------------------------------- baselines

_TRAINED = ("supervised", "simclr")
# the baseline settings that only some kinds read (`weights`: pretrained, checked with its file)
_KIND_ONLY = {**dict.fromkeys(("epochs", "batch_size", "lr", "weight_decay", "checkpoint_every"), _TRAINED),
              "temperature": ("simclr",), "projection_dim": ("simclr",), "normalize": ("pretrained",),
              "input_size": ("pretrained",)}


class BaselineConfig(_Model):
    name: str
    kind: Literal["supervised", "simclr", "pretrained"]
    arch: str = Field("resnet18", description="resnet18 | resnet34 | resnet50; a pretrained baseline also takes "
                                              "torchvision:<name>, timm:<name> or <module>:<callable>")
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1.0e-3, gt=0)
    weight_decay: float = Field(1.0e-4, ge=0)
    small_input: bool | None = Field(None, description="3x3 stride-1 stem, no max-pool; default: image_size <= 64 "
                                                       "(pretrained: from the weights)")
    temperature: float = Field(0.5, gt=0, description="SimCLR NT-Xent temperature")
    projection_dim: int = Field(128, ge=1, description="SimCLR projection head output size")
    checkpoint_every: int = Field(1, ge=1, description="epochs between Ray Train checkpoints")
    normalize: Literal["none", "imagenet"] | None = Field(None, description="default: imagenet for pretrained, "
                                                                           "none otherwise")
    weights: str | None = None
    arch_args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of a torchvision: / "
                                      "timm: / <module>:<callable> arch (e.g. {img_size: 32} for a timm ViT)")
    layers: list[str] | None = None
    input_size: int | None = Field(None, ge=8, description="pretrained: the side images are resized to before "
                                                          "the network (e.g. 224 for ImageNet weights); default: "
                                                          "data.image_size")

    _name = field_validator("name")(lambda v: _safe_name(v, "baseline name"))

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[str] | None) -> list[str] | None:
        # as extract.layers: a name given twice made two columns of one name, refused at extract
        dupes = sorted({n for n in v if v.count(n) > 1}) if v else []
        if dupes:
            raise ValueError(f"module path(s) given twice: {dupes}")
        return v

    @model_validator(mode="after")
    def _weights(self) -> "BaselineConfig":
        if self.kind == "pretrained":
            if not self.weights:
                raise ValueError("a pretrained baseline needs weights: a local .pth/.pt/.safetensors file")
            if self.weights.startswith("file://"):  # a local file as a URI: the path it names
                from sweep.storage import file_path

                self.weights = file_path(self.weights)
            if self.weights.startswith("~"):
                self.weights = _home(self.weights)
            if _is_remote(self.weights):
                raise ValueError(f"weights must be a local file, not a URI: {self.weights}")
            if _missing(self.weights, "file"):
                raise ValueError(f"weights file not found: {self.weights}")
            problem = _state_dict_file_problem(self.weights)
            if problem:
                raise ValueError(f"weights {self.weights}: {problem}")
        elif self.weights:
            raise ValueError(f"weights is only for kind pretrained (this baseline is {self.kind})")
        # a setting the kind never reads is refused where given (the defaults are harmless): it was ignored
        unused: dict[tuple, list[str]] = {}
        for key, kinds in _KIND_ONLY.items():
            if key in self.model_fields_set and self.kind not in kinds:
                unused.setdefault(kinds, []).append(key)
        if unused:
            raise ValueError("; ".join(
                f"{', '.join(keys)} {'is' if len(keys) == 1 else 'are'} only for kind{'s' if len(kinds) > 1 else ''} "
                f"{' and '.join(kinds)} (this baseline is {self.kind})" for kinds, keys in unused.items()))
        from sweep.encoders import zoo  # imports no torch: only the arch's form is checked here

        if self.kind != "pretrained" and not zoo.is_builtin(self.arch):
            raise ValueError(f"arch {self.arch!r}: a {self.kind} baseline trains one of {', '.join(zoo.BUILTIN)}")
        if self.arch_args and zoo.is_builtin(self.arch):
            raise ValueError(f"arch_args is for torchvision: / timm: / <module>:<callable> archs, not {self.arch}")
        zoo.check_arch(self.arch)
        return self


# ------------------------------------------------------------------------------------------- extract

class EncoderSpec(_Model):
    """An encoder to extract: `diffusion` (the pretrained U-Net, or any diffusers UNet2DModel folder
    given as `checkpoint`) or the name of a baseline."""

    name: str
    kind: Literal["diffusion", "baseline"] = "diffusion"
    checkpoint: str | None = None

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, v: str | None) -> str | None:
        return _diffusers_folder(v)


class ExtractConfig(_Model):
    encoders: list[EncoderSpec | str] | None = Field(None, min_length=1)
    timesteps: list[int] = [0, 25, 50, 100, 200, 400]
    layers: Literal["blocks"] | list[str] = "blocks"
    batch_size: int = Field(64, ge=1)
    shard_size: int = Field(4096, ge=1, description="images per Parquet shard (the unit of resume)")
    actors: int = Field(1, ge=1, description="encoder actors (one model copy each)")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    timesteps_per_forward: int = Field(1, ge=1)
    max_bad_fraction: float = Field(0.01, ge=0, le=1)

    @field_validator("layers")
    @classmethod
    def _layers(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError('give "blocks" or at least one module path')
            dupes = sorted({n for n in v if v.count(n) > 1})
            if dupes:
                raise ValueError(f"module path(s) given twice: {dupes}")
        return v

    @field_validator("timesteps")
    @classmethod
    def _timesteps(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("give at least one timestep")
        if any(t < 0 for t in v) or len(set(v)) != len(v):
            raise ValueError(f"timesteps must be distinct and non-negative, got {v}")
        return v


# --------------------------------------------------------------------------------------------- probe

class AshaConfig(_Model):
    """Asynchronous successive halving across trials (Tune's ASHAScheduler over epochs, on `select`):
    every trial runs `grace_period` epochs; at each rung (grace_period x reduction_factor^k epochs) a
    trial outside the best 1 / reduction_factor of those that reached it so far stops there, and its
    result as of that epoch is recorded (tag `sweep.stopped_by=asha`)."""
    grace_period: int = Field(1, ge=1, description="epochs before any trial can be stopped")
    reduction_factor: float = Field(3.0, gt=1)


class ProbeConfig(_Model):
    # Adam step sizes on whitened features (sweep/probing/linear.py): 0.1-1 converge in a few epochs
    lrs: list[float] = [0.1, 0.3, 1.0]
    weight_decays: list[float] = [0.0, 1.0e-4, 1.0e-2]
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(1024, ge=1)
    class_weights: Literal["none", "balanced"] = "none"
    select: Literal["val_macro_f1", "val_acc"] = "val_macro_f1"
    patience: int | None = Field(None, ge=1)
    kmeans: bool = True
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    max_concurrent_trials: int | None = Field(None, ge=1)
    # off by default: a stopped column's cell of the heat map is a result of fewer epochs
    asha: AshaConfig | None = None

    @field_validator("lrs", "weight_decays")
    @classmethod
    def _grid(cls, v: list[float], info) -> list[float]:
        if not v:
            raise ValueError("the probe grid needs at least one value")
        if info.field_name == "lrs" and any(x <= 0 for x in v):
            raise ValueError(f"learning rates must be above 0, got {v}")
        if info.field_name == "weight_decays" and any(x < 0 for x in v):
            raise ValueError(f"weight decays must be 0 or more, got {v}")
        return v

    @model_validator(mode="after")
    def _asha_can_stop(self) -> "ProbeConfig":
        if self.asha is not None and self.asha.grace_period >= self.epochs:
            raise ValueError(f"asha.grace_period ({self.asha.grace_period}) must be below epochs ({self.epochs}): "
                             "ASHA would never stop a trial")
        return self

    def heads_each(self) -> str:
        """"9 heads each": the (lr, weight decay) heads a trial trains, as the stage and `validate` say it."""
        n = len(self.lrs) * len(self.weight_decays)
        return f"{n} head{'s' if n != 1 else ''} each"


# --------------------------------------------------------------------------------------------- top

class TrackingConfig(_Model):
    uri: str | None = None
    experiment: str | None = None

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v and "://" not in v and not v.startswith("databricks"):
            raise ValueError(f"{v!r} is not an MLflow tracking URI (no scheme): e.g. sqlite:///{v.lstrip('/')} "
                             f"for a SQLite file, http://HOST:5000 for a server")
        return v


class RayConfig(_Model):
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray (default: max(4, cores))")

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v:
            problem = ray_address_problem(v)
            if problem:
                raise ValueError(problem)
        return v


def ray_address_problem(address: str) -> str | None:
    """Why sweep cannot run on the cluster at `address`, or None: Ray Client (`ray://`) runs neither Ray Data's
    streaming executor nor Tune's callbacks on this side; a dashboard URL is for `sweep submit`."""
    scheme = address.split("://", 1)[0].lower() if "://" in address else ""
    if scheme == "ray":
        return (f"{address} is a Ray Client address, which sweep's stages cannot run through (Ray Data and Tune "
                f"callbacks fail there): run `sweep submit PIPELINE --address http://HEAD:8265`, or on a node of "
                f"the cluster with ray.address auto")
    if scheme in ("http", "https"):
        return (f"{address} is a dashboard URL: that is `sweep submit`'s --address; ray.address takes auto or "
                f"HOST:6379 (the cluster's GCS, from one of its nodes)")
    return None


# the probe's MLflow metric keys (DESIGN.md "Metrics"), besides ood_<dataset>_acc / ood_<dataset>_macro_f1
PROBE_METRICS = ("val_acc", "val_macro_f1", "test_acc", "test_macro_f1", "test_balanced_acc",
                 "kmeans_nmi", "kmeans_ari")


def metric_problem(metric: str, ood_names: list[str] | None = None) -> str | None:
    """Why `metric` is not a probe metric, or None when it is. With `ood_names`, an OOD metric must name
    one of those datasets."""
    if metric in PROBE_METRICS:
        return None
    for suffix in ("_acc", "_macro_f1"):
        dataset = metric.removeprefix("ood_").removesuffix(suffix)
        if metric.startswith("ood_") and metric.endswith(suffix) and dataset:
            if ood_names is None or dataset in ood_names:
                return None
            # ood_mixed_balanced_acc: an OOD dataset 'mixed' with a metric it does not have
            near = [f"ood_{d}_{rest}" for d in ood_names if dataset.startswith(f"{d}_")
                    for rest in ("acc", "macro_f1")]
            return (f"unknown metric {metric!r}: no OOD dataset {dataset!r} in data.ood "
                    f"({', '.join(ood_names) or 'none'})"
                    + (f"; an OOD dataset has accuracy and macro F1 only: {' or '.join(near)}" if near else ""))
    return (f"unknown metric {metric!r}; choose from {', '.join(PROBE_METRICS)} or ood_<dataset>_acc / "
            f"ood_<dataset>_macro_f1")


class ReportConfig(_Model):
    metric: str = "test_macro_f1"


STAGES = ("pretrain", "baselines", "extract", "probe", "report")

# Settings that decide where, how fast or how safely work runs, or what is logged on the side, not what it
# computes: changing them keeps a finished stage's output and the probe's runs (left out of the config hash;
# the pretrain part also of the U-Net's key). Device choices are among them: results agree bit for bit only
# on the same device anyway.
NOT_RESULTS = {
    "pretrain": {"workers", "use_gpu", "cpus_per_worker", "compile", "sample_grid", "checkpoint_every",
                 "max_failures"},
    "baselines": {"__all__": {"checkpoint_every"}},
    "extract": {"batch_size", "actors", "cpus_per_actor", "gpus_per_actor", "timesteps_per_forward",
                "max_bad_fraction"},
    "probe": {"cpus_per_trial", "gpus_per_trial", "max_concurrent_trials"},
}


# The linear probe's revision (sweep/probing/linear.py), part of the config hash: probe runs of an earlier
# revision are kept apart from today's, as results of other settings are. 1: sweep 0.1.0 until 2026-11-24.
# 2: with fewer training rows than dimensions, the directions they cannot span are left out of the heads
# (kept, their rounding noise, scaled up, made heads near chance on such columns), and an epoch
# is at least 10 steps (small training sets were one step a pass); every training row weighs the same (a
# short last minibatch's rows weighed more); macro F1 averages over the classes a split has (not every
# training class); k-means runs on the main dataset's images of every split (not the test split alone).
PROBE_REVISION = 2

# The settings that reach a probe run's result only through its encoder's feature store: the U-Net's
# training (pretrain), a baseline's (baselines) and how features are taken (extract). Runs of two configs
# that differ only in these, made on the same store (tag `sweep.features`), are the same results: the probe
# copies them instead of probing again (`PipelineConfig.probe_hash`).
ENCODER_SETTINGS = ("pretrain", "baselines", "extract")


class PipelineConfig(_Model):
    name: str
    seed: int = Field(0, ge=0, le=2**32 - 1)  # numpy's and torch's seed range
    storage: str | None = None
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    data: DataConfig
    pretrain: PretrainConfig = PretrainConfig()
    baselines: list[BaselineConfig] = []
    extract: ExtractConfig = ExtractConfig()
    probe: ProbeConfig = ProbeConfig()
    report: ReportConfig = ReportConfig()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _safe_name(v, "name")

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        if v and not _is_remote(v) and Path(v).expanduser().exists() and not Path(v).expanduser().is_dir():
            raise ValueError(f"{v} is a file, not a folder")
        return v

    @model_validator(mode="after")
    def _references(self) -> "PipelineConfig":
        names = [b.name for b in self.baselines]
        if len(set(names)) != len(names):
            raise ValueError(f"baselines: names must be unique, got {names}")
        if "diffusion" in names:
            raise ValueError("baselines: the name 'diffusion' is reserved for the pretrained U-Net")
        for i, enc in enumerate(self.extract.encoders or []):
            # kind baseline: a baseline of this pipeline, read from its baselines/<name>/final. A checkpoint
            # there had to be a diffusers folder to validate, then extract looked in it for baseline.json;
            # 'diffusion' validated and extract looked for baselines/diffusion
            if isinstance(enc, EncoderSpec) and enc.kind == "baseline" and enc.checkpoint:
                raise ValueError(
                    f"extract.encoders.{i}: checkpoint is for kind diffusion (a diffusers UNet2DModel folder); "
                    f"a baseline ({enc.name!r}) is read from its own baselines/{enc.name}/final: leave out "
                    f"checkpoint, or kind")
            if isinstance(enc, EncoderSpec) and enc.kind == "baseline" and enc.name == "diffusion":
                raise ValueError(f"extract.encoders.{i}: 'diffusion' is the pretrained U-Net, not a baseline "
                                 f"(baselines: {', '.join(names) or 'none configured'}): leave out kind")
            if isinstance(enc, EncoderSpec) and enc.kind == "diffusion" and not enc.checkpoint \
                    and enc.name != "diffusion":
                if "kind" in enc.model_fields_set or enc.name not in names:
                    # it would extract the pretrained U-Net again, under another name
                    raise ValueError(
                        f"extract.encoders.{i}: encoder {enc.name!r} has no checkpoint: name the pretrained "
                        f"U-Net 'diffusion', give a diffusers UNet2DModel folder as checkpoint, or name a "
                        f"baseline ({', '.join(names) or 'none configured'})")
                enc.kind = "baseline"  # {name: <a baseline>}: that baseline, as the plain name would be
            ref = enc if isinstance(enc, str) else (enc.name if enc.kind == "baseline" else None)
            if ref is not None and ref != "diffusion" and ref not in names:
                raise ValueError(
                    f"extract.encoders.{i}: unknown encoder {ref!r}; known: {['diffusion'] + names}"
                )
        problem = metric_problem(self.report.metric, [d.name for d in self.data.ood])
        if problem:
            raise ValueError(f"report.metric: {problem}")
        if self._trains_unet():
            levels = len(self.pretrain.model.block_out_channels)
            factor = 2 ** (levels - 1)
            if self.data.image_size % factor:
                raise ValueError(f"data.image_size: {self.data.image_size} is not a multiple of {factor}, which "
                                 f"the {levels} resolution levels of pretrain.model need (each halves the image)")
            steps = self.pretrain.scheduler.num_train_timesteps
            late = [t for t in self.extract.timesteps if t >= steps]
            if late:
                raise ValueError(f"extract.timesteps: {late} not below pretrain.scheduler.num_train_timesteps "
                                 f"({steps})")
        return self

    def _trains_unet(self) -> bool:
        """Whether the pipeline extracts the U-Net that `pretrain` builds from pretrain.model (no init_from)."""
        return self.pretrain.init_from is None and any(
            s.kind == "diffusion" and not s.checkpoint for s in self.encoder_specs())

    # -- derived values -------------------------------------------------------------------------
    @property
    def storage_root(self) -> str:
        return self.storage or os.path.join("runs", self.name)

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    def dataset_names(self) -> list[str]:
        """The main dataset, then the OOD ones (the `domain` values of the feature store)."""
        return [self.data.train.name] + [d.name for d in self.data.ood]

    def encoder_specs(self) -> list[EncoderSpec]:
        """The encoders `extract` and `probe` work on (default: the U-Net and every baseline)."""
        if self.extract.encoders is None:
            return [EncoderSpec(name="diffusion")] + [
                EncoderSpec(name=b.name, kind="baseline") for b in self.baselines
            ]
        specs = []
        for enc in self.extract.encoders:
            if isinstance(enc, str):
                enc = EncoderSpec(name=enc, kind="diffusion" if enc == "diffusion" else "baseline")
            specs.append(enc)
        return specs

    def reads_pretrained_unet(self) -> bool:
        """Whether an encoder extracts the U-Net `pretrain` trains (a diffusion encoder without a checkpoint of
        its own): where none does, `sweep run` skips pretraining."""
        return any(spec.kind == "diffusion" and not spec.checkpoint for spec in self.encoder_specs())

    def config_hash(self) -> str:
        """Hash of everything that changes results, the probe's revision (`PROBE_REVISION`) included: not
        where they are stored or tracked, nor the settings of `NOT_RESULTS` (a study rerun with more workers
        or trials at once finds its runs)."""
        return self._hash(NOT_RESULTS, PROBE_REVISION)

    def probe_hash(self) -> str:
        """Hash of the settings every probe run of this config shares (name, seed, data, probe and its
        revision), not an encoder's own (`ENCODER_SETTINGS`): a finished run of another config with the same
        probe hash, made on the same feature store, is this config's result for its trial (adding, removing
        or retraining one baseline then probes that baseline's columns, and copies the others' runs)."""
        return self._hash(NOT_RESULTS | {k: True for k in ENCODER_SETTINGS}, PROBE_REVISION)

    def earlier_config_hashes(self) -> dict[str, str]:
        """The hashes these settings had under earlier sweeps, under which their probe runs were tagged:
        hash -> what made them. Runs under these are not today's probe results (see `PROBE_REVISION`)."""
        return {self._hash(NOT_RESULTS, 1): "probe revision 1 (sweep until 2026-11-24)",
                self._hash({"pretrain": {"compile"}}, 1): "probe revision 1 (sweep 0.1.0 until 2026-11-23)"}

    def _hash(self, settings_left_out: dict, probe_revision: int) -> str:
        payload = self.model_dump(mode="json", exclude={"storage": True, "tracking": True, "ray": True,
                                                        "report": True, **settings_left_out})
        if payload["probe"]["asha"] is None:  # the hash of a pipeline without it, as before it existed
            del payload["probe"]["asha"]
        for b in payload.get("baselines", []):  # likewise (added 2026-11-24)
            if b.get("input_size", 0) is None:
                del b["input_size"]
        if probe_revision > 1:  # revision 1's hashes had no such key
            payload["probe"]["revision"] = probe_revision
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


_UNSET = object()


def changed_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key.path: OLD -> NEW` for every leaf that differs between two nested settings dicts (a key on one
    side only shows as missing on the other), in key order: what a stored result was made with against
    what the pipeline asks for now."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        path = f"{prefix}{k}"
        a, b = old.get(k, _UNSET), new.get(k, _UNSET)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_settings(a, b, f"{path}.")
        elif a != b:
            out.append(f"{path}: {'(not set)' if a is _UNSET else _shown(a)} -> "
                       f"{'(not set)' if b is _UNSET else _shown(b)}")
    return out


# ---------------------------------------------------------------------------------------- loading

def _key_part(part) -> bool:
    """Whether a pydantic location item is part of the user's key (a field name or a list index), not a
    union branch or validator tag such as "float", "EncoderSpec", "literal['blocks']" or "list[str]"."""
    return isinstance(part, int) or (part.isidentifier() and not part[0].isupper()
                                     and part not in ("float", "str", "int", "bool", "list", "dict", "none"))


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _names_value(msg: str, value) -> bool:
    """Whether a message already shows the value: quoted, in parentheses or after "got" (a bare digit in
    "greater than 1" is the bound, not the value)."""
    if isinstance(value, str):
        # unquoted only as a whole word: 'balance' is not shown by "'none' or 'balanced'"
        return repr(value) in msg or f'"{value}"' in msg or (
            len(value) > 3 and re.search(rf"(?<![\w'\"]){re.escape(value)}(?![\w'\"])", msg) is not None)
    return any(form in msg for form in (f"({value})", f"got {value}", f"{value!r} "))


def _format_errors(err: ValidationError) -> str:
    """One entry per wrong key: `key: why (got VALUE)`. Where a value may take several forms (a union),
    pydantic reports a failure per form; a form whose shape the value does not have at all is dropped when
    another form got further (deeper key or a non-type error), and the rest are joined with "or"."""
    found = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if _key_part(p))
        msg = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        got = None
        if e["type"] == "extra_forbidden":  # the unknown key itself is the user's, whatever its form
            loc = tuple(p for p in e["loc"][:-1] if _key_part(p)) + (e["loc"][-1],)
            msg = f"unknown key{_suggestion(e['loc'][-1], loc[:-1])}"
        elif e["type"] != "missing" and isinstance(value, (str, int, float, bool, type(None))) \
                and not _names_value(msg, value):
            got = _shown(value)
        found.append((loc, msg, got, e["type"].endswith("_type") or e["type"] == "literal_error"))
    by_key: dict[tuple, tuple[list[str], str | None]] = {}
    for loc, msg, got, shape in found:
        if shape and any(o[:len(loc)] == loc and (len(o) > len(loc) or not s) for o, _, _, s in found):
            continue
        msgs, _ = by_key.setdefault(loc, ([], got))
        if msg not in msgs:
            msgs.append(msg)
    # a whole-pipeline check names its keys in its message
    return "; ".join(f"{'.'.join(map(str, loc)) + ': ' if loc else ''}{' or '.join(msgs)}"
                     f"{f' (got {got})' if got else ''}" for loc, (msgs, got) in by_key.items())


class _PipelineLoader(yaml.SafeLoader):
    """YAML as a pipeline file needs it: a key given twice in one mapping is an error (PyYAML keeps the last
    silently: a second `extract:` section dropped the first), and so is an integer with a leading zero (YAML
    1.1 reads `025` as octal 21)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be set over here
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, (str, int, float, bool)):  # a list key: SafeLoader's own error says so
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (lines {seen[key]} and {line}): the second would "
                                f"silently replace the first", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node):
        text = str(self.construct_scalar(node))
        digits = text.replace("_", "").lstrip("+-")
        if len(digits) > 1 and digits.isdigit() and digits[0] == "0":
            raise yaml.constructor.ConstructorError(
                None, None, f"{text} has a leading zero, which YAML reads as an octal number: write "
                            f"{text[0] if text[0] in '+-' else ''}{int(digits)}", node.start_mark)
        return super().construct_yaml_int(node)


_PipelineLoader.add_constructor("tag:yaml.org,2002:int", _PipelineLoader.construct_yaml_int)


class _TooDeep(yaml.YAMLError):
    def __str__(self) -> str:
        return "nested more than a few hundred levels deep"


def _load_yaml(text: str):
    try:
        return yaml.load(text, Loader=_PipelineLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:  # PyYAML composes nested collections recursively
        raise _TooDeep() from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: where (line, column) and what."""
    if isinstance(e, yaml.reader.ReaderError):  # its str() is two lines
        char = f"{e.character:#x}" if isinstance(e.character, int) else repr(e.character)
        return f"character {char} at position {e.position} is not allowed in YAML ({e.reason})"
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark else what


def _yaml_comment(text: str) -> int | None:
    """Where a comment starts in one YAML value (a `#` outside every token: after a space, or first), or None."""
    covered = [(t.start_mark.index, t.end_mark.index) for t in yaml.scan(text, Loader=_PipelineLoader)]
    for i, ch in enumerate(text):
        if ch == "#" and not any(start <= i < end for start, end in covered):
            return i
    return None


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation can hold (through unions, lists and dicts)."""
    import typing

    found, stack = [], [annotation]
    while stack:
        t = stack.pop()
        if isinstance(t, type) and issubclass(t, BaseModel):
            found.append(t)
        else:
            stack.extend(typing.get_args(t))
    return found


def _keys_by_section(model=None, prefix: str = "", seen=None) -> dict[str, list[str]]:
    """Every key name of the pipeline, with the sections that have it ('' for the top level; list items
    without their index): 'lrs' -> ['probe']."""
    model, seen = model or PipelineConfig, seen if seen is not None else set()
    keys: dict[str, list[str]] = {}
    for name, field in model.model_fields.items():
        keys.setdefault(name, []).append(prefix)
        for sub in _models_in(field.annotation):
            if sub not in seen:
                seen.add(sub)
                for key, places in _keys_by_section(sub, f"{prefix}.{name}".lstrip("."), seen).items():
                    keys.setdefault(key, []).extend(places)
    return keys


def _keys_at(section: tuple) -> list[str]:
    """The key names valid in the section at `section` (field names and list indexes); [] if unknown."""
    models = [PipelineConfig]
    for part in section:
        if isinstance(part, int):
            continue
        models = [sub for m in models if part in m.model_fields for sub in _models_in(m.model_fields[part].annotation)]
    return sorted({name for m in models for name in m.model_fields})


def _suggestion(key: object, section: tuple = ()) -> str:
    """A hint for an unknown key: the closest key of its own section, or the sections where it is a key."""
    import difflib

    wanted = str(key).lower().replace("-", "_")
    here = _keys_at(section)
    close = difflib.get_close_matches(wanted, here, n=1, cutoff=0.7)
    if close and close[0] != key:
        return f" (did you mean {close[0]!r}?)"
    everywhere = _keys_by_section()
    elsewhere = sorted(f"{place}.{wanted}" if place else wanted for place in everywhere.get(wanted, []))
    if elsewhere:
        return f" (a key elsewhere: {', '.join(elsewhere)})"
    close = difflib.get_close_matches(wanted, sorted(everywhere), n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close and close[0] != key else ""


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `a.b.c=VALUE` (VALUE parsed as YAML) to a nested dict in place; list items by index."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE")
    key, _, text = assignment.partition("=")
    dotted = re.sub(r"\[(\d+)\]", r".\1", key.strip())
    if dotted != key.strip():  # `baselines[0].epochs` made an unknown key `baselines[0]`
        raise ConfigError(f"--set {key}: list items are indexed with a dot: --set {dotted}=...")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment!r}: empty key segment")
    try:
        value = _load_yaml(text)
        comment = _yaml_comment(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value is not valid YAML: {_yaml_problem(e)}") from None
    if comment is not None:  # `--set "storage=/data/Plankton 2024 #3"` became /data/Plankton 2024, silently
        quoted = json.dumps(text.strip(), ensure_ascii=False)  # a JSON string is a YAML double-quoted one
        raise ConfigError(f"--set {key}: {text[comment:]!r} starts a YAML comment, which would be dropped from "
                          f"the value: quote the value if it belongs to it ({key}={quoted}), else leave it out")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {where} is not an index of a list of {len(node)}")
            node = node[int(part)]
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        # a list item too (`extract.encoders.0` is a name): setting a key in it failed with a TypeError
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {key}: {where} is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {key}: {last} is not an index of a list of {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                check_local_paths: bool = True) -> PipelineConfig:
    """Read a pipeline YAML, apply `--set` overrides, validate. Raises ConfigError naming the key.
    `check_local_paths=False`: data, split files, weights and checkpoints need not exist on this machine
    (a pipeline checked here to run on a cluster)."""
    if not os.fspath(path).strip():  # Path("") is the current folder
        raise ConfigError("PIPELINE is empty: give the pipeline's YAML file")
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder: give the pipeline's YAML file")
    if not path.exists():
        raise ConfigError(f"pipeline file not found: {path}")
    if not (path.is_file() or path.is_fifo()):  # a pipe is read once, as bash's <(...) gives one
        raise ConfigError(f"{path} is not a file or a pipe: give the pipeline's YAML file")
    try:
        raw = _load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(not_utf8(path, e)) from None
    if raw is None:
        raise ConfigError(f"{path}: the file is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of pipeline keys at the top level")
    for assignment in overrides:
        apply_override(raw, assignment)
    token = _CHECK_LOCAL_PATHS.set(check_local_paths)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {_format_errors(e)}") from None
    finally:
        _CHECK_LOCAL_PATHS.reset(token)
