"""Quantizers with an importance matrix against ggml_quantize_chunk called with the imatrix pointer."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from mt.errors import QuantizationError
from mt.quant.weighted import make_qp_quants, quantize_weighted
from tests.ggml_ref import ggml_quantize
from tests.quant.test_kquants import rows_for

K_TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
IQ4 = [T.IQ4_NL, T.IQ4_XS]


def imatrices(n: int, seed: int) -> dict[str, np.ndarray]:
    """Weight vectors as imatrix files hold them (mean squared activations) and the awkward ones."""
    rng = np.random.default_rng(seed)
    spiky = rng.random(n) * 0.1
    spiky[rng.integers(0, n, 4)] = 1e4  # a few outlier channels, as real imatrices have
    return {
        "chi2": (rng.standard_normal(n) ** 2).astype(np.float32),
        "spiky": spiky.astype(np.float32),
        "sparse": np.where(rng.random(n) < 0.4, 0.0, rng.random(n) * 50).astype(np.float32),
        "zeros": np.zeros(n, dtype=np.float32),
        "ones": np.ones(n, dtype=np.float32),  # an entry with zero counts loads as 1
        "tiny": (rng.random(n) * 1e-30).astype(np.float32),
    }


def assert_bytes_equal(ggml_type: T, rows: np.ndarray, qw: np.ndarray) -> None:
    ours = quantize_weighted(ggml_type, rows, qw)
    theirs = ggml_quantize(int(ggml_type), rows, qw)
    bad = np.flatnonzero((ours != theirs).any(axis=1))
    assert bad.size == 0, f"rows {bad.tolist()} differ"


@pytest.mark.parametrize("ggml_type", K_TYPES + LEGACY + IQ4)
@pytest.mark.parametrize("weights", ["chi2", "spiky", "sparse", "zeros", "ones", "tiny"])
def test_bytes_equal_ggml_with_imatrix(ggml_type, weights):
    n = 512
    assert_bytes_equal(ggml_type, rows_for(n, 9), imatrices(n, 4)[weights])


@pytest.mark.parametrize("ggml_type", K_TYPES + LEGACY + IQ4)
def test_long_rows_and_threaded_chunks(ggml_type, monkeypatch):
    import mt.quant.weighted as weighted

    monkeypatch.setattr(weighted, "K_CHUNK_VALUES", 4096 * 3)  # several work items, a short last one
    rows = np.random.default_rng(1).standard_normal((10, 4096)).astype(np.float32)
    assert_bytes_equal(ggml_type, rows, imatrices(4096, 2)["chi2"])


@pytest.mark.parametrize("ggml_type", LEGACY)
def test_legacy_rows_of_32_multiples(ggml_type):
    """The legacy impls weigh by the whole row's mean square: rows of 96 (3 blocks) and 32."""
    for n in (32, 96):
        assert_bytes_equal(ggml_type, rows_for(n, n), imatrices(n, n)["spiky"])


def test_q8_0_ignores_the_imatrix():
    rows = rows_for(256, 3)
    assert np.array_equal(quantize_weighted(T.Q8_0, rows, imatrices(256, 1)["spiky"]), ggml_quantize(int(T.Q8_0), rows))


def test_weights_change_the_result():
    """A test of the test: ggml's imatrix path is not its plain one, and mt follows the imatrix."""
    rows, qw = rows_for(256, 5), imatrices(256, 6)["spiky"]
    assert not np.array_equal(ggml_quantize(int(T.Q4_K), rows, qw), ggml_quantize(int(T.Q4_K), rows))
    assert not np.array_equal(quantize_weighted(T.Q4_K, rows, qw), quantize_weighted(T.Q4_K, rows, imatrices(256, 6)["chi2"]))


def test_make_qp_quants_levels_fit_and_scale_reconstructs():
    rng = np.random.default_rng(0)
    x = rng.random((50, 8)).astype(np.float32)
    scale, L = make_qp_quants(x, np.ones_like(x), 63)
    assert L.max() <= 63
    assert np.abs(scale[:, None] * L - x).max() < 1.0 / 63


def test_bad_row_and_weight_lengths():
    with pytest.raises(QuantizationError, match="multiple"):
        quantize_weighted(T.Q4_K, np.zeros((2, 96), np.float32), np.ones(96, np.float32))
    with pytest.raises(QuantizationError, match="importance weights"):
        quantize_weighted(T.Q4_K, np.zeros((2, 256), np.float32), np.ones(255, np.float32))
