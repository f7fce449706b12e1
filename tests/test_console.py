"""What a stage prints: its own progress lines, and Ray's chatter that sweep keeps off the console."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port
from sweep.stages import common


@pytest.fixture
def clock(monkeypatch):
    """`time.perf_counter` as seen by sweep.stages.common, moved by hand."""
    now = [100.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    return now


def test_progress_lines_at_most_every_interval_with_an_estimate(clock, capsys):
    progress = common.Progress("probe", 200, "trials", eta_after=4)
    clock[0] += 3.0
    progress.update(3, "0 failed")  # too soon after the start: nothing (the rate is measured from here)
    clock[0] += 7.0
    progress.update(3, "0 failed")  # 10 s: a line, but no estimate: no trial done since the first ones
    clock[0] += 5.0
    progress.update(50, "1 failed")  # 5 s after the last line: nothing
    clock[0] += 5.0
    progress.update(53, "1 failed")  # 20 s: 50 trials in the 17 s since the first 3; 147 left
    clock[0] += 1.0
    progress.update(200, "1 failed")  # the end, at once
    assert capsys.readouterr().err.splitlines() == [
        "[sweep] probe: 3/200 trials (0 failed), 10s",
        "[sweep] probe: 53/200 trials (1 failed), 20s, ~50s left",
        "[sweep] probe: 200/200 trials (1 failed), 21s",
    ]


def test_progress_estimate_leaves_out_the_wait_for_the_first_units(clock, capsys):
    # a GPU extraction: 20 s of actor start-up before the first 256 images, then ~2,000 images/s
    progress = common.Progress("extract diffusion", 70_000, "images", final=False)
    clock[0] += 30.0
    progress.restart()  # e.g. when the work actually begins
    clock[0] += 20.0
    progress.update(256)
    clock[0] += 10.0
    progress.update(20_256)
    clock[0] += 25.0
    progress.update(70_000)  # final=False: the caller's summary line says it
    assert capsys.readouterr().err.splitlines() == [
        "[sweep] extract diffusion: 256/70000 images, 20s",  # was "~5449s left", from the start-up's rate
        "[sweep] extract diffusion: 20256/70000 images, 30s, ~25s left"]


def test_quiet_ray_data_drops_only_the_progress_bars_and_cpu_and_gpu_notices(caplog):
    from ray.data._internal.execution.operators.map_operator import _canonicalize_ray_remote_args

    common.quiet_ray_data()
    common.quiet_ray_data()  # idempotent: one filter
    progress_log = logging.getLogger("ray.data._internal.progress")
    assert sum(isinstance(f, common._DropMessages) for f in progress_log.filters) == 1
    ray_data_log = logging.getLogger("ray.data")  # once Ray Data is imported, its lines stop there
    ray_data_log.addHandler(caplog.handler)
    with caplog.at_level(logging.INFO):
        progress_log.warning("Progress bars disabled. To enable, set ...")
        progress_log.warning("Progress bars for operators disabled. To enable, ...")
        logging.getLogger("ray.data._internal.execution.streaming_executor").info("Starting execution of Dataset x")
        logging.getLogger("ray.data._internal.execution.streaming_executor").warning("a real warning")
        # what Ray Data does with a GPU encoder actor's resources (it warned at every GPU extraction)
        assert _canonicalize_ray_remote_args({"num_cpus": 1, "num_gpus": 1})["num_gpus"] == 1
    ray_data_log.removeHandler(caplog.handler)
    assert [r.getMessage() for r in caplog.records] == ["Progress bars for operators disabled. To enable, ...",
                                                        "a real warning"]


def test_local_ray_environment_keeps_the_users_settings(monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", "error::ResourceWarning")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    common.local_ray_environment()
    common.local_ray_environment()  # a second stage in the same process adds nothing
    filters = os.environ["PYTHONWARNINGS"].split(",")
    assert filters == ["error::ResourceWarning", "ignore:`ExecutionOptions.exclude_resources` is deprecated"]
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    monkeypatch.delenv("PYTHONWARNINGS")
    common.local_ray_environment()
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert os.environ["PYTHONWARNINGS"] == "ignore:`ExecutionOptions.exclude_resources` is deprecated"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stderr, colour", [(io.StringIO(), "0"), (_Terminal(), None)])
def test_worker_prefixes_lose_their_colour_codes_off_a_terminal(monkeypatch, stderr, colour):
    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    monkeypatch.setattr(common.sys, "stderr", stderr)
    common.driver_log_environment()
    assert os.environ.get("RAY_COLOR_PREFIX") == colour
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")  # the user's choice stands
    common.driver_log_environment()
    assert os.environ["RAY_COLOR_PREFIX"] == "1"


@pytest.mark.ray
def test_error_cause_is_the_last_line_of_a_ray_error(ray_local):
    """A failed trial's or worker group's error reaches the CLI's one-line message as its cause, not as Ray's
    header (`ray::f() (pid=..., ip=...)` in colour codes) that the CLI's first line showed."""
    import ray

    from sweep.stages.common import error_cause

    @ray.remote
    def fails():
        raise ValueError("val split is empty: it is needed to select the head")

    with pytest.raises(ray.exceptions.RayTaskError) as caught:
        ray.get(fails.remote())
    assert str(caught.value).splitlines()[0].lstrip("\x1b[0123456789m").startswith("ray::")
    assert error_cause(caught.value) == "ValueError: val split is empty: it is needed to select the head"
    assert error_cause("") == "str"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the finalizer's, on purpose
def test_a_ctrl_c_swallowed_by_a_finalizer_still_stops_the_command(write_pipeline, monkeypatch, capsys):
    """Python drops an exception raised in `__del__` or a weakref callback ("Exception ignored in ..."): a
    Ctrl-C handled while the garbage collector runs one (it happened in the report's imports) must still
    stop `sweep run` before the next stage, with exit status 130."""
    import signal

    from sweep import cli

    class Finalised:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # the handler runs here, inside the finalizer

    ran = []

    def stage(config, name):
        ran.append(name)
        if name == "pretrain" and len(ran) == 1:  # the first command only
            obj = Finalised()
            del obj  # KeyboardInterrupt inside __del__: printed as ignored, not raised here
            ran.append("pretrain went on")

    monkeypatch.setattr(cli, "run_stage", stage)
    path = write_pipeline()
    # Python's own handler, as a `sweep` started from a terminal has (a process started in the background by a
    # non-interactive shell, as a test run may be, ignores SIGINT, and the CLI leaves it so)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert cli.main(["run", str(path), "--stages", "pretrain,extract"]) == 130
        assert ran == ["pretrain", "pretrain went on"]  # extract never started
        assert "sweep: interrupted" in capsys.readouterr().err
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the process's own again
        assert cli.main(["run", str(path), "--stages", "pretrain,extract"]) == 0  # a later command starts afresh
        assert ran[2:] == ["pretrain", "extract"]
    finally:
        signal.signal(signal.SIGINT, before)


_ACTORS_SEEN_FROM_A_WORKER = """
import sys, types
import ray
from sweep.stages.common import init_ray

init_ray(types.SimpleNamespace(ray=types.SimpleNamespace(address=None, num_cpus=2)), dashboard=True)

@ray.remote(num_cpus=0)
class Probe:
    def actors(self):  # what Ray Train's PlacementGroupCleaner asks from inside the cluster
        from ray.util.state import list_actors
        return sorted(a.class_name for a in list_actors())

print("ACTORS", ray.get(Probe.remote().actors.remote()))
"""


@pytest.mark.ray
def test_a_local_ray_beside_one_that_ray_start_left_running(tmp_path, monkeypatch):
    """With `ray start --head` running on the machine, sweep starts its own Ray (a bare `ray.init(num_cpus=...)`
    raised "When connecting to an existing cluster, num_cpus ... must not be provided"), says so, and Ray's
    state API seen from its workers is its own: Ray Train's placement-group cleaner looked for its controller
    in the other Ray, did not find it and quit (or, earlier, would have removed the training's workers)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--port", str(free_port()), "--num-cpus", "1",
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while common.running_local_cluster() is None:
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
        out = subprocess.run([sys.executable, "-c", _ACTORS_SEEN_FROM_A_WORKER], capture_output=True, text=True,
                             timeout=180, cwd=tmp_path)
    finally:
        head.terminate()
        head.wait(timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "a Ray cluster runs on this machine" in out.stderr and "ray.address: auto" in out.stderr
    assert "ACTORS ['Probe']" in out.stdout, out.stdout + out.stderr[-3000:]


def test_pretraining_says_how_far_it_is_between_checkpoints(clock, capsys):
    """fashion-mnist.yaml's 250 steps between checkpoints took over 10 minutes on 2 CPU cores with no line at
    all: rank 0 now prints one at most every 10 s, with its loss, the images per second and the time left."""
    import torch

    from sweep.stages.pretrain import between_checkpoints

    progress = common.Progress("pretrain", 300, "steps", final=False)
    losses = []
    for step in range(1, 40):  # 1 s a step, 64 images a step on each of 2 workers
        clock[0] += 1.0
        losses.append(torch.tensor(0.5 if step < 30 else 0.25))
        progress.update(step, lambda: between_checkpoints(step, losses, 64 * len(losses) * 2, float(len(losses))))
    assert capsys.readouterr().err.splitlines() == [
        "[sweep] pretrain: 10/300 steps (worker 0's loss 0.5000 over steps 1-10, ~128 images/s), 10s, ~290s left",
        "[sweep] pretrain: 20/300 steps (worker 0's loss 0.5000 over steps 1-20, ~128 images/s), 20s, ~280s left",
        "[sweep] pretrain: 30/300 steps (worker 0's loss 0.4917 over steps 1-30, ~128 images/s), 30s, ~270s left"]
    # a checkpoint's own line (sweep.stages.pretrain.train_loop) carries the estimate, and the next line is
    # due 10 s after it
    assert progress.eta(39) == ", ~261s left"
    progress.said()
    clock[0] += 9.0
    progress.update(44)
    assert capsys.readouterr().err == ""
    # checkpoint_every=1: each step is a checkpoint, counted for its line's estimate without a line of its own
    every_step = common.Progress("pretrain", 300, "steps", final=False)
    for step in (1, 2):
        clock[0] += 20.0
        every_step.seen(step)
    assert every_step.eta(2) == ", ~5960s left" and capsys.readouterr().err == ""


def test_pretraining_ends_with_its_time_and_what_its_last_figures_cover():
    # fashion-mnist.yaml at 300 steps said "done at step 300 (last loss 0.0663, 62.6 images/s)": the mean over
    # steps 251-300 and their rate, not the last step's loss nor the run's rate; and not how long it took
    from sweep.stages.pretrain import done_line

    metrics = {"step": 300, "epoch": 8, "loss": 0.06634, "images_per_s": 62.59}
    assert done_line(metrics, 300, 250, 587.9) == \
        "pretrain: done at step 300 in 588s (steps 251-300: mean loss 0.0663, 62.6 images/s)"
    assert done_line({**metrics, "step": 250}, 250, 250, 10.0).startswith(
        "pretrain: done at step 250 in 10s (steps 1-250:")
    # a run resumed after its last step reports no loss: it said "mean loss nan, nan images/s"
    assert done_line({}, 300, 250, 4.2) == "pretrain: done at step 300 in 4s (every step was trained before this run)"


def test_a_baseline_says_how_far_it_is_inside_an_epoch(clock, capsys):
    """A supervised ResNet-18 on fashion-mnist.yaml's 4,619 training images (data.train.limit=6000) printed
    nothing between its start and the end of its first epoch on 2 CPU cores: rank 0 now prints a line at most
    every 10 s with the epoch, its loss so far, the images per second and the time left."""
    from sweep.stages.baselines import within_epoch

    progress = common.Progress("baselines sup", 2 * 37, "steps", final=False)
    t0, total = clock[0], [0.0, 0.0]
    for step in range(1, 13):  # 2 s a step of 64 images on each of 2 workers
        clock[0] += 2.0
        total = [total[0] + 2.0 * 64, total[1] + 64]
        progress.update(step, lambda: within_epoch(1, 2, total, 2, clock[0] - t0))
    assert capsys.readouterr().err.splitlines() == [
        "[sweep] baselines sup: 5/74 steps (epoch 1/2, worker 0's train_loss 2.0000 so far, ~64 images/s), 10s, "
        "~138s left",
        "[sweep] baselines sup: 10/74 steps (epoch 1/2, worker 0's train_loss 2.0000 so far, ~64 images/s), 20s, "
        "~128s left"]


def test_run_skips_pretraining_that_no_encoder_reads(write_pipeline, tiny_unet_checkpoint, capsys, monkeypatch):
    """Probing a given U-Net (every diffusion encoder with a checkpoint of its own): `sweep run` pretrained a
    U-Net nothing extracted (the paths audit's study: minutes here, hours on a real one)."""
    from sweep import cli

    ran = []
    monkeypatch.setattr(cli, "run_stage", lambda config, stage: ran.append(stage))
    given = write_pipeline(extract={"encoders": [{"name": "unet", "kind": "diffusion",
                                                  "checkpoint": str(tiny_unet_checkpoint)}]})
    assert cli.main(["run", str(given)]) == 0
    assert ran == ["extract", "probe", "report"]  # (no baselines configured)
    assert "pretrain: skipped: no encoder reads the U-Net it trains" in capsys.readouterr().err
    for named in (["run", str(given), "--stages", "pretrain,extract"], ["pretrain", str(given)]):  # asked for: run
        ran.clear()
        assert cli.main(named) == 0
        assert ran[0] == "pretrain" and "skipped" not in capsys.readouterr().err
    ran.clear()
    assert cli.main(["run", str(write_pipeline())]) == 0  # the default encoders read it
    assert ran == ["pretrain", "extract", "probe", "report"]
