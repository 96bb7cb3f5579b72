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

from mt.kernels._gated import BLOCK, check_gated, gated_backward, gated_forward
from mt.kernels._triton import jit, tl, triton_runs

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


class GeGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        h, gate, up = gated_forward(_geglu_forward, gate, up, SQRT_2_OVER_PI, CUBIC)
        ctx.save_for_backward(gate, up)
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        return gated_backward(_geglu_backward, dh, *ctx.saved_tensors, SQRT_2_OVER_PI, CUBIC)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up for two tensors of one shape and dtype; Triton on CUDA (or interpreted), else the
    reference."""
    check_gated("geglu", gate, up)
    if triton_runs(_geglu_forward, gate, up):
        return GeGLUFunction.apply(gate, up)
    return geglu_reference(gate, up)
