"""A Hugging Face cache snapshot: every file a link into ../../blobs (named by its hash). mt reads it as the
folder it stands for."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from mt.convert.convert import convert


def as_cache_snapshot(src: Path, cache: Path, repo_id: str = "org/name", revision: str = "0" * 40,
                      ref: str = "main") -> Path:
    """`cache/models--ORG--NAME/snapshots/REVISION/` as huggingface_hub lays it out, `refs/REF` naming it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo / "blobs", repo / "snapshots" / revision
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(revision)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    return snapshot


def test_a_sharded_snapshot_converts_as_its_folder(llama3_sharded_dir, tmp_path):
    snapshot = as_cache_snapshot(llama3_sharded_dir, tmp_path / "hub")
    assert any(p.name.endswith(".index.json") for p in snapshot.iterdir())
    plain = Path(shutil.copytree(llama3_sharded_dir, tmp_path / "plain" / "name"))  # general.name: the repository's
    convert(snapshot, tmp_path / "snapshot.gguf", "q8_0")
    convert(plain, tmp_path / "plain.gguf", "q8_0")
    assert (tmp_path / "snapshot.gguf").read_bytes() == (tmp_path / "plain.gguf").read_bytes()
