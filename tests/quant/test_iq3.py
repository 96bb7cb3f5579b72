"""IQ3_XXS and IQ3_S: the numpy references (mt/quant/iq3.py) and the compiled kernels (mt/quant/compiled_iq3.py)
against ggml_quantize_chunk, with and without an importance matrix."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from mt.quant.types import quant_type
from mt.quant.weighted import quantize_weighted, row_writer
from tests.ggml_ref import ggml_quantize
from tests.quant.test_compiled import heavy_tailed_rows
from tests.quant.test_kquants import rows_for
from tests.quant.test_weighted import imatrices

IQ3 = [T.IQ3_XXS, T.IQ3_S]
NAMES = [t.name for t in IQ3]
BACKENDS = ["numpy", "compiled"]
WEIGHTS = ["none", "chi2", "spiky", "sparse", "zeros", "ones", "tiny"]


def ours(ggml_type: T, rows: np.ndarray, qw: np.ndarray | None, backend: str) -> np.ndarray:
    if qw is None:
        return quant_type(ggml_type).quantize(rows, backend=backend).reshape(rows.shape[0], -1)
    return quantize_weighted(ggml_type, rows, qw, backend=backend)


def assert_bytes_equal_ggml(ggml_type: T, rows: np.ndarray, qw: np.ndarray | None, backend: str) -> None:
    mine = ours(ggml_type, rows, qw, backend)
    theirs = ggml_quantize(int(ggml_type), rows, qw)
    bad = np.flatnonzero((mine != theirs).any(axis=1))
    assert bad.size == 0, f"rows {bad.tolist()} differ from ggml"


def weights_named(name: str, n: int, seed: int) -> np.ndarray | None:
    return None if name == "none" else imatrices(n, seed)[name]


def edge_rows(n: int) -> np.ndarray:
    """Zeros, tiny values, one huge value (as large as ggml's search stays finite for: past ~1e13 its squared
    errors overflow and it aborts), all equal and negative, alternating signs, zero and -0 sub-blocks."""
    rng = np.random.default_rng(11)
    huge = rng.standard_normal(n)
    huge[37] = 1e10
    gaps = rng.standard_normal(n)
    gaps[32:64] = 0.0  # IQ3_S: a skipped sub-block does not advance where the next one's bytes go
    gaps[160:224] = 0.0
    negative_zero = rng.standard_normal(n)
    negative_zero[:32] = -0.0
    alternating = np.where(np.arange(n) % 2 == 1, 1.0, -1.0) * np.linspace(0.1, 2.0, n)
    return np.array([np.zeros(n), np.full(n, 1e-30), rng.standard_normal(n) * 1e-30, huge, np.full(n, -0.75),
                     alternating, gaps, negative_zero, np.full(n, 1e-9), rng.standard_normal(n) * 1e-8],
                    dtype=np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ggml_type", IQ3, ids=NAMES)
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("n", [256, 1024])
def test_bytes_equal_ggml(n, weights, ggml_type, backend):
    rows = np.concatenate([rows_for(n, n + 3), heavy_tailed_rows(n, n)])
    assert_bytes_equal_ggml(ggml_type, rows, weights_named(weights, n, 7), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ggml_type", IQ3, ids=NAMES)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_edge_rows_equal_ggml(weights, ggml_type, backend):
    assert_bytes_equal_ggml(ggml_type, edge_rows(512), weights_named(weights, 512, 5), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ggml_type", IQ3, ids=NAMES)
def test_zero_scales_with_nonzero_values_equal_ggml(ggml_type, backend):
    """Weight only where x is 0: every sub-block's refined scale is 0. IQ3_S keeps the grid and sign bytes it
    wrote with d = 0; IQ3_XXS never refines (all groups start on the grid) and keeps max/15."""
    x = np.where(np.arange(512) % 2 == 0, np.linspace(0.5, -2.0, 512), 0.0).astype(np.float32)
    qw = (np.arange(512) % 2).astype(np.float32)
    assert_bytes_equal_ggml(ggml_type, np.stack([x, -x, x * 1e3]), qw, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_scale_flips_the_signs_as_ggml(backend):
    """IQ3_XXS: the value flipped back to make a sign count even can outweigh the rest, so the best scale is
    negative; ggml then stores -scale and inverts the 7 sign bits."""
    x = np.full(256, 10.0, np.float32)
    x[::8] = -0.01
    qw = np.full(256, 1e-3, np.float32)
    qw[::8] = 1e3
    rows = np.stack([x, x * 3, -x])
    theirs = ggml_quantize(int(T.IQ3_XXS), rows, qw)
    signs = theirs[:, 66:98].copy().view("<u4") & 0x0FFFFFFF
    # row 0: the one negative of each 8 is the one flipped back (sign bits 0), then all inverted; row 2 the opposite
    assert (signs[0] == 0x0FFFFFFF).all() and (signs[2] == 0).all()
    assert np.array_equal(quantize_weighted(T.IQ3_XXS, rows, qw, backend=backend), theirs)


@pytest.mark.parametrize("ggml_type", IQ3, ids=NAMES)
def test_many_rows_in_chunks_equal_ggml(ggml_type, monkeypatch):
    import mt.quant.types as types

    monkeypatch.setattr(types, "CHUNK_VALUES", 256 * 7)  # several compiled work items, a short last one
    rows = np.random.default_rng(9).standard_t(4, (24, 2048)).astype(np.float32) * np.float32(0.03)
    assert_bytes_equal_ggml(ggml_type, rows, None, "compiled")


@pytest.mark.parametrize("ggml_type", IQ3, ids=NAMES)
def test_dequantize_equals_gguf_py(ggml_type):
    qt = quant_type(ggml_type)
    rows = rows_for(512, 1)
    assert np.array_equal(ours(ggml_type, rows, None, "compiled"), ggml_quantize(int(ggml_type), rows))
    packed = ggml_quantize(int(ggml_type), rows)
    assert np.array_equal(qt.dequantize(ours(ggml_type, rows, None, "compiled")),
                          gguf.quants.dequantize(packed, ggml_type))


@pytest.mark.parametrize("ggml_type, tolerance", [(T.IQ3_XXS, 0.23), (T.IQ3_S, 0.18)], ids=NAMES)
def test_roundtrip_error_is_small(ggml_type, tolerance):
    """Measured on N(0, 1): 0.212-0.218 (IQ3_XXS), 0.165-0.168 (IQ3_S); Q3_K's bound is 0.17."""
    qt = quant_type(ggml_type)
    x = np.random.default_rng(5).standard_normal((16, 1024)).astype(np.float32)
    back = qt.dequantize(qt.quantize(x))
    assert np.sqrt(np.mean((back - x) ** 2)) < tolerance


@pytest.mark.parametrize("ggml_type", IQ3, ids=NAMES)
def test_imatrix_weights_the_error(ggml_type):
    """Columns with 100x the importance come back closer than with flat weights."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 1024)).astype(np.float32)
    qw = np.where(rng.random(1024) < 0.1, 100.0, 1.0).astype(np.float32)
    important = qw > 1
    qt = quant_type(ggml_type)
    flat = qt.dequantize(quantize_weighted(ggml_type, x, np.ones(1024, np.float32)))
    weighted = qt.dequantize(quantize_weighted(ggml_type, x, qw))
    assert np.mean((weighted - x)[:, important] ** 2) < 0.8 * np.mean((flat - x)[:, important] ** 2)


@pytest.mark.parametrize("ggml_type", IQ3, ids=NAMES)
def test_registered_with_both_compiled_paths(ggml_type):
    qt = quant_type(ggml_type)
    assert qt.ggml_type == ggml_type and qt.kernel and qt.weighted_kernel
    assert row_writer(ggml_type).__qualname__.startswith("compiled_row_writer")
    assert (qt.block_size, qt.type_size) == gguf.GGML_QUANT_SIZES[ggml_type]
