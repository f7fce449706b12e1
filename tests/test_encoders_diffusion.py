"""Diffusion U-Net encoder: features must equal an independent noising + full forward + pooling, be reproducible,
come from one early-stopped forward, and be named/shaped as the feature-store contract says."""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image
from torch import nn

from sweep.data.preprocess import preprocess
from sweep.encoders import DiffusionEncoder, Encoder, FeatureColumn, build_scheduler, build_unet, noise_for
from sweep.encoders.base import PooledFeatureHooks, checkpoint_hash
from sweep.encoders.diffusion import load_checkpoint, noise_batch, noise_seed, resolve_layers

DEMO = Path(__file__).resolve().parents[1] / "sweep" / "data" / "demo" / "plankton-flowcam-demo" / "images"
SIZE, CHANNELS = 32, 1
BOC = [32, 64, 64]
BLOCKS = [
    "down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2",
]


def _tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return build_unet(SIZE, CHANNELS, BOC, layers_per_block=1, attention=[False, False, True])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """The pretrain stage's layout: U-Net and scheduler config saved into one folder."""
    p = tmp_path_factory.mktemp("ckpt") / "final"
    _tiny_unet().save_pretrained(p)
    build_scheduler(1000, "linear").save_pretrained(p)
    return p


@pytest.fixture(scope="module")
def pipeline_ckpt(tmp_path_factory) -> Path:
    """A diffusers pipeline folder (unet/ + scheduler/), as public DDPM checkpoints are shipped."""
    p = tmp_path_factory.mktemp("pipe")
    _tiny_unet().save_pretrained(p / "unet")
    build_scheduler(1000, "linear").save_pretrained(p / "scheduler")
    (p / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    return p


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, list[str]]:
    """Three real demo images from different classes, preprocessed as every stage does."""
    paths = [sorted((DEMO / c).glob("*.jpg"))[0] for c in ("Tripos", "Ciliophora", "Dinoflagellata")]
    images = torch.stack([preprocess(Image.open(p), SIZE, CHANNELS) for p in paths])
    return images, [p.relative_to(DEMO).as_posix() for p in paths]


def _assert_within_f16_ulp(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to one float16 rounding step: two float32 values a hair apart may round to neighbours."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    ulp = np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(np.float16)).astype(np.float32)
    assert np.all(np.abs(a32 - b32) <= ulp), np.max(np.abs(a32 - b32) / ulp)


def _reference_features(ckpt: Path, images, ids, layers, t, seed) -> dict[str, np.ndarray]:
    """Independent of the encoder: x_t by the DDPM formula, a plain full forward, a hand-written hook."""
    unet = UNet2DModel.from_pretrained(ckpt, low_cpu_mem_usage=False).eval()
    sched = DDPMScheduler.from_pretrained(ckpt)
    abar = sched.alphas_cumprod[t].float()
    eps = torch.stack([noise_for(i, t, seed, images.shape[1:]) for i in ids])
    x_t = abar.sqrt() * images + (1 - abar).sqrt() * eps
    grabbed = {}

    def grab(name):
        def hook(module, inputs, output):  # returns None: must not replace the output
            grabbed[name] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [unet.get_submodule(n).register_forward_hook(grab(n)) for n in layers]
    with torch.no_grad():
        out = unet(x_t, t).sample  # the whole network runs: no early stop here
    for h in handles:
        h.remove()
    assert out.shape == images.shape
    return {n: grabbed[n].mean(dim=(2, 3)).numpy() for n in layers}


def test_features_equal_independent_forward(ckpt, batch):
    images, ids = batch
    layers = ["down_blocks.0", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.2"]
    enc = DiffusionEncoder(ckpt, layers=layers, timesteps=[0, 250], seed=7)
    feats = enc.encode(images, ids)
    assert list(feats) == [f"{n}@t{t}" for t in (0, 250) for n in layers]
    for t in (0, 250):
        ref = _reference_features(ckpt, images, ids, layers, t, seed=7)
        for n in layers:
            got = feats[f"{n}@t{t}"]
            assert got.dtype == np.float16 and got.shape == (len(ids), ref[n].shape[1])
            _assert_within_f16_ulp(got, ref[n].astype(np.float16))
            np.testing.assert_allclose(got.astype(np.float32), ref[n], rtol=2**-10, atol=1e-6)
    # The noise level matters and images differ: features are not degenerate.
    assert not np.allclose(feats["mid_block@t0"], feats["mid_block@t250"], atol=1e-3)
    assert not np.allclose(feats["mid_block@t0"][0], feats["mid_block@t0"][1], atol=1e-3)


def test_encode_is_bit_reproducible(ckpt, batch):
    images, ids = batch
    enc = DiffusionEncoder(ckpt, timesteps=[0, 100], seed=3)
    first, second = enc.encode(images, ids), enc.encode(images, ids)
    fresh = DiffusionEncoder(ckpt, timesteps=[0, 100], seed=3).encode(images, ids)
    assert list(first) == enc.column_names
    for col in first:
        assert np.array_equal(first[col], second[col]), col
        assert np.array_equal(first[col], fresh[col]), col
    # Noise is per image id, not per batch position: a sub-batch gives the same rows.
    sub = enc.encode(images[1:], ids[1:])
    for col in first:
        _assert_within_f16_ulp(sub[col], first[col][1:])
    # Another pipeline seed draws other noise, so noisy-timestep features change; t=0 has almost no noise.
    other = DiffusionEncoder(ckpt, timesteps=[100], seed=4).encode(images, ids)
    assert not np.array_equal(other["mid_block@t100"], first["mid_block@t100"])


def test_forward_stops_after_last_requested_block(ckpt, batch):
    images, ids = batch
    enc = DiffusionEncoder(ckpt, layers=["down_blocks.0", "down_blocks.1"], timesteps=[0, 50])
    fired: list[str] = []
    for n in ["down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.2", "conv_out"]:
        enc.unet.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: fired.append(n))
    encoder_only = enc.encode(images, ids)
    assert fired == []

    # Requesting an up block (listed first: execution order, not list order, decides the stop) runs the
    # decoder up to it and no further; the encoder-block values do not change.
    enc2 = DiffusionEncoder(ckpt, layers=["up_blocks.1", "down_blocks.0", "down_blocks.1"], timesteps=[0, 50])
    fired2: list[str] = []
    for n in ["up_blocks.0", "up_blocks.1", "up_blocks.2", "conv_out"]:
        enc2.unet.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: fired2.append(n))
    with_up = enc2.encode(images, ids)
    assert fired2 == ["up_blocks.0", "up_blocks.1"] * 2  # one forward per timestep
    assert [c.layer for c in enc2.columns[:3]] == ["up_blocks.1", "down_blocks.0", "down_blocks.1"]
    for col, v in encoder_only.items():
        assert np.array_equal(v, with_up[col]), col


def test_noise_for_matches_contract():
    shape = (CHANNELS, SIZE, SIZE)
    digest = hashlib.blake2b(b"5:Tripos/a.jpg:100", digest_size=8).digest()
    s = int.from_bytes(digest, "little") & (2**63 - 1)
    expected = torch.randn(shape, generator=torch.Generator().manual_seed(s))
    eps = noise_for("Tripos/a.jpg", 100, 5, shape)
    assert noise_seed("Tripos/a.jpg", 100, 5) == s
    assert eps.dtype == torch.float32 and eps.device.type == "cpu" and eps.shape == shape
    assert torch.equal(eps, expected)
    assert torch.equal(eps, noise_for("Tripos/a.jpg", 100, 5, torch.Size(shape)))
    for other in [("Tripos/a.jpg", 101, 5), ("Tripos/b.jpg", 100, 5), ("Tripos/a.jpg", 100, 6)]:
        assert not torch.allclose(eps, noise_for(*other, shape))
    assert all(0 <= noise_seed(f"img{i}", 0, 0) < 2**63 for i in range(50))



@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 5, 7), (1, 2, 2), (2, 3, 1)])  # randn's vector and scalar paths
def test_noise_batch_equals_noise_for_image_by_image(shape):
    ids = [f"cls{i % 3}/img{i}.jpg" for i in range(40)]
    expected = torch.stack([noise_for(i, 200, 7, shape) for i in ids])
    generator = torch.Generator()
    generator.manual_seed(123)
    torch.randn(5, generator=generator)  # a used generator: its earlier state must not leak into the draws
    for g in (None, generator, generator):
        batch = noise_batch(ids, 200, 7, shape, g)
        assert batch.dtype == torch.float32 and batch.shape == (40, *shape)
        assert torch.equal(batch, expected)
    assert torch.equal(noise_batch(ids[::-1], 200, 7, shape), expected.flip(0))  # order-independent per image
    assert noise_batch([], 200, 7, shape).shape == (0, *shape)

def test_blocks_names_dims_and_resolutions(ckpt):
    enc = DiffusionEncoder(ckpt, layers="blocks", timesteps=[0, 100])
    assert isinstance(enc, Encoder) and enc.kind == "diffusion" and enc.name == "diffusion"
    assert enc.layers == BLOCKS
    assert [c.column for c in enc.columns] == [f"{n}@t{t}" for t in (0, 100) for n in BLOCKS]
    got = {c.layer: (c.dim, c.resolution) for c in enc.columns}
    # diffusers: a down block's first output is AFTER its downsampler (so down_blocks.0 is already 16x16 at 32),
    # the last down block has no downsampler, and each up block but the last upsamples at its end.
    assert got == {
        "down_blocks.0": (32, 16),
        "down_blocks.1": (64, 8),
        "down_blocks.2": (64, 8),
        "mid_block": (64, 8),
        "up_blocks.0": (64, 16),
        "up_blocks.1": (64, 32),
        "up_blocks.2": (32, 32),
    }
    # The same, derived from the architecture rule, so the table above is not just a snapshot.
    levels = len(BOC)
    for i, c in enumerate(BOC):
        assert got[f"down_blocks.{i}"] == (c, SIZE // 2 ** min(i + 1, levels - 1))
        assert got[f"up_blocks.{i}"] == (BOC[::-1][i], SIZE // 2 ** max(levels - 2 - i, 0))
    col = enc.columns[0]
    assert col == FeatureColumn("down_blocks.0@t0", "down_blocks.0", 0, 32, 16)
    assert col.to_dict() == {"column": "down_blocks.0@t0", "layer": "down_blocks.0", "timestep": 0, "dim": 32,
                             "resolution": 16}
    # Any named_modules() path is a layer, e.g. a single resnet inside a block (before the downsampler).
    inner = DiffusionEncoder(ckpt, layers=["down_blocks.0.resnets.0"], timesteps=[5])
    assert inner.columns == [FeatureColumn("down_blocks.0.resnets.0@t5", "down_blocks.0.resnets.0", 5, 32, 32)]


def test_invalid_layers_timesteps_and_precision(ckpt):
    with pytest.raises(ValueError, match=r"down_blocks\.9") as e:
        DiffusionEncoder(ckpt, layers=["down_blocks.0", "down_blocks.9"])
    assert "down_blocks.0" in str(e.value)  # suggests valid paths
    with pytest.raises(ValueError, match="block"):
        DiffusionEncoder(ckpt, layers="block")
    with pytest.raises(ValueError, match="twice"):
        DiffusionEncoder(ckpt, layers=["mid_block", "mid_block"])
    for bad in ([1000], [-1], [0, 0], [1.5], []):
        with pytest.raises(ValueError):
            DiffusionEncoder(ckpt, timesteps=bad)
    with pytest.raises(ValueError, match="precision"):
        DiffusionEncoder(ckpt, precision="fp16")
    with pytest.raises(ValueError, match="timesteps_per_forward"):
        DiffusionEncoder(ckpt, timesteps_per_forward=0)
    enc = DiffusionEncoder(ckpt, layers=["mid_block"])
    with pytest.raises(ValueError, match="shape"):
        enc.encode(torch.zeros(2, 3, SIZE, SIZE), ["a", "b"])
    with pytest.raises(ValueError, match="ids"):
        enc.encode(torch.zeros(2, 1, SIZE, SIZE), ["a"])


def test_timesteps_per_forward_matches_one_at_a_time(ckpt, batch):
    images, ids = batch
    ts = [0, 100, 500]  # odd: the last forward carries a single timestep
    one = DiffusionEncoder(ckpt, timesteps=ts, seed=1).encode(images, ids)
    packed_enc = DiffusionEncoder(ckpt, timesteps=ts, seed=1, timesteps_per_forward=2)
    calls = []
    packed_enc.unet.get_submodule("conv_in").register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    packed = packed_enc.encode(images, ids)
    assert calls == [2 * len(ids), len(ids)]
    assert list(packed) == list(one)
    for col in one:
        _assert_within_f16_ulp(packed[col], one[col])
    # Before the float16 cast the pooled float32 values agree to 1e-5.
    x = torch.cat([packed_enc.noisy(images, ids, t) for t in (0, 100)])
    both = packed_enc._hooks(x, torch.tensor([0, 100]).repeat_interleave(len(ids)))
    single = packed_enc._hooks(packed_enc.noisy(images, ids, 100), torch.full((len(ids),), 100))
    for n in BLOCKS:
        torch.testing.assert_close(both[n][len(ids):], single[n], rtol=0, atol=1e-5)


def test_bf16_on_cpu_warns_and_runs_fp32(ckpt, batch):
    images, ids = batch
    with pytest.warns(UserWarning, match="bf16"):
        enc = DiffusionEncoder(ckpt, layers=["mid_block"], timesteps=[10], precision="bf16")
    ref = DiffusionEncoder(ckpt, layers=["mid_block"], timesteps=[10]).encode(images, ids)
    assert np.array_equal(enc.encode(images, ids)["mid_block@t10"], ref["mid_block@t10"])


def test_load_checkpoint_both_layouts(ckpt, pipeline_ckpt, batch, tmp_path):
    unet_a, sched_a = load_checkpoint(ckpt)
    unet_b, sched_b = load_checkpoint(pipeline_ckpt)
    sa, sb = unet_a.state_dict(), unet_b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert isinstance(sched_a, DDPMScheduler) and isinstance(sched_b, DDPMScheduler)
    assert torch.equal(sched_a.alphas_cumprod, sched_b.alphas_cumprod)
    images, ids = batch
    fa = DiffusionEncoder(ckpt, layers=["mid_block"], timesteps=[50]).encode(images, ids)
    fb = DiffusionEncoder(pipeline_ckpt, layers=["mid_block"], timesteps=[50]).encode(images, ids)
    assert np.array_equal(fa["mid_block@t50"], fb["mid_block@t50"])

    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_checkpoint(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_checkpoint(tmp_path / "empty")

    # The U-Net alone (e.g. copied without its scheduler): default DDPM schedule, with a warning.
    bare = tmp_path / "bare"
    shutil.copytree(pipeline_ckpt / "unet", bare)
    with pytest.warns(UserWarning, match="scheduler"):
        _, sched = load_checkpoint(bare)
    assert sched.config.num_train_timesteps == 1000 and sched.config.beta_schedule == "linear"


def test_scheduler_config_drives_noise(tmp_path, batch):
    """The checkpoint's own schedule is used: a cosine checkpoint gives other x_t than a linear one."""
    images, ids = batch
    unet = _tiny_unet()
    for sched in ("linear", "cosine"):
        unet.save_pretrained(tmp_path / sched)
        build_scheduler(1000, sched).save_pretrained(tmp_path / sched)
    lin = DiffusionEncoder(tmp_path / "linear", layers=["mid_block"], timesteps=[300])
    cos = DiffusionEncoder(tmp_path / "cosine", layers=["mid_block"], timesteps=[300])
    assert cos.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert not torch.allclose(lin.noisy(images, ids, 300), cos.noisy(images, ids, 300))


def test_build_unet_and_scheduler_validation():
    unet = build_unet(16, 3, [48, 96], layers_per_block=1, attention=[True, False])
    assert unet.config.norm_num_groups == 24  # largest divisor of gcd(48, 96) that is <= 32
    assert unet.config.down_block_types == ("AttnDownBlock2D", "DownBlock2D")
    assert unet.config.up_block_types == ("UpBlock2D", "AttnUpBlock2D")  # mirrored
    assert unet.config.in_channels == unet.config.out_channels == 3
    with pytest.raises(ValueError, match="attention"):
        build_unet(32, 1, [32, 64, 64], 1, [False, True])
    with pytest.raises(ValueError, match="multiple"):
        build_unet(34, 1, [32, 64, 64], 1, [False, False, True])
    assert build_scheduler().config.beta_schedule == "linear"
    assert build_scheduler(200, "cosine").config.num_train_timesteps == 200
    with pytest.raises(ValueError, match="beta_schedule"):
        build_scheduler(1000, "sigmoid")


def test_resolve_layers():
    unet = build_unet(16, 1, [32, 32], 1, [False, False])
    assert resolve_layers(unet, "blocks") == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0",
                                              "up_blocks.1"]
    assert resolve_layers(unet, ["up_blocks.0.resnets.1", "conv_in"]) == ["up_blocks.0.resnets.1", "conv_in"]
    assert resolve_layers(unet, "mid_block") == ["mid_block"]
    with pytest.raises(ValueError, match="up_block.0"):
        resolve_layers(unet, ["up_block.0"])


def test_checkpoint_hash(ckpt, tmp_path):
    h = checkpoint_hash(ckpt)
    assert len(h) == 16 and int(h, 16) >= 0
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    (copy / ".cache").mkdir()
    (copy / ".cache" / "meta").write_text("download timestamp")  # hidden: ignored
    assert checkpoint_hash(copy) == h
    (copy / "scheduler_config.json").write_text((copy / "scheduler_config.json").read_text() + " ")
    assert checkpoint_hash(copy) != h
    (copy / "extra.txt").write_text("")
    assert checkpoint_hash(copy) != h
    one = tmp_path / "w.pt"
    one.write_bytes(b"abc")
    assert checkpoint_hash(one) == hashlib.sha256(
        (0).to_bytes(8, "little") + (3).to_bytes(8, "little") + b"abc"
    ).hexdigest()[:16]
    with pytest.raises(FileNotFoundError):
        checkpoint_hash(tmp_path / "missing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert DiffusionEncoder(ckpt, layers=["mid_block"]).checkpoint_hash == h


def test_pooled_hooks_on_a_plain_cnn():
    """The shared hook utility works on any module (CNN baselines use it too)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.Flatten(),
        nn.LazyLinear(5),
    )
    x = torch.randn(2, 3, 8, 8)
    hooks = PooledFeatureHooks(net, ["2", "0"], x)
    assert hooks.layers == ["0", "2"]  # execution order
    assert (hooks.dim("0"), hooks.resolution("0"), hooks.dim("2"), hooks.resolution("2")) == (4, 8, 8, 4)
    ran = []
    net[4].register_forward_hook(lambda m, i, o: ran.append(1))
    feats = hooks(x)
    assert ran == []  # stopped after "2"
    torch.testing.assert_close(feats["0"], net[0](x).mean(dim=(2, 3)))
    torch.testing.assert_close(feats["2"], net[2](net[1](net[0](x))).mean(dim=(2, 3)))
    assert PooledFeatureHooks(net, ["4"], x).resolution("4") == 1  # flat (B, C) outputs are kept as they are
    with pytest.raises(ValueError, match="'7'"):
        PooledFeatureHooks(net, ["7"], x)
