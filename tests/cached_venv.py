"""A virtual environment in the tests' cache, for an oracle whose pins mt's environment does not meet. It sees mt's
site-packages (torch stays the local CPU build) and is built once; a build that was cut off is built again."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from mt.cache import cache_root


def cached_venv(name: str, installs: Sequence[Sequence[str]], files: Mapping[str, str] | None = None) -> Path:
    """The python of venv `name`: built by one `pip install` per entry of `installs` (its arguments), in order, then
    `files` (a path inside the venv -> its text) written."""
    root = cache_root()
    target = root / name
    python = target / "bin" / "python"
    if not (target / ".complete").is_file():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(target)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        for arguments in installs:
            subprocess.run([*pip, *arguments], check=True, capture_output=True)
        for path, text in (files or {}).items():
            (target / path).parent.mkdir(parents=True, exist_ok=True)
            (target / path).write_text(text)
        (target / ".complete").write_text("ok\n")
    return python
