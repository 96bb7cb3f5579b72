"""Adapters trained on an unfused copy of a model whose checkpoint fuses those layers (a Llama-fied Phi-3's
q_proj/k_proj/v_proj and gate_proj/up_proj against Phi-3's qkv_proj and gate_up_proj): each part's LoRA becomes an
update of the fused weight's rows that hold the part, which the architecture module names (`fused_parts`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from mt.convert.arch import MODULES, load_architecture
from mt.io.checkpoint import Checkpoint
from mt.errors import AdapterError
from mt.merge.adapter import Adapter, LoraDelta

SAME_BASE = "pass the base checkpoint the adapter was trained on"


@dataclass(frozen=True)
class Slice:
    """Where a part sits in its fused module: rows [start, start + rows) of `total`."""

    fused: str
    start: int
    rows: int
    total: int


def fuse_parts(base: Checkpoint, adapter: Adapter) -> Adapter:
    """`adapter` with every LoRA on a part of a module `base` stores fused retargeted to that fused weight."""
    slices = _slices(base)
    if not slices:
        return adapter
    deltas = {name: _into_fused(name, delta, base, slices) for name, delta in adapter.deltas.items()}
    return replace(adapter, deltas=deltas)


def _slices(base: Checkpoint) -> dict[str, Slice]:
    """Part name -> its slice, for the base's architecture (none for one mt does not convert: nothing is fused)."""
    if base.architecture not in MODULES:
        return {}
    table: dict[str, Slice] = {}
    for fused, parts in load_architecture(base.architecture, base.config).fused_parts().items():
        total, start = sum(rows for _, rows in parts), 0
        for part, rows in parts:
            table[part] = Slice(fused, start, rows, total)
            start += rows
    return table


def _into_fused(name: str, delta: LoraDelta, base: Checkpoint, slices: dict[str, Slice]) -> LoraDelta:
    if delta.target is not None or delta.embedding or name in base.tensors:
        return delta
    for part, where in slices.items():
        if not delta.module.endswith("." + part):
            continue
        fused = delta.module[: -len(part)] + where.fused + ".weight"
        if fused not in base.tensors:
            continue
        if delta.magnitude is not None or delta.bias is not None:
            raise AdapterError(f"the adapter's {'DoRA' if delta.magnitude is not None else 'lora_bias'} update of "
                               f"{delta.module} would go into a slice of the base's fused {fused}, which mt cannot merge",
                               "merge it with peft into the unfused model the adapter was trained on")
        if delta.b.shape[0] != where.rows:
            raise AdapterError(f"the adapter's update for {delta.module} has {delta.b.shape[0]} rows but its slice of "
                               f"{fused} has {where.rows}", SAME_BASE)
        b = np.zeros((where.total, delta.rank), dtype=np.float32)
        b[where.start:where.start + where.rows] = delta.b
        return replace(delta, b=b, target=fused)
    return delta
