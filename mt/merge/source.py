"""The merged model as a source: its non-weight files (config, tokenizer, generation config) and, for
`mt convert --adapter`, a folder that shows them to the converter as if the merged checkpoint were on disk."""

from __future__ import annotations

import json
import tempfile
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from mt.io.checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
from mt.merge.adapter import Adapter, open_adapter
from mt.merge.merged import DTYPES, merge_checkpoint

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".pkl")
SideFile = Path | bytes
TEMPLATES_DIR = "additional_chat_templates"


def folder_side_files(folder: Path) -> dict[str, SideFile]:
    """Every top-level non-weight file of a checkpoint folder (config, tokenizer, generation config …) and its
    additional chat templates."""
    files: dict[str, SideFile] = {
        p.name: p for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(WEIGHT_SUFFIXES) and p.name != INDEX_NAME
    }
    templates = folder / TEMPLATES_DIR
    if templates.is_dir():
        files.update({f"{TEMPLATES_DIR}/{p.name}": p for p in sorted(templates.glob("*.jinja"))})
    return files


def side_files(base: Checkpoint, merged_config: dict[str, Any], adapter: Adapter) -> dict[str, SideFile]:
    """Every top-level non-weight file of the base, the adapter's tokenizer files over them (a finetune that added
    tokens saves its tokenizer beside the adapter), and the merged config.json."""
    files = folder_side_files(base.folder)
    files.update({p.name: p for p in adapter.tokenizer_files})
    files["config.json"] = (json.dumps(merged_config, indent=2, sort_keys=True) + "\n").encode()
    return files


def open_merged(base_dir: Path, adapter_dir: Path, dtype: str | None = None, dequantized_base: bool = False,
                allow_pickle: bool = False) -> tuple[Checkpoint, Checkpoint, Adapter]:
    """(merged, base, adapter): the base with the adapter merged in lazily; `dtype` is f32/f16/bf16 or None
    (each tensor keeps its own)."""
    from mt.merge.qlora import merge_base

    base = open_checkpoint(base_dir, allow_pickle=allow_pickle)
    adapter = open_adapter(adapter_dir)
    base, wrap = merge_base(base, dequantized_base)
    return merge_checkpoint(base, adapter, DTYPES[dtype] if dtype else None, wrap), base, adapter


def merged_source(base_dir: Path, adapter_dir: Path, stack: ExitStack, dequantized_base: bool = False,
                  allow_pickle: bool = False) -> Checkpoint:
    """The merged checkpoint, its folder a temporary one (named like the base, removed when `stack` closes) that
    links the base's files and holds the merged config and the adapter's tokenizer: exactly what the converter
    would read from `mt merge`'s output."""
    merged, base, adapter = open_merged(base_dir, adapter_dir, None, dequantized_base, allow_pickle)
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mt-merged-"))) / Path(base_dir).resolve().name
    folder.mkdir()
    for name, data in side_files(base, merged.config, adapter).items():
        (folder / name).parent.mkdir(exist_ok=True)
        if isinstance(data, bytes):
            (folder / name).write_bytes(data)
        else:
            (folder / name).symlink_to(data.resolve())
    return replace(merged, folder=folder)


def open_source(src: Path, adapter: Path | None, stack: ExitStack, *, dequantized_base: bool = False,
                allow_pickle: bool = False) -> Checkpoint:
    """What convert, re-export and verify read: the checkpoint folder `src`, or with `adapter` the merged model
    (`merged_source`, its temporary folder held by `stack`)."""
    if adapter is None:
        return open_checkpoint(src, allow_pickle=allow_pickle)
    return merged_source(src, adapter, stack, dequantized_base=dequantized_base, allow_pickle=allow_pickle)
