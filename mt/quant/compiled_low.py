"""Compiled CPU kernels (numba) for Q2_K, Q3_K, IQ4_NL, IQ4_XS, TQ1_0 and TQ2_0: the same bytes as the references in
mt/quant/low_kquants.py, iq4.py and ternary.py and weighted.py's imatrix paths. The rules of mt/quant/compiled.py hold
(float32 everywhere, no FMA, ggml's order); the scale searches run on many sub-blocks at once, one per lane.
"""

from __future__ import annotations

import numpy as np

from mt.quant.compiled import (
    AMAX, GROUP, GROUP_MAX_EPS, HALF_BELOW, L_ISCALE, L_MIN, N_Q_STATE, N_STATE, Q_ISCALE, Q_L_ISCALE, Q_SCALE, QK_K,
    SCALE, SUML2, SUMLX, VMIN, XMAX, clampf, fp16_to_fp32, fp32_to_fp16, imatrix_weights, jit, largest_magnitude_lanes,
    make_qp_quants, nearest_int, nearest_int_f32, put_fp16, qkx2_lanes, qx_lanes, sum_of_squares,
)
from mt.quant.iq4 import KVALUES  # the non-linear levels, from gguf-py

F32 = np.float32
LANES = 16 * GROUP


@jit(inline="always")
def pack_2bit(L: np.ndarray, y: np.ndarray, at: int) -> None:
    """Per half of 128, byte l holds levels l, l+32, l+64, l+96 two bits each: L [256] -> y[at:at + 64]."""
    for half in range(2):
        src = 128 * half
        for i in range(32):
            y[at + 32 * half + i] = (L[src + i] | (L[src + 32 + i] << 2) | (L[src + 64 + i] << 4)
                                     | (L[src + 96 + i] << 6))


@jit(inline="always")
def load_lanes(x: np.ndarray, b0: int, n_sb: int, xt: np.ndarray) -> None:
    """Lane 16b + j = sub-block j of super-block b0 + b: xt[i, lane] = its value i."""
    for b in range(n_sb):
        for j in range(16):
            for i in range(16):
                xt[i, 16 * b + j] = x[b0 + b, 16 * j + i]


# ---------------------------------------------------------------- Q2_K


@jit()
def q2_k_superblock(x: np.ndarray, y: np.ndarray, L: np.ndarray, sc: np.ndarray, l_iscale: np.ndarray,
                    l_min: np.ndarray) -> None:
    """Requantize against the fp16 d, dmin and the 4-bit levels in sc [16] (already in y[0:16]; d and dmin in
    y[80:84]), then pack. Where d·scale is 0 the search's own levels (iscale, min) stand."""
    d_all = fp16_to_fp32(y[80] | (y[81] << 8))
    dmin_all = fp16_to_fp32(y[82] | (y[83] << 8))
    for j in range(16):
        d = d_all * F32(sc[j] & 0xF)
        sub = x[16 * j : 16 * j + 16]
        out = L[16 * j : 16 * j + 16]
        if d == F32(0):
            for i in range(16):
                out[i] = np.uint8(clampf(nearest_int_f32(l_iscale[j] * (sub[i] - l_min[j])), F32(0), F32(3)))
            continue
        dm = dmin_all * F32(sc[j] >> 4)
        for i in range(16):
            out[i] = np.uint8(clampf(nearest_int_f32((sub[i] + dm) / d), F32(0), F32(3)))
    pack_2bit(L, y, 16)


@jit(inline="always")
def level_against(value: float, vmax: float) -> int:
    return nearest_int((F32(15) / vmax) * value) & 0xFF if vmax > F32(0) else 0


@jit()
def q2_k_blocks(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q2_K_ref: x float32 [N, 256] -> out uint8 [N, 84] (scales[16], qs[64], d, dmin)."""
    xt = np.empty((16, LANES), F32)
    w = np.empty((16, LANES), F32)
    laux = np.empty((16, LANES), F32)
    st = np.empty((N_STATE, LANES), F32)
    L = np.empty(QK_K, np.uint8)
    sc = np.empty(16, np.uint8)
    for b0 in range(0, x.shape[0], GROUP):
        n_sb = min(GROUP, x.shape[0] - b0)
        lanes = 16 * n_sb
        load_lanes(x, b0, n_sb, xt)
        for i in range(16):
            for s in range(lanes):
                w[i, s] = np.abs(xt[i, s])
        qkx2_lanes(xt, w, laux, st, lanes, 3, -0.5, 0.1, 15, True)
        for b in range(n_sb):
            y = out[b0 + b]
            lane0 = 16 * b
            max_scale = F32(0)
            max_min = F32(0)
            for j in range(16):
                scale = st[SCALE, lane0 + j]
                the_min = -st[VMIN, lane0 + j]
                max_scale = scale if scale > max_scale else max_scale
                max_min = the_min if the_min > max_min else max_min
            for j in range(16):
                ls = level_against(st[SCALE, lane0 + j], max_scale)
                lm = level_against(-st[VMIN, lane0 + j], max_min)
                sc[j] = (ls | (lm << 4)) & 0xFF
                y[j] = sc[j]
            put_fp16(y, 80, fp32_to_fp16(max_scale / F32(15)) if max_scale > F32(0) else 0)
            put_fp16(y, 82, fp32_to_fp16(max_min / F32(15)) if max_min > F32(0) else 0)
            q2_k_superblock(x[b0 + b], y, L, sc, st[L_ISCALE, lane0:lane0 + 16], st[L_MIN, lane0:lane0 + 16])


@jit()
def q2_k_weighted_blocks(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q2_K_impl: x float32 [N, 256], qw float32 [R, 256] -> out uint8 [N, 84]."""
    xt = np.empty((16, LANES), F32)
    w = np.empty((16, LANES), F32)
    laux = np.empty((16, LANES), F32)
    st = np.empty((N_STATE, LANES), F32)
    sw = np.empty(LANES, F32)
    mins = np.empty(16, F32)
    L = np.empty(QK_K, np.uint8)
    ls = np.empty(16, np.uint8)
    lm = np.empty(16, np.uint8)
    sc = np.empty(16, np.uint8)
    n_qw = qw.shape[0]
    for b0 in range(0, x.shape[0], GROUP):
        n_sb = min(GROUP, x.shape[0] - b0)
        lanes = 16 * n_sb
        load_lanes(x, b0, n_sb, xt)
        for b in range(n_sb):
            xb = x[b0 + b]
            qb = qw[(b0 + b) % n_qw]
            imatrix_weights(xb, qb, sum_of_squares(xb) / F32(QK_K), w, 16, 16 * b)
        for s in range(lanes):
            sw[s] = F32(0)
        for i in range(16):
            for s in range(lanes):
                sw[s] += w[i, s]
        qkx2_lanes(xt, w, laux, st, lanes, 3, -0.9, 0.05, 36, False)  # make_qkx3_quants with weights
        for b in range(n_sb):
            y = out[b0 + b]
            lane0 = 16 * b
            for j in range(16):
                mins[j] = -st[VMIN, lane0 + j]
            dm = make_qp_quants(st[SCALE, lane0:lane0 + 16], sw[lane0:lane0 + 16], 15, ls)
            mm = make_qp_quants(mins, sw[lane0:lane0 + 16], 15, lm)
            for j in range(16):
                sc[j] = (ls[j] | (lm[j] << 4)) & 0xFF
                y[j] = sc[j]
            put_fp16(y, 80, fp32_to_fp16(dm))
            put_fp16(y, 82, fp32_to_fp16(mm))
            q2_k_superblock(x[b0 + b], y, L, sc, st[L_ISCALE, lane0:lane0 + 16], st[L_MIN, lane0:lane0 + 16])


# ---------------------------------------------------------------- Q3_K


@jit()
def q3_lanes(xt: np.ndarray, lq: np.ndarray, st: np.ndarray, lanes: int) -> None:
    """make_q3_quants(16, 4, x, L, do_rmse = true) on `lanes` sub-blocks: xt [16, S] -> levels lq [16, S] in
    -4..3 and per lane st[Q_SCALE] (0 and levels 0 for an all-zero sub-block, marked by st[AMAX]). All 5 rounds of
    the descent run: a round that changes nothing in a lane would repeat unchanged."""
    amax, vmax, scale, iscale = st[AMAX], st[XMAX], st[Q_SCALE], st[Q_ISCALE]
    sumlx, suml2 = st[SUMLX], st[SUML2]
    largest_magnitude_lanes(xt, lanes, amax, vmax)
    for s in range(lanes):
        iscale[s] = F32(-4) / vmax[s]
        sumlx[s] = F32(0)
        suml2[s] = F32(0)
    for i in range(16):
        for s in range(lanes):
            v = xt[i, s]
            l = clampf(nearest_int_f32(iscale[s] * v), F32(-4), F32(3))
            lq[i, s] = l
            w = v * v
            sumlx[s] += w * v * l
            suml2[s] += w * l * l
    for _ in range(5):  # ggml's branches as selects, so the loop over lanes vectorizes
        for i in range(16):
            for s in range(lanes):
                v = xt[i, s]
                w = v * v
                old = lq[i, s]
                slx = sumlx[s] - w * v * old
                sl2 = suml2[s] - w * old * old
                new_l = clampf(nearest_int_f32(v * sl2 / slx), F32(-4), F32(3))  # used only where slx > 0
                new_slx = slx + w * v * new_l
                new_sl2 = sl2 + w * new_l * new_l
                accept = (slx > F32(0)) & (new_l != old) & (new_sl2 > F32(0)) & \
                    (new_slx * new_slx * suml2[s] > sumlx[s] * sumlx[s] * new_sl2)
                lq[i, s] = new_l if accept else old
                sumlx[s] = new_slx if accept else sumlx[s]
                suml2[s] = new_sl2 if accept else suml2[s]
    for s in range(lanes):
        scale[s] = sumlx[s] / suml2[s] if suml2[s] > F32(0) else F32(0)
        if amax[s] < GROUP_MAX_EPS:
            scale[s] = F32(0)
            for i in range(16):
                lq[i, s] = F32(-4)


@jit()
def q3_k_superblock(x: np.ndarray, y: np.ndarray, L: np.ndarray, levels: np.ndarray, d_bits: int,
                    lq: np.ndarray, lane0: int) -> None:
    """Pack the 16 6-bit scale levels and d into y, requantize against them (where d·scale is 0 the search's levels
    lq[:, lane0 + j] stand), then hmask and the low 2 bits."""
    for k in range(12):
        y[96 + k] = 0
    for j in range(16):
        lv = levels[j]
        if j < 8:
            y[96 + j] = lv & 0xF
        else:
            y[96 + j - 8] |= (lv & 0xF) << 4
        y[96 + 8 + j % 4] |= (lv >> 4) << (2 * (j // 4))
    put_fp16(y, 108, d_bits)
    d_all = fp16_to_fp32(d_bits)
    for j in range(16):
        low = (np.int64(y[96 + j]) & 0xF) if j < 8 else (np.int64(y[96 + j - 8]) >> 4)
        high = (np.int64(y[104 + j % 4]) >> (2 * (j // 4))) & 3
        d = d_all * F32((low | (high << 4)) - 32)
        sub = x[16 * j : 16 * j + 16]
        if d == F32(0):
            for i in range(16):
                L[16 * j + i] = np.uint8(lq[i, lane0 + j] + F32(4))
            continue
        for i in range(16):
            L[16 * j + i] = np.uint8(clampf(nearest_int_f32(sub[i] / d), F32(-4), F32(3)) + F32(4))
    for m in range(32):
        h = 0
        for k in range(8):
            if L[32 * k + m] > 3:
                h |= 1 << k
                L[32 * k + m] -= 4
        y[m] = h
    pack_2bit(L, y, 32)


@jit()
def q3_k_blocks(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q3_K_ref: x float32 [N, 256] -> out uint8 [N, 110] (hmask[32], qs[64], scales[12], d)."""
    xt = np.empty((16, LANES), F32)
    lq = np.empty((16, LANES), F32)
    st = np.empty((N_Q_STATE, LANES), F32)
    L = np.empty(QK_K, np.uint8)
    levels = np.empty(16, np.int64)
    for b0 in range(0, x.shape[0], GROUP):
        n_sb = min(GROUP, x.shape[0] - b0)
        lanes = 16 * n_sb
        load_lanes(x, b0, n_sb, xt)
        q3_lanes(xt, lq, st, lanes)
        for b in range(n_sb):
            lane0 = 16 * b
            amax = F32(0)
            max_scale = F32(0)
            for j in range(16):
                scale = st[Q_SCALE, lane0 + j]
                if np.abs(scale) > amax:
                    amax = np.abs(scale)
                    max_scale = scale
            if max_scale != F32(0):
                iscale = F32(-32) / max_scale
                for j in range(16):
                    levels[j] = max(-32, min(31, nearest_int(iscale * st[Q_SCALE, lane0 + j]))) + 32
                d_bits = fp32_to_fp16(F32(1) / iscale)
            else:
                levels[:] = 0  # scales stay 0; sc - 32 with d 0 keeps the search's levels
                d_bits = 0
            q3_k_superblock(x[b0 + b], out[b0 + b], L, levels, d_bits, lq, lane0)


@jit()
def q3_k_weighted_blocks(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q3_K_impl: x float32 [N, 256], qw float32 [R, 256] -> out uint8 [N, 110]."""
    xt = np.empty((16, LANES), F32)
    w = np.empty((16, LANES), F32)
    wx = np.empty((16, LANES), F32)
    lq = np.empty((16, LANES), F32)
    st = np.empty((N_Q_STATE, LANES), F32)
    scales = np.empty((16, 1), F32)  # make_qx_quants(16, 32, scales, Ls, 1, sw) as one more lane search
    sw = np.empty((16, 1), F32)
    swx = np.empty((16, 1), F32)
    st_scales = np.empty((N_Q_STATE, 1), F32)
    L = np.empty(QK_K, np.uint8)
    levels = np.empty(16, np.int64)
    n_qw = qw.shape[0]
    for b0 in range(0, x.shape[0], GROUP):
        n_sb = min(GROUP, x.shape[0] - b0)
        lanes = 16 * n_sb
        load_lanes(x, b0, n_sb, xt)
        for b in range(n_sb):
            xb = x[b0 + b]
            qb = qw[(b0 + b) % n_qw]
            imatrix_weights(xb, qb, F32(2) * sum_of_squares(xb) / F32(QK_K), w, 16, 16 * b)
        for i in range(16):
            for s in range(lanes):
                wx[i, s] = w[i, s] * xt[i, s]
        qx_lanes(xt, wx, w, st, lanes, 4)
        for s in range(lanes):  # the levels make_qx_quants leaves, rebuilt from the winning iscale (0 if all zero)
            for i in range(16):
                lq[i, s] = clampf(nearest_int_f32(st[Q_L_ISCALE, s] * xt[i, s]), F32(-4), F32(3)) \
                    if st[AMAX, s] >= GROUP_MAX_EPS else F32(-4)
        for b in range(n_sb):
            lane0 = 16 * b
            for j in range(16):
                total = F32(0)
                for i in range(16):
                    total += w[i, lane0 + j]
                sw[j, 0] = total
                scales[j, 0] = st[Q_SCALE, lane0 + j]
                swx[j, 0] = total * scales[j, 0]
            qx_lanes(scales, swx, sw, st_scales, 1, 32)
            for j in range(16):  # its levels 0..63 (all 0 when every scale is near zero)
                level = clampf(nearest_int_f32(st_scales[Q_L_ISCALE, 0] * scales[j, 0]), F32(-32), F32(31))
                levels[j] = np.int64(level) + 32 if st_scales[AMAX, 0] >= GROUP_MAX_EPS else 0
            q3_k_superblock(x[b0 + b], out[b0 + b], L, levels, fp32_to_fp16(st_scales[Q_SCALE, 0]), lq, lane0)


# ---------------------------------------------------------------- IQ4_NL / IQ4_XS
#
# quantize_row_iq4_nl_impl: lane s = one block of 32; a level is the index of the nearest of the 16 non-linear
# values (ggml's best_index_int8: the upper one on a tie).

IQ4_LANES = 64
D_BEST, D_SCALE, D_AMAX, D_MAX, D_SUMQX, D_SUMQ2, D_ISCALE = range(7)


@jit(inline="always")
def best_index(x: float, v: np.ndarray) -> int:
    """Without branches, so loops of it vectorize: lo = how many of v[1:] lie at or below x, the nearer of v[lo] and
    v[lo + 1] (ggml's answer below v[0] and above v[15] falls out; a NaN gets 15, as ggml's search gives it)."""
    lo = 0
    for k in range(1, 16):
        lo += 1 if v[k] <= x else 0
    hi = lo + 1 if lo < 15 else 15
    index = lo if x - v[lo] < v[hi] - x else hi
    return index if x == x else 15


@jit(inline="always")
def nearest_value(x: float, v: np.ndarray) -> float:
    """v[best_index(x, v)] by selects alone (no gather), so the loop over lanes vectorizes."""
    lo = v[0]
    hi = v[1]
    for k in range(1, 15):
        below = v[k] <= x
        lo = v[k] if below else lo
        hi = v[k + 1] if below else hi
    top = v[15] <= x
    lo = v[15] if top else lo
    hi = v[15] if top else hi
    q = lo if x - lo < hi - x else hi
    return q if x == x else v[15]


@jit()
def iq4_lanes(xt: np.ndarray, w: np.ndarray, st: np.ndarray, lanes: int, v: np.ndarray) -> None:
    """The scale search of quantize_row_iq4_nl_impl (ntry 7) on `lanes` blocks: xt, w [32, S] -> st[D_SCALE]
    (0 for an all-zero block)."""
    best, scale, amax, vmax = st[D_BEST], st[D_SCALE], st[D_AMAX], st[D_MAX]
    sumqx, sumq2, iscale = st[D_SUMQX], st[D_SUMQ2], st[D_ISCALE]
    largest_magnitude_lanes(xt, lanes, amax, vmax)
    for step in range(-8, 8):  # -8: the first pass, with d = -max / values[0]
        for s in range(lanes):
            iscale[s] = F32(1) / (-vmax[s] / v[0]) if step == -8 else F32(step + np.int64(v[0])) / vmax[s]
            sumqx[s] = F32(0)
            sumq2[s] = F32(0)
        for i in range(32):
            for s in range(lanes):
                q = nearest_value(iscale[s] * xt[i, s], v)
                sumqx[s] += w[i, s] * q * xt[i, s]
                sumq2[s] += w[i, s] * q * q
        for s in range(lanes):
            if step == -8:
                scale[s] = sumqx[s] / sumq2[s] if sumq2[s] > F32(0) else F32(0)
                best[s] = scale[s] * sumqx[s]
            elif sumq2[s] > F32(0) and sumqx[s] * sumqx[s] > best[s] * sumq2[s]:
                scale[s] = sumqx[s] / sumq2[s]
                best[s] = scale[s] * sumqx[s]
    for s in range(lanes):
        if amax[s] < GROUP_MAX_EPS:
            scale[s] = F32(0)


@jit(inline="always")
def pack_iq4_block(x: np.ndarray, inv: float, y: np.ndarray, at: int, v: np.ndarray) -> None:
    """The 32 levels of best_index(inv · x) as 16 bytes at y[at:]: byte j holds level j and level 16 + j."""
    for j in range(16):
        y[at + j] = best_index(inv * x[j], v) | (best_index(inv * x[16 + j], v) << 4)


@jit()
def iq4_blocks(x: np.ndarray, qw: np.ndarray, weighted: bool, out: np.ndarray, v: np.ndarray) -> None:
    """IQ4_NL (x [N, 32] -> out [N, 18]) or IQ4_XS (x [N, 256] -> out [N, 136]); weights x² or, `weighted`,
    qw[b % R] · sqrt(sigma2 + x²) with sigma2 = 2/n · the (super-)block's sum of squares."""
    n_values = x.shape[1]
    per = n_values // 32  # blocks of 32 per output block
    group = max(1, IQ4_LANES // per)
    xt = np.empty((32, IQ4_LANES), F32)
    w = np.empty((32, IQ4_LANES), F32)
    st = np.empty((7, IQ4_LANES), F32)
    n_qw = qw.shape[0]
    for b0 in range(0, x.shape[0], group):
        n_b = min(group, x.shape[0] - b0)
        for b in range(n_b):
            xb = x[b0 + b]
            for k in range(per):
                for i in range(32):
                    value = xb[32 * k + i]
                    xt[i, per * b + k] = value
                    w[i, per * b + k] = value * value
            if weighted:  # sigma2 scaled as ggml scales it (by 2/n, not 2 then /n: no overflow to inf)
                imatrix_weights(xb, qw[(b0 + b) % n_qw], sum_of_squares(xb) * F32(2.0 / n_values), w, 32, per * b)
        iq4_lanes(xt, w, st, per * n_b, v)
        for b in range(n_b):
            y = out[b0 + b]
            xb = x[b0 + b]
            if per == 1:
                d = st[D_SCALE, b]
                put_fp16(y, 0, fp32_to_fp16(d))
                pack_iq4_block(xb, F32(1) / d if d != F32(0) else F32(0), y, 2, v)
                continue
            amax = F32(0)
            max_scale = F32(0)
            for k in range(per):
                scale = st[D_SCALE, per * b + k]
                if np.abs(scale) > amax:
                    amax = np.abs(scale)
                    max_scale = scale
            d = -max_scale / F32(32)
            put_fp16(y, 0, fp32_to_fp16(d))
            inv = F32(1) / d if d != F32(0) else F32(0)
            scales_h = 0
            for k in range(per):
                level = max(-32, min(31, nearest_int(inv * st[D_SCALE, per * b + k])))
                dl = d * F32(level)
                pack_iq4_block(xb[32 * k : 32 * k + 32], F32(1) / dl if dl != F32(0) else F32(0), y, 8 + 16 * k, v)
                level += 32
                if k % 2 == 0:
                    y[4 + k // 2] = level & 0xF
                else:
                    y[4 + k // 2] |= (level & 0xF) << 4
                scales_h |= (level >> 4) << (2 * k)
            put_fp16(y, 2, scales_h)


IQ4_VALUES = KVALUES.astype(F32)


def iq4_plain(x: np.ndarray, out: np.ndarray) -> None:
    iq4_blocks(x, np.zeros((1, x.shape[1]), F32), False, out, IQ4_VALUES)


def iq4_weighted(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    iq4_blocks(x, qw, True, out, IQ4_VALUES)


# ---------------------------------------------------------------- TQ1_0 / TQ2_0


@jit(inline="always")
def trit(v: float, inv: float) -> int:
    """lroundf(v · inv) + 1: -1, 0, 1 -> 0, 1, 2 (roundf half away from zero, as Q8_0's kernel rounds)."""
    q = v * inv
    return np.int64(q + (HALF_BELOW if q >= F32(0) else -HALF_BELOW)) + 1


@jit(inline="always")
def ternary_scale(xb: np.ndarray) -> float:
    """MAX(amax, fabsf(v)) over the block, in ggml's order (a NaN is kept only if nothing after it is larger)."""
    amax = F32(0)
    for j in range(QK_K):
        a = np.abs(xb[j])
        amax = amax if amax > a else a
    return amax


@jit(inline="always")
def base3_byte(xb: np.ndarray, start: int, stride: int, count: int, inv: float, shift_last: bool) -> int:
    q = 0
    for n in range(count):
        q = (q * 3 + trit(xb[start + n * stride], inv)) & 0xFF
    if shift_last:
        q = (q * 3) & 0xFF
    return (q * 256 + 242) // 243


@jit()
def tq1_0_blocks(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_tq1_0_ref: x [N, 256] -> out [N, 54] (qs[48]: 5 trits a byte, qh[4]: 4, d)."""
    for b in range(x.shape[0]):
        xb = x[b]
        y = out[b]
        d = ternary_scale(xb)
        inv = F32(1) / d if d != F32(0) else F32(0)
        for m in range(32):
            y[m] = base3_byte(xb, m, 32, 5, inv, False)
        for m in range(16):
            y[32 + m] = base3_byte(xb, 160 + m, 16, 5, inv, False)
        for j in range(4):
            y[48 + j] = base3_byte(xb, 240 + j, 4, 4, inv, True)
        put_fp16(y, 52, fp32_to_fp16(d))


@jit()
def tq2_0_blocks(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_tq2_0_ref: x [N, 256] -> out [N, 66] (qs[64]: 2 bits a value, d)."""
    for b in range(x.shape[0]):
        xb = x[b]
        y = out[b]
        d = ternary_scale(xb)
        inv = F32(1) / d if d != F32(0) else F32(0)
        for half in range(2):
            for m in range(32):
                q = 0
                for n in range(4):
                    q += (trit(xb[128 * half + m + 32 * n], inv) & 3) << (2 * n)
                y[32 * half + m] = q & 0xFF
        put_fp16(y, 64, fp32_to_fp16(d))


KERNELS = {"q2_k": q2_k_blocks, "q3_k": q3_k_blocks, "iq4_nl": iq4_plain, "iq4_xs": iq4_plain,
           "tq1_0": tq1_0_blocks, "tq2_0": tq2_0_blocks}
WEIGHTED_KERNELS = {"q2_k": q2_k_weighted_blocks, "q3_k": q3_k_weighted_blocks, "iq4_nl": iq4_weighted,
                    "iq4_xs": iq4_weighted}
