from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from sentencepiece import SentencePieceProcessor
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests import checkpoints, oracle


class Case(NamedTuple):
    fixture: str
    vocab: str
    pre: str
    hello_ids: list[int]


CASES = [
    Case("llama3_dir", "llama-bpe", "llama-bpe", [128000, 9906, 1917]),
    Case("llama2_spm_dir", "llama-spm", "default", [1, 15043, 3186]),
    Case("qwen2_dir", "qwen2", "qwen2", [9707, 1879]),
]
PROMPT = "Hello world, this is a longer test of rope"


def _folder(request: pytest.FixtureRequest, case: Case) -> Path:
    return request.getfixturevalue(case.fixture)


def test_vocab_vectors_parse() -> None:
    vectors = oracle.vocab_vectors("llama-spm")
    assert len(vectors) == 46
    assert vectors[0] == ("ied 4 ½ months", [474, 287, 29871, 29946, 29871, 30226, 7378])
    assert ("", []) in vectors
    assert "{{- bos_token }}" in oracle.template("meta-llama-Llama-3.2-3B-Instruct")


def test_fast_gguf_reader_matches_gguf_package() -> None:
    fields = GGUFReader(oracle.vocab_gguf("llama-spm")).fields
    vocab = checkpoints.read_gguf_vocab("llama-spm")
    assert vocab.tokens == list(fields["tokenizer.ggml.tokens"].contents())
    assert vocab.scores == list(fields["tokenizer.ggml.scores"].contents())
    assert vocab.token_types == list(fields["tokenizer.ggml.token_type"].contents())


def test_sentencepiece_matches_all_vectors(llama2_spm_dir: Path) -> None:
    sp = SentencePieceProcessor(model_file=str(llama2_spm_dir / "tokenizer.model"))
    for text, expected in oracle.vocab_vectors("llama-spm"):
        assert sp.encode(text) == expected, text


@pytest.mark.parametrize("case", CASES[::2], ids=lambda c: c.fixture)
def test_bpe_tokenizer_matches_all_vectors(request: pytest.FixtureRequest, case: Case) -> None:
    tok = AutoTokenizer.from_pretrained(_folder(request, case))
    for text, expected in oracle.vocab_vectors(case.vocab):
        assert tok.encode(text, add_special_tokens=False) == expected, text


def test_llama3_hub_style_config(llama3_dir: Path) -> None:
    cfg = json.loads((llama3_dir / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"]["rope_type"] == "llama3"
    assert cfg["torch_dtype"] == "bfloat16"


def test_sharded_build(tmp_path: Path) -> None:
    folder = checkpoints.build_llama3(tmp_path, tie=False, shards=2)
    assert len(list(folder.glob("model-*-of-00002.safetensors"))) == 2
    assert (folder / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.fixture)
def test_loads_in_transformers(request: pytest.FixtureRequest, case: Case) -> None:
    folder = _folder(request, case)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert tok("Hello world").input_ids == case.hello_ids
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    with torch.no_grad():
        logits = model(torch.tensor([case.hello_ids])).logits[0, -1].float()
    assert logits.std() > 0.3


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.fixture)
def test_llama_cpp_converter_accepts(request: pytest.FixtureRequest, case: Case, tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    folder = _folder(request, case)
    out = tmp_path / "model-f32.gguf"
    oracle.run_converter(folder, out, "f32")
    fields = checkpoints.read_gguf_fields(out)
    assert fields["tokenizer.ggml.pre"] == case.pre
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
    llm.eval(ids)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(llm.scores[: len(ids)]), ref, atol=1e-2)
