"""The general.* keys of a GGUF (name, size label, license …), read from the model card and config by gguf-py."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gguf
import yaml

from mt.errors import CheckpointError
from mt.io.checkpoint import folder_name
from mt.io.gguf_out import GGUFContents

METADATA_FILES = ("README.md", "config.json", "generation_config.json")  # what gguf-py's Metadata.load reads


def _metadata_as_named(folder: Path, total: int) -> gguf.Metadata:
    """gguf-py's metadata of `folder`, read as if the folder had the model's name: a Hugging Face cache snapshot
    (named by its revision) is read as its repository's name, as a download into a folder of that name would be."""
    name = folder_name(folder)
    if name == Path(folder).resolve().name:
        return gguf.Metadata.load(None, folder, None, total)
    with tempfile.TemporaryDirectory(prefix="mt-named-") as tmp:
        view = Path(tmp) / name
        view.mkdir()
        for file in METADATA_FILES:
            if (folder / file).is_file():
                (view / file).symlink_to((folder / file).resolve())
        return gguf.Metadata.load(None, view, None, total)


def write_general_metadata(w: GGUFContents, folder: Path, fallback_name: str | None = None) -> None:
    """general.name, size label, license, sampling defaults … from the model card and config, via gguf-py.
    Without a name there, `fallback_name` (default: the folder's name)."""
    total, shared, expert, expert_count = w.get_total_parameter_count()
    try:
        meta = _metadata_as_named(folder, total)
    except yaml.YAMLError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{folder / 'README.md'}'s front matter is not valid YAML ({reason})",
                              "fix or remove the model card's front matter") from None
    if meta.name is None:
        meta.name = fallback_name if fallback_name is not None else folder_name(folder)
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, expert_count)
    meta.set_gguf_meta_model(w)
