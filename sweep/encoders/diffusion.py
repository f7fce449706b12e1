"""A frozen DDPM U-Net as a feature encoder: noise an image to timestep t, run the U-Net, pool block outputs.

Also the U-Net/scheduler builders the pretrain stage uses, so that the architecture that is trained and the one
that is probed come from one place.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import warnings
from collections.abc import Sequence
from functools import reduce
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from sweep.encoders.base import Encoder, FeatureColumn, PooledFeatureHooks, unknown_module_error

BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
PRECISIONS = ("fp32", "bf16")


def build_unet(
    image_size: int,
    channels: int,
    block_out_channels: Sequence[int],
    layers_per_block: int,
    attention: Sequence[bool],
) -> UNet2DModel:
    """A diffusers ``UNet2DModel`` with one resolution level per entry of ``block_out_channels``."""
    block_out_channels = [int(c) for c in block_out_channels]
    attention = [bool(a) for a in attention]
    if not block_out_channels or any(c < 1 for c in block_out_channels):
        raise ValueError(f"block_out_channels must be a non-empty list of positive ints, got {block_out_channels}")
    if len(attention) != len(block_out_channels):
        raise ValueError(
            f"attention has {len(attention)} entries but block_out_channels has {len(block_out_channels)}: "
            "give one flag per resolution level"
        )
    if layers_per_block < 1:
        raise ValueError(f"layers_per_block must be >= 1, got {layers_per_block}")
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    factor = 2 ** (len(block_out_channels) - 1)
    if image_size < factor or image_size % factor:
        raise ValueError(
            f"image_size {image_size} must be a multiple of {factor} for {len(block_out_channels)} resolution levels"
        )
    # GroupNorm needs a group count that divides every block's channels; 32 is the usual cap.
    common = reduce(math.gcd, block_out_channels)
    groups = max(g for g in range(1, min(32, common) + 1) if common % g == 0)
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    # up_blocks[i] mirrors down_blocks[-1 - i] (same resolution), so its attention flag is mirrored too.
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=groups,
    )


def build_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear") -> DDPMScheduler:
    """DDPM noise schedule: "linear" (Ho et al.) or "cosine" (Nichol & Dhariwal; diffusers "squaredcos_cap_v2")."""
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {sorted(BETA_SCHEDULES)}, got {beta_schedule!r}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=BETA_SCHEDULES[beta_schedule])


def noise_seed(image_id: str, timestep: int, seed: int) -> int:
    """Generator seed for (image, timestep): a hash, so it is independent of batch composition and order."""
    digest = hashlib.blake2b(f"{seed}:{image_id}:{timestep}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def noise_for(image_id: str, timestep: int, seed: int, shape: Sequence[int]) -> torch.Tensor:
    """The deterministic eps for one image at one timestep (contract), float32 on the CPU, no batch dim.

    Drawn on the CPU so that features are reproducible across machines whatever device runs the U-Net.
    """
    g = torch.Generator().manual_seed(noise_seed(image_id, timestep, seed))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def noise_batch(image_ids: Sequence[str], timestep: int, seed: int, shape: Sequence[int],
                generator: torch.Generator | None = None) -> torch.Tensor:
    """`noise_for` of every id, stacked to (B, *shape): the same numbers, 1.3-2x faster (measured on an H100
    node's CPU and on a 2-core VM).

    One generator re-seeded per image (`manual_seed` resets its whole state) filling rows of one tensor,
    instead of a new generator and tensor per image: on a GPU node drawing this noise on the CPU is about
    half of an extraction batch's time (benchmarks/gpu_check.py).
    """
    g = torch.Generator() if generator is None else generator
    out = torch.empty((len(image_ids), *shape), dtype=torch.float32)
    for row, image_id in zip(out, image_ids):
        g.manual_seed(noise_seed(image_id, timestep, seed))
        torch.randn(row.shape, generator=g, out=row)
    return out


def _is_unet_folder(p: Path) -> bool:
    return (p / "config.json").is_file()


def load_checkpoint(path: str | Path) -> tuple[UNet2DModel, DDPMScheduler]:
    """Load a U-Net and its noise schedule from a local folder.

    Accepts the pretrain stage's layout (U-Net ``config.json`` + weights + ``scheduler_config.json`` in one
    folder) or a diffusers pipeline folder (``unet/`` and ``scheduler/``), e.g. a downloaded public DDPM.
    Without a scheduler config the DDPM default (1000 steps, linear betas) is used, with a warning.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"checkpoint folder not found: {root}")
    if not root.is_dir():
        raise ValueError(f"checkpoint must be a folder (diffusers save_pretrained layout), got a file: {root}")
    if _is_unet_folder(root):
        unet_dir, sched_dir = root, root
    elif _is_unet_folder(root / "unet"):
        unet_dir, sched_dir = root / "unet", root / "scheduler"
    else:
        raise ValueError(
            f"no diffusers U-Net in {root}: expected config.json (save_pretrained folder) or unet/config.json "
            "(pipeline folder)"
        )
    cls_name = json.loads((unet_dir / "config.json").read_text()).get("_class_name")
    if cls_name not in (None, "UNet2DModel"):
        raise ValueError(f"{unet_dir / 'config.json'} describes a {cls_name}, not an unconditional UNet2DModel")
    # local_files_only: a typo must never turn into a download attempt from the Hub.
    # float32 whatever the saved dtype (bf16 is applied by autocast, so weights stay exact); the low-memory
    # loader needs accelerate, and diffusers warns on every load if asked for it without.
    unet = UNet2DModel.from_pretrained(
        unet_dir,
        local_files_only=True,
        torch_dtype=torch.float32,
        low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
    )
    if (sched_dir / "scheduler_config.json").is_file():
        # A pipeline may ship a DDIM/PNDM config: its betas are what add_noise needs, DDPM reads them alike.
        scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(sched_dir))
    else:
        warnings.warn(
            f"no scheduler_config.json in {sched_dir}: using the default DDPMScheduler (1000 steps, linear betas)",
            stacklevel=2,
        )
        scheduler = DDPMScheduler()
    return unet, scheduler


def resolve_layers(unet: UNet2DModel, layers: str | Sequence[str]) -> list[str]:
    """"blocks" -> every down block, the mid block and every up block, in that (execution) order;
    otherwise a list of ``named_modules()`` paths, validated (a single path string is accepted too)."""
    modules = dict(unet.named_modules())
    if isinstance(layers, str):
        if layers == "blocks":
            names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
            names += ["mid_block"] if unet.mid_block is not None else []
            return names + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
        layers = [layers]
    names = list(layers)
    if not names:
        raise ValueError('layers is empty: give "blocks" or a list of module paths')
    for n in names:
        if not isinstance(n, str) or n == "" or n not in modules:
            raise unknown_module_error(unet, str(n))
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"layers requested twice: {dupes}")
    return names


class DiffusionEncoder(Encoder):
    """Features of a frozen diffusion U-Net: one column per (timestep, layer), named ``<layer>@t<timestep>``.

    Each forward serves all requested layers (stopped after the last of them) for one timestep, or for
    `timesteps_per_forward` of them stacked along the batch.
    """

    kind = "diffusion"

    def __init__(
        self,
        checkpoint: str | Path,
        layers: str | Sequence[str] = "blocks",
        timesteps: Sequence[int] = (0,),
        seed: int = 0,
        name: str = "diffusion",
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        timesteps_per_forward: int = 1,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if int(timesteps_per_forward) < 1:
            raise ValueError(f"timesteps_per_forward must be >= 1, got {timesteps_per_forward}")
        self.name = name
        self.checkpoint = str(checkpoint)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.precision = precision
        self.timesteps_per_forward = int(timesteps_per_forward)
        self._noise_generator = torch.Generator()  # re-seeded per image (`noise_batch`)

        unet, self.scheduler = load_checkpoint(checkpoint)
        self.unet = unet.to(self.device).eval().requires_grad_(False)

        n_train = int(self.scheduler.config.num_train_timesteps)
        if isinstance(timesteps, (int, np.integer)):
            timesteps = [timesteps]
        ts = list(timesteps)
        if not ts:
            raise ValueError("timesteps is empty")
        for t in ts:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < n_train:
                raise ValueError(f"timestep {t!r} must be an int in [0, {n_train}) for this checkpoint's scheduler")
        if len(set(ts)) != len(ts):
            raise ValueError(f"timesteps repeated: {ts}")
        self.timesteps = [int(t) for t in ts]

        # bf16 only where autocast pays off; CPU bf16 is slow and would make CPU features differ for nothing.
        self._autocast = precision == "bf16" and self.device.type == "cuda"
        if precision == "bf16" and not self._autocast:
            warnings.warn(f"precision bf16 applies on CUDA only; running fp32 on {self.device}", stacklevel=2)

        cfg = self.unet.config
        size = cfg.sample_size
        if size is None:
            raise ValueError(f"{checkpoint}: the U-Net config has no sample_size, so the input size is unknown")
        self.image_shape = (int(cfg.in_channels), *((size, size) if isinstance(size, int) else tuple(size)))
        self.layers = resolve_layers(self.unet, layers)
        example = torch.zeros((1, *self.image_shape), device=self.device)
        t0 = torch.zeros(1, dtype=torch.long, device=self.device)
        self._hooks = PooledFeatureHooks(self.unet, self.layers, example, t0)
        self._columns = [
            FeatureColumn(
                column=f"{layer}@t{t}",
                layer=layer,
                timestep=t,
                dim=self._hooks.dim(layer),
                resolution=self._hooks.resolution(layer),
            )
            for t in self.timesteps
            for layer in self.layers
        ]

    @property
    def columns(self) -> list[FeatureColumn]:
        return list(self._columns)

    def noisy(self, images: torch.Tensor, image_ids: Sequence[str], timestep: int) -> torch.Tensor:
        """x_t for a batch of clean images (CPU, float32): the exact U-Net input of ``encode``."""
        x0 = images.detach().to("cpu", torch.float32)
        eps = noise_batch(image_ids, timestep, self.seed, x0.shape[1:], self._noise_generator)
        return self.scheduler.add_noise(x0, eps, torch.full((x0.shape[0],), timestep, dtype=torch.long))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, image_ids: Sequence[str]) -> dict[str, np.ndarray]:
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"images must have shape (B, {', '.join(map(str, self.image_shape))}) for this U-Net, "
                f"got {tuple(images.shape)}"
            )
        image_ids = [str(i) for i in image_ids]
        b = images.shape[0]
        if len(image_ids) != b:
            raise ValueError(f"{len(image_ids)} image ids for {b} images")
        on_device: dict[str, torch.Tensor] = {}
        k = self.timesteps_per_forward
        for start in range(0, len(self.timesteps), k):
            chunk = self.timesteps[start : start + k]
            # Several timesteps share one forward by stacking along the batch with a per-sample timestep.
            x = torch.cat([self.noisy(images, image_ids, t) for t in chunk])
            if self.device.type == "cuda":  # from pinned memory the copy does not wait for the running forward
                x = x.pin_memory()
            x = x.to(self.device, non_blocking=True)
            t = torch.cat([torch.full((b,), ts, dtype=torch.long, device=self.device) for ts in chunk])
            amp = torch.autocast("cuda", dtype=torch.bfloat16) if self._autocast else contextlib.nullcontext()
            with amp:
                feats = self._hooks(x, t)
            for j, ts in enumerate(chunk):
                for layer in self.layers:
                    on_device[f"{layer}@t{ts}"] = feats[layer][j * b : (j + 1) * b].to(torch.float16)
        # Nothing above waits for the GPU (pinned input, timesteps made on the device, features copied back
        # once, after the last forward): the CPU draws the next chunk's noise while the GPU runs this one.
        return {c.column: on_device[c.column].cpu().numpy() for c in self._columns}
