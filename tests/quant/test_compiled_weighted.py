"""The compiled imatrix kernels (mt/quant/compiled.py) against ggml_quantize_chunk with the imatrix
and against the numpy references in mt/quant/weighted.py, on the same rows."""

import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from mt.errors import QuantizationError
from mt.quant.types import set_threads
from mt.quant.weighted import quantize_weighted
from tests.ggml_ref import ggml_quantize
from tests.quant.test_compiled import heavy_tailed_rows
from tests.quant.test_kquants import rows_for
from tests.quant.test_legacy import edge_rows
from tests.quant.test_weighted import imatrices

COMPILED_WEIGHTED = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]


def assert_compiled_equals_ggml_and_numpy(ggml_type: T, rows: np.ndarray, qw: np.ndarray) -> None:
    ours = quantize_weighted(ggml_type, rows, qw, backend="compiled")
    theirs = ggml_quantize(int(ggml_type), rows, qw)
    bad = np.flatnonzero((ours != theirs).any(axis=1))
    assert bad.size == 0, f"rows {bad.tolist()} differ from ggml"
    assert np.array_equal(ours, quantize_weighted(ggml_type, rows, qw, backend="numpy"))


@pytest.mark.parametrize("ggml_type", COMPILED_WEIGHTED)
@pytest.mark.parametrize("weights", ["chi2", "spiky", "sparse", "zeros", "ones", "tiny"])
def test_bytes_equal_ggml_and_reference(ggml_type, weights):
    n = 1024
    rows = np.concatenate([rows_for(n, n + 1), heavy_tailed_rows(n, n)])  # adversarial, scaled normal, t
    assert_compiled_equals_ggml_and_numpy(ggml_type, rows, imatrices(n, 7)[weights])


@pytest.mark.parametrize("ggml_type", COMPILED_WEIGHTED)
@pytest.mark.parametrize("n", [256, 768, 4096])
def test_row_lengths_pick_each_super_blocks_weights(ggml_type, n):
    """A row of 3 super-blocks does not fill a lane group of 8: the weights wrap per row, not per group."""
    rows = np.random.default_rng(n).standard_t(4, (13, n)).astype(np.float32) * np.float32(0.02)
    assert_compiled_equals_ggml_and_numpy(ggml_type, rows, imatrices(n, n)["spiky"])


@pytest.mark.parametrize("ggml_type", COMPILED_WEIGHTED)
def test_many_rows_on_threads_equal_ggml(ggml_type, monkeypatch):
    import mt.quant.weighted as weighted

    monkeypatch.setattr(weighted, "K_CHUNK_VALUES", 2048 * 7)  # several work items, a short last one
    rows = np.random.default_rng(9).standard_t(4, (60, 2048)).astype(np.float32) * np.float32(0.03)
    set_threads(2)
    try:
        assert_compiled_equals_ggml_and_numpy(ggml_type, rows, imatrices(2048, 3)["chi2"])
    finally:
        set_threads(os.cpu_count() or 1)


def test_compiled_is_the_default_and_env_selects_numpy(monkeypatch):
    import mt.quant.weighted as weighted

    assert weighted.row_writer(T.Q4_K).__qualname__.startswith("compiled_row_writer")
    monkeypatch.setenv("MT_QUANT_BACKEND", "numpy")
    assert not weighted.row_writer(T.Q4_K).__qualname__.startswith("compiled_row_writer")
    monkeypatch.setenv("MT_QUANT_BACKEND", "fortran")
    with pytest.raises(QuantizationError, match="not a quantization backend"):
        quantize_weighted(T.Q4_K, np.zeros((1, 256), np.float32), np.ones(256, np.float32))


@pytest.mark.parametrize("ggml_type", COMPILED_WEIGHTED)
@pytest.mark.parametrize("weights", ["chi2", "zeros", "tiny"])
def test_non_finite_and_overflowing_rows_equal_ggml(ggml_type, weights):
    """NaN, inf, ranges that overflow, subnormal scales: ggml's branches decide. (mt quantize refuses
    NaN/Inf tensors; the kernels still follow ggml. The numpy references differ from ggml on two of
    these rows for Q4_K/Q5_K, so only ggml is the oracle here.)"""
    rng = np.random.default_rng(1)
    edges = np.tile(edge_rows(), (1, 8))  # each 32-value edge case in all 8 sub-blocks
    scaled = rng.standard_normal((6, 256)) * np.array([1e-30, 1e-20, 1e20, 1e30, 3e38, 1e-38])[:, None]
    spiked = rng.standard_normal((4, 256))
    spiked[0, 5], spiked[1, 0], spiked[2, 100], spiked[3] = np.nan, np.inf, -np.inf, np.nan
    with np.errstate(over="ignore"):
        rows = np.concatenate([edges, scaled, spiked]).astype(np.float32)
    qw = imatrices(256, 2)[weights]
    with np.errstate(all="ignore"):
        ours = quantize_weighted(ggml_type, rows, qw, backend="compiled")
        theirs = ggml_quantize(int(ggml_type), rows, qw)
    bad = np.flatnonzero((ours != theirs).any(axis=1))
    assert bad.size == 0, f"rows {bad.tolist()} differ from ggml"
