"""The `sweep` command (a contract: DESIGN.md "CLI").

Exit codes: 0 success; 2 invalid config or arguments (the message names the key); 1 any other failure,
with a one-line cause on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from sweep.config import STAGES, ArgumentError, ConfigError, PipelineConfig, load_config, metric_problem


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 already; keep its usage line short
        self.print_usage(sys.stderr)
        print(f"sweep: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _add_pipeline(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="pipeline YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, VALUE parsed as YAML (repeatable): --set probe.epochs=5")


def _stages(text: str) -> list[str]:
    """Comma-separated stage names, returned in pipeline order (each stage reads what the one before wrote)."""
    stages = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        what = f"unknown stage(s) {bad}" if bad else "no stage given"
        raise argparse.ArgumentTypeError(f"{what}; choose from {','.join(STAGES)}")
    return [s for s in STAGES if s in stages]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sweep", description="Probe frozen diffusion U-Nets block x timestep with Ray + MLflow.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("run", help="run stages in order (default: all)")
    _add_pipeline(p)
    p.add_argument("--stages", type=_stages, default=list(STAGES),
                   help=f"comma-separated, run in pipeline order (default: {','.join(STAGES)})")
    for stage in STAGES:
        _add_pipeline(sub.add_parser(stage, help=f"run the {stage} stage"))
    p = sub.add_parser("best", help="the best probe configurations, from MLflow")
    _add_pipeline(p)
    p.add_argument("--metric", default="val_macro_f1",
                   help="the metric runs are ranked by, best first (default val_macro_f1): val_acc, test_acc, "
                        "test_macro_f1, test_balanced_acc, kmeans_nmi, kmeans_ari, ood_<dataset>_acc, ...")
    p.add_argument("--top", type=int, default=10, help="how many (default 10; 0: all)")
    p.add_argument("--encoder", default=None, help="only this encoder's runs (diffusion, a baseline's name)")
    p.add_argument("--format", choices=["table", "json"], default="table",
                   help="json: a list of objects, the contract's fields")
    p.add_argument("--any-config", action="store_true",
                   help="include runs made with other settings of this pipeline (other config hashes)")
    p = sub.add_parser("validate", help="check a pipeline file and its data, print a summary")
    _add_pipeline(p)
    p = sub.add_parser("submit", help="submit `sweep run` as a Ray job to a cluster")
    _add_pipeline(p)
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    p.add_argument("--stages", type=_stages, default=list(STAGES),
                   help=f"comma-separated, as for `run` (default: {','.join(STAGES)})")
    p.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    return parser


class _CtrlC:
    """Ctrl-C as a KeyboardInterrupt that is also remembered. Python swallows an exception raised inside a
    weakref callback or `__del__` ("Exception ignored in ..."): a Ctrl-C landing while the garbage collector
    ran one (SQLAlchemy's class registry, during the report's imports) was lost, the report went on and the
    command exited 0. Remembered, it stops the command at the next stage and the exit status is 130."""

    seen = False

    @classmethod
    @contextlib.contextmanager
    def remembered(cls):
        if threading.current_thread() is not threading.main_thread() \
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield  # Ctrl-C ignored (a background job of a shell) or handled by the embedding program
            return
        cls.seen = False
        signal.signal(signal.SIGINT, cls._on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    @classmethod
    def _on_sigint(cls, signum, frame):
        cls.seen = True
        raise KeyboardInterrupt

    @classmethod
    def check(cls) -> None:
        if cls.seen:
            raise KeyboardInterrupt


def _ray_up() -> bool:
    """Whether this process is connected to Ray (without importing Ray where nothing did)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def run_stage(config: PipelineConfig, stage: str) -> None:
    from sweep.stages import baselines, extract, pretrain, probe, report

    module = {"pretrain": pretrain, "baselines": baselines, "extract": extract, "probe": probe,
              "report": report}[stage]
    module.run(config)


def cmd_run(config: PipelineConfig, stages: list[str], whole_study: bool = False) -> None:
    """The stages in order. `whole_study` (`sweep run` without --stages): pretraining that no encoder reads
    is left out; a stage named (`--stages`, `sweep pretrain`) runs."""
    from sweep.stages.common import say

    t0 = time.perf_counter()
    stages = [s for s in stages if s != "baselines" or config.baselines]  # none configured: nothing to say
    # minutes to hours of training nothing reads
    if whole_study and "pretrain" in stages and not config.reads_pretrained_unet():
        stages.remove("pretrain")
        say("pretrain: skipped: no encoder reads the U-Net it trains (each diffusion encoder of extract.encoders "
            "has a checkpoint of its own); `sweep pretrain` or --stages pretrain trains it all the same")
    for stage in stages:
        _CtrlC.check()
        say(f"== {stage} ==")
        run_stage(config, stage)
    _CtrlC.check()
    say(f"done: {','.join(stages)} in {time.perf_counter() - t0:.0f}s; storage {config.storage_root}")


def probe_state(config: PipelineConfig, status: str, storage: str | None) -> str:
    """A probe stage's MLflow status as `sweep best` says it: a RUNNING run in this storage that no sweep
    command holds was left so by a killed command (it said RUNNING, as if the sweep were still at work)."""
    from sweep.storage import Storage, storage_in_use

    here = Storage.of(config.storage_root).root
    if status != "RUNNING" or storage not in (None, here):
        return status
    in_use = storage_in_use(here)
    if in_use is False:
        return ("RUNNING in MLflow, but no sweep command on this machine is at work in this storage: it was stopped "
                "without ending its run (killed), unless it runs on another machine sharing the storage")
    return "RUNNING: a sweep command is at work in this storage" if in_use else status


def cmd_best(config: PipelineConfig, args) -> None:
    from sweep.best import best, format_table, one_per_trial, to_json, trial_of
    from sweep.storage import Storage
    from sweep.tracking import check_tracking, store_exists

    metric = args.metric
    # runs of other settings (--any-config) may have had other OOD datasets and encoders: there only the form
    # of the metric is checked
    problem = metric_problem(metric, None if args.any_config else [d.name for d in config.data.ood])
    if problem:
        raise ArgumentError(f"--metric: {problem}")
    if args.top < 0:
        raise ArgumentError(f"--top: must be 0 (all) or more, got {args.top}")
    encoders = [s.name for s in config.encoder_specs()]
    if args.encoder is not None and not args.any_config and args.encoder not in encoders:
        raise ArgumentError(f"--encoder: {args.encoder!r} is not an encoder of this pipeline "
                            f"({', '.join(encoders)}); --any-config for runs of other settings")
    check_tracking(config, reach_server=True)
    have_store = store_exists(config)
    if not have_store:
        from sweep.tracking import configured_uri

        where = configured_uri(config) or f"storage {config.storage_root}"
        print(f"[sweep] no MLflow store for {config.name!r} yet ({where}): run the pipeline first", file=sys.stderr)
    every = best(config, metric=metric, top=None, encoder=args.encoder, any_config=args.any_config)
    recs = every[:args.top] if args.top else every
    trials = len({trial_of(r) for r in every})  # not runs: two storages may each have made one
    plan = None
    if have_store and not args.any_config and args.encoder is None:
        from sweep.tracking import last_probe_plan

        plan = last_probe_plan(config)
        if plan is not None and plan[0] > trials:
            print(f"[sweep] {plan[0] - trials} of the {plan[0]} trials planned by the last probe stage have no "
                  f"finished run (that stage's run is {probe_state(config, *plan[1:])}): the ranking leaves them "
                  f"out; `sweep probe` runs them", file=sys.stderr)
    if not args.any_config and len(every) > trials:
        _, others = one_per_trial(every, Storage.of(config.storage_root).root)
        where = ", ".join(f"{s}: {n}" for s, n in sorted(others.items()))
        print(f"[sweep] {sum(others.values())} trial run(s) of this config are a second run of a trial, made in "
              f"another storage sharing this MLflow experiment ({where}): the ranking lists each run; `sweep "
              f"report` keeps this storage's", file=sys.stderr)
    if not recs and not args.any_config and have_store:
        from sweep.tracking import earlier_probe_runs

        others = best(config, metric=metric, top=1, encoder=args.encoder, any_config=True)
        earlier = earlier_probe_runs(config)
        for what, n in earlier.items():
            print(f"[sweep] no probe runs for this config (hash {config.config_hash()}) by this sweep's probe; "
                  f"{n} run(s) of the same settings were made by {what}, whose results differ: `sweep probe` "
                  f"probes again (`--any-config` shows the earlier runs)", file=sys.stderr)
        # a probe stage of these very settings ran (and ended before any trial finished): the overrides were given
        if others and not earlier and plan is None:
            print(f"[sweep] no probe runs for this config (hash {config.config_hash()}); runs exist for other "
                  f"settings of {config.name!r}: pass the same --set overrides, or --any-config", file=sys.stderr)
    if args.format == "json":
        print(to_json(recs))
    else:
        print(format_table(recs, metric))


VALIDATE_SAMPLE = 32  # images decoded per dataset by `validate`
VALIDATE_CLASSES_SHOWN = 30  # class names `validate` prints
# Below this median pixel spread (std on the [-1, 1] scale) a dataset's images are nearly uniform once read:
# the demo's plankton images spread 0.29 (the least 0.03), Fashion-MNIST's 0.65; 12-bit values in 16-bit
# files, read on the 16-bit range, 0.02
FLAT_IMAGES_STD = 0.05


def sample_images(config: PipelineConfig, table) -> tuple[int, list[tuple[str, str]], list[str]]:
    """Decode up to VALIDATE_SAMPLE images of each dataset (a seeded sample): (how many, [(file, error)] of the
    unreadable ones, warnings about datasets whose images read nearly uniform). Raises ConfigError naming
    the dataset's setting when none of a dataset's sample reads."""
    import numpy as np

    from sweep.data.preprocess import decode_rows

    sampled, unreadable, flat = 0, [], []
    ood = [d.name for d in config.data.ood]
    for domain, rows in table.frame.groupby("domain", sort=False):
        key = f"data.ood[{ood.index(domain)}] ({domain!r})" if domain in ood else "data.train"
        rows = rows.sample(n=min(VALIDATE_SAMPLE, len(rows)), random_state=config.seed)
        images, errors = decode_rows(rows["path"].tolist(), rows["index"].tolist(), config.data.image_size,
                                     config.data.channels)
        bad = [(str(path), error) for path, error in zip(rows["path"], errors) if error]
        if len(bad) == len(rows):
            raise ConfigError(f"{key}: none of {len(rows)} sampled images could be read, e.g. {bad[0][0]}: "
                              f"{bad[0][1]}")
        spread = float(np.median([im.std() for im, error in zip(images, errors) if not error]))
        if spread < FLAT_IMAGES_STD:
            flat.append(f"{key}: the sampled images are nearly uniform once read (pixel std {spread:.3f} on the "
                        f"[-1, 1] scale, median of {len(rows) - len(bad)}): images of more than 8 bits are read on "
                        f"their type's whole range, so 10- or 12-bit values in 16-bit files come out nearly "
                        f"black, float values beyond 1 white (README, data.channels)")
        sampled, unreadable = sampled + len(rows), unreadable + bad
    return sampled, unreadable, flat


def missing_files(config: PipelineConfig, table) -> dict[str, list[str]]:
    """Dataset key -> the files its manifest lists that do not exist, every row checked (a stat each): the
    sample `sample_images` decodes misses a few missing files among many, which extract stops on after
    the training stages have run. An image folder lists only files it found."""
    datasets = [("data.train", config.data.train)] + [(f"data.ood[{i}] ({d.name!r})", d)
                                                      for i, d in enumerate(config.data.ood)]
    out = {}
    for key, spec in datasets:
        if spec.source == "manifest":
            rows = table.frame[table.frame["domain"] == spec.name]
            gone = [path for path in rows["path"] if not os.path.isfile(path)]
            if gone:
                out[key] = gone
    return out


def check_init_from(config: PipelineConfig) -> None:
    """A `pretrain.init_from` U-Net that does not fit the images or has a noise schedule sweep does not train:
    ConfigError before any stage (the pretrain stage found it only after the stages before it)."""
    if config.pretrain.init_from:
        from sweep.stages.pretrain import init_from_problem

        problem = init_from_problem(config)
        if problem:
            raise ConfigError(problem)


def cmd_validate(config: PipelineConfig) -> None:
    from sweep.data.table import build_table, data_warnings, same_file_warning
    from sweep.encoders.checks import check_encoder_settings
    from sweep.stages.common import check_ray, ray_address
    from sweep.tracking import TrackingServerUnreachable, check_server, check_tracking, configured_uri

    check_tracking(config)
    check_encoder_settings(config)
    check_init_from(config)
    if not ray_address(config):  # a cluster's address is checked where it is used: it may answer only there
        check_ray(config)
    table = build_table(config)
    sampled, unreadable, flat = sample_images(config, table)
    print(f"{config.name}: valid (config hash {config.config_hash()})")
    print(f"  data: {table.summary()}")
    for warning in data_warnings(config, table) + [same_file_warning(table)]:
        if warning:
            print(f"  data: warning: {warning}")
    print(f"  images: {len(unreadable)} of {sampled} sampled unreadable"
          + (f" (e.g. {unreadable[0][0]}: {unreadable[0][1]}); `sweep extract` skips and lists each one"
             if unreadable else " (the stages skip, count and list any they meet)"))
    for warning in flat:
        print(f"  images: warning: {warning}")
    missing = missing_files(config, table)
    for key, gone in missing.items():
        print(f"  images: warning: {key}: {len(gone):,} of the files its manifest lists do not exist (e.g. "
              f"{gone[0]}); the stages skip them as unreadable")
    total, allowed = len(table.frame), config.extract.max_bad_fraction
    # the sample's unreadable files and the missing ones are there whatever the rest holds: past the limit of
    # all the images extract stops; below it the sample only estimates (1 bad file of 64 sampled from 481 is
    # 2 % of the sample but 0.2 % of the images, which extract allows)
    known = len({f for f, _ in unreadable} | {f for gone in missing.values() for f in gone})
    if len(unreadable) > allowed * sampled or known > allowed * total:
        certain = known > allowed * total
        what = (f"{len(unreadable) / sampled:.0%} of the sample is unreadable" if len(unreadable) > allowed * sampled
                else f"{known:,} of the {total:,} images are missing or unreadable")
        print(f"  images: warning: {what}, more than extract.max_bad_fraction={allowed} allows: extract "
              + ("would stop" if certain else
                 f"may stop (it allows {int(allowed * total):,} of the {total:,} images; the sample cannot tell)")
              + " (fix or remove the files, or raise the fraction)")
    shown = table.classes[:VALIDATE_CLASSES_SHOWN]  # 200 names made one line of 4 kB
    print(f"  classes: {', '.join(shown)}" + (f", ... ({len(table.classes) - len(shown)} more)"
                                             if len(shown) < len(table.classes) else ""))
    print(f"  encoders: {', '.join(s.name for s in config.encoder_specs())}; "
          f"timesteps {config.extract.timesteps}; layers {config.extract.layers}")
    from sweep.encoders.checks import planned_columns

    columns, q = planned_columns(config), config.probe
    known = sum(n for n in columns.values() if n is not None)
    print(f"  probe: {'at least ' if None in columns.values() else ''}{known} trials, one per feature column ("
          + ", ".join(f"{name} {n if n is not None else 'not known before extraction'}" for name, n in columns.items())
          + f"), {q.heads_each()}, {q.epochs} epochs")
    if not any(config.probe.weight_decays):
        # measured on 196-dim Fashion-MNIST pixels of 240 training images: heads at weight decay 0 alone, test
        # accuracy 0.27; with the default grid (weight decay 1e-2 chosen) 0.74, scikit-learn at C=1e4 0.73
        print("  probe: warning: probe.weight_decays are all 0 (no penalty): on a column with more dimensions "
              "than training images the classes separate exactly, unpenalised heads grow without bound and can "
              "score far below penalised ones; add a weight decay (the default grid is [0, 1e-4, 1e-2])")
    if config.pretrain.warmup_steps >= config.pretrain.steps:  # a quick `--set pretrain.steps=5` keeps warm-up 20
        p = config.pretrain
        print(f"  pretrain: warning: pretrain.warmup_steps ({p.warmup_steps}) >= pretrain.steps ({p.steps}): the lr "
              f"rises for the whole run to {p.steps / max(p.warmup_steps, 1):.0%} of pretrain.lr ({p.lr:g}) and never "
              f"decays: set warmup_steps below steps")
    from sweep.stages.report import budget_gap, planned_budgets

    budgets = planned_budgets(config, int((table.frame["split"] == "train").sum()))
    if len(budgets):  # what "comparable budgets" asks, before hours of training
        print("  budgets: " + "; ".join(f"{r.encoder} {r.plan} = {r.images_seen:,} training images"
                                        for r in budgets.itertuples()))
        gap = budget_gap(budgets, saw="would see")
        if gap:
            print(f"  budgets: warning: {gap}")
    from sweep.storage import bucket_problem, is_remote

    try:  # a warning: a cluster's storage path (or its bucket's credentials) may exist only on the cluster
        check_local_storage(config, create=False)
        problem = bucket_problem(config.storage_root) if is_remote(config.storage_root) else None
        if problem:
            print(f"  storage: warning: {config.storage_root}: {problem} (from here; the stages would fail)")
        else:
            print(f"  storage: {config.storage_root}")
    except ConfigError as e:
        print(f"  storage: warning: {str(e).removeprefix('storage: ')} (here; the stages would stop at once)")
    uri = configured_uri(config)
    try:  # a cluster's server may answer only from the cluster: said, not an error
        if uri:
            check_server(uri)
        print(f"  tracking: {uri or 'the default SQLite store, <storage>/mlflow.db'}{sqlite_file_note(uri or '')}")
    except TrackingServerUnreachable as e:
        print(f"  tracking: warning: {e}")


def sqlite_file_note(uri: str) -> str:
    """The file a `sqlite:///` URI opens where it is not the path as written: SQLAlchemy decodes `%XX` and
    ends the path at a `?` (a study folder "Plankton 50% ?" written as is put the store in another file)."""
    from sweep.tracking import sqlite_path

    path = sqlite_path(uri)
    if path is None or str(path) == uri.removeprefix("sqlite:///"):
        return ""
    advice = ("; a URI's path is percent-decoded and ends at '?': where '%' or '?' are part of the path, write "
              "them as %25 and %3F") if "?" in uri else ""  # a '%XX' may be meant: the file named says which
    return f" (the SQLite file {path}{advice})"


def check_local_storage(config: PipelineConfig, create: bool) -> None:
    """A local `storage` folder must be one this process can write: created now with `create` (the stages
    would create it), else (`validate`) its nearest existing folder must take a new folder (one is made and
    removed). ConfigError naming it."""
    from sweep.storage import Storage, is_remote

    root = config.storage_root
    if is_remote(root):
        return
    path = Path(Storage.of(root).root)  # `~/x` and `file:///x` as the stages read them, not folders `~`, `file:` here
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a folder")
        os.rmdir(tempfile.mkdtemp(prefix=".sweep-write-check-", dir=existing))  # root passes os.access anywhere
    except OSError as e:
        raise ConfigError(f"storage: cannot create or write {root}: {e.strerror or e}") from None


def failure_line(e: BaseException, config: PipelineConfig | None) -> str:
    """The one line `main` prints for an unexpected failure `e` (exit 1)."""
    from sweep.stages.common import one_line

    # Ray's authentication error is its fix: the token's places and RAY_AUTH_MODE, on its later lines
    shown = f"{type(e).__name__}: {' '.join(str(e).split())}" if type(e).__name__ == "AuthenticationError" \
        else one_line(e)
    if config is not None:
        # "database disk image is malformed" named no database: the MLflow store it came from. MLflow's
        # client wraps the SQL error; its first line was "(raised as a result of Query-invoked autoflush"
        from sweep.tracking import database_cause, tracking_uri

        cause = database_cause(e)
        if cause:
            shown = f"{cause} (MLflow tracking store {tracking_uri(config)})"
    return shown


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = None
    try:
        # a job's data and checkpoints need exist only on the cluster; the job checks them there
        config = load_config(args.pipeline, args.overrides, check_local_paths=args.command != "submit")
        if args.command == "run" or args.command in STAGES:
            from sweep.tracking import check_tracking

            check_tracking(config, reach_server=True)  # before any stage: a dead server fails now, not later
            from sweep.stages.common import check_ray

            stages = args.stages if args.command == "run" else [args.command]
            # resources a local Ray never has, a cluster that does not answer: now, not later
            check_ray(config, stages)
            # a wrong layer name or a weights file that does not fit its arch: now, not after pretraining
            if {"baselines", "extract"} & set(stages):
                from sweep.encoders.checks import check_encoder_settings

                check_encoder_settings(config, stages)
            if "pretrain" in stages:
                check_init_from(config)
            check_local_storage(config, create=True)  # last: a config error leaves no storage behind
            from sweep.storage import storage_lock

            with storage_lock(config.storage_root, " ".join(["sweep", *(argv or sys.argv[1:])])), \
                    _CtrlC.remembered():
                ray_was_up = _ray_up()
                if args.command == "baselines":  # not through cmd_run, which leaves it out when none are configured
                    run_stage(config, "baselines")
                else:
                    cmd_run(config, stages, whole_study=args.command == "run" and stages == list(STAGES))
                if not ray_was_up and _ray_up():
                    # here rather than at exit: a Ctrl-C during it ended in a 20-line atexit traceback and status 0
                    sys.modules["ray"].shutdown()
                _CtrlC.check()
        elif args.command == "best":
            cmd_best(config, args)
        elif args.command == "validate":
            cmd_validate(config)
        elif args.command == "submit":
            from sweep.submit import check_job_storage, submit

            check_job_storage(config)

            return submit(args.pipeline, args.address, args.stages, args.overrides, wait=not args.no_wait)
        return 0
    except ArgumentError as e:
        print(f"sweep: invalid argument: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        message = str(e)
        if args.pipeline not in message:  # found after loading (layers, images): the file as loading names it
            message = f"{args.pipeline}: {message}"
        print(f"sweep: invalid config: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `sweep best ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 1
    except KeyboardInterrupt:
        print("sweep: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user; SWEEP_DEBUG=1 for the traceback
        if os.environ.get("SWEEP_DEBUG", "0") not in ("", "0"):
            raise
        print(f"sweep: {failure_line(e, config)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
