"""`sweep submit`: run the pipeline as a Ray job on a cluster (Ray's JobSubmissionClient)."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from sweep.config import ArgumentError, ConfigError

# not shipped: environments, outputs and caches (a job writes its outputs to the pipeline's storage)
EXCLUDES = [".venv", ".git", "runs", "__pycache__", "*.pyc", "mlruns"]
# a cluster's job agent registers some seconds after the head starts (or later on a loaded head); until then
# Ray answers "No available agent to submit job, please try again later"
AGENT_WAIT_S = 60.0


def job_pipeline_path(pipeline: str, working_dir: str) -> str:
    """The pipeline's path inside the shipped working directory, as the job will see it."""
    path, root = Path(pipeline).resolve(), Path(working_dir).resolve()
    if not path.is_relative_to(root):
        raise ConfigError(f"PIPELINE {pipeline}: not inside the working directory {root}, the folder the job "
                          f"gets; run `sweep submit` from a folder that holds it")
    rel = path.relative_to(root)
    if any(part in EXCLUDES for part in rel.parts):
        raise ConfigError(f"PIPELINE {pipeline}: under {rel.parts[0]}/, which is not shipped with the job")
    return rel.as_posix()


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """An address without a scheme is, to Ray's job client, a cluster (GCS) address it asks for the dashboard's
    URL, retrying for ~40 s while nothing answers there (logging the node's other addresses): such an address
    must answer at once. `http(s)://`, `ray://` and `auto` go to Ray's client as given."""
    import socket

    scheme = address.split("://", 1)[0].lower() if "://" in address else None
    if scheme is not None and scheme not in ("http", "https", "ray"):
        raise ArgumentError(f"--address {address!r}: unknown scheme {scheme!r}; expected the dashboard's "
                            f"http://HOST:8265")
    if "://" in address or address == "auto":
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ArgumentError(f"--address {address!r}: expected the dashboard's http://HOST:8265, or a cluster "
                          f"address HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"--address {address}: nothing answers there ({e.strerror or e}); the Ray "
                              f"dashboard's address is http://HEAD:8265") from None


def submit_job(client, wait_s: float = AGENT_WAIT_S, retry_every_s: float = 2.0, **job) -> str:
    """`client.submit_job(**job)`, tried again while the cluster has no job agent yet (for `wait_s`)."""
    deadline, said = time.monotonic() + wait_s, False
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() + retry_every_s > deadline:
                raise
            if not said:
                print(f"[sweep] the cluster's job agent is not up yet; trying again for up to {wait_s:.0f}s",
                      file=sys.stderr)
                said = True
            time.sleep(retry_every_s)


def check_job_storage(config) -> None:
    """A job runs in Ray's temporary copy of the working directory: a relative storage (the default
    `runs/<name>` included) or SQLite tracking path would put the study there, lost at the next submit (a new
    copy) or head restart, and out of `sweep best`'s reach. ConfigError naming the key."""
    from sweep.storage import file_path, is_remote
    from sweep.tracking import configured_uri

    root = config.storage_root
    # file:///shared/x is absolute: it was refused as a relative storage
    if not is_remote(root) and not os.path.isabs(os.path.expanduser(file_path(root))):
        raise ConfigError(f"storage: {root!r} is relative: a Ray job runs in a temporary copy of this folder, where "
                          f"the study would land and be lost at the next submit; give a path every node shares "
                          f"(--set storage=/shared/sweep/{config.name}) or a bucket (--set storage=s3://...)")
    uri = configured_uri(config) or ""
    if uri.startswith("sqlite:///") and not os.path.isabs(uri.removeprefix("sqlite:///")):
        key = "tracking.uri" if config.tracking.uri else "tracking.uri (unset; $MLFLOW_TRACKING_URI)"
        raise ConfigError(f"{key}: {uri!r} is a relative SQLite path: in a Ray job it lands in a temporary "
                          f"copy of this folder; give an absolute path or the cluster's MLflow server")


FORWARDED_ENV = ("MLFLOW_TRACKING_URI",)  # and every SWEEP_* variable


def job_runtime_env(working_dir: str) -> dict:
    """The job's runtime environment: this folder, and the environment variables that change what sweep does
    here (`MLFLOW_TRACKING_URI`, `SWEEP_*`), so that the job does what `validate` showed here. Credentials
    (AWS_*, tokens) are not sent: the job's settings are visible in the cluster's dashboard."""
    env = {k: v for k, v in os.environ.items() if k in FORWARDED_ENV or k.startswith("SWEEP_")}
    return {"working_dir": working_dir, "excludes": EXCLUDES, **({"env_vars": env} if env else {})}


def submit(pipeline: str, address: str, stages: list[str], overrides: list[str], wait: bool = True) -> int:
    """Submit `sweep run` as a Ray job shipping the current directory; with `wait`, stream its logs and
    return the job's own exit status (its driver's exit code: 2 for an invalid config, 1 for a failure)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    working_dir = os.getcwd()
    cmd = ["sweep", "run", job_pipeline_path(pipeline, working_dir), "--stages", ",".join(stages)]
    # token auth (RAY_AUTH_MODE=token) is read from the environment by Ray's client itself
    check_address(address)
    client = JobSubmissionClient(address)
    for o in overrides:
        cmd += ["--set", o]
    try:
        job_id = submit_job(client, entrypoint=shlex.join(cmd), runtime_env=job_runtime_env(working_dir))
    except RuntimeError as e:
        if "413" in str(e) or "Maximum request body size" in str(e):  # Ray's upload limit, 100 MiB
            raise RuntimeError(f"{working_dir} is over Ray's 100 MiB limit for a job's working directory, after "
                               f"leaving out {', '.join(EXCLUDES)} and .gitignore'd files: run `sweep submit` from "
                               f"a folder that holds the pipeline files (and code), with data on the cluster or in a "
                               f"bucket") from None
        raise
    print(f"[sweep] submitted job {job_id} to {address}", file=sys.stderr)
    if not wait:
        print(job_id)
        return 0
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
        while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                 JobStatus.STOPPED):
            time.sleep(1)
    except Exception as e:  # noqa: BLE001 - the head went away (or the network): the job's fate is unknown here
        if not (isinstance(e, OSError) or type(e).__module__.startswith("aiohttp")):  # requests', aiohttp's
            raise
        raise ConnectionError(f"lost the connection to the cluster at {address} while following job {job_id} "
                              f"({type(e).__name__}); ask for its state with `ray job status {job_id} --address "
                              f"{address}` once the cluster answers") from None
    except KeyboardInterrupt:  # the job is the cluster's: Ctrl-C here stops following it, not the job
        print(f"[sweep] stopped following job {job_id}, which goes on running on the cluster; follow it again "
              f"with `ray job logs -f {job_id} --address {address}`, stop it with `ray job stop {job_id} "
              f"--address {address}`", file=sys.stderr)
        return 130
    code = client.get_job_info(job_id).driver_exit_code
    if code is None:  # stopped, or the driver never ran (e.g. the runtime environment failed)
        code = 0 if status == JobStatus.SUCCEEDED else 1
    print(f"[sweep] job {job_id}: {status.value} (exit code {code})", file=sys.stderr)
    if code == 127:
        print("[sweep] the job's shell found no `sweep` command: install sweep on the cluster's nodes (cluster.yaml "
              "does), or start Ray there from the environment that has it, activated", file=sys.stderr)
    return code
