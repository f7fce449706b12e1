"""The Parquet feature store on its own (no Ray, no model): schema, atomic shards, manifest, resume
bookkeeping, refusal to mix settings, column reads."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sweep.features.store import FeatureStore, FeatureStoreError, feature_schema, fingerprint, to_table

COLUMNS = [
    {"column": "down_blocks.0@t0", "layer": "down_blocks.0", "timestep": 0, "dim": 4, "resolution": 8},
    {"column": "mid_block@t0", "layer": "mid_block", "timestep": 0, "dim": 6, "resolution": 4},
]
SETTINGS = {"checkpoint_hash": "abc", "layers": ["down_blocks.0", "mid_block"], "timesteps": [0],
            "columns": COLUMNS, "image_size": 16, "channels": 1, "seed": 0, "precision": "fp32",
            "shard_size": 3, "images": "k1"}
HEADER = {"encoder": "diffusion", "kind": "diffusion", "checkpoint": "/ckpt", "checkpoint_hash": "abc",
          "classes": ["a", "b"], "columns": COLUMNS}


def _rows(ids, label=0, seed=0):
    rng = np.random.default_rng(seed)
    n = len(ids)
    meta = {"image_id": ids, "label": [label] * n, "split": ["train"] * n, "domain": ["main"] * n}
    feats = {c["column"]: rng.standard_normal((n, c["dim"])).astype(np.float16) for c in COLUMNS}
    return to_table(meta, feats, COLUMNS), feats


def _open(root, settings=SETTINGS, datasets=None) -> FeatureStore:
    store = FeatureStore(str(root))
    store.open(HEADER, fingerprint(settings), datasets or {"main": 2}, settings=settings)
    return store


def test_to_table_has_the_contract_schema():
    table, feats = _rows(["x/1.jpg", "x/2.jpg"])
    assert table.schema == feature_schema(COLUMNS)
    assert table.schema.names == ["image_id", "label", "split", "domain", "down_blocks.0@t0", "mid_block@t0"]
    assert table.schema.field("label").type == pa.int32()
    assert table.schema.field("mid_block@t0").type == pa.list_(pa.float16(), 6)
    got = np.asarray(table.column("mid_block@t0").to_pylist(), dtype=np.float16)
    assert np.array_equal(got, feats["mid_block@t0"])
    with pytest.raises(FeatureStoreError, match="expected"):
        to_table({"image_id": ["a"], "label": [0], "split": ["train"], "domain": ["main"]},
                 {c["column"]: np.zeros((1, 3), np.float16) for c in COLUMNS}, COLUMNS)


def test_shards_manifest_and_column_reads(tmp_path):
    store = _open(tmp_path / "enc")
    first, f1 = _rows(["a", "b", "c"], seed=1)
    second, f2 = _rows(["d"], seed=2)
    store.write_shard("main", 1, second, [{"image_id": "e", "reason": "OSError: truncated"}])
    store.write_shard("main", 0, first)
    m = json.loads((tmp_path / "enc" / "_manifest.json").read_text())
    assert [s["index"] for s in m["datasets"]["main"]["shards"]] == [0, 1]
    assert m["datasets"]["main"]["shards"][1] == {
        "index": 1, "file": "main/part-00001.parquet", "rows": 1, "rejected": 1,
        "bytes": (tmp_path / "enc" / "main" / "part-00001.parquet").stat().st_size}
    assert m["rejected"] == [{"image_id": "e", "reason": "OSError: truncated", "domain": "main", "shard": 1}]
    assert m["settings"] == SETTINGS and m["columns"] == COLUMNS and not m["complete"]
    assert not list((tmp_path / "enc" / "main").glob("*.tmp"))  # written under a temporary name, renamed
    values, meta = store.read_column("mid_block@t0")
    assert values.dtype == np.float16 and values.shape == (4, 6)
    assert np.array_equal(values, np.concatenate([f1["mid_block@t0"], f2["mid_block@t0"]]))
    assert meta.column("image_id").to_pylist() == ["a", "b", "c", "d"]
    # projection: a column read opens only that feature column
    assert store.read(["down_blocks.0@t0"]).column_names == ["image_id", "label", "split", "domain",
                                                             "down_blocks.0@t0"]
    with pytest.raises(FeatureStoreError, match="no feature column"):
        store.read_column("up_blocks.0@t0")
    # rewriting a shard replaces its rows and its rejected images, never duplicates them
    store.write_shard("main", 1, second, [])
    m = store.manifest(reload=True)
    assert m["rejected"] == [] and sum(s["rows"] for s in m["datasets"]["main"]["shards"]) == 4
    store.mark_complete({"rows": 4})
    assert store.is_complete()


def test_unlisted_files_and_tmp_files_are_never_read(tmp_path):
    store = _open(tmp_path / "enc")
    table, _ = _rows(["a", "b"])
    store.write_shard("main", 0, table)
    folder = tmp_path / "enc" / "main"
    (folder / "part-00001.parquet.tmp").write_bytes(b"PAR1 half")  # a writer killed mid-shard
    pq.write_table(table, folder / "part-00001.parquet")  # written, but the manifest was never updated
    assert store.read().num_rows == 2
    assert store.completed_shards("main") == {0}
    # the next write of that shard replaces both
    store.write_shard("main", 1, _rows(["c"])[0])
    assert not (folder / "part-00001.parquet.tmp").exists()
    assert sorted(store.read().column("image_id").to_pylist()) == ["a", "b", "c"]


def test_reopen_keeps_completed_shards_and_drops_lost_files(tmp_path):
    store = _open(tmp_path / "enc")
    store.write_shard("main", 0, _rows(["a", "b", "c"])[0], [{"image_id": "z", "reason": "bad"}])
    store.write_shard("main", 1, _rows(["d"])[0])
    store.mark_complete({"rows": 4})
    again = _open(tmp_path / "enc")
    assert again.completed_shards("main") == {0, 1} and again.dropped == [] and again.is_complete()
    (tmp_path / "enc" / "main" / "part-00000.parquet").unlink()
    again = _open(tmp_path / "enc")
    assert again.dropped == [("main/part-00000.parquet", "its file is gone")]
    assert again.completed_shards("main") == {1} and not again.is_complete()
    assert again.manifest()["rejected"] == []  # the lost shard's rejected images are redone with it


def test_reopen_drops_a_damaged_shard_and_checks_older_stores_by_their_footers(tmp_path):
    """A listed shard cut short (a copy interrupted, a full disk) was served as complete: the probe's trials
    failed on it without naming it, every rerun again. Its size differs from the one recorded when written:
    dropped and extracted again. A store from before sizes were recorded is checked by its footers once."""
    store = _open(tmp_path / "enc")
    store.write_shard("main", 0, _rows(["a", "b", "c"])[0])
    store.write_shard("main", 1, _rows(["d"])[0])
    store.mark_complete({"rows": 4})
    shard = tmp_path / "enc" / "main" / "part-00000.parquet"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])
    again = _open(tmp_path / "enc")
    assert again.dropped == [("main/part-00000.parquet", f"its file is damaged ({len(whole) // 2} bytes, "
                                                         f"{len(whole)} written)")]
    assert again.completed_shards("main") == {1} and not again.is_complete()

    old = _open(tmp_path / "old")  # a store whose manifest has no sizes
    old.write_shard("main", 0, _rows(["a", "b"])[0])
    old.write_shard("main", 1, _rows(["c"])[0])
    m = json.loads((tmp_path / "old" / "_manifest.json").read_text())
    for s in m["datasets"]["main"]["shards"]:
        del s["bytes"]
    (tmp_path / "old" / "_manifest.json").write_text(json.dumps(m))
    (tmp_path / "old" / "main" / "part-00001.parquet").write_bytes(b"PAR1 cut short")
    again = _open(tmp_path / "old")
    assert [(f, why.split(" (")[0]) for f, why in again.dropped] == [("main/part-00001.parquet",
                                                                     "its file is damaged")]
    assert again.completed_shards("main") == {0}
    assert again.manifest()["datasets"]["main"]["shards"][0]["bytes"] > 0  # checked once, recorded


def test_other_settings_are_refused_naming_the_change(tmp_path):
    _open(tmp_path / "enc").write_shard("main", 0, _rows(["a"])[0])
    changed = {**SETTINGS, "timesteps": [0, 50], "columns": COLUMNS + [{"column": "mid_block@t50"}]}
    with pytest.raises(FeatureStoreError) as err:
        _open(tmp_path / "enc", changed)
    msg = str(err.value)
    assert "timesteps: [0] -> [0, 50]" in msg and "columns" not in msg.split("changed:")[1].split(")")[0]
    assert "--set storage=PATH" in msg and f"delete {tmp_path / 'enc'}" in msg and "\n" not in msg
    with pytest.raises(FeatureStoreError, match=r"checkpoint content \(checkpoint_hash abc -> def\)"):
        _open(tmp_path / "enc", {**SETTINGS, "checkpoint_hash": "def"})
    with pytest.raises(FeatureStoreError, match=r"image table"):
        _open(tmp_path / "enc", {**SETTINGS, "images": "k2"})
    # nothing was changed by the refusals
    assert FeatureStore(str(tmp_path / "enc")).manifest()["settings"] == SETTINGS


def test_record_rejected_before_the_shard_is_done(tmp_path):
    store = _open(tmp_path / "enc")
    bad = [{"image_id": "x", "reason": "OSError", "domain": "main", "shard": 0}]
    store.record_rejected(bad)
    store.record_rejected(bad)  # recorded again by a second failing attempt: still listed once
    assert store.manifest(reload=True)["rejected"] == bad
    store.write_shard("main", 0, _rows(["a"])[0], [{"image_id": "x", "reason": "OSError"}])
    assert store.manifest(reload=True)["rejected"] == bad


# ---------------------------------------------------------------- datasets added to a store, old stores

BASE = {k: v for k, v in SETTINGS.items() if k != "images"}  # what `extract` keys a store by


def _open_datasets(root, images: dict[str, str], shards: dict[str, int], legacy_key=None) -> FeatureStore:
    store = FeatureStore(str(root))
    store.open(HEADER, fingerprint(BASE), shards, settings=BASE, images=images, legacy_key=legacy_key)
    return store


def test_a_dataset_added_to_a_finished_store_keeps_the_others(tmp_path):
    store = _open_datasets(tmp_path / "enc", {"main": "k1"}, {"main": 1})
    store.write_shard("main", 0, _rows(["a", "b"])[0])
    store.mark_complete({"rows": 2})
    main_file = tmp_path / "enc" / "main" / "part-00000.parquet"
    written = main_file.stat().st_mtime_ns
    identity = store.identity()
    assert store.identity(["main"]) == identity  # a pipeline reading every dataset: the store's identity

    store = _open_datasets(tmp_path / "enc", {"main": "k1", "shifted": "k9"}, {"main": 1, "shifted": 2})
    m = store.manifest(reload=True)
    # another pipeline's dataset changes the store, not what a pipeline reading `main` alone reads: its probe
    # runs (tagged with that identity) stay current
    assert store.identity() != identity and store.identity(["main"]) == identity
    assert store.identity(["main", "shifted"]) == store.identity()
    assert not m["complete"] and "summary" not in m  # the new dataset still has to be extracted
    assert m["datasets"]["shifted"] == {"num_shards": 2, "shards": []}
    assert m["settings"]["images"] == {"main": "k1", "shifted": "k9"}
    assert store.completed_shards("main") == {0} and main_file.stat().st_mtime_ns == written
    assert store.incomplete(["main", "shifted"]) == ["shifted"] and store.incomplete(["main"]) == []
    assert store.incomplete(["main", "other"]) == ["other"]
    store.write_shard("shifted", 0, _rows(["s"])[0])
    assert store.incomplete(["main", "shifted"]) == ["shifted"]  # one of its two shards
    assert store.files(["main"]) == [f"{store.base}/main/part-00000.parquet"]
    assert len(store.files()) == 2

    # a store keeps a dataset no longer asked for (unread by whoever names its datasets)
    again = _open_datasets(tmp_path / "enc", {"main": "k1"}, {"main": 1})
    assert set(again.manifest()["datasets"]) == {"main", "shifted"}


def test_a_dataset_whose_images_changed_is_refused_by_name(tmp_path):
    _open_datasets(tmp_path / "enc", {"main": "k1", "shifted": "k9"}, {"main": 1, "shifted": 1})
    before = (tmp_path / "enc" / "_manifest.json").read_text()
    with pytest.raises(FeatureStoreError) as err:
        _open_datasets(tmp_path / "enc", {"main": "k1", "shifted": "k8", "new": "k7"},
                       {"main": 1, "shifted": 1, "new": 1})
    assert "dataset(s) 'shifted'" in str(err.value) and "--set storage=PATH" in str(err.value)
    assert (tmp_path / "enc" / "_manifest.json").read_text() == before  # nothing added either


def test_a_store_keyed_by_one_image_fingerprint_is_upgraded_in_place(tmp_path):
    """Stores written before per-dataset image fingerprints carry `images` (one fingerprint over every
    dataset) inside their key; `legacy_key(datasets)` is the key such a store of those datasets has."""
    old_settings = {**BASE, "images": "all-k1"}
    old = FeatureStore(str(tmp_path / "enc"))
    old.open(HEADER, fingerprint(old_settings), {"main": 1}, settings=old_settings)
    old.write_shard("main", 0, _rows(["a"])[0])
    old.mark_complete({"rows": 1})
    asked = []

    def legacy_key(datasets):
        asked.append(datasets)
        return fingerprint({**BASE, "images": "all-k1" if datasets == ["main"] else "other"})

    # other settings: still refused, naming them
    with pytest.raises(FeatureStoreError, match="timesteps"):
        FeatureStore(str(tmp_path / "enc")).open(HEADER, fingerprint({**BASE, "timesteps": [5]}), {"main": 1},
                                                 settings={**BASE, "timesteps": [5]}, images={"main": "k1"},
                                                 legacy_key=lambda d: "no")
    # the same settings and images, and a dataset added at once: upgraded, shards kept, the new one to do
    store = _open_datasets(tmp_path / "enc", {"main": "k1", "shifted": "k9"}, {"main": 1, "shifted": 1},
                           legacy_key=legacy_key)
    m = json.loads((tmp_path / "enc" / "_manifest.json").read_text())
    assert asked == [["main"]]  # the legacy key of the datasets the store held
    assert m["key"] == fingerprint(BASE) and m["settings"] == {**BASE, "images": {"main": "k1", "shifted": "k9"}}
    assert store.completed_shards("main") == {0} and store.incomplete(["main", "shifted"]) == ["shifted"]
    # once upgraded, the legacy key is not consulted again
    _open_datasets(tmp_path / "enc", {"main": "k1", "shifted": "k9"}, {"main": 1, "shifted": 1},
                   legacy_key=legacy_key)
    assert asked == [["main"]]


def test_an_old_store_of_other_images_is_refused(tmp_path):
    old_settings = {**BASE, "images": "all-k1"}
    FeatureStore(str(tmp_path / "enc")).open(HEADER, fingerprint(old_settings), {"main": 1}, settings=old_settings)
    with pytest.raises(FeatureStoreError, match=r"changed: image table"):
        _open_datasets(tmp_path / "enc", {"main": "k2"}, {"main": 1},
                       legacy_key=lambda d: fingerprint({**BASE, "images": "all-k2"}))


def test_a_store_serves_a_subset_of_its_columns_made_otherwise_alike(tmp_path):
    store = _open_datasets(tmp_path / "enc", {"main": "k1"}, {"main": 1})
    one = {**BASE, "layers": ["mid_block"], "columns": [COLUMNS[1]]}
    assert store.served_columns(BASE) == COLUMNS
    assert store.wider_settings(BASE) is None  # exactly these columns: nothing wider to say
    assert store.wider_settings(one) == BASE and store.served_columns(one) == [COLUMNS[1]]
    # the columns are compared whole: a column of the same name but another dim is not this store's
    other_dim = {**one, "columns": [{**COLUMNS[1], "dim": 7}]}
    for asked, changed in [(other_dim, "columns"), ({**one, "checkpoint_hash": "xyz"}, "checkpoint content"),
                           ({**one, "seed": 1}, "seed: 0 -> 1"), ({**one, "precision": "bf16"}, "precision"),
                           ({**BASE, "timesteps": [0, 5], "columns": COLUMNS + [{**COLUMNS[0], "column": "x"}]},
                            "timesteps: [0] -> [0, 5]")]:
        assert store.wider_settings(asked) is None
        with pytest.raises(FeatureStoreError, match=f"other settings \\(changed: .*{re.escape(changed)}"):
            store.served_columns(asked)


def test_files_reach_the_disk_before_their_final_name(tmp_path, monkeypatch):
    """A shard, a manifest and a published folder are fsynced before they are renamed into place and their
    folder after: a power cut could leave an empty file under the final name, with a manifest or marker
    saying complete (killing processes cannot show this; the order of the calls can: each fsync is recorded
    with whether the final name exists yet)."""
    from pathlib import Path

    from sweep import storage

    real_fsync = storage._fsync
    store = _open_datasets(tmp_path / "enc", {"main": "k1"}, {"main": 1})
    shard = f"{store.base}/main/part-00000.parquet"
    seen = []
    monkeypatch.setattr(storage, "_fsync", lambda p: (seen.append((str(p), Path(shard).exists())), real_fsync(p)))
    store.write_shard("main", 0, _rows(["a", "b"])[0])
    assert seen[:2] == [(f"{shard}.tmp", False), (f"{store.base}/main", True)]  # the data, the rename, the folder
    assert seen[2][0].startswith(f"{store.manifest_uri}.tmp-") and seen[3][0] == str(tmp_path / "enc")

    seen.clear()
    with storage.staged_dir(str(tmp_path / "final"), "done.json") as d:
        (d / "weights.bin").write_bytes(b"w" * 100)
        (d / "done.json").write_text("{}")
    assert sorted(p for p, _ in seen[:2]) == [str(tmp_path / "final.tmp" / f) for f in ("done.json", "weights.bin")]
    assert seen[2][0] == str(tmp_path) and (tmp_path / "final" / "weights.bin").read_bytes() == b"w" * 100


_FULL_DISK_STAGED = """
import resource, signal, sys
from sweep import storage

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))  # a file past 16 KiB: EFBIG
try:
    with storage.staged_dir(sys.argv[1], "report.md") as out:
        (out / "small.csv").write_text("a,b")
        with open(out / "heatmap.png", "wb") as f:  # as matplotlib's savefig writes
            f.write(b"x" * 40000)
except OSError as e:
    print(f"{type(e).__name__}: {e}")
"""


def test_a_full_disk_under_a_staged_folder_names_the_folder_and_publishes_nothing(tmp_path):
    """The report (and the final weights) are written into a staged folder: a disk that filled up there
    said 'OSError: [Errno 28] No space left on device' (matplotlib's, saving a heat map), naming nothing.
    Writes fail here for real (RLIMIT_FSIZE, as in the test above)."""
    import subprocess
    import sys

    dest = tmp_path / "report"
    done = subprocess.run([sys.executable, "-c", _FULL_DISK_STAGED, str(dest)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"WriteError: cannot write {dest}: File too large"
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging copy: the space is back


def test_published_weights_are_readable_as_any_file_the_user_writes(tmp_path):
    """safetensors writes its files 0600: a baseline's (or the U-Net's) weights on a shared storage folder
    were unreadable to everyone else, beside a 0644 baseline.json. The published files get the mode the
    user's umask gives an ordinary file."""
    import os

    import torch

    from sweep.stages.baselines import write_final

    old = os.umask(0o022)
    try:
        write_final(tmp_path / "final", {"w": torch.ones(2)}, {"kind": "test"})
        ordinary = tmp_path / "ordinary"
        ordinary.write_text("")
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "final").iterdir()}
    assert modes == {"model.safetensors": 0o644, "baseline.json": 0o644} == {
        k: ordinary.stat().st_mode & 0o777 for k in modes}


def test_a_damaged_manifest_is_named_in_the_error(tmp_path):
    """A manifest that no longer reads as JSON: the error names the file (a bare JSONDecodeError, all that
    `sweep probe` printed, said where in some file, not which file)."""
    store = _open(tmp_path / "enc")
    store.write_shard("main", 0, _rows(["a"])[0])
    (tmp_path / "enc" / "_manifest.json").write_text("{bad json")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "enc" / "_manifest.json")) + " is damaged"):
        FeatureStore(str(tmp_path / "enc")).manifest()


def test_damaged_lists_lost_and_cut_shards_and_changes_nothing(tmp_path):
    store = _open(tmp_path / "enc")
    store.write_shard("main", 0, _rows(["a", "b"])[0])
    store.write_shard("main", 1, _rows(["c"])[0])
    assert store.damaged() == []
    part0 = tmp_path / "enc" / "main" / "part-00000.parquet"
    part0.write_bytes(part0.read_bytes()[:100])
    (tmp_path / "enc" / "main" / "part-00001.parquet").unlink()
    before = (tmp_path / "enc" / "_manifest.json").read_text()
    reader = FeatureStore(str(tmp_path / "enc"))
    assert [f for f, _ in reader.damaged()] == ["main/part-00000.parquet", "main/part-00001.parquet"]
    assert reader.damaged(["other"]) == []
    assert (tmp_path / "enc" / "_manifest.json").read_text() == before and reader.completed_shards("main") == {0, 1}


_FULL_DISK = """
import json, resource, signal, sys
sys.path.insert(0, sys.argv[2])
from test_feature_store import _open, _rows
from sweep import storage

store = _open(sys.argv[1])  # the store exists: its manifest is read, not written
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))  # a file past 16 KiB: EFBIG
for write in (lambda: store.write_shard("main", 0, _rows([f"i{k}" for k in range(3000)])[0]),
              lambda: storage.write_json(store.manifest_uri, {"big": "x" * 40000})):
    try:
        write()
    except OSError as e:
        print(f"{type(e).__name__}: {e}")
"""


def test_a_full_disk_names_the_file_and_leaves_no_partial_file(tmp_path):
    """A storage that filled up mid-extraction said 'OSError: [Errno 28] Error writing bytes to file. Detail:
    [errno 28] No space left on device' (pyarrow's), naming no file; a manifest cut short by it stayed beside
    the old one as `_manifest.json.tmp-XXXX`, holding space, one more on every rerun. Writes fail here for real:
    a file size limit (RLIMIT_FSIZE) makes every write past 16 KiB fail (EFBIG) as a full disk does."""
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path / "enc"
    _open(root)
    before = (root / "_manifest.json").read_text()
    done = subprocess.run([sys.executable, "-c", _FULL_DISK, str(root), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    shard, manifest = done.stdout.strip().splitlines()
    assert shard == f"WriteError: cannot write {root}/main/part-00000.parquet: File too large", shard
    assert manifest == f"WriteError: cannot write {root}/_manifest.json: File too large", manifest
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == ["_manifest.json"]  # no partial file
    assert (root / "_manifest.json").read_text() == before  # nothing listed: the shard is extracted again
    store = _open(root)  # space back: the rerun writes it
    table, _ = _rows([f"i{k}" for k in range(3000)])
    store.write_shard("main", 0, table)
    assert pq.read_table(root / "main" / "part-00000.parquet").equals(table)


_READ_SCRIPT = """
import sys
import pyarrow.parquet
from sweep.stages.probe import read_probe_data
def kib():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
before = kib()
X = read_probe_data(sys.argv[1], sys.argv[2])[0]
print((kib() - before) * 1024 / X.nbytes)
"""


def test_reading_a_column_keeps_about_the_column_in_memory(tmp_path):
    # The trial's read kept ~3.3x the float16 column resident: every shard's rows in a list, then joined,
    # and Arrow's allocator holding the pages it decoded into after the read
    import subprocess
    import sys

    columns = [{"column": "wide", "dim": 256}]
    store = FeatureStore(str(tmp_path))
    store.open({"columns": columns}, "k", {"main": 4})
    rng = np.random.default_rng(0)
    for i in range(4):
        n = 40_000
        meta = {"image_id": [f"{i}-{j}" for j in range(n)], "label": [0] * n, "split": ["train"] * n,
                "domain": ["main"] * n}
        store.write_shard("main", i, to_table(meta, {"wide": rng.standard_normal((n, 256)).astype(np.float16)},
                                              columns))
    store.mark_complete({})
    out = subprocess.run([sys.executable, "-c", _READ_SCRIPT, str(tmp_path), "wide"], capture_output=True,
                         text=True, check=True)
    held = float(out.stdout.split()[-1])
    assert held < 1.5, f"reading the column left {held:.2f}x its size resident"
