"""TQ1_0 and TQ2_0 (ternary super-blocks of 256, for models trained with weights in {-1, 0, 1} such as BitNet):
numpy references of ggml-quants.c's quantize_row_tq{1,2}_0_ref (no importance-matrix path: ggml ignores one).
Dequantizing is gguf-py's (QuantType's default).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from mt.quant.types import QuantType, roundf_to_int8

F32 = np.float32


def trits(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d fp16 [N], each value as lroundf(x / max|x|) + 1 in 0..2 [N, 256]); d is the largest magnitude, as
    ggml's MAX loop finds it."""
    amax = np.zeros(blocks.shape[0], dtype=F32)
    for j in range(blocks.shape[1]):
        a = np.abs(blocks[:, j])
        amax = np.where(amax > a, amax, a)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # d past fp16 range is inf, as in ggml
        inv = np.where(amax != 0, F32(1) / amax, F32(0))
        return amax.astype(np.float16), roundf_to_int8(blocks * inv[:, None]).astype(np.int32) + 1


def _base3(digits: np.ndarray, shift_last: bool = False) -> np.ndarray:
    """Trits [..., k] (the first the most significant) -> ceil(v · 256 / 243) in a byte, v their base-3 value
    (times 3 when `shift_last`, as ggml fills 5 trit places with 4)."""
    v = np.zeros(digits.shape[:-1], dtype=np.int32)
    for n in range(digits.shape[-1]):
        v = (v * 3 + digits[..., n]) & 0xFF  # ggml accumulates in a uint8
    if shift_last:
        v = (v * 3) & 0xFF
    return ((v * 256 + 242) // 243).astype(np.uint8)


def tq1_0_bytes(blocks: np.ndarray) -> np.ndarray:
    """block_tq1_0: qs[48] (5 trits a byte: 32 bytes over values 0-159, 16 over 160-239), qh[4] (4 trits a byte over
    240-255), d."""
    d, t = trits(blocks)
    n = blocks.shape[0]
    first = _base3(t[:, :160].reshape(n, 5, 32).transpose(0, 2, 1))  # byte m: values m + 32n
    second = _base3(t[:, 160:240].reshape(n, 5, 16).transpose(0, 2, 1))
    qh = _base3(t[:, 240:].reshape(n, 4, 4).transpose(0, 2, 1), shift_last=True)
    return np.concatenate([first, second, qh, d.view(np.uint8).reshape(n, 2)], axis=1)


def tq2_0_bytes(blocks: np.ndarray) -> np.ndarray:
    """block_tq2_0: qs[64] (per 128 values, byte m holds values m + 32n two bits each), d."""
    d, t = trits(blocks)
    n = blocks.shape[0]
    h = (t & 3).reshape(n, 2, 4, 32)
    qs = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).astype(np.uint8).reshape(n, 64)
    return np.concatenate([qs, d.view(np.uint8).reshape(n, 2)], axis=1)


class TQ1_0(QuantType):
    ggml_type = GGMLQuantizationType.TQ1_0
    kernel = "tq1_0"

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return tq1_0_bytes(blocks)


class TQ2_0(QuantType):
    ggml_type = GGMLQuantizationType.TQ2_0
    kernel = "tq2_0"

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return tq2_0_bytes(blocks)
