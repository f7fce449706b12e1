"""Shared fixtures: small pipeline configs on the vendored demo images, one local Ray per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("RAY_DEDUP_LOGS", "1")

REPO = Path(__file__).resolve().parents[1]
DEMO_IMAGES = REPO / "sweep" / "data" / "demo" / "plankton-flowcam-demo" / "images"


def image_folder(root: Path, sizes: dict[str, int]) -> Path:
    """An image folder under `root` of `sizes[class]` small grey PNGs per class: a long tail of many classes."""
    import numpy as np
    from PIL import Image

    for name, n in sizes.items():
        (root / name).mkdir(parents=True)
        for j in range(n):
            Image.fromarray(np.full((8, 8), 5 * j % 256, np.uint8)).save(root / name / f"{j}.png")
    return root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a server a test starts, or expects absent)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(db: Path, port: int, timeout: float = 180.0):
    """A real `mlflow server` on 127.0.0.1:`port` over the SQLite file `db`, answering (its Popen; stop it with
    `stop_mlflow_server`). In a session of its own: the server's work is done by child processes (uvicorn),
    which outlive a signal to the `mlflow` command alone and keep answering."""
    import subprocess
    import time
    import urllib.request

    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}",
         "--default-artifact-root", str(db.parent / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job-runner processes
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                return server
        except OSError:
            time.sleep(0.5)
    stop_mlflow_server(server)
    pytest.fail("mlflow server did not start")


def stop_mlflow_server(server, hard: bool = False) -> None:
    """Stop a server of `start_mlflow_server` and all its processes: SIGTERM, or SIGKILL (`hard`: a crash)."""
    import signal

    try:
        os.killpg(server.pid, signal.SIGKILL if hard else signal.SIGTERM)
    except ProcessLookupError:
        pass
    server.wait(30)


def small_pipeline(storage: Path, **sections) -> dict:
    """A pipeline dict small enough for tests: demo images at 16 px, a 2-level U-Net, 2 timesteps."""
    raw = {
        "name": "t",
        "seed": 0,
        "storage": str(storage),
        "data": {"image_size": 16, "channels": 1,
                 "train": {"name": "plankton", "source": "demo", "splits": {"val": 0.2, "test": 0.2}}},
        "pretrain": {"model": {"block_out_channels": [16, 32], "layers_per_block": 1, "attention": [False, False]},
                     "steps": 6, "batch_size": 8, "checkpoint_every": 3, "warmup_steps": 1, "workers": 2,
                     "sample_grid": 4},
        "extract": {"timesteps": [0, 100], "batch_size": 32, "shard_size": 40},
        "probe": {"epochs": 20, "lrs": [0.01, 0.1], "weight_decays": [0.0, 0.001], "kmeans": True},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


@pytest.fixture
def write_pipeline(tmp_path):
    """write_pipeline(**sections) -> path of a YAML pipeline file (storage under tmp_path)."""

    def write(**sections) -> Path:
        raw = small_pipeline(tmp_path / "store", **sections)
        path = tmp_path / "pipeline.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (starting one costs seconds)."""
    import ray

    if not ray.is_initialized():
        # Ray jobs (`sweep submit`) run their entrypoint in a shell with this Ray's environment: find this
        # environment's `sweep` there, as a cluster's image has it on its PATH
        bin_dir = str(Path(sys.executable).parent)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        from sweep.stages.common import start_local_ray

        start_local_ray(num_cpus=4, dashboard=True, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_unet_checkpoint(tmp_path_factory) -> Path:
    """A random-init diffusers U-Net + scheduler folder (16 px, 1 channel): features without pretraining."""
    import torch

    from sweep.encoders.diffusion import build_scheduler, build_unet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("unet")
    build_unet(16, 1, [16, 32], 1, [False, False]).save_pretrained(path)
    build_scheduler(1000, "linear").save_pretrained(path)
    return path
