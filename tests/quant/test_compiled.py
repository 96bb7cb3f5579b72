"""The compiled kernels (mt/quant/compiled.py) against ggml itself and against the numpy references."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numba import njit

from mt.errors import QuantizationError
from mt.quant import compiled
from mt.quant.iq4 import IQ4_NL, IQ4_XS
from mt.quant.kquants import Q4_K, Q5_K, Q6_K
from mt.quant.low_kquants import Q2_K, Q3_K
from mt.quant.ternary import TQ1_0, TQ2_0
from mt.quant.kquants import nearest_int as nearest_int_numpy
from mt.quant.types import Q8_0, compiled_kernel, quant_backend, set_threads
from tests.ggml_ref import ggml_fp16_bits_to_fp32, ggml_fp32_to_fp16_bits, ggml_quantize
from tests.quant.test_kquants import rows_for
from tests.quant.test_legacy import edge_rows

COMPILED_TYPES = [Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_0, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0]
ROOT = Path(__file__).resolve().parents[2]


@njit
def _fp32_to_fp16_all(x: np.ndarray, out: np.ndarray) -> None:
    for i in range(x.size):
        out[i] = compiled.fp32_to_fp16(x[i])


@njit
def _fp16_to_fp32_all(h: np.ndarray, out: np.ndarray) -> None:
    for i in range(h.size):
        out[i] = compiled.fp16_to_fp32(h[i])


@njit
def _nearest_int_all(x: np.ndarray, out: np.ndarray) -> None:
    for i in range(x.size):
        out[i] = compiled.nearest_int(x[i])


def heavy_tailed_rows(n: int, seed: int) -> np.ndarray:
    """t-distributed rows (1, 3, 10 degrees of freedom) at scales from 1e-6 to 1e3, and sparse rows."""
    rng = np.random.default_rng(seed)
    rows = [rng.standard_t(df, n) * scale for df in (1, 3, 10) for scale in (1e-6, 1e-3, 0.02, 1.0, 1e3)]
    sparse = rng.standard_normal((4, n)) * (rng.random((4, n)) < 0.02)
    return np.concatenate([np.array(rows), sparse]).astype(np.float32)


def assert_compiled_equals_ggml_and_numpy(qt: type, rows: np.ndarray) -> None:
    ours = qt.quantize(rows, backend="compiled").reshape(rows.shape[0], -1)
    assert np.array_equal(ours, ggml_quantize(int(qt.ggml_type), rows))
    assert np.array_equal(ours, qt.quantize(rows, backend="numpy").reshape(rows.shape[0], -1))


@pytest.mark.parametrize("qt", COMPILED_TYPES)
@pytest.mark.parametrize("n", [256, 1024, 4096])
def test_bytes_equal_ggml_and_reference(qt, n):
    rows = np.concatenate([rows_for(n, n + 1), heavy_tailed_rows(n, n)])  # adversarial, scaled normal, t
    assert_compiled_equals_ggml_and_numpy(qt, rows)


@pytest.mark.parametrize("qt", COMPILED_TYPES)
def test_many_rows_on_threads_equal_ggml(qt):
    rows = np.random.default_rng(9).standard_t(4, (600, 2048)).astype(np.float32) * np.float32(0.03)
    set_threads(2)  # 1.2M values: five work items over two threads
    try:
        assert_compiled_equals_ggml_and_numpy(qt, rows)
    finally:
        set_threads(os.cpu_count() or 1)


@pytest.mark.parametrize("qt", COMPILED_TYPES)
def test_non_finite_and_overflowing_rows_equal_ggml(qt):
    """NaN, inf, values whose range overflows, subnormal scales: ggml's branches and MAX order decide.
    (mt quantize refuses NaN/Inf tensors; the kernels still follow ggml bit for bit.)"""
    rng = np.random.default_rng(1)
    spiked = rng.standard_normal((12, 256)).astype(np.float32)
    spiked[np.arange(12), rng.integers(0, 256, 12)] = [np.nan, np.inf, -np.inf] * 4
    with np.errstate(over="ignore"):
        rows = np.concatenate([np.tile(edge_rows(), (1, 8)), spiked])
    ours = qt.quantize(rows, backend="compiled").reshape(rows.shape[0], -1)
    assert np.array_equal(ours, ggml_quantize(int(qt.ggml_type), rows))


def test_fp32_to_fp16_equals_ggml():
    """Every exponent and sign, with the mantissa tails that decide rounding (ties, just above and below)."""
    high = np.arange(1 << 19, dtype=np.uint32) << 13
    tails = np.array([0, 1, 0x7FF, 0x800, 0xFFF, 0x1000, 0x1001, 0x1FFF], dtype=np.uint32)
    bits = (high[:, None] | tails[None, :]).ravel()
    random_bits = np.random.default_rng(4).integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([bits, random_bits]).view(np.float32)
    ours = np.empty(x.size, dtype=np.uint16)
    _fp32_to_fp16_all(x, ours)
    assert np.array_equal(ours, ggml_fp32_to_fp16_bits(x))


def test_fp16_to_fp32_equals_ggml_for_every_half():
    h = np.arange(1 << 16, dtype=np.uint16)
    ours = np.empty(h.size, dtype=np.float32)
    _fp16_to_fp32_all(h, ours)
    assert np.array_equal(ours.view(np.uint32), ggml_fp16_bits_to_fp32(h).view(np.uint32))


def test_nearest_int_equals_the_numpy_reference():
    """Including values past 2^22, where ggml's magic-number trick no longer rounds."""
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.standard_normal(100_000) * 10.0 ** rng.integers(-3, 9, 100_000),
                        np.arange(-64, 64) + np.float32(0.5)]).astype(np.float32)
    ours = np.empty(x.size, dtype=np.int64)
    _nearest_int_all(x, ours)
    assert np.array_equal(ours, nearest_int_numpy(x).astype(np.int64))


@pytest.mark.parametrize("qt", COMPILED_TYPES)
def test_k_quants_default_to_the_compiled_kernel(qt, monkeypatch):
    monkeypatch.delenv("MT_QUANT_BACKEND", raising=False)
    assert qt.block_writer()[0] is compiled_kernel(qt.kernel)
    monkeypatch.setenv("MT_QUANT_BACKEND", "numpy")
    assert qt.block_writer()[0] is not compiled_kernel(qt.kernel)


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("MT_QUANT_BACKEND", "fortran")
    with pytest.raises(QuantizationError, match="MT_QUANT_BACKEND"):
        Q4_K.quantize(np.zeros((1, 256), dtype=np.float32))
    assert quant_backend("NumPy") == "numpy"


def test_read_only_install_compiles_without_a_cache(tmp_path):
    """numba cannot cache beside a read-only package nor in an unwritable home: mt warns and compiles."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare for a read-only bind mount")
    pkg = tmp_path / "ro"
    shutil.copytree(ROOT / "mt", pkg / "mt", ignore=shutil.ignore_patterns("__pycache__"))
    script = tmp_path / "quantize_one.py"
    script.write_text(f"import mt\nassert mt.__file__.startswith({str(pkg)!r})\n"
                      "import numpy as np\nfrom mt.quant.kquants import Q6_K\n"
                      "print(Q6_K.quantize(np.ones((1, 256), dtype=np.float32)).tobytes().hex())\n")
    shell = (f"mount --bind {pkg} {pkg} && mount -o remount,bind,ro {pkg} && "
             f"HOME={pkg} XDG_CACHE_HOME={pkg}/.cache PYTHONPATH={pkg} {sys.executable} {script}")
    run = subprocess.run(["unshare", "-m", "sh", "-c", shell], capture_output=True, text=True, cwd=tmp_path)
    if "mount" in run.stderr and run.returncode != 0 and "Traceback" not in run.stderr:
        pytest.skip(f"no read-only bind mount here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    assert "not cached" in run.stderr
    expected = ggml_quantize(int(Q6_K.ggml_type), np.ones((1, 256), dtype=np.float32))
    assert run.stdout.strip() == expected.tobytes().hex()


def test_missing_numba_is_an_error_with_a_remedy(monkeypatch):
    monkeypatch.setitem(sys.modules, "mt.quant.compiled", None)  # import now raises ImportError
    with pytest.raises(QuantizationError, match="numba") as e:
        Q4_K.quantize(np.zeros((1, 256), dtype=np.float32), backend="compiled")
    assert "MT_QUANT_BACKEND=numpy" in e.value.remedy
    assert Q4_K.quantize(np.zeros((1, 256), dtype=np.float32), backend="numpy").shape == (1, 144)
