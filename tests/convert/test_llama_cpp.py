"""GGUFs written by mt, run in llama.cpp: tokenization equals HF, logits match transformers fp32."""

from pathlib import Path

import pytest

from mt.convert.convert import convert
from mt.verify.corpus import CORPUS, with_special_tokens
from mt.verify.logits import compare_logits, hf_logits, llama_cpp_logits
from tests.oracle import vocab_vectors

FIXTURES = ["llama3_dir", "llama2_spm_dir", "qwen2_dir"]
VECTORS = {"llama3_dir": "llama-bpe", "llama2_spm_dir": "llama-spm", "qwen2_dir": "qwen2"}


@pytest.fixture(scope="module")
def vocab_llamas(request):
    cache: dict[Path, object] = {}

    def get(gguf: Path):
        from llama_cpp import Llama

        if gguf not in cache:
            cache[gguf] = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
        return cache[gguf]

    yield get
    for llm in cache.values():
        llm.close()


@pytest.fixture(scope="module")
def f32_gguf(request, tmp_path_factory):
    made: dict[str, Path] = {}

    def get(fixture: str) -> Path:
        if fixture not in made:
            src = request.getfixturevalue(fixture)
            made[fixture] = tmp_path_factory.mktemp(fixture) / "model-f32.gguf"
            convert(src, made[fixture], "f32")
        return made[fixture]

    return get


def hf_ids(folder: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(text)["input_ids"]


@pytest.mark.parametrize("fixture", FIXTURES)
def test_tokenization_matches_hf_on_corpus(request, fixture, f32_gguf, vocab_llamas):
    from transformers import AutoTokenizer

    src = request.getfixturevalue(fixture)
    tok = AutoTokenizer.from_pretrained(src)
    llm = vocab_llamas(f32_gguf(fixture))
    texts = dict(CORPUS, special=with_special_tokens(tok.bos_token, tok.eos_token))
    mismatches = {}
    for name, text in texts.items():
        ours = llm.tokenize(text.encode(), add_bos=True, special=True)
        theirs = tok(text)["input_ids"]
        if ours != theirs:
            mismatches[name] = (ours, theirs)
    assert not mismatches, mismatches


@pytest.mark.parametrize("fixture", FIXTURES)
def test_llama_cpp_test_vectors(request, fixture, f32_gguf, vocab_llamas):
    llm = vocab_llamas(f32_gguf(fixture))
    failures = []
    for text, expected in vocab_vectors(VECTORS[fixture]):
        got = llm.tokenize(text.encode(), add_bos=False, special=False)
        if got != expected:
            failures.append((text, got, expected))
    assert not failures, failures[:3]


@pytest.mark.parametrize("fixture, outtype", [("llama3_dir", "f32"), ("llama3_dir", "bf16"), ("llama2_spm_dir", "f16"), ("qwen2_dir", "f16"), ("qwen2_dir", "bf16")])
def test_logits_match_transformers(request, tmp_path, fixture, outtype):
    src = request.getfixturevalue(fixture)
    out = tmp_path / f"m-{outtype}.gguf"
    convert(src, out, outtype)
    ids = hf_ids(src, CORPUS["en"] + " " + CORPUS["de"] + " " + CORPUS["ja"])[:48]
    stats = compare_logits(hf_logits(src, ids), llama_cpp_logits(out, ids))
    assert stats.kld_max <= 1e-5, stats
    assert stats.top1_agreement == 1.0, stats
