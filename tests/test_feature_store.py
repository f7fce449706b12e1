"""The Parquet feature store on its own (no Ray, no model): schema, atomic shards, manifest, resume
bookkeeping, refusal to mix settings, column reads."""

from __future__ import annotations

import json

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
    assert m["datasets"]["main"]["shards"][1] == {"index": 1, "file": "main/part-00001.parquet", "rows": 1,
                                                  "rejected": 1}
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
    assert again.dropped == ["main/part-00000.parquet"]
    assert again.completed_shards("main") == {1} and not again.is_complete()
    assert again.manifest()["rejected"] == []  # the lost shard's rejected images are redone with it


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
