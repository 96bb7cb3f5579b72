"""Gemma 2 and Gemma 3 text: the converter's bytes, llama.cpp's tokenization and logits, llama-quantize's Q4_K_M.

The tiny checkpoints (tests/checkpoints.py) use a sliding window of 16 and 48-token prompts, so the local layers
really mask; Gemma 2's softcaps are low enough to bend its scores and logits. Each logits test also checks that
the reference moves far away when the window, the softcaps (Gemma 2) or the rope scaling of the global layer
(Gemma 3) are switched off, so the agreement is not vacuous.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mt.cli import main
from mt.convert.convert import convert
from mt.quant.quantize import parse_file_type, quantize_gguf
from mt.verify.corpus import CORPUS, with_special_tokens
from mt.verify.logits import compare_logits, llama_cpp_logits
from tests.gguf_compare import assert_same_file, read_gguf
from tests.llama_quantize import llama_quantize
from tests.oracle import run_converter

FAMILIES = ["gemma2_dir", "gemma3_dir"]
KLD_MAX_F16 = 1e-5


@pytest.fixture(scope="module")
def converted(request, tmp_path_factory):
    """llama.cpp's converter output per (fixture, outtype), made once."""
    made: dict[tuple[str, str], Path] = {}

    def get(fixture: str, outtype: str) -> Path:
        if (fixture, outtype) not in made:
            out = tmp_path_factory.mktemp(f"ref-{fixture}") / f"{outtype}.gguf"
            run_converter(request.getfixturevalue(fixture), out, outtype)
            made[fixture, outtype] = out
        return made[fixture, outtype]

    return get


@pytest.mark.parametrize("fixture, outtype", [
    ("gemma2_dir", "bf16"), ("gemma2_dir", "q8_0"), ("gemma2_dir", "f32"),
    ("gemma3_dir", "f16"), ("gemma3_dir", "f32"),  # + q8_0 and vocab-only on variants below
])
def test_same_file_as_llama_cpp_converter(request, converted, tmp_path, fixture, outtype):
    ours = tmp_path / "mt.gguf"
    convert(request.getfixturevalue(fixture), ours, outtype)
    assert_same_file(ours, converted(fixture, outtype))


def test_f16_source_norm_offset_added_in_f16(gemma3_dir, tmp_path):
    """An f16 checkpoint at q8_0: the converter adds Gemma's +1 in f16 (bf16 is widened to float32 first)."""
    import torch
    from safetensors.torch import load_file, save_file

    src = Path(shutil.copytree(gemma3_dir, tmp_path / "src"))
    tensors = {k: v.to(torch.float16) for k, v in load_file(src / "model.safetensors").items()}
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    ref, ours = tmp_path / "ref.gguf", tmp_path / "mt.gguf"
    run_converter(src, ref, "q8_0")
    convert(src, ours, "q8_0")
    assert_same_file(ours, ref)


@pytest.fixture(scope="module")
def f16_gguf(request, tmp_path_factory):
    made: dict[str, Path] = {}

    def get(fixture: str) -> Path:
        if fixture not in made:
            made[fixture] = tmp_path_factory.mktemp(f"mt-{fixture}") / "f16.gguf"
            convert(request.getfixturevalue(fixture), made[fixture], "f16")
        return made[fixture]

    return get


def sentencepiece_ids(folder: Path, text: str) -> list[int]:
    import sentencepiece

    return [2] + sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).encode(text)


@pytest.mark.parametrize("fixture", FAMILIES)
def test_tokenization_matches_hf_and_sentencepiece(request, fixture, f16_gguf):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    src = request.getfixturevalue(fixture)
    tok = AutoTokenizer.from_pretrained(src)
    texts = dict(CORPUS, special=with_special_tokens(tok.bos_token, tok.eos_token),
                 turns="<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n")
    llm = Llama(model_path=str(f16_gguf(fixture)), vocab_only=True, verbose=False)
    try:
        mismatches = {}
        for name, text in texts.items():
            ours = llm.tokenize(text.encode(), add_bos=True, special=True)
            hf = tok(text)["input_ids"]
            if ours != hf or (name != "special" and ours != sentencepiece_ids(src, text)):
                mismatches[name] = (ours, hf)
    finally:
        llm.close()
    assert not mismatches, mismatches
    assert tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [105, 106]


def hf_logits_eager(folder: Path, ids: list[int], **overrides) -> np.ndarray:
    """transformers fp32 with eager attention (Gemma 2's softcapping needs it), config values overridden."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def prompt_ids(folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(" ".join(CORPUS[k] for k in ("en", "de", "fr", "es")))["input_ids"][:48]
    assert len(ids) == 48
    return ids


# config changes the reference must be sensitive to: each moves KL far above the limit
CONTROLS = {
    "gemma2_dir": [{"sliding_window": 4096}, {"attn_logit_softcapping": None}, {"final_logit_softcapping": None}],
    "gemma3_dir": [
        {"sliding_window": 4096},
        {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    ],
}


@pytest.mark.parametrize("fixture", FAMILIES)
def test_f16_logits_match_transformers(request, fixture, f16_gguf):
    src = request.getfixturevalue(fixture)
    ids = prompt_ids(src)
    ours = llama_cpp_logits(f16_gguf(fixture), ids)
    stats = compare_logits(hf_logits_eager(src, ids), ours)
    assert stats.kld_max <= KLD_MAX_F16, stats
    assert stats.top1_agreement == 1.0, stats
    for change in CONTROLS[fixture]:
        off = compare_logits(hf_logits_eager(src, ids, **change), ours)
        assert off.kld_max > 100 * KLD_MAX_F16, (change, off)


@pytest.mark.parametrize("fixture", FAMILIES)
def test_q4_k_m_same_file_as_llama_quantize(request, converted, f16_gguf, tmp_path, fixture):
    """`mt quantize` of the F16 file and `mt convert --outtype q4_k_m` against llama_model_quantize (tied
    token_embd doubles as the output: Q6_K)."""
    ref, ours = tmp_path / "ref.gguf", tmp_path / "mt.gguf"
    llama_quantize(f16_gguf(fixture), ref, parse_file_type("q4_k_m"))
    result = quantize_gguf(f16_gguf(fixture), ours, "q4_k_m")
    assert_same_file(ours, ref)
    assert result.types["token_embd.weight"].name == "Q6_K"
    ref_mix, ours_mix = tmp_path / "ref-mix.gguf", tmp_path / "mt-mix.gguf"
    llama_quantize(converted(fixture, "f32"), ref_mix, parse_file_type("q4_k_m"))
    convert(request.getfixturevalue(fixture), ours_mix, "q4_k_m")
    assert_same_file(ours_mix, ref_mix)


def test_gemma2_without_softcapping_is_refused(gemma2_dir, tmp_path):
    src = Path(shutil.copytree(gemma2_dir, tmp_path / "src"))
    config = json.loads((src / "config.json").read_text())
    config["attn_logit_softcapping"] = None
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out.gguf"
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--outtype", "f16"])
    assert result.exit_code == 1, result.output
    assert "attn_logit_softcapping" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


@pytest.mark.parametrize("fixture, change, needle", [
    ("gemma2_dir", {"layer_types": ["full_attention", "sliding_attention"]}, "attention layers"),
    ("gemma3_dir", {"layer_types": ["sliding_attention"] * 3 + ["full_attention"] * 3}, "attention layers"),
    ("gemma3_dir", {"layer_types": None, "sliding_window_pattern": 3}, "attention layers"),
    ("gemma2_dir", {"query_pre_attn_scalar": 128}, "query_pre_attn_scalar is 128"),
    ("gemma3_dir", {"query_pre_attn_scalar": 256}, "query_pre_attn_scalar is 256"),
])
def test_layout_llama_cpp_cannot_run_is_refused(request, tmp_path, fixture, change, needle):
    """llama.cpp fixes the local/global pattern (Gemma 2: every 2nd layer global, Gemma 3: every 6th) and the
    attention scale (1/sqrt(head_dim) below 27B)."""
    src = Path(shutil.copytree(request.getfixturevalue(fixture), tmp_path / "src"))
    config = {**json.loads((src / "config.json").read_text()), **change}
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out.gguf"
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert needle in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_gemma3_all_global_layers_write_no_sliding_window(gemma3_dir, tmp_path):
    """sliding_window_pattern 1 (every layer global): the converter leaves the window out, and so does mt
    (the vocab-only parity case; Gemma 2 writes its vocabulary through the same code)."""
    src = Path(shutil.copytree(gemma3_dir, tmp_path / "src"))
    config = {**json.loads((src / "config.json").read_text()), "sliding_window_pattern": 1}
    config["layer_types"] = ["full_attention"] * config["num_hidden_layers"]
    (src / "config.json").write_text(json.dumps(config))
    ref, ours = tmp_path / "ref.gguf", tmp_path / "mt.gguf"
    run_converter(src, ref, "f16", ["--vocab-only"])
    convert(src, ours, "f16", vocab_only=True)
    assert_same_file(ours, ref)
    assert "gemma3.attention.sliding_window" not in read_gguf(ours).kv_dict()


@pytest.mark.parametrize("rope_theta, passes", [(10000.0, True), (20000.0, False)])
def test_mt_verify_catches_the_rope_base_llama_cpp_does_not_read(gemma2_dir, tmp_path, rope_theta, passes):
    """The converter writes no rope base for Gemma 2 and llama.cpp then uses 10000: another base in the source is a
    conversion that computes another model, which the reference run shows."""
    from mt.verify.report import Status
    from mt.verify.verify import VerifyOptions, verify

    src = Path(shutil.copytree(gemma2_dir, tmp_path / "src"))
    config = {**json.loads((src / "config.json").read_text()), "rope_theta": rope_theta}
    (src / "config.json").write_text(json.dumps(config))
    out = convert(src, tmp_path / "m.gguf", "f16").output
    report = verify(out, src, VerifyOptions(max_tokens=48, n_ctx=64))
    conversion = next(c for c in report.checks if c.name == "conversion")
    assert (conversion.status is Status.PASS) == passes, report.to_text()
    assert report.passed == passes
