"""RMSNorm: y = x / sqrt(mean(x²) + eps) * (offset + weight), over the last dimension.

offset=0 is Llama/Mistral/Qwen's RMSNorm, offset=1 Gemma's (its weight is stored as w - 1). Arithmetic is in
float32 and y is rounded once to x's dtype. (transformers' LlamaRMSNorm rounds x·rstd to x's dtype before it
multiplies by the weight; for bf16 inputs the two differ by bf16 rounding.)

Triton: the forward kernel runs one row per program and keeps rstd (float32, one per row) for the backward;
the backward kernel gives each program a stripe of rows and one float32 partial sum of dweight, which are
added up in torch.
"""

from __future__ import annotations

import torch

from mt.kernels._triton import jit, next_power_of_2, tl, triton_runs
from mt.kernels.errors import KernelInputError


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (offset + weight.float())).to(x.dtype)


@jit
def _rms_norm_forward(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, x_row_stride, y_row_stride, eps, offset,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    rstd = tl.math.rsqrt(tl.reduce(x * x, 0, tl.standard._sum_combine) / n_cols + eps)
    tl.store(y_ptr + row * y_row_stride + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@jit
def _rms_norm_backward(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, n_rows, n_cols, dy_row_stride,
                       x_row_stride, dx_row_stride, offset, ROWS_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    dw = tl.full([BLOCK], 0.0, tl.float32)
    for i in range(0, ROWS_PER_PROGRAM):
        row = program.to(tl.int64) * ROWS_PER_PROGRAM + i
        mask = col_mask & (row < n_rows)
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < n_rows, other=0.0)
        x_hat = x * rstd
        g = dy * w
        mean_g_xhat = tl.reduce(g * x_hat, 0, tl.standard._sum_combine) / n_cols
        dx = rstd * (g - x_hat * mean_g_xhat)
        tl.store(dx_ptr + row * dx_row_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(dw_partial_ptr + program * n_cols + cols, dw, mask=col_mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, cols] with unit column stride (a view when x allows it)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _num_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def _backward_split(x: torch.Tensor, n_rows: int) -> tuple[int, int]:
    """(programs, rows per program): about 4 programs per SM, rows per program a power of two (a constexpr:
    loop bounds that vary at run time are not interpretable, and powers of two keep the compiled variants few)."""
    parallel = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    rows_per_program = next_power_of_2(max(1, -(-n_rows // parallel)))
    return -(-n_rows // rows_per_program), rows_per_program


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        rows = _rows(x)
        n_rows, n_cols = rows.shape
        # y is returned as allocated, not as a view made here: autograd forbids modifying in place a view made
        # inside a Function (Qwen3 rotates a transposed view of its q_norm output in place)
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = next_power_of_2(n_cols)
        _rms_norm_forward[(n_rows,)](rows, weight, y, rstd, n_cols, rows.stride(0), n_cols, eps, offset,
                                     BLOCK=block, num_warps=_num_warps(block))
        ctx.save_for_backward(rows, weight, rstd)
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        rows, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = rows.shape
        dy_rows = _rows(dy)
        dx = torch.empty_like(rows)
        programs, rows_per_program = _backward_split(rows, n_rows)
        dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=rows.device)
        block = next_power_of_2(n_cols)
        _rms_norm_backward[(programs,)](dy_rows, rows, weight, rstd, dx, dw_partial, n_rows, n_cols, dy_rows.stride(0),
                                        rows.stride(0), dx.stride(0), ctx.offset, ROWS_PER_PROGRAM=rows_per_program,
                                        BLOCK=block, num_warps=_num_warps(block))
        dw = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(dy.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm of x [..., hidden] with weight [hidden]; Triton on CUDA (or interpreted), the reference otherwise."""
    if weight.shape != x.shape[-1:]:
        raise KernelInputError(f"rms_norm: weight {tuple(weight.shape)} does not fit x {tuple(x.shape)} (weight is "
                               "[hidden], x [..., hidden])")
    if triton_runs(_rms_norm_forward, x, weight):
        return RMSNormFunction.apply(x, weight, float(eps), float(offset))
    return rms_norm_reference(x, weight, eps, offset)
