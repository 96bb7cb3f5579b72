"""llama.cpp logs to the process's stderr whatever it is told; its callers silence it for the length of a call."""

from __future__ import annotations

import io
import os
import sys
from contextlib import contextmanager, redirect_stderr
from typing import Iterator


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """llama.cpp logs (e.g. its n_ctx_train notice) even with verbose=False; send fd 2 and sys.stderr to nothing."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with redirect_stderr(io.StringIO()):  # llama-cpp-python's log callback prints through sys.stderr
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
