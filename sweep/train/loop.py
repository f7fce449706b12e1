"""One DDPM training step and its resumable state, shared by the Ray Train stage and plain-torch loops.

Pure torch + diffusers (no Ray): `sweep.stages.pretrain` wraps it in Ray Train, and
`benchmarks/pretrain_throughput.py` runs the very same step under plain `torch.distributed`, so the
benchmark measures what Ray adds around the step and nothing else.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable

import torch

from sweep.train.augment import flips_and_rotations
from sweep.train.ddpm import ddpm_loss


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of one worker's noise/augmentation generator for one step."""
    return (seed * 1_000_003 + step * 1009 + rank) & (2**63 - 1)


class DDPMTrainer:
    """A U-Net with its AdamW optimiser (linear warm-up then cosine decay), gradient clipping and an EMA copy.

    `model` is what the forward runs (DDP-wrapped after `wrap`); `raw` is the unwrapped module that the EMA
    follows and that is saved, so no state carries DDP's "module." prefix. On CUDA the model runs in
    channels_last with bf16 autocast; elsewhere it stays fp32 (CPU bf16 is slow and changes the numbers).

    `compile`, on CUDA only: a `torch.compile` mode for the forward ("reduce-overhead": CUDA graphs). A small
    U-Net's step is bound by kernel launches, not by the GPU (benchmarks/gpu_check.py). Batches of another
    size than the first (an epoch's last) run eager, so that they never trigger a second compilation.
    """

    def __init__(self, unet, scheduler, *, lr: float, total_steps: int, warmup_steps: int = 0,
                 weight_decay: float = 0.0, grad_clip: float | None = 1.0, ema_decay: float = 0.999,
                 augment: bool = True, device: torch.device | str = "cpu", seed: int = 0, rank: int = 0,
                 compile: str | None = None):
        from diffusers.optimization import get_cosine_schedule_with_warmup
        from diffusers.training_utils import EMAModel

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.raw = unet.to(self.device)
        if self.cuda:
            self.raw = self.raw.to(memory_format=torch.channels_last)
        self.compile_mode = compile if self.cuda and compile not in (None, "none") else None
        self.model = self.raw
        self._compiled, self._compiled_batch = self._compile(self.model), None
        self.scheduler = scheduler
        self.grad_clip = grad_clip
        self.augment = augment
        self.seed, self.rank = seed, rank
        self.params = [p for p in self.raw.parameters() if p.requires_grad]
        # foreach: one fused update over all tensors instead of a Python loop per parameter
        self.ema = EMAModel(self.raw.parameters(), decay=ema_decay, use_ema_warmup=True, foreach=True,
                            model_cls=type(self.raw), model_config=self.raw.config)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, foreach=True)
        self.lr_schedule = get_cosine_schedule_with_warmup(self.optimizer, warmup_steps, total_steps)
        self.step = 0
        self.epoch = 0
        self.extra: dict = {}  # small values the caller wants checkpointed with the state (e.g. images seen)
        self.generator = torch.Generator()

    def wrap(self, fn: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        """Wrap the forward model, e.g. in DistributedDataParallel (Ray's `prepare_model` or torch's own)."""
        self.model = fn(self.raw)
        self._compiled = self._compile(self.model)

    def _compile(self, model: torch.nn.Module) -> torch.nn.Module | None:
        if not self.compile_mode:
            return None
        # diffusers' up-sampling blocks call its lru_cache'd `is_torch_version`: Dynamo traces through the cache
        # and said so in 14 lines at each compiled pretraining (a version check: nothing to be wrong about)
        warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`-wrapped",
                                category=UserWarning)
        return torch.compile(model, mode=self.compile_mode)  # lazy: compiled at the first call

    def _forward_model(self, batch: int) -> torch.nn.Module:
        """The compiled forward for batches of the first batch's size, the eager one (same weights) otherwise."""
        if self._compiled is None:
            return self.model
        if self._compiled_batch is None:
            self._compiled_batch = batch
        return self._compiled if batch == self._compiled_batch else self.model

    @property
    def lr(self) -> float:
        return self.lr_schedule.get_last_lr()[0]

    def train_step(self, x: torch.Tensor) -> torch.Tensor:
        """One optimiser step on a batch of clean images in [-1, 1]; returns the (detached) loss.

        The loss stays a tensor: calling `.item()` here would force a device sync every step."""
        # noise, timesteps and augmentation are a function of (seed, rank, step): a resumed run draws
        # exactly what an uninterrupted one would have drawn
        self.generator.manual_seed(step_seed(self.seed, self.rank, self.step))
        x = x.to(self.device, non_blocking=True)
        if self.augment:
            x = flips_and_rotations(x, self.generator)
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()
        with amp:
            loss = ddpm_loss(self._forward_model(len(x)), self.scheduler, x, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        self.ema.step(self.raw.parameters())
        self.step += 1
        return loss.detach()

    # -- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.raw.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict(),
                "step": self.step, "epoch": self.epoch, "extra": dict(self.extra)}

    def load_state_dict(self, state: dict) -> None:
        self.raw.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.ema.to(self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.extra = dict(state.get("extra") or {})

    def ema_model(self, device: torch.device | str = "cpu"):
        """A copy of the U-Net carrying the EMA weights, in eval mode and contiguous memory format."""
        final = copy.deepcopy(self.raw)
        self.ema.copy_to(final.parameters())
        return final.to(device).to(memory_format=torch.contiguous_format).eval()
