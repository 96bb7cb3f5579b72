"""Read a GGUF into comparable form: ordered metadata and tensor table with raw bytes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType

# general.* keys that name the model (derived from folder names and model cards) rather than describe it
NAMING_KEYS = {"general.name", "general.basename", "general.size_label", "general.finetune", "general.version",
               "general.organization", "general.license", "general.tags", "general.languages"}


def field_value(field: Any) -> Any:
    if field.types[0] == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="surrogateescape") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    part = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="surrogateescape")
    return part.tolist()[0]


@dataclass
class GGUFContents:
    kv: list[tuple[str, tuple[int, ...], Any]]
    tensors: list[tuple[str, str, tuple[int, ...], bytes]]

    def kv_without_naming(self) -> list[tuple[str, tuple[int, ...], Any]]:
        return [item for item in self.kv if item[0] not in NAMING_KEYS]

    def kv_dict(self) -> dict[str, Any]:
        return {k: v for k, _, v in self.kv}


def read_gguf(path: Path) -> GGUFContents:
    reader = GGUFReader(path)
    kv = [(name, tuple(int(t) for t in f.types), field_value(f)) for name, f in reader.fields.items() if not name.startswith("GGUF.")]
    tensors = [(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), np.asarray(t.data).tobytes()) for t in reader.tensors]
    return GGUFContents(kv, tensors)
