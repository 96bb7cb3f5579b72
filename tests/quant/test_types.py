import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from mt.errors import QuantizationError
from mt.quant.types import BF16, F16, Q8_0, quant_type
from tests.ggml_ref import ggml_quantize


def adversarial_rows(n: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    rows = [
        rng.standard_normal(n) * 0.02,
        np.zeros(n),
        np.full(n, 0.37),
        np.where(np.arange(n) % 2 == 0, 1.0, -1.0) * 0.5,
        np.r_[rng.standard_normal(n - 1) * 1e-3, 1e4],
        rng.standard_normal(n) * 6e-8,  # near fp16 underflow
        rng.standard_normal(n) * 1e-30,
        (np.arange(n) - n / 2) * (127.5 / n),  # many exact .5 ties after scaling
        rng.standard_normal(n) * 70000.0,  # overflows fp16
    ]
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("qt", [F16, BF16, Q8_0])
@pytest.mark.parametrize("n", [32, 256, 4096])
def test_bytes_equal_ggml(qt, n):
    rows = np.concatenate([adversarial_rows(n), np.random.default_rng(n).standard_normal((64, n)).astype(np.float32)])
    for backend in ("numpy", "compiled"):
        assert np.array_equal(qt.quantize(rows, backend=backend).reshape(rows.shape[0], -1), ggml_quantize(int(qt.ggml_type), rows))


def test_threaded_chunks_equal_single_chunk(monkeypatch):
    import mt.quant.types as types

    rows = np.random.default_rng(3).standard_normal((300, 1024)).astype(np.float32)
    chunked = Q8_0.quantize(rows)
    monkeypatch.setattr(types, "CHUNK_VALUES", rows.size * 2)
    assert np.array_equal(chunked, Q8_0.quantize(rows))


def test_bf16_nan_is_quieted_like_ggml():
    bits = np.array([0x7F800001, 0xFF800001, 0x7F800000, 0x3F800000, 0x7FC00000], dtype=np.uint32)
    rows = np.tile(bits.view(np.float32), 32)[None, :]
    assert np.array_equal(BF16.quantize(rows), ggml_quantize(int(T.BF16), rows))


@pytest.mark.parametrize("qt", [F16, BF16, Q8_0])
def test_dequantize_roundtrip_error(qt):
    rows = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
    back = qt.dequantize(qt.quantize(rows))
    tolerance = {F16: 1e-3, BF16: 1e-2, Q8_0: 2e-2}[qt]
    assert np.abs(back - rows).max() < tolerance * np.abs(rows).max()


def test_q8_0_refuses_row_not_multiple_of_block():
    with pytest.raises(QuantizationError, match="not a multiple"):
        Q8_0.quantize(np.zeros((2, 40), dtype=np.float32))


def test_unknown_type_is_an_error():
    with pytest.raises(QuantizationError, match="cannot write"):
        quant_type(T.Q8_1)  # ggml's activation type, never written to a file


def test_roundf_to_int8_at_every_half_boundary():
    from mt.quant.types import roundf_to_int8

    halves = np.arange(128, dtype=np.float32) + np.float32(0.5)
    near = np.concatenate([halves, np.nextafter(halves, 0), np.nextafter(halves, 200), np.arange(128, dtype=np.float32)])
    near = near[near < 127.5]
    x = np.concatenate([near, -near])
    expected = np.sign(x) * np.floor(np.abs(x).astype(np.float64) + 0.5)  # exact in float64
    assert np.array_equal(roundf_to_int8(x).astype(np.float64), expected)


def test_sizes_come_from_gguf_and_fast_paths_are_declared_by_the_types():
    from gguf import GGML_QUANT_SIZES

    import importlib

    from mt.quant.triton_quant import SHAPES
    from mt.quant.device import GPU_TYPES
    from mt.quant.types import COMPILED_MODULES, REGISTRY, types_with
    from mt.quant.weighted import COMPILED_WEIGHTED

    assert {t: (c.block_size, c.type_size) for t, c in REGISTRY.items()} == {t: GGML_QUANT_SIZES[t] for t in REGISTRY}
    assert GPU_TYPES == types_with("triton") == set(SHAPES)
    assert all(SHAPES[t][:2] == GGML_QUANT_SIZES[t] for t in SHAPES)
    modules = [importlib.import_module(m) for m in COMPILED_MODULES]
    kernels = {name: k for m in modules for name, k in m.KERNELS.items()}
    weighted = {name: k for m in modules for name, k in m.WEIGHTED_KERNELS.items()}
    assert all(REGISTRY[t].kernel in kernels for t in types_with("kernel"))
    assert set(COMPILED_WEIGHTED) == types_with("weighted_kernel")
    assert all(name in weighted for name in COMPILED_WEIGHTED.values())


def test_mxfp4_bytes_equal_ggml():
    """gguf-py's reference, which mt's MXFP4 is, against ggml's quantize_row_mxfp4_ref: random rows over five decades,
    heavy tails, adversarial rows, and values sitting on the e2m1 levels and halfway between them."""
    from mt.quant.types import MXFP4
    from tests.ggml_ref import ggml_quantize
    from tests.quant.test_legacy import rows_for

    levels = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)
    on_levels = np.tile(np.resize(np.r_[levels, -levels, (levels[1:] + levels[:-1]) / 2, 6.0], 32), (3, 1))
    on_levels *= np.array([[1.0], [2.0 ** -20], [2.0 ** 20]], dtype=np.float32)
    rows = np.concatenate([rows_for(256, 5), np.tile(on_levels, (1, 8))]).astype(np.float32)
    assert np.array_equal(MXFP4.quantize(rows).reshape(rows.shape[0], -1), ggml_quantize(int(T.MXFP4), rows))
