"""Triton kernels for Q8_0, Q4_K, Q5_K and Q6_K that write ggml's bytes (quantize_row_*_ref).

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

# tl.full rather than tl.zeros throughout: tl.zeros is a @jit helper of triton's standard library, which the
# interpreter cannot run when triton was imported before TRITON_INTERPRET was set (transformers imports it).
LANES = 64  # lanes (blocks) per program
NUM_WARPS = 2
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
def _qkx2_error(xt_ptr, base, n_lanes, lanes, mask, av_x, iscale, lmin, scale, vmin, NMAX: tl.constexpr):
    """sum of w * (scale * L + vmin - x)^2 in order, L = clamp(nearest_int(iscale * (x - lmin)))."""
    err = tl.full(av_x.shape, 0.0, tl.float32)
    for i in tl.static_range(32):
        v = _x(xt_ptr, base + i, n_lanes, lanes, mask)
        w = av_x + tl.abs(v)
        l = _clamp(_nearest_int(iscale * (v - lmin)), 0, NMAX).to(tl.float32)
        diff = scale * l + vmin - v
        err = err + w * (diff * diff)
    return err


@triton.jit
def _make_qkx2_quants(xt_ptr, scratch_ptr, sub, n_lanes, lanes, mask, NMAX: tl.constexpr, RMIN: tl.constexpr,
                      NSTEP: tl.constexpr, LANES: tl.constexpr):
    """Sub-block `sub` (32 values) of each lane: weights, then make_qkx2_quants; -> (scale, -min)."""
    base = sub * 32
    sum_x2 = tl.full([LANES], 0.0, tl.float32)
    for i in tl.static_range(32):
        v = _x(xt_ptr, base + i, n_lanes, lanes, mask)
        sum_x2 = sum_x2 + v * v
    av_x = tl.math.sqrt_rn(tl.math.div_rn(sum_x2, 32.0))
    x0 = _x(xt_ptr, base, n_lanes, lanes, mask)
    vmin = x0
    vmax = x0
    sum_w = av_x + tl.abs(x0)
    sum_x = sum_w * x0
    for i in tl.static_range(1, 32):
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
    best = _qkx2_error(xt_ptr, base, n_lanes, lanes, mask, av_x, iscale, vmin, scale, vmin, NMAX)
    best_iscale = iscale
    best_lmin = vmin
    cur_min = vmin
    step = tl.full([LANES], 0.0, tl.float32)  # ggml's `is` as float, carried (0, 1, ... NSTEP)
    for _ in range(NSTEP + 1):
        step_iscale = tl.math.div_rn(step * 0.1 + RMIN + nmax, tl.where(flat, 1.0, vmax - cur_min))
        sum_l = tl.full([LANES], 0.0, tl.float32)
        sum_l2 = tl.full([LANES], 0.0, tl.float32)
        sum_xl = tl.full([LANES], 0.0, tl.float32)
        for i in tl.static_range(32):
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
        err = _qkx2_error(xt_ptr, base, n_lanes, lanes, mask, av_x, step_iscale, cur_min, this_scale, this_min, NMAX)
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
    tl.store(_scratch(scratch_ptr, 0, sub, 8, n_lanes, lanes), scale, mask=mask)
    tl.store(_scratch(scratch_ptr, 1, sub, 8, n_lanes, lanes), neg_min, mask=mask)
    tl.store(_scratch(scratch_ptr, 2, sub, 8, n_lanes, lanes), best_iscale, mask=mask)
    tl.store(_scratch(scratch_ptr, 3, sub, 8, n_lanes, lanes), best_lmin, mask=mask)
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
    amax = tl.full([LANES], 0.0, tl.float32)
    vmax = tl.full([LANES], 0.0, tl.float32)
    for i in tl.static_range(16):  # the first position holding the largest magnitude wins
        v = _x(xt_ptr, base + i, n_lanes, lanes, mask)
        a = tl.abs(v)
        bigger = a > amax
        amax = tl.where(bigger, a, amax)
        vmax = tl.where(bigger, v, vmax)
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

SCRATCH_ROWS = {T.Q8_0: 0, T.Q4_K: 4 * 8, T.Q5_K: 4 * 8, T.Q6_K: 3 * 16}  # float32 rows of scratch per lane
SHAPES: dict[T, tuple[int, int, int]] = {t: (*GGML_QUANT_SIZES[t], rows) for t, rows in SCRATCH_ROWS.items()}  # + sizes
AFFINE = {T.Q4_K: (15, -1.0, 20, False), T.Q5_K: (31, -0.5, 15, True)}  # nmax, rmin, nstep, high bit


def _launch(ggml_type: T, xt: torch.Tensor, out_t: torch.Tensor, scratch: torch.Tensor, lanes: int, n_lanes: int) -> None:
    grid = (triton.cdiv(n_lanes, lanes),)
    exact = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}
    if ggml_type == T.Q8_0:
        _q8_0_kernel[grid](xt, out_t, n_lanes, LANES=lanes, **exact)
    elif ggml_type == T.Q6_K:
        _q6_k_kernel[grid](xt, out_t, scratch, n_lanes, LANES=lanes, **exact)
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
