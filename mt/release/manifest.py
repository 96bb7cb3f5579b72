"""DIST/manifest.json: what a device or a pipeline needs to pick and check a file of the release without opening it.

Schema (version 1): {"schema": "mt-release-manifest", "version": 1, "name", "base_model", "architecture",
"parameters", "context_length", "files": [{"file", "type", "file_type", "bytes", "sha256",
"parts": [{"file", "bytes", "sha256"}], "bits_per_weight", "verify": null | {"passed", "quality": {"kld_mean", "kld_p99", "top1_agreement", "delta_ppl"}},
"memory": [{"n_ctx", "kv_cache_type", "weights_bytes", "kv_cache_bytes", "total_bytes"}]}]}. Memory is llama.cpp's
weights plus KV cache at 2k/8k/32k tokens and the model's maximum context (mt.release.memory). A file split in parts
is named by its first part (what llama.cpp is given); its `sha256` is null and `parts` lists each part; a whole file
has one part, itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mt.io.gguf_in import read_header
from mt.release.memory import estimates

SCHEMA = "mt-release-manifest"
VERSION = 1


def memory_rows(path: Path) -> list[dict[str, int | str]]:
    return [{"n_ctx": e.n_ctx, "kv_cache_type": e.cache_type, "weights_bytes": e.weights, "kv_cache_bytes": e.kv_cache,
             "total_bytes": e.total} for e in estimates(read_header(path))]


def manifest(name: str, base_model: str, arch: str, parameters: int, files: list[dict[str, Any]]) -> dict[str, Any]:
    """`files`: one entry each (file, type, file_type, bytes, sha256, bits_per_weight, verify), memory added here
    from the file at `path` (removed from the entry)."""
    entries = [{k: v for k, v in f.items() if k != "path"} | {"memory": memory_rows(f["path"])} for f in files]
    context_length = read_header(files[0]["path"]).value(f"{arch}.context_length")
    return {"schema": SCHEMA, "version": VERSION, "name": name, "base_model": base_model, "architecture": arch,
            "parameters": parameters, "context_length": context_length, "files": entries}
