"""Qwen3, Phi-3 and Mistral with a sliding window: the converter's bytes, llama.cpp's tokenization and logits
against transformers, and llama-quantize's K-quant mixes."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from mt.io.gguf_out import GGUFContents
from mt.convert.arch import load_architecture
from mt.convert.convert import convert
from mt.quant.quantize import parse_file_type, quantize_gguf
from mt.verify.corpus import CORPUS, with_special_tokens
from mt.verify.logits import compare_logits, hf_logits, llama_cpp_logits
from tests.convert.test_llama_cpp import hf_ids, sentencepiece_ids
from tests.gguf_compare import read_gguf
from tests.llama_quantize import llama_quantize
from tests.oracle import run_converter, vocab_vectors
from tests.gguf_compare import assert_same_file

Converted = Callable[[str, str], Path]


@pytest.fixture(scope="module")
def converter_file(request, tmp_path_factory) -> Converted:
    """llama.cpp's convert_hf_to_gguf.py output for (fixture, outtype), made once per module."""
    made: dict[tuple[str, str], Path] = {}

    def get(fixture: str, outtype: str) -> Path:
        if (fixture, outtype) not in made:
            out = tmp_path_factory.mktemp(f"ref-{fixture}") / f"{outtype}.gguf"
            extra = ["--vocab-only"] if outtype == "vocab" else []
            run_converter(request.getfixturevalue(fixture), out, "f16" if outtype == "vocab" else outtype, extra)
            made[fixture, outtype] = out
        return made[fixture, outtype]

    return get


@pytest.fixture(scope="module")
def mt_vocab_file(request, tmp_path_factory) -> Callable[[str], Path]:
    """mt's vocab-only file for a fixture, made once per module."""
    made: dict[str, Path] = {}

    def get(fixture: str) -> Path:
        if fixture not in made:
            made[fixture] = tmp_path_factory.mktemp(f"vocab-{fixture}") / "vocab.gguf"
            convert(request.getfixturevalue(fixture), made[fixture], "f16", vocab_only=True)
        return made[fixture]

    return get


def assert_same_bytes(ours: Path, ref: Path) -> None:
    if ours.read_bytes() == ref.read_bytes():
        return
    a, b = read_gguf(ours), read_gguf(ref)
    assert [t[:3] for t in a.tensors] == [t[:3] for t in b.tensors]
    for (name, *_, x), (_, *_, y) in zip(a.tensors, b.tensors):
        assert x == y, f"{name}: tensor data differs"
    assert a.kv == b.kv
    pytest.fail("files differ outside tensor data and metadata (alignment or padding)")


# ---------------------------------------------------------------- the converter's bytes

BYTE_CASES = [
    ("qwen3_dir", "bf16"), ("qwen3_dir", "f16"), ("qwen3_dir", "q8_0"),
    ("phi3_dir", "bf16"), ("phi3_dir", "f16"), ("phi3_dir", "q8_0"),
    ("phi3_longrope_dir", "f16"),
]  # Mistral: tests/convert/test_parity.py (the converter writes `llama` and no window, whatever its length)


@pytest.mark.parametrize("fixture, outtype", BYTE_CASES)
def test_same_file_as_converter(request, tmp_path, converter_file, fixture, outtype):
    ours = tmp_path / "mt.gguf"
    convert(request.getfixturevalue(fixture), ours, outtype)
    assert_same_bytes(ours, converter_file(fixture, outtype))


@pytest.mark.parametrize("fixture", ["qwen3_dir", "phi3_longrope_dir"])
def test_vocab_only_same_file(converter_file, mt_vocab_file, fixture):
    """phi3_longrope: no rope.scaling.attn_factor in a vocab-only file (the converter adds it with the tensors)."""
    assert_same_bytes(mt_vocab_file(fixture), converter_file(fixture, "vocab"))


def test_converter_layout_is_what_llama_cpp_needs(converter_file):
    """The fused tensors and longrope keys the C++ loader reads (attn_qkv, ffn_up of 2·n_ff, rope factors)."""
    ref = read_gguf(converter_file("phi3_longrope_dir", "f16"))
    kv, shapes = ref.kv_dict(), {name: shape for name, _, shape, _ in ref.tensors}
    assert shapes["blk.0.attn_qkv.weight"] == (256, 256 + 2 * 128) and shapes["blk.0.ffn_up.weight"] == (256, 1024)
    assert shapes["rope_factors_long.weight"] == shapes["rope_factors_short.weight"] == (32,)
    assert kv["phi3.rope.scaling.original_context_length"] == 1024
    assert kv["phi3.rope.scaling.attn_factor"] == pytest.approx(np.sqrt(1 + np.log(4) / np.log(1024)), rel=1e-6)


# ---------------------------------------------------------------- llama.cpp's tokenizer

@pytest.fixture(scope="module")
def vocab_llama(mt_vocab_file):
    from llama_cpp import Llama

    open_models: dict[str, Llama] = {}

    def get(fixture: str) -> Llama:
        if fixture not in open_models:
            open_models[fixture] = Llama(model_path=str(mt_vocab_file(fixture)), vocab_only=True, verbose=False)
        return open_models[fixture]

    yield get
    for llm in open_models.values():
        llm.close()


def corpus_with_specials(tok) -> dict[str, str]:
    return dict(CORPUS, special=with_special_tokens(tok.bos_token, tok.eos_token))


def test_qwen3_tokenizes_the_corpus_as_hf(request, vocab_llama):
    from transformers import AutoTokenizer

    src = request.getfixturevalue("qwen3_dir")
    tok = AutoTokenizer.from_pretrained(src)
    llm = vocab_llama("qwen3_dir")
    texts = corpus_with_specials(tok) | {"think": "<think>\nhmm</think>\n\n<tool_response>ok</tool_response>"}
    diffs = {name: (ours, theirs) for name, text in texts.items()
             if (ours := llm.tokenize(text.encode(), add_bos=True, special=True)) != (theirs := tok(text)["input_ids"])}
    assert not diffs, diffs


def test_phi3_tokenizes_the_corpus_as_sentencepiece(request, vocab_llama):
    from transformers import AutoTokenizer

    src = request.getfixturevalue("phi3_dir")
    tok = AutoTokenizer.from_pretrained(src)
    llm = vocab_llama("phi3_dir")
    specials = {t: tok.convert_tokens_to_ids(t) for t in (tok.bos_token, tok.eos_token)}
    diffs = {}
    for name, text in corpus_with_specials(tok).items():
        ours = llm.tokenize(text.encode(), add_bos=True, special=True)
        if ours != (theirs := sentencepiece_ids(src, text, specials, tok.bos_token_id)):
            diffs[name] = (ours, theirs)
    assert not diffs, diffs


def test_phi3_chat_prompt_tokenizes_as_hf(request, vocab_llama):
    """<|user|>, <|end|>, <|assistant|> swallow the newline after them (rstrip) in HF and in llama.cpp alike."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(request.getfixturevalue("phi3_dir"))
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why?"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ours = vocab_llama("phi3_dir").tokenize(text.encode(), add_bos=False, special=True)
    assert ours == tok(text, add_special_tokens=False)["input_ids"]
    assert 32010 in ours and 32007 in ours and 32001 in ours


@pytest.mark.parametrize("fixture, vectors", [("qwen3_dir", "qwen2"), ("phi3_dir", "phi-3")])
def test_llama_cpp_test_vectors(vocab_llama, fixture, vectors):
    llm = vocab_llama(fixture)
    failures = [(text, got, expected) for text, expected in vocab_vectors(vectors)
                if (got := llm.tokenize(text.encode(), add_bos=False, special=False)) != expected]
    assert not failures, failures[:3]


# ---------------------------------------------------------------- logits against transformers

def prompt_ids(src: Path, n: int) -> list[int]:
    return hf_ids(src, CORPUS["en"] + " " + CORPUS["de"] + " " + CORPUS["ja"] + " " + CORPUS["fr"] + " " + CORPUS["code"])[:n]


@pytest.mark.parametrize("fixture", ["qwen3_dir", "phi3_dir", "phi3_longrope_dir", "mistral_swa_dir"])
def test_f16_logits_match_transformers(request, tmp_path, fixture):
    """48 tokens (24 for Mistral: inside its 32-token window); longrope: llama.cpp's 512-token context is within
    original_max_position_embeddings (1024), so both sides use the short factors and the attention factor."""
    src = request.getfixturevalue(fixture)
    out = tmp_path / "m.gguf"
    convert(src, out, "f16")
    ids = prompt_ids(src, 24 if fixture == "mistral_swa_dir" else 48)
    ref, ours = hf_logits(src, ids), llama_cpp_logits(out, ids)
    stats = compare_logits(ref, ours)
    assert stats.kld_max <= 1e-5, stats
    assert_same_top1_where_decided(ref, ours)


def assert_same_top1_where_decided(ref: np.ndarray, ours: np.ndarray) -> None:
    """Same argmax wherever the reference's top two differ by more than twice the largest |Δlogit| (random tiny
    models have near-ties, where f16 rounding alone may swap the top two)."""
    n = min(ref.shape[-1], ours.shape[-1])
    ref, ours = ref[:, :n], ours[:, :n]
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2 * np.abs(ref - ours).max()
    assert decided.mean() > 0.8, decided
    assert (ref.argmax(-1) == ours.argmax(-1))[decided].all()


def test_longrope_long_factors_once_the_context_exceeds_the_original(phi3_longrope_dir, tmp_path):
    """llama.cpp picks the long factors by its context size (here 2048 > 1024), transformers by the sequence length
    (48 tokens: short), so the same 48 tokens then disagree: the factor tensors are what llama.cpp computes with."""
    out = tmp_path / "m.gguf"
    convert(phi3_longrope_dir, out, "f16")
    ids = prompt_ids(phi3_longrope_dir, 48)
    stats = compare_logits(hf_logits(phi3_longrope_dir, ids), llama_cpp_logits(out, ids, n_ctx=2048))
    assert stats.kld_max > 1e-3, stats


def test_mistral_beyond_the_window_llama_cpp_computes_full_attention(mistral_swa_dir, tmp_path):
    """What the convert-time warning says: inside the window both agree, past it llama.cpp's logits depart."""
    out = tmp_path / "m.gguf"
    convert(mistral_swa_dir, out, "f16")
    ids = prompt_ids(mistral_swa_dir, 96)
    ref, ours = hf_logits(mistral_swa_dir, ids), llama_cpp_logits(out, ids)
    inside, beyond = compare_logits(ref[:32], ours[:32]), compare_logits(ref[40:], ours[40:])
    assert inside.kld_max <= 1e-5, inside
    assert beyond.kld_max > 100 * max(inside.kld_max, 1e-7), (inside, beyond)


# ---------------------------------------------------------------- the sliding-window warning

WARNED = "uses a sliding window"


@pytest.mark.parametrize("fixture, warned", [("mistral_swa_dir", True), ("mistral_dir", False), ("phi3_dir", True), ("qwen3_dir", False)])
def test_sliding_window_warning(request, caplog, fixture, warned):
    """Mistral's 32-token window in a 2048 context and Phi-3's 2047 in 4096 are warned about (llama.cpp runs both
    with full attention); a window as long as the context (mistral_dir: 4096 >= 2048) and Qwen3 without one are not."""
    src = request.getfixturevalue(fixture)
    config = json.loads((src / "config.json").read_text())
    arch = load_architecture(config["architectures"][0], config)
    caplog.set_level(logging.WARNING)
    arch.write_hparams(GGUFContents(arch.gguf_arch), 1)
    lines = [r.getMessage() for r in caplog.records if WARNED in r.getMessage()]
    assert len(lines) == (1 if warned else 0), lines


def test_cli_prints_the_warning_as_one_line(mistral_swa_dir, tmp_path):
    out = tmp_path / "v.gguf"
    proc = subprocess.run([sys.executable, "-m", "mt.cli", "convert", str(mistral_swa_dir), "-o", str(out), "--vocab-only", "--quiet"],
                          capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if WARNED in line]
    assert lines == [lines[0]] and "32 tokens" in lines[0] and "full context" in lines[0], proc.stderr
    assert out.is_file()


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


# ---------------------------------------------------------------- K-quant mixes

@pytest.mark.parametrize("fixture", ["qwen3_dir", "phi3_dir"])
def test_q4_k_m_same_file_as_llama_quantize(request, tmp_path, converter_file, fixture):
    """mt quantize of the converter's F16 file and mt convert --outtype q4_k_m both equal llama_model_quantize's
    Q4_K_M of the converter's F16 and BF16 files; Phi-3's fused attn_qkv follows the attn_v rule (Q6_K in layer 1)."""
    f16, bf16 = converter_file(fixture, "f16"), converter_file(fixture, "bf16")
    q4_k_m = parse_file_type("q4_k_m")
    ref_f16, ref_bf16 = tmp_path / "ref-f16.gguf", tmp_path / "ref-bf16.gguf"
    llama_quantize(f16, ref_f16, q4_k_m)
    llama_quantize(bf16, ref_bf16, q4_k_m)
    quantize_gguf(f16, tmp_path / "mt-quantize.gguf", "q4_k_m")
    convert(request.getfixturevalue(fixture), tmp_path / "mt-convert.gguf", "q4_k_m")
    assert_same_file(tmp_path / "mt-quantize.gguf", ref_f16)
    assert_same_file(tmp_path / "mt-convert.gguf", ref_bf16)
    if fixture == "phi3_dir":  # rows of 256: K types, not their fallbacks (Qwen3's rows of 64 take those)
        types = {name: t for name, t, _, _ in read_gguf(ref_bf16).tensors}
        assert [types[f"blk.{i}.attn_qkv.weight"] for i in (0, 1)] == ["Q4_K", "Q6_K"], types
        assert types["blk.0.ffn_up.weight"] == "Q4_K", types


# ---------------------------------------------------------------- Phi-3 variants and bad inputs

def edited_copy(src: Path, dst: Path, edit: Callable[[dict], None], name: str = "config.json") -> Path:
    import shutil

    dst = Path(shutil.copytree(src, dst))
    data = json.loads((dst / name).read_text())
    edit(data)
    (dst / name).write_text(json.dumps(data))
    return dst


def _old_style_longrope(config: dict) -> None:
    """Phi-3's earlier spelling "yarn" (read by transformers as longrope) and no original_max_position_embeddings
    (Phi3Config's default 4096, of a 16384 context here)."""
    config["rope_scaling"]["type"] = "yarn"
    del config["original_max_position_embeddings"]
    config["max_position_embeddings"] = 16384


def test_phi3_old_style_longrope_same_file_as_converter(phi3_longrope_dir, tmp_path):
    """The converter reads config.json through transformers: "yarn" becomes longrope, the missing original context
    Phi3Config's 4096."""
    src = edited_copy(phi3_longrope_dir, tmp_path / "phi3_old", _old_style_longrope)
    ours, ref = tmp_path / "mt.gguf", tmp_path / "ref.gguf"
    run_converter(src, ref, "f16")
    convert(src, ours, "f16")
    assert_same_bytes(ours, ref)
    kv = read_gguf(ours).kv_dict()
    assert kv["phi3.rope.scaling.attn_factor"] == pytest.approx(np.sqrt(1 + np.log(4) / np.log(4096)), rel=1e-6)
    assert kv["phi3.rope.scaling.original_context_length"] == 4096


def _short_factors_too_few(config: dict) -> None:
    config["rope_scaling"]["short_factor"] = config["rope_scaling"]["short_factor"][:-1]


def _dynamic_rope(config: dict) -> None:
    config["rope_scaling"]["type"] = "dynamic"


def _added_token_past_vocab(tconfig: dict) -> None:
    tconfig["added_tokens_decoder"]["40000"] = {"content": "<|extra|>", "special": True}


BAD_PHI3 = [
    (_short_factors_too_few, "config.json", ("long_factor/short_factor", "32 values")),
    (_dynamic_rope, "config.json", ("'dynamic'", "longrope")),
    (_added_token_past_vocab, "tokenizer_config.json", ("<|extra|>", "40000", "vocab_size")),
]


@pytest.mark.parametrize("edit, name, needles", BAD_PHI3, ids=[b[0].__name__.strip("_") for b in BAD_PHI3])
def test_bad_phi3_input_is_one_line(phi3_longrope_dir, tmp_path, edit, name, needles):
    from tests.convert.test_bad_input import assert_clean_failure, run_convert

    src = edited_copy(phi3_longrope_dir, tmp_path / "src", edit, name)
    out = tmp_path / "o.gguf"
    assert_clean_failure(run_convert(src, out), out, *needles)


def test_phi3_without_tokenizer_model_is_one_line(phi3_longrope_dir, tmp_path):
    from tests.convert.test_bad_input import assert_clean_failure, run_convert

    src = edited_copy(phi3_longrope_dir, tmp_path / "src", lambda c: None)
    (src / "tokenizer.model").unlink()
    out = tmp_path / "o.gguf"
    assert_clean_failure(run_convert(src, out), out, "tokenizer.model is missing")


def test_qwen3_without_head_dim_takes_transformers_default(qwen3_dir, tmp_path):
    """Qwen3Config's head_dim default is 128, not hidden / heads (16 here): the key_length llama.cpp needs."""
    from transformers import AutoConfig

    src = edited_copy(qwen3_dir, tmp_path / "src", lambda c: c.pop("head_dim"))
    config = json.loads((src / "config.json").read_text())
    w = GGUFContents("qwen3")
    load_architecture("Qwen3ForCausalLM", config).write_hparams(w, 1)
    written = {key: field.value for key, field in w.metadata.items()}
    assert written["qwen3.attention.key_length"] == written["qwen3.attention.value_length"] == AutoConfig.from_pretrained(src).head_dim


def test_phi3_named_otherwise_warns_and_llama_cpp_keeps_the_newlines(phi3_dir, vocab_llama, tmp_path, caplog):
    """A Phi-3 whose general.name (here from the folder "tiny") lacks "phi3": llama.cpp no longer strips the
    newline after <|user|>, <|end|>, <|assistant|>, so mt says so at convert time."""
    from llama_cpp import Llama

    def name_warnings(src: Path, out: Path) -> list[str]:
        caplog.clear()
        convert(src, out, "f16", vocab_only=True)
        return [r.getMessage() for r in caplog.records if "does not contain 'phi3'" in r.getMessage()]

    caplog.set_level(logging.WARNING)
    assert name_warnings(phi3_dir, tmp_path / "phi3.gguf") == []
    out = tmp_path / "v.gguf"
    assert len(name_warnings(edited_copy(phi3_dir, tmp_path / "tiny", lambda c: None), out)) == 1
    prompt = b"<s><|user|>\nHi there<|end|>\n<|assistant|>\n"
    llm = Llama(model_path=str(out), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(prompt, add_bos=False, special=True) != vocab_llama("phi3_dir").tokenize(prompt, add_bos=False, special=True)
    finally:
        llm.close()
