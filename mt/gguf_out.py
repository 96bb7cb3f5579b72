"""Streaming, atomic GGUF output on top of gguf-py's writer state machine.

Header, KV data and tensor infos go through `gguf.GGUFWriter`; tensor data is then streamed one
chunk at a time into a temporary file beside the target, renamed over it only when complete.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from gguf import GGUFWriter

from mt.errors import MtError, OutputExists


def check_output(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise OutputExists(f"{path} exists", "pass --force to overwrite it")
    if not path.parent.is_dir():
        raise MtError(f"output folder {path.parent} does not exist", "create it first")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path in the target folder; rename it over `path` on success, delete it otherwise."""
    tmp = path.with_name(f".{path.name}.mt-partial-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise MtError(f"disk full while writing {path}", "free space or write to another disk") from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


class TensorStream:
    """Writes tensor payloads, in the order their infos were added, after the header is out."""

    def __init__(self, writer: GGUFWriter) -> None:
        assert writer.fout is not None and len(writer.fout) == 1
        self.writer = writer
        self.fout = writer.fout[0]

    def write_tensor(self, chunks: Iterable[np.ndarray], nbytes: int) -> int:
        self.writer.write_padding(self.fout, self.fout.tell())
        written = 0
        for chunk in chunks:
            data = np.ascontiguousarray(chunk)
            self.fout.write(memoryview(data).cast("B"))
            written += data.nbytes
        if written != nbytes:
            raise MtError(f"internal error: tensor wrote {written} bytes, planned {nbytes}", "please report it")
        self.writer.write_padding(self.fout, nbytes)
        return written

    def finish(self) -> None:
        self.fout.flush()
        os.fsync(self.fout.fileno())
        self.writer.close()
