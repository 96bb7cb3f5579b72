"""A LoRA linear layer: y = x W^T + bias + scaling * (dropout(x) A^T) B^T, with the base weight W frozen.

W [out, in] is a dense tensor (bf16, f16, f32) or a bitsandbytes 4-bit weight (NF4 or FP4, any blocksize, double
quantization or not, any quant_storage dtype): a `Params4bit` (what a model loaded with
`BitsAndBytesConfig(load_in_4bit=True)` holds, `.quant_state` attached) or a `(packed, QuantState)` pair from
`bitsandbytes.functional.quantize_4bit`. A [r, in] and B [out, r] are the adapter; bias [out] (Qwen2's q/k/v) is
frozen like W.

Triton: one matmul kernel with the low-rank product in its epilogue. Each [BLOCK_M, BLOCK_N] tile accumulates
x W^T over K in float32, then adds (scaling x A^T)[tile rows] @ B^T[:, tile cols] and the bias before its single
store, so the base output is never written and re-read to add the update. The backward's dx = dy W +
(scaling dy B) A is the same kernel on other operands; the rank-r products (x A^T, dy B, dA, dB) are small
matmuls left to torch. A 4-bit W is read as it is stored: each K-tile of the weight operand is decoded in
registers from the packed nibbles, the code table and the (double-quantized) block scales, rounded to the quant
state's dtype as bitsandbytes' dequantize_4bit rounds it (mt/kernels/bnb4bit.py has the layout), in the forward
and in the backward, so no dense copy of W is ever made. The reference path dequantizes with bitsandbytes.
float32 operands use IEEE float32 dots unless torch.backends.cuda.matmul.allow_tf32 is set.
Interpreted (TRITON_INTERPRET=1), the dots take float32 operands (triton 3.6's interpreter multiplies bf16 operands
as their raw 16-bit patterns) and decoded weights are rounded to bf16 by integer arithmetic (its float32 -> bf16
cast truncates).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mt.kernels._triton import is_interpreted, jit, next_power_of_2, tl, triton_runs
from mt.kernels.bnb4bit import Packed4bit, as_packed_4bit, packed_and_state
from mt.kernels.errors import KernelInputError

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per operand dtype; untuned starting points for sm_80/sm_90.
TILES = {torch.float32: (64, 64, 32, 4, 3), torch.bfloat16: (128, 128, 64, 8, 3), torch.float16: (128, 128, 64, 8, 3)}
GROUP_M = 8


W_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}  # tl.<name>


def dense_weight(base_weight: Any) -> torch.Tensor:
    """W [out, in] as a dense tensor (the reference path): a 4-bit weight dequantized by bitsandbytes, a dense one
    as it is."""
    pair = packed_and_state(base_weight)
    if pair is None:
        return base_weight
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(*pair)


def lora_linear_reference(x: torch.Tensor, base_weight: Any, lora_A: torch.Tensor, lora_B: torch.Tensor,
                          scaling: float, dropout: float = 0.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """As peft's LoRA Linear computes it: the base layer, plus the update in the adapter's dtype added in the
    base output's dtype."""
    base = F.linear(x, dense_weight(base_weight), bias)
    x_lora = F.dropout(x, dropout) if dropout else x
    update = F.linear(F.linear(x_lora.to(lora_A.dtype), lora_A), lora_B) * scaling
    return base + update.to(base.dtype)


@jit
def _round_to_bf16_by_bits(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), kept in float32: the interpreter's own float32 ->
    bfloat16 cast truncates (finite x only, as decoded weights are)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@jit
def _load_4bit(data_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat, mask,
               BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, W_DTYPE: tl.constexpr,
               INTERPRETED: tl.constexpr):
    """W's flat elements `flat` decoded from bitsandbytes' 4-bit layout (mt/kernels/bnb4bit.py), rounded to W_DTYPE
    (interpreted and bfloat16: the bfloat16 values, held in float32)."""
    byte = tl.load(data_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((flat & 1) == 0, byte >> 4, byte & 15)  # even elements in the high nibble
    value = tl.load(code_ptr + nibble)
    block = flat // BLOCKSIZE  # constexpr powers of two in bitsandbytes: shifts, not 64-bit divisions
    if NESTED:
        quantized = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + quantized) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0).to(tl.float32)
    value = value * scale
    if INTERPRETED and W_DTYPE == tl.bfloat16:
        return _round_to_bf16_by_bits(value)
    return value.to(W_DTYPE)


@jit
def _matmul_lowrank(a_ptr, b_ptr, l_ptr, r_ptr, bias_ptr, c_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr,
                    offset_ptr, M, N, rank,
                    stride_am, stride_ak, stride_bk, stride_bn, stride_lm, stride_lr, stride_rr, stride_rn,
                    stride_cm, stride_cn, K: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr,
                    B_4BIT: tl.constexpr, NESTED: tl.constexpr, W_DTYPE: tl.constexpr, BLOCKSIZE: tl.constexpr,
                    BLOCKSIZE2: tl.constexpr,
                    PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """c[M, N] = a[M, K] @ b[K, N] (+ l[M, rank] @ r[rank, N]) (+ bias[N]), float32 accumulation, one store.
    B_4BIT: b_ptr holds W's packed 4-bit bytes and b[k, n] is W's flat element k * stride_bk + n * stride_bn,
    decoded per K-tile (absmax..offset, BLOCKSIZE, BLOCKSIZE2: its scales, NESTED: double-quantized).
    INTERPRETED: Triton's interpreter, whose bf16 dots and float32 -> bf16 casts are not IEEE: dot operands in
    float32, decoded weights rounded by bits."""
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
        b_offsets = k[:, None] * stride_bk + cols[None, :] * stride_bn
        b_mask = (k[:, None] < K) & col_mask[None, :]
        if B_4BIT:
            b = _load_4bit(b_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, b_offsets, b_mask,
                           BLOCKSIZE, BLOCKSIZE2, NESTED, W_DTYPE, INTERPRETED)
        else:
            b = tl.load(b_ptr + b_offsets, mask=b_mask, other=0.0)
        b = b.to(a.dtype)
        if INTERPRETED:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_LOWRANK:
        rs = tl.arange(0, BLOCK_R)
        low = tl.load(l_ptr + rows[:, None] * stride_lm + rs[None, :] * stride_lr,
                      mask=row_mask[:, None] & (rs[None, :] < rank), other=0.0)
        up = tl.load(r_ptr + rs[:, None] * stride_rr + cols[None, :] * stride_rn,
                     mask=(rs[:, None] < rank) & col_mask[None, :], other=0.0)
        up = up.to(low.dtype)
        if INTERPRETED:
            low, up = low.to(tl.float32), up.to(tl.float32)
        acc = tl.dot(low, up, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def _weight_args(b: torch.Tensor | Packed4bit, placeholder: torch.Tensor) -> dict[str, Any]:
    """The kernel's weight-operand arguments for a dense b [K, N] or a 4-bit one."""
    if not isinstance(b, Packed4bit):
        return dict(b_ptr=b, absmax_ptr=placeholder, code_ptr=placeholder, absmax2_ptr=placeholder,
                    code2_ptr=placeholder, offset_ptr=placeholder, BLOCKSIZE=1, BLOCKSIZE2=1,
                    stride_bk=b.stride(0), stride_bn=b.stride(1), B_4BIT=False, NESTED=False, W_DTYPE=tl.float32)
    nested = b.nested
    return dict(b_ptr=b.data, absmax_ptr=b.absmax, code_ptr=b.code,
                absmax2_ptr=nested.absmax if nested else placeholder, code2_ptr=nested.code if nested else placeholder,
                offset_ptr=nested.offset if nested else placeholder, BLOCKSIZE=b.blocksize,
                BLOCKSIZE2=nested.blocksize if nested else 1, stride_bk=b.strides[0], stride_bn=b.strides[1],
                B_4BIT=True, NESTED=nested is not None, W_DTYPE=getattr(tl, W_DTYPE_NAMES[b.dtype]))


def fused_matmul(a: torch.Tensor, b: torch.Tensor | Packed4bit, low: torch.Tensor | None = None,
                 up: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] @ b [K, N] + low [M, r] @ up [r, N] + bias [N] in a's dtype (b, up: any strides, e.g. W.t(); b may
    be a 4-bit weight, decoded tile by tile). The low-rank product runs in low's dtype (the adapter's: float32 for
    a float32 adapter on bf16 activations)."""
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
    # no fused multiply-add: the double-quantized scale is code2 * absmax2 + offset rounded twice, as bitsandbytes
    _matmul_lowrank[grid](a_ptr=a, l_ptr=low if has_lowrank else a, r_ptr=up if has_lowrank else a,
                          bias_ptr=bias if bias is not None else a, c_ptr=c, M=M, N=N, rank=rank,
                          stride_am=a.stride(0), stride_ak=a.stride(1), stride_lm=low_strides[0],
                          stride_lr=low_strides[1], stride_rr=up_strides[0], stride_rn=up_strides[1],
                          stride_cm=c.stride(0), stride_cn=c.stride(1), K=K, HAS_LOWRANK=has_lowrank,
                          HAS_BIAS=bias is not None, PRECISION=precision, INTERPRETED=is_interpreted(_matmul_lowrank),
                          BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=max(16, next_power_of_2(rank)),
                          GROUP_M=GROUP_M, num_warps=warps, num_stages=stages,
                          enable_fp_fusion=not isinstance(b, Packed4bit), **_weight_args(b, a))
    return c


class LoRALinearFunction(torch.autograd.Function):
    """x [M, in] (and x_lora, the dropped-out copy for the adapter, or None without dropout) -> y [M, out]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_lora: torch.Tensor | None, w: torch.Tensor | Packed4bit, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, bias: torch.Tensor | None) -> torch.Tensor:
        adapter_in = x if x_lora is None else x_lora
        xa = adapter_in.to(lora_A.dtype) @ lora_A.t()  # [M, r]
        y = fused_matmul(x, w.t(), xa * scaling, lora_B.t(), bias)
        ctx.save_for_backward(adapter_in, xa, lora_A, lora_B)
        ctx.weight = w  # a 4-bit one stays packed: the backward decodes it again tile by tile
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
            fused = not ctx.has_dropout
            dx = fused_matmul(dy, ctx.weight, dy_b if fused else None, lora_A if fused else None)
            if ctx.has_dropout:
                dx_lora = (dy_b @ lora_A).to(adapter_in.dtype)
        d_A = dy_b.t() @ adapter_in.to(lora_A.dtype) if need_A else None
        d_B = (dy_adapter.t() @ xa) * ctx.scaling if need_B else None
        return dx, dx_lora, None, d_A, d_B, None, None


def kernel_weight(base_weight: Any) -> torch.Tensor | Packed4bit:
    """W [out, in] as the kernel reads it: a dense tensor as it is, a 4-bit one packed (KernelInputError for a
    4-bit layout the kernel cannot read)."""
    packed = as_packed_4bit(base_weight)
    return base_weight if packed is None else packed


def _check(x: torch.Tensor, w: Any, lora_A: torch.Tensor, lora_B: torch.Tensor, bias: torch.Tensor | None) -> None:
    pair = packed_and_state(w)
    w_shape = tuple(pair[1].shape if pair is not None else w.shape)
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
    pair = packed_and_state(base_weight)
    if not triton_runs(_matmul_lowrank, x, pair[0] if pair is not None else base_weight, lora_A, lora_B):
        return lora_linear_reference(x, base_weight, lora_A, lora_B, scaling, dropout, bias)
    rows = x.reshape(-1, x.shape[-1])
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    rows_lora = F.dropout(rows, dropout) if dropout else None
    weight = kernel_weight(base_weight)
    y = LoRALinearFunction.apply(rows, rows_lora, weight, lora_A, lora_B, float(scaling), bias)
    return y.view(*x.shape[:-1], y.shape[-1])
