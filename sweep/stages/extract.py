"""`sweep extract`: Ray Data streams images through each frozen encoder into the Parquet feature store.

decode + preprocess (CPU tasks) -> encode (actor pool, one model copy per actor) -> the driver gathers rows
in order and writes each shard atomically as soon as it is whole. A shard already in the manifest is never
re-encoded, so an interrupted extraction resumes where it stopped and never duplicates a row.

Throughput (benchmarks/extract_throughput.py): decoding must stay out of the encoder actors (Ray Data would
fuse it in, see `_decode_tasks`); every Ray worker that runs `decode_chunk` or `EncodeBatch` imports this
module, so it must not import heavy modules (MLflow) at module level; an actor uses `cpus_per_actor` torch
threads; each encoder call gets exactly one chunk of `batch_size` images (`_chunks`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from sweep.config import EncoderSpec, PipelineConfig
from sweep.data.table import ImageTable, build_table, data_warnings
from sweep.features.store import FeatureStore, FeatureStoreError, fingerprint, to_table
from sweep.stages.common import Progress, Timer, init_ray, one_line, quiet_dataset, quiet_ray_data, say
from sweep.storage import PRETRAIN_MARKER, Storage, checkpoint_hash, exists, fetch_dir


class ExtractError(RuntimeError):
    pass


def encoder_kwargs(config: PipelineConfig, spec: EncoderSpec) -> dict:
    """Everything an actor needs to rebuild the encoder (plain values: it travels to Ray workers)."""
    storage = Storage.of(config.storage_root)
    if spec.kind == "diffusion":
        checkpoint = spec.checkpoint or storage.pretrain_final
        if not spec.checkpoint:
            # the pretrain stage writes its completion marker last: without it the folder may be half there
            if not exists(f"{checkpoint}/{PRETRAIN_MARKER}"):
                raise ExtractError(f"encoder {spec.name!r}: no finished pretraining at {checkpoint} (no "
                                   f"{PRETRAIN_MARKER}; run `sweep pretrain` first)")
        elif not exists(f"{checkpoint}/config.json") and not exists(f"{checkpoint}/unet/config.json"):
            raise ExtractError(f"encoder {spec.name!r}: no diffusers U-Net at {checkpoint} (check "
                               f"extract.encoders[].checkpoint)")
        return {
            "kind": "diffusion", "name": spec.name, "checkpoint": checkpoint,
            "layers": config.extract.layers, "timesteps": list(config.extract.timesteps), "seed": config.seed,
            "precision": config.extract.precision, "timesteps_per_forward": config.extract.timesteps_per_forward,
        }
    checkpoint = spec.checkpoint or storage.baseline_final(spec.name)
    if not exists(f"{checkpoint}/baseline.json"):
        hint = "run `sweep baselines` first" if not spec.checkpoint else "check extract.encoders[].checkpoint"
        raise ExtractError(f"encoder {spec.name!r}: no baseline at {checkpoint} ({hint})")
    baseline = next((b for b in config.baselines if b.name == spec.name), None)
    return {"kind": "cnn", "name": spec.name, "checkpoint": checkpoint,
            "layers": baseline.layers if baseline is not None else None, "precision": config.extract.precision}


def build_encoder(kwargs: dict, device: str = "cpu"):
    kwargs = dict(kwargs)
    kind = kwargs.pop("kind")
    uri = kwargs["checkpoint"]
    kwargs["checkpoint"] = str(fetch_dir(uri))  # a remote checkpoint is downloaded once per machine
    if kind == "diffusion":
        from sweep.encoders.diffusion import DiffusionEncoder

        encoder = DiffusionEncoder(device=device, **kwargs)
    elif kind == "cnn":
        from sweep.encoders.cnn import CNNEncoder

        encoder = CNNEncoder(device=device, **kwargs)
    else:
        raise ExtractError(f"unknown encoder kind {kind!r}")
    if str(uri) != kwargs["checkpoint"]:
        encoder.checkpoint_hash  # noqa: B018 - hashed (and cached) from the local copy...
        encoder.checkpoint = str(uri)  # ...while the manifest names where the checkpoint lives
    return encoder


def decode_batch(batch: dict[str, np.ndarray], size: int, channels: int) -> dict[str, np.ndarray]:
    """Ray Data task: table rows -> preprocessed images + a per-row decode error ("" when fine)."""
    from sweep.data.preprocess import decode_rows

    images, errors = decode_rows(batch["path"], batch["index"], size, channels)
    out = {k: batch[k] for k in batch if k not in ("path", "index")}
    out["image"] = images
    out["error"] = np.asarray(errors, dtype=object)
    return out


def decode_chunk(batch: dict[str, np.ndarray], size: int, channels: int) -> dict[str, np.ndarray]:
    """Ray Data task of `extract`: `decode_batch` on the real rows of one chunk; padding rows (`pad`) get a
    zero image and are dropped by the encoder."""
    pad = np.asarray(batch["pad"], dtype=bool)
    if not pad.any():
        return decode_batch(batch, size, channels)
    real = decode_batch({k: v[~pad] for k, v in batch.items()}, size, channels)
    out = {k: v for k, v in batch.items() if k not in ("path", "index")}
    out["image"] = np.zeros((len(pad), channels, size, size), np.float32)
    out["image"][~pad] = real["image"]
    out["error"] = np.full(len(pad), "", dtype=object)
    out["error"][~pad] = real["error"]
    return out


class EncodeBatch:
    """Ray Data actor: one frozen encoder per actor, reused across batches. A batch is one chunk
    (`_chunks`); padding rows are dropped, unreadable images get zero features and their error."""

    def __init__(self, encoder_kwargs: dict, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = build_encoder(encoder_kwargs, device=device)
        self.columns = [c.to_dict() for c in self.encoder.columns]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        keep = ~np.asarray(batch["pad"], dtype=bool)
        batch = {k: v[keep] for k, v in batch.items()} if not keep.all() else batch
        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        n = len(ok)
        feats = {c["column"]: np.zeros((n, c["dim"]), np.float16) for c in self.columns}
        if ok.any():
            images = torch.from_numpy(np.ascontiguousarray(batch["image"][ok]))
            ids = [str(i) for i in batch["image_id"][ok]]
            for name, values in self.encoder.encode(images, ids).items():
                feats[name][ok] = values
        meta = {k: [str(v) for v in batch[k]] for k in ("image_id", "split", "domain")}
        meta["label"] = batch["label"]
        table = to_table(meta, feats, self.columns)
        table = table.append_column("shard", pa.array(np.asarray(batch["shard"], dtype=np.int64)))
        return table.append_column("error", pa.array([str(e) for e in batch["error"]], pa.string()))


def _plan(table: ImageTable, shard_size: int) -> tuple[pd.DataFrame, dict[str, int]]:
    """Assign each row of each dataset to a shard (rows keep table order: shard k = rows k*S..(k+1)*S-1)."""
    frame = table.frame.copy()
    frame["shard"] = frame.groupby("domain", sort=False).cumcount() // shard_size
    counts = {d: math.ceil(n / shard_size) for d, n in frame.groupby("domain", sort=False).size().items()}
    return frame, counts


def _table_key(frame: pd.DataFrame) -> str:
    return fingerprint(pd.util.hash_pandas_object(
        frame[["image_id", "label", "split", "domain"]], index=False).sum().item())


def _images(frame: pd.DataFrame) -> dict[str, str]:
    """Dataset -> fingerprint of its image table: a store adds a new dataset and refuses a changed one."""
    return {d: _table_key(rows) for d, rows in frame.groupby("domain", sort=False)}


def _legacy_key(settings: dict, frame: pd.DataFrame):
    """The key a store of these `datasets` carried before image tables were fingerprinted per dataset (one
    `images` entry over all of them), so that `FeatureStore.open` upgrades such a store in place."""
    def key(datasets: list[str]) -> str:
        return fingerprint({**settings, "images": _table_key(frame[frame["domain"].isin(datasets)])})
    return key


def _settings(config: PipelineConfig, checkpoint_digest: str, columns: list[dict]) -> dict:
    """Everything that decides the stored values or which row lands in which shard, but the images (see
    `_images`). A store made under other settings is refused (FeatureStore.open names what differs) rather
    than mixed."""
    return {
        "checkpoint_hash": checkpoint_digest,
        "layers": list(dict.fromkeys(c["layer"] for c in columns)),
        "timesteps": list(dict.fromkeys(c["timestep"] for c in columns)),
        "columns": columns,
        "image_size": config.data.image_size,
        "channels": config.data.channels,
        "seed": config.seed,
        "precision": config.extract.precision,
        "shard_size": config.extract.shard_size,
    }


def asked_settings(config: PipelineConfig, spec: EncoderSpec, held_columns: Sequence[dict] = ()) -> dict:
    """The feature-store settings (`_settings`) this pipeline asks of encoder `spec`: its store must have been
    made under them, or serve them (`FeatureStore.served_columns`).

    Where the layers are listed by name and `held_columns` (a store's) hold every (layer, timestep) asked
    for, the columns are taken from them and only the checkpoint is hashed: a column's dim and resolution
    follow from the checkpoint, which its hash then vouches for. Otherwise (`blocks`, an encoder's default
    layers, a column the store lacks) the encoder is built, on this machine, as the extract stage does;
    importing diffusers alone takes seconds of CPU."""
    kwargs = encoder_kwargs(config, spec)
    if isinstance(kwargs["layers"], list):
        held = {(c["layer"], c["timestep"]): c for c in held_columns}
        # an encoder's column order: timesteps outer (DiffusionEncoder), layers inner
        asked = [(layer, t) for t in kwargs.get("timesteps", [None]) for layer in kwargs["layers"]]
        if asked and all(a in held for a in asked):
            return _settings(config, checkpoint_hash(fetch_dir(kwargs["checkpoint"])), [held[a] for a in asked])
    encoder = build_encoder(kwargs)
    return _settings(config, encoder.checkpoint_hash, [c.to_dict() for c in encoder.columns])


def _decode_tasks(config: PipelineConfig) -> int:
    """How many decode tasks run at once: enough to keep the encoder actors fed (a CPU actor is far slower
    than decoding; a GPU actor needs several CPUs of decoding), and never the actor count itself: Ray Data
    fuses a task-pool map into the following actor-pool map when its size equals the pool's (or is unset
    and both ask for the same resources, ray-project/ray#54433), which would run decoding inside the
    encoder actors, serially with the model, instead of in parallel CPU tasks. The cap also keeps a small
    machine from starting many worker processes (each imports torch) while the actors start."""
    per_actor = 8 if config.extract.gpus_per_actor > 0 else 2
    return per_actor * config.extract.actors


def _chunks(pending: pd.DataFrame, batch_size: int) -> list[pd.DataFrame]:
    """Split pending rows into the batches the encoder will see, one Ray Data block each: consecutive
    slices of `batch_size` rows that start at a shard's first row and never cross a shard, the last one of
    a shard padded to `batch_size` rows (`pad`, dropped by the encoder). Every block having exactly
    `batch_size` rows, Ray Data's batching (which must be an int when GPUs are used) gives each encoder
    call exactly one block, so a batch's images do not depend on which shards were done before: a resumed
    run encodes exactly the batches a fresh one does (a model's float32 output for an image may depend on
    the batch it is computed in)."""
    pending = pending.assign(pad=False)
    chunks = []
    for _, rows in pending.groupby(["domain", "shard"], sort=False):
        for i in range(0, len(rows), batch_size):
            chunk = rows.iloc[i: i + batch_size]
            missing = batch_size - len(chunk)
            if missing:
                filler = chunk.iloc[[0] * missing].assign(image_id="", path="", index=-1, pad=True)
                chunk = pd.concat([chunk, filler], ignore_index=True)
            chunks.append(chunk.reset_index(drop=True))
    return chunks


def build_dataset(config: PipelineConfig, pending: pd.DataFrame, kwargs: dict):
    """The Ray Data pipeline over `pending` rows: decode + preprocess (CPU tasks) -> encode (actor pool),
    one block per encoder batch (`_chunks`). Output rows arrive in `pending` order (set on this dataset's
    own context: nothing global changes)."""
    import ray

    threads = int(max(1, config.extract.cpus_per_actor))
    batch = config.extract.batch_size
    chunks = _chunks(pending, batch)
    # no more tasks or actors than chunks (a resume or an added OOD set may leave a few): Ray warns about
    # idle concurrency, and an actor builds its model for nothing. Where that makes both pools the same size
    # Ray fuses them, harmlessly: each actor then has at most one chunk to decode anyway.
    ds = (
        ray.data.from_pandas(chunks)
        .map_batches(decode_chunk, fn_kwargs={"size": config.data.image_size, "channels": config.data.channels},
                     batch_size=None, batch_format="numpy",
                     compute=ray.data.TaskPoolStrategy(size=min(_decode_tasks(config), len(chunks))))
        .map_batches(EncodeBatch, fn_constructor_kwargs={"encoder_kwargs": kwargs, "threads": threads},
                     batch_size=batch, batch_format="numpy",
                     compute=ray.data.ActorPoolStrategy(size=min(config.extract.actors, len(chunks))),
                     num_cpus=config.extract.cpus_per_actor, num_gpus=config.extract.gpus_per_actor)
    )
    # rows come back in table order, so shards complete one after another and few rows wait in the driver
    ds.context.execution_options.preserve_order = True
    return ds


def extract_encoder(config: PipelineConfig, spec: EncoderSpec, table: ImageTable,
                    on_work: Callable[[], None] | None = None) -> dict:
    """Extract (or resume, or find finished) encoder `spec`'s feature store; `on_work` is called before any
    image is encoded. Returns the store's summary: images, rows, rejected."""
    storage = Storage.of(config.storage_root)
    store = FeatureStore(storage.features(spec.name))
    kwargs = encoder_kwargs(config, spec)
    try:
        encoder = build_encoder(kwargs)  # on the driver: columns and checkpoint hash, before any work starts
    except ExtractError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. weights cut short while their marker says complete
        from sweep.encoders.base import UnknownLayerError  # torch: not at module level (decode tasks import this)

        if isinstance(e, UnknownLayerError):  # the model is fine (remaking it would not help), the layers asked are not
            names = [b.name for b in config.baselines]
            key = f"baselines.{names.index(spec.name)}.layers" if spec.name in names else "extract.layers"
            raise ExtractError(f"encoder {spec.name!r}: {one_line(e)}: fix {key} (module paths of the model at "
                               f"{kwargs['checkpoint']})") from e
        made_by = "sweep pretrain" if spec.kind == "diffusion" and not spec.checkpoint else (
            "sweep baselines" if spec.kind == "baseline" else None)
        remedy = (f"delete {kwargs['checkpoint']} and run `{made_by}` to make it again" if made_by
                  else "replace that checkpoint")
        raise ExtractError(f"encoder {spec.name!r}: the model at {kwargs['checkpoint']} cannot be loaded "
                           f"({one_line(e)}): {remedy}") from e
    columns = [c.to_dict() for c in encoder.columns]
    frame, shard_counts = _plan(table, config.extract.shard_size)
    settings = _settings(config, encoder.checkpoint_hash, columns)
    header = {
        "encoder": spec.name, "kind": encoder.kind, "checkpoint": str(getattr(encoder, "checkpoint", "")),
        "checkpoint_hash": encoder.checkpoint_hash, "classes": table.classes,
        "image_size": config.data.image_size, "channels": config.data.channels, "seed": config.seed,
        "columns": columns,
    }
    del encoder  # the actors build their own; the driver needs no model while the pipeline runs
    wider = store.wider_settings(settings)
    if wider is not None:
        # a store made with more layers or timesteps serves the columns asked for; any work left on it (an
        # interrupted run, a new OOD set) completes it as it was made, every column of it
        say(f"extract {spec.name}: {store.root} holds {len(wider['columns'])} feature columns, made with more "
            f"layers or timesteps than asked and otherwise the same settings; it serves the {len(columns)} "
            f"asked for")
        settings, kwargs = wider, {**kwargs, "layers": wider["layers"],
                                   **({"timesteps": wider["timesteps"]} if "timesteps" in kwargs else {})}
    store.open(header, fingerprint(settings), shard_counts, settings=settings, images=_images(frame),
               legacy_key=_legacy_key(settings, frame))
    for lost, why in store.dropped:
        say(f"extract {spec.name}: shard {lost} is listed as complete but {why}: extracting it again")
    done = {d: store.completed_shards(d) for d in shard_counts}
    pending = frame[[s not in done[d] for d, s in zip(frame["domain"], frame["shard"])]]
    total = len(frame)
    if pending.empty:
        summary = _summary(store, total, shard_counts)
        again = ": listed in its manifest, not read again (to read a file repaired since, delete the store)"
        n = sum(shard_counts.values())
        shards = "its shard is" if n == 1 else f"all {n} shards are"
        say(f"extract {spec.name}: {shards} already complete, nothing to do "
            f"({summary['rows']} rows, {summary['rejected']} image(s) rejected{again if summary['rejected'] else ''})")
        if not store.is_complete():
            store.mark_complete(summary)
        return summary
    skipped = sum(len(v) for v in done.values())
    say(f"extract {spec.name}: {len(settings['columns'])} feature columns, {len(pending)} of {total} images to encode "
        f"({skipped} shard(s) already complete)")

    if on_work is not None:
        on_work()
    init_ray(config)  # only now: a rerun over finished shards needs no Ray at all
    quiet_ray_data()
    ds = quiet_dataset(build_dataset(config, pending, kwargs))
    expected = pending.groupby(["domain", "shard"], sort=False).size().to_dict()
    buffers: dict[tuple[str, int], list[pa.Table]] = defaultdict(list)
    arrived: dict[tuple[str, int], int] = defaultdict(int)
    # rejected images of complete shards (entries of unfinished shards are redone with their shard)
    bad = sum(1 for r in store.manifest().get("rejected", []) if r.get("shard") in done.get(r.get("domain"), ()))
    bad_before = bad
    allowed = config.extract.max_bad_fraction * total
    progress = Progress(f"extract {spec.name}", len(pending), "images", final=False)
    written, received = 0, 0
    with Timer() as timer:
        batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
        try:
            for batch in batches:
                shard_col = batch.column("shard").to_numpy()
                domain_col = batch.column("domain").to_pylist()
                bad += sum(1 for e in batch.column("error").to_pylist() if e)
                for (domain, shard) in dict.fromkeys(zip(domain_col, shard_col.tolist())):
                    mask = pa.array([(d == domain and s == shard) for d, s in zip(domain_col, shard_col)])
                    part = batch.filter(mask)
                    buffers[(domain, shard)].append(part)
                    arrived[(domain, shard)] += part.num_rows
                    if arrived[(domain, shard)] == expected[(domain, shard)] and bad <= allowed:
                        _write_shard(store, domain, shard, buffers.pop((domain, shard)))
                        written += 1
                if bad > allowed:
                    _too_many_bad(store, spec.name, buffers, bad, total, config.extract.max_bad_fraction)
                received += batch.num_rows
                progress.update(received, f"{written} of {len(expected)} shards written")
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # stops the streaming executor (and its actors) at once on an error
    if buffers:
        raise ExtractError(f"extract {spec.name}: incomplete shards after the pipeline ended: {sorted(buffers)}")
    summary = _summary(store, total, shard_counts)
    store.mark_complete(summary)
    rate = len(pending) / timer.seconds if timer.seconds else float("nan")
    # a resume or an added dataset encodes part of the store: what this run did, and the store's total
    if len(pending) >= total:
        done_now, rejected = f"{summary['rows']} rows", f"{summary['rejected']} image(s) rejected"
    else:  # an earlier run's rejected images are not this run's
        done_now = f"{len(pending)} images' rows (the store holds {summary['rows']})"
        rejected = f"{bad - bad_before} image(s) rejected (the store lists {summary['rejected']})"
    say(f"extract {spec.name}: wrote {done_now} x {len(columns)} columns in {timer.seconds:.1f}s "
        f"({rate:.1f} images/s); {rejected}")
    return summary


def _too_many_bad(store: FeatureStore, name: str, buffers: dict, bad: int, total: int, fraction: float) -> None:
    """Fail the stage; list the unreadable images of unfinished shards first (those of written shards are
    listed already), so the user sees every one of them."""
    found = []
    for (domain, shard), parts in buffers.items():
        for part in parts:
            for i, e in zip(part.column("image_id").to_pylist(), part.column("error").to_pylist()):
                if e:
                    found.append({"image_id": i, "reason": e, "domain": domain, "shard": int(shard)})
    store.record_rejected(found)  # replaced when their shard is extracted on a rerun
    listed = store.manifest()["rejected"]
    example = f" (e.g. {listed[0]['domain']}/{listed[0]['image_id']}: {listed[0]['reason']})" if listed else ""
    raise ExtractError(
        f"extract {name}: {bad} of {total} images could not be read{example}, more than "
        f"extract.max_bad_fraction={fraction} allows ({int(fraction * total)}). Fix or remove them, or raise "
        f"extract.max_bad_fraction, then rerun (complete shards are kept); they are listed under 'rejected' "
        f"in {store.manifest_uri}"
    )


def _write_shard(store: FeatureStore, domain: str, shard: int, parts: list[pa.Table]) -> None:
    table = pa.concat_tables(parts)
    errors = table.column("error").to_pylist()
    ids = table.column("image_id").to_pylist()
    rejected = [{"image_id": i, "reason": e} for i, e in zip(ids, errors) if e]
    good = table.filter(pa.array([not e for e in errors])).drop_columns(["shard", "error"])
    store.write_shard(domain, shard, good, rejected)
    for r in rejected:
        say(f"  skipped {domain}/{r['image_id']}: {r['reason']}")


def _summary(store: FeatureStore, total: int, datasets: dict[str, int]) -> dict:
    """Rows and rejected images of the pipeline's datasets (a dataset no longer asked for is not counted)."""
    m = store.manifest()
    rows = sum(s["rows"] for d, v in m["datasets"].items() if d in datasets for s in v["shards"])
    done = {(d, s["index"]) for d, v in m["datasets"].items() if d in datasets for s in v["shards"]}
    rejected = sum(1 for r in m.get("rejected", []) if (r.get("domain"), r.get("shard")) in done)
    return {"images": total, "rows": rows, "rejected": rejected}


def run(config: PipelineConfig) -> dict[str, dict]:
    # imported here, not at module level: Ray workers import this module to run decode_chunk / EncodeBatch
    # (and the training stages' decode_batch), and MLflow costs seconds of start-up in every one of them
    from sweep import tracking

    table = build_table(config)
    say(f"data: {table.summary()}")
    for warning in data_warnings(config, table):
        say(f"warning: {warning}")
    # the stage's MLflow run is started when an encoder has images to encode: a rerun over finished stores
    # adds none (as pretrain and probe with nothing to do)
    run: list[str] = []

    def on_work():
        if not run:
            run.append(tracking.start_stage_run(config, "extract"))

    results = {}
    with tracking.ended_on_error(config, lambda: run[0] if run else None):
        for spec in config.encoder_specs():
            results[spec.name] = extract_encoder(config, spec, table, on_work)
    if run:
        tracking.log_batch(config, run[0], metrics={
            f"{name}_{k}": summary[k] for name, summary in results.items() for k in ("rows", "rejected")})
        tracking.finish_run(config, run[0])
    return results


__all__ = ["run", "extract_encoder", "ExtractError", "FeatureStoreError"]
