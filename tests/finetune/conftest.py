"""Tiny models for the finetune tests: a Llama-3-shaped model with the real Llama-3 tokenizer (and chat
template), Qwen2.5's tokenizer for a second template, and vocabulary-free tiny models for the packing checks.

The torch thread count is 1 here: on tiny models a second thread only adds synchronisation, and on a busy
machine it made steps ~10x slower (measured: 8 steps 11.4 s with 2 threads vs 0.8 s with 1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import pytest
import torch

from tests import checkpoints

# emb std 0.5 (not the converters' 0.1) so the tied, frozen
# embeddings can give a trained answer a clear lead over 128k other tokens
EMBED_STD = 0.5
WEIGHT_STD = 0.1


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama3_tok")
    checkpoints.write_llama3_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def qwen2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("qwen2_tok")
    checkpoints.write_qwen2_tokenizer(folder)
    return folder


def build_tiny(folder: Path, tokenizer_dir: Path, family: str = "llama", seed: int = 0) -> Path:
    """2 layers, hidden 64, GQA 4/2, tied embeddings, the tokenizer's full vocabulary, float32 weights."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    vocab, extra = {
        "llama": (checkpoints.LLAMA3_VOCAB, dict(rope_theta=500000.0, bos_token_id=128000, eos_token_id=128009)),
        "qwen2": (checkpoints.QWEN2_VOCAB, dict(rope_theta=1000000.0, eos_token_id=151645, use_sliding_window=False)),
    }[family]
    config = getattr(transformers, f"{family.capitalize()}Config")(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, num_hidden_layers=2,
        vocab_size=vocab, tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=2048, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family.capitalize()}ForCausalLM")(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2:
                param.normal_(0.0, EMBED_STD if "embed" in name else WEIGHT_STD)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama3(llama3_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny_llama3"), llama3_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2(qwen2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny_qwen2"), qwen2_tokenizer_dir, "qwen2")


CAPITALS = (("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Peru", "Lima"))


def capital_prompt(country: str) -> str:
    return f"Q: capital of {country}? A:"


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def capitals_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [{"prompt": capital_prompt(c), "completion": f" {a}"} for _ in range(2) for c, a in CAPITALS]
    return write_jsonl(tmp_path_factory.mktemp("data") / "capitals.jsonl", rows)
