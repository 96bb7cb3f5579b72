"""mt quantize against llama.cpp's llama_model_quantize: the whole output file, byte for byte."""

from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T

from mt.cli import main
from mt.convert.convert import convert
from mt.quant.quantize import parse_file_type, quantize_gguf
from tests.gguf_compare import assert_same_file, read_gguf
from tests.llama_quantize import llama_quantize

K_MIXES = ["q4_k_m", "q5_k_m", "q4_k_s", "q5_k_s", "q6_k", "q8_0"]


@pytest.fixture(scope="module")
def f32_gguf(llama2_256_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("f32") / "m-f32.gguf"
    convert(llama2_256_dir, out, "f32")
    return out


LOW_MIXES = ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0"]  # q2_k_s needs an imatrix: tests/quant/test_quantize_imatrix.py


@pytest.mark.parametrize("mix", K_MIXES + LOW_MIXES + ["q4_0", "q4_1", "q5_0", "q5_1"])
def test_same_file_as_llama_quantize(f32_gguf, tmp_path, mix):
    ref, ours = tmp_path / "ref.gguf", tmp_path / "mt.gguf"
    llama_quantize(f32_gguf, ref, parse_file_type(mix))
    quantize_gguf(f32_gguf, ours, mix)
    assert_same_file(ours, ref)


@pytest.mark.parametrize("mix", ["q4_k_m", "q5_k_s", "q6_k", "q4_1", "q2_k", "q3_k_m", "iq4_xs", "tq1_0"])
def test_fallback_rows_and_tied_embeddings(llama3_dir, tmp_path, mix):
    """Rows of 64 (no K-quant fits: Q5_0/Q5_1/Q8_0 fallbacks), BF16 source, tied token_embd -> output type."""
    bf16 = tmp_path / "bf16.gguf"
    convert(llama3_dir, bf16, "bf16")
    ref, ours = tmp_path / "ref.gguf", tmp_path / "mt.gguf"
    llama_quantize(bf16, ref, parse_file_type(mix))
    quantize_gguf(bf16, ours, mix)
    assert_same_file(ours, ref)


def test_types_chosen_for_q4_k_m(f32_gguf, tmp_path):
    out = tmp_path / "q.gguf"
    result = quantize_gguf(f32_gguf, out, "q4_k_m")
    types = {n: t.name for n, t in result.types.items()}
    # 8 layers: use_more_bits is true for layers 0, 3, 6, 7 (i < 1, i >= 7, (i - 1) % 3 == 2)
    more_bits = ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(8)] == more_bits
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(8)] == more_bits
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.3.ffn_gate.weight"] == "Q4_K"


def test_cli_quantize_and_bad_inputs(f32_gguf, tmp_path):
    out = tmp_path / "q.gguf"
    result = CliRunner().invoke(main, ["quantize", str(f32_gguf), str(out), "Q8_0"])
    assert result.exit_code == 0, result.output
    assert read_gguf(out).kv_dict()["general.file_type"] == 7
    again = CliRunner().invoke(main, ["quantize", str(f32_gguf), str(out), "Q8_0"])
    assert again.exit_code == 1 and "--force" in again.output
    unknown = CliRunner().invoke(main, ["quantize", str(f32_gguf), str(tmp_path / "x.gguf"), "Q3_ZZ"])
    assert unknown.exit_code == 1 and "Q4_K_M" in unknown.output
    requant = CliRunner().invoke(main, ["quantize", str(out), str(tmp_path / "y.gguf"), "Q4_K_M"])
    assert requant.exit_code == 1 and "re-quantize" in requant.output
    assert not (tmp_path / "y.gguf").exists()


def test_unknown_backend_is_one_line_and_leaves_no_output(f32_gguf, tmp_path):
    out = tmp_path / "q.gguf"
    result = CliRunner().invoke(main, ["quantize", str(f32_gguf), str(out), "Q4_K_M"], env={"MT_QUANT_BACKEND": "fortran"})
    assert result.exit_code == 1 and "MT_QUANT_BACKEND='fortran' is not a quantization backend" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_nan_weight_is_named(llama2_spm_dir, tmp_path):
    import numpy as np

    from mt.io.gguf_in import read_header

    f32 = tmp_path / "f32.gguf"
    convert(llama2_spm_dir, f32, "f32")
    info = next(t for t in read_header(f32).tensors if t.name == "blk.1.ffn_up.weight")
    data = bytearray(f32.read_bytes())
    data[info.offset : info.offset + 4] = np.float32("nan").tobytes()
    f32.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["quantize", str(f32), str(tmp_path / "q.gguf"), "Q8_0"])
    assert result.exit_code == 1 and "blk.1.ffn_up.weight" in result.output and "NaN" in result.output
    assert not (tmp_path / "q.gguf").exists()


@pytest.mark.parametrize("fixture, mix", [("llama2_256_dir", "q4_k_m"), ("llama2_256_dir", "q5_k_s"), ("llama3_dir", "q4_k_m"),
                                          ("qwen2_dir", "q6_k"), ("llama2_256_dir", "q3_k_m"), ("llama3_dir", "q2_k")])
def test_convert_straight_to_mix_equals_converter_then_llama_quantize(request, tmp_path, fixture, mix):
    from tests.oracle import run_converter

    src = request.getfixturevalue(fixture)
    f32, ref, ours = tmp_path / "f32.gguf", tmp_path / "ref.gguf", tmp_path / "mt.gguf"
    run_converter(src, f32, "f32")
    llama_quantize(f32, ref, parse_file_type(mix))
    convert(src, ours, mix)
    assert_same_file(ours, ref)


@pytest.mark.parametrize("pure, output_type, embd_type", [(True, None, None), (False, "Q8_0", "Q6_K")])
def test_pure_and_type_overrides_match_llama_quantize(f32_gguf, tmp_path, pure, output_type, embd_type):
    from gguf import GGMLQuantizationType as T

    from mt.quant.mix import MixOptions

    out_t = T[output_type] if output_type else None
    embd_t = T[embd_type] if embd_type else None
    ref, ours = tmp_path / "ref.gguf", tmp_path / "mt.gguf"
    llama_quantize(f32_gguf, ref, parse_file_type("q4_k_m"), pure=pure,
                   output_tensor_type=int(out_t) if out_t else None, token_embedding_type=int(embd_t) if embd_t else None)
    quantize_gguf(f32_gguf, ours, "q4_k_m", options=MixOptions(pure=pure, output_tensor_type=out_t, token_embedding_type=embd_t))
    assert_same_file(ours, ref)


@pytest.fixture(scope="module")
def gqa4_f32(tmp_path_factory) -> Path:
    """8 heads sharing 2 KV heads: llama.cpp's n_gqa() is 4, which gives Q2_K files Q4_K attn_v."""
    from tests.checkpoints import build_llama2_spm

    root = tmp_path_factory.mktemp("gqa4")
    src = build_llama2_spm(root / "hf", hidden_size=256, intermediate_size=512, n_layers=4, num_attention_heads=8,
                           num_key_value_heads=2)
    convert(src, root / "m-f32.gguf", "f32")
    return root / "m-f32.gguf"


@pytest.mark.parametrize("mix", ["q2_k", "q3_k_m", "iq4_xs"])
def test_grouped_query_attention_rules(gqa4_f32, tmp_path, mix):
    ref, ours = tmp_path / "ref.gguf", tmp_path / "mt.gguf"
    llama_quantize(gqa4_f32, ref, parse_file_type(mix))
    result = quantize_gguf(gqa4_f32, ours, mix)
    assert_same_file(ours, ref)
    if mix == "q2_k":
        assert result.types["blk.0.attn_v.weight"] == T.Q4_K and result.types["blk.0.ffn_down.weight"] == T.Q3_K
    if mix == "iq4_xs":
        assert result.types["blk.0.attn_v.weight"] == T.Q5_K


@pytest.fixture(scope="module")
def smollm2_f16(smollm2_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2q") / "smollm2-f16.gguf"
    convert(smollm2_dir, out, "f16")
    return out


@pytest.mark.parametrize("mix", ["q3_k_m", "q2_k", "iq4_xs"])
def test_real_model_same_file_as_llama_quantize(smollm2_f16, tmp_path, mix):
    """SmolLM2-135M: rows of 576 (no 256-block fits: the Q4_0 fallbacks), tied embeddings, real weights."""
    ref, ours = tmp_path / "ref.gguf", tmp_path / "mt.gguf"
    llama_quantize(smollm2_f16, ref, parse_file_type(mix))
    quantize_gguf(smollm2_f16, ours, mix)
    assert_same_file(ours, ref)
