"""Read a GGUF into comparable form: ordered metadata and tensor table with raw bytes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mt.gguf_in import read_header


@dataclass
class GGUFContents:
    kv: list[tuple[str, str, Any]]
    tensors: list[tuple[str, str, tuple[int, ...], bytes]]

    def kv_dict(self) -> dict[str, Any]:
        return {k: v for k, _, v in self.kv}


def read_gguf(path: Path) -> GGUFContents:
    header = read_header(path)
    kv = [(key, vtype.name, value) for key, (vtype, value) in header.kv.items()]
    tensors = [(t.name, t.type.name, t.shape, header.read_tensor(t)) for t in header.tensors]
    return GGUFContents(kv, tensors)
