"""How llama.cpp names and marks the parts of a split GGUF (gguf-split, convert_hf_to_gguf.py --split-max-size).

A model split in N parts is N GGUF files `PREFIX-00001-of-0000N.gguf` … ; each carries `split.no` (from 0),
`split.count` and `split.tensors.count`; the first holds all other metadata. llama.cpp is given the first part.
"""

from __future__ import annotations

import re
from pathlib import Path

from gguf import Keys

SPLIT_NO = Keys.Split.LLM_KV_SPLIT_NO
SPLIT_COUNT = Keys.Split.LLM_KV_SPLIT_COUNT
SPLIT_TENSORS_COUNT = Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT)

_PART_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def part_path(prefix: Path, index: int, count: int) -> Path:
    """Part `index` (from 0) of `count`, as llama.cpp's llama_split_path names it."""
    return prefix.with_name(f"{prefix.name}-{index + 1:05d}-of-{count:05d}.gguf")


def split_prefix(path: Path) -> tuple[Path, int, int] | None:
    """(prefix, index from 0, count) of a part's name; None for a name that is not one."""
    found = _PART_NAME.match(path.name)
    if found is None:
        return None
    return path.with_name(found["prefix"]), int(found["no"]) - 1, int(found["count"])


def prefix_of(path: Path) -> Path:
    """The prefix a file's parts are named from: `model.gguf` -> `model`."""
    return path.with_name(path.name[:-5]) if path.name.endswith(".gguf") else path
