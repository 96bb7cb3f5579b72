"""`mt inspect`: a GGUF file's metadata and tensors, or a checkpoint folder's summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mt.errors import GGUFError, MtError


def _kv_value(field: Any) -> Any:
    from gguf import GGUFValueType

    if not field.types:
        return None
    if field.types[0] == GGUFValueType.ARRAY:
        n = len(field.data)
        return f"[{n} × {field.types[-1].name}]"
    value = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        text = bytes(value).decode("utf-8", errors="replace")
        return text if len(text) <= 80 else text[:77] + "..."
    return value.tolist()[0] if isinstance(value, np.ndarray) and value.size == 1 else value.tolist()


def inspect_gguf(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError/struct errors for a bad file
        raise GGUFError(f"{path} is not a readable GGUF file ({e})", "check the path or re-create the file") from None
    metadata = {name: _kv_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = [
        {"name": t.name, "type": t.tensor_type.name, "shape": [int(d) for d in t.shape], "bytes": int(t.n_bytes),
         "bpw": round(8 * int(t.n_bytes) / max(1, int(t.n_elements)), 3)}
        for t in reader.tensors
    ]
    total_bytes = sum(t["bytes"] for t in tensors)
    total_elems = sum(int(t.n_elements) for t in reader.tensors)
    lines = [f"{path}: GGUF, {len(metadata)} keys, {len(tensors)} tensors, "
             f"{total_bytes} bytes of tensor data, {8 * total_bytes / max(1, total_elems):.2f} bits per weight"]
    lines += [f"  {k} = {v}" for k, v in metadata.items()]
    width = max((len(t["name"]) for t in tensors), default=10)
    lines += [f"  {t['name']:<{width}} {t['type']:<6} {str(t['shape']):<20} {t['bytes']:>12}  {t['bpw']:.2f} bpw" for t in tensors]
    return {"kind": "gguf", "path": str(path), "metadata": metadata, "tensors": tensors, "text": "\n".join(lines)}


def inspect_folder(path: Path) -> dict[str, Any]:
    from mt.convert.arch import MODULES
    from mt.convert.checkpoint import open_checkpoint

    ckpt = open_checkpoint(path)
    hf_arch = ckpt.architecture
    family = MODULES.get(hf_arch)
    tensors = [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes} for t in ckpt.tensors.values()]
    n_params = sum(int(np.prod(t["shape"])) for t in tensors)
    lines = [f"{path}: {hf_arch} ({'mt module ' + family if family else 'not supported by mt'}), "
             f"{len(tensors)} tensors in {len(ckpt.files)} file(s), {n_params:,} parameters"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "max_position_embeddings", "rope_theta", "tie_word_embeddings"):
        if key in ckpt.config:
            lines.append(f"  {key} = {ckpt.config[key]}")
    tok_files = [n for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja") if ckpt.has_file(n)]
    lines.append(f"  tokenizer files: {', '.join(tok_files) or 'none'}")
    return {"kind": "checkpoint", "path": str(path), "architecture": hf_arch, "family": family, "config": ckpt.config,
            "tensors": tensors, "parameters": n_params, "text": "\n".join(lines)}


def inspect_path(path: Path) -> dict[str, Any]:
    if path.is_dir():
        return inspect_folder(path)
    if path.is_file():
        return inspect_gguf(path)
    raise MtError(f"{path} does not exist", "pass a GGUF file or a checkpoint folder")
