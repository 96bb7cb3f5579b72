"""Tensors of a GGUF file as float32 torch tensors in numpy order, read by name (or a few rows of one), dequantized
with gguf-py whatever their type."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import gguf
import numpy as np
import torch

from mt.errors import GGUFError
from mt.io.gguf_in import GGUFHeader, TensorInfo, read_header


class GGUFWeights:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.header: GGUFHeader = read_header(self.path)
        self.infos: dict[str, TensorInfo] = {t.name: t for t in self.header.tensors}

    @property
    def arch(self) -> str | None:
        return self.header.value("general.architecture")

    def value(self, key: str, default: Any = None) -> Any:
        return self.header.value(key, default)

    def require_arch(self, arch: str, what: str, remedy: str) -> "GGUFWeights":
        """Itself, when its general.architecture is `arch`; else a GGUFError saying the file is not `what`."""
        if self.arch != arch:
            raise GGUFError(f"{self.path} is not {what} (general.architecture is {self.arch!r}, not {arch!r})", remedy)
        return self

    def needed(self, key: str) -> Any:
        value = self.header.value(key)
        if value is None:
            raise GGUFError(f"{self.path} has no {key}", "convert the model again with mt convert")
        return value

    def has(self, name: str) -> bool:
        return name in self.infos

    def tensor(self, name: str) -> torch.Tensor:
        info = self._info(name)
        shape = tuple(reversed(info.shape))
        return torch.from_numpy(self._decode(self.header.read_tensor(info), info, shape[0]).reshape(shape))

    def rows(self, name: str, ids: Sequence[int]) -> np.ndarray:
        """Rows `ids` of a matrix ([len(ids), columns] float32), reading only those rows."""
        info = self._info(name)
        n_rows = info.shape[-1]
        row_bytes = info.nbytes // n_rows
        out = []
        with open(info.path, "rb") as f:
            for i in ids:
                if not 0 <= i < n_rows:
                    raise GGUFError(f"{self.path}: row {i} of {name} is outside its {n_rows} rows", "")
                f.seek(info.offset + i * row_bytes)
                out.append(f.read(row_bytes))
        return self._decode(b"".join(out), info, len(ids)).reshape(len(ids), *reversed(info.shape[:-1]))

    def _info(self, name: str) -> TensorInfo:
        if name not in self.infos:
            raise GGUFError(f"{self.path} has no tensor {name!r}", "convert the model again with mt convert")
        return self.infos[name]

    @staticmethod
    def _decode(raw: bytes, info: TensorInfo, n_rows: int) -> np.ndarray:
        """[n_rows, row elements] float32."""
        data = np.frombuffer(raw, dtype=np.uint8).reshape(n_rows, -1)
        return np.array(gguf.quants.dequantize(data, info.type), dtype=np.float32)
