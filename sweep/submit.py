"""`sweep submit`: run the pipeline as a Ray job on a cluster (Ray's JobSubmissionClient)."""

from __future__ import annotations

import os
import shlex
import sys
import time


def submit(pipeline: str, address: str, stages: list[str], overrides: list[str], wait: bool = True) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    # token auth (RAY_AUTH_MODE=token) is read from the environment by Ray's client itself
    client = JobSubmissionClient(address)
    cmd = ["sweep", "run", pipeline, "--stages", ",".join(stages)]
    for o in overrides:
        cmd += ["--set", o]
    excludes = [".venv", ".git", "runs", "__pycache__", "*.pyc", "mlruns"]
    job_id = client.submit_job(entrypoint=shlex.join(cmd),
                               runtime_env={"working_dir": os.getcwd(), "excludes": excludes})
    print(f"[sweep] submitted job {job_id} to {address}", file=sys.stderr)
    if not wait:
        print(job_id)
        return 0
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                             JobStatus.STOPPED):
        time.sleep(1)
    print(f"[sweep] job {job_id}: {status.value}", file=sys.stderr)
    return 0 if status == JobStatus.SUCCEEDED else 1
