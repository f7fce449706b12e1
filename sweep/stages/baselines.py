"""`sweep baselines`: baseline encoders trained under a budget comparable to the U-Net's, on the same images.

Each entry of `baselines:` is one of

- `supervised`: a ResNet trained from scratch with cross-entropy on the train split (Ray Train, DDP, the same
  workers / GPU / CPU settings as pretraining and, as `pretrain.augment` says, the same flip + 90-degree-
  rotation augmentation). After each epoch every worker scores its share of the val split; the epoch with
  the best `probe.select` metric (val_macro_f1 or val_acc) is kept, and its end-to-end test accuracy /
  macro F1 / balanced accuracy are logged to MLflow (`test_acc`, `test_macro_f1`, `test_balanced_acc`): the
  supervised reference.
- `simclr`: the same backbone + a projection head trained with NT-Xent on two augmented views of each image
  (`sweep.train.simclr`). Labels never reach it: its Ray Data dataset has only the image and a row number.
- Both recompute their BatchNorm statistics over a sample of the train split (every k-th row, about 1,024
  images per worker) with the weights as they are before each evaluation and before saving
  (`sweep.train.precise_bn`): evaluation and the extracted features see statistics of the final weights,
  not an average over training steps taken while the weights moved.
- `pretrained`: the architecture with weights from a local file (`weights`: a state dict, `.pth`/`.pt`/
  `.safetensors`); nothing is trained or downloaded. `arch` is a built-in ResNet (torchvision/timm-format
  weights, conv1 adapted to the data's channels), or `torchvision:<name>`, `timm:<name>`, `<module>:<callable>`
  (`sweep.encoders.zoo`: the model is built without weights, then every key of the file is loaded).

Outputs (DESIGN "Storage layout"): `baselines/<name>/final/` holds `model.safetensors` (the model's state
dict: torchvision-format for a built-in ResNet, no `fc` for SimCLR) and `baseline.json` (arch, in_channels,
small_input, kind, classes for a supervised baseline, metrics and per-epoch history), written under a
temporary name and renamed. Ray Train
checkpoints (model, optimiser, lr schedule, epoch, best-val weights) go to `baselines/<name>/run-<key>/`; a
rerun resumes from the latest one, and a baseline whose `final/` matches its settings is skipped. Each
baseline has its own MLflow run (tags `sweep.stage=baselines`, `sweep.baseline=<name>`) with loss curves.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from sweep import tracking
from sweep.config import BaselineConfig, PipelineConfig
from sweep.data.table import training_images
from sweep.encoders import zoo
from sweep.encoders.cnn import META_FILE, WEIGHTS_FILE
from sweep.features.store import fingerprint
from sweep.stages.common import (PROGRESS_SECONDS, Progress, WorkerMetrics, check_run_images, check_training_images,
                                 error_cause, fit_interruptibly, init_ray, load_checkpoint_state, quiet_dataset,
                                 quiet_train_reports, say, storage_cause, train_datasets, train_logging,
                                 train_shard, trained_on_other_images, trained_with_other_settings)
from sweep.storage import Storage, exists, read_json, staged_dir
from sweep.train.precise_bn import bn_sample_every, recalibrate_batchnorm

FAULT_ENV = "SWEEP_BASELINE_FAULT_AT_EPOCH"  # fault injection for resume tests: fail after this epoch
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WARMUP_FRACTION = 0.05  # linear lr warm-up over this share of the steps, then cosine decay to 0
EVAL_BATCH = 256
TRAIN_BLOCK_ROWS = 256  # training images per Ray Data block (a decode task's work)


class BaselineError(RuntimeError):
    pass


def resolved(config: PipelineConfig, b: BaselineConfig) -> dict:
    """Every setting of a trained baseline, defaults filled in."""
    small = b.small_input
    if small is None:
        from sweep.encoders.resnet import default_small_input

        small = default_small_input(config.data.image_size)
    return {"kind": b.kind, "arch": b.arch, "epochs": b.epochs, "batch_size": b.batch_size, "lr": b.lr,
            "weight_decay": b.weight_decay, "small_input": bool(small),
            "in_channels": config.data.channels, "image_size": config.data.image_size,
            **({"temperature": b.temperature, "projection_dim": b.projection_dim}
               if b.kind == "simclr" else {}),
            **({"select": config.probe.select} if b.kind == "supervised" else {}),
            # the supervised baseline augments as the U-Net does (pretrain.augment); recorded only when off, so
            # that the key of a baseline trained before this setting reached it stays the same
            **({"augment": False} if b.kind == "supervised" and not config.pretrain.augment else {})}


def trained_settings(config: PipelineConfig, b: BaselineConfig) -> dict:
    """What determines a trained baseline's weights: its settings, the main dataset and the seed (not the
    worker count, the OOD sets, the layers extracted later or where it is stored). Recorded in its
    baseline.json, so that a later pipeline can be told which of them it changed."""
    return {"settings": resolved(config, b), "data": config.data.model_dump(mode="json", exclude={"ood"}),
            "seed": config.seed}


def baseline_key(config: PipelineConfig, b: BaselineConfig) -> str:
    if b.kind == "pretrained":
        from sweep.encoders.base import checkpoint_hash

        return fingerprint("pretrained", b.arch, checkpoint_hash(b.weights), b.small_input,
                           b.normalize, config.data.channels, config.data.image_size,
                           *([b.arch_args] if b.arch_args else []),
                           # only where given: the key of a baseline built before the setting existed stays
                           *([{"input_size": b.input_size}] if b.input_size else []))
    s = trained_settings(config, b)
    return fingerprint(s["settings"], s["data"], s["seed"])


# ------------------------------------------------------------------------------------ final folder

def write_final(out: str | Path, state: dict, meta: dict) -> None:
    """Weights + baseline.json into `out` (a local folder or a URI); baseline.json, the completion marker,
    appears last (see `storage.publish_dir`)."""
    from safetensors.torch import save_file

    with staged_dir(str(out), META_FILE) as tmp:
        # clone: safetensors refuses tensors that share memory (tied weights in some timm/torchvision models)
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def confusion_metrics(conf, prefix: str) -> dict[str, float]:
    """`<prefix>_acc`, `_macro_f1` and `_balanced_acc` (F1 and recall averaged over the classes present, as
    `sweep.probing.metrics`) from a confusion matrix (true x predicted)."""
    conf = np.asarray(conf, dtype=np.float64)
    n = conf.sum()
    if n == 0:
        return {f"{prefix}_acc": float("nan"), f"{prefix}_macro_f1": float("nan"),
                f"{prefix}_balanced_acc": float("nan")}
    tp = np.diag(conf)
    rows, cols = conf.sum(1), conf.sum(0)
    denom = rows + cols
    present = rows > 0
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return {f"{prefix}_acc": float(tp.sum() / n), f"{prefix}_macro_f1": float(f1[present].mean()),
            f"{prefix}_balanced_acc": float((tp[present] / rows[present]).mean())}


# ------------------------------------------------------------------------------------ worker side

class _TrainShard:
    """This worker's Ray Data shard as epochs of batches (dicts of tensors).

    A shard that fits in `cache_limit` bytes is read once, put in a fixed order (by its `row` column, so the
    order does not depend on which Ray Data task finished first) and reshuffled in memory each epoch with a
    generator seeded by (seed, epoch, rank): with the fixed split of `train_datasets` (a training set that
    fits in memory) a seeded run on the same workers is reproducible and a resumed one continues
    exactly. A larger shard is streamed every epoch (in Ray Data's order).
    """

    def __init__(self, shard, batch_size: int, cache_limit: int, sample_every: int = 1):
        self.shard, self.batch_size, self.cache_limit = shard, batch_size, cache_limit
        self.cached: dict | None = None
        self.streaming = False
        self.sample_every = sample_every
        self._sample: list = []  # (rows, images) of the sample, kept while the first epoch streams
        self.sampled = False  # the first epoch streamed to its end: `_sample` is complete
        self._chosen = None  # `sample`'s answer, fixed once every worker has agreed on its size

    def _stream(self):
        for batch in self.shard.iter_torch_batches(batch_size=self.batch_size, local_shuffle_buffer_size=None):
            if not self.sampled:
                keep = batch["row"] % self.sample_every == 0
                self._sample.append((batch["row"][keep], batch["image"][keep].clone()))  # not the whole batch
            yield batch
        self.sampled = True

    def sample(self, world: int, device="cpu"):
        """This worker's train images whose row number is a multiple of `sample_every` (unaugmented, in row
        order), cut to the fewest any worker has, so that every worker runs as many batches with them; read
        through one epoch first if none was read (a run resumed after its last epoch). None if empty. The
        same tensor every time: worked out (and agreed across workers) on the first call only."""
        import torch

        if self._chosen is not None:
            return self._chosen[0]
        if self.cached is None and not self.sampled:
            for _ in self.epoch(0, 0, 0):
                pass
        if self.cached:
            rows, images = self.cached["row"], self.cached["image"]
            keep = rows % self.sample_every == 0
            rows, images = rows[keep], images[keep]
        elif self._sample:
            rows, images = (torch.cat(parts) for parts in zip(*self._sample))
            order = torch.argsort(rows)
            rows, images = rows[order], images[order]
        else:
            rows, images = torch.zeros(0, dtype=torch.long), None
        count = torch.tensor([len(rows)], device=device)  # on the device: NCCL reduces CUDA tensors only
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(count, op=dist.ReduceOp.MIN)
        self._chosen = (images[: int(count)] if images is not None and int(count) else None,)
        self._sample = []  # now held by `_chosen`
        return self._chosen[0]

    def epoch(self, epoch: int, seed: int, rank: int):
        import torch

        if self.streaming:
            yield from self._stream()
            return
        if self.cached is None:
            parts, size, it = [], 0, iter(self._stream())
            for batch in it:
                parts.append(batch)
                size += sum(v.numel() * v.element_size() for v in batch.values())
                if size > self.cache_limit:  # too big: this epoch and every later one stream
                    self.streaming = True
                    yield from parts
                    yield from it
                    return
            if not parts:
                self.cached = {}
            else:
                cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
                order = torch.argsort(cat["row"])
                self.cached = {k: v[order] for k, v in cat.items()}
            self._sample = []  # the cache holds the sample
        n = len(self.cached.get("row", ()))
        g = torch.Generator().manual_seed(seed * 100_003 + epoch * 1009 + rank)
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, self.batch_size):
            yield {k: v[perm[i: i + self.batch_size]] for k, v in self.cached.items()}


class _EvalRows:
    """This worker's share (every world-th row) of a labelled split, decoded in the worker without Ray Data,
    so that every row is scored exactly once across workers (Ray Train's equal split could drop rows)."""

    def __init__(self, rows: dict, rank: int, world: int, size: int, channels: int, cache_limit: int):
        self.paths = rows["path"][rank::world]
        self.indices = rows["index"][rank::world]
        self.labels = rows["label"][rank::world]
        self.size, self.channels = size, channels
        self.cache_limit = cache_limit
        self.cache: list | None = None

    def batches(self):
        import torch

        from sweep.data.preprocess import decode_rows

        if self.cache is not None:
            yield from self.cache
            return
        keep, size = [], 0
        for i in range(0, len(self.paths), EVAL_BATCH):
            images, errors = decode_rows(self.paths[i: i + EVAL_BATCH], self.indices[i: i + EVAL_BATCH],
                                         self.size, self.channels)
            ok = np.asarray([not e for e in errors], dtype=bool)
            x = torch.from_numpy(images[ok])
            y = torch.as_tensor(np.asarray(self.labels[i: i + EVAL_BATCH], dtype=np.int64)[ok])
            if keep is not None:
                keep.append((x, y))
                size += x.numel() * 4
                if size > self.cache_limit:
                    keep = None
            yield x, y
        if keep is not None:
            self.cache = keep


def _all_reduce(t, world: int):
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def within_epoch(epoch: int, epochs: int, total: list[float], world: int, seconds: float) -> str:
    """The detail of a progress line inside an epoch, from rank 0's `total` (loss sum, images) so far: its mean
    loss (the epoch's line gives the mean over all workers) and the images per second of all workers,
    estimated as rank 0's times the workers (their shares are equal)."""
    loss = total[0] / total[1] if total[1] else float("nan")
    return (f"epoch {epoch}/{epochs}, worker 0's train_loss {loss:.4f} so far, "
            f"~{total[1] * world / seconds if seconds > 0 else 0.0:.0f} images/s")


def _evaluate(model, rows: _EvalRows, num_classes: int, device, world: int, use_cuda: bool, prefix: str) -> dict:
    """Cross-entropy and confusion over every worker's rows (summed across workers)."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    conf = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
    loss = torch.zeros(1, dtype=torch.float64, device=device)
    with torch.no_grad():
        for x, y in rows.batches():
            if not len(y):
                continue
            x, y = x.to(device), y.to(device)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_cuda):
                logits = model(x)
            logits = logits.float()
            loss += F.cross_entropy(logits, y, reduction="sum").double()
            conf += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes ** 2).double()
    _all_reduce(conf, world)
    _all_reduce(loss, world)
    model.train(was_training)
    conf = conf.cpu().numpy().reshape(num_classes, num_classes)
    n = conf.sum()
    out = confusion_metrics(conf, prefix)
    out[f"{prefix}_loss"] = float(loss.item() / n) if n else float("nan")
    out[f"{prefix}_images"] = int(n)
    return out


def steps_per_epoch(n_train: int, world: int, batch_size: int, ordered: bool) -> int:
    """Optimizer steps one worker takes in an epoch (what the lr schedule and the progress count): its part is
    ceil(n_train / world) images with the fixed split of `train_datasets` (the first images repeated), about
    n_train // world streamed; in batches of `batch_size`, a last batch of one skipped (`train_loop`)."""
    part = -(-n_train // world) if ordered else n_train // world
    full, rest = divmod(part, batch_size)
    return max(1, full + (rest >= 2))


def _lr_lambda(total_steps: int):
    warmup = int(round(WARMUP_FRACTION * total_steps))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def train_loop(cfg: dict) -> None:
    """Runs on every Ray Train worker (supervised and SimCLR alike)."""
    import copy

    import ray.train
    import ray.train.torch
    import torch
    import torch.nn.functional as F

    from sweep.encoders.resnet import build_resnet
    from sweep.train.augment import flips_and_rotations
    from sweep.train.simclr import SimCLRModel, ViewAugment, nt_xent, two_views

    quiet_train_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    supervised = cfg["kind"] == "supervised"
    torch.manual_seed(cfg["seed"])
    device = ray.train.torch.get_device()
    use_cuda = device.type == "cuda"
    if not use_cuda:
        torch.set_num_threads(max(1, int(cfg["cpus_per_worker"])))

    if supervised:
        net = build_resnet(cfg["arch"], num_classes=len(cfg["classes"]), in_channels=cfg["in_channels"],
                           small_input=cfg["small_input"])
    else:
        backbone = build_resnet(cfg["arch"], num_classes=0, in_channels=cfg["in_channels"],
                                small_input=cfg["small_input"])
        net = SimCLRModel(backbone, backbone.num_features, cfg["projection_dim"])
    if use_cuda and world > 1:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # global batch statistics, as in SimCLR
    net = net.to(device)
    if use_cuda:
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    epoch_steps = steps_per_epoch(cfg["n_train"], world, cfg["batch_size"], cfg.get("ordered_split", False))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg["epochs"] * epoch_steps))
    start_epoch, step, history, best = 0, 0, [], None

    state = load_checkpoint_state(ray.train.get_checkpoint(), "state.pt", f"baselines {cfg['name']}",
                                  speak=rank == 0)
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_epoch, step, history, best = state["epoch"] + 1, state["step"], state["history"], state["best"]
        if rank == 0:
            say(f"baselines {cfg['name']}: resuming at epoch {start_epoch + 1}/{cfg['epochs']} from the run's "
                f"checkpoint")

    model = ray.train.torch.prepare_model(net, move_to_device=False)  # DDP (gloo on CPU, nccl on GPU)
    raw = model.module if hasattr(model, "module") else model

    metrics_log = Metric = None
    if rank == 0 and cfg["run_id"]:  # only rank 0 logs (and pays for importing mlflow)
        from mlflow.entities import Metric

        metrics_log = WorkerMetrics(cfg["tracking_uri"], cfg["run_id"], f"baselines {cfg['name']}")
    shard = _TrainShard(train_shard(cfg.get("ordered_split", False), rank), cfg["batch_size"],
                        cfg["cache_limit_bytes"],
                        bn_sample_every(cfg["n_train"], world, 4 * cfg["in_channels"] * cfg["image_size"] ** 2))
    val = test = None
    if supervised:
        val = _EvalRows(cfg["val_rows"], rank, world, cfg["image_size"], cfg["in_channels"], cfg["cache_limit_bytes"])
        test = _EvalRows(cfg["test_rows"], rank, world, cfg["image_size"], cfg["in_channels"], 0)
    aug = ViewAugment()
    generator = torch.Generator()
    select = cfg.get("select", "val_macro_f1")
    # inside an epoch (minutes on CPU cores for tens of thousands of images), a line at most every
    # PROGRESS_SECONDS; the steps are those the lr schedule counts
    progress = Progress(f"baselines {cfg['name']}", cfg["epochs"] * epoch_steps, "steps", final=False) \
        if rank == 0 else None

    for epoch in range(start_epoch, cfg["epochs"]):
        model.train()
        # reseeded per epoch: a run resumed at this epoch draws exactly what an uninterrupted one would
        generator.manual_seed(cfg["seed"] * 7919 + rank * 104_729 + epoch)
        t0, pending = time.perf_counter(), []
        total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, images
        for batch in shard.epoch(epoch, cfg["seed"], rank):
            x = batch["image"]
            if x.shape[0] < 2:  # BatchNorm and NT-Xent need two samples; every worker has the same sizes
                continue
            x = x.to(device)
            if supervised:
                if cfg.get("augment", True):
                    x = flips_and_rotations(x, generator)
                y = batch["label"].to(device).long()
                if use_cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_cuda):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
            else:
                v1, v2 = two_views(x, aug, generator)
                v = torch.cat([v1, v2])
                if use_cuda:
                    v = v.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_cuda):
                    z = model(v)
                loss = nt_xent(z[: x.shape[0]], z[x.shape[0]:], cfg["temperature"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            total += torch.tensor([loss.item() * x.shape[0], x.shape[0]], dtype=torch.float64, device=device)
            if progress is not None:
                progress.update(step, lambda: within_epoch(epoch + 1, cfg["epochs"], total.tolist(), world,
                                                           time.perf_counter() - t0))
            if metrics_log is not None:
                pending.append(Metric("train_loss", loss.item(), int(time.time() * 1000), step))
        _all_reduce(total, world)
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch + 1, "step": step, "train_loss": float(total[0] / max(total[1].item(), 1)),
                  "lr": schedule.get_last_lr()[0], "images_per_s": float(total[1]) / seconds if seconds else 0.0}
        if supervised:
            if rank == 0 and seconds > PROGRESS_SECONDS:  # a minute on CPU cores for thousands of images
                say(f"baselines {cfg['name']}: epoch {epoch + 1}/{cfg['epochs']} trained; recalibrating "
                    f"BatchNorm and scoring val")
            recalibrate_batchnorm(raw, shard.sample(world, device), world, device, use_cuda)
            metrics = _evaluate(raw, val, len(cfg["classes"]), device, world, use_cuda, "val")
            record.update({k: metrics[k] for k in ("val_loss", "val_acc", "val_macro_f1")})
            score = metrics[select]
            if best is None or (metrics["val_images"] == 0) or (not math.isnan(score) and score > best["score"]):
                best = {"epoch": epoch + 1, "score": score, "metrics": record.copy(),
                        "state": {k: v.detach().cpu().clone() for k, v in raw.state_dict().items()}}
        history.append(record)
        if metrics_log is not None:
            now = int(time.time() * 1000)
            pending += [Metric(f"epoch_{k}", float(v), now, epoch + 1) for k, v in record.items()
                        if k not in ("epoch", "step")]
            metrics_log.log(pending, f"epoch {epoch + 1}")
        last = epoch + 1 == cfg["epochs"]
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0 and ((epoch + 1) % cfg["checkpoint_every"] == 0 or last):
                torch.save({"model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                            "schedule": schedule.state_dict(), "epoch": epoch, "step": step,
                            "history": history, "best": best}, Path(d) / "state.pt")
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(record, checkpoint=ckpt)
        if progress is not None:  # the stage's progress (Ray forwards a worker's lines to the driver)
            progress.seen(step)  # counted for the estimate, without a line of its own
            say(f"baselines {cfg['name']}: epoch {epoch + 1}/{cfg['epochs']}, "
                + ", ".join(f"{k} {record[k]:.4f}" for k in ("train_loss", "val_macro_f1") if k in record)
                + progress.eta(step))
            progress.said()
        if cfg["fault_at_epoch"] and epoch + 1 == cfg["fault_at_epoch"]:
            raise RuntimeError(f"injected fault after epoch {epoch + 1} ({FAULT_ENV})")

    # -- the final weights: best-val epoch (supervised) or last epoch (SimCLR), then the test split
    final_metrics: dict[str, float] = {}
    if supervised:
        if best is not None:
            raw.load_state_dict(best["state"])
        final_metrics = {k: v for k, v in (best or {}).get("metrics", {}).items()
                         if k in ("val_loss", "val_acc", "val_macro_f1")}
        final_metrics["best_epoch"] = (best or {}).get("epoch", cfg["epochs"])
        test_metrics = _evaluate(raw, test, len(cfg["classes"]), device, world, use_cuda, "test")
        final_metrics.update(test_metrics)
        encoder = raw
    else:
        final_metrics = {"final_train_loss": history[-1]["train_loss"]} if history else {}
        encoder = raw.backbone
        # features are taken in eval mode: with the statistics of the final weights
        recalibrate_batchnorm(encoder, shard.sample(world, device), world, device, use_cuda)
    if rank == 0:
        encoder = _plain_batchnorm(copy.deepcopy(encoder).to("cpu").to(memory_format=torch.contiguous_format))
        meta = {**cfg["meta"], "best_epoch": final_metrics.get("best_epoch"), "metrics": final_metrics,
                "history": history}
        write_final(cfg["final_dir"], encoder.state_dict(), meta)
        if metrics_log is not None:
            now = int(time.time() * 1000)
            metrics_log.log([Metric(k, float(v), now, cfg["epochs"]) for k, v in final_metrics.items()
                             if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))],
                            "the end of training")
            metrics_log.close()


def _plain_batchnorm(module):
    """SyncBatchNorm -> BatchNorm2d (same keys and values), so the saved model is an ordinary ResNet."""
    import torch

    if isinstance(module, torch.nn.SyncBatchNorm):
        bn = torch.nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats)
        bn.load_state_dict(module.state_dict())
        return bn
    for name, child in module.named_children():
        setattr(module, name, _plain_batchnorm(child))
    return module


# ------------------------------------------------------------------------------------ driver side

def train_dataset(config: PipelineConfig, kind: str, table=None):
    """Ray Data: the train split, decoded and preprocessed in parallel (corrupt images dropped).

    Columns: `image`, `row` (a position for a fixed order) and, for a supervised baseline only, `label`.
    A self-supervised baseline's dataset has no label column at all.
    """
    import ray

    from sweep.data.table import build_table
    from sweep.stages.extract import decode_batch

    table = table or build_table(config)
    rows = table.frame[table.frame["split"] == "train"].reset_index(drop=True)
    rows = rows.assign(row=np.arange(len(rows), dtype=np.int64))
    columns = ["path", "index", "row"] + (["label"] if kind == "supervised" else [])
    # the table is ordered by class: mixed once, so that each worker's part (`train_datasets`) and each
    # streamed block hold every class; `row` keeps the table's order for the workers' caches
    rows = rows[columns].sample(frac=1.0, random_state=config.seed)
    chunks = [rows.iloc[i: i + TRAIN_BLOCK_ROWS] for i in range(0, len(rows), TRAIN_BLOCK_ROWS)]
    keep = ["image", "row"] + (["label"] if kind == "supervised" else [])

    def keep_good(batch: dict) -> dict:
        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        return {k: batch[k][ok] for k in keep}

    ds = ray.data.from_pandas(chunks).map_batches(
        decode_batch, fn_kwargs={"size": config.data.image_size, "channels": config.data.channels},
        batch_format="numpy")
    return quiet_dataset(ds.map_batches(keep_good, batch_format="numpy")), len(rows)


def _split_rows(table, split: str) -> dict:
    rows = table.frame[table.frame["split"] == split]  # val/test exist in the main dataset only
    return {"path": rows["path"].astype(str).tolist(), "index": rows["index"].astype(int).tolist(),
            "label": rows["label"].astype(int).tolist()}


def _start_run(config: PipelineConfig, b: BaselineConfig, key: str, parent: str, params: dict | None = None) -> str:
    """The baseline's MLflow run, a child of the stage's parent run: an unfinished one with the same key is
    reused (a resumed baseline keeps one run), else a new one; not one that logged other values of `params`
    (`pretrain.workers` is outside the key: MLflow refuses to change a logged param)."""
    client = tracking.client_for(config)
    exp_id = tracking.ensure_experiment(config)
    runs = client.search_runs(
        [exp_id],
        filter_string=(f"tags.`{tracking.TAG_STAGE}` = 'baselines' and tags.`{tracking.TAG_BASELINE}` = "
                       f"'{b.name}' and tags.`{tracking.TAG_BASELINE_KEY}` = '{key}' "
                       f"and attributes.status != 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=50)
    runs = [r for r in runs if tracking.params_agree(r, params) and tracking.same_storage(r, config)]
    if runs:
        client.update_run(runs[0].info.run_id, status="RUNNING")
        return runs[0].info.run_id
    tags = {**tracking.stage_tags(config, "baselines"), tracking.TAG_BASELINE: b.name,
            tracking.TAG_BASELINE_KEY: key, tracking.TAG_PARENT: parent,
            "sweep.baseline_kind": b.kind, "mlflow.runName": f"baselines/{b.name}"}
    return client.create_run(exp_id, tags=tags).info.run_id


def _normalisation(b: BaselineConfig, channels: int) -> tuple[list | None, list | None]:
    normalize = b.normalize or ("imagenet" if b.kind == "pretrained" else "none")
    if normalize == "none":
        return None, None
    if channels == 1:  # a grey image stands for R = G = B: one mean/std, the channel average
        return [float(np.mean(IMAGENET_MEAN))], [float(np.mean(IMAGENET_STD))]
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


def build_pretrained(config: PipelineConfig, b: BaselineConfig, out: str | Path, key: str) -> dict:
    """Load `weights` into the architecture (a built-in ResNet's conv1 adapted to the data's channels) and
    save it as final."""
    from sweep.encoders.base import checkpoint_hash
    from sweep.encoders.resnet import read_state_dict

    state = read_state_dict(b.weights)
    try:  # the checks `sweep validate` makes too (sweep.encoders.checks)
        model, state, built = zoo.pretrained_model(b.arch, b.arch_args, state, config.data.channels,
                                                   b.small_input, source=str(b.weights))
    except zoo.ArchError as e:
        raise BaselineError(f"baseline {b.name!r}: {e}") from e
    model.load_state_dict(state, strict=True)
    # grey images are repeated to a 3-channel model's channels first
    mean, std = _normalisation(b, built.get("model_in_channels", config.data.channels))
    meta = {"name": b.name, "kind": "pretrained", "arch": b.arch,
            **({"arch_args": b.arch_args} if not zoo.is_builtin(b.arch) else {}),
            "in_channels": config.data.channels, **built, "image_size": config.data.image_size,
            "input_mean": mean, "input_std": std, "weights": str(b.weights),
            **({"input_size": b.input_size} if b.input_size else {}),
            "weights_hash": checkpoint_hash(b.weights), "key": key}
    write_final(out, model.state_dict(), meta)
    return meta


def run_baseline(config: PipelineConfig, b: BaselineConfig, get_table, get_parent) -> str:
    """Train, build or skip one baseline; `get_parent()` opens (once) the stage's parent run."""
    import ray.train
    from ray.train.torch import TorchTrainer

    storage = Storage.of(config.storage_root)
    final = storage.baseline_final(b.name)
    key = baseline_key(config, b)
    marker = read_json(f"{final}/{META_FILE}")
    if marker is not None and marker.get("key") == key:
        problem = trained_on_other_images(f"a {b.kind} baseline", marker.get("training_images"), get_table,
                                          str(final), labels=b.kind == "supervised")
        if problem:
            raise BaselineError(f"baselines {b.name}: {problem}")
        say(f"baselines {b.name}: {final} is complete for this config, nothing to do")
        return str(final)

    if b.kind == "pretrained":
        if marker is not None:
            features = storage.features(b.name)
            stale = (f" (its features, {features}, are then of the old model: the extract stage stops there; "
                     f"delete them to extract again)" if exists(features) else "")
            say(f"baselines {b.name}: {final} was made from other weights or settings; rebuilding it{stale}")
        run_id = _start_run(config, b, key, get_parent())
        with tracking.ended_on_error(config, run_id):  # FAILED on an error, KILLED on Ctrl-C
            try:
                meta = build_pretrained(config, b, final, key)
            except BaselineError:
                raise
            except Exception as e:  # the weights do not fit the arch: say which baseline and file
                raise BaselineError(f"baselines {b.name}: {b.arch} from {b.weights}: {type(e).__name__}: "
                                    f"{e}") from e
            tracking.log_batch(config, run_id, params={"kind": b.kind, "arch": b.arch, "weights": b.weights,
                                                       "weights_hash": meta["weights_hash"],
                                                       "small_input": meta["small_input"],
                                                       "input_mean": meta["input_mean"],
                                                       "input_std": meta["input_std"]})
        tracking.finish_run(config, run_id)
        say(f"baselines {b.name}: {b.arch} weights from {b.weights} saved to {final}")
        return str(final)

    if marker is not None:
        wanted = trained_settings(config, b)
        raise BaselineError(trained_with_other_settings(
            "a baseline", {k: marker[k] for k in wanted if k in marker}, wanted, str(final),
            features=storage.features(b.name)))
    table = get_table()
    settings = resolved(config, b)
    p = config.pretrain
    init_ray(config, dashboard=True)  # Ray Train
    params = {**settings, "workers": p.workers, "use_gpu": p.use_gpu, "seed": config.seed}
    run_id = _start_run(config, b, key, get_parent(), params)
    with tracking.ended_on_error(config, run_id):
        dataset, listed = train_dataset(config, b.kind, table)
        datasets, dataset_config, usable = train_datasets(dataset, config, listed)
        n_train = check_training_images(config, f"baselines {b.name}", listed, usable)
        tracking.log_batch(config, run_id, params={**params, "n_train": n_train})
        meta = {"name": b.name, "kind": b.kind, "arch": b.arch, "in_channels": config.data.channels,
                "small_input": settings["small_input"],
                "num_classes": len(table.classes) if b.kind == "supervised" else 0,
                "image_size": config.data.image_size, "input_mean": None, "input_std": None, "key": key,
                "epochs": b.epochs, **trained_settings(config, b), "training_images": training_images(table),
                **({"classes": list(table.classes)} if b.kind == "supervised" else {})}
        loop_config = {
            **settings, "name": b.name, "seed": config.seed, "cpus_per_worker": p.cpus_per_worker,
            "checkpoint_every": b.checkpoint_every, "n_train": n_train,
            "final_dir": str(final), "meta": meta, "tracking_uri": tracking.tracking_uri(config), "run_id": run_id,
            "cache_limit_bytes": 2 << 30, "fault_at_epoch": int(os.environ.get(FAULT_ENV, "0") or 0),
        }
        if b.kind == "supervised":  # SimCLR gets no labels, no classes, no val/test rows
            loop_config.update(classes=list(table.classes), val_rows=_split_rows(table, "val"),
                               test_rows=_split_rows(table, "test"))
        try:
            check_run_images(f"{b.name} baseline", f"{storage.uri('baselines', b.name)}/run-{key}",
                             meta["training_images"], labels=b.kind == "supervised")
        except RuntimeError as e:
            raise BaselineError(f"baselines {b.name}: {e}") from None
        say(f"baselines {b.name}: {b.kind} {b.arch}, {n_train} training images, {b.epochs} epoch(s) x "
            f"{b.batch_size} per worker x {p.workers} worker(s){' on GPU' if p.use_gpu else ''}")
        loop_config["ordered_split"] = dataset_config is not None
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(num_workers=p.workers, use_gpu=p.use_gpu,
                                                   resources_per_worker={"CPU": p.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=f"run-{key}",  # same settings -> same run folder -> Ray Train resumes its latest checkpoint
                storage_path=storage.uri("baselines", b.name),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                failure_config=ray.train.FailureConfig(max_failures=p.max_failures),
                logging_config=train_logging(),
            ),
            datasets=datasets,
            dataset_config=dataset_config,
        )
        try:
            fit_interruptibly(trainer, f"baselines {b.name}")
        except Exception as e:
            raise BaselineError(f"baseline {b.name!r} failed (rerun to resume from the last checkpoint): "
                                f"{storage_cause(error_cause(e), storage.uri('baselines', b.name))}") from e
        done = read_json(f"{final}/{META_FILE}")
        if done is None or done.get("key") != key:
            raise BaselineError(f"baseline {b.name!r} ended without writing {final}")
    tracking.finish_run(config, run_id)
    m = done.get("metrics", {})
    if b.kind == "supervised":
        say(f"baselines {b.name}: done; best epoch {m.get('best_epoch')} ({config.probe.select} "
            f"{m.get(config.probe.select, float('nan')):.3f}), test_acc {m.get('test_acc', float('nan')):.3f}, "
            f"test_macro_f1 {m.get('test_macro_f1', float('nan')):.3f}; saved to {final}")
    else:
        say(f"baselines {b.name}: done; final loss {m.get('final_train_loss', float('nan')):.4f}; saved to {final}")
    return str(final)


def run(config: PipelineConfig) -> dict[str, str]:
    """Train (or resume, or skip) every configured baseline; returns name -> final folder."""
    if not config.baselines:
        say("baselines: none configured")
        return {}
    cache: dict = {}

    def get_table():
        if "table" not in cache:
            from sweep.data.table import build_table

            cache["table"] = build_table(config)
            say(f"data: {cache['table'].summary()}")
        return cache["table"]

    def get_parent():  # opened by the first baseline with work to do: a stage with none leaves no run
        if "parent" not in cache:
            cache["parent"] = tracking.start_stage_run(config, "baselines")
        return cache["parent"]

    with tracking.ended_on_error(config, lambda: cache.get("parent")):  # as each baseline's own run
        finals = {b.name: run_baseline(config, b, get_table, get_parent) for b in config.baselines}
    if "parent" in cache:
        tracking.finish_run(config, cache["parent"])
    return finals
