"""IQ2_XXS, IQ2_XS and IQ2_S: the numpy references (mt/quant/iq2.py) and the compiled kernels
(mt/quant/compiled_iq2.py) against ggml_quantize_chunk, with every kind of importance matrix and, for IQ2_S, without.
ggml aborts the process when IQ2_XXS or IQ2_XS get no imatrix, so those are never asked for it."""

import os

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from mt.errors import QuantizationError
from mt.quant.iq2 import best_neighbours, iq2_xs_quantize, iq2_xxs_quantize
from mt.quant.iq_grids import lattice
from mt.quant.types import quant_type, set_threads
from mt.quant.weighted import quantize_weighted
from tests.ggml_ref import ggml_quantize
from tests.quant.test_compiled import heavy_tailed_rows
from tests.quant.test_kquants import rows_for
from tests.quant.test_weighted import imatrices

IQ2 = [pytest.param(t, id=t.name) for t in (T.IQ2_XXS, T.IQ2_XS, T.IQ2_S)]
WEIGHTS = ["chi2", "spiky", "sparse", "zeros", "ones", "tiny"]
BACKENDS = ["numpy", "compiled"]


def edge_rows(n: int) -> np.ndarray:
    """All zeros, all 1e-30, one huge value among zeros and among small noise, all equal and negative, alternating
    signs (equal and random magnitudes)."""
    rng = np.random.default_rng(11)
    lone = np.zeros(n)
    lone[n // 3] = 3e15
    noisy = rng.standard_normal(n) * 1e-3
    noisy[7] = 1e6
    alternating = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    rows = [np.zeros(n), np.full(n, 1e-30), lone, noisy, np.full(n, -0.75), np.full(n, -3e-9), 0.5 * alternating,
            -alternating * rng.random(n)]
    return np.array(rows, dtype=np.float32)


def iq2_rows(n: int) -> np.ndarray:
    return np.concatenate([rows_for(n, n), heavy_tailed_rows(n, n + 1), edge_rows(n)])


def ours(ggml_type: T, rows: np.ndarray, qw: np.ndarray | None, backend: str) -> np.ndarray:
    if qw is None:
        return quant_type(ggml_type).quantize(rows, backend=backend).reshape(rows.shape[0], -1)
    return quantize_weighted(ggml_type, rows, qw, backend=backend)


def assert_equals_ggml(ggml_type: T, rows: np.ndarray, qw: np.ndarray | None) -> None:
    theirs = ggml_quantize(int(ggml_type), rows, qw)
    for backend in BACKENDS:
        bad = np.flatnonzero((ours(ggml_type, rows, qw, backend) != theirs).any(axis=1))
        assert bad.size == 0, f"{backend}: rows {bad.tolist()} differ from ggml"


@pytest.mark.parametrize("ggml_type", IQ2)
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("n", [256, 1024])
def test_bytes_equal_ggml_with_imatrix(ggml_type, weights, n):
    assert_equals_ggml(ggml_type, iq2_rows(n), imatrices(n, n + 3)[weights])


@pytest.mark.parametrize("n", [256, 1024])
def test_iq2_s_without_imatrix_equals_ggml(n):
    """IQ2_S weighs by 0.25·sigma2 + x² where it has no importance matrix."""
    assert_equals_ggml(T.IQ2_S, iq2_rows(n), None)


@pytest.mark.parametrize("ggml_type", IQ2)
def test_rows_of_three_super_blocks_on_threads_equal_ggml(ggml_type, monkeypatch):
    """A super-block takes the weights of its place in the row; several work items, a short last one, and the numpy
    reference's batches cut inside them."""
    import mt.quant.iq2 as iq2
    import mt.quant.weighted as weighted

    monkeypatch.setattr(weighted, "K_CHUNK_VALUES", 768 * 5)
    monkeypatch.setattr(iq2, "BATCH", 4)
    rows = np.random.default_rng(4).standard_t(4, (23, 768)).astype(np.float32) * np.float32(0.02)
    set_threads(2)
    try:
        assert_equals_ggml(ggml_type, rows, imatrices(768, 2)["spiky"])
    finally:
        set_threads(os.cpu_count() or 1)


@pytest.mark.parametrize("ggml_type", IQ2[:2])
def test_negative_scale_flips_every_sign_as_ggml(ggml_type):
    """A group with one negative value keeps the value of least w·x² negative; where that value carries most of
    w·|x| (a tiny value in a heavily weighted column) the best scale is negative and ggml flips the signs."""
    qw = np.full(256, 0.01, np.float32)
    qw[0::16] = 1e4
    x = np.zeros(256, np.float32)
    x[0::16] = -1e-4
    for start in range(1, 8):
        x[start::16] = 1.0
    assert_equals_ggml(ggml_type, np.stack([x, 3 * x, 0.5 * x]), qw)


def overflowing_rows() -> np.ndarray:
    rows = np.random.default_rng(12).standard_normal((2, 256)).astype(np.float32) * np.float32(0.01)
    rows[0, 5] = 1e20  # its square is inf, and so are the weights of its super-block
    return rows


def test_iq2_xxs_with_an_overflowing_square_equals_ggml():
    assert_equals_ggml(T.IQ2_XXS, overflowing_rows(), np.ones(256, np.float32))


@pytest.mark.parametrize("ggml_type, imatrix", [(T.IQ2_XS, True), (T.IQ2_S, True), (T.IQ2_S, False)],
                         ids=["IQ2_XS", "IQ2_S", "IQ2_S-plain"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_neighbour_at_a_finite_distance_is_an_error(ggml_type, imatrix, backend):
    """Where every weighted distance is inf, ggml's IQ2_XS and IQ2_S abort the process; mt raises."""
    with pytest.raises(QuantizationError, match="no IQ2 grid point at a finite weighted distance"):
        ours(ggml_type, overflowing_rows(), np.ones(256, np.float32) if imatrix else None, backend)


@pytest.mark.parametrize("ggml_type", IQ2[:2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_types_that_need_an_imatrix_refuse_without_one(ggml_type, backend):
    qt = quant_type(ggml_type)
    assert qt.kernel is None
    with pytest.raises(QuantizationError, match=f"{ggml_type.name} needs an importance matrix") as info:
        qt.quantize(np.ones((2, 256), np.float32), backend=backend)
    assert "--imatrix" in info.value.remedy


@pytest.mark.parametrize("quantize", [iq2_xxs_quantize, iq2_xs_quantize])
def test_references_refuse_missing_weights(quantize):
    with pytest.raises(QuantizationError):
        quantize(np.ones((1, 256), np.float32), None)


@pytest.mark.parametrize("ggml_type", IQ2)
def test_dequantize_equals_gguf_py(ggml_type):
    rows = rows_for(512, 1)
    qw = imatrices(512, 1)["chi2"]
    packed = quantize_weighted(ggml_type, rows, qw)
    want = gguf.quants.dequantize(ggml_quantize(int(ggml_type), rows, qw), ggml_type)
    assert np.array_equal(quant_type(ggml_type).dequantize(packed), want)


# measured RMSE on standard normal rows (IQ2_XXS 0.347, IQ2_XS 0.303, IQ2_S 0.251 and without an imatrix 0.268)
@pytest.mark.parametrize("ggml_type, imatrix, bound", [(T.IQ2_XXS, True, 0.38), (T.IQ2_XS, True, 0.33),
                                                       (T.IQ2_S, True, 0.28), (T.IQ2_S, False, 0.29)],
                         ids=["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_S-plain"])
def test_roundtrip_error_is_bounded(ggml_type, imatrix, bound):
    x = np.random.default_rng(5).standard_normal((16, 1024)).astype(np.float32)
    qt = quant_type(ggml_type)
    packed = quantize_weighted(ggml_type, x, np.ones(1024, np.float32)) if imatrix else qt.quantize(x)
    assert np.sqrt(np.mean((qt.dequantize(packed) - x) ** 2)) < bound


@pytest.mark.parametrize("ggml_type", IQ2)
def test_imatrix_moves_error_to_unimportant_columns(ggml_type):
    """Quantized with a skewed imatrix, the error it weighs is below the one of quantizing with flat weights."""
    x = np.random.default_rng(6).standard_normal((16, 1024)).astype(np.float32)
    qw = np.where(np.arange(1024) % 8 == 0, 50.0, 1.0).astype(np.float32)
    qt = quant_type(ggml_type)

    def weighted_error(weights: np.ndarray) -> float:
        back = qt.dequantize(quantize_weighted(ggml_type, x, weights))
        return float(np.sum(qw * (back - x) ** 2) / np.sum(qw) / x.shape[0])

    assert weighted_error(qw) < 0.9 * weighted_error(np.ones(1024, np.float32))


@pytest.mark.parametrize("ggml_type", IQ2)
def test_best_neighbour_is_the_first_nearest_of_its_list(ggml_type):
    """The vectorised neighbour search against a plain loop over each list (first strict minimum wins)."""
    lat = lattice(ggml_type)
    rng = np.random.default_rng(8)
    keys = rng.choice(np.flatnonzero(lat.index < 0), 200)
    xv = rng.random((8, 200)).astype(np.float32) * np.float32(6)
    wv = np.where(rng.random((8, 200)) < 0.3, 0, rng.random((8, 200))).astype(np.float32)  # zeros make ties
    scale = rng.uniform(0.5, 1.5, 200).astype(np.float32)
    found = best_neighbours(lat, keys, xv, wv, scale)
    for p, key in enumerate(keys):
        start = -int(lat.index[key]) - 1
        best, want = np.finfo(np.float32).max, -1
        for g in lat.neighbours[start + 1 : start + 1 + int(lat.neighbours[start])]:
            d2 = np.float32(0)
            for i in range(8):
                diff = scale[p] * np.float32(lat.points[g, i]) - xv[i, p]
                d2 = np.float32(d2 + wv[i, p] * diff * diff)
            if d2 < best:
                best, want = d2, int(g)
        assert found[p] == want
