"""Atomic outputs: a file or a folder is written under a temporary name beside its target and moved
into place only when complete, so a reader never sees half of it and a failure leaves nothing behind."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from mt.errors import MtError, OutputExists


def check_output(path: Path, force: bool, folder: bool = False) -> None:
    """`path` may be written (a file, or with `folder` a folder): free, or replaced with `force` (a folder is never
    replaced by a file: that rename would fail once the work is done)."""
    if not folder and path.is_dir():
        raise OutputExists(f"{path} is a folder", "give the name of the file to write")
    if path.exists() and not force:
        raise OutputExists(f"{path} exists", "pass --force to overwrite it")
    if not path.parent.is_dir():
        raise MtError(f"output folder {path.parent} does not exist", "create it first")
    _check_writable(path.parent)


def _check_writable(folder: Path) -> None:
    """A file can be created in `folder` (found before the work, not after it): a read-only folder or file system."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".mt-probe-")
    except OSError as e:
        raise MtError(f"cannot write in {folder} ({e.strerror or e})",
                      "write to a folder you may write in, or change its permissions") from None
    os.close(fd)
    os.unlink(probe)


PARTIAL_MARK = ".mt-partial-"
_OLD_MARK = ".mt-old-"


def partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{PARTIAL_MARK}{os.getpid()}")


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete what mt processes that no longer run left in `folder` (killed with SIGKILL, or by a power loss):
    `.NAME.mt-partial-PID` and `.NAME.mt-old-PID`. Returns what was removed."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        mark = PARTIAL_MARK if PARTIAL_MARK in entry.name else _OLD_MARK if _OLD_MARK in entry.name else None
        if mark is None or not entry.name.startswith("."):
            continue
        pid = entry.name.rsplit(mark, 1)[1]
        if pid.isdigit() and not _running(int(pid)):
            try:
                remove_path(entry)
                removed.append(entry)
            except OSError:
                pass  # another run is removing it, or it is not ours to remove
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


@contextmanager
def disk_full_is_an_error(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise MtError(f"disk full while writing {path}", "free space or write to another disk") from None
        raise


@contextmanager
def atomic_paths(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """Files that belong together (a GGUF and its companions; one file for `atomic_path`): each is written to its
    temporary path, and all are renamed into place only when every one is complete. A failed rename takes
    back the files the earlier renames created, so no new file is left behind alone."""
    tmps = [partial_path(p) for p in paths]
    for folder in {p.parent for p in paths}:
        remove_stale_partials(folder)
    try:
        with disk_full_is_an_error(paths[0]):
            yield tmps
            _replace_all(tmps, paths)
    finally:
        for tmp in tmps:
            if tmp.exists():
                tmp.unlink()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path in the target folder; rename it over `path` on success, delete it otherwise."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


def _replace_all(tmps: Sequence[Path], paths: Sequence[Path]) -> None:
    created: list[Path] = []
    try:
        for tmp, path in zip(tmps, paths):
            existed = path.exists()
            os.replace(tmp, path)
            if not existed:
                created.append(path)
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; move it to `path` on success (replacing what was
    there, which only then is deleted), delete it otherwise."""
    tmp = partial_path(path)
    remove_stale_partials(path.parent)
    remove_path(tmp)  # left by a dead process that had our pid
    tmp.mkdir()
    try:
        with disk_full_is_an_error(path):
            yield tmp
            _move_over(tmp, path)
    finally:
        remove_path(tmp)


def _move_over(src: Path, dst: Path) -> None:
    """rename(2) cannot replace a non-empty folder: move the old one aside first, back on failure."""
    if not dst.exists() and not dst.is_symlink():
        os.rename(src, dst)
        return
    old = dst.with_name(f".{dst.name}{_OLD_MARK}{os.getpid()}")
    remove_path(old)
    os.rename(dst, old)
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    remove_path(old)


def remove_path(path: Path) -> None:
    """Delete a file, link or folder tree if it exists (a link is removed, never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
