"""`mt inspect`: a GGUF file's metadata and tensors, or a checkpoint folder's summary."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mt.convert.arch import MODULES, as_text_model, load_architecture, supported
from mt.convert.arch.base import Architecture
from mt.convert.mmproj import projector_of, vision_part
from mt.io.checkpoint import Checkpoint
from mt.convert.plan import NOT_DATA_SUFFIXES
from mt.errors import MtError


def _show(value: Any) -> Any:
    if isinstance(value, list):
        return f"[{len(value)} items]" if len(value) > 8 else value
    if isinstance(value, str) and len(value) > 80:
        return value[:77] + "..."
    return value


def inspect_gguf(path: Path) -> dict[str, Any]:
    from mt.io.gguf_in import read_header
    from mt.quant.quantize import load_problem

    header = read_header(path)
    metadata = {key: _show(value) for key, (_, value) in header.kv.items()}
    tensors = [
        {"name": t.name, "type": t.type.name, "shape": list(t.shape), "bytes": t.nbytes,
         "bpw": round(8 * t.nbytes / max(1, t.n_elements), 3)}
        for t in header.tensors
    ]
    total_bytes = sum(t.nbytes for t in header.tensors)
    total_elems = sum(t.n_elements for t in header.tensors)
    gguf_arch = header.kv.get("general.architecture", (None, "unknown"))[1]
    unloadable = load_problem(header)
    lines = [f"{path}: GGUF v{header.version}, architecture {gguf_arch}, {len(metadata)} keys, {len(tensors)} tensors, {total_elems:,} weights, "
             f"{total_bytes:,} bytes of tensor data, {8 * total_bytes / max(1, total_elems):.2f} bits per weight"
             + (f", split in {len(header.parts)} parts" if header.parts else "")]
    if unloadable is not None:
        lines.append(f"  llama.cpp cannot load this file: {unloadable}")
    lines += [f"  {k} = {v}" for k, v in metadata.items()]
    width = max((len(t["name"]) for t in tensors), default=10)
    lines += [f"  {t['name']:<{width}} {t['type']:<6} {str(t['shape']):<20} {t['bytes']:>12,}  {t['bpw']:.2f} bpw" for t in tensors]
    return {"kind": "gguf", "path": str(path), "parts": [str(p) for p in header.parts], "architecture": gguf_arch,
            "metadata": metadata, "tensors": tensors, "loadable": unloadable is None, "load_problem": unloadable,
            "text": "\n".join(lines)}


def _layer_pattern(name: str) -> str:
    return re.sub(r"(^|\.)\d+\.", r"\1*.", name)


def _role(arch: Architecture, name: str) -> str:
    """`blk.*.attn_q.weight` for a main-file tensor, `companion -acoustic: prediction_head.layers.*.norm.weight`
    for a companion file's."""
    companion = next((c for c in arch.companions if c.takes(name)), None)
    if companion is not None:
        return f"companion {companion.suffix}: {_layer_pattern(companion.tensor_name(name))}"
    return _layer_pattern(arch.names.map(name))


def recognise(arch: Architecture, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """What the family makes of each checkpoint tensor: GGUF roles (with counts), dropped, unknown."""
    kept = arch.source_tensors(tensors)
    roles: dict[str, int] = {}
    dropped = [name for name in tensors if name not in kept]
    unknown: list[str] = []
    for name in kept:
        if name.endswith(NOT_DATA_SUFFIXES) or arch.names.is_dropped(name):
            dropped.append(name)
            continue
        try:
            role = _role(arch, name)
        except MtError:
            unknown.append(name)
            continue
        roles[role] = roles.get(role, 0) + 1
    ordered = dict(sorted(roles.items(), key=lambda kv: kv[0].startswith("companion ")))
    return {"roles": ordered, "dropped": dropped, "unknown": unknown}


def recognise_vision(part: Checkpoint, found: dict[str, Any]) -> None:
    """Add the roles of a vision-language model's vision part (its mmproj file's tensors) to `found`."""
    projector = projector_of(part)
    found["dropped"] += [name for name in part.tensors if name.startswith(projector.skipped_prefixes)]
    for name, tensor in part.tensors.items():
        try:
            written = [gguf_name for _, gguf_name, _ in projector.written({name: tensor})]
        except MtError:
            found["unknown"].append(name)
            continue
        for gguf_name in written:
            role = f"mmproj: {_layer_pattern(gguf_name)}"
            found["roles"][role] = found["roles"].get(role, 0) + 1


def _recognition_lines(found: dict[str, Any]) -> list[str]:
    roles = found["roles"]
    lines = [f"  recognised: {len(roles)} GGUF tensor roles"]
    lines += [f"    {role}" + (f" x{count}" if count > 1 else "") for role, count in roles.items()]
    if found["dropped"]:
        lines.append(f"  dropped, folded or left out: {len(found['dropped'])} tensors, e.g. {found['dropped'][0]}")
    if found["unknown"]:
        shown = ", ".join(found["unknown"][:5]) + (" ..." if len(found["unknown"]) > 5 else "")
        lines.append(f"  NOT recognised ({len(found['unknown'])}; mt convert stops at these): {shown}")
    return lines


def _family_line(path: Path, hf_arch: str, family: str | None, gguf_arch: str | None) -> str:
    if family is None:
        return f"{path}: {hf_arch} (not supported by mt; mt converts {', '.join(supported())})"
    return f"{path}: {hf_arch} (mt module {family}, GGUF architecture {gguf_arch})"


def inspect_folder(path: Path) -> dict[str, Any]:
    from mt.io.checkpoint import open_checkpoint

    stored = open_checkpoint(path)
    hf_arch = stored.architecture
    family = MODULES.get(hf_arch)
    ckpt = as_text_model(stored) if family else stored
    arch = load_architecture(hf_arch, stored.config) if family else None
    tensors = [{"name": name, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes} for name, t in stored.tensors.items()]
    n_params = sum(int(np.prod(t["shape"])) for t in tensors)
    lines = [_family_line(path, hf_arch, family, arch.gguf_arch if arch else None),
             f"  {len(tensors)} tensors in {len(stored.files)} file(s), {n_params:,} parameters"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "moe_intermediate_size", "num_local_experts", "num_experts",
                "num_experts_per_tok", "vocab_size", "max_position_embeddings", "rope_theta", "tie_word_embeddings"):
        if key in ckpt.config:
            lines.append(f"  {key} = {ckpt.config[key]}")
    tok_files = [n for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja") if ckpt.has_file(n)]
    lines.append(f"  tokenizer files: {', '.join(tok_files) or 'none'}")
    found = recognise(arch, ckpt.tensors) if arch else None
    if found is not None and (part := vision_part(ckpt)) is not None:
        recognise_vision(part, found)
    if found is not None:
        lines += _recognition_lines(found)
    return {"kind": "checkpoint", "path": str(path), "architecture": hf_arch, "family": family,
            "gguf_architecture": arch.gguf_arch if arch else None, "supported": supported(), "recognised": found,
            "config": stored.config, "tensors": tensors, "parameters": n_params, "text": "\n".join(lines)}


def inspect_path(path: Path) -> dict[str, Any]:
    if path.is_dir():
        return inspect_folder(path)
    if path.is_file():
        return inspect_gguf(path)
    raise MtError(f"{path} does not exist", "pass a GGUF file or a checkpoint folder")


def memory_report(path: Path, n_ctx: int | None = None) -> dict[str, Any]:
    """Weights and KV cache (f16 and q8_0 where the heads allow it) at 2k/8k/32k and the model's maximum context,
    or at `n_ctx` alone."""
    from mt.io.gguf_in import read_header
    from mt.release.memory import estimates

    if not path.is_file():
        raise MtError(f"{path} is not a GGUF file", "pass a GGUF file to inspect --memory")
    header = read_header(path)
    rows = estimates(header, n_ctx)
    lines = [f"{'context':>8}  {'KV cache':<8} {'weights':>11} {'KV':>11} {'total':>11}"]
    lines += [f"{r.n_ctx:>8}  {r.cache_type:<8} {_mib(r.weights):>11} {_mib(r.kv_cache):>11} {_mib(r.total):>11}" for r in rows]
    lines.append("llama-cli/llama-server defaults; compute buffers not counted (docs/RELEASE.md#memory)")
    return {"path": str(path), "memory": [vars(r) | {"total": r.total} for r in rows], "text": "\n".join(lines)}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"