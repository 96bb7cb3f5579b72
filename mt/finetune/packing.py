"""Batches: samples packed padding-free into rows of at most `batch_tokens` tokens, or padded (--no-packing).

Packed: one row [1, T] per step holding several samples end to end, `position_ids` restarting at 0 for each
sample and no attention mask. transformers (5.x, `masking_utils.find_packed_sequence_indices`) reads the restarts
as sample boundaries and makes the sdpa/eager mask block-diagonal causal (its flash-attention path reads the same
position ids as varlen boundaries; not tested here, there is no GPU in CI), provided no KV cache is passed: the trainer calls the model with
use_cache=False (with a cache the detection is skipped and samples attend across each other; tests/finetune
test_packing checks both). Rope positions restart with the position ids. Each sample's first label is -100
(data.py), so no token is trained to predict the next sample's first token.

Padded: samples grouped so that (samples x longest) <= batch_tokens, right-padded with a 2-D attention mask.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import torch

from mt.finetune.data import IGNORE, Sample


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64, IGNORE where no loss
    position_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor | None  # [B, T] (padded batches); None when packed

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel() if self.attention_mask is None else self.attention_mask.sum())

    def model_inputs(self, device: torch.device | str) -> dict[str, torch.Tensor | None]:
        inputs = {"input_ids": self.input_ids, "labels": self.labels, "position_ids": self.position_ids,
                  "attention_mask": self.attention_mask}
        return {k: (v.to(device) if v is not None else None) for k, v in inputs.items()}


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total <= capacity: longest first, each into the fullest bin that
    still has room (best-fit decreasing, O(n log n)); every length must be <= capacity."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            room, b = capacity - lengths[i], len(bins) - 1
        else:
            room, b = free.pop(at)
            bins[b].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def packed_batch(samples: list[Sample]) -> Batch:
    ids = [t for s in samples for t in s.input_ids]
    labels = [t for s in samples for t in s.labels]
    positions = [p for s in samples for p in range(len(s.input_ids))]
    return Batch(torch.tensor([ids]), torch.tensor([labels]), torch.tensor([positions]), None)


def padded_batch(samples: list[Sample], pad_id: int) -> Batch:
    width = max(len(s.input_ids) for s in samples)
    ids = [s.input_ids + [pad_id] * (width - len(s.input_ids)) for s in samples]
    labels = [s.labels + [IGNORE] * (width - len(s.labels)) for s in samples]
    mask = [[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in samples]
    positions = [list(range(width)) for _ in samples]
    return Batch(torch.tensor(ids), torch.tensor(labels), torch.tensor(positions), torch.tensor(mask))


def padded_groups(lengths: list[int], order: list[int], batch_tokens: int) -> list[list[int]]:
    """Consecutive samples of `order` while (count x longest) fits in batch_tokens."""
    groups: list[list[int]] = []
    longest = 0
    for i in order:
        wider = max(longest, lengths[i])
        if groups and wider * (len(groups[-1]) + 1) <= batch_tokens:
            groups[-1].append(i)
            longest = wider
        else:
            groups.append([i])
            longest = lengths[i]
    return groups


def epoch_groups(lengths: list[int], batch_tokens: int, packing: bool, seed: int, epoch: int) -> list[list[int]]:
    """The sample indices of each step of one epoch, in the order trained; deterministic in (seed, epoch)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    if packing:
        groups = best_fit(lengths, batch_tokens)
        rng.shuffle(groups)
        return groups
    order = list(range(len(lengths)))
    rng.shuffle(order)
    return padded_groups(lengths, order, batch_tokens)


def make_batch(samples: list[Sample], group: list[int], packing: bool, pad_id: int) -> Batch:
    chosen = [samples[i] for i in group]
    return packed_batch(chosen) if packing else padded_batch(chosen, pad_id)
