"""Read a GGUF into comparable form: ordered metadata and tensor table with raw bytes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mt.io.gguf_in import read_header


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


def assert_same_file(ours: Path, ref: Path) -> None:
    """Byte equality; on a difference, name where: metadata, tensor table, a tensor's data, or padding."""
    import pytest

    if ours.read_bytes() == ref.read_bytes():
        return
    a, b = read_gguf(ours), read_gguf(ref)
    assert a.kv == b.kv
    assert [t[:3] for t in a.tensors] == [t[:3] for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert x[3] == y[3], f"{x[0]}: data differs"
    pytest.fail("files differ outside metadata and tensor data")
