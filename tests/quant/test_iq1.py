"""IQ1_S and IQ1_M: the numpy references (mt/quant/iq1.py) and the compiled kernels (mt/quant/compiled_iq1.py) against
ggml_quantize_chunk. ggml aborts the process when IQ1_S gets no importance matrix: it is never called that way here."""

import faulthandler
import os
import signal

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from mt.errors import QuantizationError
from mt.quant.iq_grids import lattice
from mt.quant.types import quant_type, set_threads
from mt.quant.weighted import quantize_weighted
from tests.ggml_ref import ggml_quantize
from tests.quant.test_compiled import heavy_tailed_rows
from tests.quant.test_kquants import rows_for
from tests.quant.test_weighted import imatrices

WEIGHTS = ["chi2", "spiky", "sparse", "zeros", "ones", "tiny"]
BACKENDS = ["numpy", "compiled"]


def edge_rows(n: int) -> np.ndarray:
    """Rows that stress the split search: ties in the sort, exact level values, signs of zero, extremes."""
    rng = np.random.default_rng(n)
    noise = rng.standard_normal(n)
    levels = np.float32(0.3) * (rng.integers(-1, 2, n) + np.float32(0.125))  # values on the IQ1 levels: exact ties
    rows = [
        np.zeros(n),
        np.full(n, 1e-30),
        np.full(n, -0.37),  # all equal and negative
        np.where(np.arange(n) % 2 == 0, 1.0, -1.0) * 0.02,  # alternating signs
        np.r_[noise[: n - 1] * 0.01, 50.0],  # one huge value
        np.r_[noise[: n - 1] * 0.01, 1e30],  # one value whose square overflows (OVERFLOW_ROW)
        np.r_[noise[: n // 2] * 0.02, np.zeros(n - n // 2)],
        rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], n) * 0.01,  # few distinct values: many ties
        levels,
        np.where(np.arange(n) % 3 == 0, -0.0, 0.0),
        noise * 1e-39,  # subnormal
        noise * 1e-7,  # about IQ1_M's group threshold
        noise * 1e6,
        np.abs(noise) * 0.05,  # one sign only
        -np.abs(noise) * 0.05,
    ]
    return np.array(rows, dtype=np.float32)


OVERFLOW_ROW = 5  # of edge_rows: unweighted, its weight x² is inf and IQ1_M's scale NaN, on which ggml aborts


def iq1_rows(n: int, seed: int, weighted: bool = True) -> np.ndarray:
    edges = edge_rows(n)
    if not weighted:
        edges = np.delete(edges, OVERFLOW_ROW, axis=0)
    return np.concatenate([rows_for(n, seed), heavy_tailed_rows(n, seed), edges])


def quantize(ggml_type: T, rows: np.ndarray, qw: np.ndarray | None, backend: str) -> np.ndarray:
    if qw is None:
        return quant_type(ggml_type).quantize(rows, backend=backend).reshape(rows.shape[0], -1)
    return quantize_weighted(ggml_type, rows, qw, backend=backend)


def assert_equal_rows(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    bad = np.flatnonzero((ours != theirs).any(axis=1))
    assert bad.size == 0, f"{what}: rows {bad.tolist()} differ from ggml"


CASES = [(t, w) for t in (T.IQ1_S, T.IQ1_M) for w in WEIGHTS] + [(T.IQ1_M, None)]


@pytest.mark.parametrize("ggml_type, weights", CASES)
@pytest.mark.parametrize("n", [256, 1280])
def test_bytes_equal_ggml(ggml_type, weights, n):
    """Both backends, through the registry; rows of 1280 hold 5 super-blocks, each with its own slice of weights."""
    rows = iq1_rows(n, n + 3, weighted=weights is not None)
    qw = None if weights is None else imatrices(n, 7)[weights]
    theirs = ggml_quantize(int(ggml_type), rows, qw)
    for backend in BACKENDS:
        assert_equal_rows(quantize(ggml_type, rows, qw, backend), theirs, backend)


@pytest.mark.parametrize("ggml_type", [T.IQ1_S, T.IQ1_M])
def test_many_rows_on_threads_equal_ggml(ggml_type, monkeypatch):
    import mt.quant.weighted as weighted

    monkeypatch.setattr(weighted, "K_CHUNK_VALUES", 2048 * 7)  # several work items, a short last one
    rows = np.random.default_rng(9).standard_t(4, (60, 2048)).astype(np.float32) * np.float32(0.03)
    qw = imatrices(2048, 3)["chi2"]
    set_threads(2)
    try:
        assert_equal_rows(quantize(ggml_type, rows, qw, "compiled"), ggml_quantize(int(ggml_type), rows, qw), "threads")
    finally:
        set_threads(os.cpu_count() or 1)


def test_iq1_m_plain_path_on_threads_equals_ggml():
    rows = np.random.default_rng(4).standard_normal((300, 1024)).astype(np.float32)  # several plain chunks
    set_threads(2)
    try:
        assert_equal_rows(quantize(T.IQ1_M, rows, None, "compiled"), ggml_quantize(int(T.IQ1_M), rows), "plain")
    finally:
        set_threads(os.cpu_count() or 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_iq1_s_without_imatrix_raises(backend):
    qt = quant_type(T.IQ1_S)
    assert qt.kernel is None
    with pytest.raises(QuantizationError, match="IQ1_S needs an importance matrix") as e:
        qt.quantize(np.ones((2, 256), dtype=np.float32), backend=backend)
    assert "--imatrix" in e.value.remedy


@pytest.mark.parametrize("ggml_type", [T.IQ1_S, T.IQ1_M])
def test_dequantize_equals_gguf_py_of_ggml_bytes(ggml_type):
    rows = iq1_rows(512, 1)
    qw = imatrices(512, 2)["chi2"]
    ours = quant_type(ggml_type).dequantize(quantize_weighted(ggml_type, rows, qw))
    theirs = gguf.quants.dequantize(ggml_quantize(int(ggml_type), rows, qw), ggml_type)
    assert np.array_equal(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("ggml_type, weights, bound", [(T.IQ1_S, "ones", 0.52), (T.IQ1_M, "ones", 0.48),
                                                       (T.IQ1_M, None, 0.62)])
def test_roundtrip_error_is_bounded(ggml_type, weights, bound):
    """RMS error over RMS value of normal rows (measured 0.483, 0.449 and, weighing by x², 0.583), and the
    reconstruction correlates with the input (measured 0.88 to 0.91)."""
    x = np.random.default_rng(5).standard_normal((32, 1024)).astype(np.float32) * np.float32(0.02)
    qw = None if weights is None else imatrices(1024, 5)[weights]
    back = quant_type(ggml_type).dequantize(quantize(ggml_type, x, qw, "compiled"))
    rel = np.sqrt(np.mean((back - x) ** 2)) / np.sqrt(np.mean(x**2))
    assert rel < bound
    assert np.corrcoef(back.ravel(), x.ravel())[0, 1] > 0.85


def test_imatrix_weights_the_error():
    """Columns with large importance are reproduced better than with flat weights (measured: 0.43x the squared error
    for IQ1_S, 0.18x for IQ1_M)."""
    x = np.random.default_rng(6).standard_normal((64, 512)).astype(np.float32)
    qw = np.ones(512, dtype=np.float32)
    important = np.arange(0, 512, 8)
    qw[important] = 1000
    for ggml_type in (T.IQ1_S, T.IQ1_M):
        err = {name: (quant_type(ggml_type).dequantize(quantize_weighted(ggml_type, x, w)) - x)[:, important]
               for name, w in (("flat", np.ones(512, dtype=np.float32)), ("weighted", qw))}
        assert np.mean(err["weighted"] ** 2) < 0.6 * np.mean(err["flat"] ** 2)


def ggml_aborts(ggml_type: T, rows: np.ndarray, qw: np.ndarray | None) -> bool:
    """Whether ggml_quantize_chunk ends the process (a GGML_ASSERT), tried in a forked child."""
    pid = os.fork()
    if pid == 0:
        faulthandler.disable()
        os.environ["GGML_NO_BACKTRACE"] = "1"
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        ggml_quantize(int(ggml_type), rows, qw)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGABRT


@pytest.mark.parametrize("backend", BACKENDS)
def test_where_ggml_aborts_we_raise(backend):
    row = edge_rows(256)[OVERFLOW_ROW : OVERFLOW_ROW + 1]
    with pytest.raises(QuantizationError, match="overflow float32"):
        quantize(T.IQ1_M, row, None, backend)
    assert ggml_aborts(T.IQ1_M, row, None)


def brute_force_neighbour(x: np.ndarray, w: np.ndarray, scale: float, xx: np.ndarray, key: int) -> int:
    """iq1_find_best_neighbour2 read from ggml's C: over the key's neighbour list, the first smallest
    Σ w·(scale·xx[l] - x)² below FLT_MAX, float32 sums in position order; -1 if none."""
    lat = lattice(T.IQ1_S)
    start = -int(lat.index[key]) - 1
    best, found = np.float32(np.finfo(np.float32).max), -1
    for g in lat.neighbours[start + 1 : start + 1 + int(lat.neighbours[start])]:
        d2 = np.float32(0)
        for i in range(8):
            diff = np.float32(scale) * xx[(int(lat.points[g, i]) - 1) // 2] - x[i]
            d2 = np.float32(d2 + w[i] * diff * diff)
        if d2 < best:
            best, found = d2, int(g)
    return found


def test_neighbour_search_matches_a_plain_reading_of_ggml():
    from mt.quant.compiled_iq1 import best_neighbour, tables
    from mt.quant.iq1 import X_M, X_P, best_neighbours

    lat = lattice(T.IQ1_S)
    levels, _, nb = tables()
    rng = np.random.default_rng(8)
    off_grid = np.flatnonzero(lat.index < 0)
    for key in rng.choice(off_grid, 40, replace=False):
        x = rng.standard_normal(8).astype(np.float32)
        w = rng.random(8).astype(np.float32)
        xx = X_P if key % 2 else X_M
        want = brute_force_neighbour(x, w, 0.7, xx, int(key))
        got_np = best_neighbours(lat, np.array([key]), x[None], w[None], np.array([0.7], np.float32), xx[None])[0]
        got_c = best_neighbour(nb, -int(lat.index[key]) - 1, levels, x, w, 0, np.float32(0.7), xx,
                               np.empty(24, np.float32), x, 0)
        assert want == got_np == got_c
