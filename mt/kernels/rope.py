"""Rotary position embeddings applied to Q and K in place, in transformers' rotate-half convention.

    out = x * cos + rotate_half(x) * sin,  rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2])

as `transformers.models.llama.modeling_llama.apply_rotary_pos_emb` computes it. q is [batch, q_heads, seq, d] and
k [batch, kv_heads, seq, d], any strides with a unit stride on d (so a transposed view of [batch, seq, heads, d]
is rotated in place too). cos/sin come in one of two forms:
- without position_ids: transformers' position embeddings, [batch or 1, seq, d], one row per token;
- with position_ids [batch or 1, seq]: tables [max_positions, d] indexed by position. Packed sequences are
  position ids that restart at 0 for each sample packed into a row.
cos and sin get no gradient.

Triton: one program per token rotates all its heads (a [heads, d/2] tile per half) and stores in place; the
backward applies the transposed rotation to the incoming gradient into a new tensor.
"""

from __future__ import annotations

import torch

from mt.kernels._triton import jit, next_power_of_2, tl, triton_runs
from mt.kernels.errors import KernelInputError


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of q and k (cos/sin gathered at position_ids first when those are given)."""
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@jit
def _rope_rotate(x_ptr, out_ptr, cos_ptr, sin_ptr, row_of_token_ptr, seq_len, n_heads,
                 x_stride_b, x_stride_h, x_stride_s, out_stride_b, out_stride_h, out_stride_s, cos_row_stride,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr):
    token = tl.program_id(0)
    b = (token // seq_len).to(tl.int64)
    s = (token % seq_len).to(tl.int64)
    row = tl.load(row_of_token_ptr + token).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    cos1 = tl.load(cos_ptr + row * cos_row_stride + d, mask=d_mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + row * cos_row_stride + HALF + d, mask=d_mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + row * cos_row_stride + d, mask=d_mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + row * cos_row_stride + HALF + d, mask=d_mask, other=0.0).to(tl.float32)
    h = tl.arange(0, BLOCK_H)
    mask = (h[:, None] < n_heads) & d_mask[None, :]
    x1_ptrs = x_ptr + b * x_stride_b + s * x_stride_s + h[:, None] * x_stride_h + d[None, :]
    x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x1_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transposed rotation
        out1 = x1 * cos1[None, :] + x2 * sin2[None, :]
        out2 = x2 * cos2[None, :] - x1 * sin1[None, :]
    else:
        out1 = x1 * cos1[None, :] - x2 * sin1[None, :]
        out2 = x2 * cos2[None, :] + x1 * sin2[None, :]
    out1_ptrs = out_ptr + b * out_stride_b + s * out_stride_s + h[:, None] * out_stride_h + d[None, :]
    tl.store(out1_ptrs, out1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out1_ptrs + HALF, out2.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, out: torch.Tensor, cos_rows: torch.Tensor, sin_rows: torch.Tensor,
            row_of_token: torch.Tensor, backward: bool) -> None:
    batch, n_heads, seq_len, head_dim = x.shape
    half = head_dim // 2
    _rope_rotate[(batch * seq_len,)](x, out, cos_rows, sin_rows, row_of_token, seq_len, n_heads,
                                      x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
                                      out.stride(2), cos_rows.stride(0), HALF=half, BLOCK_H=next_power_of_2(n_heads),
                                      BLOCK_HALF=next_power_of_2(half), BACKWARD=backward,
                                      num_warps=4 if n_heads * half <= 2048 else 8)


class RopeFunction(torch.autograd.Function):
    """Rotates one tensor in place. One tensor per Function: autograd refuses a Function that modifies a view in
    place (attention's q is a transposed view of the projection) and returns more than one tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos_rows: torch.Tensor, sin_rows: torch.Tensor,
                row_of_token: torch.Tensor) -> torch.Tensor:
        _launch(x, x, cos_rows, sin_rows, row_of_token, backward=False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos_rows, sin_rows, row_of_token)
        return x

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos_rows, sin_rows, row_of_token = ctx.saved_tensors
        dx = torch.empty_like(dy, memory_format=torch.contiguous_format)
        _launch(_unit_last_stride(dy), dx, cos_rows, sin_rows, row_of_token, backward=True)
        return dx, None, None, None


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           position_ids: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise KernelInputError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be [batch, heads, seq, head_dim]")
    batch, _, seq_len, head_dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq_len, head_dim) or head_dim % 2:
        raise KernelInputError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, seq or an even "
                               "head_dim")
    if cos.shape != sin.shape or cos.shape[-1] != head_dim:
        raise KernelInputError(f"rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must end in head_dim "
                               f"{head_dim}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise KernelInputError("rope: q and k are rotated in place and need a unit stride on head_dim")
    if position_ids is None:
        if cos.dim() != 3 or cos.shape[0] not in (1, batch) or cos.shape[1] != seq_len:
            raise KernelInputError(f"rope: cos {tuple(cos.shape)} must be [batch or 1, {seq_len}, {head_dim}] "
                                   "without position_ids")
        return
    if cos.dim() != 2 or position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) \
            or position_ids.shape[1] != seq_len:
        raise KernelInputError(f"rope: with position_ids {tuple(position_ids.shape)} [batch or 1, {seq_len}], cos "
                               f"{tuple(cos.shape)} must be a table [max_positions, {head_dim}]")
    if position_ids.numel() and (position_ids.min() < 0 or position_ids.max() >= cos.shape[0]):
        raise KernelInputError(f"rope: position_ids reach outside the cos/sin table of {cos.shape[0]} positions")


def _row_of_token(cos: torch.Tensor, position_ids: torch.Tensor | None, batch: int,
                  seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the cos/sin rows as [rows, d], the row of each token [batch * seq] as int32)."""
    if position_ids is not None:
        return cos, position_ids.expand(batch, seq_len).reshape(-1).to(torch.int32)
    tokens = torch.arange(seq_len, device=cos.device, dtype=torch.int32)
    per_batch = tokens.expand(batch, seq_len)
    if cos.shape[0] == batch:
        per_batch = per_batch + seq_len * torch.arange(batch, device=cos.device, dtype=torch.int32)[:, None]
    return cos.reshape(-1, cos.shape[-1]), per_batch.reshape(-1)


def apply_rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k in place (and return them); Triton on CUDA (or interpreted), the reference otherwise."""
    _check(q, k, cos, sin, position_ids)
    if not triton_runs(_rope_rotate, q, k, cos, sin):
        q_rotated, k_rotated = rope_reference(q, k, cos, sin, position_ids)
        return q.copy_(q_rotated), k.copy_(k_rotated)
    batch, _, seq_len, _ = q.shape
    cos_rows, row_of_token = _row_of_token(cos, position_ids, batch, seq_len)
    sin_rows = sin.reshape(cos_rows.shape)
    cos_rows, sin_rows = _unit_last_stride(cos_rows), _unit_last_stride(sin_rows)
    if sin_rows.stride(0) != cos_rows.stride(0):
        cos_rows, sin_rows = cos_rows.contiguous(), sin_rows.contiguous()
    return (RopeFunction.apply(q, cos_rows, sin_rows, row_of_token),
            RopeFunction.apply(k, cos_rows, sin_rows, row_of_token))
