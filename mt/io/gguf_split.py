"""Split GGUF files as llama.cpp's gguf-split writes them, and merge them back.

Tensors keep their order; a part ends before the tensor that would take it over `--split-max-size` (tensor bytes
with their alignment padding, as gguf-split counts them) or past `--split-max-tensors`. The first part carries all
metadata, every part the split keys (`mt.io.shards`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from gguf import GGUFValueType, GGUFWriter

from mt.errors import MtError
from mt.io.atomic import atomic_path, atomic_paths, check_output
from mt.io.gguf_in import GGUFHeader, read_header
from mt.io.gguf_out import Chunk, GGUFContents, PlacedTensors, TensorSlot, write_gguf
from mt.io.safetensors import FileSpan
from mt.io.shards import SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS_COUNT, part_path, prefix_of

_UNITS = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)B?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class SplitLimit:
    """At most `max_bytes` of tensor data (0: no limit) or `max_tensors` tensors (0: no limit) per part."""

    max_bytes: int = 0
    max_tensors: int = 0

    def __bool__(self) -> bool:
        return bool(self.max_bytes or self.max_tensors)


def parse_size(text: str) -> int:
    """`2G`, `500M`, `300K` or a byte count; decimal units, as gguf-split and convert_hf_to_gguf.py read them."""
    found = _SIZE.match(text)
    if found is None or int(found[1]) == 0:
        raise MtError(f"--split-max-size {text!r} is not a size", "give a positive number with K, M or G, e.g. 2G or 500M")
    return int(found[1]) * _UNITS[found[2].upper()]


def split_limit(max_size: str | None, max_tensors: int | None) -> SplitLimit:
    if max_size is not None and max_tensors is not None:
        raise MtError("--split-max-size and --split-max-tensors were both given", "split by one of them")
    if max_tensors is not None and max_tensors < 1:
        raise MtError(f"--split-max-tensors {max_tensors} is below 1", "give a positive tensor count")
    return SplitLimit(parse_size(max_size) if max_size is not None else 0, max_tensors or 0)


def group_slots(slots: list[TensorSlot], limit: SplitLimit, alignment: int) -> list[list[TensorSlot]]:
    """The tensors of each part, in order."""
    groups: list[list[TensorSlot]] = [[]]
    size = 0
    for slot in slots:
        padded = GGUFWriter.ggml_pad(slot.nbytes, alignment)
        if limit.max_bytes and padded > limit.max_bytes:
            raise MtError(f"tensor {slot.name} alone is {padded:,} bytes, over --split-max-size ({limit.max_bytes:,} bytes)",
                          f"give a split size of at least {_round_up_size(padded)}")
        full = (limit.max_tensors and len(groups[-1]) >= limit.max_tensors) or (
            limit.max_bytes and size + padded > limit.max_bytes)
        if groups[-1] and full:
            groups.append([])
            size = 0
        groups[-1].append(slot)
        size += padded
    return groups


def _round_up_size(nbytes: int) -> str:
    for unit in ("G", "M", "K"):
        if nbytes >= _UNITS[unit]:
            return f"{-(-nbytes // _UNITS[unit])}{unit}"
    return str(nbytes)


def part_contents(contents: GGUFContents, groups: list[list[TensorSlot]]) -> list[GGUFContents]:
    """What each part holds: the first all of `contents`' metadata, every part the split keys and its tensors."""
    parts = []
    n_tensors = sum(len(g) for g in groups)
    for index, group in enumerate(groups):
        part = GGUFContents(contents.arch)
        part.data_alignment = contents.data_alignment
        part.metadata.clear()
        if index == 0:
            part.metadata.update(contents.metadata)
        part.add_key_value(SPLIT_NO, index, GGUFValueType.UINT16)
        part.add_key_value(SPLIT_COUNT, len(groups), GGUFValueType.UINT16)
        part.add_key_value(SPLIT_TENSORS_COUNT, n_tensors, GGUFValueType.INT32)
        for slot in group:
            part.add_slot(slot.name, slot.shape, slot.ggml_type, slot.nbytes)
        parts.append(part)
    return parts


@dataclass(frozen=True)
class WrittenPart:
    path: Path
    nbytes: int
    sha256: str


class SplitPlacedTensors:
    """`PlacedTensors` over the parts of a split file (one part, named `path`, when the limit keeps it whole):
    each tensor's chunks go to the part that holds it. `header_later`: the headers wait for `write_headers`."""

    def __init__(self, path: Path, contents: GGUFContents, limit: SplitLimit, header_later: bool = False) -> None:
        groups = group_slots(contents.slots, limit, contents.data_alignment) if limit else [contents.slots]
        if len(groups) == 1:
            self.files = [PlacedTensors(path, contents, header_later)]
        else:
            prefix = prefix_of(path)
            self.files = []
            for i, part in enumerate(part_contents(contents, groups)):
                self.files.append(PlacedTensors(part_path(prefix, i, len(groups)), part, header_later))
        self.home = {slot.name: f for f in self.files for slot in f.slots}

    def write_headers(self) -> None:
        for f in self.files:
            f.write_header()

    @property
    def paths(self) -> list[Path]:
        return [f.path for f in self.files]

    def write(self, name: str, chunk: Chunk) -> int:
        return self.home[name].write(name, chunk)

    def finish(self) -> list[WrittenPart]:
        for f in self.files:
            f.finish()
        return [WrittenPart(f.path, f.size, f.sha256 or "") for f in self.files]

    def close(self) -> None:
        for f in self.files:
            f.close()


def contents_of(header: GGUFHeader) -> GGUFContents:
    """A GGUF's metadata (in its order) and tensor infos, to write again; `header` read with raw_strings."""
    arch = header.value("general.architecture", b"")
    contents = GGUFContents(arch.decode() if isinstance(arch, bytes) else str(arch))
    contents.metadata.clear()
    if (alignment := header.value("general.alignment")) is not None:
        contents.data_alignment = int(alignment)
    for key, (vtype, value) in header.kv.items():
        contents.add_key_value(key, value, vtype, sub_type=header.array_types.get(key))
    for t in header.tensors:
        contents.add_slot(t.name, tuple(reversed(t.shape)), t.type, t.nbytes)
    return contents


def _spans(header: GGUFHeader, names: list[str]) -> Iterator[list[Chunk]]:
    by_name = {t.name: t for t in header.tensors}
    for name in names:
        info = by_name[name]
        yield [FileSpan(info.path, info.offset, info.nbytes)]


def split_gguf(src: Path, out_prefix: Path, limit: SplitLimit, force: bool = False) -> list[Path]:
    """`src` (one file or the first part of a split) as parts named from `out_prefix`, as gguf-split writes them:
    always named parts with split keys, even when one part holds everything."""
    header = read_header(src, raw_strings=True)
    contents = contents_of(header)
    groups = group_slots(contents.slots, limit, contents.data_alignment)
    paths = [part_path(prefix_of(out_prefix), i, len(groups)) for i in range(len(groups))]
    for path in paths:
        check_output(path, force)
    with atomic_paths(paths) as tmps:
        for tmp, part, group in zip(tmps, part_contents(contents, groups), groups):
            write_gguf(tmp, part, _spans(header, [slot.name for slot in group]))
    return paths


def merge_gguf(first_part: Path, out: Path, force: bool = False) -> Path:
    """A split model back as one file: the first part's metadata without the split keys, every tensor in order.
    A file that `split_gguf` split comes back byte for byte."""
    header = read_header(first_part, raw_strings=True)
    if not header.parts:
        raise MtError(f"{first_part} is not split (it has no {SPLIT_COUNT})", "it is already one file")
    check_output(out, force)
    contents = contents_of(header)
    with atomic_path(out) as tmp:
        write_gguf(tmp, contents, _spans(header, [t.name for t in header.tensors]))
    return out
