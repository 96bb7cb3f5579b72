"""Experts stored one by one in a checkpoint, read as the stacked [n_expert, rows, cols] tensors llama.cpp holds.

A stacked tensor reads its experts only when asked for their rows, a slab of whole experts at a time, so a layer's
stack is never in memory at once.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from mt.convert.arch.base import EXPERT_COUNT_KEYS, find_key
from mt.errors import CheckpointError
from mt.io.checkpoint import LazyTensor


def expert_count(config: dict[str, Any]) -> int:
    return int(find_key(config, EXPERT_COUNT_KEYS))


@dataclass(frozen=True)
class StackedExperts:
    """`parts[i]` is expert i's matrix; rows of this tensor are whole experts."""

    name: str
    parts: tuple[LazyTensor, ...]

    @property
    def dtype(self) -> str:
        return self.parts[0].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts), *self.parts[0].shape)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def read_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        chosen = self.parts[start:stop]
        if not chosen:
            return np.empty((0, *self.parts[0].shape), dtype=self.parts[0].read_rows(0, 0).dtype)
        return np.stack([p.read() for p in chosen])

    def read(self) -> np.ndarray:
        return self.read_rows()


@dataclass(frozen=True)
class ConcatenatedRows:
    """Matrices of one width read as one, their rows one after another (an expert's gate and up, as transformers 5
    holds them)."""

    name: str
    parts: tuple[LazyTensor, ...]

    @property
    def dtype(self) -> str:
        return self.parts[0].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(p.shape[0] for p in self.parts), *self.parts[0].shape[1:])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def read_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return np.concatenate([p.read() for p in self.parts])[start:stop]

    def read(self) -> np.ndarray:
        return self.read_rows()


def transformers_experts(tensors: Mapping[str, LazyTensor], pattern: re.Pattern[str], n_expert: int,
                         gate_up: tuple[str, str], down: str, prefix: Callable[[int], str]) -> dict[str, LazyTensor]:
    """The tensors with each layer's expert matrices (`pattern` groups: layer, expert, part) replaced by transformers
    5's parameters: `{prefix}.gate_up_proj` [n_expert, 2·rows, cols] (gate rows then up rows) and
    `{prefix}.down_proj` [n_expert, cols, rows]."""
    out: dict[str, LazyTensor] = {}
    experts: dict[int, dict[tuple[str, int], LazyTensor]] = defaultdict(dict)
    for name, tensor in tensors.items():
        if found := pattern.fullmatch(name):
            experts[int(found[1])][found[3], int(found[2])] = tensor
        else:
            out[name] = tensor
    for layer, held in experts.items():
        missing = [f"{p}.{x}" for p in (*gate_up, down) for x in range(n_expert) if (p, x) not in held]
        if missing:
            raise CheckpointError(f"layer {layer} lacks {len(missing)} expert matrices (first: {missing[0]})",
                                  "the checkpoint is incomplete; download the missing shards")
        fused = f"{prefix(layer)}.gate_up_proj"
        out[fused] = StackedExperts(fused, tuple(
            ConcatenatedRows(fused, (held[gate_up[0], x], held[gate_up[1], x])) for x in range(n_expert)))
        out[f"{prefix(layer)}.down_proj"] = _stacked(f"{prefix(layer)}.down_proj", [held[down, x] for x in range(n_expert)])
    return out


ExpertName = Callable[[int, str], str]  # (layer, part) -> the stacked tensor's checkpoint-style name


def stack_experts(tensors: Mapping[str, LazyTensor], pattern: re.Pattern[str], n_expert: int,
                  parts: tuple[str, ...], stacked_name: ExpertName) -> dict[str, LazyTensor]:
    """The tensors in checkpoint order, with each layer's expert matrices (`pattern` groups: layer, expert, part)
    replaced by one stacked tensor per part, in `parts` order, where the layer's last expert matrix stood: the
    place and order in which llama.cpp's converter emits them."""
    out: dict[str, LazyTensor] = {}
    pending: dict[int, dict[tuple[str, int], LazyTensor]] = defaultdict(dict)
    for name, tensor in tensors.items():
        found = pattern.fullmatch(name)
        if found is None:
            out[name] = tensor
            continue
        layer, expert, part = int(found[1]), int(found[2]), found[3]
        if expert >= n_expert:
            raise CheckpointError(f"tensor {name!r} is expert {expert}, but config.json has {n_expert} experts",
                                  "the checkpoint and its config.json disagree; re-download or fix config.json")
        pending[layer][part, expert] = tensor
        if len(pending[layer]) == n_expert * len(parts):
            for p in parts:
                out[stacked_name(layer, p)] = _stacked(stacked_name(layer, p), [pending[layer][p, x] for x in range(n_expert)])
            del pending[layer]
    if pending:
        layer, held = next(iter(pending.items()))
        missing = sorted(f"{p}.{x}" for p in parts for x in range(n_expert) if (p, x) not in held)
        raise CheckpointError(f"layer {layer} lacks {len(missing)} expert matrices (first: {missing[0]})",
                              "the checkpoint is incomplete; download the missing shards")
    return out


def _stacked(name: str, parts: list[LazyTensor]) -> StackedExperts:
    first = parts[0]
    for expert, part in enumerate(parts):
        if part.shape != first.shape or part.dtype != first.dtype:
            raise CheckpointError(f"{name}: expert {expert} is {part.dtype} {list(part.shape)}, expert 0 is "
                                  f"{first.dtype} {list(first.shape)}",
                                  "the checkpoint's experts must share one shape and dtype; re-download it")
    return StackedExperts(name, tuple(parts))
