"""Where mt keeps what it builds once and reuses (the demo's model; the tests' oracles): $MT_CACHE, else ~/.cache/mt."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    env = os.environ.get("MT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mt"
