"""Pretraining: the pure training pieces, then one real Ray Train run (2 CPU workers) that is stopped by an
injected fault after its first checkpoint and rerun: it must end at exactly the configured step with the
optimiser state restored, log every step once, lower the loss, save a loadable EMA U-Net, and a further
rerun must do nothing."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, small_pipeline

from sweep.config import ConfigError, PipelineConfig, load_config
from sweep.encoders.base import checkpoint_hash
from sweep.stages import pretrain
from sweep.train.augment import flips_and_rotations
from sweep.train.loop import DDPMTrainer

STEPS, EVERY, FAULT_AT = 30, 10, 10


# ------------------------------------------------------------------------------------ pure pieces

def _trainer(seed: int = 0, **kw) -> DDPMTrainer:
    from sweep.encoders.diffusion import build_scheduler, build_unet

    torch.manual_seed(seed)
    args = {"lr": 2e-3, "total_steps": 10, "warmup_steps": 2, **kw}
    return DDPMTrainer(build_unet(16, 1, [16, 32], 1, [False, False]), build_scheduler(), **args)


def test_augment_applies_a_dihedral_transform_per_image():
    x = torch.arange(6 * 2 * 4 * 4, dtype=torch.float32).view(6, 2, 4, 4)
    y = flips_and_rotations(x, torch.Generator().manual_seed(1))
    for a, b in zip(x, y):
        group = [torch.rot90(f, k, dims=(-2, -1)) for f in (a, a.flip(-1)) for k in range(4)]
        assert any(torch.equal(b, g) for g in group)


def test_trainer_state_round_trip_continues_identically():
    """A trainer restored from a checkpoint takes the same next step as one that never stopped."""
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    a = _trainer()
    for _ in range(3):
        a.train_step(x)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # as the checkpoint does (state_dict() holds references)
    buf.seek(0)
    b = _trainer(seed=1)  # other initial weights: everything must come from the state
    b.load_state_dict(torch.load(buf, weights_only=False))
    assert b.step == 3 and b.optimizer.state_dict()["state"][0]["step"] == 3
    assert b.lr == pytest.approx(a.lr)
    la, lb = a.train_step(x), b.train_step(x)
    assert torch.equal(la, lb)
    for p, q in zip(a.raw.parameters(), b.raw.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(a.ema.shadow_params, b.ema.shadow_params):
        assert torch.equal(p, q)


def test_warmup_then_cosine_and_ema_lags():
    t = _trainer(total_steps=6, warmup_steps=2)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    lrs = []
    for _ in range(6):
        lrs.append(t.lr)
        t.train_step(x)
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-3) and lrs[2] == pytest.approx(2e-3)
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0  # cosine decay after the warm-up
    ema = t.ema_model()
    assert not ema.training and all(p.device.type == "cpu" for p in ema.parameters())
    diff = max((p - q).abs().max().item() for p, q in zip(ema.parameters(), t.raw.parameters()))
    assert diff > 0


def test_ema_decay_warms_up_and_is_only_a_cap():
    """README's `ema_decay` row: the EMA of step s decays by min(ema_decay, 1 - s^(-2/3)) (diffusers' EMA warm-up,
    s counted from 1, the first step copies the weights), so below the step where the warm-up passes the cap
    (31,623 for 0.999) `ema_decay` changes nothing: 0.999 and 0.99 give the same EMA over 10 steps."""
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    emas = []
    for decay in (0.999, 0.99):
        t = _trainer(ema_decay=decay)
        shadow = [p.detach().clone() for p in t.raw.parameters()]
        for s in range(1, 11):
            t.train_step(x)
            d = min(decay, 1 - s ** (-2 / 3))
            shadow = [d * e + (1 - d) * p.detach() for e, p in zip(shadow, t.raw.parameters())]
        for e, p in zip(shadow, t.ema_model().parameters()):
            torch.testing.assert_close(p.detach(), e)
        emas.append(shadow)
    assert all(torch.equal(a, b) for a, b in zip(*emas))
    assert 1 - 200 ** (-2 / 3) == pytest.approx(0.9708, abs=1e-4) and round(1000 ** 1.5) == 31_623


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_ddpm_loss_targets_what_the_schedule_says_the_unet_predicts(kind):
    """An `init_from` checkpoint's scheduler may say v_prediction: its training target is then v, not the
    noise (the folder saved with it says v_prediction, and its samples read it so)."""
    from diffusers import DDPMScheduler

    from sweep.encoders.diffusion import build_unet
    from sweep.train.ddpm import ddpm_loss

    torch.manual_seed(0)
    unet = build_unet(16, 1, [16, 32], 1, [False, False])
    scheduler = DDPMScheduler(prediction_type=kind)
    x0 = torch.rand(3, 1, 16, 16) * 2 - 1
    loss = ddpm_loss(unet, scheduler, x0, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the draws of ddpm_loss, by hand
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t].view(-1, 1, 1, 1)
    x_t = (abar.sqrt() * x0 + (1 - abar).sqrt() * eps).float()
    target = {"epsilon": eps, "v_prediction": (abar.sqrt() * eps - (1 - abar).sqrt() * x0).float(),
              "sample": x0}[kind]
    with torch.no_grad():
        expected = ((unet(x_t, t).sample - target) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)


class _FakeShard:
    """Images 0..n-1 (the value is the row), streamed in the order `order_seed` draws (Ray Data's order
    varies from run to run), or in row order."""

    def __init__(self, n: int, order_seed: int | None = None):
        self.data = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
        self.order = (torch.arange(n) if order_seed is None
                      else torch.randperm(n, generator=torch.Generator().manual_seed(order_seed)))
        self.reads = 0

    def iter_torch_batches(self, batch_size, **_):
        self.reads += 1
        for i in range(0, len(self.data), batch_size):
            rows = self.order[i: i + batch_size]
            yield {"image": self.data[rows], "row": rows}


def _epochs(stream, batches: int) -> dict[int, list]:
    out: dict[int, list] = {}
    for _ in range(batches):
        e, x = next(stream)
        out.setdefault(e, []).append(x.flatten().tolist())
    return out


def test_batches_cache_a_small_shard_and_reshuffle_it():
    shard = _FakeShard(10)
    epochs = _epochs(pretrain._batches(shard, batch_size=4, cache_limit_bytes=1 << 20, seed=0, rank=0), 9)
    assert list(epochs) == [0, 1, 2] and shard.reads == 1  # 3 epochs of 3 batches (4 + 4 + 2), one read
    assert epochs[0] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # epoch 0: the stream as it comes
    for batches in epochs.values():
        assert [len(b) for b in batches] == [4, 4, 2]
        assert sorted(sum(batches, [])) == list(range(10))  # every image once per epoch
    assert epochs[1] != epochs[2]


def _stream(shard, cache_limit, resume_at=None, batches=12):
    stream = pretrain._batches(shard, 4, cache_limit, seed=0, rank=0, resume_at=resume_at)
    return [(e, x.flatten().tolist()) for e, x in (next(stream) for _ in range(batches))]


@pytest.mark.parametrize("step", range(1, 12))
def test_a_run_resumed_at_any_step_trains_on_the_batches_an_uninterrupted_one_does(step):
    """A cached shard of 10 images in batches of 4: 3 steps an epoch. Resumed from a checkpoint at any step
    (inside an epoch or at its end), the run goes on with exactly the uninterrupted run's batches. Inside
    epoch 0 that is the stream again (Ray Data's is fixed for a seeded run, `train_datasets`); later, the
    resumed run's first pass may come in another order: it only fills the cache."""
    whole = _stream(_FakeShard(10, order_seed=1), 1 << 20)
    assert [e for e, _ in whole] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    epoch = whole[step - 1][0]  # a checkpoint's epoch: that of its last step
    shard = _FakeShard(10, order_seed=1 if epoch == 0 else 2)
    assert _stream(shard, 1 << 20, resume_at=(epoch, step), batches=12 - step) == whole[step:]
    assert shard.reads == 1


@pytest.mark.parametrize("step", [2, 3, 5])
def test_a_shard_too_big_to_cache_resumes_with_its_next_epoch_after_epoch_0(step):
    """Streamed every epoch (its split varies between runs anyway): inside epoch 0 the run trains the rest
    of the stream, later it starts the next epoch; every epoch still sees every image once."""
    whole = _stream(_FakeShard(10, order_seed=1), 8)
    epoch = whole[step - 1][0]
    resumed = _stream(_FakeShard(10, order_seed=1), 8, resume_at=(epoch, step), batches=6)
    if epoch == 0:
        assert resumed[:3 - step] == whole[step:3]
        resumed = resumed[3 - step:]
    assert [e for e, _ in resumed[:3]] == [epoch + 1] * 3
    assert sorted(sum((x for _, x in resumed[:3]), [])) == list(range(10))


def test_batches_stream_a_large_shard_every_epoch():
    shard = _FakeShard(10)
    stream = pretrain._batches(shard, batch_size=4, cache_limit_bytes=8, seed=0, rank=0)
    for _ in range(6):
        next(stream)
    assert shard.reads == 2


@pytest.mark.parametrize("n,workers,batch,steps", [(61, 2, 16, 200), (61, 2, 64, 200), (61, 1, 32, 30),
                                                    (10, 2, 4, 7), (12, 3, 4, 5), (9, 2, 3, 1)])
def test_images_drawn_counts_the_short_last_batch_of_each_epoch(n, workers, batch, steps):
    """The training budget of a U-Net (the report's and validate's `images_seen`): the images `_batches` hands
    the workers in `steps` steps, each worker's equal part (`train_datasets`) ending its epochs in a short batch.
    steps x global batch counted that batch as a full one: the demo's 200 steps x 16 x 2 read 6,400 images for
    the 6,200 drawn, and at 64 per worker (more than a worker's 31 images) 25,600 for 12,400."""
    part = -(-n // workers)
    drawn = 0
    for rank in range(workers):
        stream = pretrain._batches(_FakeShard(part), batch, 1 << 20, seed=0, rank=rank)
        drawn += sum(len(next(stream)[1]) for _ in range(steps))
    assert pretrain.images_drawn(steps, batch, workers, n) == drawn
    assert drawn <= steps * batch * workers
    if (n, workers, batch, steps) == (61, 2, 16, 200):
        assert drawn == 6_200
    if (n, workers, batch, steps) == (61, 2, 64, 200):
        assert drawn == 12_400


def test_batches_of_an_empty_shard_fail_instead_of_looping_forever():
    stream = pretrain._batches(_FakeShard(0), batch_size=4, cache_limit_bytes=8, seed=0, rank=1)
    with pytest.raises(RuntimeError, match="no training image reached worker 1"):
        next(stream)


def test_init_from_builds_the_checkpoint_model_and_must_fit_the_images(tmp_path, tiny_unet_checkpoint):
    unet, scheduler = pretrain._build_model({"init_from": str(tiny_unet_checkpoint)})
    assert unet.config.sample_size == 16 and scheduler.config.num_train_timesteps == 1000
    path = tmp_path / "p.yaml"
    raw = small_pipeline(tmp_path / "store", pretrain={"init_from": str(tiny_unet_checkpoint)})
    path.write_text(yaml.safe_dump(raw))
    pretrain._check_init_from(load_config(path))  # fits: 16 px, 1 channel
    with pytest.raises(pretrain.PretrainError, match="image_size=32"):
        pretrain._check_init_from(load_config(path, ["data.image_size=32"]))


def test_init_from_is_checked_before_any_stage(tmp_path, tiny_unet_checkpoint, capsys):
    """A checkpoint's U-Net written with a square size as a list ([16, 16], as diffusers writes a tuple) fits
    16 px images (it was refused: "a U-Net for 1-channel [16, 16]px images"), and its samples are drawn; a
    noise schedule of a prediction_type sweep does not train is an invalid config for `validate` and `sweep
    run` (exit 2, before any stage), where it failed at the first training step, once Ray had started."""
    import shutil

    from sweep.cli import main
    from sweep.encoders.diffusion import load_checkpoint
    from sweep.train.ddpm import sample

    square, odd = tmp_path / "square", tmp_path / "odd"
    for folder, edit in ((square, ("config.json", "sample_size", [16, 16])),
                         (odd, ("scheduler_config.json", "prediction_type", "flow"))):
        shutil.copytree(tiny_unet_checkpoint, folder)
        raw = json.loads((folder / edit[0]).read_text())
        (folder / edit[0]).write_text(json.dumps({**raw, edit[1]: edit[2]}))
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(small_pipeline(tmp_path / "store", pretrain={"init_from": str(square)})))
    assert pretrain.init_from_problem(load_config(path)) is None
    assert "1-channel 16px images" in pretrain.init_from_problem(load_config(path, ["data.image_size=32"]))
    unet, scheduler = load_checkpoint(square)
    assert sample(unet, dict(scheduler.config), n=2, steps=2).shape == (2, 1, 16, 16)
    for command in ("validate", "run"):
        assert main([command, str(path), "--set", f"pretrain.init_from={odd}"]) == 2
        err = capsys.readouterr().err
        assert f"the noise schedule of {odd} has prediction_type 'flow', which sweep does not train" in err, err
    assert not (tmp_path / "store").exists()  # refused before any storage was made


def test_model_from_the_pipeline_settings():
    unet, scheduler = pretrain._build_model({
        "init_from": None, "image_size": 16, "channels": 3,
        "model": {"block_out_channels": [8, 16, 16], "layers_per_block": 2, "attention": [False, True, False]},
        "scheduler": {"num_train_timesteps": 500, "beta_schedule": "cosine"}})
    assert unet.config.in_channels == unet.config.out_channels == 3
    assert list(unet.config.block_out_channels) == [8, 16, 16] and unet.config.layers_per_block == 2
    assert list(unet.config.down_block_types) == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2" and scheduler.config.num_train_timesteps == 500
    assert unet(torch.zeros(1, 3, 16, 16), torch.tensor([3])).sample.shape == (1, 3, 16, 16)


def test_fault_step_reaches_the_workers_through_the_loop_config(tmp_path, monkeypatch):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(small_pipeline(tmp_path / "store")))
    config = load_config(path)
    assert pretrain.loop_config(config, None)["fault_at_step"] == 0
    monkeypatch.setenv(pretrain.FAULT_ENV, "3")
    assert pretrain.loop_config(config, None)["fault_at_step"] == 3



def test_compile_is_a_gpu_setting_that_leaves_the_weights_key_alone(tmp_path):
    # on a CPU the trainer runs eager, the same steps as without the setting (the CUDA path: tests/test_cuda.py)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    eager, asked = _trainer(), _trainer(compile="reduce-overhead")
    assert asked.compile_mode is None and asked._forward_model(4) is asked.model
    assert torch.equal(eager.train_step(x), asked.train_step(x))
    # the key of the trained weights ignores it (as workers and use_gpu): a compiled run resumes an eager one
    raw = small_pipeline(tmp_path / "store")
    keys = set()
    for mode in ("none", "reduce-overhead"):
        raw["pretrain"]["compile"] = mode
        path = tmp_path / f"{mode}.yaml"
        path.write_text(yaml.safe_dump(raw))
        config = load_config(path)
        assert pretrain.loop_config(config, None)["compile"] == mode  # reaches the workers
        keys.add(pretrain.pretrain_key(config))
    assert len(keys) == 1
    raw["pretrain"]["compile"] = "fast"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="pretrain.compile"):
        load_config(tmp_path / "bad.yaml")

def test_the_weights_key_leaves_out_ood_data_and_bookkeeping(tmp_path):
    raw = small_pipeline(tmp_path / "store")
    base = pretrain.pretrain_key(PipelineConfig.model_validate(raw))
    same = [{"data": {**raw["data"], "ood": [{"name": "shifted", "source": "demo"}]}},
            {"pretrain": {**raw["pretrain"], "checkpoint_every": 5}},
            {"pretrain": {**raw["pretrain"], "max_failures": 3}}]
    for change in same:
        assert pretrain.pretrain_key(PipelineConfig.model_validate({**raw, **change})) == base, change
    other = [{"pretrain": {**raw["pretrain"], "steps": 7}}, {"seed": 1},
             {"data": {**raw["data"], "train": {**raw["data"]["train"], "splits": {"val": 0.1, "test": 0.2}}}}]
    for change in other:
        assert pretrain.pretrain_key(PipelineConfig.model_validate({**raw, **change})) != base, change


def test_a_unet_of_other_settings_is_refused_naming_what_changed(tmp_path):
    raw = small_pipeline(tmp_path / "store")
    config = PipelineConfig.model_validate(raw)
    marker = Path(config.storage_root) / "pretrain" / "final" / pretrain.PRETRAIN_MARKER
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"key": pretrain.pretrain_key(config), "steps": 6,
                                  "settings": pretrain.pretrain_settings(config)}))
    changed = PipelineConfig.model_validate(
        {**raw, "pretrain": {**raw["pretrain"], "steps": 9, "workers": 1},  # workers: not a result setting
         "data": {**raw["data"], "train": {**raw["data"]["train"], "regime": "balanced",
                                                                   "per_class": 10}}})
    with pytest.raises(pretrain.PretrainError) as err:
        pretrain.run(changed)
    message = str(err.value)
    assert ("(changed: data.train.per_class: None -> 10; data.train.regime: 'natural' -> 'balanced'; "
            "pretrain.steps: 6 -> 9)") in message, message
    assert f"delete {marker.parent}" in message and "--set storage=PATH" in message
    # a marker from before the settings were recorded: refused all the same, saying so
    marker.write_text(json.dumps({"key": "0" * 16, "steps": 6}))
    with pytest.raises(pretrain.PretrainError, match="its settings were not recorded"):
        pretrain.run(config)


def test_a_unet_finished_under_the_old_key_is_kept_and_recorded_under_the_new(tmp_path, capsys):
    """Until 2026-11-23 the key hashed data.ood, checkpoint_every and max_failures; a U-Net finished then is
    this config's, and once its marker carries today's key an OOD dataset may be added."""
    # the key sweep 0.1.0 (a590e8c) wrote for pipelines/demo.yaml
    assert pretrain.legacy_pretrain_key(load_config(REPO / "pipelines" / "demo.yaml")) == "2f65feea7c105d6a"
    raw = small_pipeline(tmp_path / "store")
    config = PipelineConfig.model_validate(raw)
    marker = Path(config.storage_root) / "pretrain" / "final" / pretrain.PRETRAIN_MARKER
    marker.parent.mkdir(parents=True)
    (marker.parent / "config.json").write_text("{}")
    marker.write_text(json.dumps({"key": pretrain.legacy_pretrain_key(config), "steps": 6}))
    content = checkpoint_hash(marker.parent)
    assert pretrain.run(config) == str(marker.parent)  # no Ray started: nothing to train
    assert "complete for this config, nothing to do" in capsys.readouterr().err
    # recorded beside the U-Net, whose files (and so the feature stores' checkpoint_hash) stay as they were
    assert checkpoint_hash(marker.parent) == content
    assert json.loads((marker.parent.parent / pretrain.KEY_ALIAS).read_text()) == {
        "marker_key": pretrain.legacy_pretrain_key(config), "key": pretrain.pretrain_key(config)}
    with_ood = PipelineConfig.model_validate(
        {**raw, "data": {**raw["data"], "ood": [{"name": "shifted", "source": "demo"}]}})
    assert pretrain.run(with_ood) == str(marker.parent)
    # other weights are still refused; the advice names the U-Net's feature store where there is one (deleting
    # the U-Net alone, the next run stopped again at extract)
    with pytest.raises(pretrain.PretrainError, match="trained with other settings") as refused:
        pretrain.run(PipelineConfig.model_validate({**raw, "seed": 3}))
    assert "features" not in str(refused.value)
    (Path(config.storage_root) / "features" / "diffusion").mkdir(parents=True)
    with pytest.raises(pretrain.PretrainError, match="trained with other settings") as refused:
        pretrain.run(PipelineConfig.model_validate({**raw, "seed": 3}))
    assert str(refused.value).endswith(f"delete {marker.parent} and its features, "
                                       f"{Path(config.storage_root) / 'features' / 'diffusion'}")
    # a U-Net trained again in its place (its marker under today's key) is not mistaken for the old one
    marker.write_text(json.dumps({"key": pretrain.pretrain_key(PipelineConfig.model_validate({**raw, "seed": 3})),
                                  "steps": 6}))
    with pytest.raises(pretrain.PretrainError, match="trained with other settings"):
        pretrain.run(config)


# ------------------------------------------------------------------------------------ real Ray Train

def _checkpoints(run_dir: Path) -> dict[int, Path]:
    return {int(p.name.rsplit("_", 1)[1]): p for p in run_dir.glob("checkpoint_*") if p.is_dir()}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, ray_local):
    """Run 1 stops (injected fault) after the checkpoint at step FAULT_AT; run 2 resumes and finishes;
    run 3 finds the finished U-Net and does nothing."""
    from sweep import tracking

    root = tmp_path_factory.mktemp("pretrain")
    raw = small_pipeline(root / "store", pretrain={
        "steps": STEPS, "checkpoint_every": EVERY, "lr": 2.0e-3, "warmup_steps": 2, "batch_size": 8,
        "workers": 2, "sample_grid": 4})
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    store = Path(config.storage_root)
    client = tracking.client_for(config)
    out: dict = {"config": config, "store": store, "client": client}

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(pretrain.FAULT_ENV, str(FAULT_AT))
        with pytest.raises(pretrain.PretrainError, match="injected fault"):
            pretrain.run(config)
    run_dirs = list((store / "pretrain").glob("run-*"))
    assert len(run_dirs) == 1
    out["run_dir"] = run_dir = run_dirs[0]
    out["after_fault"] = {
        "checkpoints": sorted(_checkpoints(run_dir)),
        "final": (store / "pretrain" / "final").exists(),
        "runs": [(r.info.run_id, r.info.status) for r in client.search_runs(
            [client.get_experiment_by_name(config.experiment_name).experiment_id])],
    }

    final = pretrain.run(config)
    assert Path(final) == store / "pretrain" / "final"

    before = {p.name: p.stat().st_mtime_ns for p in Path(final).iterdir()}
    t0 = time.perf_counter()
    pretrain.run(config)
    out["noop_s"] = time.perf_counter() - t0
    out["noop_unchanged"] = before == {p.name: p.stat().st_mtime_ns for p in Path(final).iterdir()}
    out["runs"] = client.search_runs([client.get_experiment_by_name(config.experiment_name).experiment_id])
    return out


@pytest.mark.ray
def test_steps_logged_before_a_lost_checkpoint_are_not_logged_again(write_pipeline, ray_local):
    """A run can fail right after rank 0 logged a window but before Ray Train registered that window's
    checkpoint (its controller saw the failure first): the rerun then starts before the window. Simulated by
    removing the Ray Train run folder after the fault: the rerun trains from step 0 again, and MLflow still
    holds every step once, the first attempt's values for the steps it had logged."""
    import shutil

    from sweep import tracking

    config = load_config(write_pipeline(pretrain={
        "steps": 2 * EVERY, "checkpoint_every": EVERY, "lr": 2.0e-3, "warmup_steps": 2, "batch_size": 8,
        "workers": 1, "sample_grid": 0}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(pretrain.FAULT_ENV, str(EVERY))
        with pytest.raises(pretrain.PretrainError, match="injected fault"):
            pretrain.run(config)
    client = tracking.client_for(config)
    (run,) = client.search_runs([client.get_experiment_by_name(config.experiment_name).experiment_id])
    first = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert sorted(first) == list(range(1, EVERY + 1))
    for run_dir in (Path(config.storage_root) / "pretrain").glob("run-*"):
        shutil.rmtree(run_dir)

    pretrain.run(config)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 2 * EVERY + 1))  # none twice, none lost
    assert {m.step: m.value for m in history if m.step <= EVERY} == first


@pytest.mark.ray
def test_fault_stops_after_the_first_checkpoint(pretrained):
    from sweep.data.table import build_table, training_images
    from sweep.stages.common import RUN_IMAGES_FILE

    after = pretrained["after_fault"]
    assert after["checkpoints"] == [FAULT_AT]
    assert not after["final"]
    assert [status for _, status in after["runs"]] == ["FAILED"]
    # the run folder records the images it trains on, for the resume to compare
    recorded = json.loads((pretrained["run_dir"] / RUN_IMAGES_FILE).read_text())
    assert recorded == training_images(build_table(pretrained["config"])) and recorded["images"] > 0


def test_a_run_resumed_over_other_training_images_is_refused(tmp_path):
    """The first start of a Ray Train run records its training images in the run folder; a resume over the
    same ones goes on, over others (an image removed: its class's split redrawn) it stops naming the folder
    and both counts; a supervised run also compares the labels."""
    from sweep.stages.common import RUN_IMAGES_FILE, check_run_images

    run = tmp_path / "run-abc"
    images = {"images": 3, "ids": "i1", "labels": "l1"}
    check_run_images("U-Net", str(run), images)
    assert json.loads((run / RUN_IMAGES_FILE).read_text()) == images
    check_run_images("U-Net", str(run), dict(images))  # the same images: resumes
    with pytest.raises(RuntimeError, match=rf"{re.escape(str(run))} holds an interrupted U-Net run trained on other "
                                           r"training images \(3 training images then, 2 now\)"):
        check_run_images("U-Net", str(run), {"images": 2, "ids": "i2", "labels": "l2"})
    relabelled = {**images, "labels": "l3"}
    check_run_images("simclr baseline", str(run), relabelled)  # no labels in a self-supervised run
    with pytest.raises(RuntimeError, match="trained on other training labels"):
        check_run_images("supervised baseline", str(run), relabelled, labels=True)


@pytest.mark.ray
def test_rerun_resumes_and_trains_every_step_exactly_once(pretrained):
    # one parent run, reused by the rerun, now finished
    runs = pretrained["runs"]
    assert len(runs) == 1 and runs[0].info.run_id == pretrained["after_fault"]["runs"][0][0]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["sweep.stage"] == "pretrain"
    client = pretrained["client"]
    for key in ("loss", "lr"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, STEPS + 1)), key  # none twice, none lost
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "images_per_s")) == [10, 20, 30]

    ckpts = _checkpoints(pretrained["run_dir"])
    assert sorted(ckpts) == [20, 30]  # num_to_keep=2
    state = torch.load(ckpts[STEPS] / pretrain.STATE_FILE, map_location="cpu", weights_only=False)
    assert state["step"] == STEPS
    assert state["lr_schedule"]["last_epoch"] == STEPS
    assert state["ema"]["optimization_step"] == STEPS
    # AdamW's own step count: the optimiser state was restored at step 10, not restarted
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {STEPS}
    assert state["window"]["steps"] == list(range(STEPS - EVERY + 1, STEPS + 1))


@pytest.mark.ray
def test_a_checkpoint_stored_but_not_registered_is_resumed_from(tmp_path, ray_local):
    """Ctrl-C between a worker storing a checkpoint and Ray Train's controller registering it left the run
    folder with checkpoints and no `checkpoint_manager_snapshot.json` (an audit's `sweep run`, stopped as
    step 20 of 60 was reported, kept checkpoint_000000020 and 40): Ray Train then hands no checkpoint and the
    rerun trained from step 0 again, writing over them. It now resumes from the newest stored one."""
    raw = small_pipeline(tmp_path / "store", pretrain={
        "steps": 20, "checkpoint_every": EVERY, "lr": 2.0e-3, "warmup_steps": 2, "batch_size": 8,
        "workers": 2, "sample_grid": 0})
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(pretrain.FAULT_ENV, str(EVERY))
        with pytest.raises(pretrain.PretrainError, match="injected fault"):
            pretrain.run(config)
    (run_dir,) = (Path(config.storage_root) / "pretrain").glob("run-*")
    (run_dir / "checkpoint_manager_snapshot.json").unlink()  # as the interrupted run leaves it: not registered
    stored = _checkpoints(run_dir)[EVERY] / pretrain.STATE_FILE
    before = (stored.stat().st_mtime_ns, stored.read_bytes())

    pretrain.run(config)
    # resumed: the step-10 checkpoint is the one stored before, not trained and stored again
    assert sorted(_checkpoints(run_dir)) == [EVERY, 20]
    assert (stored.stat().st_mtime_ns, stored.read_bytes()) == before
    state = torch.load(_checkpoints(run_dir)[20] / pretrain.STATE_FILE, map_location="cpu", weights_only=False)
    assert state["step"] == 20 and {int(s["step"]) for s in state["optimizer"]["state"].values()} == {20}


@pytest.mark.ray
def test_loss_falls(pretrained):
    run = pretrained["runs"][0]
    history = sorted(pretrained["client"].get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    loss = [m.value for m in history]
    early, late = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert late < 0.5 * early, (early, late)


@pytest.mark.ray
def test_final_is_the_ema_unet_and_loads_with_diffusers(pretrained):
    from diffusers import DDPMScheduler, UNet2DModel

    final = pretrained["store"] / "pretrain" / "final"
    unet = UNet2DModel.from_pretrained(final)
    scheduler = DDPMScheduler.from_pretrained(final)
    assert unet.config.sample_size == 16 and unet.config.in_channels == 1
    assert scheduler.config.num_train_timesteps == 1000
    marker = json.loads((final / pretrain.PRETRAIN_MARKER).read_text())
    assert marker["steps"] == STEPS and marker["key"] == pretrain.pretrain_key(pretrained["config"])
    assert marker["settings"] == pretrain.pretrain_settings(pretrained["config"])
    # the training budget: the images the workers drew (the run resumed half-way), as MLflow logged them
    run_id = pretrained["client"].search_runs(
        [pretrained["client"].get_experiment_by_name(pretrained["config"].experiment_name).experiment_id],
        filter_string="tags.`sweep.stage` = 'pretrain'")[0].info.run_id
    logged = pretrained["client"].get_metric_history(run_id, "images_seen")
    assert marker["images_seen"] == max(logged, key=lambda m: m.step).value
    assert marker["images_seen"] == pretrain.images_drawn(STEPS, 8, 2, marker["training_images"]["images"])

    state = torch.load(_checkpoints(pretrained["run_dir"])[STEPS] / pretrain.STATE_FILE, map_location="cpu",
                       weights_only=False)
    names = [n for n, _ in unet.named_parameters()]
    saved = dict(unet.named_parameters())
    # the saved weights are the EMA of the last step, and differ from the raw weights of that step
    for name, shadow in zip(names, state["ema"]["shadow_params"]):
        torch.testing.assert_close(saved[name].detach(), shadow)
    diff = max((saved[n].detach() - state["model"][n]).abs().max().item() for n in names)
    assert diff > 1e-4


@pytest.mark.ray
def test_samples_grid_is_an_artifact_of_the_pretrain_run(pretrained):
    run = pretrained["runs"][0]
    client = pretrained["client"]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["samples.png"]
    assert run.data.params["steps"] == str(STEPS) and run.data.params["workers"] == "2"


@pytest.mark.ray
def test_rerun_of_a_finished_pretrain_does_nothing(pretrained):
    assert pretrained["noop_unchanged"]
    assert pretrained["noop_s"] < 5
    assert sorted(_checkpoints(pretrained["run_dir"])) == [20, 30]
    assert len(pretrained["runs"]) == 1


@pytest.mark.ray
def test_a_seeded_run_stopped_inside_epochs_and_resumed_trains_the_unet_of_an_uninterrupted_one(
        ray_local, tmp_path, monkeypatch):
    """Each worker trains on the same images in the same order every run (`train_datasets`), and a resumed
    run goes on inside the epoch its checkpoint lies in (`_batches`). So a seeded run on two DDP workers,
    stopped by injected faults after its checkpoints at steps 3 and 6 (inside epochs 0 and 1: 31 images a
    worker in batches of 8 are 4 steps an epoch) and resumed each time, ends with the weights of a run that
    was never stopped, bit for bit. Blocks of 8 images: Ray Train's streaming split, which hands blocks to
    whichever worker asks first, gave different weights here; so did a resumed run that started the next
    epoch."""
    from safetensors.torch import load_file

    monkeypatch.setattr(pretrain, "TRAIN_BLOCK_ROWS", 8)
    weights = {}
    for run, faults in (("whole", ()), ("stopped", (3, 6))):
        config = PipelineConfig.model_validate(small_pipeline(tmp_path / run, pretrain={
            "steps": 8, "checkpoint_every": 3, "workers": 2, "sample_grid": 0}))
        for fault_at in faults:  # each attempt resumes from the last one's checkpoint
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv(pretrain.FAULT_ENV, str(fault_at))
                with pytest.raises(pretrain.PretrainError, match="injected fault"):
                    pretrain.run(config)
            run_dir, = (tmp_path / run / "pretrain").glob("run-*")
            assert max(_checkpoints(run_dir)) == fault_at
        final = pretrain.run(config)
        weights[run] = load_file(f"{final}/diffusion_pytorch_model.safetensors")
    assert set(weights["stopped"]) == set(weights["whole"])
    assert [k for k in weights["whole"] if not torch.equal(weights["whole"][k], weights["stopped"][k])] == []


# ------------------------------------------------------------------------------ unreadable training images

DEMO = REPO / "sweep" / "data" / "demo" / "plankton-flowcam-demo" / "images"


def _manifest_pipeline(tmp_path: Path, rows: list[tuple[str, str, str]]) -> PipelineConfig:
    manifest = tmp_path / "images.csv"
    manifest.write_text("path,label,split\n" + "".join(f"{p},{c},{s}\n" for p, c, s in rows))
    raw = small_pipeline(tmp_path / "store", data={
        "image_size": 16, "channels": 1, "train": {"name": "m", "source": "manifest", "path": str(manifest)}})
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def _demo_rows(classes=("Tripos", "Ciliophora"), train=4) -> list[tuple[str, str, str]]:
    rows = []
    for c in classes:
        files = sorted((DEMO / c).iterdir())
        rows += [(str(f), c, "train") for f in files[:train]]
        rows += [(str(files[train]), c, "val"), (str(files[train + 1]), c, "test")]
    return rows


@pytest.mark.ray
def test_unreadable_training_images_are_skipped_counted_and_named(ray_local, tmp_path, capsys):
    from sweep.stages.common import check_training_images, train_datasets

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    rows = _demo_rows() + [(str(broken), "Tripos", "train"), (str(tmp_path / "missing.png"), "Ciliophora", "train")]
    config = _manifest_pipeline(tmp_path, rows)
    dataset, listed = pretrain.train_dataset(config)
    assert listed == 10
    datasets, dataset_config, usable = train_datasets(dataset, config, listed)
    assert usable == 8 and sorted(datasets) == ["train_0", "train_1"]
    assert sum(d.count() for d in datasets.values()) == 8
    capsys.readouterr()
    assert check_training_images(config, "pretrain", listed, usable) == 8
    err = capsys.readouterr().err
    assert "pretrain: 2 of 10 training images unreadable, skipped" in err
    assert "broken.jpg" in err or "missing.png" in err
    assert check_training_images(config, "pretrain", listed, None) == 10  # streamed: not known before training
    with pytest.raises(RuntimeError, match="1 readable training image.*pretrain.workers=2"):
        check_training_images(config, "pretrain", listed, 1)


@pytest.mark.ray
def test_a_unet_trained_on_other_images_is_refused(ray_local, tmp_path):
    """The finished U-Net's marker records its training images (`training_images`): the same settings over a
    manifest that lost one training image find it trained on other images (it said "complete for this
    config", and the baselines and probes went on with it)."""
    rows = _demo_rows()
    config = _manifest_pipeline(tmp_path, rows)
    final = pretrain.run(config)
    from sweep.storage import PRETRAIN_MARKER

    marker = json.loads((Path(final) / PRETRAIN_MARKER).read_text())
    assert marker["training_images"]["images"] == 8
    assert pretrain.run(config) == final  # unchanged: complete
    gone = next(r for r in rows if r[2] == "train")
    config = _manifest_pipeline(tmp_path, [r for r in rows if r != gone])
    with pytest.raises(pretrain.PretrainError, match=r"trained on other training images \(8 training images then, "
                                                     r"7 now\)"):
        pretrain.run(config)


def test_a_supervised_model_is_also_told_apart_by_its_labels(write_pipeline):
    from sweep.data.table import build_table, training_images
    from sweep.stages.common import trained_on_other_images

    table = build_table(load_config(write_pipeline()))
    recorded = training_images(table)
    relabelled = type(table)(frame=table.frame.copy(), classes=list(table.classes))
    first = relabelled.frame.index[relabelled.frame["split"] == "train"][0]
    relabelled.frame.loc[first, "label"] = (relabelled.frame.loc[first, "label"] + 1) % len(table.classes)
    assert trained_on_other_images("a U-Net", recorded, lambda: table, "f") is None
    assert trained_on_other_images("a U-Net", recorded, lambda: relabelled, "f") is None  # no labels in a U-Net
    assert "trained on other training labels (61 training images then, 61 now)" in \
        trained_on_other_images("a supervised baseline", recorded, lambda: relabelled, "f", labels=True)
    assert trained_on_other_images("a U-Net", None, lambda: relabelled, "f") is None  # recorded by no earlier sweep


@pytest.mark.ray
def test_every_training_image_reaches_a_worker_when_they_do_not_divide_evenly(ray_local, tmp_path):
    """9 images on 2 workers: 5 each, the first image twice (Ray's equal split dropped the ninth, the same
    one every run)."""
    from sweep.stages.common import train_datasets

    config = _manifest_pipeline(tmp_path, _demo_rows(("Tripos", "Ciliophora", "Dinoflagellata"), train=3))
    dataset, listed = pretrain.train_dataset(config)
    datasets, _, usable = train_datasets(dataset, config, listed)
    assert listed == usable == 9
    rows = {name: sorted(int(r) for r in d.to_pandas()["row"]) for name, d in datasets.items()}
    assert [len(r) for r in rows.values()] == [5, 5]
    assert sorted(set(rows["train_0"]) | set(rows["train_1"])) == list(range(9))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_pretrain_with_no_readable_training_image_fails_at_once(ray_local, tmp_path):
    """It waited forever: each worker's shard was empty and its endless batch loop spun over nothing."""
    from sweep import tracking

    rows = [(str(tmp_path / f"gone-{i}.png"), c, "train") for i, c in enumerate("ABABAB")]
    rows += [(p, c, s) for p, c, s in _demo_rows(("Tripos", "Ciliophora"), train=0)]
    rows = [(p, {"Tripos": "A", "Ciliophora": "B"}.get(c, c), s) for p, c, s in rows]
    config = _manifest_pipeline(tmp_path, rows)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"pretrain: none of the 6 training images of data.train could be read; "
                                           r"e\.g\. '.*gone-0\.png': FileNotFoundError"):
        pretrain.run(config)
    assert time.perf_counter() - t0 < 120
    client = tracking.client_for(config)
    (run,) = client.search_runs([client.get_experiment_by_name(config.experiment_name).experiment_id])
    assert run.info.status == "FAILED"


def test_an_error_while_a_training_stage_sets_up_ends_its_run_as_failed(ray_local, tmp_path, monkeypatch):
    """An OSError between opening the stage's MLflow run and training (reading the images from a bucket that
    is gone) left the run RUNNING, in MLflow's UI a stage still at work; the U-Net's run and a baseline's."""
    from sweep import tracking
    from sweep.stages import baselines

    def gone(*args, **kwargs):
        raise OSError("Bucket 'gone' not found")

    config = PipelineConfig.model_validate(small_pipeline(
        tmp_path / "store", baselines=[{"name": "sup", "kind": "supervised", "epochs": 1}]))
    for stage in (pretrain, baselines):
        monkeypatch.setattr(stage, "train_dataset", gone)
        with pytest.raises(OSError, match="Bucket 'gone' not found"):
            stage.run(config)
    client = tracking.client_for(config)
    runs = client.search_runs([client.get_experiment_by_name(config.experiment_name).experiment_id])
    statuses = {r.data.tags.get(tracking.TAG_BASELINE) or r.data.tags[tracking.TAG_STAGE]: r.info.status
                for r in runs}
    assert statuses["pretrain"] == "FAILED" and statuses["sup"] == "FAILED", statuses


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ctrl_c_aborts_a_training_run_and_ends_as_interrupted(ray_local, tmp_path):
    """The first Ctrl-C during `fit` aborts the Ray Train run and ends in KeyboardInterrupt (the CLI's exit
    130), long before the loop would have ended; the process's SIGINT handler is its own again after."""
    import os
    import signal
    import threading

    import ray.train
    from ray.train.torch import TorchTrainer

    from sweep.stages.common import fit_interruptibly

    started = tmp_path / "started"

    def loop(cfg):
        Path(cfg["started"]).touch()
        time.sleep(120)

    def ctrl_c_once_training():
        while not started.exists():
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)

    trainer = TorchTrainer(loop, train_loop_config={"started": str(started)},
                           scaling_config=ray.train.ScalingConfig(num_workers=1),
                           run_config=ray.train.RunConfig(name="interrupted", storage_path=str(tmp_path / "runs")))
    # Python's own handler, as a `sweep` started from a terminal has (a test run started in the background by a
    # non-interactive shell ignores SIGINT, and a training stage then leaves it ignored)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=ctrl_c_once_training, daemon=True).start()
        t0 = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            fit_interruptibly(trainer, "test")
        assert started.exists() and time.perf_counter() - t0 < 100
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_process_that_ignores_ctrl_c_trains_on(ray_local, tmp_path):
    """Started with SIGINT ignored (a background job of a non-interactive shell), a training stage ignores it
    as Python and the other stages do: Ray Train's handler, then sweep's, stopped only pretraining and the
    baselines."""
    import os
    import signal

    import ray.train
    from ray.train.torch import TorchTrainer

    from sweep.stages.common import fit_interruptibly

    def loop(cfg):
        import time as t

        while not Path(cfg["started"]).exists():  # the driver's SIGINT is sent once the run is under way
            t.sleep(0.1)
        t.sleep(3)
        Path(cfg["started"]).with_name("done").touch()

    started = tmp_path / "started"
    trainer = TorchTrainer(loop, train_loop_config={"started": str(started)},
                           scaling_config=ray.train.ScalingConfig(num_workers=1),
                           run_config=ray.train.RunConfig(name="ignored", storage_path=str(tmp_path / "runs")))
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import threading

        def ctrl_c_while_training():
            while not (tmp_path / "runs" / "ignored").exists():
                time.sleep(0.2)
            started.touch()
            os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=ctrl_c_while_training, daemon=True).start()
        fit_interruptibly(trainer, "test")
        assert (tmp_path / "done").exists()  # the loop ran to its end
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_an_unreadable_latest_checkpoint_resumes_from_the_one_before(tmp_path, capsys):
    """The latest checkpoint cut short (a crash while it was stored): every rerun failed on it the same way
    while the one before was intact. The one before is used and said; with none readable, the run starts
    over."""
    import ray.train

    from sweep.stages.common import load_checkpoint_state

    run = tmp_path / "run-abc"
    for step in (20, 40):
        (run / pretrain.checkpoint_name(step)).mkdir(parents=True)
        torch.save({"step": step}, run / pretrain.checkpoint_name(step) / pretrain.STATE_FILE)
    latest = run / pretrain.checkpoint_name(40) / pretrain.STATE_FILE
    assert load_checkpoint_state(ray.train.Checkpoint(str(latest.parent)), pretrain.STATE_FILE, "pretrain",
                                 speak=True) == {"step": 40}
    assert capsys.readouterr().err == ""
    latest.write_bytes(latest.read_bytes()[:40])
    state = load_checkpoint_state(ray.train.Checkpoint(str(latest.parent)), pretrain.STATE_FILE, "pretrain", speak=True)
    assert state == {"step": 20}
    err = capsys.readouterr().err
    assert f"pretrain: the latest checkpoint cannot be read ({latest}: " in err
    assert f"resuming from the one before, {run / pretrain.checkpoint_name(20)}" in err
    earlier = run / pretrain.checkpoint_name(20) / pretrain.STATE_FILE
    earlier.write_bytes(b"")
    assert load_checkpoint_state(ray.train.Checkpoint(str(latest.parent)), pretrain.STATE_FILE, "pretrain",
                                 speak=True) is None
    assert "no checkpoint of this run can be read" in capsys.readouterr().err
    assert load_checkpoint_state(None, pretrain.STATE_FILE, "pretrain", speak=True) is None


def test_a_checkpoint_stored_after_the_registered_latest_is_resumed_from(tmp_path, capsys):
    """Ctrl-C lets the workers store checkpoints the controller never registers: an s3 demo stopped at step
    20 of 40 had 10 registered and 20 and 30 stored, and the rerun trained from step 10 again."""
    import ray.train

    from sweep.stages.common import load_checkpoint_state

    run = tmp_path / "run-abc"
    for step in (10, 20, 30):
        (run / pretrain.checkpoint_name(step)).mkdir(parents=True)
        torch.save({"step": step}, run / pretrain.checkpoint_name(step) / pretrain.STATE_FILE)
    registered = ray.train.Checkpoint(str(run / pretrain.checkpoint_name(10)))
    assert load_checkpoint_state(registered, pretrain.STATE_FILE, "pretrain", speak=True) == {"step": 30}
    assert f"{run / pretrain.checkpoint_name(30)} was stored but not registered" in capsys.readouterr().err
    (run / pretrain.checkpoint_name(30) / pretrain.STATE_FILE).write_bytes(b"")  # cut short: the one before
    assert load_checkpoint_state(registered, pretrain.STATE_FILE, "pretrain", speak=True) == {"step": 20}


def test_a_training_stage_stopped_by_a_full_storage_names_the_folder():
    """Seen on a demo whose storage filled up: Ray Train's checkpoint copy failed with 'OSError: [Errno 28] Error
    writing bytes to file. Detail: [errno 28] No space left on device', the U-Net's save with safetensors' 'I/O
    error: No space left on device (os error 28)': neither said where. Other causes are left as they are."""
    from sweep.stages.common import storage_cause

    seen = ["OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device",
            "safetensors._safetensors_rust.SafetensorError: Error while serializing: I/O error: No space left on "
            "device (os error 28)",
            "OSError: [Errno 30] Read-only file system: '/data/study/pretrain/run-1/checkpoint_000000010'"]
    for cause in seen:
        assert storage_cause(cause, "/data/study/pretrain") == f"{cause} (writing under /data/study/pretrain)"
    assert storage_cause("ValueError: loss is nan at step 28", "/s") == "ValueError: loss is nan at step 28"
