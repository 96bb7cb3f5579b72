"""A Hugging Face checkpoint: config, lazily read tensors, and its side files (tokenizer, chat templates …), which
are the folder's own or, for a model merged in memory, the folder's with some replaced."""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field, is_dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Mapping, Protocol

import numpy as np

from mt.errors import CheckpointError
from mt.io.safetensors import TensorRef, read_header

INDEX_NAME = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".pkl")
TEMPLATES_DIR = "additional_chat_templates"
SideData = Path | bytes  # a side file on disk, or its bytes
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja",
                   "chat_template.json", "special_tokens_map.json", "added_tokens.json")


class LazyTensor(Protocol):
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def read_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray: ...

    def read(self) -> np.ndarray: ...


@dataclass(frozen=True)
class SideFile:
    """One side file, read as a path is: `is_file`, `read_text`, `read_bytes`; printed as where it comes from."""

    name: str
    source: SideData  # a path that may not exist, or the bytes

    def is_file(self) -> bool:
        return isinstance(self.source, bytes) or self.source.is_file()

    def read_bytes(self) -> bytes:
        return self.source if isinstance(self.source, bytes) else self.source.read_bytes()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def cache_key(self) -> tuple[Any, ...]:
        """Equal while the content is: the path and its mtime, or the bytes."""
        if isinstance(self.source, Path):
            return (self.source, self.source.stat().st_mtime_ns)
        return (self.name, self.source)

    def __str__(self) -> str:
        return str(self.source) if isinstance(self.source, Path) else f"{self.name} (merged)"


@dataclass(frozen=True)
class SideFiles:
    """A checkpoint's non-weight files by name: those in `folder`, with `replaced` taking the place of some
    (a merged model's config.json, an adapter's tokenizer). `files / "tokenizer.json"` reads as a path does."""

    folder: Path
    replaced: Mapping[str, SideData] = field(default_factory=dict)

    def __truediv__(self, name: str) -> SideFile:
        return SideFile(name, self.replaced.get(name, self.folder / name))

    def templates(self) -> list[SideFile]:
        """The additional chat templates (additional_chat_templates/*.jinja) in the folder's listing order, as
        gguf-py globs them, then any replaced ones."""
        names = [f"{TEMPLATES_DIR}/{p.name}" for p in (self.folder / TEMPLATES_DIR).glob("*.jinja")]
        names += [n for n in self.replaced if n.startswith(f"{TEMPLATES_DIR}/") and n.endswith(".jinja") and n not in names]
        return [self / name for name in names]

    @contextmanager
    def as_folder(self, names: Iterable[str]) -> Iterator[Path]:
        """A temporary folder holding those of `names` that exist, for readers that only take a folder."""
        with tempfile.TemporaryDirectory(prefix="mt-side-files-") as tmp:
            for name in names:
                if (file := self / name).is_file():
                    (Path(tmp) / name).write_bytes(file.read_bytes())
            yield Path(tmp)

    def mapping(self) -> dict[str, SideData]:
        """Every side file: the folder's top-level non-weight files and its additional chat templates, then the
        replaced ones."""
        files: dict[str, SideData] = {
            p.name: p for p in sorted(self.folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith(WEIGHT_SUFFIXES) and p.name != INDEX_NAME
        }
        templates = self.folder / TEMPLATES_DIR
        if templates.is_dir():
            files.update({f"{TEMPLATES_DIR}/{p.name}": p for p in sorted(templates.glob("*.jinja"))})
        files.update(self.replaced)
        return files

    def __str__(self) -> str:
        return str(self.folder)


@dataclass
class Checkpoint:
    folder: Path
    config: dict[str, Any]
    tensors: dict[str, LazyTensor]
    files: list[Path] = field(default_factory=list)
    replaced_files: Mapping[str, SideData] = field(default_factory=dict)  # side files not the folder's own
    # other models stored in the same checkpoint (a vision-language model's vision tower): each with its own config
    # and tensors, read from the same files
    parts: Mapping[str, "Checkpoint"] = field(default_factory=dict)

    @property
    def side_files(self) -> SideFiles:
        return SideFiles(self.folder, self.replaced_files)

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if not archs:
            raise CheckpointError(
                f"{self.folder / 'config.json'} has no 'architectures' entry",
                'add e.g. "architectures": ["LlamaForCausalLM"] to config.json',
            )
        if not isinstance(archs, list) or not isinstance(archs[0], str):
            raise CheckpointError(f"{self.folder / 'config.json'}'s 'architectures' is {archs!r}, not a list of names",
                                  'write e.g. "architectures": ["LlamaForCausalLM"]')
        return archs[0]

    def has_file(self, name: str) -> bool:
        return (self.side_files / name).is_file()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def renamed(tensor: LazyTensor, name: str) -> LazyTensor:
    """`tensor` under another name (a record's copy, so errors name what the reader knows it as)."""
    if is_dataclass(tensor) and not isinstance(tensor, type):
        return replace(tensor, name=name)
    return _Renamed(name, tensor)


@dataclass(frozen=True)
class TensorView:
    """A tensor made from `source` as it is read: its dtype, and `read` as all of `read_rows`."""

    name: str
    source: LazyTensor

    @property
    def dtype(self) -> str:
        return self.source.dtype

    def read_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        raise NotImplementedError

    def read(self) -> np.ndarray:
        return self.read_rows()


@dataclass(frozen=True)
class _Renamed(TensorView):
    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def nbytes(self) -> int:
        return self.source.nbytes

    def read_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.source.read_rows(start, stop)

    def read(self) -> np.ndarray:
        return self.source.read()


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})", "fix or replace the file") from None


def folder_name(folder: Path) -> str:
    """The model's name as its folder gives it: NAME for a Hugging Face cache snapshot
    (.../models--ORG--NAME/snapshots/REVISION), else the folder's own name."""
    folder = Path(folder).resolve()
    repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo.startswith("models--") and repo.count("--") >= 2:
        return repo.split("--", 2)[2]
    return folder.name


def open_checkpoint(folder: Path, allow_pickle: bool = False) -> Checkpoint:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is not a folder",
            "pass a local checkpoint folder (download a hub model first: huggingface-cli download REPO --local-dir DIR)",
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"no config.json in {folder}", "point mt at a Hugging Face checkpoint folder (config.json + *.safetensors)"
        )
    config = _load_json(config_path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} is not a JSON object", "fix or replace config.json")
    if (folder / INDEX_NAME).is_file():
        files, tensors = _sharded(folder)
    elif parts := _parts(folder, "model", ".safetensors"):
        files, tensors = parts, _read_parts(parts)
    elif parts := _parts(folder, "pytorch_model", ".bin"):
        files, tensors = parts, _read_pickles(parts, allow_pickle)
    else:
        raise CheckpointError(f"no *.safetensors weights in {folder}", "download the model's safetensors files")
    return Checkpoint(folder, config, tensors, files)


def _parts(folder: Path, prefix: str, suffix: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(prefix) and p.name.endswith(suffix))


def _read_parts(parts: list[Path]) -> dict[str, TensorRef]:
    tensors: dict[str, TensorRef] = {}
    for part in parts:
        refs, _ = read_header(part)
        for name in sorted(refs):
            if name in tensors:
                raise CheckpointError(
                    f"tensor {name!r} appears in both {tensors[name].path.name} and {part.name}",
                    "remove the stray shard from the folder",
                )
            tensors[name] = refs[name]
    return tensors


def _sharded(folder: Path) -> tuple[list[Path], dict[str, TensorRef]]:
    index = _load_json(folder / INDEX_NAME)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{INDEX_NAME} has no 'weight_map'", "fix or re-download the index file")
    if bad := [v for v in weight_map.values() if not isinstance(v, str) or not v]:
        raise CheckpointError(f"{INDEX_NAME} maps a tensor to {bad[0]!r}, not a shard file name",
                              "fix or re-download the index file")
    shards: list[Path] = []
    for shard_name in sorted(set(weight_map.values())):
        # judged by the name, not by where a link leads: a Hugging Face cache snapshot links each file into ../../blobs
        inside = PurePosixPath(shard_name)
        if inside.is_absolute() or ".." in inside.parts or "\\" in shard_name:
            raise CheckpointError(
                f"{INDEX_NAME} names {shard_name!r}, a path outside {folder}",
                "shards must sit in the checkpoint folder; fix the index",
            )
        path = folder / inside
        if not path.is_file():
            raise CheckpointError(
                f"{INDEX_NAME} names shard {shard_name!r}, which is missing", "download the missing shard"
            )
        shards.append(path)
    tensors = _read_parts(shards)
    for name, shard_name in weight_map.items():
        ref = tensors.get(name)
        if ref is None or ref.path.name != Path(shard_name).name:
            raise CheckpointError(
                f"{INDEX_NAME} places tensor {name!r} in {shard_name}, but it is not there",
                "the shard is incomplete or the index is stale; download both again",
            )
    if extra := sorted(set(tensors) - set(weight_map)):
        raise CheckpointError(
            f"shards hold tensors the index does not list: {', '.join(extra[:5])}",
            "the index is stale; download it again",
        )
    return shards, tensors


@dataclass(frozen=True)
class PickledTensor:
    """A tensor from a torch pickle, loaded with weights_only=True (only with --allow-pickle)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    source: Any

    def read_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return torch_to_storage(self.source[start:stop] if self.shape else self.source)

    def read(self) -> np.ndarray:
        return self.read_rows()


def torch_to_storage(t: Any) -> np.ndarray:
    """A CPU torch tensor as numpy in safetensors' storage form (bfloat16 as its uint16 bits)."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.contiguous().numpy()


_TORCH_TO_ST = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}


def _read_pickles(parts: list[Path], allow_pickle: bool) -> dict[str, PickledTensor]:
    if not allow_pickle:
        raise CheckpointError(
            f"{parts[0].name} is a pickle checkpoint, which can run code when loaded",
            "convert it to safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)",
        )
    import torch

    tensors: dict[str, PickledTensor] = {}
    for part in parts:
        try:
            state = torch.load(part, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise CheckpointError(f"{part.name} cannot be loaded ({e})", "re-download the file") from None
        for name in sorted(state):
            t = state[name]
            dtype = _TORCH_TO_ST.get(str(t.dtype), str(t.dtype))
            tensors[name] = PickledTensor(name, dtype, tuple(t.shape), t.numel() * t.element_size(), t)
    return tensors
