"""Launching a gated activation h = act(gate) * up (SwiGLU, GeGLU): elementwise kernels over the flattened tensors,
BLOCK elements a program, with the signatures

    forward(gate_ptr, up_ptr, h_ptr, n, *constants, BLOCK)
    backward(dh_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, *constants, BLOCK)
"""

from __future__ import annotations

from typing import Any

import torch

from mt.kernels.errors import KernelInputError

BLOCK = 1024
NUM_WARPS = 4


def check_gated(name: str, gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise KernelInputError(f"{name}: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                               "must have one shape and dtype")


def _grid(n: int) -> tuple[int]:
    return (max(1, -(-n // BLOCK)),)


def gated_forward(kernel: Any, gate: torch.Tensor, up: torch.Tensor,
                  *constants: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, gate, up): the contiguous inputs are what the backward needs saved."""
    gate, up = gate.contiguous(), up.contiguous()
    h = torch.empty_like(gate)
    kernel[_grid(h.numel())](gate, up, h, h.numel(), *constants, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return h, gate, up


def gated_backward(kernel: Any, dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                   *constants: float) -> tuple[torch.Tensor, torch.Tensor]:
    dh = dh.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    kernel[_grid(dh.numel())](dh, gate, up, dgate, dup, dh.numel(), *constants, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dgate, dup
