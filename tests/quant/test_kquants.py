import gguf
import numpy as np
import pytest

from mt.quant.kquants import Q4_K, Q5_K, Q6_K, nearest_int
from mt.quant.low_kquants import Q2_K, Q3_K
from tests.ggml_ref import ggml_quantize
from tests.quant.test_types import adversarial_rows

K_TYPES = [Q2_K, Q3_K, Q4_K, Q5_K, Q6_K]


def rows_for(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scaled = rng.standard_normal((24, n)).astype(np.float32) * np.logspace(-4, 1, 24, dtype=np.float32)[:, None]
    return np.concatenate([adversarial_rows(n), scaled, rng.standard_t(2, (8, n)).astype(np.float32)])


@pytest.mark.parametrize("qt", K_TYPES)
@pytest.mark.parametrize("n", [256, 2048])
def test_reference_bytes_equal_ggml(qt, n):
    """The numpy reference (tests/quant/test_compiled.py checks the compiled kernels)."""
    rows = rows_for(n, n)
    ours = qt.quantize(rows, backend="numpy").reshape(rows.shape[0], -1)
    assert np.array_equal(ours, ggml_quantize(int(qt.ggml_type), rows))


@pytest.mark.parametrize("qt", K_TYPES)
def test_dequantize_equals_gguf_py(qt):
    packed = ggml_quantize(int(qt.ggml_type), rows_for(512, 1))
    assert np.array_equal(qt.dequantize(packed), gguf.quants.dequantize(packed, qt.ggml_type))


@pytest.mark.parametrize("qt, tolerance", [(Q2_K, 0.33), (Q3_K, 0.17), (Q4_K, 0.12), (Q5_K, 0.06), (Q6_K, 0.03)])
def test_roundtrip_error_is_small(qt, tolerance):
    x = np.random.default_rng(5).standard_normal((16, 1024)).astype(np.float32)
    back = qt.dequantize(qt.quantize(x))
    assert np.sqrt(np.mean((back - x) ** 2)) < tolerance


def test_nearest_int_is_round_half_even():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 3.49999, 1e6 + 0.5], dtype=np.float32)
    assert nearest_int(x).tolist() == np.rint(x.astype(np.float64)).astype(int).tolist()
