"""Mixtures of experts (Qwen3-MoE, Mixtral): experts stored one by one become llama.cpp's stacked tensors; the
converter's bytes, llama-quantize's Q4_K_M (with its rules for 8 experts), logits in llama.cpp against
transformers, and the layouts llama.cpp cannot run refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mt.cli import main
from mt.convert.arch.experts import StackedExperts
from mt.convert.convert import convert
from mt.quant.quantize import parse_file_type
from mt.verify.logits import compare_logits, hf_logits, llama_cpp_logits
from tests.convert.test_families_dense import edited_copy
from tests.convert.test_families_qwen3_phi3 import assert_same_top1_where_decided, prompt_ids
from tests.gguf_compare import assert_same_file, read_gguf
from tests.llama_quantize import llama_quantize
from tests.oracle import run_converter


@pytest.mark.parametrize("fixture, outtype", [("qwen3_moe_dir", "bf16"), ("mixtral_dir", "q8_0")])
def test_same_file_as_llama_cpp_converter(request, tmp_path, fixture, outtype):
    src = request.getfixturevalue(fixture)
    convert(src, tmp_path / "mt.gguf", outtype)
    run_converter(src, tmp_path / "ref.gguf", outtype)
    assert_same_file(tmp_path / "mt.gguf", tmp_path / "ref.gguf")
    tensors = {name: (kind, shape) for name, kind, shape, _ in read_gguf(tmp_path / "mt.gguf").tensors}
    assert tensors["blk.1.ffn_gate_inp.weight"][0] == "F32"  # the router stays F32 at every out type
    assert len(tensors["blk.1.ffn_down_exps.weight"][1]) == 3


def test_q4_k_m_same_file_as_llama_quantize(mixtral_dir, tmp_path):
    """Straight from the checkpoint to llama-quantize's Q4_K_M of the converter's BF16 file: the expert stacks
    take its per-layer rules, and with 8 experts attn_v and attn_k take more bits."""
    run_converter(mixtral_dir, tmp_path / "bf16.gguf", "bf16")
    llama_quantize(tmp_path / "bf16.gguf", tmp_path / "ref.gguf", parse_file_type("q4_k_m"))
    convert(mixtral_dir, tmp_path / "mt.gguf", "q4_k_m")
    assert_same_file(tmp_path / "mt.gguf", tmp_path / "ref.gguf")
    types = {name: kind for name, kind, _, _ in read_gguf(tmp_path / "ref.gguf").tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "Q4_K" and types["blk.0.attn_k.weight"] != "Q4_K", types


# the router setting each test switches off in the reference: its logits must then move far away
ROUTER_CONTROL = {"qwen3_moe_dir": {"norm_topk_prob": False}, "mixtral_dir": {"num_experts_per_tok": 1}}


@pytest.mark.parametrize("fixture", ["qwen3_moe_dir", "mixtral_dir"])
def test_f32_logits_match_transformers(request, tmp_path, fixture):
    src = request.getfixturevalue(fixture)
    convert(src, tmp_path / "m.gguf", "f32")
    ids = prompt_ids(src, 48)
    ref, ours = hf_logits(src, ids), llama_cpp_logits(tmp_path / "m.gguf", ids)
    stats = compare_logits(ref, ours)
    assert stats.kld_max <= 1e-5, stats
    assert_same_top1_where_decided(ref, ours)
    other = hf_logits(edited_copy(src, tmp_path / "other", **ROUTER_CONTROL[fixture]), ids)
    assert compare_logits(other, ours).kld_max > 1000 * max(stats.kld_max, 1e-8)


class CountingTensor:
    """A stored expert matrix that counts its reads."""

    def __init__(self, value: float) -> None:
        self.name, self.dtype, self.shape, self.nbytes, self.reads = f"e{value}", "F32", (2, 3), 24, 0
        self.value = value

    def read_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        self.reads += 1
        return np.full((2, 3), self.value, np.float32)[start:stop]

    def read(self) -> np.ndarray:
        return self.read_rows()


def test_a_stack_reads_only_the_experts_asked_for():
    parts = tuple(CountingTensor(i) for i in range(4))
    stack = StackedExperts("s", parts)
    assert stack.shape == (4, 2, 3) and stack.nbytes == 96
    rows = stack.read_rows(1, 3)
    assert rows.shape == (2, 2, 3) and rows[:, 0, 0].tolist() == [1.0, 2.0]
    assert [p.reads for p in parts] == [0, 1, 1, 0]


def run_convert(src: Path, out: Path) -> list[str]:
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(out)])
    assert result.exit_code != 0
    assert not out.exists() and not list(out.parent.glob(f"{out.name}*"))
    return [line for line in result.output.splitlines() if line.strip()]


@pytest.mark.parametrize("change, needle", [
    ({"mlp_only_layers": [1]}, "mlp_only_layers [1]"),
    ({"norm_topk_prob": False}, "norm_topk_prob is false"),
])
def test_qwen3_moe_layouts_llama_cpp_cannot_run_are_one_line(qwen3_moe_dir, tmp_path, change, needle):
    lines = run_convert(edited_copy(qwen3_moe_dir, tmp_path / "src", **change), tmp_path / "m.gguf")
    assert len(lines) == 1 and needle in lines[0], lines


def test_a_missing_expert_is_one_line(mixtral_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for file in mixtral_dir.iterdir():
        if file.name != "model.safetensors":
            (src / file.name).symlink_to(file)
    tensors = load_file(mixtral_dir / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    lines = run_convert(src, tmp_path / "m.gguf")
    assert len(lines) == 1 and "layer 1 lacks 1 expert matrices (first: w3.5)" in lines[0], lines


def test_experts_beyond_config_count_are_one_line(mixtral_dir, tmp_path):
    src = edited_copy(mixtral_dir, tmp_path / "src", num_local_experts=4)
    lines = run_convert(src, tmp_path / "m.gguf")
    assert len(lines) == 1 and "is expert 4, but config.json has 4 experts" in lines[0], lines


def test_inspect_shows_the_experts_and_their_stacks(mixtral_dir):
    result = CliRunner().invoke(main, ["inspect", str(mixtral_dir)])
    assert result.exit_code == 0, result.output
    assert "num_local_experts = 8" in result.output and "num_experts_per_tok = 2" in result.output
    assert "blk.*.ffn_gate_exps.weight x2" in result.output and "blk.*.ffn_gate_inp.weight x2" in result.output


def test_an_unsupported_architecture_lists_the_families(mixtral_dir, tmp_path):
    src = edited_copy(mixtral_dir, tmp_path / "src", architectures=["DbrxForCausalLM"])
    lines = run_convert(src, tmp_path / "m.gguf")
    assert len(lines) == 1 and "'DbrxForCausalLM' is not supported" in lines[0]
    for family in ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "SmolLM3ForCausalLM", "Olmo2ForCausalLM",
                   "GraniteForCausalLM"):
        assert family in lines[0], lines[0]
