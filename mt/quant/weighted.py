"""Quantizers with an importance matrix: numpy references of ggml-quants.c's quantize_row_*_impl.

llama.cpp hands ggml_quantize_chunk one float per column of the tensor (the mean squared activation
that column met, from the imatrix); ggml then weighs every error by it. These run the same float32
arithmetic in ggml's order, vectorised across blocks (S sub-blocks; per-position loops on [n, S]
copies), so the bytes equal ggml's. Work is cut into whole rows because the legacy types (Q4_0,
Q4_1, Q5_0, Q5_1) scale their weights by the mean square of the whole row.

Types without an imatrix path (Q8_0, F16, BF16, F32) ignore the weights, as ggml does.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as T

from mt.errors import QuantizationError
from mt.quant.kquants import (
    GROUP_MAX_EPS,
    K_CHUNK_VALUES,
    QK_K,
    make_qkx2_quants,
    make_qx_quants_rmse1,
    nearest_int,
    pack_scale_min_k4,
    q4_k_bytes,
    q5_k_bytes,
    q6_k_bytes,
    requantize_affine,
)
from mt.quant.legacy import QK, fp16_bytes, pack_high_bits, pack_nibbles
from mt.quant.iq4 import iq4_nl_quantize, iq4_xs_quantize
from mt.quant.low_kquants import pack_q3_scales, q2_k_bytes, q3_k_bytes, requantize_q2
from mt.quant.types import QuantType, compiled_kernel, quant_backend, quant_type, registered, run_chunked, types_with

F32 = np.float32
RowQuantizer = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (rows [R, n], weights [n]) -> bytes [R, row_size]
RowWriter = Callable[[np.ndarray, np.ndarray, np.ndarray], None]  # (rows [R, n], weights [n], out [R, row_size])


def ordered_sum(t: np.ndarray) -> np.ndarray:
    """sum over axis 0 of [n, S], one position after another as ggml's loop adds them -> [S]."""
    total = np.zeros(t.shape[1], dtype=F32)
    for i in range(t.shape[0]):
        total = total + t[i]
    return total


def make_qp_quants(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants(n, nmax, x, L, quant_weights): the scales (or mins) of one super-block quantized
    to 0..nmax against one scale. x, w [S, n] -> (scale [S], L [S, n] uint8).

    ggml keeps L in uint8 (a negative level wraps) while some sums use the int level, so both are kept.
    """
    xt, wt = np.ascontiguousarray(x.T), np.ascontiguousarray(w.T)
    n = xt.shape[0]
    vmax = np.zeros(xt.shape[1], dtype=F32)
    for i in range(n):
        vmax = np.maximum(vmax, xt[i])
    zero = vmax < GROUP_MAX_EPS
    safe_max = np.where(zero, F32(1), vmax)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / safe_max
        scale = F32(1) / iscale
        first = (nearest_int(iscale * xt) & 0xFF).astype(F32)
        best = ordered_sum(wt * (xt - scale * first) * (xt - scale * first))
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            iscale_step = (F32(0.1) * F32(step) + F32(nmax)) / safe_max
            scale_step = F32(1) / iscale_step
            levels = np.minimum(nmax, nearest_int(iscale_step * xt)).astype(F32)
            diff = xt - scale_step * levels
            mse = ordered_sum(wt * diff * diff)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, iscale_step, iscale)
        levels = np.minimum(nmax, nearest_int(iscale * xt))
        L = levels & 0xFF
        lf = levels.astype(F32)
        wx = wt * xt
        sumlx = ordered_sum(wx * lf)
        suml2 = ordered_sum(wt * lf * lf)
        # the coordinate descent: a block with no change in a round would repeat it unchanged, so all run 5
        for _ in range(5):
            for i in range(n):
                old = L[i].astype(F32)
                slx = sumlx - wx[i] * old
                sl2 = suml2 - wt[i] * old * old
                movable = (slx > 0) & (sl2 > 0)
                new_l = np.minimum(nmax, nearest_int(xt[i] * sl2 / np.where(movable, slx, F32(1))))
                nf = new_l.astype(F32)
                slx = slx + wx[i] * nf
                sl2 = sl2 + wt[i] * nf * nf
                accept = movable & (new_l != L[i]) & (slx * slx * suml2 > sumlx * sumlx * sl2)
                L[i] = np.where(accept, new_l & 0xFF, L[i])
                sumlx = np.where(accept, slx, sumlx)
                suml2 = np.where(accept, sl2, suml2)
        scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0))
    L = np.where(zero, 0, L)
    return np.where(zero, F32(0), scale).astype(F32), np.ascontiguousarray(L.T).astype(np.uint8)


def block_weights(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """weights = qw * sqrtf(sigma2 + x²): x, qw [B, n], sigma2 [B] -> [B, n]."""
    return qw * np.sqrt(sigma2[:, None] + x * x)


def tile_weights(qw: np.ndarray, n_rows: int, block: int) -> np.ndarray:
    """The row's weights [n] repeated for every row, cut like the rows' blocks -> [n_rows * n / block, block]."""
    return np.broadcast_to(qw, (n_rows, qw.shape[0])).reshape(-1, block)


def affine_k_impl(rows: np.ndarray, qw: np.ndarray, nmax: int, clamp_levels: bool) -> tuple[np.ndarray, ...]:
    """quantize_row_q{4,5}_K_impl up to the packing: (d, dmin fp16 [N], scales [N, 12], L [N, 256])."""
    blocks = rows.reshape(-1, QK_K)
    n_blocks = blocks.shape[0]
    sigma2 = F32(2) * ordered_sum(np.ascontiguousarray(blocks.T) ** 2) / F32(QK_K)
    weights = block_weights(blocks, tile_weights(qw, rows.shape[0], QK_K), sigma2)
    sub, sub_w = blocks.reshape(-1, 32), weights.reshape(-1, 32)
    sw = ordered_sum(np.ascontiguousarray(sub_w.T)).reshape(n_blocks, 8)
    scales, mins, L = make_qkx2_quants(sub, sub_w, nmax, -0.9, 0.05, 36)  # make_qkx3_quants with weights
    d_block, ls = make_qp_quants(scales.reshape(n_blocks, 8), sw, 63)
    m_block, lm = make_qp_quants(mins.reshape(n_blocks, 8), sw, 63)
    if clamp_levels:  # Q5_K clamps to 63; Q4_K stores make_qp_quants' levels as they are
        ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    packed = pack_scale_min_k4(ls, lm)
    d, dmin = d_block.astype(np.float16), m_block.astype(np.float16)
    return d, dmin, packed, requantize_affine(blocks, d, dmin, packed, L.reshape(n_blocks, 256), nmax)


def q4_k_rows(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    return q4_k_bytes(*affine_k_impl(rows, qw, 15, clamp_levels=False))


def q5_k_rows(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    return q5_k_bytes(*affine_k_impl(rows, qw, 31, clamp_levels=True))


def q6_k_rows(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_impl: make_qx_quants weighs by the imatrix alone (no sigma2 term)."""
    blocks = rows.reshape(-1, QK_K)
    scales, L = make_qx_quants_rmse1(blocks.reshape(-1, 16), 32, tile_weights(qw, rows.shape[0], 16))
    return q6_k_bytes(blocks, scales, L)


def q2_k_rows(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """quantize_row_q2_K_impl: sigma2 is the super-block's mean square; scales and mins against make_qp_quants."""
    blocks = rows.reshape(-1, QK_K)
    n_blocks = blocks.shape[0]
    sigma2 = ordered_sum(np.ascontiguousarray(blocks.T) ** 2) / F32(QK_K)
    weights = block_weights(blocks, tile_weights(qw, rows.shape[0], QK_K), sigma2)
    sub, sub_w = blocks.reshape(-1, 16), weights.reshape(-1, 16)
    sw = ordered_sum(np.ascontiguousarray(sub_w.T)).reshape(n_blocks, 16)
    scales, mins, L = make_qkx2_quants(sub, sub_w, 3, -0.9, 0.05, 36)  # make_qkx3_quants with weights
    d_block, ls = make_qp_quants(scales.reshape(n_blocks, 16), sw, 15)
    m_block, lm = make_qp_quants(mins.reshape(n_blocks, 16), sw, 15)
    sc = (ls | (lm << 4)).astype(np.uint8)
    d, dmin = d_block.astype(np.float16), m_block.astype(np.float16)
    return q2_k_bytes(sc, requantize_q2(blocks, d, dmin, sc, L.reshape(n_blocks, QK_K)), d, dmin)


def q3_k_rows(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """quantize_row_q3_K_impl: make_qx_quants on the values, then on the 16 scales weighed by their sums."""
    blocks = rows.reshape(-1, QK_K)
    n_blocks = blocks.shape[0]
    sigma2 = F32(2) * ordered_sum(np.ascontiguousarray(blocks.T) ** 2) / F32(QK_K)
    weights = block_weights(blocks, tile_weights(qw, rows.shape[0], QK_K), sigma2)
    sub, sub_w = blocks.reshape(-1, 16), weights.reshape(-1, 16)
    sw = ordered_sum(np.ascontiguousarray(sub_w.T)).reshape(n_blocks, 16)
    scales, L = make_qx_quants_rmse1(sub, 4, sub_w)
    d_block, levels = make_qx_quants_rmse1(scales.reshape(n_blocks, 16), 32, sw)
    return q3_k_bytes(blocks, pack_q3_scales(levels), d_block.astype(np.float16), L.reshape(n_blocks, QK_K))


def iq4_nl_rows(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    return iq4_nl_quantize(rows.reshape(-1, QK), tile_weights(qw, rows.shape[0], QK)).reshape(rows.shape[0], -1)


def iq4_xs_rows(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    return iq4_xs_quantize(rows.reshape(-1, QK_K), tile_weights(qw, rows.shape[0], QK_K)).reshape(rows.shape[0], -1)


def legacy_weights(rows: np.ndarray, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The legacy impls' blocks [B, 32] and weights qw * sqrtf(sigma2 + x²), sigma2 = the row's mean square."""
    sigma2 = ordered_sum(np.ascontiguousarray(rows.T) ** 2) / F32(rows.shape[1])
    blocks = rows.reshape(-1, QK)
    per_block = np.repeat(sigma2, rows.shape[1] // QK)
    return blocks, block_weights(blocks, tile_weights(qw, rows.shape[0], QK), per_block)


def q4_0_rows(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    blocks, w = legacy_weights(rows, qw)
    d, L = make_qx_quants_rmse1(blocks, 8, w)
    q = L.view(np.uint8)
    return np.concatenate([fp16_bytes(d), q[:, :16] | (q[:, 16:] << 4)], axis=1).reshape(rows.shape[0], -1)


def q5_0_rows(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    blocks, w = legacy_weights(rows, qw)
    d, L = make_qx_quants_rmse1(blocks, 16, w)
    q = L.view(np.uint8)
    return np.concatenate([fp16_bytes(d), pack_high_bits(q), pack_nibbles(q)], axis=1).reshape(rows.shape[0], -1)


def affine_legacy(rows: np.ndarray, qw: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1/Q5_1: make_qkx3_quants per block -> (d fp16 bytes, m fp16 bytes, L [B, 32])."""
    blocks, w = legacy_weights(rows, qw)
    d, the_min, L = make_qkx2_quants(blocks, w, nmax, -0.9, 0.05, 36)
    return fp16_bytes(d), fp16_bytes(-the_min), L  # the block stores the (negative) minimum itself


def q4_1_rows(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    d, m, L = affine_legacy(rows, qw, 15)
    return np.concatenate([d, m, L[:, :16] | (L[:, 16:] << 4)], axis=1).reshape(rows.shape[0], -1)


def q5_1_rows(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    d, m, L = affine_legacy(rows, qw, 31)
    return np.concatenate([d, m, pack_high_bits(L), pack_nibbles(L)], axis=1).reshape(rows.shape[0], -1)


WEIGHTED: dict[T, RowQuantizer] = {
    T.Q2_K: q2_k_rows, T.Q3_K: q3_k_rows, T.Q4_K: q4_k_rows, T.Q5_K: q5_k_rows, T.Q6_K: q6_k_rows,
    T.Q4_0: q4_0_rows, T.Q4_1: q4_1_rows, T.Q5_0: q5_0_rows, T.Q5_1: q5_1_rows,
    T.IQ4_NL: iq4_nl_rows, T.IQ4_XS: iq4_xs_rows,
}


def blockwise_rows(qt: type[QuantType]) -> RowQuantizer:
    """rows [R, n] with weights [n] through a type's `quantize_blocks_weighted` (its weights cut like its blocks)."""

    def quantize_rows(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
        blocks = rows.reshape(-1, qt.block_size)
        weights = np.ascontiguousarray(tile_weights(qw, rows.shape[0], qt.block_size))
        return qt.quantize_blocks_weighted(blocks, weights).reshape(rows.shape[0], -1)

    return quantize_rows


WEIGHTED.update({t: blockwise_rows(qt) for t, qt in registered().items()
                 if qt.quantize_blocks_weighted.__func__ is not QuantType.quantize_blocks_weighted.__func__})


def uses_weights(ggml_type: T) -> bool:
    return ggml_type in WEIGHTED


COMPILED_WEIGHTED = {t: quant_type(t).weighted_kernel for t in types_with("weighted_kernel")}  # in mt.quant.compiled


def compiled_row_writer(name: str, block: int = QK_K) -> RowWriter:
    """The compiled imatrix kernel `name` over blocks of `block` values."""
    kernel = compiled_kernel(name, "WEIGHTED_KERNELS")

    def write(rows: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
        kernel(rows.reshape(-1, block), qw.reshape(-1, block), out.reshape(rows.size // block, -1))

    return write


def row_writer(ggml_type: T, backend: str | None = None) -> RowWriter:
    """The compiled kernel where there is one and the backend is `compiled`, else the numpy reference."""
    if ggml_type in COMPILED_WEIGHTED and quant_backend(backend) == "compiled":
        return compiled_row_writer(COMPILED_WEIGHTED[ggml_type], quant_type(ggml_type).block_size)
    quantize_rows = WEIGHTED[ggml_type]

    def write(rows: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
        out[...] = quantize_rows(rows, qw).reshape(out.shape)

    return write


def quantize_weighted(ggml_type: T, data: np.ndarray, weights: np.ndarray,
                      to_f32: Callable[[np.ndarray], np.ndarray] | None = None, *,
                      backend: str | None = None) -> np.ndarray:
    """ggml_quantize_chunk(type, data, ..., imatrix=weights): float32 (or storage for `to_f32`)
    [rows, n] with weights [n] -> bytes [rows, row_size]. Whole rows per work item, on the thread pool.
    `backend`: see `quant_backend`."""
    qt = quant_type(ggml_type)
    if ggml_type not in WEIGHTED:
        return qt.quantize(data, to_f32, backend=backend)
    n = data.shape[-1]
    qt.check_row(n)
    if weights.shape != (n,):
        raise QuantizationError(f"{weights.shape[0]} importance weights for rows of {n} values",
                                "use the imatrix computed for this model")
    rows = np.ascontiguousarray(data).reshape(-1, n)
    convert = to_f32 or (lambda a: a.astype(np.float32, copy=False))
    qw = np.ascontiguousarray(weights, dtype=np.float32)
    out = np.empty((rows.shape[0], n // qt.block_size * qt.type_size), dtype=np.uint8)
    step = max(1, min(K_CHUNK_VALUES, qt.chunk_values or K_CHUNK_VALUES) // n)
    write = row_writer(ggml_type, backend)

    def run(start: int) -> None:
        chunk = np.ascontiguousarray(convert(rows[start : start + step]), dtype=np.float32)
        write(chunk, qw, out[start : start + step])

    run_chunked(rows.shape[0], step, run)
    return out.reshape(*data.shape[:-1], out.shape[1])
