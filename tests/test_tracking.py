"""`sweep.tracking`'s choices about where MLflow keeps things (no Ray)."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from conftest import free_port, small_pipeline
from sweep import tracking
from sweep.cli import main
from sweep.config import load_config
from sweep.storage import Storage


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.setattr(tracking, "_ENV_URI", None)  # as in a shell without MLFLOW_TRACKING_URI


@pytest.mark.parametrize("uri, storage, expected", [
    (None, "local", "local"),  # the default store, runs/<name>/mlflow.db
    ("sqlite:///{tmp}/elsewhere/mlflow.db", "local", "local"),
    ("postgresql+psycopg2://me@db.example/mlflow", "local", "local"),
    ("sqlite:///{tmp}/mlflow.db", "s3://bucket/study", "s3://bucket/study/mlartifacts"),
    ("http://127.0.0.1:5000", "local", None),  # a server has its own artifact root
    ("http://head:5000", "s3://bucket/study", None),
])
def test_artifact_location_of_a_new_experiment(tmp_path, uri, storage, expected):
    raw = small_pipeline(tmp_path / "store" if storage == "local" else storage)
    if uri:
        raw["tracking"] = {"uri": uri.format(tmp=tmp_path)}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    if expected == "local":
        expected = (tmp_path / "store" / "mlartifacts").as_uri()
    assert tracking.artifact_location(config) == expected


def _run_with_a_note(config, tmp_path):
    """(experiment id, client, run id) of a new run of `config` with a file `note.txt` ("kept") logged to it."""
    experiment_id = tracking.ensure_experiment(config)
    client = tracking.client_for(config)
    run_id = client.create_run(experiment_id).info.run_id
    note = tmp_path / "note.txt"
    note.write_text("kept")
    client.log_artifact(run_id, str(note))
    return experiment_id, client, run_id


def test_default_store_in_a_folder_with_url_characters_stays_in_the_storage(tmp_path):
    """The default store's URI was `sqlite:///<path>` as written: SQLAlchemy reads it as a URL, so a folder
    named `Plankton 2024 #3 %20 ?&'` gave a database file `Plankton 2024 #3   ` beside the storage (`%20` a
    space, the rest after `?` a query), where `sweep best` and `report` found no store and no runs."""
    storage = tmp_path / "My Studies" / "Plankton 2024 #3 é 日本 %20 50% ?&'" / "store"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(small_pipeline(storage)))
    config = load_config(path)

    experiment_id, client, run_id = _run_with_a_note(config, tmp_path)

    assert tracking.local_mlflow_db(config) == storage / "mlflow.db"
    assert (storage / "mlflow.db").is_file() and tracking.store_exists(config)
    # no file beside it (MLflow itself makes an empty folder named as the URI is written, `%2520 50%25 %3F`)
    assert [p for p in (tmp_path / "My Studies").rglob("*") if p.is_file() and storage not in p.parents] == []
    assert (storage / "mlartifacts" / run_id / "artifacts" / "note.txt").read_text() == "kept"
    assert [r.info.run_id for r in client.search_runs([experiment_id])] == [run_id]


def test_runs_tagged_with_a_file_uri_storage_are_this_storages(tmp_path):
    """A `file://` storage is read as its folder since 174283d; its earlier runs are tagged with the URI, and
    compared as written they were another storage's (a rerun's stages, `best`'s one-run-per-trial)."""
    from sweep.best import records

    uri = f"file://{tmp_path / 'My Studies' / 'store'}".replace(" ", "%20")
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(small_pipeline(uri)))
    config = load_config(path)
    here = Storage.of(config.storage_root).root
    assert here == str(tmp_path / "My Studies" / "store")
    client = tracking.client_for(config)
    run = client.create_run(tracking.ensure_experiment(config), tags={tracking.TAG_STORAGE: uri})
    assert tracking.same_storage(client.get_run(run.info.run_id), config)
    frame = pd.DataFrame([{"run_id": run.info.run_id, f"tags.{tracking.TAG_STORAGE}": uri},
                          {"run_id": "other", f"tags.{tracking.TAG_STORAGE}": "s3://bucket/x"}])
    assert [r["storage"] for r in records(frame)] == [here, "s3://bucket/x"]


def test_validate_names_the_file_a_sqlite_uri_opens_where_it_is_not_the_path_as_written(tmp_path, capsys):
    """`tracking.uri: sqlite:////data/Plankton 50% ?/t.db` opens `/data/Plankton 50% ` (the path ends at `?`):
    validate showed the URI only, and the store went to that file unsaid."""
    import urllib.parse

    folder = tmp_path / "Plankton 50% ?&'"
    folder.mkdir()
    common = ["validate", "pipelines/demo.yaml", "--set", f"storage={tmp_path / 'store'}", "--set"]
    assert main([*common, f'tracking.uri="sqlite:///{folder}/t.db"']) == 0
    assert (f"  tracking: sqlite:///{folder}/t.db (the SQLite file {tmp_path}/Plankton 50% ; a URI's path is "
            f"percent-decoded and ends at '?': where '%' or '?' are part of the path, write them as %25 and "
            f"%3F)\n") in capsys.readouterr().out
    encoded = f"sqlite:///{urllib.parse.quote(str(folder / 't.db'))}"
    assert main([*common, f"tracking.uri={encoded}"]) == 0
    assert f"  tracking: {encoded} (the SQLite file {folder / 't.db'})\n" in capsys.readouterr().out
    assert main([*common, f"tracking.uri=sqlite:///{tmp_path / 't.db'}"]) == 0
    assert f"  tracking: sqlite:///{tmp_path / 't.db'}\n" in capsys.readouterr().out


def test_artifacts_stay_with_the_study_wherever_the_command_ran(write_pipeline, tmp_path, monkeypatch):
    """With an explicit SQLite store, MLflow by itself would write the artifacts into ./mlruns of whatever
    folder the command ran from."""
    (tmp_path / "db").mkdir()
    config = load_config(write_pipeline(tracking={"uri": f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    experiment_id, _, run_id = _run_with_a_note(config, tmp_path)

    stored = tmp_path / "store" / "mlartifacts" / run_id / "artifacts" / "note.txt"
    assert stored.read_text() == "kept"
    assert list(elsewhere.iterdir()) == []
    assert tracking.ensure_experiment(config) == experiment_id  # found, not made again


def test_no_server_at_the_tracking_uri_fails_at_once_naming_it(write_pipeline, capsys):
    """MLflow's client would retry a dead address with back-off for minutes, saying nothing."""
    import time

    from sweep.cli import main

    uri = f"http://127.0.0.1:{free_port()}"
    path = write_pipeline(tracking={"uri": uri})
    t0 = time.perf_counter()
    for command in (["best", str(path)], ["run", str(path), "--stages", "probe"], ["baselines", str(path)]):
        assert main(command) == 1, command
        err = capsys.readouterr().err
        assert f"no MLflow server answers at {uri}" in err and "Connection refused" in err, err
    assert time.perf_counter() - t0 < 30
    assert main(["validate", str(path)]) == 0  # valid; the server may answer only from the cluster
    assert f"tracking: warning: tracking.uri: no MLflow server answers at {uri}" in capsys.readouterr().out


def test_any_http_answer_counts_as_a_server(tmp_path):
    """An authenticating proxy's 401 or a 404 still means a server is there: only silence fails."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tracking.check_server(f"http://127.0.0.1:{server.server_address[1]}/")
    finally:
        server.shutdown()
    tracking.check_server(f"sqlite:///{tmp_path / 'mlflow.db'}")  # not a server: nothing to reach
    with pytest.raises(tracking.TrackingServerUnreachable, match="answers at http://no-such-host.invalid:5000"):
        tracking.check_server("http://no-such-host.invalid:5000")


def test_runs_of_an_earlier_probe_revision_are_kept_apart(write_pipeline, tmp_path, capsys):
    """Probe runs tagged with the hash these settings had under an earlier probe revision (whose heads
    differ) are neither reused by the probe's resume nor shown by `sweep best`; both say they are there."""
    path = write_pipeline()
    config = load_config(path, ["probe.max_concurrent_trials=2"])
    hashes = list(config.earlier_config_hashes())
    assert config.config_hash() not in hashes and len(set(hashes)) == 2
    experiment_id = tracking.ensure_experiment(config)
    client = tracking.client_for(config)

    def run(config_hash: str, trial: str | None, parent: str | None = None) -> str:
        tags = {tracking.TAG_STAGE: "probe", tracking.TAG_PIPELINE: config.name, tracking.TAG_HASH: config_hash}
        if trial:
            tags |= {tracking.TAG_TRIAL: trial, tracking.TAG_PARENT: parent}
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        client.log_metric(run_id, "val_macro_f1", 0.5)
        client.set_terminated(run_id)
        return run_id

    for old in hashes:
        parent = run(old, None)
        for t in (0, 100):
            run(old, f"diffusion/mid_block@t{t}", parent)
    run(load_config(path, ["probe.epochs=3"]).earlier_config_hashes().popitem()[0], "diffusion/x",
        parent)  # other settings: not counted
    capsys.readouterr()

    assert tracking.search_trial_runs(config).empty
    assert len(tracking.search_trial_runs(config, any_config=True)) == 5
    assert tracking.earlier_probe_runs(config) == {"probe revision 1 (sweep until 2026-11-24)": 2,
                                                   "probe revision 1 (sweep 0.1.0 until 2026-11-23)": 2}
    assert tracking.finished_trials(config) == (set(), [])  # probed again
    tracking.explain_new_settings(config, copying=False)
    err = capsys.readouterr().err
    assert "probe: 2 run(s) of these settings made by probe revision 1 (sweep until 2026-11-24) are kept apart" \
        in err
    assert main(["best", str(path), "--set", "probe.max_concurrent_trials=2"]) == 0
    err = capsys.readouterr().err
    assert "2 run(s) of the same settings were made by probe revision 1 (sweep 0.1.0 until 2026-11-23)" in err
    assert "pass the same --set overrides" not in err
    from sweep.stages import report

    with pytest.raises(RuntimeError, match=r"2 run\(s\) of these settings made by probe revision 1 \(sweep until "
                                           r"2026-11-24\) are kept apart .*run `sweep probe` first"):
        report.run(config)
    # once this revision has probed them, its runs are the results
    parent = run(config.config_hash(), None)
    run(config.config_hash(), "diffusion/mid_block@t0", parent)
    assert tracking.finished_trials(config) == ({"diffusion/mid_block@t0"}, [])
    assert capsys.readouterr().err == ""


def test_runs_from_before_the_probe_hash_get_it_when_their_config_probes_again(write_pipeline):
    """Runs made before sweep tagged `sweep.probe_hash` get it from their config's next probe planning (their
    config hash says what it is), so that a config differing only in an encoder's settings can copy them."""
    config = load_config(write_pipeline())
    experiment_id = tracking.ensure_experiment(config)
    client = tracking.client_for(config)
    tags = {tracking.TAG_STAGE: "probe", tracking.TAG_PIPELINE: config.name, tracking.TAG_HASH: config.config_hash()}
    parent = client.create_run(experiment_id, tags=tags).info.run_id
    ids = {}
    for t, features in ((0, "aaaa"), (100, None)):  # without a feature tag it cannot be copied: left as is
        run_id = client.create_run(experiment_id, tags={
            **tags, tracking.TAG_TRIAL: f"diffusion/mid_block@t{t}", tracking.TAG_PARENT: parent,
            **({tracking.TAG_FEATURES: features} if features else {})}).info.run_id
        client.log_param(run_id, "encoder", "diffusion")
        client.set_terminated(run_id)
        ids[t] = run_id
    assert tracking.finished_trials(config, {"diffusion": "aaaa"})[0] == {"diffusion/mid_block@t0",
                                                                         "diffusion/mid_block@t100"}
    assert client.get_run(ids[0]).data.tags[tracking.TAG_PROBE_HASH] == config.probe_hash()
    assert tracking.TAG_PROBE_HASH not in client.get_run(ids[100]).data.tags
    other = load_config(write_pipeline(), ["pretrain.steps=9"])
    assert set(tracking.reusable_trial_runs(other, {"diffusion/mid_block@t0"}, {"diffusion": "aaaa"})) == \
        {"diffusion/mid_block@t0"}


def test_a_training_workers_metrics_wait_for_a_lost_server_and_reach_it_when_it_is_back(tmp_path, capsys):
    """Pretraining and the baselines log through `WorkerMetrics`: with the server gone a window's metrics are
    held at once (MLflow's client retried ~4 minutes per request, the training standing still) and reach the
    server when it answers again; a stage's run is not ended into the void for minutes either."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from conftest import start_mlflow_server, stop_mlflow_server
    from sweep.stages.common import WorkerMetrics

    db, port = tmp_path / "mlflow.db", free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(db, port)
    try:
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("t")).info.run_id
        log = WorkerMetrics(uri, run_id, "pretrain")

        def window(first):
            return [Metric("loss", 1.0 / s, 1000 * s, s) for s in range(first, first + 3)]

        assert log.log(window(1), "step 3")
        stop_mlflow_server(server, hard=True)
        t0 = time.monotonic()
        assert not log.log(window(4), "step 6") and not log.log(window(7), "step 9")
        assert time.monotonic() - t0 < 5 and len(log.held) == 6
        (tmp_path / "p.yaml").write_text(yaml.safe_dump({**small_pipeline(tmp_path / "s"), "tracking": {"uri": uri}}))
        config = load_config(tmp_path / "p.yaml")
        t0 = time.monotonic()
        with pytest.raises(tracking.TrackingServerUnreachable, match=f"127.0.0.1:{port}"):
            tracking.finish_run(config, run_id)
        tracking.finish_run(config, run_id, "KILLED")  # on a stage's error or Ctrl-C: said, that error goes on
        assert time.monotonic() - t0 < 10
        server = start_mlflow_server(db, port)
        assert log.log(window(10), "step 12") and log.held == []
        log.close()  # nothing held: nothing to say
        history = MlflowClient(uri).get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(1, 13))
        tracking.finish_run(config, run_id)
        assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
    finally:
        stop_mlflow_server(server, hard=True)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"[sweep] pretrain: the MLflow server at {uri} does not answer (step 6); training goes on, "
                      f"its metrics are held and logged once the server answers")
    assert err[1].startswith(f"[sweep] MLflow run {run_id} stays RUNNING, not KILLED: no MLflow server answers at "
                             f"{uri} (")
    assert err[2:] == [
        "[sweep] pretrain: the MLflow server answers again (step 12); the metrics held since step 6 are logged"]


def test_metrics_a_lost_server_never_got_are_counted_at_the_end(tmp_path, capsys):
    from mlflow.entities import Metric

    from sweep.stages.common import WorkerMetrics

    log = WorkerMetrics(f"http://127.0.0.1:{free_port()}", "0" * 32, "baselines supervised")  # nothing there
    assert not log.log([Metric("train_loss", 0.5, 0, s) for s in (1, 2)], "epoch 1")
    log.close()
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"[sweep] baselines supervised: 2 metric values since epoch 1 are not in MLflow (the server at {log.uri} "
        f"does not answer); the trained weights are saved")


def test_a_probe_of_new_settings_says_where_the_earlier_runs_are(write_pipeline, capsys):
    """An OOD set added (or any setting that changes results) makes a new config hash: the probe ran every
    trial again with '0 already finished' and no word of why, or of the earlier runs."""
    path = write_pipeline()
    before = load_config(path)
    config = load_config(path, ["probe.epochs=3"])
    client = tracking.client_for(before)
    experiment_id = tracking.ensure_experiment(before)
    tags = {tracking.TAG_STAGE: "probe", tracking.TAG_PIPELINE: before.name, tracking.TAG_HASH: before.config_hash()}
    parent = client.create_run(experiment_id, tags=tags).info.run_id
    for t in (0, 100):
        run_id = client.create_run(experiment_id, tags={**tags, tracking.TAG_TRIAL: f"diffusion/mid_block@t{t}",
                                                        tracking.TAG_PARENT: parent}).info.run_id
        client.set_terminated(run_id)
    capsys.readouterr()
    assert tracking.finished_trials(config) == (set(), [])
    tracking.explain_new_settings(config, copying=False)
    assert capsys.readouterr().err.splitlines() == [
        f"[sweep] probe: no run of these settings yet (config hash {config.config_hash()}); 2 probe run(s) of other "
        f"settings of {config.name!r} (hash {before.config_hash()}) stay in MLflow (`sweep best --any-config`); a "
        f"change to the data, the seed or the probe (data.ood, the probe grid, ...) probes every trial again, one "
        f"to an encoder's own settings (pretrain, baselines, extract) that encoder's trials"]
    # copying runs of the other config (only encoders' own settings differ): the copy's line says so, not
    # 'probes every trial again'
    tracking.explain_new_settings(config, copying=True)
    assert capsys.readouterr().err == ""
    assert tracking.finished_trials(before) == ({"diffusion/mid_block@t0", "diffusion/mid_block@t100"}, [])
    assert capsys.readouterr().err == ""  # its own runs: nothing to explain


def test_a_damaged_mlflow_database_is_named(write_pipeline, tmp_path, capsys):
    """A damaged SQLite store: the one-line cause said 'file is not a database', not which file."""
    pipeline = write_pipeline()
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "mlflow.db").write_text("not a database\n")
    assert main(["best", str(pipeline)]) == 1
    err = capsys.readouterr().err
    assert f"(MLflow tracking store sqlite:///{tmp_path / 'store' / 'mlflow.db'})" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_a_stage_resumed_with_other_workers_does_not_fail_on_its_logged_params(write_pipeline):
    """An interrupted pretrain (its run KILLED) rerun with `--set pretrain.workers=1` (outside the config
    hash: same config) reused that run and logged `workers` again: MLflow's "Changing param values is not
    allowed" failed the stage (seen with a second storage of the same config, whose RUNNING run it took)."""
    path = write_pipeline()
    before, after = load_config(path), load_config(path, ["pretrain.workers=1"])
    assert before.config_hash() == after.config_hash()
    first = tracking.start_stage_run(before, "pretrain", params={"workers": 2, "steps": 6})
    tracking.finish_run(before, first, "KILLED")
    assert tracking.start_stage_run(before, "pretrain", params={"workers": 2, "steps": 6}) == first  # resumed
    tracking.finish_run(before, first, "KILLED")
    second = tracking.start_stage_run(after, "pretrain", params={"workers": 1, "steps": 6})
    assert second != first
    assert tracking.client_for(after).get_run(second).data.params == {"workers": "1", "steps": "6"}
    # another storage of the same config writing to the same MLflow store: it does not take this one's
    # unfinished run (its own command may be running it), it makes its own
    db = tracking.tracking_uri(after)
    elsewhere = after.model_copy(update={"storage": f"{after.storage_root}-elsewhere",
                                         "tracking": after.tracking.model_copy(update={"uri": db})})
    assert tracking.client_for(elsewhere).get_run(second).info.status == "RUNNING"
    third = tracking.start_stage_run(elsewhere, "pretrain", params={"workers": 1, "steps": 6})
    assert third not in (first, second)
    assert tracking.client_for(elsewhere).get_run(third).data.tags[tracking.TAG_STORAGE] == \
        Storage.of(f"{after.storage_root}-elsewhere").root != Storage.of(after.storage_root).root


_FULL_DISK = """
import resource, signal, sys
from sweep import tracking
from sweep.cli import failure_line
from sweep.config import load_config

config = load_config(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))  # every write fails, as on a full disk
try:
    with tracking.ended_on_error(config, sys.argv[2]):
        raise OSError(28, "No space left on device", "store/features/x/part-00000.parquet.tmp")
except OSError as e:
    print("stage error:", e)
try:
    tracking.finish_run(config, sys.argv[2])
except Exception as e:
    print("finished:", failure_line(e, config))
"""


def test_a_full_disk_under_the_mlflow_store_leaves_the_stage_error_to_read(write_pipeline, tmp_path):
    """Storage that filled up (the default SQLite store is on it): the stage's error, naming its file, was
    replaced by the FAILED status's own, and the one line left read 'MlflowException: (raised as a result of
    Query-invoked autoflush; ...', naming neither the database nor the cause (after a 100-line traceback)."""
    import subprocess
    import sys

    path = write_pipeline()
    config = load_config(path)
    run_id = tracking.start_stage_run(config, "extract")
    done = subprocess.run([sys.executable, "-c", _FULL_DISK, str(path), run_id], capture_output=True, text=True,
                          timeout=120)
    out, err = done.stdout, done.stderr
    assert done.returncode == 0, err
    assert "stage error: [Errno 28] No space left on device: 'store/features/x/part-00000.parquet.tmp'" in out, out
    db = f"(MLflow tracking store sqlite:///{tmp_path / 'store' / 'mlflow.db'})"
    assert f"MLflow run {run_id} stays RUNNING, not FAILED: OperationalError: (sqlite3.OperationalError) " in err
    assert db in err, err
    finished = out.split("finished: ", 1)[1].strip()
    assert finished.startswith("OperationalError: (sqlite3.OperationalError) ") and finished.endswith(db), out
    assert "Traceback" not in err and "autoflush" not in out + err, err
    assert tracking.client_for(config).get_run(run_id).info.status == "RUNNING"  # a rerun takes it over


def _open_shared_store(pipeline: str, storage: str, ready, out) -> None:
    """One command's first touch of the MLflow store, in a process of its own (spawned: no Ray, no fork)."""
    from sweep import tracking
    from sweep.config import load_config

    config = load_config(pipeline, [f"storage={storage}"])
    ready.wait()  # all at once, as commands started together
    try:
        out.put(tracking.ensure_experiment(config))
    except Exception as e:  # noqa: BLE001 - the parent asserts on it
        out.put(f"{type(e).__name__}: {str(e).splitlines()[0]}")


def test_commands_starting_at_once_on_a_new_shared_sqlite_store_all_find_it_made(write_pipeline, tmp_path):
    """Two storages sharing one `tracking.uri` SQLite file, three commands started together on a new store:
    MLflow creates its tables unguarded, and two of three failed ('duplicate column name: step') leaving the
    file half-migrated ('table _alembic_tmp_experiments already exists' for every later command). Each now
    creates it under a lock: all three get the one experiment, and the store opens afterwards."""
    import multiprocessing

    db = tmp_path / "shared" / "mlflow.db"
    pipeline = str(write_pipeline(tracking={"uri": f"sqlite:///{db}"}))
    ctx = multiprocessing.get_context("spawn")
    ready, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_open_shared_store, args=(pipeline, str(tmp_path / f"s{i}"), ready, out))
             for i in range(3)]
    for p in procs:
        p.start()
    got = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    assert len(set(got)) == 1 and got[0].isdigit(), got  # one experiment id, no error
    config = load_config(pipeline)
    assert tracking.client_for(config).get_experiment_by_name(config.experiment_name).experiment_id == got[0]


@pytest.mark.parametrize("given", ["~/My Studies/s #1", "file://{home}/My%20Studies/s%20%231"])
def test_a_storage_under_home_or_as_a_file_uri_is_one_folder(tmp_path, monkeypatch, given):
    """`storage: ~/x` made a folder `~` in the current folder for the lock (and the write check), while the
    stages wrote under the home folder; `file:///a/My%20Studies` put the lock and the SQLite store in
    `My%20Studies` and pyarrow's writes in `My Studies`."""
    from sweep.cli import check_local_storage
    from sweep.storage import storage_lock, write_json

    home, here = tmp_path / "home", tmp_path / "here"
    here.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(small_pipeline(given.format(home=home))))
    config = load_config(path)
    folder = home / "My Studies" / "s #1"

    check_local_storage(config, create=True)
    with storage_lock(config.storage_root, "test"):
        assert (folder / ".sweep.lock").is_file()
    storage = Storage.of(config.storage_root)
    write_json(storage.uri("a.json"), {"a": 1})
    tracking.ensure_experiment(config)
    assert storage.root == str(folder) and tracking.local_mlflow_db(config) == folder / "mlflow.db"
    assert sorted(p.name for p in folder.iterdir()) == [".mlflow.db.lock", ".sweep.lock", "a.json", "mlflow.db"]
    assert list(here.iterdir()) == [] and [p.name for p in home.iterdir()] == ["My Studies"]
