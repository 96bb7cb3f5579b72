"""GGML tensor types as registered classes.

Each class has a numpy reference (`quantize_blocks` / `dequantize_blocks` on whole blocks, float32
arithmetic in ggml's order) and, where it pays, a compiled kernel (`kernel`, in mt/quant/compiled.py)
that writes the same bytes. `quantize` runs one of them over cache-sized chunks on a thread pool;
tests check the bytes of both against ggml itself.
"""

from __future__ import annotations

import importlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, ClassVar

import gguf.quants
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mt.io.dtypes import bf16_bits_to_f32, f32_to_bf16_bits  # noqa: F401  (BF16's codec)
from mt.errors import QuantizationError

REGISTRY: dict[GGMLQuantizationType, type["QuantType"]] = {}
CHUNK_VALUES = 1 << 18
_POOL: ThreadPoolExecutor | None = None
BACKEND_ENV = "MT_QUANT_BACKEND"
BACKENDS = ("compiled", "numpy")
BlockWriter = Callable[[np.ndarray, np.ndarray], None]  # (float32 blocks [n, block_size], uint8 out [n, type_size])


def set_threads(n: int) -> None:
    global _POOL
    _POOL = ThreadPoolExecutor(max_workers=max(1, n))


def pool() -> ThreadPoolExecutor:
    """The shared quantization thread pool (`set_threads` sizes it)."""
    if _POOL is None:
        set_threads(os.cpu_count() or 1)
    assert _POOL is not None
    return _POOL


def quant_backend(backend: str | None = None) -> str:
    """`compiled` (the default) or `numpy` (the references), from the argument or $MT_QUANT_BACKEND."""
    name = (backend or os.environ.get(BACKEND_ENV) or "compiled").lower()
    if name not in BACKENDS:
        raise QuantizationError(f"{BACKEND_ENV}={name!r} is not a quantization backend", f"set it to one of {', '.join(BACKENDS)}")
    return name


COMPILED_MODULES = ("mt.quant.compiled", "mt.quant.compiled_low", "mt.quant.compiled_iq2", "mt.quant.compiled_iq3",
                    "mt.quant.compiled_iq1")  # their KERNELS / WEIGHTED_KERNELS tables


def compiled_kernel(name: str, table: str = "KERNELS") -> Callable[..., None]:
    """A compiled kernel by name, from the KERNELS (plain) or WEIGHTED_KERNELS (imatrix) table of COMPILED_MODULES."""
    try:
        modules = [importlib.import_module(m) for m in COMPILED_MODULES]
    except ImportError as e:
        raise QuantizationError(f"the compiled quantizers need numba ({e})",
                                f"pip install numba==0.68.1, or set {BACKEND_ENV}=numpy") from None
    return next(getattr(m, table)[name] for m in modules if name in getattr(m, table))


def run_chunked(n_items: int, step: int, run: Callable[[int], None]) -> None:
    """run(start) for start = 0, step, 2·step … < n_items; on the thread pool when there are several."""
    starts = range(0, n_items, step)
    if len(starts) > 1:
        list(pool().map(run, starts))
    elif starts:
        run(0)


class QuantType:
    """A GGML type: its sizes come from gguf's table; a subclass declares its fast paths beside its reference."""

    ggml_type: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]  # values per block
    type_size: ClassVar[int]  # bytes per block
    chunk_values: ClassVar[int | None] = None  # values per numpy work item; None: CHUNK_VALUES
    kernel: ClassVar[str | None] = None  # the compiled kernel in mt.quant.compiled's KERNELS, if any
    weighted_kernel: ClassVar[str | None] = None  # the compiled imatrix kernel in its WEIGHTED_KERNELS, if any
    triton: ClassVar[bool] = False  # a Triton kernel in mt.quant.triton_quant writes the same bytes

    def __init_subclass__(cls) -> None:
        if "ggml_type" not in cls.__dict__:  # a base of several types
            return
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[cls.ggml_type]
        REGISTRY[cls.ggml_type] = cls

    @classmethod
    def row_fits(cls, n_per_row: int) -> bool:
        return n_per_row % cls.block_size == 0

    @classmethod
    def check_row(cls, n_per_row: int) -> None:
        if not cls.row_fits(n_per_row):
            raise QuantizationError(f"row of {n_per_row} values is not a multiple of {cls.__name__}'s block of {cls.block_size}",
                                    "use a type whose block divides the row")

    @classmethod
    def nbytes(cls, shape: tuple[int, ...]) -> int:
        n = int(np.prod(shape, dtype=np.int64))
        return n // cls.block_size * cls.type_size

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def quantize_blocks_weighted(cls, blocks: np.ndarray, qw: np.ndarray) -> np.ndarray:
        """The reference with importance weights qw (the blocks' shape), for the types whose search takes them
        per block (the grid i-quants); the others have theirs in mt/quant/weighted.py."""
        raise NotImplementedError

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """gguf-py's decoder of the format, unless the type has its own (its grid loaded first, as gguf.quants.dequantize
        does: the class method alone does not)."""
        codec = getattr(gguf.quants, cls.ggml_type.name)
        if getattr(codec, "grid_shape", None) and codec.grid is None:
            codec.init_grid()
        return codec.dequantize_blocks(blocks)

    @classmethod
    def block_writer(cls, backend: str | None = None) -> tuple[BlockWriter, int]:
        """The function that fills output blocks, and how many values one work item should hold."""
        if cls.kernel is not None and quant_backend(backend) == "compiled":
            return compiled_kernel(cls.kernel), CHUNK_VALUES

        def reference(blocks: np.ndarray, out: np.ndarray) -> None:
            out[...] = cls.quantize_blocks(blocks)

        return reference, cls.chunk_values or CHUNK_VALUES

    @classmethod
    def quantize(cls, data: np.ndarray, to_f32: Callable[[np.ndarray], np.ndarray] | None = None, *,
                 backend: str | None = None) -> np.ndarray:
        """float32 [..., n] -> uint8 [..., n / block_size * type_size].

        `to_f32` converts another storage type (e.g. bf16 bits) chunk by chunk. Blocks are
        independent, so the work is cut into cache-sized chunks (fresh large temporaries cost more
        in page faults than the arithmetic) run on a thread pool; numpy ufuncs and the compiled
        kernels release the GIL. `backend`: see `quant_backend`.
        """
        cls.check_row(data.shape[-1])
        write, chunk_values = cls.block_writer(backend)
        convert = to_f32 or (lambda a: a.astype(np.float32, copy=False))
        blocks = np.ascontiguousarray(data).reshape(-1, cls.block_size)
        out = np.empty((blocks.shape[0], cls.type_size), dtype=np.uint8)
        step = max(1, chunk_values // cls.block_size)

        def run(start: int) -> None:
            write(np.ascontiguousarray(convert(blocks[start : start + step]), dtype=np.float32), out[start : start + step])

        run_chunked(blocks.shape[0], step, run)
        return out.reshape(*data.shape[:-1], data.shape[-1] // cls.block_size * cls.type_size)

    @classmethod
    def dequantize(cls, data: np.ndarray) -> np.ndarray:
        blocks = np.ascontiguousarray(data).view(np.uint8).reshape(-1, cls.type_size)
        out = cls.dequantize_blocks(blocks)
        return out.reshape(*data.shape[:-1], data.shape[-1] // cls.type_size * cls.block_size)


class F32(QuantType):
    ggml_type = GGMLQuantizationType.F32

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return blocks.astype(np.float32).view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return blocks.view(np.float32)


class F16(QuantType):
    ggml_type = GGMLQuantizationType.F16

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # values past fp16 range become inf, as in ggml
            return blocks.astype(np.float16).view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return blocks.view(np.float16).astype(np.float32)


def fp16_field(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 scale stored at bytes [start, start + 2) of each block: uint8 [N, size] -> float32 [N, 1]."""
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)


class BF16(QuantType):
    ggml_type = GGMLQuantizationType.BF16

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return f32_to_bf16_bits(blocks).view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return bf16_bits_to_f32(blocks.view(np.uint16))


def row_max(a: np.ndarray) -> np.ndarray:
    """max over each row of [n, 2^k] as a tree of elementwise maxima: numpy's reduction along a short
    axis costs ~8x more. max is exact, so the order does not matter. -> [n, 1]"""
    while a.shape[1] > 1:
        half = a.shape[1] // 2
        a = np.maximum(a[:, :half], a[:, half:])
    return a


HALF_BELOW = np.float32(0.5 - 2.0**-25)  # the largest float32 below 0.5


def roundf_to_int8(x: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero) then int8, for |x| < 128.

    x + copysign(0.5 - 2^-25, x) truncated equals roundf(x) exactly in float32: adding plain 0.5
    would carry 0.49999997 up to 1.0.
    """
    return (x + np.copysign(HALF_BELOW, x)).astype(np.int8)


class Q8_0(QuantType):
    ggml_type = GGMLQuantizationType.Q8_0
    kernel = "q8_0"
    triton = True

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        # quantize_row_q8_0_ref: d = amax / 127, q = roundf(x * (1 / d))
        amax = row_max(np.abs(blocks))
        d = amax / np.float32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        qs = roundf_to_int8(blocks * inv)
        with np.errstate(over="ignore"):  # d past fp16 range becomes inf, as in ggml
            d16 = d.astype(np.float16)
        return np.concatenate([d16.view(np.uint8), qs.view(np.uint8)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = fp16_field(blocks, 0)
        return blocks[:, 2:].view(np.int8).astype(np.float32) * d


class MXFP4(QuantType):
    """OCP microscaling FP4 (e2m1 values, one e8m0 exponent per 32): gguf-py's reference of ggml's
    quantize_row_mxfp4_ref, which llama-quantize's MXFP4_MOE gives the experts."""

    ggml_type = GGMLQuantizationType.MXFP4

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return gguf.quants.MXFP4.quantize_blocks(blocks.astype(np.float32, copy=False))


def _register_all() -> None:
    import mt.quant.kquants  # noqa: F401  (registers the K-quants)
    import mt.quant.legacy  # noqa: F401  (registers Q4_0, Q4_1, Q5_0, Q5_1)
    import mt.quant.low_kquants  # noqa: F401  (registers Q2_K, Q3_K)
    import mt.quant.iq4  # noqa: F401  (registers IQ4_NL, IQ4_XS)
    import mt.quant.ternary  # noqa: F401  (registers TQ1_0, TQ2_0)
    import mt.quant.iq2  # noqa: F401  (registers IQ2_XXS, IQ2_XS, IQ2_S)
    import mt.quant.iq3  # noqa: F401  (registers IQ3_XXS, IQ3_S)
    import mt.quant.iq1  # noqa: F401  (registers IQ1_S, IQ1_M)


def registered() -> dict[GGMLQuantizationType, type[QuantType]]:
    """Every registered type."""
    _register_all()
    return dict(REGISTRY)


def types_with(fast_path: str) -> frozenset[GGMLQuantizationType]:
    """The types that declare a fast path: "kernel", "weighted_kernel" or "triton"."""
    _register_all()
    return frozenset(t for t, cls in REGISTRY.items() if getattr(cls, fast_path))


def quant_type(ggml_type: GGMLQuantizationType) -> type[QuantType]:
    _register_all()
    try:
        return REGISTRY[ggml_type]
    except KeyError:
        raise QuantizationError(f"mt cannot write {ggml_type.name} tensors yet", "choose f32, f16, bf16 or q8_0") from None
