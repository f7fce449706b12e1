"""Paths under the storage root (a contract: see DESIGN.md "Storage layout"), local or `s3://…`.

Everything is addressed through `pyarrow.fs`, so a local folder and a bucket behave the same; a write that
must never be seen half-done goes to a temporary name first and is renamed when complete.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs


def _absolute(uri: str) -> str:
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


@dataclass(frozen=True)
class Storage:
    root: str  # absolute local path or URI

    @classmethod
    def of(cls, uri: str) -> "Storage":
        return cls(_absolute(uri))

    @property
    def is_local(self) -> bool:
        return "://" not in self.root or self.root.startswith("file://")

    @property
    def fs_and_base(self) -> tuple[pafs.FileSystem, str]:
        return pafs.FileSystem.from_uri(self.root)

    def uri(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def local(self, *parts: str) -> Path:
        """A local path; only for stages that must have one (e.g. `save_pretrained`)."""
        if not self.is_local:
            raise ValueError(f"{self.root} is not a local folder")
        return Path(self.root.removeprefix("file://"), *parts)

    # the layout ---------------------------------------------------------------------------------
    @property
    def pretrain_final(self) -> str:
        return self.uri("pretrain", "final")

    @property
    def pretrain_runs(self) -> str:
        return self.uri("pretrain")

    def baseline_final(self, name: str) -> str:
        return self.uri("baselines", name, "final")

    def features(self, encoder: str) -> str:
        return self.uri("features", encoder)

    @property
    def tune(self) -> str:
        return self.uri("tune")

    @property
    def report(self) -> str:
        return self.uri("report")


# small file helpers over pyarrow.fs ---------------------------------------------------------------

def _split(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(_absolute(uri))


def exists(uri: str) -> bool:
    fs, path = _split(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_json(uri: str) -> dict | None:
    fs, path = _split(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def write_atomic(uri: str, data: bytes) -> None:
    """Write to a temporary sibling, then rename: readers see the old file or the whole new one."""
    fs, path = _split(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def write_json(uri: str, obj: dict) -> None:
    write_atomic(uri, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def upload_dir(local: str | os.PathLike, uri: str) -> None:
    fs, path = _split(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, destination_filesystem=fs)
