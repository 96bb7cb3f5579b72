"""A LoRA linear layer: y = x W^T + bias + scaling * (dropout(x) A^T) B^T, with the base weight W frozen.

W [out, in] is a dense tensor (bf16, f16, f32) or a bitsandbytes 4-bit weight: a `Params4bit` (what a model
loaded with `BitsAndBytesConfig(load_in_4bit=True)` holds, `.quant_state` attached) or a `(packed, QuantState)`
pair from `bitsandbytes.functional.quantize_4bit`. A 4-bit weight is dequantized by bitsandbytes itself
(`dequantize_4bit`) in the forward and again in the backward: only the packed weight is kept between them.
A [r, in] and B [out, r] are the adapter; bias [out] (Qwen2's q/k/v) is frozen like W.

Triton: one matmul kernel with the low-rank product in its epilogue. Each [BLOCK_M, BLOCK_N] tile accumulates
x W^T over K in float32, then adds (scaling x A^T)[tile rows] @ B^T[:, tile cols] and the bias before its single
store, so the base output is never written and re-read to add the update. The backward's dx = dy W +
(scaling dy B) A is the same kernel on other operands; the rank-r products (x A^T, dy B, dA, dB) are small
matmuls left to torch. float32 operands use IEEE float32 dots unless torch.backends.cuda.matmul.allow_tf32 is set.
Interpreted (TRITON_INTERPRET=1), the dots take float32 operands: triton 3.6's interpreter multiplies bf16 operands
as their raw 16-bit patterns.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mt.kernels._triton import is_interpreted, jit, next_power_of_2, tl, triton_runs
from mt.kernels.errors import KernelInputError

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per operand dtype; untuned starting points for sm_80/sm_90.
TILES = {torch.float32: (64, 64, 32, 4, 3), torch.bfloat16: (128, 128, 64, 8, 3), torch.float16: (128, 128, 64, 8, 3)}
GROUP_M = 8


def dense_weight(base_weight: Any) -> torch.Tensor:
    """W [out, in] as a dense tensor: a 4-bit weight dequantized by bitsandbytes, a dense one as it is."""
    if isinstance(base_weight, tuple):
        packed, quant_state = base_weight
    elif getattr(base_weight, "quant_state", None) is not None:
        packed, quant_state = base_weight.data, base_weight.quant_state
    else:
        return base_weight
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(packed, quant_state)


def lora_linear_reference(x: torch.Tensor, base_weight: Any, lora_A: torch.Tensor, lora_B: torch.Tensor,
                          scaling: float, dropout: float = 0.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """As peft's LoRA Linear computes it: the base layer, plus the update in the adapter's dtype added in the
    base output's dtype."""
    base = F.linear(x, dense_weight(base_weight), bias)
    x_lora = F.dropout(x, dropout) if dropout else x
    update = F.linear(F.linear(x_lora.to(lora_A.dtype), lora_A), lora_B) * scaling
    return base + update.to(base.dtype)


@jit
def _matmul_lowrank(a_ptr, b_ptr, l_ptr, r_ptr, bias_ptr, c_ptr, M, N, rank,
                    stride_am, stride_ak, stride_bk, stride_bn, stride_lm, stride_lr, stride_rr, stride_rn,
                    stride_cm, stride_cn, K: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr,
                    PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """c[M, N] = a[M, K] @ b[K, N] (+ l[M, rank] @ r[rank, N]) (+ bias[N]), float32 accumulation, one store."""
    pid = tl.program_id(0)
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    tiles_n = (N + BLOCK_N - 1) // BLOCK_N
    group = GROUP_M * tiles_n  # GROUP_M row tiles walk the column tiles together (operands stay in L2)
    first_m = (pid // group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_rows
    pid_n = (pid % group) // group_rows
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        a = tl.load(a_ptr + rows[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=row_mask[:, None] & (k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + k[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(k[:, None] < K) & col_mask[None, :], other=0.0)
        b = b.to(a.dtype)
        if DOT_F32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_LOWRANK:
        rs = tl.arange(0, BLOCK_R)
        low = tl.load(l_ptr + rows[:, None] * stride_lm + rs[None, :] * stride_lr,
                      mask=row_mask[:, None] & (rs[None, :] < rank), other=0.0)
        up = tl.load(r_ptr + rs[:, None] * stride_rr + cols[None, :] * stride_rn,
                     mask=(rs[:, None] < rank) & col_mask[None, :], other=0.0)
        up = up.to(low.dtype)
        if DOT_F32:
            low, up = low.to(tl.float32), up.to(tl.float32)
        acc = tl.dot(low, up, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def fused_matmul(a: torch.Tensor, b: torch.Tensor, low: torch.Tensor | None = None, up: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] @ b [K, N] + low [M, r] @ up [r, N] + bias [N] in a's dtype (b, up: any strides, e.g. W.t()).
    The low-rank product runs in low's dtype (the adapter's: float32 for a float32 adapter on bf16 activations)."""
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    block_m, block_n, block_k, warps, stages = TILES[a.dtype]
    has_lowrank = low is not None
    rank = low.shape[1] if has_lowrank else 0
    low_strides = (low.stride(0), low.stride(1)) if has_lowrank else (0, 0)
    up_strides = (up.stride(0), up.stride(1)) if has_lowrank else (0, 0)
    precision = "tf32" if a.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    grid = (-(-M // block_m) * -(-N // block_n),)
    _matmul_lowrank[grid](a, b, low if has_lowrank else a, up if has_lowrank else a, bias if bias is not None else a,
                          c, M, N, rank, a.stride(0), a.stride(1), b.stride(0), b.stride(1), *low_strides, *up_strides,
                          c.stride(0), c.stride(1), K=K, HAS_LOWRANK=has_lowrank, HAS_BIAS=bias is not None,
                          PRECISION=precision, DOT_F32=is_interpreted(_matmul_lowrank), BLOCK_M=block_m,
                          BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=max(16, next_power_of_2(rank)), GROUP_M=GROUP_M,
                          num_warps=warps, num_stages=stages)
    return c


class LoRALinearFunction(torch.autograd.Function):
    """x [M, in] (and x_lora, the dropped-out copy for the adapter, or None without dropout) -> y [M, out]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_lora: torch.Tensor | None, base_weight: Any, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, bias: torch.Tensor | None) -> torch.Tensor:
        adapter_in = x if x_lora is None else x_lora
        xa = adapter_in.to(lora_A.dtype) @ lora_A.t()  # [M, r]
        w = dense_weight(base_weight)
        y = fused_matmul(x, w.t(), xa * scaling, lora_B.t(), bias)
        ctx.save_for_backward(adapter_in, xa, lora_A, lora_B)
        ctx.base_weight = base_weight  # the packed weight for a 4-bit one: dequantized again in the backward
        ctx.scaling = scaling
        ctx.has_dropout = x_lora is not None
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        adapter_in, xa, lora_A, lora_B = ctx.saved_tensors
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dy_adapter = dy.to(lora_B.dtype)  # [M, out] in the adapter's dtype (a copy only when they differ)
        dy_b = (dy_adapter @ lora_B) * ctx.scaling  # [M, r]
        need_x, need_x_lora, _, need_A, need_B, _, _ = ctx.needs_input_grad
        dx = dx_lora = None
        if need_x or need_x_lora:
            w = dense_weight(ctx.base_weight)
            fused = not ctx.has_dropout
            dx = fused_matmul(dy, w, dy_b if fused else None, lora_A if fused else None)
            if ctx.has_dropout:
                dx_lora = (dy_b @ lora_A).to(adapter_in.dtype)
        d_A = dy_b.t() @ adapter_in.to(lora_A.dtype) if need_A else None
        d_B = (dy_adapter.t() @ xa) * ctx.scaling if need_B else None
        return dx, dx_lora, None, d_A, d_B, None, None


def _check(x: torch.Tensor, w: Any, lora_A: torch.Tensor, lora_B: torch.Tensor, bias: torch.Tensor | None) -> None:
    quant_state = w[1] if isinstance(w, tuple) else getattr(w, "quant_state", None)
    w_shape = tuple(quant_state.shape if quant_state is not None else w.shape)
    out_features, in_features = w_shape
    rank = lora_A.shape[0]
    expected = {"x": (x.shape[-1], in_features), "A": (tuple(lora_A.shape), (rank, in_features)),
                "B": (tuple(lora_B.shape), (out_features, rank)),
                "bias": (None if bias is None else tuple(bias.shape), None if bias is None else (out_features,))}
    if any(got != want for got, want in expected.values()):
        bias_shape = None if bias is None else tuple(bias.shape)
        raise KernelInputError(f"lora_linear: x {tuple(x.shape)}, W {w_shape}, A {tuple(lora_A.shape)}, "
                               f"B {tuple(lora_B.shape)}, bias {bias_shape} do not fit "
                               "(x [..., in], W [out, in], A [r, in], B [out, r], bias [out])")
    for name, t in (("base weight", w), ("bias", bias)):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise KernelInputError(f"lora_linear: the {name} requires grad, but only the adapter (A, B) is trained; "
                                   "freeze it with requires_grad_(False)")


def lora_linear(x: torch.Tensor, base_weight: Any, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                dropout: float = 0.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype. dropout: the probability applied to the adapter's input (pass 0
    when not training). Triton on CUDA (or interpreted), the reference otherwise."""
    _check(x, base_weight, lora_A, lora_B, bias)
    packed = base_weight[0] if isinstance(base_weight, tuple) else base_weight
    if not triton_runs(_matmul_lowrank, x, packed, lora_A, lora_B):
        return lora_linear_reference(x, base_weight, lora_A, lora_B, scaling, dropout, bias)
    rows = x.reshape(-1, x.shape[-1])
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    rows_lora = F.dropout(rows, dropout) if dropout else None
    y = LoRALinearFunction.apply(rows, rows_lora, base_weight, lora_A, lora_B, float(scaling), bias)
    return y.view(*x.shape[:-1], y.shape[-1])
