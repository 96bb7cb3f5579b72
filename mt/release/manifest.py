"""DIST/manifest.json: what a device or a pipeline needs to pick and check a file of the release without opening it.

Schema (version 1): {"schema": "mt-release-manifest", "version": 1, "name", "base_model", "architecture",
"parameters", "context_length", "files": [{"file", "type", "file_type", "bytes", "sha256",
"parts": [{"file", "bytes", "sha256"}], "bits_per_weight", "modelfile" (its Ollama Modelfile in the release),
"verify": null | {"passed", "quality": {"kld_mean", "kld_p99", "top1_agreement", "delta_ppl"}},
"memory": [{"n_ctx", "kv_cache_type", "weights_bytes", "kv_cache_bytes", "total_bytes"}]}]}. Memory is llama.cpp's
weights plus KV cache at 2k/8k/32k tokens and the model's maximum context (mt.release.memory). A file split in parts
is named by its first part (what llama.cpp is given); its `sha256` is null and `parts` lists each part; a whole file
has one part, itself. A vision-language model's release adds "mmproj": {"file", "type", "bytes", "sha256"}, the
projector llama.cpp's multimodal tools load beside any of the files (null for text models).
"""

from __future__ import annotations

from typing import Any

SCHEMA = "mt-release-manifest"
VERSION = 1


def manifest(name: str, base_model: str, arch: str, parameters: int, context_length: int | None,
             files: list[dict[str, Any]], mmproj: dict[str, Any] | None = None) -> dict[str, Any]:
    """`files`: one entry each (file, type, file_type, bytes, sha256, parts, bits_per_weight, verify, memory)."""
    return {"schema": SCHEMA, "version": VERSION, "name": name, "base_model": base_model, "architecture": arch,
            "parameters": parameters, "context_length": context_length, "files": files, "mmproj": mmproj}
