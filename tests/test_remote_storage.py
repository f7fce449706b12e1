"""`storage: s3://…` end to end, against a real S3 API on 127.0.0.1 (moto's server: the one stand-in here,
for the cloud provider). The checkpoint folders (pretrain/final, baselines/<name>/final) are published with
their completion marker last and fetched into a local cache by the encoders; features, manifests, Tune
state and the report live in the bucket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from conftest import free_port, small_pipeline
from sweep.storage import fetch_dir, publish_dir, read_json

BUCKET = "sweep-test"


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on 127.0.0.1 and the AWS variables that point pyarrow (and Ray) at it."""
    moto_server = pytest.importorskip("moto.server")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1", allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_publish_then_fetch_round_trip(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEP_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{BUCKET}/unit/final"
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "weights.bin").write_bytes(os.urandom(3000))
    (src / "sub" / "config.json").write_text('{"a": 1}')
    (src / "done.json").write_text('{"key": "k1"}')
    expected = _files(src)
    publish_dir(src, uri, "done.json")
    assert read_json(f"{uri}/done.json") == {"key": "k1"}
    local = fetch_dir(uri)
    assert local.is_relative_to(tmp_path / "cache") and _files(local) == expected
    assert fetch_dir(uri) == local  # cached: not downloaded again

    # republished (a retrained checkpoint): the old files are gone and the next fetch sees the new ones
    src2 = tmp_path / "src2"
    src2.mkdir()
    (src2 / "weights.bin").write_bytes(b"new")
    (src2 / "done.json").write_text('{"key": "k2"}')
    publish_dir(src2, uri, "done.json")
    again = fetch_dir(uri)
    assert again != local and _files(again) == {"done.json": b'{"key": "k2"}', "weights.bin": b"new"}

    with pytest.raises(FileNotFoundError, match="nothing at"):
        fetch_dir(f"s3://{BUCKET}/unit/missing")


def test_sweep_run_on_s3_storage(s3_env, tmp_path):
    """`sweep run` with storage in the bucket, in its own process (its own local Ray, started with the
    AWS variables, as on a cluster node), then a rerun that finds everything done."""
    storage = f"s3://{BUCKET}/study"
    raw = small_pipeline(tmp_path / "unused", extract={"timesteps": [0, 100], "batch_size": 32, "shard_size": 40},
                         probe={"epochs": 5, "lrs": [0.1], "weight_decays": [0.0], "kmeans": False})
    raw["storage"] = storage
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, **s3_env, "SWEEP_CACHE": str(tmp_path / "cache"), "RAY_ADDRESS": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    cli = [str(Path(sys.executable).parent / "sweep")]
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    first = subprocess.run([*cli, "run", str(path)], env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert first.returncode == 0, first.stderr[-3000:]
    # the pretraining's progress: one line per report (steps 3 and 6) from rank 0, once each, and none of
    # Ray Train's own per-report INFO lines
    progress = [line.split("[sweep] ")[1] for line in first.stderr.splitlines() if "[sweep] pretrain: step" in line]
    assert [p.split(",")[0] for p in progress] == ["pretrain: step 3/6", "pretrain: step 6/6"], first.stderr[-3000:]
    assert "Reporting training result" not in first.stderr and "Checkpoint successfully created" not in first.stderr

    assert read_json(f"{storage}/pretrain/final/sweep_pretrain.json")["steps"] == 6
    manifest = read_json(f"{storage}/features/diffusion/_manifest.json")
    assert manifest["complete"] and len(manifest["columns"]) == 10  # 5 blocks x 2 timesteps
    assert manifest["checkpoint"] == f"{storage}/pretrain/final"  # where it lives, not the local cache
    assert sum(s["rows"] for d in manifest["datasets"].values() for s in d["shards"]) == 105
    fs, base = pafs.FileSystem.from_uri(storage)
    shards = fs.get_file_info(pafs.FileSelector(f"{base}/features/diffusion/plankton"))
    assert sorted(Path(i.path).name for i in shards) == [f"part-{i:05d}.parquet" for i in range(3)]
    assert "## diffusion" in fs.open_input_stream(f"{base}/report/report.md").read().decode()
    # MLflow's artifacts (the pretraining's samples, the report's files) in the bucket too, none in the
    # folder the command ran from (MLflow's own default for a SQLite store: ./mlruns)
    artifacts = fs.get_file_info(pafs.FileSelector(f"{base}/mlartifacts", recursive=True))
    names = sorted(Path(i.path).name for i in artifacts if i.type == pafs.FileType.File)
    assert "samples.png" in names and "report.md" in names, names
    assert list(cwd.iterdir()) == []

    best = subprocess.run([*cli, "best", str(path), "--format", "json", "--top", "0"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=cwd)
    assert best.returncode == 0, best.stderr[-3000:]
    assert len(json.loads(best.stdout)) == 10

    rerun = subprocess.run([*cli, "run", str(path), "--stages", "pretrain,extract,probe"], env=env,
                           capture_output=True, text=True, timeout=600, cwd=cwd)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "pretrain: s3://sweep-test/study/pretrain/final is complete for this config" in rerun.stderr
    assert "already complete, nothing to do" in rerun.stderr
    assert "probe: all 10 trials already in MLflow" in rerun.stderr


def test_remote_storage_needs_a_tracking_uri(tmp_path, capsys, monkeypatch):
    from sweep import tracking
    from sweep.cli import main

    monkeypatch.setattr(tracking, "_ENV_URI", None)  # as in a shell without MLFLOW_TRACKING_URI
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({**small_pipeline(tmp_path), "storage": f"s3://{BUCKET}/x"}))
    for command in (["best"], ["validate"], ["run", "--stages", "pretrain"]):  # before any stage starts
        assert main([command[0], str(path), *command[1:]]) == 2
        err = capsys.readouterr().err
        assert "tracking.uri: needed when storage is remote" in err and "s3://sweep-test/x" in err, err


def test_validate_warns_of_a_bucket_it_cannot_use(s3_env, tmp_path, capsys):
    """A missing bucket passed `validate`; `run` then failed on its first write, after seconds of retries,
    advising pyarrow's `allow_bucket_creation`. `validate` now says so (a warning: the cluster's
    credentials may differ from this shell's)."""
    from sweep.cli import main

    for bucket, said in ((BUCKET, f"  storage: s3://{BUCKET}/x\n"),
                         ("no-such-bucket", "  storage: warning: s3://no-such-bucket/x: bucket 'no-such-bucket' does "
                                            "not exist (or these credentials cannot see it) (from here; the stages "
                                            "would fail)\n")):
        path = tmp_path / "pipeline.yaml"
        path.write_text(yaml.safe_dump({**small_pipeline(tmp_path), "storage": f"s3://{bucket}/x",
                                        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}))
        assert main(["validate", str(path)]) == 0
        assert said in capsys.readouterr().out
