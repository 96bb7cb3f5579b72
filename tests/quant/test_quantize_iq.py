"""The grid i-quant file types (IQ1_S … IQ3_M) against llama_model_quantize: whole files byte for byte, with the
importance matrix llama.cpp needs for them, and its refusals without one. (On the real model, SmolLM2-135M, the
IQ3_M and IQ2_XXS files llama-quantize writes pass mt verify's exact check: tests/verify/test_real_model.py.)"""

from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T

from mt.cli import main
from mt.convert.convert import convert
from mt.quant.quantize import parse_file_type, quantize_gguf
from tests.gguf_compare import assert_same_file
from tests.imatrix_files import write_gguf
from tests.llama_quantize import llama_quantize
from tests.quant.test_quantize import f32_gguf, gqa4_f32  # noqa: F401  (the same models, as fixtures)
from tests.quant.test_quantize_imatrix import model_imatrix, reference

# every grid type and every rule branch: IQ2_S files differ from IQ2_M only in their base type (IQ2_XS, tested in
# iq2_xs), IQ3_S files from IQ3_M only in rules IQ3_M adds (IQ3_S is tested without an imatrix below)
IQ_MIXES = ["iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_m"]
WITHOUT_IMATRIX = ["iq3_s", "iq3_m"]  # no tensor of these needs importance weights


def same_file_with_imatrix(src: Path, tmp_path: Path, mix: str, seed: int = 0) -> dict[str, T]:
    raw = model_imatrix(src, seed=seed, complete=True)
    path = write_gguf(raw, tmp_path / "imatrix.gguf")
    ref, ours = tmp_path / "ref.gguf", tmp_path / "mt.gguf"
    reference(src, ref, mix, str(path), raw.expected_gguf_map(), raw, raw.datasets[0])
    result = quantize_gguf(src, ours, mix, imatrix=str(path))
    assert_same_file(ours, ref)
    return result.types


@pytest.mark.parametrize("mix", IQ_MIXES)
def test_with_imatrix_same_file_as_llama_quantize(f32_gguf, tmp_path, mix):
    """8 layers of rows 256 and 512: the first-eighth and middle-layer rules, untied output."""
    types = same_file_with_imatrix(f32_gguf, tmp_path, mix)
    assert any(t.name.startswith("IQ") for t in types.values())


@pytest.mark.parametrize("mix", WITHOUT_IMATRIX)
def test_without_imatrix_same_file_as_llama_quantize(f32_gguf, tmp_path, mix):
    ref, ours = tmp_path / "ref.gguf", tmp_path / "mt.gguf"
    llama_quantize(f32_gguf, ref, parse_file_type(mix))
    quantize_gguf(f32_gguf, ours, mix)
    assert_same_file(ours, ref)


@pytest.mark.parametrize("mix", ["iq1_s", "iq2_xs", "iq2_m", "iq3_xxs", "iq3_xs"])
def test_without_imatrix_refused_as_llama_quantize_refuses(f32_gguf, tmp_path, mix):
    with pytest.raises(RuntimeError):
        llama_quantize(f32_gguf, tmp_path / "ref.gguf", parse_file_type(mix))
    out = tmp_path / "q.gguf"
    result = CliRunner().invoke(main, ["quantize", str(f32_gguf), str(out), mix.upper()])
    assert result.exit_code == 1, result.output
    assert "needs an importance matrix" in result.output and "--imatrix" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_an_imatrix_without_a_needed_matrix_is_refused(f32_gguf, tmp_path):
    partial = write_gguf(model_imatrix(f32_gguf), tmp_path / "partial.gguf")  # no entry for blk.1.attn_q.weight
    with pytest.raises(RuntimeError):
        llama_quantize(f32_gguf, tmp_path / "ref.gguf", parse_file_type("iq2_xxs"),
                       imatrix=model_imatrix(f32_gguf).expected_gguf_map())
    out = tmp_path / "q.gguf"
    result = CliRunner().invoke(main, ["quantize", str(f32_gguf), str(out), "IQ2_XXS", "--imatrix", str(partial)])
    assert result.exit_code == 1 and "has no weights for 'blk.1.attn_q.weight'" in result.output
    assert not out.exists()


@pytest.mark.parametrize("mix", ["iq2_xs", "iq3_m", "iq1_m"])
def test_fallback_rows_bf16_and_tied_embeddings(llama3_dir, tmp_path, mix):
    """Rows of 64: every grid type falls back to IQ4_NL; tied embeddings are the output (Q8_0: 64 fits no 256)."""
    bf16 = tmp_path / "bf16.gguf"
    convert(llama3_dir, bf16, "bf16")
    types = same_file_with_imatrix(bf16, tmp_path, mix, seed=5)
    assert types["blk.0.ffn_up.weight"] == T.IQ4_NL


@pytest.mark.parametrize("mix", ["iq2_xxs", "iq3_xxs", "iq3_xs"])
def test_grouped_query_attention_rules(gqa4_f32, tmp_path, mix):
    types = same_file_with_imatrix(gqa4_f32, tmp_path, mix, seed=3)
    assert types["blk.0.attn_v.weight"] == T.Q4_K
