"""The Parquet feature store of one encoder (a contract: DESIGN.md "Feature store").

Layout: `features/<encoder>/<dataset>/part-NNNNN.parquet` plus `features/<encoder>/_manifest.json`.
A shard is written under a temporary name and renamed when complete; only shards listed in the manifest
are ever read, so a half-written file can never be mistaken for data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.fs as pafs

from sweep import storage as st

MANIFEST = "_manifest.json"
META_COLUMNS = ("image_id", "label", "split", "domain")


# Settings a store may hold more of than a pipeline asks for: it then serves the columns asked for.
SELECTABLE = ("layers", "timesteps", "columns")


class FeatureStoreError(RuntimeError):
    pass


def _column_key(column: dict) -> str:
    return json.dumps(column, sort_keys=True)


def _column_keys(columns: Iterable[dict]) -> set[str]:
    return {_column_key(c) for c in columns}


def feature_schema(columns: Iterable[dict]) -> pa.Schema:
    fields = [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
    ]
    fields += [pa.field(c["column"], pa.list_(pa.float16(), c["dim"]), nullable=False) for c in columns]
    return pa.schema(fields)


def to_table(meta: dict[str, Sequence], features: dict[str, np.ndarray], columns: Sequence[dict]) -> pa.Table:
    """Rows of one shard: meta columns + one fixed_size_list<float16>[dim] per feature column."""
    schema = feature_schema(columns)
    arrays = [
        pa.array(meta["image_id"], pa.string()),
        pa.array(np.asarray(meta["label"], dtype=np.int32), pa.int32()),
        pa.array(meta["split"], pa.string()),
        pa.array(meta["domain"], pa.string()),
    ]
    for c in columns:
        x = np.ascontiguousarray(features[c["column"]], dtype=np.float16)
        if x.ndim != 2 or x.shape[1] != c["dim"]:
            raise FeatureStoreError(f"column {c['column']}: expected (n, {c['dim']}), got {x.shape}")
        arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float16()), c["dim"]))
    return pa.Table.from_arrays(arrays, schema=schema)


def column_to_numpy(array: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks else pa.array([], pa.list_(pa.float16(), dim))
    return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _short(value: object, limit: int = 80) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class FeatureStore:
    def __init__(self, root_uri: str):
        self.root = root_uri.rstrip("/")
        self.fs, self.base = pafs.FileSystem.from_uri(st._absolute(self.root))
        self._manifest: dict | None = None
        self.dropped: list[tuple[str, str]] = []  # (shard file, why) dropped from the manifest by `open`

    # manifest -----------------------------------------------------------------------------------
    @property
    def manifest_uri(self) -> str:
        return f"{self.root}/{MANIFEST}"

    def manifest(self, reload: bool = False) -> dict | None:
        if self._manifest is None or reload:
            self._manifest = st.read_json(self.manifest_uri)
        return self._manifest

    def open(self, header: dict, key: str, datasets: dict[str, int], settings: dict | None = None,
             images: dict[str, str] | None = None, legacy_key: Callable[[list[str]], str] | None = None) -> dict:
        """Start or resume a store. `key` fingerprints everything that determines the values (checkpoint,
        columns, preprocessing, seed); a store made under another key is refused rather than mixed, and the
        error names the `settings` entries that differ. `datasets` maps dataset name -> number of shards;
        `images` maps dataset name -> fingerprint of its image table (images, labels, splits).

        A dataset the store does not hold yet is added (its shards are then extracted; the others are kept:
        adding an OOD dataset to a finished study encodes only the new images); a held dataset whose image
        table changed is refused, by name; a held dataset not asked for stays, unread by the probe. A store
        made before image tables were fingerprinted per dataset (one `images` fingerprint over all of them)
        is upgraded in place when `legacy_key(its dataset names)`, the key it would then have carried,
        matches.

        On resume, a shard listed as complete whose file is gone or damaged is dropped from the manifest (so
        it is extracted again); `self.dropped` names such shards. Files not listed in the manifest (a shard
        written but not yet recorded, a stray `*.tmp`) are never read and are overwritten when their
        shard is written."""
        existing = self.manifest(reload=True)
        self.dropped = []
        if existing is not None and existing.get("key") != key and legacy_key is not None \
                and set(existing.get("datasets", {})) <= set(datasets) \
                and existing.get("key") == legacy_key(list(existing["datasets"])):
            existing = self._upgrade(existing, key, settings, images or {})
        if existing is not None and existing.get("key") != key:
            raise FeatureStoreError(self._mismatch(existing, settings))
        if existing is None:
            existing = {**header, "key": key, "complete": False,
                        "datasets": {d: {"num_shards": n, "shards": []} for d, n in datasets.items()},
                        "rejected": []}
            if settings is not None:
                existing["settings"] = {**settings, **({"images": dict(images)} if images else {})}
            st.write_json(self.manifest_uri, existing)
        elif images:
            self._add_datasets(existing, datasets, images)
        self._manifest = existing
        self._drop_missing()
        return existing

    def _upgrade(self, existing: dict, key: str, settings: dict | None, images: dict[str, str]) -> dict:
        """A store under the one-fingerprint-for-all-images key, rewritten under `key` with a fingerprint per
        dataset (the caller checked that the old key is this store's under the current settings)."""
        upgraded = {**existing, "key": key}
        if settings is not None:
            upgraded["settings"] = {**settings, "images": {d: images[d] for d in existing["datasets"]}}
        st.write_json(self.manifest_uri, upgraded)
        return upgraded

    def _add_datasets(self, existing: dict, datasets: dict[str, int], images: dict[str, str]) -> None:
        held = existing.setdefault("settings", {}).setdefault("images", {})
        changed = [d for d in datasets if d in existing["datasets"] and held.get(d) != images[d]]
        if changed:
            raise FeatureStoreError(
                f"{self.root} holds features of other images for dataset(s) {', '.join(map(repr, changed))} "
                f"(changed: image table: images, labels, splits or their order). Nothing was written: for an "
                f"OOD dataset, give the changed one a new name in data.ood (only its images are then extracted; "
                f"the old stays, unread); to keep both, extract into another storage (--set storage=PATH); to "
                f"replace them, delete {self.root} and rerun.")
        new = [d for d in datasets if d not in existing["datasets"]]
        if not new:
            return
        for d in new:
            existing["datasets"][d] = {"num_shards": datasets[d], "shards": []}
            held[d] = images[d]
        existing["complete"] = False
        existing.pop("summary", None)
        st.write_json(self.manifest_uri, existing)

    def identity(self, datasets: Iterable[str] | None = None) -> str | None:
        """A fingerprint of the settings this store was made with, its images included, and of the images
        it could not read: the same for a store made again from the same images and checkpoint (extraction
        is deterministic), another for one made again after the images changed or a file was repaired.
        With `datasets`, of those datasets' images only (what a pipeline reads: its train set and OOD sets),
        so that another pipeline adding a dataset to the store changes no identity of the others: it made
        their probe runs look stale (deleted and probed again). None for a store from before sweep recorded
        its settings."""
        m = self.manifest() or {}
        if not m.get("settings"):
            return None
        settings, rejected = m["settings"], m.get("rejected") or []
        if datasets is not None:
            keep = set(datasets)
            if isinstance(settings.get("images"), dict):
                settings = {**settings, "images": {d: v for d, v in settings["images"].items() if d in keep}}
            rejected = [r for r in rejected if r.get("domain") in keep]
        rejected = sorted((str(r.get("domain")), str(r.get("image_id"))) for r in rejected)
        return fingerprint(settings, rejected) if rejected else fingerprint(settings)

    def _held_settings(self) -> dict:
        """The settings this store was made with, but the images (fingerprinted apart, per dataset)."""
        return {k: v for k, v in ((self.manifest() or {}).get("settings") or {}).items() if k != "images"}

    def wider_settings(self, settings: dict) -> dict | None:
        """The settings this store was made with, when it holds every column `settings` asks for and more,
        and was otherwise made exactly so (checkpoint, preprocessing, seed, precision, shard size): it then
        serves the columns asked for (a study narrowing its layers or timesteps, or an encoder's default
        layers shrinking, needs no new extraction). None when it holds exactly these columns, or not all of
        them, or was made differently."""
        held = self._held_settings()
        if not held or set(held) != set(settings):
            return None
        if any(held[k] != settings[k] for k in settings if k not in SELECTABLE):
            return None
        asked, have = _column_keys(settings["columns"]), _column_keys(held["columns"])
        return held if asked < have else None

    def served_columns(self, settings: dict) -> list[dict]:
        """The store's columns that `settings` (as the extract stage computes them) asks for: every column
        of a store made under these settings, the asked subset of a store made with more layers or
        timesteps (`wider_settings`). Raises FeatureStoreError naming what differs otherwise."""
        m = self.manifest() or {}
        held = self._held_settings()
        if held == settings or (not held and m.get("key") == fingerprint(settings)):
            return self.columns()
        if self.wider_settings(settings) is not None:
            asked = _column_keys(settings["columns"])
            return [c for c in self.columns() if _column_key(c) in asked]
        raise FeatureStoreError(f"{self.root} holds features extracted with other settings (changed: "
                                f"{self._changes(m, settings)})")

    def _mismatch(self, existing: dict, settings: dict | None) -> str:
        return (
            f"{self.root} holds features extracted with other settings (changed: "
            f"{self._changes(existing, settings)}). Nothing was written: to keep both, extract into another "
            f"storage (--set storage=PATH); to replace them, delete {self.root} and rerun; or restore the "
            f"settings it was made with (see 'settings' in {self.manifest_uri})."
        )

    def _changes(self, existing: dict, settings: dict | None) -> str:
        old = existing.get("settings") or {}
        changed = [k for k in (settings or {}) if k in old and old[k] != settings[k]]
        if len(changed) > 1 and "columns" in changed and ({"layers", "timesteps"} & set(changed)):
            held = {c.get("column"): c for c in old["columns"]}
            if all(held.get(c["column"], c) == c for c in settings["columns"]):
                changed.remove("columns")  # follows from the layers/timesteps named already
        parts = []
        for k in changed:
            if k == "images":
                parts.append("image table (images, labels, splits or their order)")
            elif k == "checkpoint_hash":
                parts.append(f"checkpoint content (checkpoint_hash {old[k]} -> {settings[k]})")
            else:
                parts.append(f"{k}: {_short(old[k])} -> {_short(settings[k])}")
        if not parts and isinstance(old.get("images"), str):  # a store from before per-dataset fingerprints
            parts.append("image table (images, labels, splits or their order)")
        return "; ".join(parts) or "checkpoint, layers, timesteps, preprocessing or images"

    def _drop_missing(self) -> None:
        """Drop from the manifest the shards listed as complete whose file is gone or damaged: of another size
        than when it was written (a copy cut short, a full disk), or, in a store from before sizes were
        recorded, without a readable Parquet footer (its size is recorded then). `self.dropped` gets
        (file, why) for each."""
        m = self._manifest
        changed = False
        for dataset, info, s, size, why in self._shard_states():
            if why is None:
                if "bytes" not in s:
                    s["bytes"], changed = size, True
                continue
            self.dropped.append((s["file"], why))
            info["shards"].remove(s)
            m["rejected"] = [r for r in m["rejected"]
                             if not (r.get("domain") == dataset and r.get("shard") == s["index"])]
        if self.dropped:
            m["complete"] = False
            m.pop("summary", None)
        if self.dropped or changed:
            st.write_json(self.manifest_uri, m)

    def _shard_states(self, datasets: Iterable[str] | None = None):
        """(dataset, its manifest entry, shard entry, file size or None, why the file cannot be what was
        written or None) of each shard the manifest lists as complete (of `datasets` only, where given)."""
        wanted = None if datasets is None else set(datasets)
        for dataset, info in (self.manifest() or {}).get("datasets", {}).items():
            if not info["shards"] or (wanted is not None and dataset not in wanted):
                continue
            selector = pafs.FileSelector(f"{self.base}/{dataset}", allow_not_found=True)
            sizes = {f.base_name: f.size for f in self.fs.get_file_info(selector) if f.type == pafs.FileType.File}
            for s in list(info["shards"]):
                size = sizes.get(s["file"].rsplit("/", 1)[-1])
                yield dataset, info, s, size, "its file is gone" if size is None else self._damage(s, size)

    def damaged(self, datasets: Iterable[str] | None = None) -> list[tuple[str, str]]:
        """(file, why) of each shard listed as complete whose file is gone or damaged, without changing the
        manifest (`open` drops them, for extraction to make them again): a reader checks before it starts."""
        return [(s["file"], why) for _, _, s, _, why in self._shard_states(datasets) if why]

    def _damage(self, shard: dict, size: int) -> str | None:
        """Why a listed shard's file of `size` bytes cannot be what was written, or None."""
        if "bytes" in shard:
            return None if size == shard["bytes"] else f"its file is damaged ({size} bytes, {shard['bytes']} written)"
        try:
            rows = pq.read_metadata(f"{self.base}/{shard['file']}", filesystem=self.fs).num_rows
        except (OSError, pa.ArrowException) as e:
            return f"its file is damaged ({str(e).splitlines()[0]})"
        return None if rows == shard["rows"] else f"its file is damaged ({rows} rows, {shard['rows']} written)"

    def completed_shards(self, dataset: str) -> set[int]:
        m = self.manifest() or {}
        return {s["index"] for s in m.get("datasets", {}).get(dataset, {}).get("shards", [])}

    def shard_relpath(self, dataset: str, index: int) -> str:
        return f"{dataset}/part-{index:05d}.parquet"

    def write_shard(self, dataset: str, index: int, table: pa.Table, rejected: Sequence[dict] = ()) -> None:
        """Write one shard atomically, then record it (and the images it rejected) in the manifest."""
        rel = self.shard_relpath(dataset, index)
        path = f"{self.base}/{rel}"
        tmp = f"{path}.tmp"
        with st.writing(self.fs, path, tmp):
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            # Dictionary encoding only for the repetitive meta columns: on float16 feature lists it saves
            # nothing and made reading one column 3x slower (a probe trial reads one column of every shard).
            pq.write_table(table, tmp, filesystem=self.fs, compression="zstd", use_dictionary=["split", "domain"])
            st.move_durably(self.fs, tmp, path)
        m = self.manifest()
        shards = [s for s in m["datasets"][dataset]["shards"] if s["index"] != index]
        shards.append({"index": index, "file": rel, "rows": table.num_rows, "rejected": len(rejected),
                       "bytes": self.fs.get_file_info(path).size})  # a later size differs: damaged
        m["datasets"][dataset]["shards"] = sorted(shards, key=lambda s: s["index"])
        m["rejected"] = [r for r in m["rejected"] if not (r["domain"] == dataset and r.get("shard") == index)]
        m["rejected"] += [{**r, "domain": dataset, "shard": index} for r in rejected]
        st.write_json(self.manifest_uri, m)

    def record_rejected(self, rejected: Sequence[dict]) -> None:
        """List unreadable images (dicts with image_id, reason, domain, shard) before their shard is complete,
        e.g. when too many of them stop an extraction; entries of a shard are replaced when it is written."""
        m = self.manifest()
        new = {(r["domain"], r["image_id"]) for r in rejected}
        m["rejected"] = [r for r in m["rejected"] if (r.get("domain"), r["image_id"]) not in new]
        m["rejected"] += [dict(r) for r in rejected]
        st.write_json(self.manifest_uri, m)

    def mark_complete(self, summary: dict) -> None:
        m = self.manifest()
        m["complete"] = True
        m["summary"] = summary
        st.write_json(self.manifest_uri, m)

    def is_complete(self) -> bool:
        m = self.manifest(reload=True)
        return bool(m and m.get("complete"))

    def incomplete(self, datasets: Iterable[str]) -> list[str]:
        """Those of `datasets` the store lacks or holds only some shards of."""
        held = (self.manifest() or {}).get("datasets", {})
        return [d for d in datasets if d not in held or len(held[d]["shards"]) < held[d]["num_shards"]]

    # reads --------------------------------------------------------------------------------------
    def files(self, datasets: Iterable[str] | None = None) -> list[str]:
        """The completed shards, of every dataset held or of `datasets` only (in the store's order)."""
        m = self.manifest() or {}
        wanted = None if datasets is None else set(datasets)
        return [f"{self.base}/{s['file']}" for name, d in m.get("datasets", {}).items()
                if wanted is None or name in wanted for s in d["shards"]]

    def columns(self) -> list[dict]:
        return list((self.manifest() or {}).get("columns", []))

    def read(self, columns: Sequence[str] = ()) -> pa.Table:
        """Meta columns plus the named feature columns (Parquet column projection: nothing else is read)."""
        files = self.files()
        if not files:
            raise FeatureStoreError(f"{self.root}: no completed shards")
        wanted = list(META_COLUMNS) + list(columns)
        tables = [pq.read_table(f, columns=wanted, filesystem=self.fs) for f in files]
        return pa.concat_tables(tables)

    def read_column(self, column: str) -> tuple[np.ndarray, pa.Table]:
        """(features float16 (n, dim), meta table) of one feature column over every shard."""
        spec = next((c for c in self.columns() if c["column"] == column), None)
        if spec is None:
            raise FeatureStoreError(f"{self.root}: no feature column {column!r}")
        table = self.read([column])
        return column_to_numpy(table.column(column), spec["dim"]), table.select(list(META_COLUMNS))
