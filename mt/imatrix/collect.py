"""The sums llama-imatrix collects, taken from transformers' forward: a pre-hook on each linear layer whose weight
llama.cpp quantizes (the `blk.*` matrices; it skips output.weight) adds the squares of its input, per input column,
and the number of tokens. As in llama-imatrix a forward of fewer than MIN_TOKENS tokens is not counted. Each input
is reduced as it is produced and never kept: layers that share one input (q/k/v, gate/up) share one reduction."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from mt.errors import MtError

if TYPE_CHECKING:
    import torch
    from torch import nn

MIN_TOKENS = 16  # llama-imatrix: "why are small batches ignored (<16 tokens)?"


class Collector:
    def __init__(self, layers: dict[str, nn.Linear]) -> None:
        import torch

        self.sums = {name: torch.zeros(layer.in_features, dtype=torch.float64, device=layer.weight.device)
                     for name, layer in layers.items()}
        self.counts = dict.fromkeys(layers, 0)
        self._last: tuple[Any, Any] | None = None  # (input, its column sums of squares)
        self._handles = [layer.register_forward_pre_hook(self._hook(name)) for name, layer in layers.items()]

    def _hook(self, name: str):  # noqa: ANN202
        def seen(module: nn.Module, args: tuple) -> None:
            x = args[0]
            rows = x.reshape(-1, x.shape[-1])
            if rows.shape[0] < MIN_TOKENS:
                return
            if self._last is None or self._last[0] is not x:
                self._last = (x, rows.float().square().sum(dim=0))
            self.sums[name] += self._last[1]
            self.counts[name] += rows.shape[0]

        return seen

    def step_done(self) -> None:
        self._last = None

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = None

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(sums float32 [1, ne0], counts [1]) by name; a non-finite sum is an error, as in llama-imatrix."""
        sums, counts = {}, {}
        for name, total in self.sums.items():
            values = total.cpu().numpy()
            if not np.isfinite(values).all():
                raise MtError(f"the inputs of {name} reach NaN or Inf while running the calibration text",
                              "run in float32 (--dtype f32), or check the weights for NaN/Inf")
            sums[name] = values.astype(np.float32).reshape(1, -1)
            counts[name] = np.array([self.counts[name]], dtype=np.int64)
        return sums, counts
