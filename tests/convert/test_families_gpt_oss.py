"""gpt-oss: released checkpoints' MXFP4 experts carried into the file as llama.cpp's MXFP4 blocks, float experts
transposed and split as the converter does; the converter's bytes, the experts' values against transformers' own
dequantization, logits in llama.cpp against transformers, and the layouts llama.cpp cannot run refused.

llama.cpp rounds yarn's correction range, which gpt-oss's config (truncate: false) asks transformers not to: the
logits tests compare on a copy with truncate: true, and one test measures what the real setting costs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mt.cli import main
from mt.convert.convert import convert
from mt.quant.quantize import parse_file_type
from mt.verify.logits import compare_logits, hf_logits, llama_cpp_logits
from tests.convert.test_families_dense import assert_converter_bytes, edited_copy, linked_copy
from tests.convert.test_families_moe import run_convert
from tests.convert.test_families_qwen3_phi3 import assert_same_top1_where_decided, prompt_ids
from tests.gguf_compare import assert_same_file, read_gguf
from tests.llama_quantize import llama_quantize
from tests.oracle import run_converter


@pytest.mark.parametrize("fixture, outtype", [("gpt_oss_dir", "bf16"), ("gpt_oss_mxfp4_dir", "bf16")])
def test_same_file_as_llama_cpp_converter(request, tmp_path, fixture, outtype):
    ours = assert_converter_bytes(request.getfixturevalue(fixture), tmp_path, outtype)
    if fixture == "gpt_oss_mxfp4_dir":  # carried at every out type, written first; a float file says MXFP4_MOE
        tensors = read_gguf(ours).tensors
        assert [kind for _, kind, _, _ in tensors[:6]] == ["MXFP4"] * 6, tensors[:6]


def test_mxfp4_experts_are_the_values_transformers_dequantizes(gpt_oss_mxfp4_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    convert(gpt_oss_mxfp4_dir, tmp_path / "m.gguf", "bf16")
    stored = {name: (shape, data) for name, _, shape, data in read_gguf(tmp_path / "m.gguf").tensors}
    model = AutoModelForCausalLM.from_pretrained(gpt_oss_mxfp4_dir, dtype=torch.float32)
    params = dict(model.named_parameters())
    for layer in (0, 1):
        gate_up = params[f"model.layers.{layer}.mlp.experts.gate_up_proj"].detach().transpose(-1, -2).numpy()
        down = params[f"model.layers.{layer}.mlp.experts.down_proj"].detach().transpose(-1, -2).numpy()
        for part, want in (("gate", gate_up[:, 0::2]), ("up", gate_up[:, 1::2]), ("down", down)):
            shape, data = stored[f"blk.{layer}.ffn_{part}_exps.weight"]
            raw = np.frombuffer(data, np.uint8).reshape(shape[2], shape[1], -1)
            got = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.MXFP4)
            assert np.array_equal(got, want), (layer, part)


def truncated_yarn(src: Path, dest: Path, **changes: object) -> Path:
    rope = json.loads((src / "config.json").read_text())["rope_scaling"]
    return edited_copy(src, dest, rope_scaling={**rope, "truncate": True}, **changes)


def test_f32_logits_match_transformers(gpt_oss_dir, tmp_path):
    """Top-2 routing, sinks, a 16-token window on layer 0 over 48 tokens; the window shown to matter."""
    src = truncated_yarn(gpt_oss_dir, tmp_path / "src")
    convert(src, tmp_path / "m.gguf", "f32")
    ids = prompt_ids(src, 48)
    ref, ours = hf_logits(src, ids), llama_cpp_logits(tmp_path / "m.gguf", ids)
    stats = compare_logits(ref, ours)
    assert stats.kld_max <= 1e-5, stats
    assert_same_top1_where_decided(ref, ours)
    no_window = hf_logits(truncated_yarn(gpt_oss_dir, tmp_path / "full", layer_types=["full_attention"] * 2), ids)
    assert compare_logits(no_window, ours).kld_max > 100 * max(stats.kld_max, 1e-8)


def test_untruncated_yarn_is_warned_and_costs_little(gpt_oss_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        convert(gpt_oss_dir, tmp_path / "m.gguf", "f32")
    assert sum("truncate: false" in r.getMessage() for r in caplog.records) == 1
    ids = prompt_ids(gpt_oss_dir, 48)
    stats = compare_logits(hf_logits(gpt_oss_dir, ids), llama_cpp_logits(tmp_path / "m.gguf", ids))
    assert 1e-7 < stats.kld_mean < 1e-3, stats


def test_mxfp4_logits_match_transformers(gpt_oss_mxfp4_dir, tmp_path):
    """llama.cpp multiplies MXFP4 by activations rounded to Q8_0, so the bar is a quantized file's; every expert
    is chosen here, so that this rounding cannot flip a near tie of the router."""
    src = truncated_yarn(gpt_oss_mxfp4_dir, tmp_path / "src", num_experts_per_tok=4)
    convert(src, tmp_path / "m.gguf", "f32")
    ids = prompt_ids(src, 48)
    stats = compare_logits(hf_logits(src, ids), llama_cpp_logits(tmp_path / "m.gguf", ids))
    assert stats.kld_max <= 1e-4, stats


def test_mxfp4_moe_mix_same_file_as_llama_quantize(gpt_oss_mxfp4_dir, tmp_path):
    """The experts stay as the checkpoint gave them, everything else Q8_0."""
    run_converter(gpt_oss_mxfp4_dir, tmp_path / "f32.gguf", "f32")
    llama_quantize(tmp_path / "f32.gguf", tmp_path / "ref.gguf", parse_file_type("mxfp4_moe"))
    convert(gpt_oss_mxfp4_dir, tmp_path / "mt.gguf", "mxfp4_moe")
    assert_same_file(tmp_path / "mt.gguf", tmp_path / "ref.gguf")


@pytest.mark.parametrize("change, needle", [
    ({"swiglu_limit": 5.0}, "swiglu_limit is 5.0"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "attention layers"),
])
def test_layouts_llama_cpp_cannot_run_are_one_line(gpt_oss_dir, tmp_path, change, needle):
    lines = run_convert(edited_copy(gpt_oss_dir, tmp_path / "src", **change), tmp_path / "m.gguf")
    assert len(lines) == 1 and needle in lines[0], lines


def test_a_mix_that_would_requantize_the_mxfp4_experts_is_one_line(gpt_oss_mxfp4_dir, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(gpt_oss_mxfp4_dir), "-o", str(tmp_path / "m.gguf"),
                                       "--outtype", "q4_k_m"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1 and "is MXFP4 in the checkpoint" in lines[0], lines
    assert "mxfp4_moe" in lines[0] and not list(tmp_path.glob("m.gguf*"))


@pytest.mark.parametrize("dropped, needle", [
    ("model.layers.1.mlp.experts.down_proj_scales", "down_proj_blocks has no model.layers.1.mlp.experts.down_proj_scales"),
    ("model.layers.1.mlp.experts.gate_up_proj_blocks", "gate_up_proj_scales has no model.layers.1.mlp.experts.gate_up_proj_blocks"),
])
def test_half_of_an_mxfp4_pair_missing_is_one_line(gpt_oss_mxfp4_dir, tmp_path, dropped, needle):
    from safetensors.torch import load_file, save_file

    src = linked_copy(gpt_oss_mxfp4_dir, tmp_path / "src", ("model.safetensors",))
    tensors = load_file(gpt_oss_mxfp4_dir / "model.safetensors")
    del tensors[dropped]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    lines = run_convert(src, tmp_path / "m.gguf")
    assert len(lines) == 1 and needle in lines[0], lines


def test_verify_passes_a_q8_0_of_the_mxfp4_checkpoint(gpt_oss_mxfp4_dir, tmp_path):
    """The carried MXFP4 experts checked byte for byte against the checkpoint's blocks; the reference conversion
    keeps them too (labelled MXFP4_MOE) and transformers dequantizes them. Every expert is chosen: with two of four,
    the Q8_0 rounding of the MXFP4 matmuls' activations flips near ties of this random router (a token's KLD up to
    0.13), which the conversion limit rightly counts."""
    from mt.verify.verify import VerifyOptions, verify

    src = edited_copy(gpt_oss_mxfp4_dir, tmp_path / "src", num_experts_per_tok=4)
    convert(src, tmp_path / "m.gguf", "q8_0")
    report = verify(tmp_path / "m.gguf", src, VerifyOptions(max_tokens=160, n_ctx=256))
    statuses = {c.name: c.status.name for c in report.checks}
    assert report.passed and statuses["tensors"] == statuses["conversion"] == statuses["metadata"] == "PASS", statuses
    assert report.reference_conversion["file_type"] == "MXFP4_MOE"
