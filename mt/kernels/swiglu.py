"""SwiGLU: h = silu(gate) * up, elementwise (the MLP of Llama, Mistral, Qwen: down(silu(gate(x)) * up(x))).

Triton: float32 arithmetic, one rounding to gate's dtype. The backward recomputes the sigmoid from the saved
gate instead of saving activations:
    dgate = dh * up * s * (1 + gate * (1 - s)),  dup = dh * gate * s,  s = sigmoid(gate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mt.kernels._gated import BLOCK, check_gated, gated_backward, gated_forward
from mt.kernels._triton import jit, tl, triton_runs



def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@jit
def _swiglu_forward(gate_ptr, up_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(h_ptr + offsets, (g * s * u).to(h_ptr.dtype.element_ty), mask=mask)


@jit
def _swiglu_backward(dh_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    dh = tl.load(dh_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(dgate_ptr + offsets, (dh * u * s * (1.0 + g * (1.0 - s))).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offsets, (dh * g * s).to(dup_ptr.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        h, gate, up = gated_forward(_swiglu_forward, gate, up)
        ctx.save_for_backward(gate, up)
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        return gated_backward(_swiglu_backward, dh, *ctx.saved_tensors)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for two tensors of one shape and dtype; Triton on CUDA (or interpreted), else the reference."""
    check_gated("swiglu", gate, up)
    if triton_runs(_swiglu_forward, gate, up):
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)
