"""Launched by torchrun in place of `-m mt` (tests/finetune/test_fsdp.py): the mt CLI, with each --fsdp rank writing
DIR/rank-R.json (DIR from MT_TEST_MEMORY_LOG): the bytes of real (not meta) parameter storage its model held before
sharding, and its peak resident memory (ru_maxrss) once its shards are filled."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

import mt.finetune.trainer as trainer
from mt.cli import main

MEMORY_LOG_ENV = "MT_TEST_MEMORY_LOG"
_shard_from_rank0 = trainer.shard_from_rank0


def measured_shard_from_rank0(model: Any, world: Any, device: Any) -> None:
    loaded = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    _shard_from_rank0(model, world, device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    path = Path(os.environ[MEMORY_LOG_ENV]) / f"rank-{world.rank}.json"
    path.write_text(json.dumps({"loaded_param_bytes": loaded, "peak_rss_bytes": peak}), encoding="utf-8")


if __name__ == "__main__":
    trainer.shard_from_rank0 = measured_shard_from_rank0  # type: ignore[assignment]
    main(prog_name="mt")
