"""mt verify on a real trained model (SmolLM2-135M-Instruct): llama.cpp's and mt's correct files pass with no option,
broken ones fail naming the cause, and what only the model decides (its KLD, llama.cpp's tokenizer limits) is
reported, not failed.

A correct Q8_0 of this model diverges more from it (KLD ~0.007) than a file with a layer's norm scaled by 1.01
does from a larger one: no KLD threshold separates "correct" from "broken", the exact checks do.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mt.convert.convert import convert
from mt.quant.quantize import parse_file_type
from mt.verify.report import Status
from mt.verify.verify import Verifier, VerifyOptions
from tests.imatrix_files import write_gguf
from tests.llama_quantize import llama_quantize
from tests.quant.test_quantize_imatrix import model_imatrix, reference
from tests.verify import corrupt
from tests.verify.reports import assert_exact_pass, check

# one of each kind of llama-quantize mix (6-, 4- and 2-bit K, a 4-bit and a 3-bit i-quant); the others are the same
# rules over the same types (tests/quant/ byte-compares every mix)
LLAMA_QUANTIZE = ("Q6_K", "Q4_K_M", "Q2_K", "IQ4_XS", "IQ3_M")


@pytest.fixture(scope="module")
def files(smollm2_dir, tmp_path_factory) -> dict[str, Path]:
    """mt convert's F16/BF16/Q8_0, llama-quantize's K-quant files from that F16, and a Q4_K_M made with an imatrix."""
    work = tmp_path_factory.mktemp("smollm2")
    out = {t.upper(): convert(smollm2_dir, work / f"{t}.gguf", t).output for t in ("f16", "bf16", "q8_0")}
    for name in LLAMA_QUANTIZE:
        out[name] = work / f"{name}.gguf"
        llama_quantize(out["F16"], out[name], parse_file_type(name))
    raw = model_imatrix(out["F16"])
    out["imatrix"] = write_gguf(raw, work / "imatrix.gguf")
    out["Q4_K_M-imatrix"] = work / "Q4_K_M-imatrix.gguf"
    reference(out["F16"], out["Q4_K_M-imatrix"], "q4_k_m", str(out["imatrix"]), raw.expected_gguf_map(), raw, raw.datasets[0])
    complete = model_imatrix(out["F16"], complete=True)  # IQ2_XXS needs weights for every matrix it makes IQ2_XXS
    out["imatrix-complete"] = write_gguf(complete, work / "imatrix-complete.gguf")
    out["IQ2_XXS-imatrix"] = work / "IQ2_XXS-imatrix.gguf"
    reference(out["F16"], out["IQ2_XXS-imatrix"], "iq2_xxs", str(out["imatrix-complete"]), complete.expected_gguf_map(),
              complete, complete.datasets[0])
    return out


@pytest.fixture(scope="module")
def verifier(smollm2_dir):
    with Verifier(smollm2_dir, VerifyOptions()) as v:
        yield v


@pytest.mark.parametrize("name", ["F16", "BF16", "Q8_0", *LLAMA_QUANTIZE])
def test_correct_files_pass_with_no_option(verifier, files, name):
    report = verifier.verify(files[name])
    assert_exact_pass(report)
    assert check(report, "conversion").data["n_tokens"] == 256 and report.reference_conversion["layers"] == 30


def test_quantized_divergence_is_reported_not_judged(verifier, files):
    """The numbers that made the old per-type limits fail correct files are in the report, and the file passes."""
    q8, q4 = verifier.verify(files["Q8_0"]), verifier.verify(files["Q4_K_M"])
    kld_q8, kld_q4 = check(q8, "quality").data["kld_mean"], check(q4, "quality").data["kld_mean"]
    assert 0.0028 < kld_q8 < kld_q4  # above the old Q8_0 limit (2 x Llama-3-8B's), and a Q4_K_M loses more
    assert kld_q4 > 0.062 and q4.passed  # and above the old Q4_K_M limit
    assert check(verifier.verify(files["F16"]), "quality").data["kld_mean"] < 1e-4


def test_llama_cpp_tokenizer_limits_are_warnings_that_name_the_text(verifier, files):
    """llama.cpp splits the Arabic-Indic digits of the corpus' Arabic line otherwise than the HF tokenizer does, on
    mt's file and on the reference alike: a limit of llama.cpp's tokenizer, reported with its likely cause."""
    tokenization = check(verifier.verify(files["F16"]), "tokenization")
    assert tokenization.status is Status.WARN
    limits = tokenization.data["llama_cpp_limits"]
    assert "ar" in limits and not tokenization.data["mismatches"]
    assert any(p.startswith("ar: ") and "non-ASCII digits" in p for p in tokenization.problems)


def test_imatrix_file_checked_with_the_imatrix_and_not_failed_without(smollm2_dir, verifier, files):
    without = verifier.verify(files["Q4_K_M-imatrix"])
    assert without.passed and check(without, "tensors").status is Status.WARN, without.to_text()
    with Verifier(smollm2_dir, VerifyOptions(imatrix=files["imatrix"])) as v:
        assert_exact_pass(v.verify(files["Q4_K_M-imatrix"]))
    with Verifier(smollm2_dir, VerifyOptions(imatrix=files["imatrix-complete"])) as v:
        assert_exact_pass(v.verify(files["IQ2_XXS-imatrix"]))


# edits of llama-quantize's Q4_K_M -> (the check that must fail, a phrase of its problems); the kinds tests/verify/
# test_verify.py shows on a tiny model in the same way (layers swapped, a tensor missing, rms eps, head count, file
# type, eos id) are not repeated here
CORRUPTIONS = {
    "norm x1.01": (dict(tensors=corrupt.scale_tensor("blk.7.attn_norm.weight", 1.01)), "tensors", "blk.7.attn_norm.weight (F32)"),
    "8 bytes of one block": (dict(tensors=corrupt.flip_block("blk.5.ffn_down.weight", 3, 210)), "tensors",
                             "blk.5.ffn_down.weight (Q6_K): block 3 (row 0, values 768..1023)"),
    "rope base": (dict(kv={"llama.rope.freq_base": 10000.0}), "metadata", "llama.rope.freq_base = 10000.0"),
    "tokens swapped": (dict(kv={"tokenizer.ggml.tokens": corrupt.swap_items(1000, 1001)}), "vocabulary", "tokens 1000 is"),
    "template": (dict(kv={"tokenizer.chat_template": lambda t: t.replace("<|im_start|>", "<|im_begin|>")}),
                 "chat template", "tokenizer.chat_template (user)"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_fails_naming_the_cause(verifier, files, tmp_path, name):
    edits, check_name, needle = CORRUPTIONS[name]
    report = verifier.verify(corrupt.rewrite(files["Q4_K_M"], tmp_path / "bad.gguf", **edits))
    assert check_name in {c.name for c in report.failed_checks()}, report.to_text()
    assert any(needle in p for p in check(report, check_name).problems), check(report, check_name).problems
