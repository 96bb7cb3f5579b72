"""mt verify on tiny models: correct files (mt's and llama-quantize's, any options) pass with no option, and each
corruption fails the check that names it."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType

from mt.convert.convert import convert
from mt.quant.quantize import quantize_gguf
from mt.verify.report import Status
from mt.verify.verify import Verifier, VerifyOptions, verify
from tests import imatrix_files
from tests.llama_quantize import llama_quantize
from tests.verify import corrupt
from tests.verify.reports import assert_exact_pass as assert_exact, check, failed

FAST = VerifyOptions(max_tokens=160, n_ctx=256)


def assert_exact_pass(report) -> None:
    assert_exact(report, also=("tokenization",))  # the tiny models' tokenizers have no corner llama.cpp misses


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


@pytest.fixture(scope="module")
def verifier_of(request):
    """fixture name -> one Verifier of that source (the reference conversion and logits made once)."""
    made: dict[str, Verifier] = {}

    def get(fixture: str, options: VerifyOptions = FAST) -> Verifier:
        key = f"{fixture}:{options}"
        if key not in made:
            made[key] = Verifier(request.getfixturevalue(fixture), options)
        return made[key]

    yield get
    for v in made.values():
        v.close()


@pytest.mark.parametrize("fixture, outtype", [("llama2_spm_dir", "f16"), ("llama2_spm_dir", "bf16"),
                                              ("llama2_spm_dir", "q8_0"), ("llama2_spm_dir", "q4_k_m"),
                                              ("llama3_dir", "q4_k_m"), ("qwen2_dir", "f16"), ("qwen3_dir", "q4_k_m"),
                                              ("phi3_dir", "q8_0"), ("gemma2_dir", "f16"), ("gemma3_dir", "q4_k_m")])
def test_mt_files_pass(verifier_of, gguf_of, fixture, outtype):
    report = verifier_of(fixture).verify(gguf_of(fixture, outtype))
    assert_exact_pass(report)
    assert report.file_type == outtype.upper()
    assert check(report, "quality").data["n_tokens"] == FAST.max_tokens
    assert set(report.peak_rss_mib) == {"checks", "llama.cpp", "transformers"}


@pytest.fixture(scope="module")
def llama_quantized(llama2_256_dir, tmp_path_factory):
    """llama-quantize's files from a F16 conversion of the BF16 source, with its options."""
    work = tmp_path_factory.mktemp("llama_quantize")
    f16 = convert(llama2_256_dir, work / "f16.gguf", "f16").output
    files = {}
    for name, ftype, options in [("Q8_0", LlamaFileType.MOSTLY_Q8_0, {}), ("Q6_K", LlamaFileType.MOSTLY_Q6_K, {}),
                                 ("Q5_K_M", LlamaFileType.MOSTLY_Q5_K_M, {}), ("Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, {}),
                                 ("Q4_K_S", LlamaFileType.MOSTLY_Q4_K_S, {}),
                                 ("Q4_K_M-pure", LlamaFileType.MOSTLY_Q4_K_M, {"pure": True}),
                                 ("Q4_K_M-q8-output", LlamaFileType.MOSTLY_Q4_K_M,
                                  {"output_tensor_type": int(T.Q8_0), "token_embedding_type": int(T.Q5_K)})]:
        files[name] = work / f"{name}.gguf"
        llama_quantize(f16, files[name], ftype, **options)
    return files


@pytest.mark.parametrize("name", ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q4_K_M-pure", "Q4_K_M-q8-output"])
def test_llama_quantize_files_pass(verifier_of, llama_quantized, name):
    report = verifier_of("llama2_256_dir").verify(llama_quantized[name])
    assert_exact_pass(report)
    assert report.file_type == name.split("-")[0]


def test_f32_source_quantized_from_an_f16_intermediate(llama3_f32_untied_dir, tmp_path):
    """llama-quantize read F16 values: every quantized tensor is reproduced from the source rounded to F16."""
    f16 = convert(llama3_f32_untied_dir, tmp_path / "f16.gguf", "f16").output
    llama_quantize(f16, tmp_path / "q8.gguf", LlamaFileType.MOSTLY_Q8_0)
    report = verify(tmp_path / "q8.gguf", llama3_f32_untied_dir, FAST)
    assert_exact_pass(report)
    made_from = check(report, "tensors").data["intermediates"]
    assert made_from.get("F16", 0) > 0, made_from


@pytest.fixture(scope="module")
def imatrix_file(llama2_256_dir, gguf_of, tmp_path_factory) -> tuple[Path, Path]:
    """(imatrix.gguf, the Q4_K_M mt quantize made with it)."""
    from mt.io.gguf_in import read_header

    f16 = gguf_of("llama2_256_dir", "f16")
    shapes = {t.name: (1, t.shape[0]) for t in read_header(f16).tensors if len(t.shape) == 2}
    work = tmp_path_factory.mktemp("imatrix")
    path = imatrix_files.write_gguf(imatrix_files.random_imatrix(shapes), work / "imatrix.gguf")
    return path, quantize_gguf(f16, work / "q4km-imatrix.gguf", "q4_k_m", imatrix=path).output


def test_imatrix_file_is_checked_exactly_with_imatrix_and_not_failed_without(llama2_256_dir, verifier_of, imatrix_file):
    path, quantized = imatrix_file
    without = verifier_of("llama2_256_dir").verify(quantized)
    assert without.passed, without.to_text()
    tensors = check(without, "tensors")
    assert tensors.status is Status.WARN and "--imatrix" in tensors.summary and tensors.data["uncheckable"]
    with_it = verifier_of("llama2_256_dir", VerifyOptions(max_tokens=160, n_ctx=256, imatrix=path)).verify(quantized)
    assert_exact_pass(with_it)
    assert check(with_it, "tensors").data["checked"] == check(with_it, "tensors").data["tensors"]


def _corrupt(src: Path, tmp_path: Path, **edits) -> Path:
    return corrupt.rewrite(src, tmp_path / "corrupt.gguf", **edits)


CORRUPTIONS = {  # name -> (edits of the Q4_K_M file, the check that must fail, a phrase its problems must hold)
    "layers swapped": (dict(tensors=corrupt.swap_layers(0, 1)), "tensors", "blk.0.attn_k.weight (Q4_K): block 0"),
    "norm x1.01": (dict(tensors=corrupt.scale_tensor("blk.1.attn_norm.weight", 1.01)), "tensors",
                   "blk.1.attn_norm.weight (F32): block 0"),
    "one block": (dict(tensors=corrupt.flip_block("blk.2.ffn_down.weight", 7, 144)), "tensors",
                  "blk.2.ffn_down.weight (Q4_K): block 7 (row 3, values 256..511)"),
    "tensor missing": (dict(tensors=corrupt.drop_tensor("blk.1.ffn_up.weight")), "tensors", "blk.1.ffn_up.weight is missing"),
    "rope base": (dict(kv={"llama.rope.freq_base": 500000.0}), "metadata", "llama.rope.freq_base = 500000.0"),
    "rms eps": (dict(kv={"llama.attention.layer_norm_rms_epsilon": 1e-2}), "metadata", "llama.attention.layer_norm_rms_epsilon"),
    "head count": (dict(kv={"llama.attention.head_count": 8}), "metadata", "llama.attention.head_count = 8"),
    "file type": (dict(kv={"general.file_type": int(LlamaFileType.MOSTLY_Q5_K_M)}), "metadata",
                  "general.file_type says Q5_K_M"),
    "token type": (dict(kv={"tokenizer.ggml.token_type": lambda types: [3 if i == 500 else t for i, t in enumerate(types)]}),
                   "vocabulary", "token_type 500 is 3 (control) in the file, 1 (normal)"),
    "eos id": (dict(kv={"tokenizer.ggml.eos_token_id": 0}), "vocabulary", "tokenizer.ggml.eos_token_id = 0"),
    "template missing": (dict(kv={"tokenizer.chat_template": corrupt.DROP}), "chat template", "tokenizer.chat_template is missing"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_fails_naming_the_cause(verifier_of, gguf_of, tmp_path, name):
    edits, check_name, needle = CORRUPTIONS[name]
    bad = _corrupt(gguf_of("llama2_256_dir", "q4_k_m"), tmp_path, **edits)
    report = verifier_of("llama2_256_dir").verify(bad)
    assert check_name in failed(report), report.to_text()
    problems = check(report, check_name).problems
    assert any(needle in p for p in problems), problems


def test_swapped_token_strings_fail_vocabulary_and_tokenization(llama2_spm_dir, verifier_of, gguf_of, tmp_path):
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(llama2_spm_dir / "tokenizer.model"))
    a, b = sp.piece_to_id("▁the"), sp.piece_to_id("▁over")
    bad = _corrupt(gguf_of("llama2_spm_dir", "f16"), tmp_path, kv={"tokenizer.ggml.tokens": corrupt.swap_items(a, b)})
    report = verifier_of("llama2_spm_dir").verify(bad)
    assert {"vocabulary", "tokenization"} <= failed(report), report.to_text()
    assert f"tokens {a} is '▁over' in the file, '▁the' in mt's conversion of the source" in check(report, "vocabulary").problems
    mismatch = check(report, "tokenization").data["mismatches"]["en"]
    assert a in mismatch["reference"] and b in mismatch["llama_cpp"]


def test_a_file_llama_cpp_would_abort_on_is_failed_not_loaded(verifier_of, gguf_of, tmp_path):
    """A token string twice trips an assertion in llama.cpp's vocabulary loader, which aborts the whole process:
    verify must find it in the header and never hand the file to llama.cpp."""
    bad = _corrupt(gguf_of("llama2_spm_dir", "f16"), tmp_path,
                   kv={"tokenizer.ggml.tokens": lambda tokens: [tokens[400] if i == 401 else t for i, t in enumerate(tokens)]})
    report = verifier_of("llama2_spm_dir").verify(bad)
    assert {"vocabulary", "tokenization", "quality"} <= failed(report), report.to_text()
    assert "appears twice in tokenizer.ggml.tokens" in check(report, "quality").summary


def test_wrong_bos_fails_vocabulary_and_tokenization(verifier_of, gguf_of, tmp_path):
    bad = _corrupt(gguf_of("llama2_spm_dir", "f16"), tmp_path, kv={"tokenizer.ggml.bos_token_id": 2})
    report = verifier_of("llama2_spm_dir").verify(bad)
    assert failed(report) == {"vocabulary", "tokenization"}, report.to_text()
    assert "tokenizer.ggml.bos_token_id = 2, mt's conversion of the source has 1" in check(report, "vocabulary").problems


def test_different_chat_template_fails(verifier_of, gguf_of, tmp_path):
    from tests.oracle import template

    chatml = template("Qwen-Qwen2.5-7B-Instruct")
    bad = _corrupt(gguf_of("llama2_spm_dir", "f16"), tmp_path, kv={"tokenizer.chat_template": chatml})
    report = verifier_of("llama2_spm_dir").verify(bad)
    assert failed(report) == {"chat template"}, report.to_text()
    renders = check(report, "chat template").data["renders"]["tokenizer.chat_template: user"]
    assert renders["gguf"].startswith("<|im_start|>") and renders["source"].startswith("<s>[INST]")


def test_reformatted_template_that_renders_the_same_passes(verifier_of, gguf_of, tmp_path):
    bad = _corrupt(gguf_of("llama2_spm_dir", "f16"), tmp_path, kv={"tokenizer.chat_template": lambda t: t + "{# a comment #}"})
    report = verifier_of("llama2_spm_dir").verify(bad)
    assert report.passed and check(report, "chat template").data["same_text"] is False


def test_renamed_model_passes_with_a_note(verifier_of, gguf_of, tmp_path):
    """general.* (name, licence …) is not what llama.cpp computes with: a difference is a warning."""
    bad = _corrupt(gguf_of("llama2_spm_dir", "f16"), tmp_path, kv={"general.name": "Something Else"})
    report = verifier_of("llama2_spm_dir").verify(bad)
    assert report.passed and check(report, "metadata").status is Status.WARN
    assert any("general.name = 'Something Else'" in p for p in check(report, "metadata").problems)


def test_wrong_llama3_rope_factors_fail_tensors(verifier_of, gguf_of, tmp_path):
    bad = _corrupt(gguf_of("llama3_dir", "q4_k_m"), tmp_path, tensors=corrupt.scale_tensor("rope_freqs.weight", 1.5))
    report = verifier_of("llama3_dir").verify(bad)
    assert "tensors" in failed(report), report.to_text()
    assert any(p.startswith("rope_freqs.weight (F32): block") for p in check(report, "tensors").problems)


def test_quality_bars_are_what_the_user_asks(verifier_of, gguf_of):
    strict = VerifyOptions(max_tokens=64, n_ctx=128, max_kld=1e-6, min_top1=1.0)
    report = verifier_of("llama2_spm_dir", strict).verify(gguf_of("llama2_spm_dir", "q4_k_m"))
    assert failed(report) == {"quality"}, report.to_text()
    problems = check(report, "quality").problems
    assert any(p.startswith("mean KLD") and "--max-kld 1e-06" in p for p in problems)
    assert report.quality_bars == {"max_kld": 1e-6, "min_top1": 1.0}
    loose = VerifyOptions(max_tokens=64, n_ctx=128, max_kld=1.0, min_top1=0.0)
    assert check(verifier_of("llama2_spm_dir", loose).verify(gguf_of("llama2_spm_dir", "q4_k_m")), "quality").status is Status.PASS


def test_user_text_is_tokenized_and_run(llama2_spm_dir, gguf_of):
    text = "Zażółć gęślą jaźń — 素早い茶色の狐 🦙 " * 4
    report = verify(gguf_of("llama2_spm_dir", "f16"), llama2_spm_dir, VerifyOptions(text=text, max_tokens=1000, n_ctx=512))
    assert report.passed
    assert check(report, "tokenization").data["texts"] == 16
    from mt.verify.reference import open_reference
    from mt.verify.tokens import reference_tokenizer

    assert check(report, "quality").data["n_tokens"] == len(reference_tokenizer(open_reference(llama2_spm_dir))(text))


def test_shallow_reference_runs_the_first_layers(verifier_of, gguf_of):
    options = VerifyOptions(max_tokens=96, n_ctx=128, reference_layers=3)
    report = verifier_of("llama2_256_dir", options).verify(gguf_of("llama2_256_dir", "q4_k_m"))
    assert_exact_pass(report)
    assert report.reference_conversion["layers"] == 3 and report.reference_conversion["of_layers"] == 8
    assert "the first 3 of 8 layers" in check(report, "conversion").summary


def test_adapter_merged_gguf(llama2_spm_dir, tmp_path):
    """A GGUF of base+LoRA passes against base --adapter; against the base alone its tensors differ."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama2_spm_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    merged = tmp_path / "merged"
    model.merge_and_unload().to(torch.bfloat16).save_pretrained(merged)
    for f in llama2_spm_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, merged / f.name)
    convert(llama2_spm_dir, tmp_path / "merged.gguf", "q8_0", adapter=tmp_path / "adapter")
    options = VerifyOptions(max_tokens=96, n_ctx=128)
    assert_exact_pass(verify(tmp_path / "merged.gguf", llama2_spm_dir, VerifyOptions(max_tokens=96, n_ctx=128, adapter=tmp_path / "adapter")))
    alone = verify(tmp_path / "merged.gguf", llama2_spm_dir, options)
    assert "tensors" in failed(alone), alone.to_text()
    assert all("attn_q" in p or "attn_v" in p for p in check(alone, "tensors").problems)


def test_gguf_llama_cpp_cannot_load_fails(llama2_spm_dir, verifier_of, gguf_of, tmp_path):
    bad = _corrupt(gguf_of("llama2_spm_dir", "f16"), tmp_path, tensors=corrupt.drop_tensor("blk.1.ffn_down.weight"))
    report = verifier_of("llama2_spm_dir").verify(bad)
    assert {"tensors", "quality"} <= failed(report), report.to_text()
    assert "llama.cpp cannot run the GGUF" in check(report, "quality").summary


NEVER_ENDS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def test_a_template_that_never_ends_is_reported_not_waited_for(verifier_of, gguf_of, tmp_path, monkeypatch):
    from mt.io import chat_template

    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.3)
    bad = _corrupt(gguf_of("llama2_spm_dir", "f16"), tmp_path, kv={"tokenizer.chat_template": NEVER_ENDS})
    report = verifier_of("llama2_spm_dir").verify(bad)
    assert failed(report) == {"chat template"}, report.to_text()
    assert "rendering the file's template did not end (over 0.3 s)" in check(report, "chat template").summary


def test_templates_failing_on_both_sides_prove_nothing(llama2_spm_dir, gguf_of, tmp_path):
    import json
    import shutil

    src = Path(shutil.copytree(llama2_spm_dir, tmp_path / "src"))
    tconfig = json.loads((src / "tokenizer_config.json").read_text())
    tconfig["chat_template"] = "{{ raise_exception('this model has no chat format') }}"
    (src / "tokenizer_config.json").write_text(json.dumps(tconfig))
    out = tmp_path / "m.gguf"
    convert(src, out, "f16")
    bad = _corrupt(out, tmp_path, kv={"tokenizer.chat_template": lambda t: t + "{# reworded #}"})
    with Verifier(src, FAST) as verifier:
        result = check(verifier.verify(bad), "chat template")
    assert result.status is Status.WARN and "fails on both sides" in result.summary
