"""GeGLU: h = gelu_tanh(gate) * up, elementwise (Gemma's MLP: down(gelu_pytorch_tanh(gate(x)) * up(x))).

gelu_tanh is GELU's tanh approximation, transformers' "gelu_pytorch_tanh" (torch's F.gelu(approximate="tanh")):
    gelu_tanh(x) = 0.5 x (1 + tanh(u)) = x s,   u = sqrt(2/pi) (x + 0.044715 x^3),  s = sigmoid(2u)
(0.5 (1 + tanh(u)) = sigmoid(2u): no tanh, which Triton lacks, and no cancellation where tanh(u) is near -1).

Triton: float32 arithmetic, one rounding to gate's dtype. The backward recomputes s from the saved gate:
    dgate = dh * up * (s + x * 2 s (1 - s) * du/dx),  du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2),
    dup = dh * x * s.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mt.kernels._triton import jit, tl, triton_runs
from mt.kernels.errors import KernelInputError

BLOCK = 1024
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
CUBIC = 0.044715


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") * up


@jit
def _geglu_forward(gate_ptr, up_ptr, h_ptr, n, k0, k1, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-2.0 * k0 * (g + k1 * g * g * g)))
    tl.store(h_ptr + offsets, (g * s * u).to(h_ptr.dtype.element_ty), mask=mask)


@jit
def _geglu_backward(dh_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, k0, k1, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    dh = tl.load(dh_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-2.0 * k0 * (g + k1 * g * g * g)))
    dgelu = s + g * 2.0 * s * (1.0 - s) * k0 * (1.0 + 3.0 * k1 * g * g)
    tl.store(dgate_ptr + offsets, (dh * u * dgelu).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offsets, (dh * g * s).to(dup_ptr.dtype.element_ty), mask=mask)


def _grid(n: int) -> tuple[int]:
    return (max(1, -(-n // BLOCK)),)


class GeGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        h = torch.empty_like(gate)
        _geglu_forward[_grid(h.numel())](gate, up, h, h.numel(), SQRT_2_OVER_PI, CUBIC, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(gate, up)
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate, up = ctx.saved_tensors
        dh = dh.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        _geglu_backward[_grid(dh.numel())](dh, gate, up, dgate, dup, dh.numel(), SQRT_2_OVER_PI, CUBIC, BLOCK=BLOCK,
                                           num_warps=4)
        return dgate, dup


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up for two tensors of one shape and dtype; Triton on CUDA (or interpreted), else the
    reference."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise KernelInputError(f"geglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                               "must have one shape and dtype")
    if triton_runs(_geglu_forward, gate, up):
        return GeGLUFunction.apply(gate, up)
    return geglu_reference(gate, up)
