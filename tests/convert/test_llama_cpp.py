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


def sentencepiece_ids(folder: Path, text: str, specials: dict[str, int], bos: int) -> list[int]:
    """The tokenizer.model itself, applied to each stretch of text between special tokens.

    transformers 5 tokenizes Llama-2 through `tokenizers` and departs from sentencepiece on runs of
    spaces (e.g. "    four"); llama.cpp follows sentencepiece, so sentencepiece is the reference here.
    """
    import re

    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ids = [bos]
    pattern = "(" + "|".join(re.escape(s) for s in specials) + ")"
    for part in re.split(pattern, text):
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids.extend(sp.encode(part))
    return ids


@pytest.mark.parametrize("fixture", FIXTURES)
def test_tokenization_matches_hf_on_corpus(request, fixture, f32_gguf, vocab_llamas):
    from transformers import AutoTokenizer

    src = request.getfixturevalue(fixture)
    tok = AutoTokenizer.from_pretrained(src)
    llm = vocab_llamas(f32_gguf(fixture))
    texts = dict(CORPUS, special=with_special_tokens(tok.bos_token, tok.eos_token))
    mismatches = {}
    spm = (src / "tokenizer.model").is_file()
    specials = {t: tok.convert_tokens_to_ids(t) for t in (tok.bos_token, tok.eos_token) if t}
    for name, text in texts.items():
        ours = llm.tokenize(text.encode(), add_bos=True, special=True)
        theirs = sentencepiece_ids(src, text, specials, tok.bos_token_id) if spm else tok(text)["input_ids"]
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
    assert stats.kld_max <= KLD_MAX[outtype], stats
    assert stats.top1_agreement == 1.0, stats


# llama.cpp's CPU BF16 matmul rounds the activations to bf16 too, so a BF16 file whose weights are
# bit-identical to a bf16 source still drifts from an fp32 forward by ~5e-5 (the converter's file is
# byte-identical to mt's, so it drifts the same); test_bf16_weights_are_the_source_bits pins the weights.
KLD_MAX = {"f32": 1e-5, "f16": 1e-5, "bf16": 1e-4}


def test_bf16_weights_are_the_source_bits(llama3_dir, tmp_path):
    import numpy as np
    from safetensors import safe_open

    from tests.gguf_compare import read_gguf

    out = tmp_path / "m.gguf"
    convert(llama3_dir, out, "bf16")
    tensors = {name: data for name, _, _, data in read_gguf(out).tensors}
    with safe_open(str(llama3_dir / "model.safetensors"), "pt") as f:
        for hf, gg in (("model.embed_tokens.weight", "token_embd.weight"), ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight")):
            source_bits = f.get_tensor(hf).view(dtype=__import__("torch").int16).numpy().tobytes()
            assert tensors[gg] == source_bits
