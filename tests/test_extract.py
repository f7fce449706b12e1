"""`sweep extract` on real Ray and the real demo images, with an external checkpoint (no pretraining):
the Parquet contract, values against an independent computation, bit-identical reruns, resume after an
interruption, corrupt images, and refusal to mix settings."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import DEMO_IMAGES, small_pipeline
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from sweep.cli import main
from sweep.config import PipelineConfig, load_config
from sweep.data.preprocess import preprocess
from sweep.data.table import build_table
from sweep.encoders.diffusion import noise_for
from sweep.features.store import FeatureStore, FeatureStoreError, fingerprint
from sweep.stages import common, extract
from sweep.stages.extract import extract_encoder
from sweep.stages.probe import ProbeError, plan_trials, read_probe_data

pytestmark = pytest.mark.ray

BLOCKS = ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
TIMESTEPS = [0, 100]
N_IMAGES = 105  # the vendored demo set
N_OOD = 9
N_ALL = N_IMAGES + N_OOD


def _config(storage: Path, checkpoint: Path, train: dict | None = None, ood: Path | None = None,
            **extract_settings) -> PipelineConfig:
    raw = small_pipeline(storage, extract={
        "encoders": [{"name": "diffusion", "checkpoint": str(checkpoint)}],
        "timesteps": TIMESTEPS, "batch_size": 32, "shard_size": 40, **extract_settings})
    if train is not None:
        raw["data"]["train"] = {**raw["data"]["train"], **train}
    if ood is not None:
        raw["data"]["ood"] = [{"name": "shifted", "source": "imagefolder", "path": str(ood)}]
    return PipelineConfig.model_validate(raw)


def _extract(config: PipelineConfig) -> dict:
    return extract_encoder(config, config.encoder_specs()[0], build_table(config))


def _store(config: PipelineConfig) -> FeatureStore:
    return FeatureStore(f"{config.storage_root}/features/diffusion")


def _rows(config: PipelineConfig) -> pa.Table:
    """Every stored row (all columns), sorted by dataset and image id."""
    store = _store(config)
    table = pa.concat_tables([pq.read_table(f) for f in store.files()])
    return table.sort_by([("domain", "ascending"), ("image_id", "ascending")])


def _assert_identical(got: pa.Table, want: pa.Table) -> None:
    """Same rows, same schema, every value bit for bit (float16 compared as raw bits)."""
    assert got.schema == want.schema
    assert got.column("image_id").to_pylist() == want.column("image_id").to_pylist()
    differing = []
    for name in want.column_names:
        a, b = got.column(name).combine_chunks(), want.column(name).combine_chunks()
        if isinstance(a.type, pa.FixedSizeListType):
            same = np.array_equal(a.flatten().to_numpy().view(np.uint16), b.flatten().to_numpy().view(np.uint16))
        else:
            same = a.equals(b)
        if not same:
            differing.append(name)
    assert not differing, f"columns differ: {differing}"


@pytest.fixture(scope="module")
def extracted(ray_local, tiny_unet_checkpoint, tmp_path_factory) -> PipelineConfig:
    """One complete extraction of the demo set (105 images in shards of 40: 3 shards) plus a small OOD
    dataset (9 of the demo images under another name: 1 shard of its own)."""
    root = tmp_path_factory.mktemp("ex")
    for name in ("Tripos", "Ciliophora", "Noctilucales"):
        (root / "ood" / name).mkdir(parents=True)
        for f in sorted((DEMO_IMAGES / name).glob("*.jpg"))[:N_OOD // 3]:
            shutil.copyfile(f, root / "ood" / name / f.name)
    config = _config(root / "store", tiny_unet_checkpoint, ood=root / "ood")
    summary = _extract(config)
    assert summary == {"images": N_ALL, "rows": N_ALL, "rejected": 0}
    return config


def test_parquet_and_manifest_follow_the_contract(extracted, tiny_unet_checkpoint):
    store = _store(extracted)
    m = json.loads(Path(store.manifest_uri).read_text())
    assert m["encoder"] == "diffusion" and m["kind"] == "diffusion" and m["complete"] is True
    assert m["checkpoint"] == str(tiny_unet_checkpoint) and len(m["checkpoint_hash"]) == 16
    assert m["classes"] == sorted(p.name for p in DEMO_IMAGES.iterdir() if p.is_dir())
    names = [f"{b}@t{t}" for t in TIMESTEPS for b in BLOCKS]
    assert [c["column"] for c in m["columns"]] == names
    for c in m["columns"]:
        assert set(c) == {"column", "layer", "timestep", "dim", "resolution"}
        assert c["column"] == f"{c['layer']}@t{c['timestep']}"
    dims = {c["layer"]: (c["dim"], c["resolution"]) for c in m["columns"]}
    # 16 px, block_out_channels [16, 32]: down blocks 16@8, 32@8 (last level has no downsampler), mid 32@8,
    # up_blocks.0 32@16 (upsampled), up_blocks.1 16@16
    assert dims == {"down_blocks.0": (16, 8), "down_blocks.1": (32, 8), "mid_block": (32, 8),
                    "up_blocks.0": (32, 16), "up_blocks.1": (16, 16)}
    shards = m["datasets"]["plankton"]
    assert shards["num_shards"] == 3 and [s["index"] for s in shards["shards"]] == [0, 1, 2]
    assert [s["rows"] for s in shards["shards"]] == [40, 40, 25] and m["rejected"] == []
    assert m["datasets"]["shifted"]["num_shards"] == 1 and m["datasets"]["shifted"]["shards"][0]["rows"] == N_OOD
    assert (Path(extracted.storage_root) / "features" / "diffusion" / "shifted" / "part-00000.parquet").is_file()

    table = _rows(extracted)
    schema = table.schema
    assert schema.names == ["image_id", "label", "split", "domain", *names]
    assert schema.field("image_id").type == pa.string() and schema.field("label").type == pa.int32()
    assert schema.field("split").type == pa.string() and schema.field("domain").type == pa.string()
    for c in m["columns"]:
        assert schema.field(c["column"]).type == pa.list_(pa.float16(), c["dim"])
    keys = list(zip(table.column("domain").to_pylist(), table.column("image_id").to_pylist()))
    assert len(keys) == len(set(keys)) == N_ALL  # one row per image
    expected = build_table(extracted).frame.set_index(["domain", "image_id"])
    assert set(keys) == set(expected.index)
    assert table.column("label").to_pylist() == expected.loc[keys, "label"].tolist()
    assert table.column("split").to_pylist() == expected.loc[keys, "split"].tolist()
    assert {s for (d, _), s in zip(keys, table.column("split").to_pylist()) if d == "shifted"} == {"ood"}
    assert {s for (d, _), s in zip(keys, table.column("split").to_pylist()) if d == "plankton"} == {
        "train", "val", "test"}


def test_features_equal_an_independent_computation(extracted, tiny_unet_checkpoint):
    unet = UNet2DModel.from_pretrained(tiny_unet_checkpoint).eval()
    scheduler = DDPMScheduler.from_pretrained(tiny_unet_checkpoint)
    table = _rows(extracted)
    ids = table.column("image_id").to_pylist()
    picks = [0, 41, 104, N_ALL - 1]  # rows of all three plankton shards and of the OOD dataset
    outputs = {}

    def grab(name):
        def hook(_module, _inputs, output):
            outputs[name] = output[0] if isinstance(output, tuple) else output
        return hook

    modules = dict(unet.named_modules())
    handles = [modules[b].register_forward_hook(grab(b)) for b in BLOCKS]
    try:
        for row in picks:
            image_id = ids[row]
            x0 = preprocess(Image.open(DEMO_IMAGES / image_id), 16, 1)
            for t in TIMESTEPS:
                eps = noise_for(image_id, t, extracted.seed, x0.shape)
                xt = scheduler.add_noise(x0[None], eps[None], torch.tensor([t]))
                outputs.clear()
                with torch.no_grad():
                    unet(xt, torch.tensor([t]))
                for b in BLOCKS:
                    want = outputs[b].mean(dim=(2, 3))[0].numpy()
                    got = np.asarray(table.column(f"{b}@t{t}")[row].as_py(), dtype=np.float32)
                    # float16 rounding (2^-11 relative) plus float32 noise from another batch composition
                    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4, err_msg=f"{image_id} {b}@t{t}")
    finally:
        for h in handles:
            h.remove()


def test_rerun_on_finished_work_does_nothing(extracted, capsys):
    store = _store(extracted)
    before = Path(store.manifest_uri).read_text()
    mtimes = {f: Path(f).stat().st_mtime_ns for f in store.files()}
    assert _extract(extracted) == {"images": N_ALL, "rows": N_ALL, "rejected": 0}
    assert "nothing to do" in capsys.readouterr().err
    assert Path(store.manifest_uri).read_text() == before
    assert {f: Path(f).stat().st_mtime_ns for f in store.files()} == mtimes
    assert _rows(extracted).num_rows == N_ALL


def test_changed_settings_are_refused_with_what_to_do(extracted):
    def changed(**settings):
        return extracted.model_copy(update={"extract": extracted.extract.model_copy(update=settings)})

    with pytest.raises(FeatureStoreError) as err:
        _extract(changed(timesteps=[0, 50]))
    msg = str(err.value)
    assert "(changed: timesteps: [0, 100] -> [0, 50])" in msg
    assert "--set storage=" in msg and f"delete {_store(extracted).root}" in msg and "\n" not in msg
    with pytest.raises(FeatureStoreError, match=r"\(changed: shard_size: 40 -> 50\)"):
        _extract(changed(shard_size=50))
    assert _store(extracted).is_complete()  # untouched


def test_a_store_with_more_columns_serves_those_asked_for(extracted, tmp_path, capsys):
    """Fewer layers and timesteps than a store holds, the rest of the settings the same: nothing is
    extracted and the probe plans exactly the columns asked for. Work left on such a store (a lost shard)
    completes it with every column it was made with. A store of other settings is refused by the probe too,
    not probed under settings it was not made with."""
    config = extracted.model_copy(update={"storage": str(tmp_path / "store")})
    shutil.copytree(Path(extracted.storage_root) / "features", tmp_path / "store" / "features")
    store = _store(config)
    narrow = config.model_copy(update={"extract": config.extract.model_copy(
        update={"timesteps": [100], "layers": ["up_blocks.0", "mid_block"]})})
    before = Path(store.manifest_uri).read_text()
    capsys.readouterr()
    assert _extract(narrow) == {"images": N_ALL, "rows": N_ALL, "rejected": 0}
    err = capsys.readouterr().err
    assert f"holds {len(BLOCKS) * len(TIMESTEPS)} feature columns" in err and "serves the 2 asked for" in err
    assert "nothing to do" in err and Path(store.manifest_uri).read_text() == before

    trials, columns, num_classes = plan_trials(narrow)
    held = {c["column"]: c for c in store.columns()}
    assert [t["column"] for t in trials] == ["mid_block@t100", "up_blocks.0@t100"]  # the store's order
    assert [{k: v for k, v in columns[t["key"]].items() if k not in ("encoder", "features")} for t in trials] == [
        held["mid_block@t100"], held["up_blocks.0@t100"]]
    assert len(plan_trials(config)[0]) == len(held) == len(BLOCKS) * len(TIMESTEPS)
    # layers listed by name: the settings from the store's columns (no model built) are the encoder's own
    listed = config.model_copy(update={"extract": config.extract.model_copy(update={"layers": BLOCKS[::-1]})})
    spec = listed.encoder_specs()[0]
    built = extract.asked_settings(listed, spec)
    assert extract.asked_settings(listed, spec, store.columns()) == built
    assert [c["column"] for c in built["columns"]][:2] == ["up_blocks.1@t0", "up_blocks.0@t0"]

    # a lost shard: extracted again for every column of the store, bit for bit as before
    (Path(config.storage_root) / "features" / "diffusion" / "plankton" / "part-00001.parquet").unlink()
    capsys.readouterr()
    assert _extract(narrow) == {"images": N_ALL, "rows": N_ALL, "rejected": 0}
    assert f"{len(held)} feature columns, 40 of {N_ALL} images to encode" in capsys.readouterr().err
    _assert_identical(_rows(config), _rows(extracted))

    other = config.model_copy(update={"extract": config.extract.model_copy(update={"timesteps": [0, 50]})})
    with pytest.raises(ProbeError, match=r"encoder 'diffusion': .*features/diffusion holds features extracted "
                                         r"with other settings \(changed: timesteps: \[0, 100\] -> \[0, 50\]\); "
                                         r"run `sweep extract`"):
        plan_trials(other)


def test_rerun_into_fresh_storage_interrupted_and_resumed_is_bit_identical(extracted, tmp_path, monkeypatch,
                                                                           capsys):
    """Extract again into a fresh storage; interrupt it after two shards; lose one of them (listed in the
    manifest, file gone) and leave half-written files behind; resume: exactly one row per image, and every
    value bit for bit the first extraction's, the resumed part included."""
    config = extracted.model_copy(update={"storage": str(tmp_path / "store")})
    real_write = FeatureStore.write_shard
    written = []

    def fail_after_two(self, dataset, index, table, rejected=()):
        if len(written) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the third shard was being written
        written.append(index)
        real_write(self, dataset, index, table, rejected)

    monkeypatch.setattr(FeatureStore, "write_shard", fail_after_two)
    with pytest.raises(KeyboardInterrupt):
        _extract(config)
    monkeypatch.setattr(FeatureStore, "write_shard", real_write)
    store = _store(config)
    assert store.completed_shards("plankton") == {0, 1} and not store.is_complete()
    folder = Path(config.storage_root) / "features" / "diffusion" / "plankton"
    (folder / "part-00000.parquet").unlink()  # listed as complete, but lost
    # a half-written shard left behind by a killed writer must never be read, and a stray tmp neither
    (folder / "part-00002.parquet.tmp").write_bytes(b"PAR1 half a shard")
    (folder / "stray.tmp").write_bytes(b"junk")
    capsys.readouterr()
    monkeypatch.setattr(common, "PROGRESS_SECONDS", 0.0)  # a progress line at every batch
    assert _extract(config) == {"images": N_ALL, "rows": N_ALL, "rejected": 0}
    err = capsys.readouterr().err
    assert "shard plankton/part-00000.parquet is listed as complete but its file is gone" in err
    assert f"{N_ALL - 40} of {N_ALL} images to encode (1 shard(s) already complete)" in err
    # progress: images received of those to encode, shards written of those to write (plankton 0 and 2,
    # ood 0), as the batches arrive; the last batch's line gives way to the summary
    lines = [tuple(map(int, m)) for m in re.findall(r"extract diffusion: (\d+)/(\d+) images \((\d+) of (\d+) "
                                                    r"shards written\)", err)]
    assert lines and {(total, shards) for _, total, _, shards in lines} == {(N_ALL - 40, 3)}
    received, written = [n for n, *_ in lines], [w for _, _, w, _ in lines]
    assert received == sorted(set(received)) and received[-1] < N_ALL - 40 and written == sorted(written)
    assert written[-1] >= 1  # plankton 0 (its first 40 rows) was written before the last batch came
    _assert_identical(_rows(config), _rows(extracted))


def test_an_ood_dataset_added_later_is_extracted_alone(extracted, tmp_path, capsys):
    """A finished store of the main dataset, then an OOD dataset added to the pipeline: only its images are
    encoded, the main dataset's shards stay as written, and the store equals one extracted with both from the
    start. Taken out of the pipeline again, the dataset stays in the store, neither counted nor probed."""
    storage = str(tmp_path / "store")
    without = extracted.model_copy(update={"storage": storage,
                                           "data": extracted.data.model_copy(update={"ood": []})})
    with_ood = extracted.model_copy(update={"storage": storage})
    assert _extract(without) == {"images": N_IMAGES, "rows": N_IMAGES, "rejected": 0}
    main_shards = {f: Path(f).stat().st_mtime_ns for f in _store(without).files()}
    capsys.readouterr()
    assert _extract(with_ood) == {"images": N_ALL, "rows": N_ALL, "rejected": 0}
    err = capsys.readouterr().err
    assert f"{N_OOD} of {N_ALL} images to encode (3 shard(s) already complete)" in err
    assert f"wrote {N_OOD} images' rows (the store holds {N_ALL}) x " in err  # not "wrote {N_ALL} rows" at its rate
    assert {f: Path(f).stat().st_mtime_ns for f in _store(without).files(["plankton"])} == main_shards
    _assert_identical(_rows(with_ood), _rows(extracted))

    assert _extract(without) == {"images": N_IMAGES, "rows": N_IMAGES, "rejected": 0}
    assert "nothing to do" in capsys.readouterr().err
    store = _store(without)
    assert store.is_complete() and set(store.manifest()["datasets"]) == {"plankton", "shifted"}
    column = store.columns()[0]["column"]
    _, labels, split, domain = read_probe_data(store.root, column, without.dataset_names())
    assert len(labels) == N_IMAGES and set(domain) == {"plankton"} and "ood" not in set(split)
    assert len(read_probe_data(store.root, column, with_ood.dataset_names())[1]) == N_ALL
    # a pipeline naming a dataset the store lacks is not probed on what is there
    other = with_ood.data.ood[0].model_copy(update={"name": "other"})
    more = with_ood.model_copy(update={"data": with_ood.data.model_copy(update={"ood": [*with_ood.data.ood, other]})})
    with pytest.raises(ProbeError, match=r"incomplete at .*features/diffusion \(dataset\(s\) 'other'\); run `sweep "
                                         r"extract` first"):
        plan_trials(more)


def test_a_store_from_before_per_dataset_image_keys_is_upgraded(extracted, tmp_path, capsys):
    """A store written while one fingerprint covered every dataset's images (inside the store's key) is taken
    over as it is: nothing re-encoded, its manifest rewritten under today's key."""
    config = extracted.model_copy(update={"storage": str(tmp_path / "store")})
    shutil.copytree(Path(extracted.storage_root) / "features", tmp_path / "store" / "features")
    manifest_file = Path(_store(config).manifest_uri)
    today = json.loads(manifest_file.read_text())
    frame = build_table(config).frame
    old_settings = {k: v for k, v in today["settings"].items() if k != "images"}
    old_settings["images"] = fingerprint(pd.util.hash_pandas_object(
        frame[["image_id", "label", "split", "domain"]], index=False).sum().item())
    manifest_file.write_text(json.dumps({**today, "key": fingerprint(old_settings), "settings": old_settings}))
    capsys.readouterr()
    assert _extract(config) == {"images": N_ALL, "rows": N_ALL, "rejected": 0}
    assert "nothing to do" in capsys.readouterr().err
    assert json.loads(manifest_file.read_text()) == today
    _assert_identical(_rows(config), _rows(extracted))


@pytest.fixture
def corrupt_folder(tmp_path) -> tuple[Path, dict[str, str]]:
    """A copy of the demo imagefolder with a truncated JPEG and a text file named .jpg planted in it."""
    root = tmp_path / "images"
    shutil.copytree(DEMO_IMAGES, root)
    src = sorted((root / "Tripos").glob("*.jpg"))[0]
    data = src.read_bytes()
    (root / "Tripos" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "Ciliophora" / "notes.jpg").write_text("this is not an image\n")
    return root, {"Tripos/truncated.jpg": "truncated", "Ciliophora/notes.jpg": "cannot identify image"}


def test_corrupt_images_are_skipped_listed_and_counted(ray_local, corrupt_folder, tiny_unet_checkpoint,
                                                       extracted, tmp_path, capsys):
    root, bad = corrupt_folder
    config = _config(tmp_path / "store", tiny_unet_checkpoint, max_bad_fraction=0.05,
                     train={"source": "imagefolder", "path": str(root)})
    summary = _extract(config)
    assert summary == {"images": N_IMAGES + 2, "rows": N_IMAGES, "rejected": 2}
    err = capsys.readouterr().err
    assert "2 image(s) rejected" in err
    m = json.loads(Path(_store(config).manifest_uri).read_text())
    assert sorted(r["image_id"] for r in m["rejected"]) == sorted(bad)
    for r in m["rejected"]:
        assert bad[r["image_id"]] in r["reason"].lower(), r
        assert r["domain"] == "plankton"
    ids = _rows(config).column("image_id").to_pylist()
    assert len(ids) == N_IMAGES and not set(bad) & set(ids)
    assert set(ids) == {p.relative_to(DEMO_IMAGES).as_posix() for p in DEMO_IMAGES.glob("*/*.jpg")}
    # an OOD set added later: its images are encoded alone, and the earlier run's rejections are not its own
    with_ood = _config(tmp_path / "store", tiny_unet_checkpoint, max_bad_fraction=0.05,
                       train={"source": "imagefolder", "path": str(root)}, ood=Path(extracted.data.ood[0].path))
    assert _extract(with_ood) == {"images": N_ALL + 2, "rows": N_ALL, "rejected": 2}
    assert f"wrote {N_OOD} images' rows (the store holds {N_ALL}) x " in (err := capsys.readouterr().err)
    assert "; 0 image(s) rejected (the store lists 2)" in err, err


def test_too_many_corrupt_images_fail_the_stage(ray_local, corrupt_folder, tiny_unet_checkpoint, write_pipeline,
                                                capsys):
    """Through the CLI, as a user sees it: exit code 1 and one line naming the count, the limit and what to do."""
    root, bad = corrupt_folder
    path = write_pipeline(
        data={"train": {"name": "plankton", "source": "imagefolder", "path": str(root),
                        "splits": {"val": 0.2, "test": 0.2}}},
        extract={"encoders": [{"name": "diffusion", "checkpoint": str(tiny_unet_checkpoint)}],
                 "timesteps": TIMESTEPS, "batch_size": 32, "shard_size": 40,
                 "max_bad_fraction": 0.01})  # allows 1 of 107
    capsys.readouterr()
    assert main(["extract", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sweep: ExtractError: extract diffusion: 2 of 107 images could not be read"), err
    assert "extract.max_bad_fraction=0.01" in err and "rerun" in err
    config = load_config(path)
    m = _store(config).manifest(reload=True)
    assert not m["complete"] and {r["image_id"] for r in m["rejected"]} == set(bad)


def test_decode_runs_in_tasks_apart_from_the_encoder_actors(ray_local, extracted, capsys):
    """Decoding must not be fused into the encoder actors (it would run serially with the model)."""
    frame = build_table(extracted).frame.assign(shard=0)
    capsys.readouterr()
    extract.build_dataset(extracted, frame, {"kind": "diffusion"}).explain()
    physical = capsys.readouterr().out.split("Physical Plan (Optimized)")[-1]
    assert "ActorPoolMapOperator[MapBatches(EncodeBatch)]" in physical, physical
    assert "TaskPoolMapOperator[MapBatches(decode_chunk)]" in physical, physical


def test_chunks_are_whole_batches_aligned_to_shards():
    """Each Ray block is one encoder batch: batch_size rows, starting at a shard's first row, padded at the
    shard's end, so a resumed run (fewer shards pending) batches every image exactly as a fresh run."""
    frame = pd.DataFrame({"image_id": [f"i{k}" for k in range(10)], "path": [f"/p/{k}" for k in range(10)],
                          "index": -1, "label": np.zeros(10, np.int32), "split": "train", "domain": "d",
                          "shard": [0] * 7 + [1] * 3})
    chunks = extract._chunks(frame, 4)
    assert [len(c) for c in chunks] == [4, 4, 4]
    assert [c["image_id"].tolist() for c in chunks] == [["i0", "i1", "i2", "i3"], ["i4", "i5", "i6", ""],
                                                        ["i7", "i8", "i9", ""]]
    assert [c["pad"].tolist() for c in chunks][1] == [False, False, False, True]
    assert all((c["shard"].nunique() == 1) for c in chunks)
    resumed = extract._chunks(frame[frame["shard"] == 1], 4)
    assert resumed[0]["image_id"].tolist() == chunks[2]["image_id"].tolist()


def test_an_unfinished_pretraining_is_not_extracted(tmp_path, write_pipeline, tiny_unet_checkpoint, capsys):
    """pretrain/final without its completion marker (a copy or upload cut short: the marker is written
    last) is not taken for a pretrained U-Net, even though its config.json is there."""
    path = write_pipeline()
    config = load_config(path)
    final = Path(config.storage_root) / "pretrain" / "final"
    shutil.copytree(tiny_unet_checkpoint, final)
    assert main(["extract", str(path)]) == 1
    err = capsys.readouterr().err
    assert "no finished pretraining at" in err and "sweep_pretrain.json" in err, err
    assert not (Path(config.storage_root) / "features").exists()


def test_a_model_whose_weights_cannot_be_read_is_named_with_what_to_do(tmp_path, tiny_unet_checkpoint):
    """Weights cut short (a copy interrupted, a full disk) in a folder its marker calls complete: the stage
    failed with the loader's error, which for safetensors names no file. It names the encoder, the folder
    and what to do, before any image is encoded."""
    import shutil

    unet = tmp_path / "unet"
    shutil.copytree(tiny_unet_checkpoint, unet)
    (weights,) = unet.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    config = _config(tmp_path / "store", unet)
    with pytest.raises(extract.ExtractError, match=rf"encoder 'diffusion': the model at {re.escape(str(unet))} "
                                                   r"cannot be loaded \(.*\): replace that checkpoint"):
        _extract(config)
    assert not (tmp_path / "store" / "features").exists()


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt, "KILLED"), (RuntimeError, "FAILED")])
def test_an_interrupted_extraction_ends_its_run_killed_and_a_failed_one_failed(tmp_path, monkeypatch, error, status):
    """Ctrl-C while an encoder's images are encoded ends the stage's MLflow run KILLED, as pretrain's, the
    baselines' and the probe's (it ended FAILED: an interruption shown in MLflow as a failure); an error
    ends it FAILED."""
    from sweep import tracking

    config = PipelineConfig.model_validate(small_pipeline(tmp_path / "store"))

    def stopped(config, spec, table, on_work=None):
        on_work()  # the stage's run is opened: images to encode
        raise error("stopped")

    monkeypatch.setattr(extract, "extract_encoder", stopped)
    with pytest.raises(error):
        extract.run(config)
    runs = tracking.client_for(config).search_runs([tracking.ensure_experiment(config)],
                                                   f"tags.`{tracking.TAG_STAGE}` = 'extract'")
    assert [r.info.status for r in runs] == [status]
