"""The cached SmolLM2-135M-Instruct folder: transformers answers with it, and mt converts it as llama.cpp does."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mt.convert.convert import convert
from mt.io.gguf_in import read_header
from tests.gguf_compare import assert_same_file
from tests.oracle import run_converter


def test_greedy_chat_reply(smollm2_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply


def test_f16_same_bytes_as_llama_cpp(smollm2_dir: Path, tmp_path: Path) -> None:
    ours, ref = tmp_path / "mt.gguf", tmp_path / "ref.gguf"
    convert(smollm2_dir, ours, "f16")
    run_converter(smollm2_dir, ref, "f16")
    assert list(read_header(ours).kv) == list(read_header(ref).kv)
    assert_same_file(ours, ref)
