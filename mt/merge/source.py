"""The merged model as a source: a base checkpoint with an adapter merged in lazily, whose side files are the base's
with the merged config.json and the adapter's tokenizer files in their place, all in memory. Convert, re-export
and `mt merge` read it as they read a folder; only transformers, in verify, needs it on disk (`on_disk`)."""

from __future__ import annotations

import json
import tempfile
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from mt.io.checkpoint import Checkpoint, SideData, folder_name, open_checkpoint
from mt.merge.adapter import Adapter, open_adapter
from mt.merge.merged import DTYPES, merge_checkpoint


def replaced_side_files(merged_config: dict[str, Any], adapter: Adapter) -> dict[str, SideData]:
    """The side files a merge replaces: the adapter's tokenizer files (a finetune that added tokens saves its
    tokenizer beside the adapter) and the merged config.json."""
    files: dict[str, SideData] = {p.name: p for p in adapter.tokenizer_files}
    files["config.json"] = (json.dumps(merged_config, indent=2, sort_keys=True) + "\n").encode()
    return files


def open_merged(base_dir: Path, adapter_dir: Path, dtype: str | None = None, dequantized_base: bool = False,
                allow_pickle: bool = False, allow_non_finite: bool = False) -> tuple[Checkpoint, Checkpoint, Adapter]:
    """(merged, base, adapter): the base with the adapter merged in lazily, its side files replaced as
    `replaced_side_files` says; `dtype` is f32/f16/bf16 or None (each tensor keeps its own). Unless
    `allow_non_finite`, a merged tensor that reads NaN or Inf raises."""
    from mt.merge.qlora import merge_base

    base = open_checkpoint(base_dir, allow_pickle=allow_pickle)
    adapter = open_adapter(adapter_dir)
    base, wrap = merge_base(base, dequantized_base)
    merged = merge_checkpoint(base, adapter, DTYPES[dtype] if dtype else None, wrap, not allow_non_finite)
    return replace(merged, replaced_files=replaced_side_files(merged.config, adapter)), base, adapter


def open_source(src: Path, adapter: Path | None, *, dequantized_base: bool = False, allow_pickle: bool = False,
                allow_non_finite: bool = False) -> Checkpoint:
    """What convert, re-export and verify read: the checkpoint folder `src`, or with `adapter` the merged model."""
    if adapter is None:
        return open_checkpoint(src, allow_pickle=allow_pickle)
    return open_merged(src, adapter, None, dequantized_base, allow_pickle, allow_non_finite)[0]


def on_disk(ckpt: Checkpoint, stack: ExitStack) -> Path:
    """A folder holding `ckpt`'s side files, for readers that take only a folder (transformers): its own folder, or
    for a merged model a temporary one named like the base (removed when `stack` closes) that links the base's
    files and holds the replaced ones."""
    if not ckpt.replaced_files:
        return ckpt.folder
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mt-merged-"))) / folder_name(ckpt.folder)
    folder.mkdir()
    for name, data in ckpt.side_files.mapping().items():
        (folder / name).parent.mkdir(exist_ok=True)
        if isinstance(data, bytes):
            (folder / name).write_bytes(data)
        else:
            (folder / name).symlink_to(data.resolve())
    return folder
