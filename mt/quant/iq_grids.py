"""The lattices of the grid i-quants (IQ1_S/M, IQ2_XXS/XS/S, IQ3_XXS/S), built as ggml's iq2xs_init_impl and
iq3xs_init_impl build them, from the grids gguf-py carries for its dequantizers.

A grid point is a vector of `dim` levels l (0..2 for the 2-bit and 1-bit grids, 0..7 for the 3-bit ones); ggml keeps
it as the odd coordinates 2l + 1. A vector of levels has a key, l_k in bits `bits`·k; `index[key]` is its grid index,
or, for a vector off the grid, -(offset + 1) into `neighbours`, where a count is followed by that many grid indices:
the grid points nearest the vector (sorted by squared distance, then index) out to the `nwant`-th distinct distance.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Callable, ClassVar

import gguf.quants
import numpy as np
from gguf import GGMLQuantizationType as T

from mt.errors import QuantizationError
from mt.quant.types import QuantType

KEYS_2BIT = 43692  # ggml's kmap_size for the 8-wide grids: keys of levels 0..2 stay below it
KEYS_3BIT = 4096  # for the 4-wide grids: every key of levels 0..7
GRID_CHUNK_VALUES = 1 << 16  # values per work item: the searches are slow enough that a mid-size tensor needs several


@dataclass(frozen=True, eq=False)  # hashed by identity: one per type, cached
class Lattice:
    points: np.ndarray  # int8 [G, dim]: 2l + 1 per coordinate, in ggml's grid order
    index: np.ndarray  # int32 [keys]: grid index, or -(offset + 1) into neighbours
    neighbours: np.ndarray  # uint16, flat: count, then that many grid indices, per off-grid key
    bits: int  # bits per level in a key

    @property
    def dim(self) -> int:
        return self.points.shape[1]

    def key(self, levels: np.ndarray) -> np.ndarray:
        """levels [..., dim] (ints) -> keys [...]."""
        shifts = self.bits * np.arange(self.dim, dtype=np.int64)
        return (levels.astype(np.int64) << shifts).sum(axis=-1)

    @property
    def neighbour_table(self) -> np.ndarray:
        """The neighbour lists padded with -1: int32 [keys, longest list] (rows of on-grid keys are all -1)."""
        return _padded(self)


# (gguf-py class, grid size, bits per level, key count, nwant) as ggml's init functions choose them
_SPECS = {
    T.IQ2_XXS: ("IQ2_XXS", 2, KEYS_2BIT, 2),
    T.IQ2_XS: ("IQ2_XS", 2, KEYS_2BIT, 2),
    T.IQ2_S: ("IQ2_S", 2, KEYS_2BIT, 1),
    T.IQ1_S: ("IQ1_S", 2, KEYS_2BIT, 3),
    T.IQ1_M: ("IQ1_S", 2, KEYS_2BIT, 3),  # IQ1_M shares IQ1_S's grid and tables
    T.IQ3_XXS: ("IQ3_XXS", 3, KEYS_3BIT, 2),
    T.IQ3_S: ("IQ3_S", 3, KEYS_3BIT, 3),
}


def grid_levels(gguf_name: str) -> np.ndarray:
    """gguf-py's grid as levels: each value's position in its grid_map -> int8 [G, dim]."""
    cls = getattr(gguf.quants, gguf_name)
    if cls.grid is None:
        cls.init_grid()
    values = np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)
    levels = np.searchsorted(np.asarray(cls.grid_map, dtype=np.float32), values)
    return levels.astype(np.int8)


def _neighbour_lists(points: np.ndarray, off_grid: np.ndarray, bits: int, nwant: int) -> tuple[np.ndarray, np.ndarray]:
    """For each off-grid key, the grid indices in (distance², index) order out to the nwant-th distinct distance
    (every point when there are fewer distinct distances). -> (count per key, the lists one after another)."""
    p = points.astype(np.float64)
    norms = (p * p).sum(axis=1)
    counts, lists = [], []
    step = max(1, (1 << 19) // p.shape[0])  # keys per pass: the temporaries stay near 4 MB each
    for start in range(0, off_grid.size, step):
        keys = off_grid[start : start + step]
        pos = (2 * ((keys[:, None] >> (bits * np.arange(p.shape[1]))) & ((1 << bits) - 1)) + 1).astype(np.float64)
        d2 = np.rint(norms[None, :] + (pos * pos).sum(axis=1)[:, None] - 2 * pos @ p.T).astype(np.int64)  # exact
        present = np.zeros((keys.size, int(d2.max()) + 1), dtype=bool)
        present[np.arange(keys.size)[:, None], d2] = True
        distinct = np.cumsum(present, axis=1)  # distinct distances at or below each value
        last = np.where(distinct[:, -1] >= nwant, np.argmax(distinct >= nwant, axis=1), present.shape[1])
        rows, cols = np.nonzero(d2 <= last[:, None])
        order = np.lexsort((cols, d2[rows, cols], rows))
        counts.append(np.bincount(rows, minlength=keys.size))
        lists.append(cols[order])
    return np.concatenate(counts), np.concatenate(lists)


@cache
def lattice(ggml_type: T) -> Lattice:
    """The grid, key map and neighbour lists ggml's quantizer of `ggml_type` searches."""
    gguf_name, bits, n_keys, nwant = _SPECS[ggml_type]
    if ggml_type == T.IQ1_M:
        return lattice(T.IQ1_S)
    levels = grid_levels(gguf_name)
    shifts = bits * np.arange(levels.shape[1], dtype=np.int64)
    grid_keys = (levels.astype(np.int64) << shifts).sum(axis=1)
    index = np.full(n_keys, -1, dtype=np.int32)
    index[grid_keys] = np.arange(levels.shape[0], dtype=np.int32)
    off_grid = np.flatnonzero(index < 0)
    counts, entries = _neighbour_lists(2 * levels + 1, off_grid, bits, nwant)
    offsets = np.concatenate([[0], np.cumsum(counts + 1)[:-1]])
    index[off_grid] = -(offsets + 1).astype(np.int32)
    flat = np.empty(int((counts + 1).sum()), dtype=np.uint16)
    flat[offsets] = counts
    flat[np.repeat(offsets + 1, counts) + _within(counts)] = entries
    return Lattice((2 * levels + 1).astype(np.int8), index, flat, bits)


def _within(counts: np.ndarray) -> np.ndarray:
    """0, 1 … count-1 for each count, one run after another."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.arange(int(counts.sum())) - np.repeat(starts, counts)


@cache
def _padded(lat: Lattice) -> np.ndarray:
    off = np.flatnonzero(lat.index < 0)
    starts = (-lat.index[off] - 1).astype(np.int64)
    counts = lat.neighbours[starts].astype(np.int64)
    within = _within(counts)
    table = np.full((lat.index.size, int(counts.max())), -1, dtype=np.int32)
    table[np.repeat(off, counts), within] = lat.neighbours[np.repeat(starts + 1, counts) + within]
    return table


def imatrix_required(name: str) -> QuantizationError:
    return QuantizationError(f"{name} needs an importance matrix", "pass --imatrix FILE (llama-imatrix makes one)")


class GridQuantType(QuantType):
    """A grid i-quant: `reference(blocks, qw or None)` is its numpy quantizer; ggml refuses IQ1_S, IQ2_XXS and IQ2_XS
    without importance weights (`needs_imatrix`), the others weigh by the values themselves."""

    chunk_values = GRID_CHUNK_VALUES
    needs_imatrix: ClassVar[bool] = False
    reference: ClassVar[Callable[[np.ndarray, np.ndarray | None], np.ndarray]]

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        if cls.needs_imatrix:
            raise imatrix_required(cls.ggml_type.name)
        return cls.reference(blocks, None)

    @classmethod
    def quantize_blocks_weighted(cls, blocks: np.ndarray, qw: np.ndarray) -> np.ndarray:
        return cls.reference(blocks, qw)
