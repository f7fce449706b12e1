"""GPU check of sweep's torch parts on real data, without Ray: a short bf16 DDPM pretraining on Fashion-MNIST,
frozen-U-Net features in bf16 against fp32 (agreement and throughput), and the linear probe on CUDA against
fp32 features and against the CPU.

    python benchmarks/gpu_check.py [--fmnist /usr/share/datasets/fashion-mnist] [--steps 3000] [--out gpu.json]

What it runs, on one GPU (`--device cpu --tiny` runs the same code on a CPU in a minute, as a check of the
script itself):
1. Pretraining: three `DDPMTrainer`s from the same initial U-Net (pipelines/fashion-mnist.yaml's model,
   32 px) on the same batches: the CUDA path sweep uses (bf16 autocast, channels_last), the same trainer with
   autocast off (fp32; TF32 off too, so that fp32 means fp32), and the bf16 one with `pretrain.compile:
   reduce-overhead` (torch.compile with CUDA graphs). Reports the mean loss of each over the compared steps,
   their steps per second and their first step's seconds (the compilation); the compiled trainer then goes
   on to `--steps`.
2. Extraction: the compiled bf16 trainer's EMA U-Net as a frozen encoder (`DiffusionEncoder`, "blocks" x 6
   timesteps) over all 70,000 images in bf16 and in fp32: images per second for each, and how far bf16
   features are from fp32 ones (relative L2 error per column); fp32 on the GPU is also checked against the
   CPU.
3. Probing: `train_probe` (the pipeline's 3 x 3 heads, 30 epochs) on every column, from the bf16 and from
   the fp32 features, on the GPU: test accuracy of each and their difference; two columns again on the CPU
   (same head chosen, same accuracy?). Split: the official 10,000 test images; val is 10 % of the 60,000
   training images (seeded), as in pipelines/fashion-mnist.yaml.

Measured on an NVIDIA H100 (one run; figures in README.md, "GPU check").
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sweep.data.preprocess import preprocess_array
from sweep.data.sources import FASHION_MNIST_FILES, _read_idx
from sweep.encoders.diffusion import DiffusionEncoder, build_scheduler, build_unet
from sweep.probing import ProbeConfig, Split, train_probe
from sweep.train.loop import DDPMTrainer

TIMESTEPS = [0, 25, 50, 100, 200, 400]  # pipelines/fashion-mnist.yaml
MODEL = {"block_out_channels": [32, 64, 64], "layers_per_block": 1, "attention": [False, False, True]}
PROBE = {"lrs": [0.1, 0.3, 1.0], "weight_decays": [0.0, 1.0e-4, 1.0e-2], "epochs": 30, "batch_size": 1024}


def load_fmnist(root: Path, size: int, limit: int | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train"|"test": (images float32 (n, 1, size, size) in [-1, 1] through sweep's preprocess, labels)}."""
    from PIL import Image

    out = {}
    for split, (images, labels) in FASHION_MNIST_FILES.items():
        x, y = _read_idx(root / images), _read_idx(root / labels).astype(np.int64)
        if limit:
            x, y = x[:limit], y[:limit]
        out[split] = (np.stack([preprocess_array(Image.fromarray(a, mode="L"), size, 1) for a in x]), y)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_training(x: torch.Tensor, steps: int, compare: int, batch: int, device: torch.device, seed: int):
    """bf16 (sweep's CUDA path) against fp32 on the same batches for `compare` steps, then bf16 to `steps`."""
    size = x.shape[-1]
    torch.manual_seed(seed)
    unet = build_unet(size, 1, MODEL["block_out_channels"], MODEL["layers_per_block"], MODEL["attention"])
    trainers = {}
    for name in ("bf16", "fp32", "bf16-compiled"):
        t = DDPMTrainer(copy.deepcopy(unet), build_scheduler(), lr=2e-4, total_steps=steps, warmup_steps=100,
                        device=device, seed=seed, compile="reduce-overhead" if name == "bf16-compiled" else None)
        if name == "fp32":
            t.cuda = False  # no autocast and no channels_last input: the same model in fp32
        trainers[name] = t
    order = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, len(x), (batch,), generator=order) for _ in range(steps)]
    report = {}
    for name, t in trainers.items():
        t0 = time.perf_counter()
        t.train_step(x[batches[0]])  # first step: kernels chosen, caches warm, the compilation (not timed)
        _sync(device)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        losses = [t.train_step(x[idx]) for idx in batches[1:compare]]
        _sync(device)
        seconds = time.perf_counter() - t0
        losses = torch.stack(losses).float().cpu().numpy()
        report[name] = {"mean_loss": float(losses.mean()), "last_100_loss": float(losses[-100:].mean()),
                        "steps_per_s": (compare - 1) / seconds, "images_per_s": (compare - 1) * batch / seconds,
                        "first_step_s": first}
        print(f"  train {name}: {report[name]['steps_per_s']:.1f} steps/s ({report[name]['images_per_s']:.0f} "
              f"images/s, batch {batch}), mean loss over steps 2-{compare} {report[name]['mean_loss']:.4f}, "
              f"last 100 {report[name]['last_100_loss']:.4f}; first step {first:.1f} s", flush=True)
    if device.type != "cuda":
        print("  (bf16 and compile apply on CUDA only: all three ran the same fp32 eager steps here)")
    compiled = trainers["bf16-compiled"]  # sweep's CUDA path with pretrain.compile: reduce-overhead
    t0 = time.perf_counter()
    tail = [compiled.train_step(x[idx]) for idx in batches[compare:]]
    _sync(device)
    final = float(torch.stack(tail[-200:]).float().mean()) if tail else report["bf16-compiled"]["last_100_loss"]
    report["steps"], report["final_loss_last_200"] = steps, final
    print(f"  bf16-compiled trainer to step {steps}: {time.perf_counter() - t0:.1f} s more, loss (last 200) "
          f"{final:.4f}")
    return compiled.ema_model("cpu"), report


def extract(encoder: DiffusionEncoder, images: np.ndarray, ids: list[str], batch: int) -> tuple[dict, float]:
    """Every column of `encoder` over `images` (float16, as the feature store keeps them) and images/s."""
    parts: dict[str, list] = {c.column: [] for c in encoder.columns}
    _sync(encoder.device)
    t0 = time.perf_counter()
    for i in range(0, len(images), batch):
        feats = encoder.encode(torch.from_numpy(images[i : i + batch]), ids[i : i + batch])
        for k, v in feats.items():
            parts[k].append(v)
    _sync(encoder.device)
    seconds = time.perf_counter() - t0
    return {k: np.concatenate(v) for k, v in parts.items()}, len(images) / seconds


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def check_extraction(unet, data: dict, device: torch.device, batch: int, cpu_rows: int):
    """Features of all images in bf16 and in fp32 on `device`; fp32 on the CPU for the first `cpu_rows`."""
    with tempfile.TemporaryDirectory() as tmp:
        unet.save_pretrained(tmp)
        build_scheduler().save_pretrained(tmp)
        images = np.concatenate([data["train"][0], data["test"][0]])
        ids = [f"train/{i:05d}" for i in range(len(data["train"][0]))]
        ids += [f"test/{i:05d}" for i in range(len(data["test"][0]))]
        feats, report = {}, {}
        for precision in ("bf16", "fp32"):
            enc = DiffusionEncoder(tmp, "blocks", TIMESTEPS, seed=0, device=device, precision=precision,
                                   timesteps_per_forward=len(TIMESTEPS))
            extract(enc, images[:batch], ids[:batch], batch)  # warm-up
            feats[precision], rate = extract(enc, images, ids, batch)
            report[f"{precision}_images_per_s"] = rate
            print(f"  extract {precision}: {rate:.0f} images/s ({len(enc.columns)} columns, batch {batch}, "
                  f"all {len(TIMESTEPS)} timesteps in one forward)", flush=True)
        cpu = DiffusionEncoder(tmp, "blocks", TIMESTEPS, seed=0, device="cpu", precision="fp32")
        on_cpu, _ = extract(cpu, images[:cpu_rows], ids[:cpu_rows], batch)
    bf16_err = {k: rel_error(feats["bf16"][k], feats["fp32"][k]) for k in feats["fp32"]}
    cpu_err = {k: rel_error(feats["fp32"][k][:cpu_rows], on_cpu[k]) for k in on_cpu}
    report.update(bf16_vs_fp32_rel_err_median=float(np.median(list(bf16_err.values()))),
                  bf16_vs_fp32_rel_err_max=max(bf16_err.values()), bf16_vs_fp32_worst=max(bf16_err, key=bf16_err.get),
                  fp32_device_vs_cpu_rel_err_max=max(cpu_err.values()))
    print(f"  bf16 vs fp32 features, relative L2 error per column: median {report['bf16_vs_fp32_rel_err_median']:.2e}"
          f", max {report['bf16_vs_fp32_rel_err_max']:.2e} ({report['bf16_vs_fp32_worst']}); fp32 {device.type} vs "
          f"CPU ({cpu_rows} images): max {report['fp32_device_vs_cpu_rel_err_max']:.2e}", flush=True)
    return feats, report


def check_probing(feats: dict, data: dict, device: torch.device, seed: int):
    """Every column probed from bf16 and from fp32 features on `device`; the best and the worst column of the
    fp32 run again on the CPU."""
    y_train, y_test = data["train"][1], data["test"][1]
    n_train = len(y_train)
    val = np.zeros(n_train, dtype=bool)
    val[np.random.default_rng(seed).permutation(n_train)[: n_train // 10]] = True
    cfg = ProbeConfig(**PROBE, seed=seed)

    def probe(X: np.ndarray, dev) -> tuple[dict, float]:
        t0 = time.perf_counter()
        r = train_probe(Split(X[:n_train][~val], y_train[~val]), Split(X[:n_train][val], y_train[val]),
                        Split(X[n_train:], y_test), None, 10, cfg, device=dev)
        return {"test_acc": r.metrics["test_acc"], "val_macro_f1": r.metrics["val_macro_f1"], "lr": r.lr,
                "weight_decay": r.weight_decay}, time.perf_counter() - t0

    rows, seconds = {}, {"bf16": 0.0, "fp32": 0.0}
    for column in feats["fp32"]:
        rows[column] = {}
        for precision in ("bf16", "fp32"):
            rows[column][precision], s = probe(feats[precision][column], device)
            seconds[precision] += s
    diffs = np.array([r["bf16"]["test_acc"] - r["fp32"]["test_acc"] for r in rows.values()])
    best = max(rows, key=lambda c: rows[c]["fp32"]["val_macro_f1"])  # chosen on val, as `sweep best` would
    worst = min(rows, key=lambda c: rows[c]["fp32"]["val_macro_f1"])
    report = {"columns": rows, "seconds_per_probe": seconds["fp32"] / len(rows),
              "bf16_minus_fp32_test_acc_mean": float(diffs.mean()),
              "bf16_minus_fp32_test_acc_max_abs": float(np.abs(diffs).max()),
              "best_column_by_val": best, "best_column_test_acc": rows[best]["fp32"]["test_acc"],
              "same_head_bf16_fp32": int(sum((r["bf16"]["lr"], r["bf16"]["weight_decay"]) ==
                                             (r["fp32"]["lr"], r["fp32"]["weight_decay"]) for r in rows.values()))}
    print(f"  probe on {device.type}: {report['seconds_per_probe']:.2f} s per column (9 heads, 30 epochs, "
          f"{int((~val).sum())} train rows); test accuracy bf16 - fp32 features: mean "
          f"{100 * report['bf16_minus_fp32_test_acc_mean']:+.3f} points, max |.| "
          f"{100 * report['bf16_minus_fp32_test_acc_max_abs']:.3f}; same head in {report['same_head_bf16_fp32']}"
          f"/{len(rows)} columns")
    print(f"  best column by val macro-F1: {best}, test accuracy {100 * report['best_column_test_acc']:.2f} %")
    cpu = {}
    for column in dict.fromkeys([best, worst]):
        result, s = probe(feats["fp32"][column], "cpu")
        on_device = rows[column]["fp32"]
        cpu[column] = {**result, "seconds": s, "same_head": (result["lr"], result["weight_decay"]) ==
                       (on_device["lr"], on_device["weight_decay"]),
                       "test_acc_minus_device": result["test_acc"] - on_device["test_acc"]}
        print(f"  {column} on the CPU ({torch.get_num_threads()} threads): {s:.2f} s, same head "
              f"{cpu[column]['same_head']}, test accuracy CPU - {device.type} "
              f"{100 * cpu[column]['test_acc_minus_device']:+.3f} points")
    report["cpu"] = cpu
    print("  test accuracy (fp32 features, %) by block (rows) and timestep (columns):")
    layers = list(dict.fromkeys(c.split("@")[0] for c in rows))
    print("    " + " " * 14 + "".join(f"{'t' + str(t):>8}" for t in TIMESTEPS))
    for layer in layers:
        accuracies = (100 * rows[f"{layer}@t{t}"]["fp32"]["test_acc"] for t in TIMESTEPS)
        print(f"    {layer:<14}" + "".join(f"{a:8.2f}" for a in accuracies))
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fmnist", default="/usr/share/datasets/fashion-mnist", help="folder of the idx .gz files")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=3000, help="bf16 pretraining steps")
    p.add_argument("--compare-steps", type=int, default=500, help="steps trained in both bf16 and fp32")
    p.add_argument("--batch", type=int, default=128, help="pretraining batch")
    p.add_argument("--extract-batch", type=int, default=1024)
    p.add_argument("--tiny", action="store_true", help="2,000 images and 60 steps: a check of the script")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script checks sweep on a GPU (--device cpu --tiny checks the script)")
    if args.tiny:
        args.steps, args.compare_steps, args.extract_batch = 60, 30, 256
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here: TF32 would blur the bf16 comparison
    torch.backends.cudnn.allow_tf32 = False
    t_start = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__}
    print(f"{report['device']}, torch {torch.__version__}", flush=True)
    data = load_fmnist(Path(args.fmnist), 32, 1000 if args.tiny else None)
    print(f"Fashion-MNIST: {len(data['train'][1])} train + {len(data['test'][1])} test images at 32 px "
          f"({time.perf_counter() - t_start:.0f} s to decode)", flush=True)
    x = torch.from_numpy(data["train"][0]).to(device)
    print("1. pretraining (sweep's DDPMTrainer)", flush=True)
    unet, report["training"] = check_training(x, args.steps, args.compare_steps, args.batch, device, seed=0)
    print("2. extraction (sweep's DiffusionEncoder)", flush=True)
    feats, report["extraction"] = check_extraction(unet, data, device, args.extract_batch, cpu_rows=512)
    print("3. probing (sweep's train_probe)", flush=True)
    report["probing"] = check_probing(feats, data, device, seed=0)
    report["seconds"] = time.perf_counter() - t_start
    print(f"total {report['seconds']:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
