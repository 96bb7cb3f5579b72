import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from mt.quant.legacy import Q4_0, Q5_0, Q5_1
from mt.quant.types import quant_type
from tests.ggml_ref import ggml_quantize
from tests.quant.test_types import adversarial_rows

LEGACY = [Q4_0, Q5_0, Q5_1]


def rows_for(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scaled = rng.standard_normal((24, n)).astype(np.float32) * np.logspace(-4, 1, 24, dtype=np.float32)[:, None]
    return np.concatenate([adversarial_rows(n), scaled, rng.standard_t(2, (8, n)).astype(np.float32)])


def edge_rows() -> np.ndarray:
    """One block each: scans that must pick ggml's element, and scales that overflow or underflow."""
    rng = np.random.default_rng(11)
    noise = rng.standard_normal(32)
    fmax = np.finfo(np.float32).max
    rows = [
        np.r_[-1.0, 1.0, noise[2:] * 0.1],  # equal magnitudes: the first wins
        np.r_[1.0, -1.0, noise[2:] * 0.1],
        np.full(32, -0.0),
        np.where(np.arange(32) % 2 == 0, -0.0, 0.0),
        noise * np.finfo(np.float32).smallest_subnormal * 4,  # 1/d overflows to inf
        noise * 1e-38,
        noise * 3e38,  # max - min overflows
        np.r_[fmax, -fmax, np.zeros(30)],
        np.r_[np.inf, noise[1:]],
        np.r_[noise[:31], -np.inf],
        np.r_[noise[:5], np.nan, noise[6:]],
        np.full(32, np.nan),
    ]
    with np.errstate(over="ignore"):
        return np.array(rows, dtype=np.float32)


def assert_bytes_equal_ggml(qt: type, rows: np.ndarray) -> None:
    ours = qt.quantize(rows).reshape(rows.shape[0], -1)
    assert np.array_equal(ours, ggml_quantize(int(qt.ggml_type), rows))


@pytest.mark.parametrize("qt", LEGACY)
@pytest.mark.parametrize("n", [32, 96, 4096])
def test_bytes_equal_ggml(qt, n):
    assert_bytes_equal_ggml(qt, rows_for(n, n))


@pytest.mark.parametrize("qt", LEGACY)
def test_edge_blocks_equal_ggml(qt):
    assert_bytes_equal_ggml(qt, edge_rows())


@pytest.mark.parametrize("qt", LEGACY)
def test_threaded_chunks_equal_ggml(qt):
    rows = np.random.default_rng(2).standard_normal((300, 1056)).astype(np.float32)
    assert_bytes_equal_ggml(qt, rows)


@pytest.mark.parametrize("qt", LEGACY)
def test_dequantize_equals_gguf_py(qt):
    packed = ggml_quantize(int(qt.ggml_type), rows_for(160, 1))
    assert np.array_equal(qt.dequantize(packed), gguf.quants.dequantize(packed, qt.ggml_type))


def block_amax(blocks: np.ndarray) -> np.ndarray:
    return np.abs(blocks).max(axis=1)


def block_range(blocks: np.ndarray) -> np.ndarray:
    return blocks.max(axis=1) - blocks.min(axis=1)


# Q4_0/Q5_0 clamp the top code, so the value opposite the max may be off by a whole step; Q5_1 rounds
# every value to half a step. The slack covers the fp16 rounding of d and m.
@pytest.mark.parametrize("qt, span, steps", [(Q4_0, block_amax, 8), (Q5_0, block_amax, 16), (Q5_1, block_range, 62)])
def test_roundtrip_error_within_a_step(qt, span, steps):
    x = np.random.default_rng(5).standard_normal((16, 1024)).astype(np.float32)
    err = np.abs(qt.dequantize(qt.quantize(x)) - x).reshape(-1, 32)
    assert np.all(err <= span(x.reshape(-1, 32))[:, None] / steps * 1.05)


@pytest.mark.parametrize("ggml_type, qt", [(T.Q4_0, Q4_0), (T.Q5_0, Q5_0), (T.Q5_1, Q5_1)])
def test_registered(ggml_type, qt):
    assert quant_type(ggml_type) is qt
