"""`sweep submit`: real Ray jobs on the test session's local Ray (its job server, with the token
authentication Ray 2.60 sets up), the job's logs streamed back and its own exit code returned."""

from __future__ import annotations

import os

import pytest
import yaml

from sweep.cli import main
from tests.conftest import small_pipeline


def _dashboard(ray_local) -> str:
    url = ray_local._private.worker.get_dashboard_url()
    return url if url.startswith("http") else f"http://{url}"


def test_submit_returns_the_jobs_exit_code(ray_local, tmp_path, monkeypatch, capsys):
    address = _dashboard(ray_local)
    monkeypatch.chdir(tmp_path)  # the working directory shipped with the job: just the pipeline files
    store = tmp_path / "store"
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(small_pipeline(store)))
    # data that would be on the cluster only: not checked here (submitted), checked by the job (exit 2)
    (tmp_path / "cluster_data.yaml").write_text(yaml.safe_dump(small_pipeline(
        store, data={"image_size": 16, "channels": 1, "train": {"source": "imagefolder", "path": "/cluster/imgs"}})))

    # the probe stage before any features: the job's driver fails with exit code 1 and says why
    assert main(["submit", "pipeline.yaml", "--address", address, "--stages", "probe"]) == 1
    out, err = capsys.readouterr()
    assert "run `sweep extract` first" in out + err
    assert "exit code 1" in err

    assert main(["validate", "cluster_data.yaml"]) == 2  # here, the path is checked
    assert "path does not exist: /cluster/imgs" in capsys.readouterr().err
    assert main(["submit", "cluster_data.yaml", "--address", address, "--stages", "probe"]) == 2
    out, err = capsys.readouterr()
    assert "data.train: path does not exist: /cluster/imgs" in out + err
    assert "exit code 2" in err
    # neither job got as far as writing: the first made the storage folder and its lock file, nothing else
    assert sorted(p.name for p in store.iterdir()) == [".sweep.lock"]


@pytest.mark.parametrize("where", ["outside", "excluded"])
def test_submit_refuses_a_pipeline_the_job_would_not_get(write_pipeline, tmp_path, monkeypatch, capsys, where):
    path = write_pipeline()  # tmp_path/pipeline.yaml
    if where == "outside":
        (tmp_path / "sub").mkdir()
        monkeypatch.chdir(tmp_path / "sub")
        arg = str(path)
    else:
        monkeypatch.chdir(tmp_path)
        (tmp_path / "runs").mkdir()
        arg = "runs/pipeline.yaml"
        (tmp_path / arg).write_text(path.read_text())
    # no cluster is contacted: the address does not exist
    assert main(["submit", arg, "--address", "http://127.0.0.1:9", "--no-wait"]) == 2
    err = capsys.readouterr().err
    assert (f"PIPELINE {arg}: not inside the working directory" if where == "outside"
            else "under runs/, which is not shipped") in err, err


@pytest.mark.parametrize("setting, key", [("storage=runs/t", "storage: 'runs/t' is relative"),
                                          ("tracking.uri=sqlite:///runs/t.db", "tracking.uri: 'sqlite:///runs/t.db' is "
                                                                               "a relative SQLite path")])
def test_submit_refuses_a_study_that_would_land_in_the_jobs_temporary_folder(write_pipeline, tmp_path, monkeypatch,
                                                                             capsys, setting, key):
    """A relative storage (the default runs/<name>) in a job is inside Ray's temporary copy of the working
    directory: a new copy at the next submit (the study starts over), gone at a head restart, and `sweep best`
    here finds nothing. Refused before anything is sent (the address does not exist)."""
    monkeypatch.chdir(tmp_path)
    assert main(["submit", str(write_pipeline().relative_to(tmp_path)), "--address", "http://127.0.0.1:9",
                 "--no-wait", "--set", setting]) == 2
    assert key in capsys.readouterr().err


@pytest.mark.parametrize("storage", ["~/shared/t", "file:///shared/My%20Studies/t"])
def test_an_absolute_storage_written_with_a_tilde_or_as_a_file_uri_is_not_called_relative(tmp_path, storage):
    """`storage: file:///shared/x` was refused as relative (the check read the URI as a path)."""
    from sweep.config import load_config
    from sweep.submit import check_job_storage

    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(small_pipeline(storage)))
    check_job_storage(load_config(path, check_local_paths=False))


def test_a_relative_sqlite_uri_from_the_environment_is_named_as_such(write_pipeline, tmp_path):
    """The relative SQLite URI came from $MLFLOW_TRACKING_URI (read when sweep starts): the message named
    `tracking.uri`, a key the pipeline and the --set overrides leave unset."""
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": "sqlite:///rel.db"}
    done = subprocess.run([sys.executable, "-m", "sweep.cli", "submit", str(write_pipeline()), "--address",
                           "http://127.0.0.1:9", "--no-wait"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "tracking.uri (unset; $MLFLOW_TRACKING_URI): 'sqlite:///rel.db' is a relative SQLite path" in done.stderr


def test_a_cluster_asking_for_a_token_gets_rays_whole_advice(write_pipeline, tmp_path, monkeypatch, capsys):
    """Ray's AuthenticationError says where the token goes on its later lines, which the one-line error
    policy cut off: it is shown whole (on one line)."""
    from ray.exceptions import AuthenticationError

    from sweep import submit

    def needs_a_token(*args, **kwargs):
        raise AuthenticationError("Authentication required: Unauthorized: Missing authentication token")

    monkeypatch.setattr(submit, "submit", needs_a_token)
    monkeypatch.chdir(tmp_path)
    assert main(["submit", str(write_pipeline().relative_to(tmp_path)), "--address", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert "sweep: AuthenticationError: Authentication required" in err and "RAY_AUTH_TOKEN" in err, err


def test_the_job_gets_the_environment_that_changes_what_sweep_does(monkeypatch, tmp_path):
    """$MLFLOW_TRACKING_URI and SWEEP_* go with the job (validate here used the server; the job fell back to
    its own default store and failed on a remote storage); credentials stay here."""
    from sweep.submit import EXCLUDES, job_runtime_env

    for k in [k for k in os.environ if k.startswith("SWEEP_") or k == "MLFLOW_TRACKING_URI"]:
        monkeypatch.delenv(k)
    assert job_runtime_env(str(tmp_path)) == {"working_dir": str(tmp_path), "excludes": EXCLUDES}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://head:5000")
    monkeypatch.setenv("SWEEP_DEBUG", "1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    assert job_runtime_env(str(tmp_path))["env_vars"] == {"MLFLOW_TRACKING_URI": "http://head:5000",
                                                          "SWEEP_DEBUG": "1"}


class _FakeJobClient:
    """Ray's JobSubmissionClient in the states a real cluster cannot be put in on demand here: an upload over
    its limit, a head that goes away while the job is followed, a node without `sweep`."""

    def __init__(self, address, upload_too_big=False, lost=False, exit_code=0):
        self.upload_too_big, self.lost, self.exit_code = upload_too_big, lost, exit_code

    def submit_job(self, **job):
        if self.upload_too_big:
            raise RuntimeError("Request failed with status code 413: Maximum request body size 104857600 exceeded..")
        return "raysubmit_1"

    async def tail_job_logs(self, job_id):
        yield "[sweep] == pretrain ==\n"

    def get_job_status(self, job_id):
        from ray.job_submission import JobStatus

        if self.lost:
            import requests

            raise requests.exceptions.ConnectionError("('Connection aborted.', RemoteDisconnected('Remote end "
                                                      "closed connection without response'))")
        return JobStatus.FAILED if self.exit_code else JobStatus.SUCCEEDED

    def get_job_info(self, job_id):
        import types

        return types.SimpleNamespace(driver_exit_code=self.exit_code)


@pytest.mark.parametrize("state, code, said", [
    ({"upload_too_big": True}, 1, "is over Ray's 100 MiB limit for a job's working directory"),
    ({"lost": True}, 1, "lost the connection to the cluster at http://head:8265 while following job raysubmit_1"),
    ({"exit_code": 127}, 127, "the job's shell found no `sweep` command"),
])
def test_submit_says_what_a_cluster_answer_means(write_pipeline, tmp_path, monkeypatch, capsys, state, code, said):
    import functools

    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", functools.partial(_FakeJobClient, **state))
    monkeypatch.chdir(tmp_path)
    assert main(["submit", str(write_pipeline().relative_to(tmp_path)), "--address", "http://head:8265"]) == code
    assert said in capsys.readouterr().err


class _ClusterStartingUp:
    """Ray's JobSubmissionClient as a just-started cluster answers it (its job agent not registered yet for
    the first `busy` calls): that window cannot be opened on demand on a real head, so it is played here."""

    def __init__(self, busy: int, message: str = "Request failed with status code 500: No available agent to "
                                                 "submit job, please try again later.."):
        self.busy, self.message, self.calls = busy, message, []

    def submit_job(self, **job):
        self.calls.append(job)
        if len(self.calls) <= self.busy:
            raise RuntimeError(self.message)
        return "raysubmit_1"


def test_submit_waits_for_the_clusters_job_agent(capsys):
    from sweep.submit import submit_job

    client = _ClusterStartingUp(busy=2)
    assert submit_job(client, wait_s=1, retry_every_s=0.01, entrypoint="sweep run p.yaml") == "raysubmit_1"
    assert [c["entrypoint"] for c in client.calls] == ["sweep run p.yaml"] * 3
    assert capsys.readouterr().err.count("job agent is not up yet") == 1
    # past the wait, or any other error: raised as it is
    with pytest.raises(RuntimeError, match="No available agent"):
        submit_job(_ClusterStartingUp(busy=1000), wait_s=0.05, retry_every_s=0.01, entrypoint="x")
    other = _ClusterStartingUp(busy=1, message="Request failed with status code 401: Unauthorized")
    with pytest.raises(RuntimeError, match="401"):
        submit_job(other, wait_s=1, retry_every_s=0.01, entrypoint="x")
    assert len(other.calls) == 1


def test_submit_to_an_address_nothing_answers_fails_at_once(capsys):
    """Without a scheme Ray's job client takes the address for a cluster's GCS and retried for ~40 s, logging
    other addresses of this machine: nothing answering there is said at once."""
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    shared = ["--set", "storage=/shared/sweep/demo"]  # a job's storage must be absolute (see below)
    assert main(["submit", "pipelines/demo.yaml", "--address", f"127.0.0.1:{port}", *shared]) == 1
    assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err
    assert f"sweep: ConnectionError: --address 127.0.0.1:{port}: nothing answers there" in err
    assert main(["submit", "pipelines/demo.yaml", "--address", "head-node", *shared]) == 2
    assert "sweep: invalid argument: --address 'head-node': expected the dashboard's http://HOST:8265" in (
        capsys.readouterr().err)
    # Ray's own message: "no module htp"
    assert main(["submit", "pipelines/demo.yaml", "--address", "htp://127.0.0.1:8265", *shared]) == 2
    assert "--address 'htp://127.0.0.1:8265': unknown scheme 'htp'" in capsys.readouterr().err


def test_ctrl_c_while_following_a_job_leaves_it_running(ray_local, tmp_path, monkeypatch, capsys):
    """Ctrl-C during `submit`'s wait stops following the job, says how to follow or stop it, and exits 130;
    the job itself goes on (it is the cluster's), until stopped here for the tests that follow."""
    import os
    import signal
    import threading
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    address = _dashboard(ray_local)
    monkeypatch.chdir(tmp_path)
    # a pretraining that runs for a minute or two: longer than the test follows it, and it ends by itself
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(small_pipeline(
        tmp_path / "store", pretrain={"steps": 400, "checkpoint_every": 400, "workers": 1})))
    client = JobSubmissionClient(address)
    before = {j.submission_id for j in client.list_jobs()}
    ours: list[str] = []

    def ctrl_c_once_running():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            new = [j for j in client.list_jobs() if j.submission_id not in before]
            if new and new[0].status == JobStatus.RUNNING:
                ours.append(new[0].submission_id)
                time.sleep(2)
                break
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)

    # Python's own SIGINT handler, as in a fresh `sweep submit` process (a Tuner.fit or TorchTrainer.fit of an
    # earlier test in this session may have left Ray's installed, which takes the signal without interrupting)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=ctrl_c_once_running, daemon=True).start()
    try:
        assert main(["submit", "pipeline.yaml", "--address", address, "--stages", "pretrain"]) == 130
        err = capsys.readouterr().err
        assert ours and f"stopped following job {ours[0]}, which goes on running on the cluster" in err
        assert f"ray job stop {ours[0]} --address {address}" in err
        assert client.get_job_status(ours[0]) == JobStatus.RUNNING
    finally:
        signal.signal(signal.SIGINT, handler)
        for job_id in ours:
            client.stop_job(job_id)
            deadline = time.monotonic() + 60
            while client.get_job_status(job_id) == JobStatus.RUNNING and time.monotonic() < deadline:
                time.sleep(1)
