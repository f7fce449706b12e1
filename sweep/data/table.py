"""The study's one image table: every image of the main and OOD datasets with its label, split and domain.

Pure pandas/numpy. Splits are stratified per class with a generator seeded from (seed, class), so adding a
class or an image elsewhere never reshuffles the rest.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sweep.config import ConfigError, PipelineConfig, TrainDataset
from sweep.data.sources import scan

SPLITS = ("train", "val", "test")


@dataclass
class ImageTable:
    """`frame` columns: image_id, path, index, label (int32), split, domain."""

    frame: pd.DataFrame
    classes: list[str]
    # images left out because their class is not a training class: image_id, domain, split, class_name
    left_out: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        columns=["image_id", "domain", "split", "class_name"]))
    # what a dataset's scan passed over, not being images: domain -> [(reason, count, example path)]
    ignored: dict[str, list[tuple[str, int, str]]] = field(default_factory=dict)

    @property
    def excluded(self) -> dict[str, dict[str, int]]:
        """domain -> unknown class -> images left out."""
        return {domain: group["class_name"].value_counts().sort_index().to_dict()
                for domain, group in self.left_out.groupby("domain", sort=False)}

    def summary(self) -> str:
        parts = []
        for domain, group in self.frame.groupby("domain", sort=False):
            counts = group["split"].value_counts()
            parts.append(f"{domain}: " + ", ".join(f"{s} {counts[s]}" for s in (*SPLITS, "ood") if s in counts))
        line = f"{len(self.frame)} images, {len(self.classes)} classes ({'; '.join(parts)})"
        for domain, unknown in self.excluded.items():
            n = sum(unknown.values())
            largest = sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0]))  # which ones: a typo, a class in val only
            named = ", ".join(f"{c} {k}" for c, k in largest[:5]) + (", ..." if len(largest) > 5 else "")
            line += (f"; {domain}: {n} image(s) of {len(unknown)} class(es) unknown to training left out: {named}"
                     f"{case_hint(unknown, self.classes)}")
        return line


def case_hint(names, classes: list[str]) -> str:
    """" (class names match exactly: 'tripos' is not 'Tripos')" where a class name differs from a training
    class only in case, else ""."""
    lower = {c.lower(): c for c in classes}
    pairs = [(n, lower[n.lower()]) for n in names if n not in classes and n.lower() in lower]
    return (f" (class names match exactly: {', '.join(f'{n!r} is not {c!r}' for n, c in pairs[:3])})"
            if pairs else "")


def _rng(seed: int, *keys: str) -> np.random.Generator:
    digest = hashlib.blake2b(":".join([str(seed), *keys]).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _stratified_sample(frame: pd.DataFrame, per_class: int, seed: int, key: str) -> pd.DataFrame:
    keep = []
    for name, idx in frame.groupby("class_name", sort=True).indices.items():
        if len(idx) > per_class:
            idx = np.sort(_rng(seed, key, name).choice(idx, per_class, replace=False))
        keep.append(idx)
    return frame.iloc[np.sort(np.concatenate(keep))].reset_index(drop=True)


def _limit(frame: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """Keep about `limit` images, each class its share rounded (at least one image): up to one per class
    over `limit`. (Kept so: trimming the total would change the images of every study made with a limit.)"""
    if limit is None or len(frame) <= limit:
        return frame
    keep = []
    for name, idx in frame.groupby("class_name", sort=True).indices.items():
        n = max(1, round(len(idx) * limit / len(frame)))
        keep.append(np.sort(_rng(seed, "limit", name).choice(idx, min(n, len(idx)), replace=False)))
    return frame.iloc[np.sort(np.concatenate(keep))].reset_index(drop=True)


def stratified_split(class_names: pd.Series, val: float, test: float, seed: int) -> np.ndarray:
    """Split labels per class: round(n*test) test, round(n*val) val, the rest (at least one) train."""
    split = np.empty(len(class_names), dtype=object)
    for name, idx in class_names.groupby(class_names, sort=True).indices.items():
        order = _rng(seed, "split", str(name)).permutation(idx)
        n = len(order)
        n_test = min(round(n * test), max(n - 1, 0))
        n_val = min(round(n * val), max(n - 1 - n_test, 0))
        split[order[:n_test]] = "test"
        split[order[n_test: n_test + n_val]] = "val"
        split[order[n_test + n_val:]] = "train"
    return split


def _read_split_file(path: str, known: set[str]) -> list[str]:
    """The image ids of a split file: one `IMAGE_ID [LABEL]` per line. Ids and labels may hold spaces (a
    class folder `Chaetoceros spp`): a line's id is its longest start, cut at a space, that is an id of
    the dataset (else its first field, which the caller reports as unknown); a tab always ends the id."""
    ids = []
    for line in Path(path).read_text(encoding="utf-8-sig").splitlines():
        line = line.split("\t")[0].strip()
        if not line or line.startswith("#"):
            continue
        cuts = [m.start() for m in re.finditer(r"\s+", line)]
        starts = (line[:cut] for cut in [len(line), *reversed(cuts)])
        ids.append(next((i for i in starts if i in known), line.split()[0]))
    return ids


def _id_form_hint(unknown: str, known: set[str]) -> str:
    """What the dataset's ids look like, and the id an unknown one probably means: the same file named by an
    absolute path, without its class folder or with another suffix."""
    if not known:
        return ""
    u = unknown.replace("\\", "/")
    for k in sorted(known):
        if u.endswith("/" + k) or k.endswith("/" + u) or os.path.splitext(k)[0] == os.path.splitext(u)[0]:
            return f" (the dataset's id for it is probably {k!r})"
    return f" (the dataset's ids look like {min(known)!r}: image paths as the dataset's folder or manifest names them)"


def _assign_splits(frame: pd.DataFrame, spec: TrainDataset, seed: int, where: str) -> pd.DataFrame:
    splits = spec.splits
    if splits.from_files:
        members: dict[str, str] = {}
        known = set(frame["image_id"])
        for name in ("train", "val", "test"):
            f = getattr(splits, name)
            if f is None:
                continue
            for image_id in _read_split_file(f, known):
                if image_id in members and members[image_id] != name:
                    raise ConfigError(f"{where}.splits: {image_id!r} is in both {members[image_id]} and {name}")
                members[image_id] = name
        unknown = [i for i in members if i not in known]
        if unknown:
            raise ConfigError(f"{where}.splits: {len(unknown)} listed image(s) are not in the dataset, e.g. "
                              f"{unknown[0]!r}{_id_form_hint(unknown[0], known)}")
        default = "train" if splits.train is None else None
        frame = frame.assign(split=frame["image_id"].map(members).fillna(default) if default else
                             frame["image_id"].map(members))
        return frame[frame["split"].notna()].reset_index(drop=True)
    official = frame["official_split"]
    given = set(official) if official.notna().all() else set()
    if {"val", "test"} <= given:
        return frame.assign(split=official)  # a manifest that names every split: kept as given
    if given in ({"train", "test"}, {"train", "val"}):
        # a source with an official test set (Fashion-MNIST, a manifest) keeps it and val is drawn from its
        # train part; a manifest's val split likewise, with test drawn from train
        split = official.to_numpy(dtype=object).copy()
        is_train = split == "train"
        val, test = (splits.val, 0.0) if "test" in given else (0.0, splits.test)
        split[is_train] = stratified_split(frame.loc[is_train, "class_name"], val, test, seed)
        return frame.assign(split=split)
    return frame.assign(split=stratified_split(frame["class_name"], splits.val, splits.test, seed))


def unbalanced_classes(config: PipelineConfig, table: ImageTable) -> dict[str, int]:
    """Under `regime: balanced`, the training classes with fewer images than `per_class` (all of theirs kept):
    class -> images. Empty otherwise."""
    spec = config.data.train
    if spec.regime != "balanced":
        return {}
    main = table.frame[table.frame["domain"] == spec.name]
    counts = main["label"].value_counts()
    return {table.classes[label]: int(n) for label, n in sorted(counts.items()) if n < spec.per_class}


def unbalanced_warning(config: PipelineConfig, table: ImageTable) -> str | None:
    short = unbalanced_classes(config, table)
    if not short:
        return None
    shown = ", ".join(f"{c} {n}" for c, n in list(short.items())[:5]) + (", ..." if len(short) > 5 else "")
    smallest, fewest = min(short.values()), _fewest_per_class(config.data.train.splits)
    advice = (f"lower data.train.per_class to {smallest} for equal classes" if smallest >= fewest else
              f"equal classes of {smallest} would leave val or test empty: the split fractions need {fewest} per "
              f"class; leave out the smallest classes, or use regime natural with probe.class_weights: balanced")
    return (f"data.train: regime balanced with per_class {config.data.train.per_class}, but {len(short)} class(es) "
            f"have fewer images ({shown}): they keep all of theirs, so the classes are not balanced ({advice})")


def _fewest_per_class(splits) -> int:
    """The fewest images a class needs for one val and one test image under fraction splits (as
    `stratified_split` splits a class of that many); 1 where the splits come from files."""
    val, test = splits.val, splits.test
    if not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in (val, test)):
        return 1
    for n in range(1, 1000):
        got = set(stratified_split(pd.Series(["c"] * n), val, test, 0))
        if ("test" in got or not test) and ("val" in got or not val):
            return n
    return 1000


def unscored_classes(config: PipelineConfig, table: ImageTable) -> dict[str, dict[str, int]]:
    """Training classes with no image in the main dataset's val or test split (too few images for the split
    fractions): split -> {class: images it has in all}. Such a class is not scored there (macro F1 and
    balanced accuracy average over the classes a split has)."""
    main = table.frame[table.frame["domain"] == config.data.train.name]
    totals = main["label"].value_counts()
    out = {}
    for split in ("val", "test"):
        present = set(main.loc[main["split"] == split, "label"])
        if (main["split"] == split).any() and len(present) < len(table.classes):
            out[split] = {table.classes[c]: int(totals.get(c, 0)) for c in range(len(table.classes))
                          if c not in present}
    return out


def _names(names: list[str], shown: int = 10) -> str:
    """"N class(es): 'a', 'b', ..." naming at most `shown`."""
    return (f"{len(names)} class(es): {', '.join(repr(n) for n in names[:shown])}"
            f"{', ...' if len(names) > shown else ''}")


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def unscored_warning(config: PipelineConfig, table: ImageTable) -> str | None:
    # how many of how many classes: with hundreds of classes the 5 named alone hide whether it is 6 or 150
    parts = [f"no {split} image for {len(missing)} of {len(table.classes)} classes: "
             f"{', '.join(f'{c} ({n} image{_s(n)})' for c, n in list(missing.items())[:5])}"
             f"{', ...' if len(missing) > 5 else ''}" for split, missing in unscored_classes(config, table).items()]
    if not parts:
        return None
    return (f"data.train: {'; '.join(parts)}: such classes are trained on but not scored there (macro F1 and "
            f"balanced accuracy average over the classes a split has); more images or larger "
            f"data.train.splits fractions give them some")


def case_warning(table: ImageTable) -> str | None:
    """Training classes whose names differ only in case ('Tripos' and 'tripos'): most likely one class
    spelled two ways, which the probes would learn to tell apart."""
    by_lower: dict[str, list[str]] = {}
    for c in table.classes:
        by_lower.setdefault(c.casefold(), []).append(c)
    groups = [names for names in by_lower.values() if len(names) > 1]
    if not groups:
        return None
    shown = "; ".join(" / ".join(repr(n) for n in names) for names in groups[:5])
    return (f"data.train: {len(groups)} group(s) of class names differ only in case ({shown}"
            f"{'; ...' if len(groups) > 5 else ''}): each is a class of its own; if they are one, spell them alike")


def ignored_warning(table: ImageTable) -> str | None:
    """What the scan of an image folder passed over, by reason, with an example each."""
    parts = [f"{domain}: " + "; ".join(f"{count} {reason} (e.g. {example!r})" for reason, count, example in found)
             for domain, found in table.ignored.items() if found]
    return f"not read as images: {' | '.join(parts)}" if parts else None


def same_file_warning(table: ImageTable) -> str | None:
    """Files the table lists more than once under other paths (a link to an image, a linked folder): each is
    read as often as listed, under each label and split, so one in train and in test scores the probes on an
    image they trained on. A realpath per file: `validate` only, not every stage."""
    real = table.frame["path"].map(os.path.realpath)
    if not real.duplicated().any():
        return None
    repeated = table.frame[real.duplicated(keep=False)].assign(
        real=real, class_name=lambda f: [table.classes[int(label)] for label in f["label"]])
    groups = list(repeated.groupby("real", sort=True))
    where = [{(d, s) for d, s in zip(g["domain"], g["split"])} for _, g in groups]
    leak = sum(len(w) > 1 for w in where)
    relabelled = sum(g["class_name"].nunique() > 1 for _, g in groups)
    _, first = next(((k, g) for (k, g), w in zip(groups, where) if len(w) > 1), groups[0])
    example = " and ".join(f"{p} ({c}, {d} {s})" for p, c, d, s in
                           first[["path", "class_name", "domain", "split"]].head(2).itertuples(index=False))
    return (f"{len(groups)} file(s) are listed under more than one path (links), {len(repeated)} rows in all: each "
            f"is read once per path; {leak} of them in more than one split or dataset, {relabelled} under more "
            f"than one class (e.g. {example} are one file)")


def data_warnings(config: PipelineConfig, table: ImageTable) -> list[str]:
    """What `validate` and `extract` warn about the image table: unequal classes under `regime: balanced`,
    training classes with no val or test image, class names that differ only in case, files of an image
    folder passed over."""
    return [w for w in (unbalanced_warning(config, table), unscored_warning(config, table), case_warning(table),
                        ignored_warning(table), over_limit_warning(config, table)) if w]


def over_limit_warning(config: PipelineConfig, table: ImageTable) -> str | None:
    """`data.train.limit` kept well over the limit: each class keeps at least one image (README), so with
    hundreds of small classes a limit of 300 kept 374 images, said nowhere."""
    spec = config.data.train
    kept = int((table.frame["domain"] == spec.name).sum())
    if spec.limit is None or kept <= 1.1 * spec.limit:
        return None
    return (f"data.train.limit={spec.limit} keeps {kept:,} images: each of the {len(table.classes)} classes keeps at "
            f"least one image, so the total exceeds the limit by up to one image per class")


def training_images(table: ImageTable) -> dict:
    """What a model trains on, recorded with it so that a later run can tell when the images changed: the
    train split's image count, a fingerprint of its image ids and one of its (image id, class) pairs."""
    train = table.frame[table.frame["split"] == "train"].sort_values("image_id")
    ids = train["image_id"].astype(str).tolist()
    classes = [table.classes[label] for label in train["label"]]

    def digest(lines) -> str:
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]

    return {"images": len(ids), "ids": digest(ids), "labels": digest(f"{i}\t{c}" for i, c in zip(ids, classes))}


def build_table(config: PipelineConfig) -> ImageTable:
    """Scan every dataset of the pipeline, split the main one, match OOD labels to training classes."""
    spec = config.data.train
    frame = scan(spec, "data.train")
    ignored = {spec.name: frame.attrs.get("ignored", [])}
    frame = _limit(frame, spec.limit, config.seed)
    if spec.regime == "balanced":
        frame = _stratified_sample(frame, spec.per_class, config.seed, "balanced")
    frame = _assign_splits(frame, spec, config.seed, "data.train")
    if not (frame["split"] == "val").any():  # every probe, and the supervised baseline, choose on val
        per_class = frame.groupby("class_name").size()
        raise ConfigError(
            f"data.train: the val split is empty ({len(frame)} images, {per_class.min()} to {per_class.max()} per "
            f"class{f', regime balanced with per_class {spec.per_class}' if spec.regime == 'balanced' else ''}); "
            f"the probes choose their heads on it: give it images (data.train.splits.val, or more per class)")
    if not (frame["split"] == "test").any():  # every probe and baseline is scored on it, the report reads it
        raise ConfigError(
            f"data.train: the test split is empty ({len(frame)} images); the probes are scored on it: give it "
            f"images (data.train.splits.test, a test split file, or test rows in a manifest's split column)")
    classes = sorted(frame.loc[frame["split"] == "train", "class_name"].unique())
    if len(classes) < 2:
        hint = (f" ({classes[0]!r}: if that is the folder of the class folders, point data.train.path at it)"
                if classes and spec.source == "imagefolder" else "")
        raise ConfigError(f"data.train: the train split holds {len(classes)} class(es){hint}; a probe needs at "
                          f"least 2")
    label_of = {c: i for i, c in enumerate(classes)}
    frames = [frame.assign(domain=spec.name)]
    for i, ood in enumerate(config.data.ood):
        other = scan(ood, f"data.ood.{i}")
        ignored[ood.name] = other.attrs.get("ignored", [])
        other = _limit(other, ood.limit, config.seed)
        if not other["class_name"].isin(label_of).any():
            # a few names of each side: with hundreds of training classes the whole list ran to kilobytes and
            # never said what the OOD set's own classes are called
            theirs = sorted(other["class_name"].unique())
            raise ConfigError(f"data.ood.{i}: no image of {ood.name!r} belongs to a training class (its "
                              f"{_names(theirs)}; training's {_names(classes)})"
                              f"{case_hint(theirs, classes)}")
        frames.append(other.assign(split="ood", domain=ood.name))
    # classes absent from train (of an OOD set, or in val/test only) cannot be predicted: left out, counted
    table = pd.concat(frames, ignore_index=True)
    unknown = ~table["class_name"].isin(label_of)
    left_out = table.loc[unknown, ["image_id", "domain", "split", "class_name"]].reset_index(drop=True)
    table = table[~unknown].copy()
    table["label"] = table["class_name"].map(label_of).astype("int32")
    table = table[["image_id", "path", "index", "label", "split", "domain"]].reset_index(drop=True)
    return ImageTable(frame=table, classes=classes, left_out=left_out,
                      ignored={domain: found for domain, found in ignored.items() if found})
