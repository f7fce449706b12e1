"""`sweep extract`: Ray Data streams images through each frozen encoder into the Parquet feature store.

decode + preprocess (CPU tasks) -> encode (actor pool, one model copy per actor) -> the driver gathers rows
in order and writes each shard atomically as soon as it is whole. A shard already in the manifest is never
re-encoded, so an interrupted extraction resumes where it stopped and never duplicates a row.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pandas as pd
import pyarrow as pa

from sweep import tracking
from sweep.config import EncoderSpec, PipelineConfig
from sweep.data.table import ImageTable, build_table
from sweep.features.store import FeatureStore, FeatureStoreError, fingerprint, to_table
from sweep.stages.common import Timer, init_ray, say
from sweep.storage import Storage, exists


class ExtractError(RuntimeError):
    pass


def encoder_kwargs(config: PipelineConfig, spec: EncoderSpec) -> dict:
    """Everything an actor needs to rebuild the encoder (plain values: it travels to Ray workers)."""
    storage = Storage.of(config.storage_root)
    if spec.kind == "diffusion":
        checkpoint = spec.checkpoint or storage.pretrain_final
        if not exists(f"{checkpoint}/config.json") and not exists(f"{checkpoint}/unet/config.json"):
            hint = "run `sweep pretrain` first" if not spec.checkpoint else "check extract.encoders[].checkpoint"
            raise ExtractError(f"encoder {spec.name!r}: no diffusers U-Net at {checkpoint} ({hint})")
        return {
            "kind": "diffusion", "name": spec.name, "checkpoint": checkpoint,
            "layers": config.extract.layers, "timesteps": list(config.extract.timesteps), "seed": config.seed,
            "precision": config.extract.precision, "timesteps_per_forward": config.extract.timesteps_per_forward,
        }
    raise ExtractError(f"encoder {spec.name!r}: baseline encoders are not extractable yet (issue 6)")


def build_encoder(kwargs: dict, device: str = "cpu"):
    kwargs = dict(kwargs)
    kind = kwargs.pop("kind")
    if kind == "diffusion":
        from sweep.encoders.diffusion import DiffusionEncoder

        return DiffusionEncoder(device=device, **kwargs)
    raise ExtractError(f"unknown encoder kind {kind!r}")


def decode_batch(batch: dict[str, np.ndarray], size: int, channels: int) -> dict[str, np.ndarray]:
    """Ray Data task: table rows -> preprocessed images + a per-row decode error ("" when fine)."""
    from sweep.data.preprocess import decode_rows

    images, errors = decode_rows(batch["path"], batch["index"], size, channels)
    out = {k: batch[k] for k in batch if k not in ("path", "index")}
    out["image"] = images
    out["error"] = np.asarray(errors, dtype=object)
    return out


class EncodeBatch:
    """Ray Data actor: one frozen encoder per actor, reused across batches."""

    def __init__(self, encoder_kwargs: dict, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = build_encoder(encoder_kwargs, device=device)
        self.columns = [c.to_dict() for c in self.encoder.columns]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        ok = np.asarray([not e for e in batch["error"]])
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
        table = table.append_column("shard", pa.array(batch["shard"].astype(np.int64)))
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


def extract_encoder(config: PipelineConfig, spec: EncoderSpec, table: ImageTable) -> dict:
    import ray

    storage = Storage.of(config.storage_root)
    store = FeatureStore(storage.features(spec.name))
    kwargs = encoder_kwargs(config, spec)
    encoder = build_encoder(kwargs)  # on the driver: columns and checkpoint hash, before any work starts
    columns = [c.to_dict() for c in encoder.columns]
    frame, shard_counts = _plan(table, config.extract.shard_size)
    key = fingerprint(encoder.checkpoint_hash, columns, config.data.image_size, config.data.channels,
                      config.seed, config.extract.shard_size, _table_key(frame))
    header = {
        "encoder": spec.name, "kind": encoder.kind, "checkpoint": str(getattr(encoder, "checkpoint", "")),
        "checkpoint_hash": encoder.checkpoint_hash, "classes": table.classes,
        "image_size": config.data.image_size, "channels": config.data.channels, "seed": config.seed,
        "columns": columns,
    }
    store.open(header, key, shard_counts)
    done = {d: store.completed_shards(d) for d in shard_counts}
    pending = frame[[s not in done[d] for d, s in zip(frame["domain"], frame["shard"])]]
    total = len(frame)
    if pending.empty:
        say(f"extract {spec.name}: all {sum(shard_counts.values())} shards already complete, nothing to do")
        if not store.is_complete():
            store.mark_complete(_summary(store, total))
        return _summary(store, total)
    skipped = sum(len(v) for v in done.values())
    say(f"extract {spec.name}: {len(columns)} feature columns, {len(pending)} of {total} images to encode "
        f"({skipped} shard(s) already complete)")

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows come back in table order: shards complete one by one
    block_rows = max(config.extract.batch_size, 64)
    chunks = [pending.iloc[i: i + block_rows] for i in range(0, len(pending), block_rows)]
    threads = int(max(1, config.extract.cpus_per_actor))
    ds = (
        ray.data.from_pandas(chunks)
        .map_batches(decode_batch, fn_kwargs={"size": config.data.image_size, "channels": config.data.channels},
                     batch_size=block_rows, batch_format="numpy")
        .map_batches(EncodeBatch, fn_constructor_kwargs={"encoder_kwargs": kwargs, "threads": threads},
                     batch_size=config.extract.batch_size, batch_format="numpy",
                     compute=ray.data.ActorPoolStrategy(size=config.extract.actors),
                     num_cpus=config.extract.cpus_per_actor, num_gpus=config.extract.gpus_per_actor)
    )
    expected = pending.groupby(["domain", "shard"], sort=False).size().to_dict()
    buffers: dict[tuple[str, int], list[pa.Table]] = defaultdict(list)
    arrived: dict[tuple[str, int], int] = defaultdict(int)
    rejected_total = len(store.manifest().get("rejected", []))
    max_bad = config.extract.max_bad_fraction
    with Timer() as timer:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            shard_col = batch.column("shard").to_numpy()
            domain_col = batch.column("domain").to_pylist()
            for (domain, shard) in dict.fromkeys(zip(domain_col, shard_col.tolist())):
                mask = pa.array([(d == domain and s == shard) for d, s in zip(domain_col, shard_col)])
                part = batch.filter(mask)
                buffers[(domain, shard)].append(part)
                arrived[(domain, shard)] += part.num_rows
                if arrived[(domain, shard)] == expected[(domain, shard)]:
                    rejected_total += _write_shard(store, domain, shard, buffers.pop((domain, shard)))
                    if rejected_total > max_bad * total:
                        raise ExtractError(
                            f"extract {spec.name}: {rejected_total} of {total} images could not be read, more "
                            f"than extract.max_bad_fraction={max_bad}; see 'rejected' in {store.manifest_uri}"
                        )
    if buffers:
        raise ExtractError(f"extract {spec.name}: incomplete shards after the pipeline ended: {sorted(buffers)}")
    summary = _summary(store, total)
    store.mark_complete(summary)
    rate = len(pending) / timer.seconds if timer.seconds else float("nan")
    say(f"extract {spec.name}: wrote {summary['rows']} rows x {len(columns)} columns in "
        f"{timer.seconds:.1f}s ({rate:.0f} images/s); {summary['rejected']} image(s) rejected")
    return summary


def _write_shard(store: FeatureStore, domain: str, shard: int, parts: list[pa.Table]) -> int:
    table = pa.concat_tables(parts)
    errors = table.column("error").to_pylist()
    ids = table.column("image_id").to_pylist()
    rejected = [{"image_id": i, "reason": e} for i, e in zip(ids, errors) if e]
    good = table.filter(pa.array([not e for e in errors])).drop_columns(["shard", "error"])
    store.write_shard(domain, shard, good, rejected)
    for r in rejected:
        say(f"  skipped {domain}/{r['image_id']}: {r['reason']}")
    return len(rejected)


def _summary(store: FeatureStore, total: int) -> dict:
    m = store.manifest()
    rows = sum(s["rows"] for d in m["datasets"].values() for s in d["shards"])
    return {"images": total, "rows": rows, "rejected": len(m.get("rejected", []))}


def run(config: PipelineConfig) -> dict[str, dict]:
    table = build_table(config)
    say(f"data: {table.summary()}")
    init_ray(config)
    run_id = tracking.start_stage_run(config, "extract")
    results = {}
    try:
        for spec in config.encoder_specs():
            results[spec.name] = summary = extract_encoder(config, spec, table)
            tracking.log_batch(config, run_id, metrics={
                f"{spec.name}_rows": summary["rows"], f"{spec.name}_rejected": summary["rejected"]})
    except BaseException:
        tracking.finish_run(config, run_id, "FAILED")
        raise
    tracking.finish_run(config, run_id)
    return results


__all__ = ["run", "extract_encoder", "ExtractError", "FeatureStoreError"]
