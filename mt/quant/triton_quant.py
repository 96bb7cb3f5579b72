"""Triton kernels for Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_XS that write ggml's bytes (quantize_row_*_ref;
IQ4_XS: quantize_iq4_xs without an importance matrix).

One lane is one block (Q8_0) or one super-block (K-quants); every sum runs over the positions in
ggml's order in a static loop, so no tree reduction reorders it. Exactness on a GPU rests on:
- launching with enable_fp_fusion=False (ggml-base is plain float32 C without FMA contraction);
- tl.math.div_rn / sqrt_rn: Triton's `/` on fp32 lowers to an approximate division on NVIDIA;
- nearest_int as ggml writes it (add 1.5 * 2^23, read the mantissa), roundf as x + (0.5 - 2^-25)
  with the sign of x, truncated;
- fp16 through .to(tl.float16), round to nearest even like F16C / numpy.

Layouts: the input is handed over position-major, xt [block_size, n_lanes], and the output comes
back byte-major, [type_size, n_lanes], so that the lanes of a warp touch consecutive addresses;
`quantize_blocks` does both transposes in torch. A scratch [fields * sub-blocks, n_lanes] float32
buffer carries per-sub-block results from the first pass to the packing pass.

Under TRITON_INTERPRET=1 (set before triton is imported) the same kernels run on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import IQ4_NL as _IQ4_FORMAT

# tl.full rather than tl.zeros throughout: tl.zeros is a @jit helper of triton's standard library, which the
# interpreter cannot run when triton was imported before TRITON_INTERPRET was set (transformers imports it).
LANES = 64  # lanes (blocks) per program
NUM_WARPS = 2
IQ4_VALUES = [float(v) for v in _IQ4_FORMAT.kvalues]  # IQ4_NL/IQ4_XS's 16 levels, ascending
MAX_LANES_PER_LAUNCH = 1 << 20  # offsets stay below 2^31 (256 positions or 210 bytes x 2^20 lanes)


@triton.jit
def _nearest_int(v):
    """ggml's nearest_int: round half to even through the float32 mantissa."""
    return ((v + 12582912.0).to(tl.int32, bitcast=True) & 0x007FFFFF) - 0x00400000


@triton.jit
def _clamp(v, lo: tl.constexpr, hi: tl.constexpr):
    return tl.minimum(tl.maximum(v, lo), hi)


@triton.jit
def _store_byte(out_ptr, index, n_lanes, lanes, mask, value):
    tl.store(out_ptr + index * n_lanes + lanes, (value & 0xFF).to(tl.uint8), mask=mask)


@triton.jit
def _store_fp16(out_ptr, index, n_lanes, lanes, mask, value):
    """float32 -> fp16 (round to nearest even), little-endian bytes at index, index + 1."""
    bits = value.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    _store_byte(out_ptr, index, n_lanes, lanes, mask, bits)
    _store_byte(out_ptr, index + 1, n_lanes, lanes, mask, bits >> 8)


@triton.jit
def _x(xt_ptr, position, n_lanes, lanes, mask):
    return tl.load(xt_ptr + position * n_lanes + lanes, mask=mask, other=0.0)


@triton.jit
def _largest_magnitude(xt_ptr, base, n_lanes, lanes, mask, N: tl.constexpr, LANES: tl.constexpr):
    """Over positions base.. base + N of each lane: (the largest |x|, the first value holding it), as ggml's loop."""
    amax = tl.full([LANES], 0.0, tl.float32)
    vmax = tl.full([LANES], 0.0, tl.float32)
    for i in tl.static_range(N):
        v = _x(xt_ptr, base + i, n_lanes, lanes, mask)
        a = tl.abs(v)
        bigger = a > amax
        amax = tl.where(bigger, a, amax)
        vmax = tl.where(bigger, v, vmax)
    return amax, vmax


# ---------------------------------------------------------------------------------------------- Q8_0


@triton.jit
def _q8_0_kernel(xt_ptr, out_ptr, n_lanes, LANES: tl.constexpr):
    lanes = tl.program_id(0) * LANES + tl.arange(0, LANES)
    mask = lanes < n_lanes
    amax = tl.full([LANES], 0.0, tl.float32)
    for i in tl.static_range(32):
        a = tl.abs(_x(xt_ptr, i, n_lanes, lanes, mask))
        amax = tl.where(amax > a, amax, a)
    d = tl.math.div_rn(amax, 127.0)
    inv = tl.where(d != 0.0, tl.math.div_rn(tl.full([LANES], 1.0, tl.float32), d), 0.0)
    _store_fp16(out_ptr, 0, n_lanes, lanes, mask, d)
    for i in tl.static_range(32):
        v = _x(xt_ptr, i, n_lanes, lanes, mask) * inv
        half = tl.where(v < 0.0, -0.4999999701976776123046875, 0.4999999701976776123046875)
        q = (v + half).to(tl.int32)  # truncation: C roundf (half away from zero)
        _store_byte(out_ptr, 2 + i, n_lanes, lanes, mask, q)


# ------------------------------------------------------------------------------------- Q4_K / Q5_K
# scratch fields, each [8, n_lanes]: 0 scale (later d*sc), 1 -min (later dmin*m),
# 2 and 3 the iscale and min that produced make_qkx2_quants' best L (kept where d*sc == 0)


@triton.jit
def _scratch(ptr, field, sub, n_sub: tl.constexpr, n_lanes, lanes):
    return ptr + (field * n_sub + sub) * n_lanes + lanes


@triton.jit
def _qkx2_error(xt_ptr, base, n_lanes, lanes, mask, av_x, iscale, lmin, scale, vmin, NMAX: tl.constexpr,
                SUB: tl.constexpr, MAD: tl.constexpr):
    """sum of w * (scale * L + vmin - x)^2 (|…| with MAD) in order, L = clamp(nearest_int(iscale * (x - lmin)))."""
    err = tl.full(av_x.shape, 0.0, tl.float32)
    for i in tl.static_range(SUB):
        v = _x(xt_ptr, base + i, n_lanes, lanes, mask)
        w = av_x + tl.abs(v)
        l = _clamp(_nearest_int(iscale * (v - lmin)), 0, NMAX).to(tl.float32)
        diff = scale * l + vmin - v
        if MAD:
            err = err + w * tl.abs(diff)
        else:
            err = err + w * (diff * diff)
    return err


@triton.jit
def _make_qkx2_quants(xt_ptr, scratch_ptr, sub, n_lanes, lanes, mask, NMAX: tl.constexpr, RMIN: tl.constexpr,
                      NSTEP: tl.constexpr, LANES: tl.constexpr, SUB: tl.constexpr = 32, N_SUB: tl.constexpr = 8,
                      AV_X: tl.constexpr = True, MAD: tl.constexpr = False):
    """Sub-block `sub` (SUB values) of each lane: weights (av_x + |x| for Q4_K/Q5_K, |x| for Q2_K: av_x 0), then
    make_qkx2_quants; -> (scale, -min)."""
    base = sub * SUB
    av_x = tl.full([LANES], 0.0, tl.float32)
    if AV_X:
        sum_x2 = tl.full([LANES], 0.0, tl.float32)
        for i in tl.static_range(SUB):
            v = _x(xt_ptr, base + i, n_lanes, lanes, mask)
            sum_x2 = sum_x2 + v * v
        av_x = tl.math.sqrt_rn(tl.math.div_rn(sum_x2, SUB * 1.0))
    x0 = _x(xt_ptr, base, n_lanes, lanes, mask)
    vmin = x0
    vmax = x0
    sum_w = av_x + tl.abs(x0)
    sum_x = sum_w * x0
    for i in tl.static_range(1, SUB):
        v = _x(xt_ptr, base + i, n_lanes, lanes, mask)
        w = av_x + tl.abs(v)
        vmin = tl.where(v < vmin, v, vmin)
        vmax = tl.where(v > vmax, v, vmax)
        sum_w = sum_w + w
        sum_x = sum_x + w * v
    vmin = tl.where(vmin > 0.0, 0.0, vmin)
    flat = vmax == vmin
    nmax = tl.full([LANES], NMAX, tl.float32)
    iscale = tl.math.div_rn(nmax, tl.where(flat, 1.0, vmax - vmin))
    scale = tl.math.div_rn(tl.full([LANES], 1.0, tl.float32), iscale)
    best = _qkx2_error(xt_ptr, base, n_lanes, lanes, mask, av_x, iscale, vmin, scale, vmin, NMAX, SUB, MAD)
    best_iscale = iscale
    best_lmin = vmin
    cur_min = vmin
    step = tl.full([LANES], 0.0, tl.float32)  # ggml's `is` as float, carried (0, 1, ... NSTEP)
    for _ in range(NSTEP + 1):
        step_iscale = tl.math.div_rn(step * 0.1 + RMIN + nmax, tl.where(flat, 1.0, vmax - cur_min))
        sum_l = tl.full([LANES], 0.0, tl.float32)
        sum_l2 = tl.full([LANES], 0.0, tl.float32)
        sum_xl = tl.full([LANES], 0.0, tl.float32)
        for i in tl.static_range(SUB):
            v = _x(xt_ptr, base + i, n_lanes, lanes, mask)
            w = av_x + tl.abs(v)
            l = _clamp(_nearest_int(step_iscale * (v - cur_min)), 0, NMAX).to(tl.float32)
            wl = w * l
            sum_l = sum_l + wl
            sum_l2 = sum_l2 + wl * l
            sum_xl = sum_xl + wl * v
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = tl.math.div_rn(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = tl.math.div_rn(sum_l2 * sum_x - sum_l * sum_xl, D)
        positive_min = this_min > 0.0
        this_min = tl.where(positive_min, 0.0, this_min)
        this_scale = tl.where(positive_min, tl.math.div_rn(sum_xl, sum_l2), this_scale)
        err = _qkx2_error(xt_ptr, base, n_lanes, lanes, mask, av_x, step_iscale, cur_min, this_scale, this_min, NMAX,
                          SUB, MAD)
        better = (D > 0.0) & (err < best) & ~flat
        best = tl.where(better, err, best)
        scale = tl.where(better, this_scale, scale)
        best_iscale = tl.where(better, step_iscale, best_iscale)
        best_lmin = tl.where(better, cur_min, best_lmin)
        cur_min = tl.where(better, this_min, cur_min)  # ggml measures later steps from the new min
        step = step + 1.0
    scale = tl.where(flat, 0.0, scale)
    best_iscale = tl.where(flat, 0.0, best_iscale)  # L = 0 for a flat sub-block
    neg_min = -cur_min
    tl.store(_scratch(scratch_ptr, 0, sub, N_SUB, n_lanes, lanes), scale, mask=mask)
    tl.store(_scratch(scratch_ptr, 1, sub, N_SUB, n_lanes, lanes), neg_min, mask=mask)
    tl.store(_scratch(scratch_ptr, 2, sub, N_SUB, n_lanes, lanes), best_iscale, mask=mask)
    tl.store(_scratch(scratch_ptr, 3, sub, N_SUB, n_lanes, lanes), best_lmin, mask=mask)
    return scale, neg_min


@triton.jit
def _six_bits(inv, value):
    """uint8_t l = nearest_int(inv * value); MIN(63, l)."""
    return tl.minimum(_nearest_int(inv * value) & 0xFF, 63)


@triton.jit
def _pack_scales(scratch_ptr, out_ptr, n_lanes, lanes, mask, max_scale, max_min):
    """The 12 scale bytes (6-bit scale and min per sub-block); d, dmin; leaves d*sc and dmin*m in scratch."""
    inv_scale = tl.where(max_scale > 0.0, tl.math.div_rn(tl.full(max_scale.shape, 63.0, tl.float32), max_scale), 0.0)
    inv_min = tl.where(max_min > 0.0, tl.math.div_rn(tl.full(max_min.shape, 63.0, tl.float32), max_min), 0.0)
    d = tl.math.div_rn(max_scale, 63.0)
    dmin = tl.math.div_rn(max_min, 63.0)
    _store_fp16(out_ptr, 0, n_lanes, lanes, mask, d)
    _store_fp16(out_ptr, 2, n_lanes, lanes, mask, dmin)
    d = d.to(tl.float16).to(tl.float32)
    dmin = dmin.to(tl.float16).to(tl.float32)
    for j in range(4):
        ls_lo = _six_bits(inv_scale, tl.load(_scratch(scratch_ptr, 0, j, 8, n_lanes, lanes), mask=mask, other=0.0))
        lm_lo = _six_bits(inv_min, tl.load(_scratch(scratch_ptr, 1, j, 8, n_lanes, lanes), mask=mask, other=0.0))
        ls_hi = _six_bits(inv_scale, tl.load(_scratch(scratch_ptr, 0, j + 4, 8, n_lanes, lanes), mask=mask, other=0.0))
        lm_hi = _six_bits(inv_min, tl.load(_scratch(scratch_ptr, 1, j + 4, 8, n_lanes, lanes), mask=mask, other=0.0))
        _store_byte(out_ptr, 4 + j, n_lanes, lanes, mask, ls_lo | ((ls_hi >> 4) << 6))
        _store_byte(out_ptr, 8 + j, n_lanes, lanes, mask, lm_lo | ((lm_hi >> 4) << 6))
        _store_byte(out_ptr, 12 + j, n_lanes, lanes, mask, (ls_hi & 0xF) | ((lm_hi & 0xF) << 4))
        tl.store(_scratch(scratch_ptr, 0, j, 8, n_lanes, lanes), d * ls_lo.to(tl.float32), mask=mask)
        tl.store(_scratch(scratch_ptr, 1, j, 8, n_lanes, lanes), dmin * lm_lo.to(tl.float32), mask=mask)
        tl.store(_scratch(scratch_ptr, 0, j + 4, 8, n_lanes, lanes), d * ls_hi.to(tl.float32), mask=mask)
        tl.store(_scratch(scratch_ptr, 1, j + 4, 8, n_lanes, lanes), dmin * lm_hi.to(tl.float32), mask=mask)


@triton.jit
def _affine_l(xt_ptr, scratch_ptr, sub, pos, n_lanes, lanes, mask, NMAX: tl.constexpr):
    """Final L of one position: requantized with d*sc and dmin*m, or make_qkx2_quants' L where d*sc == 0."""
    v = _x(xt_ptr, sub * 32 + pos, n_lanes, lanes, mask)
    dsub = tl.load(_scratch(scratch_ptr, 0, sub, 8, n_lanes, lanes), mask=mask, other=1.0)
    dm = tl.load(_scratch(scratch_ptr, 1, sub, 8, n_lanes, lanes), mask=mask, other=0.0)
    iscale = tl.load(_scratch(scratch_ptr, 2, sub, 8, n_lanes, lanes), mask=mask, other=0.0)
    lmin = tl.load(_scratch(scratch_ptr, 3, sub, 8, n_lanes, lanes), mask=mask, other=0.0)
    requant = _clamp(_nearest_int(tl.math.div_rn(v + dm, dsub)), 0, NMAX)
    kept = _clamp(_nearest_int(iscale * (v - lmin)), 0, NMAX)
    return tl.where(dsub == 0.0, kept, requant)


@triton.jit
def _affine_k_kernel(xt_ptr, out_ptr, scratch_ptr, n_lanes, NMAX: tl.constexpr, RMIN: tl.constexpr,
                     NSTEP: tl.constexpr, HIGH_BIT: tl.constexpr, QS_OFFSET: tl.constexpr, LANES: tl.constexpr):
    """Q4_K (NMAX 15, no high bit) and Q5_K (NMAX 31, qh holds bit 4 of each quant)."""
    lanes = tl.program_id(0) * LANES + tl.arange(0, LANES)
    mask = lanes < n_lanes
    max_scale = tl.full([LANES], 0.0, tl.float32)
    max_min = tl.full([LANES], 0.0, tl.float32)
    for sub in range(8):
        scale, neg_min = _make_qkx2_quants(xt_ptr, scratch_ptr, sub, n_lanes, lanes, mask, NMAX, RMIN, NSTEP, LANES)
        max_scale = tl.where(scale > max_scale, scale, max_scale)
        max_min = tl.where(neg_min > max_min, neg_min, max_min)
    _pack_scales(scratch_ptr, out_ptr, n_lanes, lanes, mask, max_scale, max_min)
    for pos in range(32):
        qh = tl.full([LANES], 0, tl.int32)
        for g in tl.static_range(4):  # 4 groups of 64: sub-blocks 2g (low nibble) and 2g + 1 (high)
            lo = _affine_l(xt_ptr, scratch_ptr, 2 * g, pos, n_lanes, lanes, mask, NMAX)
            hi = _affine_l(xt_ptr, scratch_ptr, 2 * g + 1, pos, n_lanes, lanes, mask, NMAX)
            _store_byte(out_ptr, QS_OFFSET + 32 * g + pos, n_lanes, lanes, mask, (lo & 0xF) | ((hi & 0xF) << 4))
            qh = qh | ((lo >> 4) << (2 * g)) | ((hi >> 4) << (2 * g + 1))
        if HIGH_BIT:
            _store_byte(out_ptr, 16 + pos, n_lanes, lanes, mask, qh)


# ---------------------------------------------------------------------------------------------- Q2_K
# scratch fields as Q4_K's, each [16, n_lanes]


@triton.jit
def _four_bits(max_value, value):
    """nearest_int(15 / max · value) as ggml stores it in a byte (0 where max is 0)."""
    inv = tl.math.div_rn(tl.full(max_value.shape, 15.0, tl.float32), tl.where(max_value > 0.0, max_value, 1.0))
    return tl.where(max_value > 0.0, _nearest_int(inv * value) & 0xFF, 0)


@triton.jit
def _q2_l(xt_ptr, scratch_ptr, pos, n_lanes, lanes, mask):
    """Final level (0..3) of one position: requantized with d·scale and dmin·min, or the search's where d·scale is 0."""
    sub = pos // 16
    v = _x(xt_ptr, pos, n_lanes, lanes, mask)
    dsub = tl.load(_scratch(scratch_ptr, 0, sub, 16, n_lanes, lanes), mask=mask, other=1.0)
    dm = tl.load(_scratch(scratch_ptr, 1, sub, 16, n_lanes, lanes), mask=mask, other=0.0)
    iscale = tl.load(_scratch(scratch_ptr, 2, sub, 16, n_lanes, lanes), mask=mask, other=0.0)
    lmin = tl.load(_scratch(scratch_ptr, 3, sub, 16, n_lanes, lanes), mask=mask, other=0.0)
    requant = _clamp(_nearest_int(tl.math.div_rn(v + dm, dsub)), 0, 3)
    kept = _clamp(_nearest_int(iscale * (v - lmin)), 0, 3)
    return tl.where(dsub == 0.0, kept, requant)


@triton.jit
def _q2_k_kernel(xt_ptr, out_ptr, scratch_ptr, n_lanes, LANES: tl.constexpr):
    """quantize_row_q2_K_ref: 16 sub-blocks of 16, weights |x|, make_qkx2_quants(3, -0.5, 0.1, 15, use_mad)."""
    lanes = tl.program_id(0) * LANES + tl.arange(0, LANES)
    mask = lanes < n_lanes
    max_scale = tl.full([LANES], 0.0, tl.float32)
    max_min = tl.full([LANES], 0.0, tl.float32)
    for sub in range(16):
        scale, neg_min = _make_qkx2_quants(xt_ptr, scratch_ptr, sub, n_lanes, lanes, mask, 3, -0.5, 15, LANES,
                                           SUB=16, N_SUB=16, AV_X=False, MAD=True)
        max_scale = tl.where(scale > max_scale, scale, max_scale)
        max_min = tl.where(neg_min > max_min, neg_min, max_min)
    d = tl.where(max_scale > 0.0, tl.math.div_rn(max_scale, 15.0), 0.0)
    dmin = tl.where(max_min > 0.0, tl.math.div_rn(max_min, 15.0), 0.0)
    _store_fp16(out_ptr, 80, n_lanes, lanes, mask, d)
    _store_fp16(out_ptr, 82, n_lanes, lanes, mask, dmin)
    d = d.to(tl.float16).to(tl.float32)
    dmin = dmin.to(tl.float16).to(tl.float32)
    for sub in range(16):
        scale_ptr = _scratch(scratch_ptr, 0, sub, 16, n_lanes, lanes)
        min_ptr = _scratch(scratch_ptr, 1, sub, 16, n_lanes, lanes)
        ls = _four_bits(max_scale, tl.load(scale_ptr, mask=mask, other=0.0))
        lm = _four_bits(max_min, tl.load(min_ptr, mask=mask, other=0.0))
        sc = (ls | (lm << 4)) & 0xFF
        _store_byte(out_ptr, sub, n_lanes, lanes, mask, sc)
        tl.store(scale_ptr, d * (sc & 0xF).to(tl.float32), mask=mask)
        tl.store(min_ptr, dmin * (sc >> 4).to(tl.float32), mask=mask)
    for hl in range(64):  # two halves of 128; in each, byte l packs positions l, l+32, l+64, l+96
        base = (hl // 32) * 128 + hl % 32
        q = _q2_l(xt_ptr, scratch_ptr, base, n_lanes, lanes, mask)
        q = q | (_q2_l(xt_ptr, scratch_ptr, base + 32, n_lanes, lanes, mask) << 2)
        q = q | (_q2_l(xt_ptr, scratch_ptr, base + 64, n_lanes, lanes, mask) << 4)
        q = q | (_q2_l(xt_ptr, scratch_ptr, base + 96, n_lanes, lanes, mask) << 6)
        _store_byte(out_ptr, 16 + hl, n_lanes, lanes, mask, q)


# ---------------------------------------------------------------------------------------------- Q3_K
# scratch rows: 0..255 each position's level (make_q3_quants' -4..3, then the final 0..7), 256..271 the scales


@triton.jit
def _q3_search(xt_ptr, scratch_ptr, sub, n_lanes, lanes, mask, LANES: tl.constexpr):
    """make_q3_quants(16, 4, x, L, do_rmse = true) on sub-block `sub`; levels to scratch; -> scale. All 5 rounds of
    the descent run: a round that changes nothing would repeat unchanged."""
    base = sub * 16
    amax, vmax = _largest_magnitude(xt_ptr, base, n_lanes, lanes, mask, 16, LANES)
    zero = amax < 1e-15  # GROUP_MAX_EPS
    iscale = tl.math.div_rn(tl.full([LANES], -4.0, tl.float32), tl.where(zero, 1.0, vmax))
    sumlx = tl.full([LANES], 0.0, tl.float32)
    suml2 = tl.full([LANES], 0.0, tl.float32)
    for i in tl.static_range(16):
        v = _x(xt_ptr, base + i, n_lanes, lanes, mask)
        l = _clamp(_nearest_int(iscale * v), -4, 3).to(tl.float32)
        tl.store(_scratch(scratch_ptr, 0, base + i, 256, n_lanes, lanes), l, mask=mask)
        w = v * v
        sumlx = sumlx + w * v * l
        suml2 = suml2 + w * l * l
    for _ in range(5):
        for i in tl.static_range(16):
            ptr = _scratch(scratch_ptr, 0, base + i, 256, n_lanes, lanes)
            v = _x(xt_ptr, base + i, n_lanes, lanes, mask)
            old = tl.load(ptr, mask=mask, other=0.0)
            w = v * v
            slx = sumlx - w * v * old
            sl2 = suml2 - w * old * old
            new_l = _clamp(_nearest_int(tl.math.div_rn(v * sl2, tl.where(slx > 0.0, slx, 1.0))), -4, 3).to(tl.float32)
            new_slx = slx + w * v * new_l
            new_sl2 = sl2 + w * new_l * new_l
            accept = (slx > 0.0) & (new_l != old) & (new_sl2 > 0.0) & (new_slx * new_slx * suml2 > sumlx * sumlx * new_sl2)
            tl.store(ptr, tl.where(accept, new_l, old), mask=mask)
            sumlx = tl.where(accept, new_slx, sumlx)
            suml2 = tl.where(accept, new_sl2, suml2)
    for i in tl.static_range(16):  # an all-zero sub-block keeps levels 0 (stored as -4 + 4)
        ptr = _scratch(scratch_ptr, 0, base + i, 256, n_lanes, lanes)
        tl.store(ptr, tl.where(zero, -4.0, tl.load(ptr, mask=mask, other=0.0)), mask=mask)
    scale = tl.where(suml2 > 0.0, tl.math.div_rn(sumlx, tl.where(suml2 > 0.0, suml2, 1.0)), 0.0)
    return tl.where(zero, 0.0, scale)


@triton.jit
def _q3_k_kernel(xt_ptr, out_ptr, scratch_ptr, n_lanes, LANES: tl.constexpr):
    lanes = tl.program_id(0) * LANES + tl.arange(0, LANES)
    mask = lanes < n_lanes
    amax = tl.full([LANES], 0.0, tl.float32)
    max_scale = tl.full([LANES], 0.0, tl.float32)
    for sub in range(16):
        scale = _q3_search(xt_ptr, scratch_ptr, sub, n_lanes, lanes, mask, LANES)
        tl.store(_scratch(scratch_ptr, 1, sub, 256, n_lanes, lanes), scale, mask=mask)
        bigger = tl.abs(scale) > amax
        amax = tl.where(bigger, tl.abs(scale), amax)
        max_scale = tl.where(bigger, scale, max_scale)
    some = max_scale != 0.0
    iscale = tl.math.div_rn(tl.full([LANES], -32.0, tl.float32), tl.where(some, max_scale, 1.0))
    d = tl.where(some, tl.math.div_rn(tl.full([LANES], 1.0, tl.float32), iscale), 0.0)
    _store_fp16(out_ptr, 108, n_lanes, lanes, mask, d)
    d = d.to(tl.float16).to(tl.float32)
    for k in range(4):  # byte 104 + k: the high 2 bits of levels k, k+4, k+8, k+12
        top = tl.full([LANES], 0, tl.int32)
        for q in tl.static_range(4):
            sub = k + 4 * q
            level = _clamp(_nearest_int(iscale * tl.load(_scratch(scratch_ptr, 1, sub, 256, n_lanes, lanes), mask=mask,
                                                          other=0.0)), -32, 31) + 32
            level = tl.where(some, level, 0)
            top = top | ((level >> 4) << (2 * q))
            tl.store(_scratch(scratch_ptr, 1, sub, 256, n_lanes, lanes), level.to(tl.float32), mask=mask)
        _store_byte(out_ptr, 104 + k, n_lanes, lanes, mask, top)
    for j in range(8):  # byte 96 + j: low nibbles of levels j and j + 8
        low = tl.load(_scratch(scratch_ptr, 1, j, 256, n_lanes, lanes), mask=mask, other=0.0).to(tl.int32)
        high = tl.load(_scratch(scratch_ptr, 1, j + 8, 256, n_lanes, lanes), mask=mask, other=0.0).to(tl.int32)
        _store_byte(out_ptr, 96 + j, n_lanes, lanes, mask, (low & 0xF) | ((high & 0xF) << 4))
    for pos in range(256):  # final levels 0..7: requantized against d·(level - 32), the search's where that is 0
        sub = pos // 16
        level = tl.load(_scratch(scratch_ptr, 1, sub, 256, n_lanes, lanes), mask=mask, other=0.0)
        dsub = d * (level - 32.0)
        ptr = _scratch(scratch_ptr, 0, pos, 256, n_lanes, lanes)
        v = _x(xt_ptr, pos, n_lanes, lanes, mask)
        requant = _clamp(_nearest_int(tl.math.div_rn(v, tl.where(dsub == 0.0, 1.0, dsub))), -4, 3).to(tl.float32)
        tl.store(ptr, tl.where(dsub == 0.0, tl.load(ptr, mask=mask, other=0.0), requant) + 4.0, mask=mask)
    for m in range(32):  # hmask: bit k of byte m is level 32k + m's bit 2
        h = tl.full([LANES], 0, tl.int32)
        for k in tl.static_range(8):
            lv = tl.load(_scratch(scratch_ptr, 0, 32 * k + m, 256, n_lanes, lanes), mask=mask, other=0.0).to(tl.int32)
            h = h | ((lv >> 2) << k)
        _store_byte(out_ptr, m, n_lanes, lanes, mask, h)
    for hl in range(64):
        base = (hl // 32) * 128 + hl % 32
        q = tl.full([LANES], 0, tl.int32)
        for k in tl.static_range(4):
            lv = tl.load(_scratch(scratch_ptr, 0, base + 32 * k, 256, n_lanes, lanes), mask=mask, other=0.0).to(tl.int32)
            q = q | ((lv & 3) << (2 * k))
        _store_byte(out_ptr, 32 + hl, n_lanes, lanes, mask, q)


# -------------------------------------------------------------------------------------------- IQ4_XS
# quantize_row_iq4_nl_impl(256, 32, …, ntry 7), weights x²; scratch field 0, [8, n_lanes]: each sub-block's scale.
# The nearest of the 16 non-linear levels (values_ptr, ascending) by selects, the upper one on a tie, as ggml's
# best_index_int8 answers (a NaN gets the last).


@triton.jit
def _nearest_level(x, values_ptr):
    """(index, value) of the level nearest x."""
    lo = tl.full(x.shape, 0.0, tl.float32) + tl.load(values_ptr)
    hi = tl.full(x.shape, 0.0, tl.float32) + tl.load(values_ptr + 1)
    lo_i = tl.full(x.shape, 0, tl.int32)
    for k in tl.static_range(1, 16):
        vk = tl.load(values_ptr + k)
        below = vk <= x
        lo = tl.where(below, vk, lo)
        lo_i = tl.where(below, k, lo_i)
        if k < 15:
            hi = tl.where(below, tl.load(values_ptr + k + 1), hi)
        else:
            hi = tl.where(below, vk, hi)
    upper = (x - lo) >= (hi - x)
    index = tl.where(upper, tl.minimum(lo_i + 1, 15), lo_i)
    value = tl.where(upper, hi, lo)
    nan = x != x
    return tl.where(nan, 15, index), tl.where(nan, tl.load(values_ptr + 15), value)


@triton.jit
def _iq4_sums(xt_ptr, base, n_lanes, lanes, mask, iscale, values_ptr):
    sumqx = tl.full(iscale.shape, 0.0, tl.float32)
    sumq2 = tl.full(iscale.shape, 0.0, tl.float32)
    for i in tl.static_range(32):
        v = _x(xt_ptr, base + i, n_lanes, lanes, mask)
        _, q = _nearest_level(iscale * v, values_ptr)
        w = v * v
        sumqx = sumqx + w * q * v
        sumq2 = sumq2 + w * q * q
    return sumqx, sumq2


@triton.jit
def _iq4_scale(xt_ptr, sub, n_lanes, lanes, mask, values_ptr, LANES: tl.constexpr):
    """The scale search of one sub-block of 32 (0 where it is all near zero)."""
    base = sub * 32
    amax, vmax = _largest_magnitude(xt_ptr, base, n_lanes, lanes, mask, 32, LANES)
    zero = amax < 1e-15  # GROUP_MAX_EPS
    safe_max = tl.where(zero, 1.0, vmax)
    v0 = tl.load(values_ptr)
    d0 = tl.math.div_rn(-safe_max, tl.full([LANES], 0.0, tl.float32) + v0)
    sumqx, sumq2 = _iq4_sums(xt_ptr, base, n_lanes, lanes, mask, tl.math.div_rn(tl.full([LANES], 1.0, tl.float32), d0),
                             values_ptr)
    scale = tl.where(sumq2 > 0.0, tl.math.div_rn(sumqx, tl.where(sumq2 > 0.0, sumq2, 1.0)), 0.0)
    best = scale * sumqx
    step = tl.full([LANES], -7.0, tl.float32)  # ggml's itry: -7..7
    for _ in range(15):
        sumqx, sumq2 = _iq4_sums(xt_ptr, base, n_lanes, lanes, mask, tl.math.div_rn(step + v0, safe_max), values_ptr)
        better = (sumq2 > 0.0) & (sumqx * sumqx > best * sumq2)
        scale = tl.where(better, tl.math.div_rn(sumqx, tl.where(better, sumq2, 1.0)), scale)
        best = tl.where(better, scale * sumqx, best)
        step = step + 1.0
    return tl.where(zero, 0.0, scale)


@triton.jit
def _iq4_xs_kernel(xt_ptr, out_ptr, scratch_ptr, values_ptr, n_lanes, LANES: tl.constexpr):
    lanes = tl.program_id(0) * LANES + tl.arange(0, LANES)
    mask = lanes < n_lanes
    amax = tl.full([LANES], 0.0, tl.float32)
    max_scale = tl.full([LANES], 0.0, tl.float32)
    for sub in range(8):
        scale = _iq4_scale(xt_ptr, sub, n_lanes, lanes, mask, values_ptr, LANES)
        tl.store(_scratch(scratch_ptr, 0, sub, 8, n_lanes, lanes), scale, mask=mask)
        bigger = tl.abs(scale) > amax
        amax = tl.where(bigger, tl.abs(scale), amax)
        max_scale = tl.where(bigger, scale, max_scale)
    d = tl.math.div_rn(max_scale, -32.0)  # not -max_scale / 32: Triton negates as 0 - x, which loses -0.0
    _store_fp16(out_ptr, 0, n_lanes, lanes, mask, d)
    inv = tl.where(d != 0.0, tl.math.div_rn(tl.full([LANES], 1.0, tl.float32), tl.where(d != 0.0, d, 1.0)), 0.0)
    scales_h = tl.full([LANES], 0, tl.int32)
    low_even = tl.full([LANES], 0, tl.int32)
    for sub in range(8):
        scale = tl.load(_scratch(scratch_ptr, 0, sub, 8, n_lanes, lanes), mask=mask, other=0.0)
        level = _clamp(_nearest_int(inv * scale), -32, 31)
        dl = d * level.to(tl.float32)
        idl = tl.where(dl != 0.0, tl.math.div_rn(tl.full([LANES], 1.0, tl.float32), tl.where(dl != 0.0, dl, 1.0)), 0.0)
        for j in tl.static_range(16):
            lo, _ = _nearest_level(idl * _x(xt_ptr, sub * 32 + j, n_lanes, lanes, mask), values_ptr)
            hi, _ = _nearest_level(idl * _x(xt_ptr, sub * 32 + 16 + j, n_lanes, lanes, mask), values_ptr)
            _store_byte(out_ptr, 8 + 16 * sub + j, n_lanes, lanes, mask, lo | (hi << 4))
        level = level + 32
        if sub % 2 == 0:
            low_even = level & 0xF
        else:
            _store_byte(out_ptr, 4 + sub // 2, n_lanes, lanes, mask, low_even | ((level & 0xF) << 4))
        scales_h = scales_h | ((level >> 4) << (2 * sub))
    _store_byte(out_ptr, 2, n_lanes, lanes, mask, scales_h)
    _store_byte(out_ptr, 3, n_lanes, lanes, mask, scales_h >> 8)


# ---------------------------------------------------------------------------------------------- Q6_K
# scratch fields, each [16, n_lanes]: 0 scale (later d * q_scale), 1 the iscale of the best L,
# 2 1.0 where the sub-block is all (near) zero


@triton.jit
def _qx_sums(xt_ptr, base, n_lanes, lanes, mask, iscale):
    """make_qx_quants (rmse_type 1, w = x*x) sums over 16 positions: (sum w*x*l, sum w*l*l)."""
    sumlx = tl.full(iscale.shape, 0.0, tl.float32)
    suml2 = tl.full(iscale.shape, 0.0, tl.float32)
    for i in tl.static_range(16):
        v = _x(xt_ptr, base + i, n_lanes, lanes, mask)
        l = _clamp(_nearest_int(iscale * v), -32, 31).to(tl.float32)
        w = v * v
        sumlx = sumlx + w * v * l
        suml2 = suml2 + w * l * l
    return sumlx, suml2


@triton.jit
def _make_qx_quants(xt_ptr, scratch_ptr, sub, n_lanes, lanes, mask, LANES: tl.constexpr):
    """make_qx_quants(16, 32, x, L, rmse_type=1, NULL) for sub-block `sub`; -> scale."""
    base = sub * 16
    amax, vmax = _largest_magnitude(xt_ptr, base, n_lanes, lanes, mask, 16, LANES)
    zero = amax < 1e-15  # GROUP_MAX_EPS
    safe_max = tl.where(zero, 1.0, vmax)
    iscale = tl.math.div_rn(tl.full([LANES], -32.0, tl.float32), safe_max)
    sumlx, suml2 = _qx_sums(xt_ptr, base, n_lanes, lanes, mask, iscale)
    scale = tl.where(suml2 != 0.0, tl.math.div_rn(sumlx, suml2), 0.0)
    best = scale * sumlx
    best_iscale = iscale
    step = tl.full([LANES], -9.0, tl.float32)  # ggml's `is`: -9..-1, 1..9
    for _ in range(18):
        cand = tl.math.div_rn(-(step * 0.1 + 32.0), safe_max)
        sumlx, suml2 = _qx_sums(xt_ptr, base, n_lanes, lanes, mask, cand)
        better = (suml2 > 0.0) & (sumlx * sumlx > best * suml2)
        scale = tl.where(better, tl.math.div_rn(sumlx, suml2), scale)
        best = tl.where(better, scale * sumlx, best)
        best_iscale = tl.where(better, cand, best_iscale)
        step = step + 1.0
        step = tl.where(step == 0.0, 1.0, step)
    scale = tl.where(zero, 0.0, scale)
    tl.store(_scratch(scratch_ptr, 0, sub, 16, n_lanes, lanes), scale, mask=mask)
    tl.store(_scratch(scratch_ptr, 1, sub, 16, n_lanes, lanes), best_iscale, mask=mask)
    tl.store(_scratch(scratch_ptr, 2, sub, 16, n_lanes, lanes), tl.where(zero, 1.0, 0.0), mask=mask)
    return scale


@triton.jit
def _q6_l(xt_ptr, scratch_ptr, pos, n_lanes, lanes, mask, empty):
    """Final L (0..63) of one position."""
    sub = pos // 16
    v = _x(xt_ptr, pos, n_lanes, lanes, mask)
    dsub = tl.load(_scratch(scratch_ptr, 0, sub, 16, n_lanes, lanes), mask=mask, other=1.0)
    iscale = tl.load(_scratch(scratch_ptr, 1, sub, 16, n_lanes, lanes), mask=mask, other=0.0)
    zero = tl.load(_scratch(scratch_ptr, 2, sub, 16, n_lanes, lanes), mask=mask, other=0.0)
    requant = _clamp(_nearest_int(tl.math.div_rn(v, dsub)), -32, 31) + 32
    kept = tl.where(zero != 0.0, 0, _clamp(_nearest_int(iscale * v), -32, 31) + 32)
    return tl.where(empty, 0, tl.where(dsub == 0.0, kept, requant))


@triton.jit
def _q6_k_kernel(xt_ptr, out_ptr, scratch_ptr, n_lanes, LANES: tl.constexpr):
    lanes = tl.program_id(0) * LANES + tl.arange(0, LANES)
    mask = lanes < n_lanes
    max_abs = tl.full([LANES], 0.0, tl.float32)
    max_scale = tl.full([LANES], 0.0, tl.float32)
    for sub in range(16):
        scale = _make_qx_quants(xt_ptr, scratch_ptr, sub, n_lanes, lanes, mask, LANES)
        a = tl.abs(scale)
        bigger = a > max_abs
        max_abs = tl.where(bigger, a, max_abs)
        max_scale = tl.where(bigger, scale, max_scale)
    empty = max_abs < 1e-15
    iscale = tl.where(empty, 0.0, tl.math.div_rn(tl.full([LANES], -128.0, tl.float32), tl.where(empty, 1.0, max_scale)))
    d = tl.where(empty, 0.0, tl.math.div_rn(tl.full([LANES], 1.0, tl.float32), iscale))
    _store_fp16(out_ptr, 208, n_lanes, lanes, mask, d)
    d = d.to(tl.float16).to(tl.float32)
    for sub in range(16):
        ptr = _scratch(scratch_ptr, 0, sub, 16, n_lanes, lanes)
        q = tl.minimum(_nearest_int(iscale * tl.load(ptr, mask=mask, other=0.0)), 127)
        q = tl.where(empty, 0, ((q & 0xFF) ^ 0x80) - 0x80)  # stored as int8_t
        _store_byte(out_ptr, 192 + sub, n_lanes, lanes, mask, q)
        tl.store(ptr, d * q.to(tl.float32), mask=mask)
    for hl in range(64):  # two halves of 128; in each, byte l packs positions l, l+32, l+64, l+96
        half = hl // 32
        l = hl % 32
        base = half * 128 + l
        q1 = _q6_l(xt_ptr, scratch_ptr, base, n_lanes, lanes, mask, empty)
        q2 = _q6_l(xt_ptr, scratch_ptr, base + 32, n_lanes, lanes, mask, empty)
        q3 = _q6_l(xt_ptr, scratch_ptr, base + 64, n_lanes, lanes, mask, empty)
        q4 = _q6_l(xt_ptr, scratch_ptr, base + 96, n_lanes, lanes, mask, empty)
        _store_byte(out_ptr, half * 64 + l, n_lanes, lanes, mask, (q1 & 0xF) | ((q3 & 0xF) << 4))
        _store_byte(out_ptr, half * 64 + l + 32, n_lanes, lanes, mask, (q2 & 0xF) | ((q4 & 0xF) << 4))
        _store_byte(out_ptr, 128 + half * 32 + l, n_lanes, lanes, mask,
                    (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6))


# ---------------------------------------------------------------------------------------------- host

SCRATCH_ROWS = {T.Q8_0: 0, T.Q4_K: 4 * 8, T.Q5_K: 4 * 8, T.Q6_K: 3 * 16, T.Q2_K: 4 * 16, T.IQ4_XS: 8,
                T.Q3_K: 256 + 16}  # float32 rows of scratch per lane
SHAPES: dict[T, tuple[int, int, int]] = {t: (*GGML_QUANT_SIZES[t], rows) for t, rows in SCRATCH_ROWS.items()}  # + sizes
AFFINE = {T.Q4_K: (15, -1.0, 20, False), T.Q5_K: (31, -0.5, 15, True)}  # nmax, rmin, nstep, high bit


def _launch(ggml_type: T, xt: torch.Tensor, out_t: torch.Tensor, scratch: torch.Tensor, lanes: int, n_lanes: int) -> None:
    grid = (triton.cdiv(n_lanes, lanes),)
    exact = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}
    if ggml_type == T.Q8_0:
        _q8_0_kernel[grid](xt, out_t, n_lanes, LANES=lanes, **exact)
    elif ggml_type == T.Q6_K:
        _q6_k_kernel[grid](xt, out_t, scratch, n_lanes, LANES=lanes, **exact)
    elif ggml_type == T.Q2_K:
        _q2_k_kernel[grid](xt, out_t, scratch, n_lanes, LANES=lanes, **exact)
    elif ggml_type == T.Q3_K:
        _q3_k_kernel[grid](xt, out_t, scratch, n_lanes, LANES=lanes, **exact)
    elif ggml_type == T.IQ4_XS:
        values = torch.tensor(IQ4_VALUES, dtype=torch.float32, device=xt.device)
        _iq4_xs_kernel[grid](xt, out_t, scratch, values, n_lanes, LANES=lanes, **exact)
    else:
        nmax, rmin, nstep, high_bit = AFFINE[ggml_type]
        _affine_k_kernel[grid](xt, out_t, scratch, n_lanes, NMAX=nmax, RMIN=rmin, NSTEP=nstep, HIGH_BIT=high_bit,
                               QS_OFFSET=48 if high_bit else 16, LANES=lanes, **exact)


def quantize_blocks(blocks: torch.Tensor, ggml_type: T, lanes: int = LANES) -> torch.Tensor:
    """float32 [n_blocks, block_size] on one device -> uint8 [n_blocks, type_size], ggml's bytes."""
    block_size, type_size, scratch_rows = SHAPES[ggml_type]
    assert blocks.dtype == torch.float32 and blocks.shape[1] == block_size
    out = torch.empty((blocks.shape[0], type_size), dtype=torch.uint8, device=blocks.device)
    for start in range(0, blocks.shape[0], MAX_LANES_PER_LAUNCH):
        part = blocks[start : start + MAX_LANES_PER_LAUNCH]
        n_lanes = part.shape[0]
        xt = part.t().contiguous()  # [block_size, n_lanes]
        out_t = torch.empty((type_size, n_lanes), dtype=torch.uint8, device=blocks.device)
        scratch = torch.empty((max(1, scratch_rows), n_lanes), dtype=torch.float32, device=blocks.device)
        _launch(ggml_type, xt, out_t, scratch, lanes, n_lanes)
        out[start : start + n_lanes] = out_t.t()
    return out
