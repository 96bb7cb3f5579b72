"""TQ1_0 and TQ2_0 numpy references against ggml_quantize_chunk (tests/quant/test_compiled.py checks the kernels)."""

import gguf
import numpy as np
import pytest

from mt.quant.ternary import TQ1_0, TQ2_0
from tests.ggml_ref import ggml_quantize
from tests.quant.test_kquants import rows_for


def ternary_rows(n: int, seed: int) -> np.ndarray:
    """What these types are for: weights in {-1, 0, 1} times a scale (a BitNet-style layer), and near-ties."""
    rng = np.random.default_rng(seed)
    exact = rng.integers(-1, 2, (6, n)).astype(np.float32) * np.float32(0.37)
    halves = exact * np.float32(0.5)  # |x / max| = 0.5: lroundf rounds away from zero
    return np.concatenate([exact, halves, rows_for(n, seed)])


@pytest.mark.parametrize("qt", [TQ1_0, TQ2_0])
@pytest.mark.parametrize("n", [256, 2048])
def test_reference_bytes_equal_ggml(qt, n):
    rows = ternary_rows(n, n)
    ours = qt.quantize(rows, backend="numpy").reshape(rows.shape[0], -1)
    assert np.array_equal(ours, ggml_quantize(int(qt.ggml_type), rows))


@pytest.mark.parametrize("qt", [TQ1_0, TQ2_0])
def test_ternary_weights_come_back_exactly(qt):
    rows = np.random.default_rng(2).integers(-1, 2, (4, 512)).astype(np.float32) * np.float32(0.25)
    rows[:, 0] = 0.25  # the scale is the largest magnitude, exact in fp16
    packed = qt.quantize(rows)
    assert np.array_equal(qt.dequantize(packed), rows)
    assert np.array_equal(qt.dequantize(packed), gguf.quants.dequantize(packed, qt.ggml_type))
