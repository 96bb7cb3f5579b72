"""mt verify passes correct F16/Q8_0/Q4_K_M files and fails each corruption, naming the check that caught it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mt.convert.convert import convert
from mt.verify.report import Status
from mt.verify.verify import VerifyOptions, verify
from tests.verify import corrupt

FAST = VerifyOptions(max_tokens=160, n_ctx=256)


@pytest.fixture(scope="module")
def gguf_of(request, tmp_path_factory):
    """(fixture name, outtype) -> GGUF written by mt convert, made once per module."""
    made: dict[tuple[str, str], Path] = {}

    def get(fixture: str, outtype: str) -> Path:
        if (fixture, outtype) not in made:
            out = tmp_path_factory.mktemp("verify") / f"{fixture}-{outtype}.gguf"
            convert(request.getfixturevalue(fixture), out, outtype)
            made[fixture, outtype] = out
        return made[fixture, outtype]

    return get


def failed(report) -> set[str]:
    return {c.name for c in report.failed_checks()}


def check(report, name: str):
    return next(c for c in report.checks if c.name == name)


@pytest.mark.parametrize("fixture, outtype", [("llama2_spm_dir", "f16"), ("llama2_spm_dir", "q8_0"),
                                              ("llama2_spm_dir", "q4_k_m"), ("llama3_dir", "q4_k_m"), ("qwen2_dir", "f16")])
def test_correct_files_pass(request, gguf_of, fixture, outtype):
    report = verify(gguf_of(fixture, outtype), request.getfixturevalue(fixture), FAST)
    assert report.passed, report.to_text()
    statuses = {c.name: c.status for c in report.checks}
    for name in ("metadata", "vocabulary", "tokenization", "logits", "chat template"):
        assert statuses[name] is Status.PASS, report.to_text()
    assert report.file_type == outtype.upper()
    logits = check(report, "logits").data
    assert logits["n_tokens"] == FAST.max_tokens and logits["kld_mean"] < report.thresholds["kld_mean"]
    assert set(report.peak_rss_mib) == {"llama.cpp", "transformers"}


def _corrupt(src: Path, tmp_path: Path, **edits) -> Path:
    return corrupt.rewrite(src, tmp_path / "corrupt.gguf", **edits)


@pytest.mark.parametrize("outtype", ["f16", "q4_k_m"])
def test_swapped_layers_fail_logits(llama2_spm_dir, gguf_of, tmp_path, outtype):
    bad = _corrupt(gguf_of("llama2_spm_dir", outtype), tmp_path, tensors=corrupt.swap_layers(0, 1))
    report = verify(bad, llama2_spm_dir, FAST)
    assert failed(report) == {"logits"}, report.to_text()
    assert "mean KLD" in check(report, "logits").summary


def test_scaled_norm_fails_logits(llama2_spm_dir, gguf_of, tmp_path):
    bad = _corrupt(gguf_of("llama2_spm_dir", "q4_k_m"), tmp_path, tensors=corrupt.scale_tensor("blk.1.attn_norm.weight", 2.0))
    report = verify(bad, llama2_spm_dir, FAST)
    assert failed(report) == {"logits"}, report.to_text()


# A 10x smaller epsilon barely moves the logits of a model whose activations are far from 0 (KLD ~3e-7):
# only the metadata check can catch it, which is why that check compares the exact float32 value.
@pytest.mark.parametrize("key, value, needle, caught_by", [
    ("llama.rope.freq_base", 500000.0, "llama.rope.freq_base = 500000.0, source config says 10000.0", {"metadata", "logits"}),
    ("llama.attention.layer_norm_rms_epsilon", 1e-6, "llama.attention.layer_norm_rms_epsilon = 9.99", {"metadata"}),
])
def test_wrong_hparam_fails_metadata(llama2_spm_dir, gguf_of, tmp_path, key, value, needle, caught_by):
    bad = _corrupt(gguf_of("llama2_spm_dir", "f16"), tmp_path, kv={key: value})
    report = verify(bad, llama2_spm_dir, FAST)
    assert failed(report) == caught_by, report.to_text()
    assert any(needle in p for p in check(report, "metadata").problems), check(report, "metadata").problems


def test_swapped_token_strings_fail_vocabulary_and_tokenization(llama2_spm_dir, gguf_of, tmp_path):
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(llama2_spm_dir / "tokenizer.model"))
    a, b = sp.piece_to_id("▁the"), sp.piece_to_id("▁over")
    bad = _corrupt(gguf_of("llama2_spm_dir", "f16"), tmp_path, kv={"tokenizer.ggml.tokens": corrupt.swap_items(a, b)})
    report = verify(bad, llama2_spm_dir, FAST)
    assert {"vocabulary", "tokenization"} <= failed(report), report.to_text()
    problems = check(report, "vocabulary").problems
    assert f"token {a} is '▁over' in the GGUF, '▁the' in the source" in problems
    mismatch = check(report, "tokenization").data["mismatches"]["en"]
    assert a in mismatch["reference"] and b in mismatch["llama_cpp"]


def test_wrong_bos_fails_vocabulary_and_template(llama2_spm_dir, gguf_of, tmp_path):
    bad = _corrupt(gguf_of("llama2_spm_dir", "f16"), tmp_path, kv={"tokenizer.ggml.bos_token_id": 2})
    report = verify(bad, llama2_spm_dir, FAST)
    assert {"vocabulary", "tokenization", "chat template"} <= failed(report), report.to_text()
    assert "bos id is 2 ('</s>'), source has 1 ('<s>')" in check(report, "vocabulary").problems


def test_missing_chat_template_fails(llama2_spm_dir, gguf_of, tmp_path):
    bad = _corrupt(gguf_of("llama2_spm_dir", "f16"), tmp_path, kv={"tokenizer.chat_template": corrupt.DROP})
    report = verify(bad, llama2_spm_dir, FAST)
    assert failed(report) == {"chat template"}, report.to_text()
    assert "no chat template" in check(report, "chat template").summary


def test_different_chat_template_fails(llama2_spm_dir, gguf_of, tmp_path):
    from tests.oracle import template

    chatml = template("Qwen-Qwen2.5-7B-Instruct")
    bad = _corrupt(gguf_of("llama2_spm_dir", "f16"), tmp_path, kv={"tokenizer.chat_template": chatml})
    report = verify(bad, llama2_spm_dir, FAST)
    assert failed(report) == {"chat template"}, report.to_text()
    renders = check(report, "chat template").data["renders"]["user"]
    assert renders["gguf"].startswith("<|im_start|>") and renders["source"].startswith("<s>[INST]")


def test_reformatted_template_that_renders_the_same_passes(llama2_spm_dir, gguf_of, tmp_path):
    bad = _corrupt(gguf_of("llama2_spm_dir", "f16"), tmp_path, kv={"tokenizer.chat_template": lambda t: t + "{# a comment #}"})
    report = verify(bad, llama2_spm_dir, FAST)
    assert report.passed and check(report, "chat template").data["same_text"] is False


def test_threshold_override_fails_a_correct_q4_k_m(llama2_spm_dir, gguf_of):
    report = verify(gguf_of("llama2_spm_dir", "q4_k_m"), llama2_spm_dir,
                    VerifyOptions(max_tokens=64, n_ctx=128, threshold_kld=1e-6))
    assert failed(report) == {"logits"} and report.thresholds["source"] == "--threshold-kld"


def test_user_text_is_tokenized_and_run(llama2_spm_dir, gguf_of):
    text = "Zażółć gęślą jaźń — 素早い茶色の狐 🦙 " * 4
    report = verify(gguf_of("llama2_spm_dir", "f16"), llama2_spm_dir, VerifyOptions(text=text, max_tokens=1000, n_ctx=512))
    assert report.passed
    assert check(report, "tokenization").data["texts"] == 16
    from mt.verify.tokens import reference_tokenizer
    from mt.verify.reference import open_reference

    assert check(report, "logits").data["n_tokens"] == len(reference_tokenizer(open_reference(llama2_spm_dir))(text))


def test_adapter_merged_gguf(llama2_spm_dir, tmp_path):
    """A GGUF of base+LoRA passes against base --adapter, and fails against the base alone."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    pytest.importorskip("peft")  # not in the test extras yet (installed here); --adapter needs it
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama2_spm_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    merged = tmp_path / "merged"
    model.merge_and_unload().save_pretrained(merged)
    for f in llama2_spm_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, merged / f.name)
    convert(merged, tmp_path / "merged.gguf", "f16")
    options = VerifyOptions(max_tokens=96, n_ctx=128)
    assert verify(tmp_path / "merged.gguf", llama2_spm_dir, VerifyOptions(max_tokens=96, n_ctx=128, adapter=tmp_path / "adapter")).passed
    assert failed(verify(tmp_path / "merged.gguf", llama2_spm_dir, options)) == {"logits"}


def test_wrong_llama3_rope_factors_fail_metadata(llama3_dir, gguf_of, tmp_path):
    """rope_freqs (llama3 rope scaling) is compared with transformers' own inv_freq for the source config."""
    bad = _corrupt(gguf_of("llama3_dir", "q4_k_m"), tmp_path, tensors=corrupt.scale_tensor("rope_freqs.weight", 2.0))
    report = verify(bad, llama3_dir, FAST)
    assert "metadata" in failed(report), report.to_text()
    assert any("rope_freqs differs" in p for p in check(report, "metadata").problems)


def test_gguf_llama_cpp_cannot_load_fails_logits(llama2_spm_dir, gguf_of, tmp_path):
    bad = _corrupt(gguf_of("llama2_spm_dir", "f16"), tmp_path, tensors=corrupt.drop_tensor("blk.1.ffn_down.weight"))
    report = verify(bad, llama2_spm_dir, FAST)
    assert failed(report) == {"logits"}, report.to_text()
    assert "llama.cpp cannot run the GGUF" in check(report, "logits").summary
