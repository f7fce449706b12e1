"""Baselines (issue 6): the torchvision-compatible ResNet, SimCLR pieces, the CNN encoder, and the
`sweep baselines` stage on real Ray (tiny budgets: 16 px demo images, resnet18 with the small stem)."""

from __future__ import annotations

import importlib
import json
import re
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from conftest import free_port
from sweep.cli import main
from sweep.config import load_config
from sweep.encoders.cnn import DEFAULT_LAYERS, CNNEncoder
from sweep.encoders.resnet import (
    ARCHS,
    adapt_input_conv,
    build_resnet,
    infer_layout,
    load_resnet_weights,
    read_state_dict,
)
from sweep.stages import baselines
from sweep.tracking import tracking_uri
from sweep.train.precise_bn import bn_sample_every, recalibrate_batchnorm
from sweep.train.simclr import nt_xent, two_views



@pytest.fixture(autouse=True)
def _own_mlflow_store(monkeypatch):
    """`mlflow.set_tracking_uri` exports MLFLOW_TRACKING_URI, which `tracking_uri` prefers over a pipeline's
    own store: without this, a second pipeline in one process would log into the first one's database."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# ------------------------------------------------------------------------------------------ ResNet


def _expected_keys(arch: str, with_fc: bool = True) -> int:
    """State-dict entries from the architecture: a conv has 1 (weight, no bias); a BatchNorm 5 (weight,
    bias, running_mean, running_var, num_batches_tracked); fc 2."""
    kind, blocks = ARCHS[arch]
    conv, bn = 1, 5
    per_block = 2 * (conv + bn) if kind == "basic" else 3 * (conv + bn)
    downsamples = 3 if kind == "basic" else 4  # layer1 of a bottleneck net widens 64 -> 256 too
    return (conv + bn) + sum(blocks) * per_block + downsamples * (conv + bn) + (2 if with_fc else 0)


def test_resnet_state_dict_uses_torchvision_names():
    m = build_resnet("resnet18")
    sd = m.state_dict()
    assert _expected_keys("resnet18") == 122
    assert len(sd) == 122
    assert list(sd)[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                            "bn1.num_batches_tracked"]
    for key, shape in {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer1.1.bn2.running_var": (64,),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.num_batches_tracked": (),
        "layer3.1.conv2.weight": (256, 256, 3, 3),
        "layer4.0.downsample.1.bias": (512,),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    assert "layer1.0.downsample.0.weight" not in sd
    # torchvision's published parameter counts
    assert sum(p.numel() for p in m.parameters()) == 11_689_512
    r50 = build_resnet("resnet50")
    assert sum(p.numel() for p in r50.parameters()) == 25_557_032
    sd50 = r50.state_dict()
    assert len(sd50) == _expected_keys("resnet50") == 320
    assert len(build_resnet("resnet34").state_dict()) == _expected_keys("resnet34") == 218
    assert tuple(sd50["layer1.0.conv3.weight"].shape) == (256, 64, 1, 1)
    assert tuple(sd50["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert tuple(sd50["fc.weight"].shape) == (1000, 2048)
    # the small stem and a classifier-free backbone keep every name
    small = build_resnet("resnet18", num_classes=0, in_channels=1, small_input=True).state_dict()
    assert len(small) == _expected_keys("resnet18", with_fc=False) == 120
    assert set(small) == set(sd) - {"fc.weight", "fc.bias"}
    assert tuple(small["conv1.weight"].shape) == (64, 1, 3, 3)
    assert {n for n, _ in build_resnet("resnet18").named_children()} == {
        "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"}


def test_small_input_stem_keeps_resolution():
    x = torch.randn(2, 1, 16, 16)
    small = build_resnet("resnet18", num_classes=0, in_channels=1, small_input=True).eval()
    large = build_resnet("resnet18", num_classes=0, in_channels=1, small_input=False).eval()
    assert small.layer1(small.maxpool(small.relu(small.bn1(small.conv1(x))))).shape[-1] == 16
    assert large.layer1(large.maxpool(large.relu(large.bn1(large.conv1(x))))).shape[-1] == 4
    assert small(x).shape == (2, 512)


def test_weight_file_loads_with_channel_adaptation(tmp_path):
    torch.manual_seed(0)
    rgb = build_resnet("resnet18", num_classes=10).eval()
    # a DDP-saved, wrapped torch file (as many training scripts write them)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in rgb.state_dict().items()}}, path)
    state = read_state_dict(path)
    assert infer_layout(state) == {"in_channels": 3, "small_input": False, "num_classes": 10, "arch": "resnet18"}
    grey = build_resnet("resnet18", num_classes=10, in_channels=1).eval()
    load_resnet_weights(grey, state)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)
    assert torch.equal(adapt_input_conv(state["conv1.weight"], 1), state["conv1.weight"].sum(1, keepdim=True))
    # a backbone drops the classifier; a 7x7 stem does not fit the small stem
    load_resnet_weights(build_resnet("resnet18", num_classes=0), state)
    with pytest.raises(ValueError, match="small_input"):
        load_resnet_weights(build_resnet("resnet18", num_classes=10, small_input=True), state)
    with pytest.raises(ValueError, match="missing"):
        load_resnet_weights(build_resnet("resnet34", num_classes=10), state)


# ------------------------------------------------------------------------------------------ SimCLR


def _nt_xent_reference(z1, z2, t):
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    losses = []
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        sims = torch.stack([z[i] @ z[k] / t for k in range(2 * n) if k != i])
        others = [k for k in range(2 * n) if k != i]
        losses.append(-(sims[others.index(pos)] - torch.logsumexp(sims, 0)))
    return torch.stack(losses).mean()


def test_nt_xent_matches_reference():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    torch.testing.assert_close(nt_xent(z1, z2, 0.5), _nt_xent_reference(z1, z2, 0.5))
    # matching views score far better than unrelated ones
    assert nt_xent(z1, z1 + 0.01 * z2, 0.1) < nt_xent(z1, z2, 0.1) - 1.0


_GATHER_WORKER = """
import sys, torch, torch.distributed as dist
from sweep.train.simclr import nt_xent
rank, world, port, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
z1, z2 = torch.load(f"{path}/z.pt")
n = z1.shape[0] // world
a = z1[rank * n: (rank + 1) * n].clone().requires_grad_(True)
b = z2[rank * n: (rank + 1) * n].clone().requires_grad_(True)
loss = nt_xent(a, b, 0.5)
loss.backward()
total = loss.detach().clone()
dist.all_reduce(total)
# DDP averages gradients over workers
torch.save((total / world, a.grad / world, b.grad / world), f"{path}/out{rank}.pt")
dist.destroy_process_group()
"""


def test_nt_xent_gathers_negatives_across_workers(tmp_path):
    """Two gloo workers with half the batch each, gathering negatives, give the single-process loss on
    the whole batch and (after DDP's averaging) its exact gradient."""
    import subprocess
    import sys

    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    torch.save((z1, z2), tmp_path / "z.pt")
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    full = nt_xent(a, b, 0.5)
    full.backward()
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _GATHER_WORKER, str(r), "2", port, str(tmp_path)])
             for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    out = [torch.load(tmp_path / f"out{r}.pt") for r in range(2)]
    torch.testing.assert_close(out[0][0], full.detach())
    torch.testing.assert_close(torch.cat([out[0][1], out[1][1]]), a.grad)
    torch.testing.assert_close(torch.cat([out[0][2], out[1][2]]), b.grad)


def test_two_views_are_seeded_and_in_range():
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    a1, a2 = two_views(x, generator=torch.Generator().manual_seed(1))
    b1, b2 = two_views(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert a1.shape == x.shape and a1.min() >= -1 and a1.max() <= 1
    assert not torch.allclose(a1, a2)


# ------------------------------------------------------------------------- BatchNorm recalibration


def _small_bn_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 3, 3), torch.nn.BatchNorm2d(3))
    for bn in (net[1], net[4]):  # statistics far from the data's, as after a short run
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(0.01)
    return net.eval()


def test_recalibrate_batchnorm_sets_each_layer_to_its_input_statistics():
    import torch.nn.functional as F

    net = _small_bn_net()
    x = 2 * torch.randn(10, 1, 9, 9, generator=torch.Generator().manual_seed(1)) + 1
    assert recalibrate_batchnorm(net, x, world=1, device="cpu", batch_size=16)  # one batch
    # independently: each layer's input as training mode computes it (batch statistics), then its mean and
    # unbiased variance over (images, height, width)
    h1 = net[0](x)
    h2 = net[3](F.relu(F.batch_norm(h1, None, None, net[1].weight, net[1].bias, training=True)))
    for bn, h in ((net[1], h1), (net[4], h2)):
        assert torch.allclose(bn.running_mean, h.mean((0, 2, 3)).detach(), atol=1e-5)
        assert torch.allclose(bn.running_var, h.var((0, 2, 3), unbiased=True).detach(), atol=1e-4)
        assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 1
    assert not net.training  # mode kept
    # in eval mode the network now normalises the sample as training mode would
    with torch.no_grad():
        eval_out = net(x)
        train_out = net.train()(x)
    assert torch.allclose(eval_out, train_out, atol=0.05)


def test_recalibrate_batchnorm_averages_over_batches():
    net = _small_bn_net()
    x = torch.randn(11, 1, 9, 9, generator=torch.Generator().manual_seed(2))
    assert recalibrate_batchnorm(net, x, world=1, device="cpu", batch_size=4)
    # batches of 4, 4 and 3, each weighing the same
    means = torch.stack([net[0](x[i: i + 4]).mean((0, 2, 3)) for i in (0, 4, 8)]).detach()
    assert torch.allclose(net[1].running_mean, means.mean(0), atol=1e-5)
    assert int(net[1].num_batches_tracked) == 3
    # a last batch of one image is left out (it has no variance); nothing to do without images or layers
    assert recalibrate_batchnorm(net, x[:9], world=1, device="cpu", batch_size=4)
    assert int(net[1].num_batches_tracked) == 2
    assert not recalibrate_batchnorm(net, None, world=1, device="cpu")
    assert not recalibrate_batchnorm(torch.nn.Linear(2, 2), x, world=1, device="cpu")


@pytest.mark.parametrize("cache_limit", [1 << 30, 64], ids=["cached", "streamed"])
def test_train_shard_sample_spans_the_split_in_row_order(ray_local, cache_limit):
    import ray

    rows = np.arange(100)
    ds = ray.data.from_items([{"row": int(r), "image": np.full((1, 2, 2), r, dtype=np.float32)}
                              for r in rows[::-1]])  # streamed in reverse row order
    shard = baselines._TrainShard(ds.iterator(), batch_size=8, cache_limit=cache_limit, sample_every=7)
    assert sum(len(b["row"]) for b in shard.epoch(0, 0, 0)) == 100
    assert shard.streaming == (cache_limit == 64)
    sample = shard.sample(world=1)
    assert sample[:, 0, 0, 0].tolist() == list(range(0, 100, 7))  # every 7th row, in row order
    for _ in shard.epoch(1, 0, 0):  # a later epoch adds nothing
        pass
    assert torch.equal(shard.sample(world=1), sample)
    # asked before any epoch (a run resumed after its last one): it reads one
    fresh = baselines._TrainShard(ds.iterator(), batch_size=8, cache_limit=cache_limit, sample_every=7)
    assert torch.equal(fresh.sample(world=1), sample)


def test_bn_sample_every_spreads_the_sample_over_the_split():
    assert bn_sample_every(61, world=2, image_bytes=4 * 32 * 32) == 1
    assert bn_sample_every(51_000, world=2, image_bytes=4 * 32 * 32) == 25  # 1,020 per worker
    assert bn_sample_every(1_000_000, world=1, image_bytes=4 * 3 * 224 * 224) == 2248  # 445 images (256 MiB)


def test_confusion_metrics_match_probe_metrics():
    from sweep.probing.metrics import classification_metrics

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
    y[y == 3] = 2  # a class absent from y_true
    conf = np.zeros((4, 4))
    np.add.at(conf, (y, p), 1)
    ours = baselines.confusion_metrics(conf, "test")
    ref = classification_metrics(y, p, "test", balanced=True)
    assert ours == pytest.approx(ref)


# ------------------------------------------------------------------------------------- CNN encoder


def _reference_features(model, x, layers):
    """Independent of PooledFeatureHooks: plain forward hooks on a full forward, then the spatial mean."""
    out, handles = {}, []
    modules = dict(model.named_modules())

    def hook(name):
        def record(_module, _inputs, output):
            out.setdefault(name, output.float().mean(dim=(2, 3)))  # returns None: the output is unchanged

        return record

    for name in layers:
        handles.append(modules[name].register_forward_hook(hook(name)))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return out


def test_pretrained_baseline_from_local_file_and_cnn_features(write_pipeline, tmp_path, capsys):
    torch.manual_seed(0)
    src = build_resnet("resnet18", num_classes=10).eval()  # 3 channels, ImageNet stem, like a torchvision file
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    weights = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), weights)
    path = write_pipeline(baselines=[{"name": "imagenet-r18", "kind": "pretrained", "arch": "resnet18",
                                      "weights": str(weights)}])
    cfg = load_config(path)
    out = baselines.run(cfg)
    final = out["imagenet-r18"]
    meta = json.loads(open(f"{final}/baseline.json").read())
    assert meta["kind"] == "pretrained" and meta["in_channels"] == 1 and meta["small_input"] is False
    assert meta["num_classes"] == 10 and meta["input_mean"] is not None

    enc = CNNEncoder(final, name="imagenet-r18")
    assert enc.kind == "pretrained" and enc.name == "imagenet-r18"
    assert [c.column for c in enc.columns] == list(DEFAULT_LAYERS)
    assert [c.timestep for c in enc.columns] == [None] * 4
    assert [c.dim for c in enc.columns] == [64, 128, 256, 512]
    assert [c.resolution for c in enc.columns] == [4, 2, 1, 1]  # 16 px through the ImageNet stem

    x = torch.rand(4, 1, 16, 16) * 2 - 1
    feats = enc.encode(x, [f"i{k}" for k in range(4)])
    # independent computation: the source weights with conv1 summed over RGB, ImageNet normalisation
    ref_model = build_resnet("resnet18", num_classes=10, in_channels=1).eval()
    sd = src.state_dict()
    sd["conv1.weight"] = sd["conv1.weight"].sum(1, keepdim=True)
    ref_model.load_state_dict(sd)
    xin = ((x + 1) / 2 - np.mean([0.485, 0.456, 0.406])) / np.mean([0.229, 0.224, 0.225])
    ref = _reference_features(ref_model, xin.float(), DEFAULT_LAYERS)
    for layer in DEFAULT_LAYERS:
        assert feats[layer].dtype == np.float16 and feats[layer].shape == (4, enc.columns[
            DEFAULT_LAYERS.index(layer)].dim)
        np.testing.assert_allclose(feats[layer].astype(np.float32), ref[layer].numpy(), rtol=2e-3, atol=2e-3)

    # the forward stops after the last requested layer
    ran = []
    enc2 = CNNEncoder(final, layers=["layer2", "layer1"])
    enc2.model.layer3.register_forward_hook(lambda *a: ran.append("layer3"))
    f2 = enc2.encode(x, ["a", "b", "c", "d"])
    assert list(f2) == ["layer2", "layer1"] and ran == []
    np.testing.assert_array_equal(f2["layer1"], feats["layer1"])
    with pytest.raises(ValueError, match="unknown layer"):
        CNNEncoder(final, layers=["layer5"])
    # an edited baseline.json without its arch failed as a bare KeyError: 'arch'
    edited = tmp_path / "edited"
    shutil.copytree(final, edited)
    (edited / "baseline.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "arch"}))
    with pytest.raises(ValueError, match=f"^{edited}/baseline.json: lacks 'arch': not a baseline folder written by"):
        CNNEncoder(str(edited))
    # why `avgpool` is no default layer: its column is layer4's again
    f3 = CNNEncoder(final, layers=["layer4", "avgpool"]).encode(x, ["a", "b", "c", "d"])
    np.testing.assert_allclose(f3["avgpool"].astype(np.float32), f3["layer4"].astype(np.float32), rtol=1e-3, atol=1e-3)

    # MLflow: the stage's parent run (tag sweep.stage=baselines), the baseline's run its child
    mlflow.set_tracking_uri(tracking_uri(cfg))
    stage = mlflow.search_runs(experiment_names=[cfg.experiment_name], filter_string="tags.`sweep.stage` = 'baselines'")
    parents = stage[stage["tags.sweep.baseline"].isna()]
    assert len(parents) == 1 and parents["status"].tolist() == ["FINISHED"]
    child = _runs(cfg, "imagenet-r18")
    assert child["tags.mlflow.parentRunId"].tolist() == parents["run_id"].tolist()

    # rerun: nothing rebuilt, and no run opened for it
    before = open(f"{final}/model.safetensors", "rb").read()
    baselines.run(cfg)
    assert open(f"{final}/model.safetensors", "rb").read() == before
    assert len(mlflow.search_runs(experiment_names=[cfg.experiment_name])) == 2

    # other weights: rebuilt in place, and said that its feature store, if any, is now of the old model
    torch.save(build_resnet("resnet18", num_classes=10).state_dict(), weights)
    features = Path(cfg.storage_root, "features", "imagenet-r18")
    features.mkdir(parents=True)
    capsys.readouterr()
    baselines.run(load_config(path))
    assert open(f"{final}/model.safetensors", "rb").read() != before
    assert f"rebuilding it (its features, {features}, are then of the old model" in capsys.readouterr().err

    # input_size: the images resized before the network (ImageNet weights at the scale they learned): the
    # layers' maps grow with it, and the features are those of the resized image
    big = write_pipeline(baselines=[{"name": "imagenet-r18-32", "kind": "pretrained", "arch": "resnet18",
                                     "weights": str(weights), "input_size": 32}])
    big_cfg = load_config(big)
    assert baselines.baseline_key(big_cfg, big_cfg.baselines[0]) != baselines.baseline_key(cfg, cfg.baselines[0])
    enc32 = CNNEncoder(baselines.run(big_cfg)["imagenet-r18-32"])
    assert [c.resolution for c in enc32.columns] == [8, 4, 2, 1]  # 32 px through the ImageNet stem
    sd = torch.load(weights)  # the file as it is now (the weights above were replaced)
    sd["conv1.weight"] = sd["conv1.weight"].sum(1, keepdim=True)
    ref_model.load_state_dict(sd)
    up = torch.nn.functional.interpolate(xin.float(), size=(32, 32), mode="bilinear", align_corners=False)
    ref32 = _reference_features(ref_model, up, DEFAULT_LAYERS)
    feats32 = enc32.encode(x, [f"i{k}" for k in range(4)])
    for layer in DEFAULT_LAYERS:
        np.testing.assert_allclose(feats32[layer].astype(np.float32), ref32[layer].numpy(), rtol=2e-3, atol=2e-3)


def test_pretrained_any_architecture_from_a_factory(write_pipeline, tmp_path, monkeypatch):
    # `<module>:<callable>` builds the architecture (here tests/nets.py), the weights come from the file
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import nets

    torch.manual_seed(1)
    src = nets.tiny_rgb_net(classes=7).eval()
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    weights = tmp_path / "tiny.safetensors"
    from safetensors.torch import save_file
    save_file(src.state_dict(), str(weights))
    path = write_pipeline(baselines=[{"name": "mine", "kind": "pretrained", "arch": "nets:tiny_rgb_net",
                                      "arch_args": {"classes": 7}, "weights": str(weights)}])
    final = baselines.run(load_config(path))["mine"]
    meta = json.loads(open(f"{final}/baseline.json").read())
    assert meta["arch"] == "nets:tiny_rgb_net" and meta["in_channels"] == 1 and meta["model_in_channels"] == 3
    assert len(meta["input_mean"]) == 3  # ImageNet statistics per RGB channel: grey is repeated first

    enc = CNNEncoder(final)
    assert enc.model.fc.out_features == 7  # arch_args reach the constructor, at build and at load
    # top-level children minus flatten, the classifier and the global pool (stage2's column again)
    layers = ["stem", "stage1", "stage2"]
    assert [c.column for c in enc.columns] == layers and [c.dim for c in enc.columns] == [8, 12, 16]
    assert [c.resolution for c in enc.columns] == [8, 8, 4]
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    feats = enc.encode(x, ["a", "b", "c"])
    # independent computation: the source network on grey repeated to RGB, ImageNet-normalised
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        h0 = src.stem(((x.repeat(1, 3, 1, 1) + 1) / 2 - mean) / std)
        h1 = src.stage1(h0)
        h2 = src.stage2(h1)
    for layer, h in zip(layers, (h0, h1, h2), strict=True):
        np.testing.assert_allclose(feats[layer].astype(np.float32), h.mean((2, 3)).numpy(), rtol=2e-3, atol=2e-3)

    # weights of another architecture are refused with the keys that differ
    other = tmp_path / "other.pth"
    torch.save({"stem.weight": torch.zeros(8, 3, 3, 3)}, other)
    path = write_pipeline(baselines=[{"name": "bad", "kind": "pretrained", "arch": "nets:tiny_rgb_net",
                                      "arch_args": {"classes": 7}, "weights": str(other)}])
    with pytest.raises(baselines.BaselineError, match=r"bad.*missing \['stem.bias'"):
        baselines.run(load_config(path))


@pytest.mark.parametrize("arch, match", [
    ("torchvision:resnet18", "torchvision"), ("timm:resnet18", "timm"), ("nets:no_such_net", "no callable"),
    ("no_such_module_xyz:net", "cannot be imported"),
])
def test_pretrained_arch_errors_name_the_arch(write_pipeline, tmp_path, monkeypatch, arch, match):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    provider = arch.split(":")[0]
    if provider in ("torchvision", "timm"):
        try:
            importlib.import_module("torchvision.models" if provider == "torchvision" else "timm")
            pytest.skip(f"{provider} imports here: the missing-package error cannot be produced")
        except Exception:  # noqa: BLE001 - not installed, or a build that does not match this torch
            pass
    weights = tmp_path / "w.pth"
    torch.save({"x": torch.zeros(1)}, weights)
    path = write_pipeline(baselines=[{"name": "p", "kind": "pretrained", "arch": arch, "weights": str(weights)}])
    with pytest.raises(baselines.BaselineError, match=f"{re.escape(arch)}.*{match}"):
        baselines.run(load_config(path))


@pytest.mark.parametrize("arch, args", [("torchvision:resnet18", {}), ("timm:resnet18", {}),
                                         ("timm:vit_tiny_patch16_224", {"img_size": 16})])
def test_pretrained_torchvision_and_timm(write_pipeline, tmp_path, arch, args):
    # Runs where torchvision / timm import (e.g. torch 2.14.1 + torchvision 0.29.1); PyPI's torchvision does
    # not import beside the CPU-only torch 2.13.0 of the quick install, so there it is skipped.
    provider, _, name = arch.partition(":")
    try:
        lib = importlib.import_module("torchvision.models" if provider == "torchvision" else "timm")
    except Exception as e:  # noqa: BLE001 - not installed, or a build that does not match this torch
        pytest.skip(f"{provider} does not import here: {type(e).__name__}")
    torch.manual_seed(0)
    src = (lib.get_model(name, weights=None, **args) if provider == "torchvision"
           else lib.create_model(name, pretrained=False, **args)).eval()
    from safetensors.torch import save_file
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous().clone() for k, v in src.state_dict().items()}, str(weights))
    path = write_pipeline(baselines=[{"name": "ref", "kind": "pretrained", "arch": arch, "arch_args": args,
                                      "weights": str(weights)}])
    cfg = load_config(path)
    enc = CNNEncoder(baselines.run(cfg)["ref"])
    size = cfg.data.image_size
    x = torch.rand(2, 1, size, size) * 2 - 1
    feats = enc.encode(x, ["a", "b"])
    # independent computation: hooks on the source model, grey repeated to RGB, ImageNet normalisation
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    out, mods = {}, dict(src.named_modules())

    def keep(name):
        def hook(_module, _inputs, output):  # returns None: a returned value would replace the output
            out.setdefault(name, output.clone())  # clone: an in-place ReLU may follow (torchvision's bn1)
        return hook

    hooks = [mods[c.layer].register_forward_hook(keep(c.layer)) for c in enc.columns]
    with torch.no_grad():
        src(((x.repeat(1, 3, 1, 1) + 1) / 2 - mean) / std)
    for h in hooks:
        h.remove()
    for c in enc.columns:
        ref = out[c.layer].float()
        ref = ref.mean(1) if ref.ndim == 3 else ref.mean((2, 3)) if ref.ndim == 4 else ref
        np.testing.assert_allclose(feats[c.column].astype(np.float32), ref.numpy(),
                                   rtol=2e-3, atol=2e-3 * float(ref.abs().max()), err_msg=c.column)


def test_arch_forms_checked_in_the_config(write_pipeline):
    from sweep.config import ConfigError

    path = write_pipeline(baselines=[{"name": "s", "kind": "supervised", "arch": "timm:resnet18"}])
    with pytest.raises(ConfigError, match="supervised baseline trains one of resnet18"):
        load_config(path)
    path = write_pipeline(baselines=[{"name": "s", "kind": "supervised", "arch": "vgg"}])
    with pytest.raises(ConfigError, match="arch 'vgg'"):
        load_config(path)


def test_an_arch_whose_package_is_missing_is_a_config_error_before_any_stage(write_pipeline, tmp_path):
    """`sweep validate` and `sweep run` (before pretraining) name the baseline's arch and the missing package;
    before, only the baselines stage found it, after pretraining."""
    from sweep.config import ConfigError
    from sweep.encoders.checks import check_encoder_settings

    weights = tmp_path / "w.pth"
    torch.save({"x": torch.zeros(1)}, weights)
    path = write_pipeline(baselines=[{"name": "p", "kind": "pretrained", "arch": "no_such_module_xyz.nets:net",
                                      "weights": str(weights)}])
    with pytest.raises(ConfigError, match=r"baselines\.0\.arch: 'no_such_module_xyz\.nets:net' needs the Python "
                                          r"module 'no_such_module_xyz\.nets', which is not installed"):
        check_encoder_settings(load_config(path))


def _tiny_net_weights(tmp_path, monkeypatch) -> Path:
    """tests/nets.py importable (as `nets`) and a weights file of its tiny_rgb_net (7 classes)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import nets

    weights = tmp_path / "tiny.pth"
    torch.save(nets.tiny_rgb_net(classes=7).state_dict(), weights)
    return weights


def test_validate_checks_a_factory_archs_layers(write_pipeline, tmp_path, monkeypatch, capsys):
    """`baselines[].layers` of a `<module>:<callable>` arch are checked against the model (built on the meta
    device) by validate and before `run` starts: they passed, and extract then failed advising to delete the
    (fine) weights."""
    weights = _tiny_net_weights(tmp_path, monkeypatch)
    spec = {"name": "mine", "kind": "pretrained", "arch": "nets:tiny_rgb_net", "arch_args": {"classes": 7},
            "weights": str(weights)}
    path = write_pipeline(baselines=[{**spec, "layers": ["stem", "stage1"]}])
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    path = write_pipeline(baselines=[{**spec, "layers": ["stem", "stage3"]}])
    for command in ("validate", "run"):
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err
        assert (f"{path}: baselines.0.layers: unknown layer 'stage3': not a module path of Module; e.g. stage2, "
                f"stage1") in err and "== pretrain ==" not in err, err
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_validate_checks_pretrained_weights_against_the_arch(write_pipeline, tmp_path, monkeypatch, capsys):
    """What the baselines stage finds (ResNet layout against arch, a missing factory, keys of another
    architecture, a stem of the other small_input) is a config error of validate and of `run` / `baselines`
    before any stage, naming the setting; before, validate passed and `run` failed after pretraining."""
    weights = _tiny_net_weights(tmp_path, monkeypatch)
    with torch.device("meta"):
        r34_keys = list(build_resnet("resnet34").state_dict())
    r34 = tmp_path / "r34.pth"
    # the layout is read from the keys (and conv1's shape)
    torch.save({**{k: torch.zeros(1) for k in r34_keys}, "conv1.weight": torch.zeros(64, 3, 7, 7)}, r34)
    torch.manual_seed(0)
    r18 = tmp_path / "r18.pth"
    torch.save(build_resnet("resnet18", num_classes=10).state_dict(), r18)  # 3 channels, ImageNet stem
    cases = [
        ({"arch": "resnet18", "weights": str(r34)}, f"baselines.0.arch: arch is resnet18 but {r34} holds a resnet34"),
        ({"arch": "nets:nothere", "weights": str(weights)},
         "baselines.0.arch: arch 'nets:nothere': module 'nets' has no callable 'nothere'"),
        ({"arch": "nets:tiny_rgb_net", "weights": str(r18)},
         f"baselines.0.weights: {r18}: state dict does not match Module: missing ['stem.weight'"),
        # the file's shape, not the one adapted to the data's 1 channel (64, 1, 7, 7)
        ({"arch": "resnet18", "weights": str(r18), "small_input": True},
         f"baselines.0.weights: {r18}: conv1.weight has shape (64, 3, 7, 7), the model needs (64, 1, 3, 3)"),
    ]
    for spec, why in cases:
        path = write_pipeline(baselines=[{"name": "p", "kind": "pretrained", **spec}],
                              extract={"encoders": ["diffusion"]})  # the baselines stage builds it all the same
        for command in ("validate", "run", "baselines"):
            assert main([command, str(path)]) == 2, command
            err = capsys.readouterr().err
            assert why in err and "== " not in err, (command, err)
    ok = write_pipeline(baselines=[{"name": "p", "kind": "pretrained", "arch": "resnet18", "weights": str(r18)}])
    assert main(["validate", str(ok)]) == 0, capsys.readouterr().err


def test_validate_leaves_a_module_that_does_not_import_to_the_stage(write_pipeline, tmp_path, monkeypatch, capsys):
    """A factory's module that exists but fails to import here is not validate's to refuse (as before): the
    stage that builds the model reports it."""
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "broken_nets_xyz.py").write_text("raise ImportError('needs a library this machine lacks')\n")
    monkeypatch.syspath_prepend(str(mods))
    weights = _tiny_net_weights(tmp_path, monkeypatch)
    path = write_pipeline(baselines=[{"name": "p", "kind": "pretrained", "arch": "broken_nets_xyz:net",
                                      "weights": str(weights), "layers": ["whatever"]}])
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    with pytest.raises(baselines.BaselineError, match="cannot be imported here: ImportError: needs a library"):
        baselines.run(load_config(path))


def test_an_unknown_layer_at_extract_names_the_setting_not_the_weights(write_pipeline, tmp_path, monkeypatch):
    """Where validate could not build the model, extract's error for a wrong layer points at
    `baselines[].layers`, not at deleting and remaking the (fine) model."""
    from sweep.data.table import build_table
    from sweep.stages.extract import ExtractError, extract_encoder

    weights = _tiny_net_weights(tmp_path, monkeypatch)
    spec = {"name": "mine", "kind": "pretrained", "arch": "nets:tiny_rgb_net", "arch_args": {"classes": 7},
            "weights": str(weights)}
    baselines.run(load_config(write_pipeline(baselines=[spec])))
    cfg = load_config(write_pipeline(baselines=[{"name": "sup", "kind": "supervised"},
                                                {**spec, "layers": ["stem", "stage3"]}]))
    enc = next(s for s in cfg.encoder_specs() if s.name == "mine")
    with pytest.raises(ExtractError) as e:
        extract_encoder(cfg, enc, build_table(cfg))
    assert "unknown layer 'stage3'" in str(e.value) and "fix baselines.1.layers" in str(e.value)
    assert "delete" not in str(e.value) and "cannot be loaded" not in str(e.value)


def test_load_resnet_weights_shows_the_files_stem_shape():
    torch.manual_seed(0)
    state = build_resnet("resnet18").state_dict()  # 3 channels, 7x7 stem
    small = build_resnet("resnet18", num_classes=1000, in_channels=1, small_input=True)
    with pytest.raises(ValueError, match=re.escape("conv1.weight has shape (64, 3, 7, 7), the model needs "
                                                   "(64, 1, 3, 3)")):
        load_resnet_weights(small, state, source="r18.pth")
    ok = build_resnet("resnet18", num_classes=1000, in_channels=1)
    load_resnet_weights(ok, state)  # adapted: the sum over RGB
    assert torch.allclose(ok.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))


def test_pretrained_needs_weights(write_pipeline):
    from sweep.config import ConfigError

    path = write_pipeline(baselines=[{"name": "p", "kind": "pretrained", "arch": "resnet18"}])
    with pytest.raises(ConfigError, match="weights"):  # from the config model or, failing that, the stage
        baselines.run(load_config(path))


def test_the_supervised_baseline_follows_pretrain_augment_and_keeps_its_key_when_on(write_pipeline):
    """`pretrain.augment: false` reaches the supervised baseline (its training loop, its key); with the default
    (true) the key is the one baselines trained before had, so they stay valid. SimCLR keeps its views."""
    specs = [{"name": "sup", "kind": "supervised", "arch": "resnet18", "epochs": 3, "batch_size": 16, "lr": 2.0e-3},
             {"name": "sim", "kind": "simclr"}]
    on = load_config(write_pipeline(baselines=specs))
    off = load_config(write_pipeline(baselines=specs, pretrain={"augment": False}))
    # the keys of this pipeline's baselines as computed before augment reached them (sweep d7f509a)
    assert [baselines.baseline_key(on, b) for b in on.baselines] == ["5f938dfac2760abd", "e27171f64856b816"]
    assert "augment" not in baselines.resolved(on, on.baselines[0])
    assert baselines.resolved(off, off.baselines[0])["augment"] is False  # what the training loop reads
    assert baselines.baseline_key(off, off.baselines[0]) != baselines.baseline_key(on, on.baselines[0])
    assert baselines.baseline_key(off, off.baselines[1]) == baselines.baseline_key(on, on.baselines[1])


def test_a_baseline_trained_with_other_settings_names_its_feature_store_too(write_pipeline, tmp_path):
    """The advice names the weights and the encoder's feature store (made from the old weights): deleting only
    the weights, the next run stopped again at extract."""
    cfg = load_config(write_pipeline(baselines=[{"name": "sup", "kind": "supervised", "epochs": 2}]))
    final = tmp_path / "store" / "baselines" / "sup" / "final"
    final.mkdir(parents=True)
    trained = load_config(write_pipeline(baselines=[{"name": "sup", "kind": "supervised", "epochs": 1}]))
    (final / "baseline.json").write_text(json.dumps({
        "key": baselines.baseline_key(trained, trained.baselines[0]),
        **baselines.trained_settings(trained, trained.baselines[0])}))
    with pytest.raises(baselines.BaselineError) as e:
        baselines.run(cfg)
    assert "settings.epochs: 1 -> 2" in str(e.value) and f"to retrain here, delete {final}" in str(e.value)
    assert "features" not in str(e.value)  # none extracted yet: nothing more to delete
    (tmp_path / "store" / "features" / "sup").mkdir(parents=True)
    with pytest.raises(baselines.BaselineError, match=re.escape(
            f"to retrain here, delete {final} and its features, {tmp_path / 'store' / 'features' / 'sup'}")):
        baselines.run(cfg)


# ---------------------------------------------------------------------------------- training on Ray

def _runs(cfg, name):
    mlflow.set_tracking_uri(tracking_uri(cfg))
    return mlflow.search_runs(experiment_names=[cfg.experiment_name],
                              filter_string=f"tags.`sweep.stage` = 'baselines' and tags.`sweep.baseline` = '{name}'")


@pytest.mark.ray
def test_supervised_trains_selects_on_val_and_reports_test_metrics(ray_local, write_pipeline):
    from sweep.data.table import build_table, training_images

    path = write_pipeline(baselines=[{"name": "sup", "kind": "supervised", "arch": "resnet18", "epochs": 3,
                                      "batch_size": 16, "lr": 2.0e-3}])
    cfg = load_config(path)
    n_test = int((build_table(cfg).frame["split"] == "test").sum())
    final = baselines.run(cfg)["sup"]
    meta = json.loads(open(f"{final}/baseline.json").read())
    assert meta["kind"] == "supervised" and meta["small_input"] is True and meta["in_channels"] == 1
    assert meta["classes"] == sorted(meta["classes"]) and len(meta["classes"]) == 6
    hist = meta["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["train_loss"] < 0.9 * hist[0]["train_loss"], hist
    m = meta["metrics"]
    best = max(hist, key=lambda h: h["val_macro_f1"])  # the first of equals
    assert m["best_epoch"] == best["epoch"] and m["val_macro_f1"] == best["val_macro_f1"]
    assert 0 <= m["test_acc"] <= 1 and 0 <= m["test_macro_f1"] <= 1 and m["test_images"] == n_test
    assert meta["training_images"] == training_images(build_table(cfg))  # compared by a rerun (below)

    # the kept weights carry BatchNorm statistics recomputed over the train split at their epoch (one batch
    # per worker here), not the running average of the training steps: the first layer's mean is the
    # mean of its input over the train images (up to the image repeated to give the workers equal shares)
    from safetensors.torch import load_file

    from sweep.data.preprocess import decode_rows

    state = load_file(f"{final}/model.safetensors")
    assert int(state["bn1.num_batches_tracked"]) == 1
    train = build_table(cfg).frame.query("split == 'train'")
    images, _ = decode_rows(train["path"].astype(str).tolist(), train["index"].astype(int).tolist(), 16, 1)
    net = build_resnet("resnet18", num_classes=6, in_channels=1, small_input=True)
    net.load_state_dict(state)
    with torch.no_grad():
        h = net.conv1(torch.from_numpy(images))
    mean, std = h.mean((0, 2, 3)), h.std((0, 2, 3))
    assert torch.allclose(state["bn1.running_mean"], mean, atol=0.05 * float(std.max()))

    runs = _runs(cfg, "sup")
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED" and run["tags.sweep.pipeline"] == "t"
    assert run["metrics.test_acc"] == pytest.approx(m["test_acc"])
    assert run["metrics.test_macro_f1"] == pytest.approx(m["test_macro_f1"])
    client = mlflow.tracking.MlflowClient()
    assert sorted(h.step for h in client.get_metric_history(run["run_id"], "epoch_train_loss")) == [1, 2, 3]
    assert len(client.get_metric_history(run["run_id"], "train_loss")) == hist[-1]["step"]

    # the encoder reads it back; a rerun skips the finished baseline
    enc = CNNEncoder(final)
    assert enc.kind == "supervised" and enc.name == "sup"
    assert enc.encode(torch.zeros(2, 1, 16, 16), ["a", "b"])["layer3"].shape == (2, 256)
    before = open(f"{final}/model.safetensors", "rb").read()
    assert main(["baselines", str(path)]) == 0
    assert open(f"{final}/model.safetensors", "rb").read() == before
    assert len(_runs(cfg, "sup")) == 1
    # other settings are refused before anything starts, naming what changed
    assert {k: meta[k] for k in ("settings", "data", "seed")} == baselines.trained_settings(cfg, cfg.baselines[0])
    longer = load_config(path, ["baselines.0.epochs=4", "seed=1"])
    with pytest.raises(baselines.BaselineError,
                       match=re.escape("(changed: seed: 0 -> 1; settings.epochs: 3 -> 4)")):
        baselines.run(longer)
    with pytest.raises(baselines.BaselineError, match=re.escape("(changed: settings.augment: (not set) -> False)")):
        baselines.run(load_config(path, ["pretrain.augment=false"]))  # trained with flips and rotations


@pytest.mark.ray
def test_simclr_reads_no_label_and_resumes_exactly(ray_local, write_pipeline, tmp_path, monkeypatch):
    """Run A: uninterrupted. Run B: the labels shuffled among the images, interrupted after epoch 1 and
    resumed by rerunning. A SimCLR that reads no label and resumes exactly gives bit-identical weights, on
    two DDP workers (each trains on the same images every run: `train_datasets`)."""
    from safetensors.torch import load_file

    import sweep.data.table as table_mod

    spec = {"name": "ssl", "kind": "simclr", "arch": "resnet18", "epochs": 2, "batch_size": 8, "lr": 2.0e-3}
    monkeypatch.setattr(baselines, "TRAIN_BLOCK_ROWS", 8)  # several blocks per worker, as on a real data set
    cfg = load_config(write_pipeline(baselines=[spec], pretrain={"workers": 2}))
    ds, _ = baselines.train_dataset(cfg, "simclr")
    assert set(ds.schema().names) == {"image", "row"}  # no label column at all

    final = baselines.run(cfg)["ssl"]
    meta = json.loads(open(f"{final}/baseline.json").read())
    assert meta["kind"] == "simclr" and "classes" not in meta and meta["num_classes"] == 0
    hist = meta["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] - 0.05, hist
    weights = load_file(f"{final}/model.safetensors")
    assert "fc.weight" not in weights and len(weights) == 120
    assert int(weights["bn1.num_batches_tracked"]) == 1  # statistics recomputed for the final weights
    assert CNNEncoder(final).kind == "simclr"

    real = table_mod.build_table

    def shuffled(config):
        table = real(config)
        perm = np.random.default_rng(1).permutation(len(table.frame))
        table.frame["label"] = table.frame["label"].to_numpy()[perm]
        return table

    monkeypatch.setattr(table_mod, "build_table", shuffled)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # run B logs to its own store
    cfg2 = load_config(write_pipeline(baselines=[spec], pretrain={"workers": 2}),
                       [f"storage={tmp_path / 'shuffled'}"])
    assert not shuffled(cfg2).frame["label"].equals(real(cfg2).frame["label"])
    monkeypatch.setenv(baselines.FAULT_ENV, "1")
    with pytest.raises(baselines.BaselineError, match="rerun to resume"):
        baselines.run(cfg2)
    monkeypatch.delenv(baselines.FAULT_ENV)
    final2 = baselines.run(cfg2)["ssl"]
    meta2 = json.loads(open(f"{final2}/baseline.json").read())
    assert [h["epoch"] for h in meta2["history"]] == [1, 2]
    assert [h["train_loss"] for h in meta2["history"]] == [h["train_loss"] for h in hist]
    weights2 = load_file(f"{final2}/model.safetensors")
    assert set(weights2) == set(weights)
    for k in weights:
        assert torch.equal(weights[k], weights2[k]), k
    assert len(_runs(cfg2, "ssl")) == 1  # the resumed training kept its MLflow run


@pytest.mark.ray
def test_the_lr_schedule_counts_the_steps_an_epoch_trains(ray_local, write_pipeline):
    """The warm-up + cosine schedule ends at lr 0 after the last step. Its length was counted from
    floor(images / workers) in batches of any size, but a worker trains ceil(images / workers) images (the
    equal parts of `train_datasets`) and skips a last batch of one: 61 images on one worker at 30 a batch
    train 2 steps an epoch (30, 30, a skipped 1) where 3 were counted, and the run ended at lr 0.25 x peak."""
    spec = {"name": "ssl", "kind": "simclr", "arch": "resnet18", "epochs": 1, "batch_size": 30, "lr": 2.0e-3}
    cfg = load_config(write_pipeline(baselines=[spec], pretrain={"workers": 1}))
    meta = json.loads(open(f"{baselines.run(cfg)['ssl']}/baseline.json").read())
    assert meta["history"][-1]["step"] == 2
    assert meta["history"][-1]["lr"] == 0.0
    for n, world, batch in [(61, 1, 30), (61, 1, 60), (61, 2, 16), (65, 2, 32), (66, 2, 32), (67, 2, 32),
                            (2, 1, 64), (1, 1, 64), (100, 3, 8)]:
        part = -(-n // world)  # `train_datasets`: equal parts, the first images repeated
        trained = sum(1 for i in range(0, part, batch) if min(batch, part - i) >= 2)
        assert baselines.steps_per_epoch(n, world, batch, ordered=True) == max(1, trained), (n, world, batch)


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt, "KILLED"), (RuntimeError, "FAILED")])
def test_an_interrupted_baselines_stage_ends_its_parent_run_killed(write_pipeline, monkeypatch, error, status):
    """Ctrl-C during the baselines ends the stage's parent run KILLED, as a baseline's own run and every other
    stage's (the parent ended FAILED: an interruption shown in MLflow as a failure); an error ends it FAILED."""
    from sweep import tracking

    config = load_config(write_pipeline(baselines=[{"name": "sup", "kind": "supervised", "arch": "resnet18",
                                                     "epochs": 1}]))

    def stopped(config, b, get_table, get_parent):
        get_parent()  # the stage's parent run is opened: a baseline with work to do
        raise error("stopped")

    monkeypatch.setattr(baselines, "run_baseline", stopped)
    with pytest.raises(error):
        baselines.run(config)
    runs = tracking.client_for(config).search_runs([tracking.ensure_experiment(config)],
                                                   f"tags.`{tracking.TAG_STAGE}` = 'baselines'")
    assert [r.info.status for r in runs] == [status]


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt, "KILLED"), (RuntimeError, "FAILED")])
def test_a_pretrained_baseline_stopped_while_saved_ends_its_run(write_pipeline, tmp_path, monkeypatch, error,
                                                                 status):
    """A pretrained baseline's own run ends KILLED on Ctrl-C while its weights are loaded and saved (seconds
    for a large file: hashed, read, written), FAILED on an error, as a trained baseline's run: Ctrl-C left it
    RUNNING (its error handling caught Exception only)."""
    from sweep import tracking

    weights = tmp_path / "r18.pth"
    torch.save(build_resnet("resnet18", num_classes=0).state_dict(), weights)
    config = load_config(write_pipeline(baselines=[{"name": "pre", "kind": "pretrained", "arch": "resnet18",
                                                     "weights": str(weights)}]))

    def stopped(*args, **kwargs):
        raise error("stopped")

    monkeypatch.setattr(baselines, "write_final", stopped)
    with pytest.raises((error, baselines.BaselineError)):
        baselines.run(config)
    runs = tracking.client_for(config).search_runs([tracking.ensure_experiment(config)],
                                                   f"tags.`{tracking.TAG_BASELINE}` = 'pre'")
    assert [r.info.status for r in runs] == [status]
