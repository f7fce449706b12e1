"""Paths under the storage root (a contract: see DESIGN.md "Storage layout"), local or `s3://…`.

Everything is addressed through `pyarrow.fs`, so a local folder and a bucket behave the same; a write that
must never be seen half-done goes to a temporary name first and is renamed when complete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs


def _absolute(uri: str) -> str:
    if uri.startswith("file://"):  # a local folder as a URI: its path, percent-decoded as pyarrow reads it
        uri = file_path(uri)
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def file_path(uri: str) -> str:
    """The local path a `file://` URI names (`file:///a/My%20Studies` -> `/a/My Studies`); other text as is.
    Cutting the scheme off left `%20` in the path: with storage `file:///a/My%20Studies` the lock and the
    SQLite store went to `My%20Studies`, pyarrow's writes (features, checkpoints) to `My Studies`."""
    if not uri.startswith("file://"):
        return uri
    from urllib.parse import unquote, urlsplit

    return unquote(urlsplit(uri).path)


def tagged_root(tag: str | None) -> str | None:
    """A run's storage tag as `Storage.of(...).root` gives it today: runs made before a `file://` storage was
    read as its folder are tagged with the URI, and compared as written they looked like another storage's."""
    return _absolute(tag) if isinstance(tag, str) and tag.startswith("file://") else tag


PRETRAIN_MARKER = "sweep_pretrain.json"  # in pretrain/final, written last: the U-Net there is complete
LOCK_FILE = ".sweep.lock"  # in a local storage root: held by the command writing there


class StorageBusy(RuntimeError):
    """Another sweep command is writing to the same storage."""


def _lock_path(root: str) -> Path:
    """The lock file of a local storage (a `file://` or `~` root: its folder, not a folder "file:" or "~" here)."""
    return Path(_absolute(root)) / LOCK_FILE


@contextlib.contextmanager
def storage_lock(root: str, command: str):
    """Hold the local storage `root` for one command (an exclusive `flock` on its lock file, released by the
    OS however the process ends); StorageBusy naming the holder when another command has it. Two commands in
    one storage trained into the same checkpoint folder (one deleted the other's checkpoints), logged every
    step twice and recorded every probe trial twice. Remote storage has no such lock: one writer there."""
    import fcntl
    import socket
    import time

    if is_remote(root):
        yield
        return
    path = _lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise StorageBusy(f"storage {root} is in use by another sweep command ({holder}): wait for it to end, or "
                          f"use another storage (--set storage=PATH)") from None
    try:
        f.seek(0)
        f.truncate()
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, `{command}`, since {since}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


def storage_in_use(root: str) -> bool | None:
    """Whether a sweep command holds the local storage `root` now (`storage_lock`), read from the kernel's
    table of locks without taking the lock (a probe of it would make a command starting at that moment
    find the storage busy); None where that cannot be told (remote storage, no /proc/locks)."""
    if is_remote(root) or not os.path.isfile("/proc/locks"):
        return None
    path = _lock_path(root)
    if not path.is_file():
        return False
    st = path.stat()
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:  # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:3146243 0 EOF"
            return any(len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode
                       for fields in (line.split() for line in f))
    except OSError:
        return None


@dataclass(frozen=True)
class Storage:
    root: str  # absolute local path or URI

    @classmethod
    def of(cls, uri: str) -> "Storage":
        return cls(_absolute(uri))

    @property
    def is_local(self) -> bool:
        return not is_remote(self.root)

    def uri(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def local(self, *parts: str) -> Path:
        """A local path; only where one is needed (the default SQLite MLflow store): ValueError for remote
        storage."""
        if not self.is_local:
            raise ValueError(f"{self.root} is not a local folder")
        return Path(file_path(self.root), *parts)

    # the layout ---------------------------------------------------------------------------------
    @property
    def pretrain_final(self) -> str:
        """The pretrained U-Net; finished when it holds PRETRAIN_MARKER (written last)."""
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


def bucket_problem(uri: str) -> str | None:
    """Why the bucket of a remote `uri` cannot be used from here (missing, no access, no answer), or None.
    A stage found out only when it first wrote, after seconds of retries, with pyarrow's advice to "enable
    the allow_bucket_creation option", which a pipeline cannot."""
    try:
        fs, path = _split(uri)
        bucket = path.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            return f"bucket {bucket!r} does not exist (or these credentials cannot see it)"
    except (OSError, ValueError) as e:
        return str(e).strip().splitlines()[0]
    return None


class DamagedFileError(ValueError):
    """A file sweep wrote (a manifest, a marker) that no longer reads as JSON; the message names it."""


def read_json(uri: str) -> dict | None:
    fs, path = _split(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        data = f.read()
    try:
        return json.loads(data.decode())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: the bare error named no file
        raise DamagedFileError(f"{uri} is damaged (not valid JSON: {e}); restore it, or delete it and "
                               f"what it describes to have that made again") from None


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_durably(fs: pafs.FileSystem, tmp: str, path: str) -> None:
    """Rename the finished file `tmp` to `path`. On a local disk its data reach the disk first and the rename
    after (fsync of the file, then of the folder): after a power cut or a crash of the machine, a file under
    its final name is whole (the rename alone could leave it empty, and the manifest or marker naming it says
    complete). An object store's upload is whole or absent by itself."""
    if isinstance(fs, pafs.LocalFileSystem):
        _fsync(tmp)
    fs.move(tmp, path)
    if isinstance(fs, pafs.LocalFileSystem):
        _fsync(path.rsplit("/", 1)[0] or "/")


# the errno of a write the storage refused: full, read-only, over quota, past a file size limit
REFUSED_WRITE = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}


class WriteError(OSError):
    """A file of the storage could not be written; the message names it and the cause."""

    def __str__(self) -> str:
        return self.strerror

    @classmethod
    def of(cls, e: OSError, where: str) -> "WriteError":
        cause = os.strerror(e.errno) if e.errno else str(e).strip().splitlines()[0]
        return cls(e.errno, f"cannot write {where}: {cause}")


@contextlib.contextmanager
def writing(fs: pafs.FileSystem, path: str, tmp: str | None = None):
    """Around the writing of `path` (through `tmp`): an OSError becomes a WriteError naming the file and the
    cause (pyarrow's 'Error writing bytes to file. Detail: [errno 28] No space left on device' named neither
    the file nor the storage), and the unfinished `tmp` is removed (a full disk needs its space back)."""
    try:
        yield
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                fs.delete_file(tmp)
        raise WriteError.of(e, path if isinstance(fs, pafs.LocalFileSystem) else f"{fs.type_name}://{path}") from e


def write_atomic(uri: str, data: bytes) -> None:
    """Write to a temporary sibling, then rename: readers see the old file or the whole new one."""
    fs, path = _split(uri)
    parent = path.rsplit("/", 1)[0]
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with writing(fs, path, tmp):
        fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        move_durably(fs, tmp, path)


def write_json(uri: str, obj: dict) -> None:
    write_atomic(uri, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def upload_dir(local: str | os.PathLike, uri: str) -> None:
    fs, path = _split(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, destination_filesystem=fs)


def is_remote(uri: str | os.PathLike) -> bool:
    uri = str(uri)
    return "://" in uri and not uri.startswith("file://")


def publish_dir(local: str | os.PathLike, uri: str, marker: str) -> None:
    """Make the finished local folder `local` the content of `uri`, so that a reader who finds `marker`
    there finds everything. Local: rename into place (atomic). Remote (no directory rename in object
    stores): clear `uri`, upload every other file, then `marker` last."""
    local = Path(local)
    if not (local / marker).is_file():
        raise FileNotFoundError(f"{local / marker}: the completion marker must exist before publishing")
    if not is_remote(uri):
        out = Path(file_path(uri))
        out.parent.mkdir(parents=True, exist_ok=True)
        for f in (p for p in local.rglob("*") if p.is_file()):  # on the disk before the folder is published
            _fsync(f)
        old = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
        if out.exists():
            out.rename(old)
        shutil.move(str(local), out)
        _fsync(out.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    fs, path = _split(uri)
    fs.delete_dir_contents(path, missing_dir_ok=True)
    staging = Path(local).with_name(f"{local.name}.upload-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        (local / marker).rename(staging / marker)
        upload_dir(local, uri)
        upload_dir(staging, uri)  # the marker alone, last
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(uri: str, marker: str):
    """A local folder to write a finished folder into; when the block ends without error it becomes the
    content of `uri` (`publish_dir`, `marker` last). Staged next to a local destination (the rename is then
    atomic), in a temporary folder for a remote one."""
    remote = is_remote(uri)
    tmp = Path(tempfile.mkdtemp()) / "final" if remote else Path(uri).with_name(Path(uri).name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        try:
            yield tmp
            if not remote:
                _default_permissions(tmp)
            publish_dir(tmp, uri, marker)
        except OSError as e:
            # matplotlib's or torch's "[Errno 28] No space left on device" named neither file nor folder
            if e.errno not in REFUSED_WRITE or isinstance(e, WriteError):
                raise
            raise WriteError.of(e, f"{tmp} (staging {uri})" if remote else uri) from e
    finally:
        shutil.rmtree(tmp.parent if remote else tmp, ignore_errors=True)


def _default_permissions(folder: Path) -> None:
    """Give the files written into `folder` the mode an ordinary file gets under this umask (read from the
    folder's own, made by mkdir): safetensors writes 0600, which hid the weights from everyone else on a
    shared storage folder."""
    mode = folder.stat().st_mode & 0o666
    for f in folder.rglob("*"):
        if f.is_file() and f.stat().st_mode & 0o777 != mode:
            f.chmod(mode)


def cache_root() -> Path:
    return Path(os.environ.get("SWEEP_CACHE", "~/.cache/sweep")).expanduser()


def fetch_dir(uri: str | os.PathLike) -> Path:
    """A local folder with the content of `uri`: the folder itself when local, else a copy downloaded once
    into the cache (`$SWEEP_CACHE`, default ~/.cache/sweep), keyed by the remote files' names, sizes and
    modification times so a republished checkpoint is fetched again."""
    uri = str(uri)
    if not is_remote(uri):
        return Path(file_path(uri))
    fs, path = _split(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = sorted((i.path[len(path):], i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    if not files:
        raise FileNotFoundError(f"nothing at {uri}")
    key = hashlib.sha256(repr((uri, files)).encode()).hexdigest()[:16]
    target = cache_root() / "remote" / key
    if target.is_dir():
        return target
    tmp = target.with_name(f"{key}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    try:
        tmp.rename(target)
    except OSError:  # another process fetched it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def checkpoint_hash(path: str | Path) -> str:
    """Content hash of a checkpoint folder (or single file): first 16 hex chars of a sha256.

    A folder hashes its sorted relative file paths with their contents, so a copy elsewhere hashes the same
    and any renamed, added or changed file changes it. Hidden entries (``.cache/`` written by
    ``huggingface_hub`` downloads, ``.DS_Store``) are skipped: they change without the weights changing.
    A single file hashes its contents only.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"checkpoint not found: {root}")
    h = hashlib.sha256()
    if root.is_file():
        files = [(root, "")]
    else:
        files = sorted(
            ((p, p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file()),
            key=lambda item: item[1],
        )
        files = [(p, rel) for p, rel in files if not any(part.startswith(".") for part in rel.split("/"))]
    for p, rel in files:
        # Length-prefix name and size so that (name, content) boundaries cannot be shifted between files.
        name = rel.encode()
        h.update(len(name).to_bytes(8, "little") + name + p.stat().st_size.to_bytes(8, "little"))
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
