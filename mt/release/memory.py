"""What running a GGUF takes in llama.cpp: its weights and its KV cache at a context length, from the header alone.

The KV cache holds, per layer, a K and a V row of n_head_kv × key/value length for each cell; a context rounds up to
256 cells. A sliding-window layer of Gemma 2/3 holds only window + one 512-token batch of them in llama-cli and
llama-server (llama.cpp's iSWA cache); the C library's own default (`swa_full`, as llama-cpp-python keeps it) gives
those layers the whole context too. The compute buffers are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from mt.io.gguf_in import GGUFHeader

CELL_PAD = 256  # llama.cpp rounds the KV cache to this many cells
UBATCH = 512  # llama.cpp's default physical batch, which a sliding-window cache holds beyond its window
SWA_PERIOD = {"gemma2": 2, "gemma3": 6}  # every N layers one attends globally (the last of each N), the rest slide
CACHE_TYPES = {"f16": T.F16, "q8_0": T.Q8_0}
CONTEXTS = (2048, 8192, 32768)


@dataclass(frozen=True)
class MemoryEstimate:
    n_ctx: int
    cache_type: str
    weights: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


def _per_layer(header: GGUFHeader, arch: str, key: str, n_layers: int) -> list[int]:
    value = header.value(f"{arch}.{key}")
    return list(value) if isinstance(value, list) else [int(value or 0)] * n_layers


def kv_cells(header: GGUFHeader, n_ctx: int, swa_full: bool = False) -> list[int]:
    """Cells each layer's cache holds at context `n_ctx`."""
    arch = str(header.value("general.architecture"))
    n_layers = int(header.value(f"{arch}.block_count"))
    cells = _pad(n_ctx, CELL_PAD)
    window = int(header.value(f"{arch}.attention.sliding_window") or 0)
    period = SWA_PERIOD.get(arch)
    if not window or period is None or swa_full:
        return [cells] * n_layers
    swa_cells = min(cells, _pad(window + UBATCH, CELL_PAD))
    return [swa_cells if (il + 1) % period else cells for il in range(n_layers)]


def _head_lengths(header: GGUFHeader, arch: str) -> tuple[int, int]:
    head_dim = int(header.value(f"{arch}.embedding_length")) // int(header.value(f"{arch}.attention.head_count"))
    return (int(header.value(f"{arch}.attention.key_length") or head_dim),
            int(header.value(f"{arch}.attention.value_length") or head_dim))


def cache_types(header: GGUFHeader) -> list[str]:
    """The cache types llama.cpp can use for this model: a quantized cache's block must divide a head's K and V."""
    arch = str(header.value("general.architecture"))
    lengths = _head_lengths(header, arch)
    return [name for name, t in CACHE_TYPES.items() if all(n % GGML_QUANT_SIZES[t][0] == 0 for n in lengths)]


def kv_cache_bytes(header: GGUFHeader, n_ctx: int, cache_type: str = "f16", swa_full: bool = False) -> int:
    arch = str(header.value("general.architecture"))
    if cache_type not in cache_types(header):
        raise ValueError(f"a {cache_type} KV cache cannot hold this model's heads")
    n_layers = int(header.value(f"{arch}.block_count"))
    kv_heads = _per_layer(header, arch, "attention.head_count_kv", n_layers)
    k_len, v_len = _head_lengths(header, arch)
    block, size = GGML_QUANT_SIZES[CACHE_TYPES[cache_type]]
    return sum(cells * n_kv * (k_len + v_len) // block * size
               for cells, n_kv in zip(kv_cells(header, n_ctx, swa_full), kv_heads))


def weight_bytes(header: GGUFHeader) -> int:
    return sum(t.nbytes for t in header.tensors)


def estimate(header: GGUFHeader, n_ctx: int, cache_type: str = "f16", swa_full: bool = False) -> MemoryEstimate:
    return MemoryEstimate(n_ctx, cache_type, weight_bytes(header), kv_cache_bytes(header, n_ctx, cache_type, swa_full))


def contexts(header: GGUFHeader) -> list[int]:
    """2k, 8k and 32k tokens where the model reaches them, and its own maximum."""
    arch = str(header.value("general.architecture"))
    longest = int(header.value(f"{arch}.context_length") or CONTEXTS[-1])
    return sorted({*(c for c in CONTEXTS if c < longest), longest})


def estimates(header: GGUFHeader, n_ctx: int | None = None) -> list[MemoryEstimate]:
    """Every cache type the model takes, at `n_ctx` or else at each of `contexts`."""
    return [estimate(header, ctx, cache) for ctx in ([n_ctx] if n_ctx else contexts(header)) for cache in cache_types(header)]
