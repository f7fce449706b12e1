"""The CUDA paths of the torch parts (bf16 autocast, channels_last, the probe on a GPU), checked against the
CPU. Skipped where no GPU is: CI has none; run them on a GPU node (`pytest tests/test_cuda.py`). No Ray."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from sweep.data.preprocess import preprocess
from sweep.encoders.diffusion import DiffusionEncoder, build_scheduler, build_unet
from sweep.probing import ProbeConfig, Split, train_probe
from sweep.train.loop import DDPMTrainer

from tests.conftest import DEMO_IMAGES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def demo_batch() -> tuple[torch.Tensor, list[str]]:
    """All 105 vendored plankton images at 16 px, with their ids."""
    paths = sorted(DEMO_IMAGES.rglob("*.jpg"))
    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(preprocess(im, 16, 1))
    return torch.stack(images), [p.stem for p in paths]


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_diffusion_features_on_cuda_match_the_cpu_in_fp32_and_bf16(tiny_unet_checkpoint, demo_batch):
    images, ids = demo_batch
    timesteps = [0, 100, 500]
    on_cpu = DiffusionEncoder(tiny_unet_checkpoint, "blocks", timesteps, device="cpu").encode(images, ids)
    for precision, tolerance in (("fp32", 1e-2), ("bf16", 5e-2)):  # fp32 convs may run in TF32 on CUDA
        enc = DiffusionEncoder(tiny_unet_checkpoint, "blocks", timesteps, device="cuda", precision=precision,
                               timesteps_per_forward=len(timesteps))
        on_gpu = enc.encode(images, ids)
        assert list(on_gpu) == list(on_cpu)
        errors = {k: _rel_err(on_gpu[k], on_cpu[k]) for k in on_cpu}
        assert all(v.dtype == np.float16 and v.shape == on_cpu[k].shape for k, v in on_gpu.items())
        worst = max(errors, key=errors.get)
        assert errors[worst] < tolerance, f"{precision}: {worst} relative error {errors[worst]:.3g}"
        if precision == "bf16":  # bf16 really ran: fp32 and bf16 features are not the same numbers
            assert errors[worst] > 1e-4, f"bf16 features equal the CPU's to {errors[worst]:.3g}: autocast off?"


def test_ddpm_trainer_on_cuda_steps_in_bf16_channels_last_and_saves_a_portable_state(demo_batch):
    images, _ = demo_batch
    torch.manual_seed(0)
    unet = build_unet(16, 1, [16, 32], 1, [False, True])
    bf16 = DDPMTrainer(copy.deepcopy(unet), build_scheduler(), lr=1e-3, total_steps=10, device="cuda", seed=3)
    fp32 = DDPMTrainer(copy.deepcopy(unet), build_scheduler(), lr=1e-3, total_steps=10, device="cuda", seed=3)
    fp32.cuda = False  # the same trainer with autocast off
    conv = bf16.raw.conv_in.weight
    assert conv.is_cuda and conv.is_contiguous(memory_format=torch.channels_last)
    first = [float(t.train_step(images[:32])) for t in (bf16, fp32)]
    # same weights, noise, timesteps and flips (drawn on the CPU from the seed): only the arithmetic differs
    assert abs(first[0] - first[1]) / first[1] < 0.02, first
    losses = [float(bf16.train_step(images[i : i + 32])) for i in range(0, 96, 32)]
    assert all(np.isfinite(losses)) and bf16.step == 4
    state = bf16.state_dict()
    cpu = DDPMTrainer(copy.deepcopy(unet), build_scheduler(), lr=1e-3, total_steps=10, device="cpu", seed=3)
    cpu.load_state_dict(state)
    assert cpu.step == 4
    for a, b in zip(cpu.raw.parameters(), bf16.raw.parameters()):
        assert torch.equal(a, b.cpu())
    ema = bf16.ema_model("cpu")
    assert next(ema.parameters()).device.type == "cpu" and ema.conv_in.weight.is_contiguous()


def test_train_probe_on_cuda_chooses_the_head_the_cpu_chooses():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (5, 48))

    def split(n):
        y = rng.integers(0, 5, n)
        return Split((centres[y] + rng.normal(0, 2.5, (n, 48))).astype(np.float16), y)

    train, val, test = split(4000), split(1000), split(1000)
    cfg = ProbeConfig(lrs=[0.01, 0.1, 1.0], weight_decays=[0.0, 1e-3, 1e-1], epochs=15, batch_size=256, seed=1)
    on_cpu = train_probe(train, val, test, None, 5, cfg, device="cpu")
    on_gpu = train_probe(train, val, test, None, 5, cfg, device="cuda")
    assert (on_gpu.lr, on_gpu.weight_decay) == (on_cpu.lr, on_cpu.weight_decay)
    assert on_gpu.best_epoch == on_cpu.best_epoch
    # the same minibatch order (a CPU generator) on both: only float rounding differs
    assert abs(on_gpu.metrics["test_acc"] - on_cpu.metrics["test_acc"]) <= 0.003
    np.testing.assert_allclose(on_gpu.weight, on_cpu.weight, rtol=0, atol=2e-3 * np.abs(on_cpu.weight).max())
