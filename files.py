"""Files a run writes: atomic writes (temporary file, fsync, rename) and the exclusive lock on
an output folder, with the clean-up of temporaries that a killed run left behind."""
from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils import ToolError


# --------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``.

    If the body raises, the temporary file is removed and ``path`` keeps its old content. An
    ``OSError`` (a full disk, a quota, an I/O error) becomes a one-line :class:`ToolError`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise ToolError(f"cannot write to {path.parent} ({err.strerror}); "
                        "choose a writable folder with --out") from err
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files: give results the usual readable mode (or keep the old one)
        os.chmod(tmp_path, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644)
        os.replace(tmp_path, path)
    except BaseException as err:
        tmp_path.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_error(path, err) from err
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_error(path: Path, err: OSError) -> ToolError:
    """A failed write (disk full, quota, I/O error) as one line that says the old file is kept."""
    reason = err.strerror or str(err) or type(err).__name__
    fix = "free some disk space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "check the disk"
    kept = f"the previous {path.name} is kept" if path.exists() else f"no partial {path.name} was left"
    return ToolError(f"cannot write {path} ({reason}); {kept}; {fix} or choose another --out, then rerun")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` atomically, through a Python file object.

    Saving to a file name makes a full disk surface as an opaque ``RuntimeError`` from the zip
    writer. Through a file object the ``OSError`` (ENOSPC) of the failed write is raised, or
    chained to the zip writer's ``RuntimeError``; either way :func:`atomic_path` reports it.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        try:
            torch.save(obj, fh)
        except RuntimeError as err:
            cause = _chained_os_error(err)
            if cause is None:
                raise
            raise cause from err


def _chained_os_error(err: BaseException | None) -> OSError | None:
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON: an undefined score (NaN/inf) is written as ``null``."""
    text = json.dumps(_finite_or_none(obj), indent=2, default=_json_default, allow_nan=False)
    atomic_write_text(path, text + "\n")


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite_or_none(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(value) for value in obj]
    return obj


def atomic_write_csv(path: str | os.PathLike, rows: Sequence[dict], fieldnames: Sequence[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def atomic_savez(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """``numpy.savez_compressed`` atomically (plain arrays only: it loads without pickle)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def atomic_savefig(fig: Any, path: str | os.PathLike, **kwargs: Any) -> None:
    """Save a matplotlib figure atomically (format taken from the final name)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, **kwargs)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and make sure we can write into it, before any long work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ToolError(f"output folder {path} is not writable ({err.strerror}); "
                        "pass a writable folder with --out") from err
    return path


# --------------------------------------------------------------------------- output-folder lock
LOCK_NAME = ".lock"
#: Sub-folders the tools write into; stale temporaries are only removed there and in --out itself.
OUTPUT_SUBFOLDERS = ("checkpoints", "Images", ".sweep_state")
#: What :func:`atomic_path` names its temporaries: ``.<name>.<8 random characters>.tmp``.
STALE_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on the output folder ``folder`` for the body of the ``with``.

    The lock is an OS file lock (``flock``) on ``<folder>/.lock``, which holds the holder's pid.
    A second run into the same folder stops at once with a one-line error naming that pid. The
    OS drops the lock however the process ends (even on SIGKILL); a normal exit also removes
    the file. Once the lock is held no other run can be writing here, so temporaries left by
    killed writes are removed.
    """
    folder = check_writable_dir(folder)
    lock_path = folder / LOCK_NAME
    fd = _acquire_lock(lock_path)
    try:
        remove_stale_temps(folder)
        yield folder
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()  # while still locked: a waiting opener sees the inode change
        os.close(fd)


def _acquire_lock(path: Path) -> int:
    """Open and ``flock`` ``path``; retry if the holder removed it between our open and lock."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ToolError(f"output folder {path.parent} is not writable ({err.strerror}); "
                            "pass a writable folder with --out") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _lock_holder(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ToolError(f"output folder {path.parent} is in use by another run (pid {holder}); "
                                "wait for it to finish or choose another --out") from None
            raise ToolError(f"cannot lock output folder {path.parent} ({err.strerror}); "
                            "choose an --out on a local disk") from err
        if _is_same_file(fd, path):
            with contextlib.suppress(OSError):  # the pid is only for the message
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def _lock_holder(fd: int) -> str:
    """The pid written into a lock file by its holder ("unknown" if it has not written it yet)."""
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def _is_same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove temporaries of interrupted atomic writes in ``folder`` and its output sub-folders.

    Only call this while holding :func:`output_lock`: a live writer's temporary looks the same.
    """
    removed = []
    for where in (folder, *(folder / name for name in OUTPUT_SUBFOLDERS)):
        if not where.is_dir() or where.is_symlink():
            continue
        for entry in os.scandir(where):
            if STALE_TEMP.match(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed
