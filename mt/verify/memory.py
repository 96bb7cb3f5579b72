"""Peak resident memory per phase (Linux: VmHWM, reset through /proc/self/clear_refs)."""

from __future__ import annotations

import resource
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> None:
    """Start a new high-water mark; a no-op where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    """Peak RSS since the last reset (or since start where reset is not possible)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_freed_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the system (glibc's malloc_trim), so that one phase's
    freed buffers do not count in the next phase's peak; a no-op where there is no glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def phase(peaks: dict[str, float], name: str) -> Iterator[None]:
    """Measure the enclosed work's peak RSS from a clean start (freed memory handed back, the high-water mark reset)
    and keep the largest under `name`."""
    release_freed_memory()
    reset_peak_rss()
    try:
        yield
    finally:
        peaks[name] = max(peaks.get(name, 0.0), peak_rss_mib())
