"""Throughput of `sweep extract`: the full Ray Data pipeline against the model alone, and one forward per
timestep (hooks) against the naive one forward per (block, timestep).

    .venv/bin/python benchmarks/extract_throughput.py [--images N] [--batch-size 64] [--timesteps 0,100,400]

All three figures use the same U-Net, batch size, timesteps, thread count and images:

(a) pipeline  `sweep.stages.extract.extract_encoder` end to end: decode + preprocess in Ray tasks, encode in an
              actor pool, Parquet shards + manifest written by the driver; cold: the driver's model load and
              the actor's start-up (a fresh process importing torch + diffusers) included; Ray already running
              and imported, as in a stage after `init_ray`. Also shown: its steady state after the first shard.
(b) bare      a plain loop over preloaded x_t tensors that only calls `unet(x_t, t)`, one forward per
              (batch, timestep): what the model alone costs. Half the batches run before (a), the other half
              after it, as the machine may be shared.
(c) naive     one full forward per (block, timestep) pair, one hook each: the design the encoder avoids.
              Timed on the first --naive-batches batches (it is slow by construction).

(b') hooked   one forward per timestep through `PooledFeatureHooks` (what the encoder does), recording every
              block and stopping after the last one, on the same batches as (c).

Ratios: pipeline / bare (target >= 0.85) and hooked / naive, the one-forward speed-up (target >= blocks / 2).

The U-Net has the shape of the published 32 px DDPM (Ho et al. CIFAR-10: 4 levels, 2 res layers per block,
self-attention at 16x16: 9 blocks), at --width base channels (128 in the paper; the default 32 keeps a 2-core CPU
run of the default 4,096 images to about 9 minutes). Images: the vendored FlowCam plankton demo (real JPEGs, repeated to --images) or Fashion-MNIST.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sweep.config import PipelineConfig
from sweep.data.preprocess import decode_rows
from sweep.data.sources import demo_root
from sweep.data.table import build_table
from sweep.encoders.base import _first_tensor, _pool
from sweep.encoders.diffusion import DiffusionEncoder, build_scheduler, build_unet
from sweep.features.store import FeatureStore
from sweep.stages.extract import extract_encoder
from sweep.storage import Storage


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4096,
                   help="images to extract (default 4096; with fewer, the one-time start-up of about 25 s weighs in)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--timesteps", default="0,100,400", help="comma-separated (default 0,100,400)")
    p.add_argument("--width", type=int, default=32, help="base channels of the U-Net (128 = DDPM CIFAR-10)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of the bare loops = CPUs of the one encoder actor (default: all cores)")
    p.add_argument("--source", choices=["demo", "fashion-mnist"], default="demo")
    p.add_argument("--naive-batches", type=int, default=1,
                   help="batches the naive design and the hooked one are timed on (default 1)")
    p.add_argument("--shard-size", type=int, default=128, help="images per Parquet shard")
    p.add_argument("--workdir", default=None, help="keep checkpoint, images and store here (default: temp)")
    p.add_argument("--nice", type=int, default=15,
                   help="niceness of this process: Ray starts its workers (the encoder actor) at 15, so on a "
                        "shared machine the bare loops compete for CPU on equal terms (default 15)")
    return p.parse_args()


def _demo_folder(root: Path, n: int) -> Path:
    """An imagefolder of n real demo JPEGs: the 105 vendored images, copied round-robin (distinct ids)."""
    src = sorted((demo_root() / "images").glob("*/*.jpg"))
    out = root / "images"
    for i in range(n):
        f = src[i % len(src)]
        dest = out / f.parent.name / f"{f.stem}_r{i // len(src)}{f.suffix}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            shutil.copyfile(f, dest)
    return out


def _config(args, work: Path, checkpoint: Path, timesteps: list[int]) -> PipelineConfig:
    if args.source == "demo":
        train = {"name": "bench", "source": "imagefolder", "path": str(_demo_folder(work, args.images))}
    else:
        train = {"name": "bench", "source": "fashion-mnist", "limit": args.images}
    return PipelineConfig.model_validate({
        "name": "bench", "seed": 0, "storage": str(work / "store"),
        "tracking": {"uri": f"sqlite:///{work}/mlflow.db"},
        "ray": {"num_cpus": max(4, os.cpu_count() or 1)},
        "data": {"image_size": 32, "channels": 1, "train": {**train, "splits": {"val": 0.15, "test": 0.15}}},
        "extract": {"encoders": [{"name": "diffusion", "checkpoint": str(checkpoint)}], "timesteps": timesteps,
                    "layers": "blocks", "batch_size": args.batch_size, "shard_size": args.shard_size,
                    "actors": 1, "cpus_per_actor": args.threads},
    })


class RayCpuMeter:
    """CPU seconds (user + sys) spent by this process's descendants (Ray's GCS, raylet, workers, actors),
    sampled from /proc every 0.2 s so that an actor that exits at the end of the pipeline is counted too.
    On a shared machine, wall-clock rates move with other people's load; CPU seconds per image much less."""

    def __init__(self):
        import threading

        self._seen: dict[int, float] = {}
        self._base: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    def _descendants(self) -> dict[int, float]:
        parent, cpu = {}, {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(entry)] = int(fields[1])
            cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / self._tick
        me, out = os.getpid(), {}
        for pid in cpu:
            p, depth = parent.get(pid), 0
            while p and p != me and depth < 16:
                p, depth = parent.get(p), depth + 1
            if p == me:
                out[pid] = cpu[pid]
        return out

    def _run(self) -> None:
        start = time.thread_time()
        while not self._stop.wait(0.2):
            for pid, c in self._descendants().items():
                self._seen[pid] = max(c, self._seen.get(pid, 0.0))
        self.own_seconds = time.thread_time() - start  # the sampler's own CPU, not the pipeline's

    def __enter__(self) -> "RayCpuMeter":
        self._base = self._descendants()
        self._seen = dict(self._base)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for pid, c in self._descendants().items():
            self._seen[pid] = max(c, self._seen.get(pid, 0.0))
        self.seconds = sum(c - self._base.get(pid, 0.0) for pid, c in self._seen.items())


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


@torch.inference_mode()
def bare(unet, xs: dict[int, torch.Tensor], batch: int) -> float:
    """Seconds for plain `unet(x_t, t)` over every batch and timestep."""
    n = next(iter(xs.values())).shape[0]
    start = time.perf_counter()
    for i in range(0, n, batch):
        for t, x in xs.items():
            xb = x[i: i + batch]
            unet(xb, torch.full((xb.shape[0],), t, dtype=torch.long))
    return time.perf_counter() - start


@torch.inference_mode()
def hooked(encoder: DiffusionEncoder, xs: dict[int, torch.Tensor], batch: int, batches: int) -> tuple[float, int]:
    """Seconds and images for the encoder's way over the first `batches` batches: one hooked forward per
    (batch, timestep) recording every block, stopped after the last of them."""
    n = min(next(iter(xs.values())).shape[0], batch * batches)
    start = time.perf_counter()
    for i in range(0, n, batch):
        for t, x in xs.items():
            xb = x[i: i + batch]
            encoder._hooks(xb, torch.full((xb.shape[0],), t, dtype=torch.long))
    return time.perf_counter() - start, n


@torch.inference_mode()
def naive(unet, layers: list[str], xs: dict[int, torch.Tensor], batch: int, batches: int) -> tuple[float, int]:
    """Seconds and images for one full forward per (block, timestep) over the first `batches` batches."""
    modules = dict(unet.named_modules())
    n = min(next(iter(xs.values())).shape[0], batch * batches)
    start = time.perf_counter()
    for i in range(0, n, batch):
        for t, x in xs.items():
            xb = x[i: i + batch]
            for layer in layers:
                got = {}

                def hook(_module, _inputs, out, layer=layer):
                    got.setdefault(layer, _pool(_first_tensor(out, layer)))  # returns None: output untouched

                handle = modules[layer].register_forward_hook(hook)
                try:
                    unet(xb, torch.full((xb.shape[0],), t, dtype=torch.long))
                finally:
                    handle.remove()
    return time.perf_counter() - start, n


def main() -> int:
    args = _args()
    timesteps = [int(t) for t in args.timesteps.split(",") if t.strip()]
    torch.set_num_threads(args.threads)
    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="extract-bench-")
        work = Path(tmp.name)
    try:
        torch.manual_seed(0)
        w = args.width
        checkpoint = work / "unet"
        build_unet(32, 1, [w, 2 * w, 2 * w, 2 * w], 2, [False, True, False, False]).save_pretrained(checkpoint)
        build_scheduler(1000, "linear").save_pretrained(checkpoint)
        config = _config(args, work, checkpoint, timesteps)
        # Ray first (its workers start at niceness 15 relative to the processes that start Ray), then the
        # niceness of this process, which runs the bare loops; importing Ray Data costs seconds once per
        # process, like ray.init, and is not counted in the pipeline
        import ray.data  # noqa: F401

        from sweep.stages.common import init_ray

        init_ray(config)
        if args.nice:
            os.nice(args.nice)
        shutil.rmtree(Storage.of(config.storage_root).local(), ignore_errors=True)
        table = build_table(config)
        frame = table.frame
        n = len(frame)

        # preloaded tensors for the bare loops: the exact inputs the pipeline feeds the U-Net
        images, errors = decode_rows(frame["path"], frame["index"], 32, 1)
        assert not any(errors), [e for e in errors if e]
        encoder = DiffusionEncoder(checkpoint, layers="blocks", timesteps=timesteps, seed=config.seed)
        images_t = torch.from_numpy(images)
        ids = list(frame["image_id"])
        xs = {t: encoder.noisy(images_t, ids, t) for t in timesteps}
        unet = encoder.unet
        params = sum(p.numel() for p in unet.parameters()) / 1e6
        print(f"U-Net {[w, 2 * w, 2 * w, 2 * w]} x2 layers, attention at 16 px ({params:.1f}M params); "
              f"{len(encoder.layers)} blocks x {len(timesteps)} timesteps = {len(encoder.columns)} columns; "
              f"{n} {args.source} images, batch {args.batch_size}, {args.threads} thread(s)", flush=True)

        bare(unet, {t: x[: args.batch_size] for t, x in xs.items()}, args.batch_size)  # warm-up (allocator, oneDNN)
        hooked_s, hooked_n = hooked(encoder, xs, args.batch_size, args.naive_batches)
        print(f"  hooked      {_rate(hooked_n, hooked_s):8.2f} images/s (on {hooked_n} images)", flush=True)
        naive_s, naive_n = naive(unet, encoder.layers, xs, args.batch_size, args.naive_batches)
        print(f"  naive       {_rate(naive_n, naive_s):8.2f} images/s (on {naive_n} images)", flush=True)
        # bare: the first half of the batches before the pipeline, the rest after it (the machine may be shared)
        half = (n // args.batch_size + 1) // 2 * args.batch_size
        first = {t: x[:half] for t, x in xs.items()}
        rest = {t: x[half:] for t, x in xs.items()}
        cpu = time.process_time()
        bare_1 = bare(unet, first, args.batch_size)
        bare_cpu = time.process_time() - cpu
        print(f"  bare        {_rate(half, bare_1):8.2f} images/s (first {half} images)", flush=True)

        spec = config.encoder_specs()[0]
        shard_times: list[float] = []
        write_shard = FeatureStore.write_shard

        def timed_write(self, *a, **k):
            write_shard(self, *a, **k)
            shard_times.append(time.perf_counter())

        FeatureStore.write_shard = timed_write
        cpu0 = time.process_time()
        start = time.perf_counter()
        try:
            with RayCpuMeter() as ray_cpu:
                summary = extract_encoder(config, spec, table)
        finally:
            FeatureStore.write_shard = write_shard
        pipe_s = time.perf_counter() - start
        driver_cpu = time.process_time() - cpu0 - ray_cpu.own_seconds
        print(f"  pipeline    {_rate(n, pipe_s):8.2f} images/s ({summary})", flush=True)
        cpu = time.process_time()
        bare_2 = bare(unet, rest, args.batch_size) if n > half else 0.0
        bare_cpu += time.process_time() - cpu
        print(f"  bare        {_rate(n - half, bare_2):8.2f} images/s (last {n - half} images)", flush=True)

        # sanity: the pipeline stored what the model computes
        store = FeatureStore(Storage.of(config.storage_root).features(spec.name))
        col = encoder.columns[-1]
        stored, meta = store.read_column(col.column)
        assert stored.shape == (n, col.dim), stored.shape
        order = {i: k for k, i in enumerate(ids)}
        picked = [order[i] for i in meta.column("image_id").to_pylist()[:8]]
        ref = encoder.encode(images_t[picked], [ids[k] for k in picked])[col.column]
        assert np.allclose(stored[:8].astype(np.float32), ref.astype(np.float32), atol=2e-3, rtol=2e-3)

        bare_rate = _rate(n, bare_1 + bare_2)
        pipe_rate = _rate(n, pipe_s)
        # steady state: from the first shard written to the last, over the images of the later shards
        steady = _rate(n - args.shard_size, shard_times[-1] - shard_times[0]) if len(shard_times) > 1 else None
        hooked_rate, naive_rate = _rate(hooked_n, hooked_s), _rate(naive_n, naive_s)
        blocks = len(encoder.layers)
        r1, r2 = pipe_rate / bare_rate, hooked_rate / naive_rate
        print()
        print(f"(a) pipeline (decode -> Parquet, via the stage): {pipe_rate:8.2f} images/s")
        if steady:
            print(f"    steady state, after the first shard:         {steady:8.2f} images/s "
                  f"(first shard written after {shard_times[0] - start:.1f}s of {pipe_s:.1f}s)")
        print(f"(b) bare forward on preloaded tensors:           {bare_rate:8.2f} images/s "
              f"(halves: {_rate(half, bare_1):.2f}, {_rate(n - half, bare_2):.2f})")
        pipe_cpu = driver_cpu + ray_cpu.seconds
        print(f"    CPU seconds per image: pipeline {pipe_cpu / n:.3f} (driver {driver_cpu:.1f}s + Ray processes "
              f"{ray_cpu.seconds:.1f}s), bare {bare_cpu / n:.3f}: bare/pipeline = {bare_cpu / pipe_cpu:.3f}")
        print(f"(c) naive, one forward per (block, timestep):    {naive_rate:8.2f} images/s "
              f"(hooked one forward per timestep: {hooked_rate:.2f})")
        print(f"pipeline / bare = {r1:.3f}  (target >= 0.85: {'met' if r1 >= 0.85 else 'MISSED'})"
              + (f"; steady state / bare = {steady / bare_rate:.3f}" if steady else ""))
        print(f"one-forward / naive = {r2:.2f}x  (target >= {blocks}/2 = {blocks / 2:g}x: "
              f"{'met' if r2 >= blocks / 2 else 'MISSED'})")
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
