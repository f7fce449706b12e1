"""Pipeline files: validation names the offending key, overrides, the config hash, CLI exit codes."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from sweep.cli import main
from sweep.config import ConfigError, apply_override, changed_settings, load_config


def test_demo_pipeline_is_valid(capsys):
    assert main(["validate", "pipelines/demo.yaml"]) == 0
    out = capsys.readouterr().out
    assert "105 images, 6 classes" in out
    # the demo's baselines draw a tenth of the U-Net's training images: said before anything trains
    assert ("  budgets: diffusion 200 steps x at most 32 = 6,200 training images; supervised-resnet18 10 epochs x 61 "
            "= 610 training images; simclr-resnet18 10 epochs x 61 = 610 training images") in out
    assert "budgets: warning: training budgets differ 10.2x: diffusion would see 6,200" in out
    # the trials the probe stage will run (README: 50), before anything is extracted
    assert ("  probe: 50 trials, one per feature column (diffusion 42, supervised-resnet18 4, simclr-resnet18 4), "
            "9 heads each, 30 epochs") in out
    assert main(["validate", "pipelines/demo.yaml", "--set", "baselines.0.epochs=100",
                 "--set", "baselines.1.epochs=100"]) == 0
    out = capsys.readouterr().out
    assert "6,100 training images" in out and "budgets: warning" not in out
    assert "probe: warning" not in out
    assert main(["validate", "pipelines/demo.yaml", "--set", "probe.weight_decays=[0]"]) == 0
    assert "probe: warning: probe.weight_decays are all 0 (no penalty)" in capsys.readouterr().out


def test_validate_plans_a_single_encoders_budget_and_trials(capsys):
    """fashion-mnist.yaml has no baselines: validate said nothing of the U-Net's training budget nor of the
    trials the probe would run (budgets were printed only to compare two encoders)."""
    assert main(["validate", "pipelines/demo.yaml", "--set", "baselines=[]", "--set", "extract.timesteps=[0,100]",
                 "--set", "extract.layers=[mid_block,up_blocks.1]"]) == 0
    out = capsys.readouterr().out
    assert "  probe: 4 trials, one per feature column (diffusion 4), 9 heads each, 30 epochs" in out
    assert "  budgets: diffusion 200 steps x at most 32 = 6,200 training images\n" in out
    assert main(["validate", "pipelines/demo.yaml", "--set", "probe.lrs=[0.1]",
                 "--set", "probe.weight_decays=[0]"]) == 0
    assert "), 1 head each, 30 epochs" in capsys.readouterr().out  # "1 heads each" before


def test_validate_warns_when_pretraining_is_all_warm_up(capsys):
    """A quick run (`--set pretrain.steps=5`) keeps the file's warm-up of 20 steps: the lr rises all run long
    (diffusers' warm-up, then a cosine that never starts) and tops out at a quarter of pretrain.lr."""
    assert main(["validate", "pipelines/demo.yaml", "--set", "pretrain.steps=5"]) == 0
    assert ("  pretrain: warning: pretrain.warmup_steps (20) >= pretrain.steps (5): the lr rises for the whole run "
            "to 25% of pretrain.lr (0.0002) and never decays: set warmup_steps below steps") in capsys.readouterr().out
    assert main(["validate", "pipelines/demo.yaml", "--set", "pretrain.steps=21"]) == 0
    assert "warmup_steps" not in capsys.readouterr().out


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_validate_warns_when_a_datasets_images_read_nearly_uniform(tmp_path, capsys, bits):
    """Demo images saved as 16-bit PNGs holding 12-bit values (a camera's) are read on the 16-bit range: nearly
    black. `validate` says so; 8-bit and full-range 16-bit copies of the same images read fine."""
    import numpy as np
    from PIL import Image

    demo = Path("sweep/data/demo/plankton-flowcam-demo/images").resolve()
    for c in ("Tripos", "Ciliophora"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for f in sorted((demo / c).iterdir())[:8]:
            gray = np.asarray(Image.open(f).convert("L")).astype(np.uint16)
            scaled = {8: gray.astype(np.uint8), 12: gray * 16, 16: gray * 257}[bits]
            Image.fromarray(scaled).save(tmp_path / "images" / c / f"{f.stem}.png")
    assert main(["validate", "pipelines/demo.yaml", "--set", "data.train.source=imagefolder",
                 "--set", f"data.train.path={tmp_path / 'images'}"]) == 0
    out = capsys.readouterr().out
    warned = "images: warning: data.train: the sampled images are nearly uniform once read" in out
    assert warned == (bits == 12), out


def test_validate_names_the_first_30_classes_and_counts_the_rest(tmp_path, capsys):
    """A study of 200 classes printed every name on one `classes:` line (4 kB)."""
    demo = Path("sweep/data/demo/plankton-flowcam-demo/images").resolve()
    files = sorted(demo.glob("*/*.jpg"))
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(f"{f},c{i % 35:02d}\n" for i, f in enumerate(files)))
    assert main(["validate", "pipelines/demo.yaml", "--set", "data.train.source=manifest", "--set",
                 f"data.train.path={tmp_path / 'm.csv'}", "--set", f"storage={tmp_path / 'store'}"]) == 0
    line, = [x for x in capsys.readouterr().out.splitlines() if x.startswith("  classes: ")]
    assert line == "  classes: " + ", ".join(f"c{i:02d}" for i in range(30)) + ", ... (5 more)"


def test_validate_warns_of_one_file_listed_under_two_paths(tmp_path, capsys):
    """An image folder holding a link to another class's image (and a linked folder) lists one file under
    two paths: it is read twice, under two labels, perhaps in train and test. `validate` names it; the
    scan reads it as listed (README: linked folders are followed)."""
    import os
    import shutil

    demo = Path("sweep/data/demo/plankton-flowcam-demo/images").resolve()
    images = tmp_path / "images"
    shutil.copytree(demo, images)
    target = sorted((images / "Noctilucales").iterdir())[0]
    (images / "Tripos" / "linked.jpg").symlink_to(target)
    args = ["validate", "pipelines/demo.yaml", "--set", "data.train.source=imagefolder",
            "--set", f"data.train.path={images}", "--set", f"storage={tmp_path / 'store'}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "1 file(s) are listed under more than one path (links), 2 rows in all" in out, out
    assert "1 under more than one class" in out and str(target) in out and "linked.jpg" in out
    os.remove(images / "Tripos" / "linked.jpg")
    assert main(args) == 0
    assert "listed under more than one path" not in capsys.readouterr().out


def test_validate_decodes_a_sample_of_the_images(tmp_path, capsys):
    """`validate` opens a seeded sample of each dataset's images: unreadable ones are counted and one is named;
    a dataset none of whose sampled images reads is an invalid setting (it made pretraining wait forever)."""
    demo = Path("sweep/data/demo/plankton-flowcam-demo/images").resolve()
    good = [(f, f.parent.name) for c in ("Tripos", "Ciliophora") for f in sorted((demo / c).iterdir())[:6]]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")

    def validate(rows) -> int:
        manifest = tmp_path / "images.csv"
        manifest.write_text("path,label\n" + "".join(f"{f},{c}\n" for f, c in rows))
        return main(["validate", "pipelines/demo.yaml", "--set", "data.train.source=manifest",
                     "--set", f"data.train.path={manifest}", "--set", f"storage={tmp_path / 'store'}"])

    assert validate(good + [(broken, "Tripos")]) == 0
    out = capsys.readouterr().out
    assert f"images: 1 of 13 sampled unreadable (e.g. {broken}: UnidentifiedImageError" in out
    # 1 of 13 is more than extract.max_bad_fraction (0.01 by default) allows: extract would stop on it
    assert "images: warning: 8% of the sample is unreadable, more than extract.max_bad_fraction=0.01 allows: " \
           "extract would stop" in out
    # 1 unreadable file sampled of 101 images: 3 % of the sample, 1 % of the images, which extract allows
    many = []
    for i in range(100):
        c = ("Tripos", "Ciliophora")[i % 2]
        copy = tmp_path / f"{c}-{i}.jpg"
        copy.write_bytes(sorted((demo / c).iterdir())[i // 2 % 6].read_bytes())
        many.append((copy, c))
    assert validate(many + [(broken, "Tripos")]) == 0
    out = capsys.readouterr().out
    assert "images: 1 of 32 sampled unreadable" in out, out
    assert "extract may stop (it allows 1 of the 101 images; the sample cannot tell)" in out, out
    assert validate([(tmp_path / f"gone-{i}.png", c) for i, c in enumerate("ABABAB")]) == 2
    err = capsys.readouterr().err
    assert ("sweep: invalid config: pipelines/demo.yaml: data.train: none of 6 sampled images could be read, e.g. "
            in err)
    assert "gone-" in err and "FileNotFoundError" in err


def test_validate_counts_every_missing_file_a_manifest_lists(tmp_path, capsys):
    """A manifest listing 3 files that do not exist among 101 images: the 32 decoded for the sample may miss
    them all (they did: 'valid', '0 of 32 sampled unreadable'), and extract stopped on them after the
    training stages had run. validate checks every listed file: it counts them, names one, and says extract
    would stop (3 of 101 is more than max_bad_fraction 0.01 allows)."""
    demo = Path("sweep/data/demo/plankton-flowcam-demo/images").resolve()
    files = sorted(demo.glob("*/*.jpg"))[:98]
    gone = [tmp_path / f"gone-{i}.jpg" for i in range(3)]
    manifest = tmp_path / "images.csv"
    manifest.write_text("path,label\n" + "".join(f"{f},{f.parent.name}\n" for f in files)
                        + "".join(f"{f},Tripos\n" for f in gone))

    def validate(*overrides) -> str:
        assert main(["validate", "pipelines/demo.yaml", "--set", "data.train.source=manifest",
                     "--set", f"data.train.path={manifest}", "--set", f"storage={tmp_path / 'store'}",
                     *overrides]) == 0
        return capsys.readouterr().out

    out = validate()
    assert "images: warning: data.train: 3 of the files its manifest lists do not exist (e.g. " \
           f"{gone[0]}); the stages skip them as unreadable" in out, out
    assert "more than extract.max_bad_fraction=0.01 allows: extract would stop" in out, out
    out = validate("--set", "extract.max_bad_fraction=0.05")
    assert "3 of the files its manifest lists do not exist" in out and "extract would stop" not in out, out


@pytest.mark.parametrize(
    "override, key, why",
    [
        ("probe.epochz=3", "probe.epochz", "unknown key"),
        ("probe.epochs=many", "probe.epochs", "integer"),
        ("extract.timesteps=[0,0]", "extract.timesteps", "distinct"),
        ("data.train.source=imagefolder", "data.train", "needs a path"),
        ("data.train.path=/no/such/folder", "data.train", "path does not exist: /no/such/folder"),
        ("data.train={source: fashion-mnist, path: /no/fmnist}", "data.train",
         "path does not exist: /no/fmnist (apt-get install dataset-fashion-mnist"),
        ("pretrain.model.attention=[true]", "pretrain.model", "one per level"),
        # building a U-Net of 1,000 resnets a block hung `validate` for minutes
        ("pretrain.model.layers_per_block=1000", "pretrain.model.layers_per_block",
         "less than or equal to 32 (got 1000)"),
        ("extract.encoders=[nosuch]", "extract.encoders.0", "unknown encoder 'nosuch'"),
        # without a checkpoint, a name other than 'diffusion' would be the pretrained U-Net under that name
        ("extract.encoders=[diffusion, {name: unet2}]", "extract.encoders.1",
         "encoder 'unet2' has no checkpoint: name the pretrained U-Net 'diffusion'"),
        ("probe.asha={grace_period: 20}", "probe", "asha.grace_period (20) must be below epochs (20)"),
        ("probe.asha.reduction_factor=1", "probe.asha.reduction_factor", "greater than 1 (got 1)"),
        ("probe.epochs=0", "probe.epochs", "greater than or equal to 1 (got 0)"),
        ("report.metric=test_f1", "report.metric", "unknown metric 'test_f1'"),
        ("report.metric=ood_other_acc", "report.metric", "no OOD dataset 'other'"),
        ("extract.layers=[]", "extract.layers", "at least one module path"),
        ("extract.layers=[mid_block, mid_block]", "extract.layers", "given twice: ['mid_block']"),
        ("baselines=[{name: s, kind: supervised, layers: [layer1, layer1]}]", "baselines.0.layers",
         "given twice: ['layer1']"),
        # the test pipeline's U-Net has 2 levels: the image must halve once
        ("data.image_size=15", "data.image_size", "15 is not a multiple of 2"),
        ("extract.timesteps=[0,1000]", "extract.timesteps", "[1000] not below pretrain.scheduler.num_train_timesteps"),
        # 2 images per class: round(2 x 0.2) = 0 val images of any class (the probes failed, every trial)
        ("data.train={name: p, source: demo, regime: balanced, per_class: 2, splits: {val: 0.2, test: 0.2}}",
         "data.train", "the val split is empty (12 images, 2 to 2 per class, regime balanced with per_class 2)"),
        # a config audit's finds: each was accepted, and failed late or did the wrong thing
        ("probe.batch-size=64", "probe.batch-size", "unknown key (did you mean 'batch_size'?)"),
        ("Probe={epochs: 3}", "Probe", "unknown key (did you mean 'probe'?)"),
        # the closest key of the key's own section, or where the key belongs (a global lookup found 'lr' itself)
        ("probe.lr=0.1", "probe.lr", "unknown key (did you mean 'lrs'?)"),
        ("probe.timesteps=[0]", "probe.timesteps", "unknown key (a key elsewhere: extract.timesteps)"),
        ("extract.timesteps=[000, 025]", "--set extract.timesteps", "000 has a leading zero, which YAML reads as an "
                                                                  "octal number: write 0"),
        ("pretrain.grad_clip=-1", "pretrain.grad_clip", "greater than 0 (got -1)"),  # -1 climbed the loss
        ("probe.lrs=[0, -0.1]", "probe.lrs", "learning rates must be above 0"),
        ("probe.weight_decays=[-1]", "probe.weight_decays", "weight decays must be 0 or more"),
        ("seed=-1", "seed", "greater than or equal to 0 (got -1)"),
        ("extract.encoders=[]", "extract.encoders", "at least 1 item"),
        ("tracking.uri=mlflow.db", "tracking.uri", "'mlflow.db' is not an MLflow tracking URI (no scheme): e.g. "
                                                   "sqlite:///mlflow.db"),
        ("pretrain.use_gpu=true", "pretrain.use_gpu", "needs as many GPUs: the local Ray has"),
        ("pretrain.workers=64", "pretrain.workers x cpus_per_worker = 64 x 1 CPUs", "the local Ray has"),
        ("extract.gpus_per_actor=1", "extract.actors x gpus_per_actor", "the local Ray has"),
        # Ray Client: pretraining failed in Ray Data after a minute, every probe trial in its Tune callback
        ("ray.address=ray://127.0.0.1:10001", "ray.address", "is a Ray Client address, which sweep's stages cannot "
                                                             "run through"),
        ("ray.address=http://127.0.0.1:8265", "ray.address", "is a dashboard URL: that is `sweep submit`'s"),
        # an unnamed OOD set was called "main": metrics ood_main_acc, or a clash with an unnamed train set
        ("data.ood=[{source: demo}]", "data.ood.0.name", "Field required"),
        # '..' as an OOD set wrote its shards into the encoders' common folder, each encoder over the other's
        ("data.ood=[{name: '..', source: demo}]", "data.ood.0.name", "starting with a letter, digit or '_', got '..'"),
        ("data.train.name=.hidden", "data.train.name", "got '.hidden'"),
        ("name=-x", "name", "got '-x'"),
        ("baselines=[{name: ., kind: supervised}]", "baselines.0.name", "got '.'"),
        # a value that is part of an allowed one ('balance' in 'balanced') was taken as already shown
        ("probe.class_weights=balance", "probe.class_weights", "Input should be 'none' or 'balanced' (got 'balance')"),
        # settings a kind never reads were silently ignored
        ("baselines=[{name: s, kind: supervised, normalize: imagenet}]", "baselines.0",
         "normalize is only for kind pretrained (this baseline is supervised)"),
        ("baselines=[{name: s, kind: supervised, temperature: 0.1, projection_dim: 64}]", "baselines.0",
         "temperature, projection_dim are only for kind simclr (this baseline is supervised)"),
        ("baselines=[{name: s, kind: simclr, input_size: 224}]", "baselines.0",
         "input_size is only for kind pretrained (this baseline is simclr)"),
        # Python's index form made an unknown key `data.ood[0]`
        ("data.ood[0].limit=5", "--set data.ood[0].limit", "list items are indexed with a dot: --set data.ood.0.limit="),
    ],
)
def test_bad_config_exits_2_naming_the_key(write_pipeline, capsys, override, key, why):
    path = write_pipeline()
    assert main(["validate", str(path), "--set", override]) == 2
    err = capsys.readouterr().err
    assert key in err and why in err, err


@pytest.mark.parametrize(
    "override, key, why",
    [
        # found by a fuzz of the pipeline keys: validate accepted these (a NaN compares false with the grids'
        # `x <= 0`; infinity passes `gt=0`); torch's Adam takes an infinite lr, the probe's own Adam a NaN one
        ("probe.lrs=[0.1, .nan]", "probe.lrs.1", "finite number (got nan)"),
        ("probe.lrs=[.inf]", "probe.lrs.0", "finite number (got inf)"),
        ("probe.weight_decays=[.nan]", "probe.weight_decays.0", "finite number (got nan)"),
        ("pretrain.lr=.inf", "pretrain.lr", "finite number (got inf)"),
        ("pretrain.weight_decay=.inf", "pretrain.weight_decay", "finite number (got inf)"),
        ("pretrain.grad_clip=.inf", "pretrain.grad_clip", "finite number (got inf)"),
        ("probe.asha={reduction_factor: .inf}", "probe.asha.reduction_factor", "finite number (got inf)"),
        ("baselines=[{name: s, kind: supervised, lr: .inf}]", "baselines.0.lr", "finite number (got inf)"),
    ],
)
def test_nan_and_infinite_numbers_exit_2_naming_the_key(write_pipeline, capsys, override, key, why):
    assert main(["validate", str(write_pipeline()), "--set", override]) == 2
    err = capsys.readouterr().err
    assert f"{key}: Input should be a {why}" in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "override, key",
    [
        # YAML reads true/false/yes/no/on/off as booleans, and pydantic took a boolean for a number: `epochs:
        # yes` trained 1 epoch, `seed: true` was seed 1, `timesteps: [true]` timestep 1
        ("probe.epochs=yes", "probe.epochs"),
        ("seed=true", "seed"),
        ("extract.timesteps=[0, true]", "extract.timesteps: item 1"),
        ("pretrain.lr=true", "pretrain.lr"),
        ("data.channels=true", "data.channels"),
        ("probe.weight_decays=[off]", "probe.weight_decays: item 0"),
        ("probe.max_concurrent_trials=on", "probe.max_concurrent_trials"),
        ("data.train.splits={val: true, test: 0.2}", "data.train.splits.val"),
    ],
)
def test_a_boolean_for_a_number_exits_2_naming_the_key(write_pipeline, capsys, override, key):
    assert main(["validate", str(write_pipeline()), "--set", override]) == 2
    err = capsys.readouterr().err
    assert f"{key}: expected a number, not a boolean (got " in err and err.count("(got") == 1, err
    assert err.count("\n") == 1, err


def test_booleans_and_numbers_in_their_own_places_still_load(write_pipeline):
    config = load_config(write_pipeline(), ["pretrain.use_gpu=false", "probe.kmeans=no", "pretrain.steps=7.0",
                                            "pretrain.lr=1e-3", "data.train.splits.val=0.25",
                                            "baselines=[{name: s, kind: supervised, small_input: true}]"])
    assert (config.pretrain.use_gpu, config.probe.kmeans, config.baselines[0].small_input) == (False, False, True)
    assert (config.pretrain.steps, config.pretrain.lr, config.data.train.splits.val) == (7, 1e-3, 0.25)


def test_storage_that_cannot_be_made_stops_before_any_stage(tmp_path, write_pipeline, capsys):
    """A storage path under a file (or anywhere no folder can be made): `validate` warns (a cluster's path
    may exist only there), a stage exits 2 naming `storage` before it starts (it failed inside the stage
    with the OS error alone). A good path is created by the check itself."""
    (tmp_path / "a-file").write_text("x")
    bad = tmp_path / "a-file" / "runs"
    path = write_pipeline()
    assert main(["validate", str(path), "--set", f"storage={bad}"]) == 0
    assert f"storage: warning: cannot create or write {bad}" in capsys.readouterr().out
    assert main(["pretrain", str(path), "--set", f"storage={bad}"]) == 2
    err = capsys.readouterr().err
    assert f"storage: cannot create or write {bad}" in err and "== pretrain ==" not in err, err
    assert main(["validate", str(path), "--set", f"storage={tmp_path / 'new' / 'runs'}"]) == 0
    assert list(tmp_path.glob("new/.sweep-write-check-*")) == [] and not (tmp_path / "new").exists()


def test_pipeline_file_mistakes_name_the_file_and_line(tmp_path, write_pipeline, capsys):
    """A section given twice (PyYAML kept the second silently), a folder or an empty file as the pipeline, a
    checkpoint folder that is not a diffusers one, storage that is a file: exit 2 naming them."""
    text = write_pipeline().read_text()
    twice = tmp_path / "twice.yaml"
    twice.write_text(text + "extract:\n  timesteps: [0, 50]\n")
    line = len(text.splitlines()) + 1
    cases = [([str(twice)], "key 'extract' given twice (lines "),
             ([str(tmp_path)], "is a folder: give the pipeline's YAML file")]
    (tmp_path / "empty.yaml").write_text("")
    cases.append(([str(tmp_path / "empty.yaml")], "the file is empty"))
    (tmp_path / "unet").mkdir()
    cases.append(([str(write_pipeline()), "--set", f"extract.encoders=[{{name: diffusion, checkpoint: "
                                                    f"{tmp_path / 'unet'}}}]"],
                  "holds no config.json (itself or in unet/): not a diffusers UNet2DModel folder"))
    (tmp_path / "afile").write_text("x")
    cases.append(([str(write_pipeline()), "--set", f"storage={tmp_path / 'afile'}"], "is a file, not a folder"))
    for args, why in cases:
        assert main(["validate", *args]) == 2
        err = capsys.readouterr().err
        assert why in err, err
    assert f"and {line})" in (main(["validate", str(twice)]), capsys.readouterr().err)[1]


def test_yaml_the_loader_cannot_take_exits_2_in_one_line(tmp_path, capsys):
    """Found by a fuzz of pipeline files: a list as a mapping key failed in the duplicate-key check with
    "TypeError: unhashable type: 'list'" (exit 1), a NUL byte gave a two-line message, and deep nesting
    (in the file or a --set value) a RecursionError (exit 1)."""
    deep = "[" * 2000 + "]" * 2000
    cases = [("name: t\n? [a]\n: 2\n", [], "line 2, column 3: while constructing a mapping found unhashable key"),
             ("name: t\x00\n", [], "character 0x0 at position 7 is not allowed in YAML (special characters are not "
                                   "allowed)"),
             (f"name: t\nextract: {deep}\n", [], "not valid YAML: nested more than"),
             ("name: t\n", [f"extract={deep}"], "--set extract: value is not valid YAML: nested more than")]
    for text, sets, why in cases:
        path = tmp_path / "p.yaml"
        path.write_text(text)
        assert main(["validate", str(path), *sum((["--set", s] for s in sets), [])]) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, err


def test_an_empty_checkpoint_path_exits_2(write_pipeline, capsys):
    """`pretrain.init_from: ''` validated: the checks of the U-Net pretrain builds (timesteps below its
    schedule's length, image size a multiple of its levels) looked for init_from None and were skipped, so
    a timestep past the schedule passed every check before the stages (it would fail in extract, after
    training); the pretrain stage trained from scratch."""
    path = write_pipeline()
    for sets, key in [(["pretrain.init_from=''", "extract.timesteps=[0, 5000]"], "pretrain.init_from"),
                      (["extract.encoders=[{name: diffusion, checkpoint: ''}]"], "extract.encoders.0.checkpoint")]:
        assert main(["validate", str(path), *sum((["--set", s] for s in sets), [])]) == 2
        err = capsys.readouterr().err
        assert f"{key}: an empty path: leave the key out (or null) for none" in err, err


def test_a_file_tracking_uri_exits_2_unless_mlflow_allows_it(write_pipeline, tmp_path, capsys, monkeypatch):
    """MLflow refuses its file store unless MLFLOW_ALLOW_FILE_STORE is set: `tracking.uri: file:///...`
    validated, then `sweep best` and every stage exited 1 with MLflow's paragraph on migrating."""
    path = write_pipeline()
    uri = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for command in ("validate", "best", "report"):
        assert main([command, str(path), "--set", f"tracking.uri={uri}"]) == 2, command
        err = capsys.readouterr().err
        assert f"tracking.uri: {uri} is MLflow's file store, which this MLflow refuses unless " \
               f"MLFLOW_ALLOW_FILE_STORE=true" in err and err.count("\n") == 1, err
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert main(["validate", str(path), "--set", f"tracking.uri={uri}"]) == 0


def test_a_pipeline_argument_that_is_no_regular_file(write_pipeline, tmp_path, capsys):
    """An empty PIPELINE was '. is a folder', /dev/null 'pipeline file not found: /dev/null' (it exists), and
    a pipe (bash's `<(...)`) was 'not found' too, though it can be read like a file."""
    import threading

    for arg, why in [("", "PIPELINE is empty: give the pipeline's YAML file"),
                     ("/dev/null", "/dev/null is not a file or a pipe: give the pipeline's YAML file")]:
        assert main(["validate", arg]) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, err
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    writer = threading.Thread(target=pipe.write_text, args=(write_pipeline().read_text(),))
    writer.start()
    assert main(["validate", str(pipe)]) == 0
    writer.join()
    assert "t: valid (config hash" in capsys.readouterr().out


def test_yaml_merge_keys_work_and_only_own_keys_count_as_given_twice(write_pipeline, tmp_path):
    """The duplicate-key check built every key, `<<` too, which has no constructor of its own: a merge
    (`- {<<: *sup, name: b}`) failed as "could not determine a constructor for the tag ...merge". A key the
    mapping sets over a merged one is no duplicate; one set twice by the mapping itself still is."""
    text = write_pipeline().read_text() + (
        "baselines:\n- &sup {name: a, kind: supervised, epochs: 3, lr: 0.01}\n- {<<: *sup, name: b, epochs: 4}\n")
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    a, b = load_config(path).baselines
    assert (a.name, a.epochs, a.lr, b.name, b.epochs, b.lr) == ("a", 3, 0.01, "b", 4, 0.01)
    path.write_text(text.replace("epochs: 4}", "epochs: 4, epochs: 5}"))
    with pytest.raises(ConfigError, match="key 'epochs' given twice"):
        load_config(path)


def test_ray_address_that_does_not_answer_fails_before_any_stage(write_pipeline, capsys):
    import socket

    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert main(["pretrain", str(write_pipeline()), "--set", f"ray.address=127.0.0.1:{port}"]) == 1
    assert f"ray.address: nothing answers at 127.0.0.1:{port}" in capsys.readouterr().err


def test_a_value_of_the_wrong_form_gets_one_message(write_pipeline, capsys):
    """`extract.layers` is "blocks" or a list: a string that is neither is one entry naming both forms and
    the value; an encoder given as a mapping reports the mapping's problem, not "should be a string"."""
    path = write_pipeline()
    assert main(["validate", str(path), "--set", "extract.layers=foo"]) == 2
    err = capsys.readouterr().err
    assert "extract.layers: Input should be 'blocks' or Input should be a valid list (got 'foo')" in err, err
    assert err.count("extract.layers") == 1 and "literal" not in err and "list[str]" not in err
    assert main(["validate", str(path), "--set", "extract.encoders=[{name: diffusion, checkpoint: /no/such}]"]) == 2
    err = capsys.readouterr().err
    assert "extract.encoders.0.checkpoint: checkpoint folder does not exist: /no/such" in err, err
    assert "valid string" not in err and "<root>" not in err


@pytest.mark.parametrize(
    "sections, key, why",
    [
        ({"extract": {"layers": ["down_blocks.0", "down_blocks.7"]}}, "extract.layers",
         "unknown layer 'down_blocks.7'"),
        ({"baselines": [{"name": "sup", "kind": "supervised", "layers": ["layer2", "layer9"]}]},
         "baselines.0.layers", "unknown layer 'layer9'"),
    ],
)
def test_unknown_layers_exit_2_before_any_stage(write_pipeline, capsys, sections, key, why):
    """Module paths are checked against the architecture (built on the meta device) by `validate` and
    before `run` starts its first stage (pretraining would otherwise come first)."""
    path = write_pipeline(**sections)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"sweep: invalid config: {path}: {key}: {why}" in err, err  # the file named, as loading errors do
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {key}: {why}" in err and "== pretrain ==" not in err, err
    store = Path(yaml.safe_load(path.read_text())["storage"])
    assert not store.exists() or not any(store.iterdir())  # nothing started


def test_checkpoint_layers_and_timesteps_are_checked_against_it(write_pipeline, capsys, tiny_unet_checkpoint):
    """An explicit U-Net folder: its own modules and its scheduler's number of timesteps decide."""
    from sweep.encoders.checks import check_encoder_settings

    encoders = [{"name": "diffusion", "checkpoint": str(tiny_unet_checkpoint)}]
    ok = load_config(write_pipeline(extract={"encoders": encoders, "timesteps": [0, 999],
                                             "layers": ["up_blocks.1.resnets.0", "mid_block"]}))
    check_encoder_settings(ok)  # no error
    late = load_config(write_pipeline(extract={"encoders": encoders, "timesteps": [0, 999],
                                               "layers": "blocks"}), ["pretrain.scheduler.num_train_timesteps=500"])
    check_encoder_settings(late)  # the folder's schedule (1000 steps) applies, not pretrain's
    with pytest.raises(ConfigError, match=r"extract.layers: unknown layer 'up_blocks.3'.*U-Net at"):
        check_encoder_settings(load_config(write_pipeline(extract={"encoders": encoders, "layers": ["up_blocks.3"]})))
    with pytest.raises(ConfigError, match=r"extract.timesteps: \[1000\] not below 1000"):
        check_encoder_settings(load_config(write_pipeline(extract={"encoders": encoders, "timesteps": [0, 1000]})))


def test_empty_class_list_exits_2(tmp_path, write_pipeline, capsys):
    empty = tmp_path / "empty"
    (empty / "some_class").mkdir(parents=True)
    (empty / "some_class" / "notes.txt").write_text("not an image")
    path = write_pipeline(data={"image_size": 16, "channels": 1,
                                "train": {"source": "imagefolder", "path": str(empty)}})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "data.train.path" in err and "no class folders with images" in err


def test_single_class_is_rejected(tmp_path, write_pipeline, capsys):
    from tests.conftest import DEMO_IMAGES

    one = tmp_path / "one"
    one.mkdir()
    (one / "Tripos").symlink_to(DEMO_IMAGES / "Tripos")
    path = write_pipeline(data={"image_size": 16, "channels": 1,
                                "train": {"source": "imagefolder", "path": str(one)}})
    assert main(["validate", str(path)]) == 2
    assert "at least 2" in capsys.readouterr().err


def test_not_yaml_and_missing_file_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    assert main(["validate", str(bad)]) == 2
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "not found" in err


def test_bad_arguments_exit_2(write_pipeline, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", str(write_pipeline()), "--stages", "pretrain,bogus"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["run", str(write_pipeline()), "--stages", " , "])
    assert e.value.code == 2
    assert "no stage given" in capsys.readouterr().err
    from sweep.cli import build_parser

    args = build_parser().parse_args(["run", "p.yaml", "--stages", "report,probe,extract"])
    assert args.stages == ["extract", "probe", "report"]  # pipeline order, whatever order given
    assert main(["best", str(write_pipeline()), "--top", "-1"]) == 2
    assert "--top: must be 0 (all) or more, got -1" in capsys.readouterr().err


def test_a_leading_tilde_is_expanded_in_every_local_path(write_pipeline, tmp_path, monkeypatch):
    """storage and data paths expanded `~`; checkpoints, init_from, weights and split files did not
    ("checkpoint folder does not exist: ~/...")."""
    import torch

    home = tmp_path / "home"
    folder = home / "Mes données #2"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text("{}")
    torch.save({}, folder / "r18.pth")
    for split in ("val", "test"):
        (folder / f"{split}.txt").write_text("x\n")
    monkeypatch.setenv("HOME", str(home))
    config = load_config(write_pipeline(
        pretrain={"init_from": "~/Mes données #2/unet"},
        baselines=[{"name": "pre", "kind": "pretrained", "weights": "~/Mes données #2/r18.pth"}],
        extract={"encoders": [{"name": "u", "checkpoint": "~/Mes données #2/unet"}, "pre"]},
        data={"image_size": 16, "channels": 1, "train": {"name": "plankton", "source": "demo",
                                                         "splits": {"val": "~/Mes données #2/val.txt",
                                                                    "test": "~/Mes données #2/test.txt"}}}))
    assert config.pretrain.init_from == str(folder / "unet")
    assert config.baselines[0].weights == str(folder / "r18.pth")
    assert config.extract.encoders[0].checkpoint == str(folder / "unet")
    assert config.data.train.splits.val == str(folder / "val.txt")


def test_override_with_a_yaml_comment_is_refused_not_cut_short():
    """`--set "storage=/data/Plankton 2024 #3"` set storage to /data/Plankton 2024: YAML drops ` #3` as a comment."""
    raw = {}
    with pytest.raises(ConfigError, match=re.escape("--set storage: '#3' starts a YAML comment, which would be "
                                                    "dropped from the value: quote the value if it belongs to it "
                                                    "(storage=\"/data/Plankton 2024 #3\")")):
        apply_override(raw, "storage=/data/Plankton 2024 #3")
    with pytest.raises(ConfigError, match="'# all of them' starts a YAML comment"):
        apply_override(raw, "extract.timesteps=[0, 100] # all of them")
    assert raw == {}
    apply_override(raw, 'storage="/data/Plankton 2024 #3"')  # quoted, or a `#` inside a word: part of the value
    apply_override(raw, "name=plankton#3")
    apply_override(raw, "tracking={uri: 'sqlite:////data/#3/mlflow.db'}")
    assert raw == {"storage": "/data/Plankton 2024 #3", "name": "plankton#3",
                   "tracking": {"uri": "sqlite:////data/#3/mlflow.db"}}


def test_overrides_parse_yaml_values_and_index_lists():
    raw = {"a": {"b": 1}, "lst": [{"x": 1}, {"x": 2}]}
    apply_override(raw, "a.b=[0, 100]")
    apply_override(raw, "a.c.d=true")
    apply_override(raw, "lst.1.x=3.5")
    apply_override(raw, "storage=/tmp/x")
    assert raw == {"a": {"b": [0, 100], "c": {"d": True}}, "lst": [{"x": 1}, {"x": 3.5}], "storage": "/tmp/x"}
    with pytest.raises(ConfigError, match="lst"):
        apply_override(raw, "lst.7.x=1")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_override(raw, "novalue")
    # a list item that is a value, not a section: a TypeError or AttributeError (exit 1, naming no key)
    raw = {"extract": {"encoders": ["diffusion"]}, "n": [[1]]}
    for assignment, where in [("extract.encoders.0.name=x", "extract.encoders.0"),
                              ("extract.encoders.0.name.y=x", "extract.encoders.0"), ("n.0.0.z=1", "n.0.0")]:
        with pytest.raises(ConfigError, match=re.escape(f"{where} is a value, not a section")):
            apply_override(raw, assignment)
    apply_override(raw, "n.0.0=2")
    assert raw["n"] == [[2]]


def test_config_hash_tracks_results_not_locations(write_pipeline):
    path = write_pipeline(baselines=[{"name": "sup", "kind": "supervised"}])
    base = load_config(path)
    assert load_config(path, ["storage=/elsewhere", "tracking.uri=sqlite:///x.db"]).config_hash() == base.config_hash()
    # where, how fast or how safely the same work runs (NOT_RESULTS)
    for same in ("pretrain.compile=reduce-overhead", "pretrain.workers=4", "pretrain.use_gpu=true",
                 "pretrain.checkpoint_every=2", "pretrain.max_failures=2", "pretrain.sample_grid=0",
                 "baselines.0.checkpoint_every=3", "extract.batch_size=8", "extract.actors=3",
                 "extract.gpus_per_actor=1", "extract.timesteps_per_forward=2", "extract.max_bad_fraction=0.5",
                 "probe.cpus_per_trial=2", "probe.gpus_per_trial=1", "probe.max_concurrent_trials=8"):
        assert load_config(path, [same]).config_hash() == base.config_hash(), same
    for other in ("probe.epochs=7", "probe.asha={grace_period: 2}", "extract.precision=bf16", "pretrain.steps=9",
                  "baselines.0.epochs=2", "extract.shard_size=7", "data.ood=[{name: o, source: demo}]", "seed=1"):
        assert load_config(path, [other]).config_hash() != base.config_hash(), other
    # the probe hash: what every probe run shares; an encoder's own settings are not part of it (its runs'
    # feature tag covers them), so another config's runs on the same stores are this one's results
    for own in ("extract.precision=bf16", "pretrain.steps=9", "baselines.0.epochs=2", "extract.shard_size=7",
                "extract.timesteps=[0]", "baselines=[]", "extract.encoders=[diffusion]"):
        assert load_config(path, [own]).probe_hash() == base.probe_hash(), own
    for other in ("probe.epochs=7", "probe.asha={grace_period: 2}", "data.ood=[{name: o, source: demo}]", "seed=1",
                  "data.train.splits={val: 0.3, test: 0.2}", "probe.class_weights=balanced"):
        assert load_config(path, [other]).probe_hash() != base.probe_hash(), other
    # An optional key left unset must not change the hash of existing pipelines (MLflow finds their finished
    # trials by it): the demo's hash now, and the ones sweep computed for it under the earlier probe revision
    # (until 2026-11-24; sweep 0.1.0 until 2026-11-23), whose runs are kept apart.
    demo = load_config("pipelines/demo.yaml")
    assert demo.config_hash() == "2b6692cc91ea" and demo.probe_hash() == "3b160e487974"
    assert list(demo.earlier_config_hashes()) == ["6b2621e120d4", "edc90e18f19a"]
    assert load_config(path).storage_root == base.storage_root


def test_an_encoder_entry_naming_a_baseline_is_that_baseline(write_pipeline):
    path = write_pipeline(baselines=[{"name": "sup", "kind": "supervised"}])
    specs = load_config(path, ["extract.encoders=[{name: sup}, diffusion]"]).encoder_specs()
    assert [(s.name, s.kind, s.checkpoint) for s in specs] == [("sup", "baseline", None),
                                                               ("diffusion", "diffusion", None)]
    assert load_config(path, ["extract.encoders=[sup]"]).encoder_specs()[0].kind == "baseline"
    with pytest.raises(ConfigError, match=r"extract.encoders.0: encoder 'sup' has no checkpoint"):
        load_config(path, ["extract.encoders=[{name: sup, kind: diffusion}]"])  # said so: not the baseline
    assert load_config(path, ["extract.encoders=[{name: sup, kind: baseline}]"]).encoder_specs()[0].kind == "baseline"


def test_an_encoder_entry_of_kind_baseline_is_a_baseline_of_the_pipeline(write_pipeline, tmp_path):
    # both validated, then failed in extract: the checkpoint (which had to be a diffusers folder) was searched
    # for a baseline.json, and 'diffusion' for baselines/diffusion/final
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text("{}")
    path = write_pipeline(baselines=[{"name": "sup", "kind": "supervised"}])
    with pytest.raises(ConfigError, match=r"extract.encoders.0: checkpoint is for kind diffusion .*baselines/sup/final"):
        load_config(path, [f"extract.encoders=[{{name: sup, kind: baseline, checkpoint: {unet}}}]"])
    with pytest.raises(ConfigError, match=r"extract.encoders.1: 'diffusion' is the pretrained U-Net, not a baseline "
                                          r"\(baselines: sup\)"):
        load_config(path, ["extract.encoders=[sup, {name: diffusion, kind: baseline}]"])
    # a U-Net folder of its own is kind diffusion, the default
    spec = load_config(path, [f"extract.encoders=[{{name: other, checkpoint: {unet}}}]"]).encoder_specs()[0]
    assert (spec.kind, spec.checkpoint) == ("diffusion", str(unet))


def test_defaults_follow_design(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "study", "data": {"train": {"source": "demo"}}}))
    cfg = load_config(path)
    assert cfg.storage_root == "runs/study"
    assert cfg.experiment_name == "study"
    assert cfg.extract.timesteps == [0, 25, 50, 100, 200, 400]
    assert [s.name for s in cfg.encoder_specs()] == ["diffusion"]
    assert cfg.probe.select == "val_macro_f1"


def test_pretrained_weights_may_be_a_file_uri(write_pipeline, tmp_path, capsys):
    import torch

    weights = tmp_path / "r18.pth"
    torch.save({"x": torch.zeros(1)}, weights)
    spec = {"name": "r18", "kind": "pretrained", "arch": "resnet18"}
    config = load_config(write_pipeline(baselines=[{**spec, "weights": f"file://{weights}"}]))
    assert config.baselines[0].weights == str(weights)
    (tmp_path / "notes.pth").write_text("not weights")
    for bad, why in (("s3://bucket/r18.pth", "weights must be a local file, not a URI: s3://bucket/r18.pth"),
                     (f"file://{tmp_path}/missing.pth", f"weights file not found: {tmp_path}/missing.pth"),
                     (str(tmp_path / "notes.pth"), "notes.pth: not a state dict file (torch.save's .pth/.pt or a "
                                                   ".safetensors)")):
        assert main(["validate", str(write_pipeline(baselines=[{**spec, "weights": bad}]))]) == 2
        assert why in capsys.readouterr().err


def test_training_settings_on_a_pretrained_baseline_are_refused_where_given(write_pipeline, tmp_path, capsys):
    """epochs / batch_size / lr (and the other training settings) were silently unused by a pretrained
    baseline; only settings given in the file are refused, not their defaults."""
    import torch

    weights = tmp_path / "w.pth"
    torch.save({"x": torch.zeros(1)}, weights)
    spec = {"name": "p", "kind": "pretrained", "arch": "resnet18", "weights": str(weights)}
    config = load_config(write_pipeline(baselines=[{**spec, "normalize": "none"}]))
    assert config.baselines[0].epochs == 5  # the default, unused and not refused
    for extra, why in (({"epochs": 40, "lr": 0.5}, "epochs, lr are only for kinds supervised and simclr (this "
                                                     "baseline is pretrained)"),
                       ({"batch_size": 64}, "batch_size is only for kinds supervised and simclr"),
                       ({"epochs": 5}, "epochs is only for kinds supervised and simclr")):  # given, if default
        with pytest.raises(ConfigError, match=re.escape(f"baselines.0: {why}")):
            load_config(write_pipeline(baselines=[{**spec, **extra}]))
    simclr = load_config(write_pipeline(baselines=[{"name": "s", "kind": "simclr", "temperature": 0.2,
                                                    "epochs": 2}]))
    assert simclr.baselines[0].temperature == 0.2


def test_best_before_any_run_creates_nothing(write_pipeline, capsys):
    """`sweep best` on a pipeline that never ran (or a mistyped storage): no runs, a hint, and no empty
    storage folder or MLflow database left behind."""
    path = write_pipeline()
    store = Path(yaml.safe_load(path.read_text())["storage"])
    assert main(["best", str(path), "--format", "json"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "[]" and "no MLflow store for 't' yet" in err
    assert not store.exists()


def test_changed_settings_lists_each_differing_leaf_by_its_key_path():
    old = {"seed": 0, "pretrain": {"steps": 6, "lr": 1e-3, "model": {"channels": [16, 32]}}, "gone": 1}
    new = {"seed": 0, "pretrain": {"steps": 9, "lr": 1e-3, "model": {"channels": [16, 64]}}, "added": "x"}
    assert changed_settings(old, new) == [
        "added: (not set) -> 'x'", "gone: 1 -> (not set)", "pretrain.model.channels: [16, 32] -> [16, 64]",
        "pretrain.steps: 6 -> 9"]
    assert changed_settings(old, old) == []


def test_a_second_command_in_a_storage_in_use_stops_naming_the_first(tmp_path, write_pipeline, capsys):
    """Two commands in one storage (a double launch) trained into one checkpoint folder and recorded every
    probe trial twice: the second now stops at once (exit 1) naming the first; the lock goes with the
    command holding it, however it ends."""
    from sweep.storage import storage_lock

    path = write_pipeline()
    root = load_config(path).storage_root
    with storage_lock(root, "sweep run first.yaml"):
        assert main(["pretrain", str(path)]) == 1
        err = capsys.readouterr().err
        assert f"storage {root} is in use by another sweep command (pid {os.getpid()} on " in err
        assert "`sweep run first.yaml`" in err and "== pretrain ==" not in err
        assert main(["validate", str(path)]) == 0  # reading needs no lock
    with storage_lock(root, "sweep pretrain again"):  # released: free again
        pass


def test_an_ood_metric_an_ood_dataset_does_not_have_is_named_as_such():
    from sweep.config import metric_problem

    assert metric_problem("ood_mixed_acc", ["mixed", "inv"]) is None
    why = metric_problem("ood_mixed_balanced_acc", ["mixed", "inv"])  # read as a dataset 'mixed_balanced'
    assert why.endswith("an OOD dataset has accuracy and macro F1 only: ood_mixed_acc or ood_mixed_macro_f1")
    assert "accuracy and macro F1 only" not in metric_problem("ood_other_acc", ["mixed"])
