"""IQ4_NL and IQ4_XS numpy references against ggml_quantize_chunk (tests/quant/test_compiled*.py check the compiled
kernels, tests/quant/test_weighted.py the imatrix path)."""

import gguf
import numpy as np
import pytest

from mt.quant.iq4 import IQ4_NL, IQ4_XS, KVALUES, best_index
from tests.ggml_ref import ggml_quantize
from tests.quant.test_kquants import rows_for

IQ4_TYPES = [IQ4_NL, IQ4_XS]


@pytest.mark.parametrize("qt", IQ4_TYPES)
@pytest.mark.parametrize("n", [256, 2048])
def test_reference_bytes_equal_ggml(qt, n):
    rows = rows_for(n, n)
    ours = qt.quantize(rows, backend="numpy").reshape(rows.shape[0], -1)
    assert np.array_equal(ours, ggml_quantize(int(qt.ggml_type), rows))


@pytest.mark.parametrize("qt", IQ4_TYPES)
def test_dequantize_equals_gguf_py(qt):
    packed = ggml_quantize(int(qt.ggml_type), rows_for(512, 1))
    assert np.array_equal(qt.dequantize(packed), gguf.quants.dequantize(packed, qt.ggml_type))


@pytest.mark.parametrize("qt, tolerance", [(IQ4_NL, 0.085), (IQ4_XS, 0.085)])
def test_roundtrip_error_is_small(qt, tolerance):
    x = np.random.default_rng(5).standard_normal((16, 1024)).astype(np.float32)
    back = qt.dequantize(qt.quantize(x))
    assert np.sqrt(np.mean((back - x) ** 2)) < tolerance


def test_best_index_is_the_nearest_level_and_the_upper_on_a_tie():
    v = KVALUES.astype(np.float32)
    mids = (v[:-1] + v[1:]) / 2  # exact ties: the upper level wins, as in ggml's search
    x = np.concatenate([v, mids, [-1e9, 1e9, v[0] - 1, v[-1] + 1]]).astype(np.float32)
    want = [int(np.argmin(np.abs(v - t))) if t not in mids else int(np.searchsorted(v, t)) for t in x]
    assert best_index(x).tolist() == want
