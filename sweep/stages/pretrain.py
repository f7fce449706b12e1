"""`sweep pretrain`: Ray Train (DDP) trains the diffusers U-Net on the training images, without labels.

The run is resumable: every `checkpoint_every` steps rank 0 reports a checkpoint (model, EMA, optimiser,
lr schedule, step, epoch) through `ray.train.report`; rerunning the stage with the same config finds the
latest one under `pretrain/` and continues to the configured step count. The EMA weights and the scheduler
end up in `pretrain/final/` (diffusers `save_pretrained`), written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from sweep import tracking
from sweep.config import PipelineConfig
from sweep.data.table import build_table
from sweep.features.store import fingerprint
from sweep.stages.common import init_ray, say
from sweep.storage import Storage, exists, read_json

FINAL_MARKER = "sweep_pretrain.json"
FAULT_ENV = "SWEEP_FAULT_AT_STEP"  # fault injection for resume tests: raise after this global step


class PretrainError(RuntimeError):
    pass


def pretrain_key(config: PipelineConfig) -> str:
    """What determines the trained weights: the pretrain section, the data and the seed."""
    return fingerprint(config.pretrain.model_dump(mode="json", exclude={"workers", "use_gpu", "cpus_per_worker",
                                                                        "sample_grid"}),
                       config.data.model_dump(mode="json"), config.seed)


# ------------------------------------------------------------------------------------ worker side

def _batches(shard, batch_size: int, cache_limit_bytes: int, seed: int, rank: int):
    """Endless (epoch, batch) stream. A shard that fits in `cache_limit_bytes` is read once and then
    reshuffled in memory each epoch (re-streaming a tiny set costs more than training on it)."""
    import torch

    cached: torch.Tensor | None = None
    epoch = 0
    while True:
        if cached is None:
            seen, size = [], 0
            for batch in shard.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=None):
                x = batch["image"]
                if size >= 0:
                    seen.append(x)
                    size += x.numel() * x.element_size()
                    if size > cache_limit_bytes:
                        seen, size = [], -1  # too big to cache: stream every epoch
                yield epoch, x
            if size >= 0 and seen:
                cached = torch.cat(seen)
        else:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch * 1009 + rank)
            perm = torch.randperm(len(cached), generator=g)
            for i in range(0, len(cached), batch_size):
                yield epoch, cached[perm[i: i + batch_size]]
        epoch += 1


def train_loop(cfg: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel
    from mlflow.tracking import MlflowClient

    from sweep.encoders.diffusion import build_scheduler, build_unet, load_checkpoint
    from sweep.train.augment import flips_and_rotations
    from sweep.train.ddpm import ddpm_loss

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg["seed"])
    device = ray.train.torch.get_device()
    use_cuda = device.type == "cuda"
    if not use_cuda:
        torch.set_num_threads(max(1, int(cfg["cpus_per_worker"])))

    if cfg["init_from"]:
        unet, scheduler = load_checkpoint(cfg["init_from"])
    else:
        m = cfg["model"]
        unet = build_unet(cfg["image_size"], cfg["channels"], m["block_out_channels"], m["layers_per_block"],
                          m["attention"])
        scheduler = build_scheduler(**cfg["scheduler"])
    ema = EMAModel(unet.parameters(), decay=cfg["ema_decay"], use_ema_warmup=True,
                   model_cls=type(unet), model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, cfg["warmup_steps"], cfg["steps"])
    step, start_epoch = 0, 0

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        step, start_epoch = state["step"], state["epoch"] + 1

    unet = unet.to(device)
    if use_cuda:
        unet = unet.to(memory_format=torch.channels_last)
    ema.to(device)
    model = ray.train.torch.prepare_model(unet)  # DDP (gloo on CPU, nccl on GPU)
    raw = model.module if hasattr(model, "module") else model

    client = MlflowClient(cfg["tracking_uri"]) if rank == 0 and cfg["run_id"] else None
    pending_metrics: list = []
    generator = torch.Generator().manual_seed(cfg["seed"] * 7919 + rank + 1000 * step)
    shard = ray.train.get_dataset_shard("train")
    fault_at = int(os.environ.get(FAULT_ENV, "0") or 0)

    model.train()
    images_seen, t0, losses = 0, time.perf_counter(), []
    stream = _batches(shard, cfg["batch_size"], cfg["cache_limit_bytes"], cfg["seed"], rank)
    for epoch, x in stream:
        if step >= cfg["steps"]:
            break
        epoch += start_epoch
        x = x.to(device)
        if cfg["augment"]:
            x = flips_and_rotations(x, generator)
        if use_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_cuda):
            loss = ddpm_loss(model, scheduler, x, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer.step()
        lr_schedule.step()
        ema.step(raw.parameters())  # the unwrapped model: EMA keys must not carry DDP's "module." prefix
        step += 1
        images_seen += x.shape[0] * world
        losses.append(loss.item())
        if client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            pending_metrics += [Metric("loss", losses[-1], now, step),
                                Metric("lr", lr_schedule.get_last_lr()[0], now, step)]
        if step % cfg["checkpoint_every"] == 0 or step == cfg["steps"]:
            elapsed = time.perf_counter() - t0
            metrics = {"step": step, "epoch": epoch, "loss": sum(losses) / len(losses),
                       "images_per_s": images_seen / elapsed if elapsed else 0.0}
            if client is not None:
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                pending_metrics.append(Metric("images_per_s", metrics["images_per_s"], now, step))
                client.log_batch(cfg["run_id"], metrics=pending_metrics)
                pending_metrics = []
            with tempfile.TemporaryDirectory() as d:
                ckpt = None
                if rank == 0:
                    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(),
                                "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
                                "step": step, "epoch": epoch}, Path(d) / "state.pt")
                    ckpt = ray.train.Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=ckpt)
            images_seen, t0, losses = 0, time.perf_counter(), []
            if fault_at and step >= fault_at:
                raise RuntimeError(f"injected fault at step {step} ({FAULT_ENV})")

    if rank == 0:
        _save_final(raw, ema, scheduler, cfg, client)


def _save_final(raw, ema, scheduler, cfg: dict, client) -> None:
    import copy

    from sweep.train.ddpm import image_grid, sample

    final = copy.deepcopy(raw).to("cpu").eval()
    ema.copy_to(final.parameters())
    final = final.to(memory_format=__import__("torch").contiguous_format)
    out = Path(cfg["final_dir"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    final.save_pretrained(tmp)
    scheduler.save_pretrained(tmp)
    (tmp / FINAL_MARKER).write_text(json.dumps({"key": cfg["key"], "steps": cfg["steps"]}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    if client is not None and cfg["sample_grid"]:
        with tempfile.TemporaryDirectory() as d:
            images = sample(final, dict(scheduler.config), cfg["sample_grid"], seed=cfg["seed"])
            image_grid(images, f"{d}/samples.png")
            client.log_artifact(cfg["run_id"], f"{d}/samples.png")


# ------------------------------------------------------------------------------------ driver side

def train_dataset(config: PipelineConfig):
    """Ray Data: the train split's images, decoded and preprocessed in parallel (corrupt ones dropped)."""
    import numpy as np
    import ray

    from sweep.stages.extract import decode_batch

    table = build_table(config)
    rows = table.frame[table.frame["split"] == "train"].assign(shard=0)
    block = 256
    chunks = [rows.iloc[i: i + block] for i in range(0, len(rows), block)]
    ds = ray.data.from_pandas(chunks).map_batches(
        decode_batch, fn_kwargs={"size": config.data.image_size, "channels": config.data.channels},
        batch_format="numpy")

    def keep_good(batch: dict) -> dict:
        ok = np.asarray([not e for e in batch["error"]])
        return {"image": batch["image"][ok]}

    return ds.map_batches(keep_good, batch_format="numpy"), len(rows)


def run(config: PipelineConfig) -> str:
    """Train (or resume) and return the final checkpoint folder."""
    import ray.train
    from ray.train.torch import TorchTrainer

    storage = Storage.of(config.storage_root)
    key = pretrain_key(config)
    marker = read_json(f"{storage.pretrain_final}/{FINAL_MARKER}")
    if marker is not None:
        if marker.get("key") == key:
            say(f"pretrain: {storage.pretrain_final} is complete for this config, nothing to do")
            return storage.pretrain_final
        raise PretrainError(
            f"{storage.pretrain_final} holds a U-Net trained with other settings; delete it to retrain "
            f"or set another storage"
        )
    if not storage.is_local:
        raise PretrainError("pretrain: remote storage for pretrain/final is not supported yet; use a shared folder")

    init_ray(config)
    run_id = tracking.start_stage_run(config, "pretrain")
    p = config.pretrain
    tracking.log_batch(config, run_id, params={
        "steps": p.steps, "batch_size": p.batch_size, "workers": p.workers, "lr": p.lr,
        "warmup_steps": p.warmup_steps, "ema_decay": p.ema_decay, "grad_clip": p.grad_clip,
        "block_out_channels": p.model.block_out_channels, "layers_per_block": p.model.layers_per_block,
        "attention": p.model.attention, "num_train_timesteps": p.scheduler.num_train_timesteps,
        "beta_schedule": p.scheduler.beta_schedule, "image_size": config.data.image_size,
        "channels": config.data.channels, "init_from": p.init_from})
    dataset, n_images = train_dataset(config)
    say(f"pretrain: {n_images} training images, {p.steps} steps x {p.batch_size} per worker x {p.workers} "
        f"worker(s){' on GPU' if p.use_gpu else ''}")
    loop_config = {
        **p.model_dump(mode="json"), "image_size": config.data.image_size, "channels": config.data.channels,
        "seed": config.seed, "final_dir": str(storage.local("pretrain", "final")), "key": key,
        "tracking_uri": tracking.tracking_uri(config), "run_id": run_id, "cache_limit_bytes": 2 << 30,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=p.workers, use_gpu=p.use_gpu,
                                               resources_per_worker={"CPU": p.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=f"run-{key}",  # same config -> same run folder -> Ray Train resumes its latest checkpoint
            storage_path=storage.pretrain_runs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=p.max_failures),
        ),
        datasets={"train": dataset},
    )
    try:
        result = trainer.fit()
    except Exception as e:
        tracking.finish_run(config, run_id, "FAILED")
        raise PretrainError(f"pretrain failed (rerun to resume from the last checkpoint): {e}") from e
    if not exists(f"{storage.pretrain_final}/{FINAL_MARKER}"):
        tracking.finish_run(config, run_id, "FAILED")
        raise PretrainError(f"pretrain ended without writing {storage.pretrain_final}")
    metrics = result.metrics or {}
    tracking.finish_run(config, run_id)
    say(f"pretrain: done at step {metrics.get('step')} (last loss {metrics.get('loss', float('nan')):.4f}); "
        f"U-Net saved to {storage.pretrain_final}")
    return storage.pretrain_final
