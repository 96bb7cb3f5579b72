"""IQ4_NL (blocks of 32) and IQ4_XS (super-blocks of 256 in 8 sub-blocks of 32): numpy references of ggml-quants.c's
quantize_row_iq4_nl_impl as quantize_iq4_nl/quantize_iq4_xs call it (ntry 7; weights x² without an importance
matrix, qw·sqrt(sigma2 + x²) with one). Levels index gguf-py's non-linear table (`kvalues`); dequantizing is gguf-py's (QuantType's default).
"""

from __future__ import annotations

import gguf.quants
import numpy as np
from gguf import GGMLQuantizationType

from mt.quant.kquants import GROUP_MAX_EPS, K_CHUNK_VALUES, largest_magnitude, nearest_int
from mt.quant.types import QuantType

F32 = np.float32
KVALUES = np.asarray(gguf.quants.IQ4_NL.kvalues, dtype=np.int8)  # the 16 levels, ascending
NTRY = 7


def best_index(x: np.ndarray, values: np.ndarray = KVALUES) -> np.ndarray:
    """ggml's best_index_int8: the index of the level nearest x (the upper one on a tie); float32 x -> int."""
    v = values.astype(F32)
    upper = np.clip(np.searchsorted(v, x, side="right"), 1, len(v) - 1)  # first level above x
    below = v[upper - 1]
    nearer_below = (x - below) < (v[upper] - x)
    index = np.where(nearer_below, upper - 1, upper)
    return np.where(x <= v[0], 0, np.where(x >= v[-1], len(v) - 1, index))


def _sums(xt: np.ndarray, wt: np.ndarray, iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """levels of iscale·x and sum w·q·x, sum w·q·q in ggml's order; arrays [n, S]."""
    L = best_index(iscale * xt)
    q = KVALUES.astype(F32)[L]
    sumqx = np.zeros(xt.shape[1], dtype=F32)
    sumq2 = np.zeros(xt.shape[1], dtype=F32)
    for i in range(xt.shape[0]):
        sumqx = sumqx + wt[i] * q[i] * xt[i]
        sumq2 = sumq2 + wt[i] * q[i] * q[i]
    return L, sumqx, sumq2


def block_scales(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The scale search of quantize_row_iq4_nl_impl for each block of 32: x, w [S, 32] -> d [S] (0 where all zero)."""
    xt, wt = np.ascontiguousarray(x.T), np.ascontiguousarray(w.T)
    amax, vmax = largest_magnitude(xt)
    zero = amax < GROUP_MAX_EPS
    safe_max = np.where(zero, F32(1), vmax)
    low = F32(KVALUES[0])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = -safe_max / low
        _, sumqx, sumq2 = _sums(xt, wt, F32(1) / d)
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0))
        best = d * sumqx
        for itry in range(-NTRY, NTRY + 1):
            _, sumqx, sumq2 = _sums(xt, wt, F32(itry + int(KVALUES[0])) / safe_max)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / sumq2, d)
            best = np.where(better, d * sumqx, best)
    return np.where(zero, F32(0), d).astype(F32)


def weights_of(x: np.ndarray, qw: np.ndarray | None, super_block: int) -> np.ndarray:
    """x² without an imatrix; qw·sqrt(sigma2 + x²) with one, sigma2 = 2/n · the super-block's sum of squares."""
    if qw is None:
        return x * x
    blocks = x.reshape(-1, super_block)
    sigma2 = np.zeros(blocks.shape[0], dtype=F32)
    for i in range(super_block):
        sigma2 = sigma2 + blocks[:, i] * blocks[:, i]
    sigma2 = sigma2 * F32(2.0 / super_block)
    return (qw.reshape(-1, super_block) * np.sqrt(sigma2[:, None] + blocks * blocks)).reshape(x.shape)


def pack_nibbles_16(L: np.ndarray) -> np.ndarray:
    """Per 32 levels, byte j holds level j (low nibble) and level 16 + j: [S, 32] -> [S, 16]."""
    L = L.astype(np.uint8)
    return L[:, :16] | (L[:, 16:] << 4)


def iq4_nl_quantize(blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """blocks [N, 32] (qw the same shape, or None) -> block_iq4_nl bytes [N, 18]: d, qs[16]."""
    d = block_scales(blocks, weights_of(blocks, qw, 32))
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0))
    L = best_index(inv[:, None] * blocks)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), pack_nibbles_16(L)], axis=1)


def iq4_xs_quantize(blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """blocks [N, 256] (qw the same shape, or None) -> block_iq4_xs bytes [N, 136]: d, scales_h, scales_l[4], qs."""
    n = blocks.shape[0]
    sub = blocks.reshape(-1, 32)
    scales = block_scales(sub, weights_of(blocks, qw, 256).reshape(-1, 32)).reshape(n, 8)
    _, max_scale = largest_magnitude(scales.T)
    d = -max_scale / F32(32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0))
        levels = np.clip(nearest_int(inv[:, None] * scales), -32, 31)
        dl = d[:, None] * levels.astype(F32)
        idl = np.where(dl != 0, F32(1) / dl, F32(0))
    L = best_index(idl.reshape(-1, 1) * sub)
    lv = (levels + 32).astype(np.uint16)
    scales_l = ((lv[:, 0::2] & 0xF) | ((lv[:, 1::2] & 0xF) << 4)).astype(np.uint8)
    scales_h = np.bitwise_or.reduce((lv >> 4) << (2 * np.arange(8, dtype=np.uint16)), axis=1).astype(np.uint16)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), scales_h.view(np.uint8).reshape(-1, 2),
                           scales_l, pack_nibbles_16(L).reshape(n, 128)], axis=1)


class IQ4_NL(QuantType):
    ggml_type = GGMLQuantizationType.IQ4_NL
    chunk_values = K_CHUNK_VALUES
    kernel = weighted_kernel = "iq4_nl"

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return iq4_nl_quantize(blocks)


class IQ4_XS(QuantType):
    ggml_type = GGMLQuantizationType.IQ4_XS
    chunk_values = K_CHUNK_VALUES
    kernel = weighted_kernel = "iq4_xs"
    triton = True

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return iq4_xs_quantize(blocks)
