"""`sweep pretrain`: Ray Train (DDP) trains the diffusers U-Net on the training images, without labels.

The run is resumable: every `checkpoint_every` steps rank 0 reports a checkpoint (model, EMA, optimiser,
lr schedule, step, epoch) through `ray.train.report`. The Ray Train run folder is named after the settings
that determine the weights (`pretrain/run-<key>`), and Ray Train V2 reloads that folder's
`checkpoint_manager_snapshot.json` when a trainer with the same `RunConfig(name, storage_path)` starts, so
`ray.train.get_checkpoint()` hands the workers the latest checkpoint and the rerun continues to the
configured step count (checked against Ray 2.60's checkpoint manager; `resume_from_checkpoint=` is
deprecated in V2 and raises). Noise and augmentation are drawn per step and the batches of a cached shard
follow from the step (`_batches`), so a resumed run trains what an uninterrupted one would have trained.
The EMA weights and the scheduler end up in `pretrain/final/` (diffusers `save_pretrained`), written under a
temporary name and renamed.

MLflow (rank 0 only): per-step `loss` (mean over all workers, one all-reduce per report) and `lr` stamped
with the wall time each step ended, `images_per_s` and `images_seen` per report, all sent in one batch right
after each checkpoint is persisted, so a resumed run logs every step exactly once (the steps after the last
checkpoint are trained again and logged then, unless MLflow already has them: see `logged_before`); a sample
grid `samples.png` at the end. All of it goes to the stage's parent run.

Throughput (benchmarks/pretrain_throughput.py): the step itself is `sweep.train.loop.DDPMTrainer`, shared with
a plain-DDP loop in the benchmark; per step this loop adds no sync, no logging and no Ray call; a shard that
fits in memory is cached after its first epoch; a worker runs `cpus_per_worker` torch threads.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from pathlib import Path

from sweep.config import NOT_RESULTS, PipelineConfig
from sweep.stages.common import (Progress, WorkerMetrics, check_run_images, check_training_images, error_cause,
                                 fit_interruptibly, init_ray, load_checkpoint_state, quiet_dataset,
                                 quiet_train_reports, say, storage_cause, train_datasets, train_logging,
                                 train_shard, trained_on_other_images, trained_with_other_settings)
from sweep.storage import PRETRAIN_MARKER, Storage, exists, read_json, staged_dir, write_json

# Every Ray Train worker imports this module to run `train_loop`: MLflow (rank 0 only), the data table and
# the feature store are imported where they are used, not here.

STATE_FILE = "state.pt"
# Fault injection for resume tests: the workers raise after the first checkpoint at or past this step, unless
# the run resumed at or past it (so a rerun with the variable still set finishes). Read on the driver and sent
# in the loop config: the driver's environment does not reach the workers of an already running Ray.
FAULT_ENV = "SWEEP_FAULT_AT_STEP"
# pretrain/<KEY_ALIAS>: today's key of a U-Net finished under an older sweep's key (`legacy_pretrain_key`)
KEY_ALIAS = "final-key.json"
TRAIN_BLOCK_ROWS = 256  # training images per Ray Data block (a decode task's work)


class PretrainError(RuntimeError):
    pass


def pretrain_settings(config: PipelineConfig) -> dict:
    """What determines the trained weights: the pretrain section, the training data and the seed (not the
    OOD datasets, which only the probe reads: adding one keeps a finished U-Net). Recorded in the finished
    U-Net's marker, so that a later pipeline can be told which of them it changed."""
    return {"pretrain": config.pretrain.model_dump(mode="json", exclude=NOT_RESULTS["pretrain"]),
            "data": config.data.model_dump(mode="json", exclude={"ood"}), "seed": config.seed}


def pretrain_key(config: PipelineConfig) -> str:
    from sweep.features.store import fingerprint

    s = pretrain_settings(config)
    return fingerprint(s["pretrain"], s["data"], s["seed"])


def legacy_pretrain_key(config: PipelineConfig) -> str:
    """The key these settings had while it still hashed `data.ood`, `checkpoint_every` and `max_failures`
    (sweep 0.1.0 until 2026-11-23): a U-Net finished, or a run interrupted, under it is this config's."""
    from sweep.features.store import fingerprint

    return fingerprint(config.pretrain.model_dump(mode="json", exclude={"workers", "use_gpu", "cpus_per_worker",
                                                                        "sample_grid", "compile"}),
                       config.data.model_dump(mode="json"), config.seed)


def finished_key(storage: Storage, marker: dict) -> str | None:
    """The key of the finished U-Net whose marker is `marker`: today's key recorded for it in `KEY_ALIAS` when
    it was finished under an older key, else the marker's own."""
    alias = read_json(storage.uri("pretrain", KEY_ALIAS)) or {}
    return alias.get("key") if alias.get("marker_key") == marker.get("key") else marker.get("key")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:09d}"


def images_drawn(steps: int, batch_size: int, workers: int, n_images: int) -> int:
    """Training images the workers draw in `steps` steps from `n_images` split into equal parts
    (`train_datasets`: ceil(n / workers) each): every epoch of a worker's part is ceil(part / batch_size)
    batches, the last one short where the batch does not divide the part (`_batches`), so a step draws
    fewer than `batch_size` x `workers` images then (61 images on 2 workers at 16: 31 per worker, batches of
    16 and 15; 200 steps draw 6,200, not 6,400; at 64 a step draws 62). A set too big for that split is
    split by Ray Data while streaming: about this many."""
    if n_images <= 0 or steps <= 0:
        return 0
    part = -(-n_images // workers)
    per_epoch = -(-part // batch_size)
    epochs, batches = divmod(steps, per_epoch)
    return workers * (epochs * part + batches * batch_size)


# ------------------------------------------------------------------------------------ worker side

def _batches(shard, batch_size: int, cache_limit_bytes: int, seed: int, rank: int,
             resume_at: tuple[int, int] | None = None, shuffle_buffer: int | None = None):
    """Endless (epoch, batch) stream. A shard that fits in `cache_limit_bytes` is read once, put in a fixed
    order (its `row` column: not the order Ray Data's tasks finished in) and reshuffled in memory each later
    epoch with a generator seeded by (seed, epoch, rank) (re-streaming a small set through Ray Data costs
    more than training on it). Epoch 0 trains on the first pass as it streams. A larger shard is streamed
    every epoch through a local shuffle buffer.

    `resume_at`: (epoch, step) of the checkpoint a run resumes from, so that it trains on exactly the batches
    an uninterrupted run trains on from that step. Every epoch of a cached shard is ceil(rows / batch_size)
    steps, so the step says where in its epoch the run stopped: inside epoch 0, the run streams epoch 0
    again (the same seeded shuffle of the same fixed split, `train_datasets`) and trains from the first batch
    not trained yet; later, the first pass only fills the cache and the run goes on inside the permutation
    of its epoch. A shard too big to cache (its split varies anyway) goes on with the next epoch."""
    import torch

    epoch, skip = 0, 0  # the epoch to train and how many of its batches were trained before
    if resume_at is not None:
        last_epoch, step = resume_at
        # after epoch 0, the place of `step` in its epoch is known once the shard's size is: skip None
        epoch, skip = (0, step) if last_epoch == 0 else (last_epoch + 1, None)
    cached: torch.Tensor | None = None
    while cached is None:  # streamed passes, until one fits in the cache
        held, size, batches = [], 0, 0  # (rows, images) while the shard may fit in the cache
        for batch in shard.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=shuffle_buffer,
                                              local_shuffle_seed=seed * 1009 + epoch * 7 + rank):
            x = batch["image"]
            batches += 1
            if size >= 0:
                held.append((batch["row"], x))
                size += x.numel() * x.element_size()
                if size > cache_limit_bytes:  # too big to cache: every epoch streams
                    if skip is None:  # a resumed pass held its batches back: they train epoch `epoch`
                        skip = 0
                        for _, images in held[:-1]:
                            yield epoch, images
                    held, size = [], -1
            if skip is not None and batches > skip:
                yield epoch, x
        if not batches:  # an endless loop over nothing otherwise (every image of a streamed set unreadable)
            raise RuntimeError(f"no training image reached worker {rank}: are any of them readable?")
        if size >= 0:
            rows = torch.cat([r for r, _ in held])
            cached = torch.cat([images for _, images in held])[torch.argsort(rows)]
        else:
            epoch, skip = epoch + 1, 0
    per_epoch = -(-len(cached) // batch_size)
    if skip is None:  # resumed after epoch 0: `step` lies in epoch last_epoch, or ends it
        at_epoch, at_batch = divmod(step, per_epoch)
        epoch, skip = (at_epoch, at_batch) if at_epoch in (last_epoch, last_epoch + 1) else (last_epoch + 1, 0)
    else:  # the first pass trained its epoch
        epoch, skip = epoch + 1, 0
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch * 1009 + rank)
        perm = torch.randperm(len(cached), generator=g).to(cached.device)
        for i in range(skip * batch_size, len(cached), batch_size):
            yield epoch, cached[perm[i: i + batch_size]]
        epoch, skip = epoch + 1, 0


def _build_model(cfg: dict):
    from sweep.encoders.diffusion import build_scheduler, build_unet, load_checkpoint

    if cfg["init_from"]:
        return load_checkpoint(cfg["init_from"])
    m = cfg["model"]
    unet = build_unet(cfg["image_size"], cfg["channels"], m["block_out_channels"], m["layers_per_block"],
                      m["attention"])
    return unet, build_scheduler(**cfg["scheduler"])


def _window_metrics(window: dict, after_step: int = 0) -> list:
    """MLflow metrics of one reporting window (per-step loss and lr at the wall time each step ended)."""
    from mlflow.entities import Metric

    out = []
    for s, loss, lr, ts in zip(window["steps"], window["loss"], window["lr"], window["time"]):
        if s > after_step:
            out += [Metric("loss", loss, ts, s), Metric("lr", lr, ts, s)]
    if window["steps"] and window["steps"][-1] > after_step:
        for key in ("images_per_s", "images_seen"):
            if window.get(key) is not None:
                out.append(Metric(key, window[key], window["time"][-1], window["steps"][-1]))
    return out


def _last_logged_step(client, run_id: str) -> int:
    return max((m.step for m in client.get_metric_history(run_id, "loss")), default=0)


def _relog_lost_window(metrics_log, window: dict | None, logged: int) -> int:
    """After a resume: the last checkpoint's window may be persisted but not yet in MLflow (a crash
    between the report and the log); log exactly the steps MLflow lacks (it holds steps up to `logged`).
    Returns the last step MLflow holds now."""
    if not window or not window["steps"] or logged >= window["steps"][-1]:
        return logged
    metrics_log.log(_window_metrics(window, after_step=logged), f"step {window['steps'][-1]}, resumed")
    return window["steps"][-1]


class _FirstBatchInBackground:
    """Iterator wrapper that pulls the first item in a thread, so the Ray Data pipeline (its coordinator
    actor and decode tasks) starts while the worker imports diffusers and builds the model."""

    def __init__(self, it):
        import threading

        self._it, self._first, self._error = it, None, None
        self._thread = threading.Thread(target=self._pull, name="first-batch", daemon=True)
        self._thread.start()

    def _pull(self) -> None:
        try:
            self._first = next(self._it)
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
            self._error = e

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._error is not None:
                raise self._error
            first, self._first = self._first, None
            return first
        return next(self._it)


def train_loop(cfg: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    quiet_train_reports()
    # Ray Data hands the `row` column over as a read-only array; it is only sorted, never written
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type != "cuda":
        # one intra-op thread per reserved CPU: more threads than cores only contend with the other workers
        torch.set_num_threads(max(1, int(cfg["cpus_per_worker"])))

    # Ray Train V2: the latest checkpoint of this run folder, if any (an unreadable one: the one before)
    state = load_checkpoint_state(ray.train.get_checkpoint(), STATE_FILE, "pretrain", speak=rank == 0)
    stream = _batches(train_shard(cfg.get("ordered_split", False), rank), cfg["batch_size"],
                      cfg["cache_limit_bytes"], cfg["seed"], rank,
                      resume_at=(int(state["epoch"]), int(state["step"])) if state else None,
                      shuffle_buffer=cfg.get("shuffle_buffer"))
    if not state or state["step"] < cfg["steps"]:
        stream = _FirstBatchInBackground(stream)

    from sweep.train.loop import DDPMTrainer

    torch.manual_seed(cfg["seed"])  # every worker builds the same initial weights (DDP broadcasts rank 0's anyway)
    unet, scheduler = _build_model(cfg)
    trainer = DDPMTrainer(unet, scheduler, lr=cfg["lr"], total_steps=cfg["steps"],
                          warmup_steps=cfg["warmup_steps"], weight_decay=cfg["weight_decay"],
                          grad_clip=cfg["grad_clip"], ema_decay=cfg["ema_decay"], augment=cfg["augment"],
                          device=device, seed=cfg["seed"], rank=rank, compile=cfg["compile"])
    metrics_log = WorkerMetrics(cfg["tracking_uri"], cfg["run_id"], "pretrain") if rank == 0 and cfg["run_id"] \
        else None
    # Steps MLflow already holds are not logged again. Normally that is none past this start, but a run that
    # failed right after a report can have logged a window whose checkpoint Ray Train never registered (the
    # controller saw the failure first): this run starts before it, trains those steps again, logs them once.
    logged_before = _last_logged_step(metrics_log.client, cfg["run_id"]) if metrics_log is not None else 0
    if state is not None:
        trainer.load_state_dict(state)
        if rank == 0:
            say(f"pretrain: resuming at step {trainer.step}/{cfg['steps']} from the run's checkpoint")
        if metrics_log is not None:
            logged_before = _relog_lost_window(metrics_log, state.get("window"), logged_before)
        state = None
    start_step = trainer.step
    images_seen = trainer.extra.get("images_seen", 0)  # global count, for throughput and epochs
    trainer.wrap(lambda m: ray.train.torch.prepare_model(m, move_to_device=False))  # DDP: gloo on CPU, nccl on GPU

    steps, every = cfg["steps"], cfg["checkpoint_every"]
    fault_at = int(cfg.get("fault_at_step") or 0)
    trainer.model.train()

    losses, lrs, times, images = [], [], [], 0
    t_window = time.perf_counter()
    # between checkpoints (250 steps can be minutes on CPU cores), a line at most every PROGRESS_SECONDS
    progress = Progress("pretrain", steps, "steps", final=False) if rank == 0 else None
    while trainer.step < steps:
        trainer.epoch, x = next(stream)
        lrs.append(trainer.lr)  # the rate this step trains with
        losses.append(trainer.train_step(x))
        times.append(int(time.time() * 1000))
        images += x.shape[0]
        if trainer.step % every and trainer.step != steps:
            if progress is not None:
                progress.update(trainer.step, lambda: between_checkpoints(
                    trainer.step, losses, images * world, time.perf_counter() - t_window))
            continue

        # One collective per report: the exact mean loss over all workers for every step of the window,
        # the global image count, and a check that all workers are at the same global step.
        stats = torch.stack([*losses, torch.tensor(float(images), device=losses[0].device),
                             torch.tensor(float(trainer.step), device=losses[0].device)]).double()
        if world > 1 and dist.is_initialized():
            dist.all_reduce(stats)
        stats = stats.cpu().tolist()
        if stats[-1] != trainer.step * world:
            raise RuntimeError(f"workers disagree on the global step (rank {rank} at {trainer.step}, "
                               f"sum over {world} workers {stats[-1]:.0f})")
        elapsed = time.perf_counter() - t_window
        images_seen += int(stats[-2])
        trainer.extra["images_seen"] = images_seen
        window = {"steps": list(range(trainer.step - len(losses) + 1, trainer.step + 1)),
                  "loss": [v / world for v in stats[:-2]], "lr": lrs, "time": times,
                  "images_per_s": stats[-2] / elapsed if elapsed > 0 else 0.0, "images_seen": images_seen}
        metrics = {"step": trainer.step, "epoch": trainer.epoch,
                   "loss": sum(window["loss"]) / len(window["loss"]), "images_per_s": window["images_per_s"]}
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                torch.save({**trainer.state_dict(), "window": window}, Path(d) / STATE_FILE)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=checkpoint_name(trainer.step))
        if progress is not None:  # the stage's progress (Ray forwards a worker's lines to the driver)
            progress.seen(trainer.step)  # counted for the estimate, without a line of its own
            say(f"pretrain: step {trainer.step}/{steps}, loss {metrics['loss']:.4f}, "
                f"{metrics['images_per_s']:.0f} images/s{progress.eta(trainer.step)}")
            progress.said()
        # logged only once the checkpoint that covers these steps is persisted: a resumed run never
        # logs a step twice (steps after the last checkpoint are trained again, and logged then)
        if metrics_log is not None:
            metrics_log.log(_window_metrics(window, after_step=logged_before), f"step {trainer.step}")
        losses, lrs, times, images = [], [], [], 0
        if fault_at and start_step < fault_at <= trainer.step:
            raise RuntimeError(f"injected fault after the checkpoint at step {trainer.step} ({FAULT_ENV})")
        t_window = time.perf_counter()

    if rank == 0:
        _save_final(trainer, scheduler, {**cfg, "global_batch": cfg["batch_size"] * world}, metrics_log)


def between_checkpoints(step: int, losses: list, images: int, seconds: float) -> str:
    """The detail of a progress line between checkpoints, from rank 0's own steps since the last one: their
    mean loss (the checkpoint's line gives the mean over all workers) and the images per second of all
    workers, estimated as rank 0's times the workers (their shares are equal)."""
    first = step - len(losses) + 1
    loss = float(sum(losses)) / len(losses)  # one device sync (a line every PROGRESS_SECONDS at most)
    return (f"worker 0's loss {loss:.4f} over steps {first}-{step}, "
            f"~{images / seconds if seconds > 0 else 0.0:.0f} images/s")


def _save_final(trainer, scheduler, cfg: dict, metrics_log) -> None:
    from sweep.train.ddpm import image_grid, sample

    final = trainer.ema_model("cpu")
    with staged_dir(cfg["final_dir"], PRETRAIN_MARKER) as tmp:  # the marker last: whoever sees it sees it all
        final.save_pretrained(tmp)
        scheduler.save_pretrained(tmp)
        marker = {"key": cfg["key"], "steps": cfg["steps"], "settings": cfg["settings"],
                  "training_images": cfg.get("training_images"), "global_batch": cfg.get("global_batch"),
                  # the report's training budget: the images the workers drew, counted (a step draws fewer
                  # than the global batch at the short last batch of each worker's epoch: `images_drawn`)
                  "images_seen": trainer.extra.get("images_seen")}
        (tmp / PRETRAIN_MARKER).write_text(json.dumps(marker, indent=1))
    if metrics_log is None:
        return
    metrics_log.close()
    if cfg["sample_grid"] and not metrics_log.answers():
        say("pretrain: the sample grid is not logged (the MLflow server does not answer)")
    elif cfg["sample_grid"]:
        with tempfile.TemporaryDirectory() as d:
            images = sample(final.to(trainer.device), dict(scheduler.config), cfg["sample_grid"], seed=cfg["seed"])
            image_grid(images, f"{d}/samples.png")
            metrics_log.client.log_artifact(cfg["run_id"], f"{d}/samples.png")


# ------------------------------------------------------------------------------------ driver side

def train_dataset(config: PipelineConfig, table=None):
    """Ray Data: the train split's images of `table` (default: the pipeline's), decoded and preprocessed in
    parallel (corrupt ones dropped)."""
    import numpy as np
    import ray

    from sweep.data.table import build_table
    from sweep.stages.extract import decode_batch

    table = build_table(config) if table is None else table
    rows = table.frame[table.frame["split"] == "train"].assign(shard=0)
    # the table is ordered by class: mix it once here, so blocks (and a streamed epoch) are not one class each
    rows = rows.sample(frac=1.0, random_state=config.seed)
    # `row`: the place in that order, by which a worker sorts the images it caches (`_batches`)
    rows = rows.assign(row=np.arange(len(rows), dtype=np.int64))[["path", "index", "row"]]
    chunks = [rows.iloc[i: i + TRAIN_BLOCK_ROWS] for i in range(0, len(rows), TRAIN_BLOCK_ROWS)]
    ds = ray.data.from_pandas(chunks).map_batches(
        decode_batch, fn_kwargs={"size": config.data.image_size, "channels": config.data.channels},
        batch_format="numpy")

    def keep_good(batch: dict) -> dict:
        ok = np.asarray([not e for e in batch["error"]])
        return {"image": batch["image"][ok], "row": batch["row"][ok]}

    return quiet_dataset(ds.map_batches(keep_good, batch_format="numpy")), len(rows)


def init_from_problem(config: PipelineConfig) -> str | None:
    """Why `pretrain.init_from` cannot be trained on for this pipeline, or None: its U-Net must fit the images
    (sample size, a square [s, s] too, and channels) and its noise schedule predict what `ddpm_loss` trains
    (an unknown `prediction_type` failed at the first training step, after Ray and the workers had started)."""
    from sweep.encoders.checks import local_unet_config
    from sweep.train.ddpm import PREDICTION_TYPES

    path = config.pretrain.init_from
    found = local_unet_config(path)
    if found is None:
        return f"pretrain.init_from: no diffusers U-Net config in {path}"
    unet, scheduler = found
    size, channels = unet.get("sample_size"), unet.get("in_channels")
    if isinstance(size, list) and len(set(size)) == 1:  # diffusers writes a tuple size as a list
        size = size[0]
    if size not in (None, config.data.image_size) or channels != config.data.channels:
        return (f"pretrain.init_from: {path} is a U-Net for {channels}-channel {size}px images, but the pipeline "
                f"has data.channels={config.data.channels} and data.image_size={config.data.image_size}")
    kind = scheduler.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        return (f"pretrain.init_from: the noise schedule of {path} has prediction_type {kind!r}, which sweep "
                f"does not train ({', '.join(PREDICTION_TYPES)})")
    return None


def _check_init_from(config: PipelineConfig) -> None:
    problem = init_from_problem(config)
    if problem:
        raise PretrainError(problem)


def loop_config(config: PipelineConfig, run_id: str | None, key: str | None = None,
                training_images: dict | None = None) -> dict:
    """The `train_loop_config` of every worker (plain JSON values)."""
    from sweep import tracking

    storage = Storage.of(config.storage_root)
    p = config.pretrain
    fault = os.environ.get(FAULT_ENV, "").strip()
    return {
        **p.model_dump(mode="json"), "image_size": config.data.image_size, "channels": config.data.channels,
        "seed": config.seed, "final_dir": storage.pretrain_final, "key": key or pretrain_key(config),
        "settings": pretrain_settings(config), "training_images": training_images,
        "tracking_uri": tracking.tracking_uri(config), "run_id": run_id, "cache_limit_bytes": 2 << 30,
        "shuffle_buffer": 4 * p.batch_size,
        # passed explicitly: env vars of the driver do not reach workers of a running (or remote) Ray
        "fault_at_step": int(fault) if fault else 0,
    }


def make_trainer(config: PipelineConfig, run_id: str | None, datasets: dict, dataset_config, key: str | None = None,
                 training_images: dict | None = None):
    """The stage's TorchTrainer over the training images as `train_datasets` gives them (`training_images`:
    what the finished U-Net's marker records of them)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    storage = Storage.of(config.storage_root)
    key = key or pretrain_key(config)
    p = config.pretrain
    return TorchTrainer(
        train_loop,
        train_loop_config={**loop_config(config, run_id, key, training_images),
                           "ordered_split": dataset_config is not None},
        scaling_config=ray.train.ScalingConfig(num_workers=p.workers, use_gpu=p.use_gpu,
                                               resources_per_worker={"CPU": p.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            # same settings -> same run folder -> Ray Train V2 hands its latest checkpoint to get_checkpoint()
            name=f"run-{key}",
            storage_path=storage.pretrain_runs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=p.max_failures),
            logging_config=train_logging(),
        ),
        datasets=datasets,
        dataset_config=dataset_config,
    )


def run(config: PipelineConfig) -> str:
    """Train (or resume) and return the final checkpoint folder."""
    from sweep.data.table import build_table, training_images

    storage = Storage.of(config.storage_root)
    key, legacy = pretrain_key(config), legacy_pretrain_key(config)
    marker = read_json(f"{storage.pretrain_final}/{PRETRAIN_MARKER}")
    if marker is not None:
        done = finished_key(storage, marker)
        if done == legacy != key:
            # finished under an older sweep's key: recorded as today's beside the folder, whose files stay
            # as they are (their content hash keys the feature stores)
            write_json(storage.uri("pretrain", KEY_ALIAS), {"marker_key": done, "key": key})
            done = key
        if done == key:
            problem = trained_on_other_images("a U-Net", marker.get("training_images"),
                                              lambda: build_table(config), storage.pretrain_final)
            if problem:
                raise PretrainError(f"pretrain: {problem}")
            say(f"pretrain: {storage.pretrain_final} is complete for this config, nothing to do")
            return storage.pretrain_final
        raise PretrainError(trained_with_other_settings("a U-Net", marker.get("settings"),
                                                        pretrain_settings(config), storage.pretrain_final,
                                                        features=storage.features("diffusion")))
    p = config.pretrain
    if p.init_from:
        _check_init_from(config)

    from sweep import tracking  # MLflow: only once there is something to train

    init_ray(config, dashboard=True)  # Ray Train
    run_id = tracking.start_stage_run(config, "pretrain", params={
        "steps": p.steps, "batch_size": p.batch_size, "workers": p.workers, "lr": p.lr,
        "warmup_steps": p.warmup_steps, "weight_decay": p.weight_decay, "ema_decay": p.ema_decay,
        "grad_clip": p.grad_clip, "augment": p.augment, "checkpoint_every": p.checkpoint_every,
        "block_out_channels": p.model.block_out_channels, "layers_per_block": p.model.layers_per_block,
        "attention": p.model.attention, "num_train_timesteps": p.scheduler.num_train_timesteps,
        "beta_schedule": p.scheduler.beta_schedule, "image_size": config.data.image_size,
        "channels": config.data.channels, "init_from": p.init_from, "seed": config.seed,
        "compile": p.compile if p.use_gpu else "none"})
    with tracking.ended_on_error(config, run_id):
        table = build_table(config)
        dataset, listed = train_dataset(config, table)
        datasets, dataset_config, usable = train_datasets(dataset, config, listed)
        n_images = check_training_images(config, "pretrain", listed, usable)
        say(f"pretrain: {n_images} training images, {p.steps} steps x {p.batch_size} per worker x {p.workers} "
            f"worker(s){' on GPU' if p.use_gpu else ''}")
        if p.compile != "none":
            say(f"pretrain: torch.compile mode {p.compile} (the first steps wait for the compilation)" if p.use_gpu
                else f"pretrain: compile {p.compile} applies on GPU workers only (use_gpu is false): running eager")
        if key != legacy and exists(f"{storage.pretrain_runs}/run-{legacy}") \
                and not exists(f"{storage.pretrain_runs}/run-{key}"):
            key = legacy  # a run interrupted under an older sweep's key: resume it, in its folder
        try:
            check_run_images("U-Net", f"{storage.pretrain_runs}/run-{key}", training_images(table))
        except RuntimeError as e:
            raise PretrainError(f"pretrain: {e}") from None
        trainer = make_trainer(config, run_id, datasets, dataset_config, key, training_images(table))
        t0 = time.perf_counter()
        try:
            result = fit_interruptibly(trainer, "pretrain")
        except Exception as e:
            raise PretrainError(f"pretrain failed (rerun to resume from the last checkpoint): "
                                f"{storage_cause(error_cause(e), storage.pretrain_runs)}") from e
        if not exists(f"{storage.pretrain_final}/{PRETRAIN_MARKER}"):
            raise PretrainError(f"pretrain ended without writing {storage.pretrain_final}")
    seconds = time.perf_counter() - t0
    tracking.finish_run(config, run_id)
    say(f"{done_line(result.metrics or {}, p.steps, p.checkpoint_every, seconds)}; U-Net saved to "
        f"{storage.pretrain_final}")
    return storage.pretrain_final


def done_line(metrics: dict, steps: int, every: int, seconds: float) -> str:
    """The stage's summary from the last report's `metrics`: the loss and images/s it gives are those of the
    steps since the checkpoint before it ("last loss 0.0663, 62.6 images/s" read as the last step's loss
    and the run's rate)."""
    step = int(metrics.get("step", steps))
    if "loss" not in metrics:  # resumed after its last step (stopped while saving): nothing trained this time
        return f"pretrain: done at step {step} in {seconds:.0f}s (every step was trained before this run)"
    first = (step - 1) // every * every + 1
    return (f"pretrain: done at step {step} in {seconds:.0f}s (steps {first}-{step}: mean loss "
            f"{metrics.get('loss', float('nan')):.4f}, {metrics.get('images_per_s', float('nan')):.1f} images/s)")
