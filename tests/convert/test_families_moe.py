"""Mixtures of experts (Qwen3-MoE, Mixtral): experts stored one by one become llama.cpp's stacked tensors; the
converter's bytes, llama-quantize's Q4_K_M (with its rules for 8 experts), logits in llama.cpp against
transformers, and the layouts llama.cpp cannot run refused in one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mt.cli import main
from mt.convert.arch.experts import StackedExperts
from mt.convert.convert import convert
from mt.merge.merge import merge
from mt.quant.quantize import parse_file_type
from tests.checkpoints import build_mixtral
from tests.convert.test_families_dense import assert_converter_bytes, assert_f32_logits_match, edited_copy
from tests.gguf_compare import assert_same_file, read_gguf
from tests.llama_quantize import llama_quantize
from tests.merge import adapters
from tests.merge.test_merge import max_relative_error, read_folder
from tests.oracle import run_converter


@pytest.mark.parametrize("fixture, outtype", [("qwen3_moe_dir", "bf16"), ("mixtral_dir", "q8_0")])
def test_same_file_as_llama_cpp_converter(request, tmp_path, fixture, outtype):
    ours = assert_converter_bytes(request.getfixturevalue(fixture), tmp_path, outtype)
    tensors = {name: (kind, shape) for name, kind, shape, _ in read_gguf(ours).tensors}
    assert tensors["blk.1.ffn_gate_inp.weight"][0] == "F32"  # the router stays F32 at every out type
    assert len(tensors["blk.1.ffn_down_exps.weight"][1]) == 3


@pytest.fixture(scope="module")
def mixtral_converter_bf16(mixtral_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixtral-ref") / "bf16.gguf"
    run_converter(mixtral_dir, out, "bf16")
    return out


@pytest.mark.parametrize("mix", ["q4_k_m", "mxfp4_moe"])
def test_mix_same_file_as_llama_quantize(mixtral_dir, mixtral_converter_bf16, tmp_path, mix):
    """Straight from the checkpoint to llama-quantize's mix of the converter's BF16 file. Q4_K_M: the expert stacks
    take its per-layer rules, and with 8 experts attn_v and attn_k take Q8_0; MXFP4_MOE: the stacks MXFP4, every
    other matrix Q8_0."""
    llama_quantize(mixtral_converter_bf16, tmp_path / "ref.gguf", parse_file_type(mix))
    convert(mixtral_dir, tmp_path / "mt.gguf", mix)
    assert_same_file(tmp_path / "mt.gguf", tmp_path / "ref.gguf")
    types = {name: kind for name, kind, _, _ in read_gguf(tmp_path / "ref.gguf").tensors}
    expected = {"q4_k_m": ("Q4_K", "Q8_0"), "mxfp4_moe": ("MXFP4", "Q8_0")}[mix]
    assert (types["blk.0.ffn_gate_exps.weight"], types["blk.0.attn_k.weight"]) == expected, types


# the router setting each test switches off in the reference: its logits must then move far away
ROUTER_CONTROL = {"qwen3_moe_dir": {"norm_topk_prob": False}, "mixtral_dir": {"num_experts_per_tok": 1}}


@pytest.mark.parametrize("fixture", ["qwen3_moe_dir", "mixtral_dir"])
def test_f32_logits_match_transformers(request, tmp_path, fixture):
    assert_f32_logits_match(request.getfixturevalue(fixture), tmp_path, ROUTER_CONTROL[fixture])


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
    """mt convert's output lines on a source it refuses (exit 1, nothing written)."""
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(out)])
    assert result.exit_code == 1
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


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.mark.parametrize("fixture", ["qwen3_moe_dir", "mixtral_dir", "gpt_oss_dir"])
def test_attention_lora_merges_as_peft(request, tmp_path, fixture):
    """LoRA on the attention of a mixture of experts: mt merge within 1e-6 relative of peft's merge_and_unload (the
    experts pass through, stored one by one as they came)."""
    base = request.getfixturevalue(fixture)
    adapter = adapters.build_adapter(base, tmp_path / "adapter", adapters.AdapterSpec(target_modules=ATTENTION))
    merge(base, adapter, tmp_path / "out", dtype="f32")
    got = read_folder(tmp_path / "out")
    want = adapters.unaliased(adapters.peft_merged_model(base, adapter).state_dict())
    stored = read_folder(base)
    assert {k for k in got if "self_attn" in k} <= set(want)
    for key, tensor in got.items():
        if key in want:
            assert max_relative_error(tensor, want[key]) <= 1e-6, key
        else:  # transformers 5 renames or stacks the MoE tensors; mt keeps the checkpoint's own, untouched
            assert "self_attn" not in key and torch.equal(tensor, stored[key].float()), key


def test_lora_on_the_expert_parameters_is_one_line(qwen3_moe_dir, tmp_path):
    """transformers 5 holds experts as 3-D parameters, which peft reaches only with target_parameters: refused
    in one line (and by convert --adapter), nothing written."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qwen3_moe_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"])
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    for args in (["merge", str(qwen3_moe_dir), str(tmp_path / "adapter"), "-o", str(tmp_path / "merged")],
                 ["convert", str(qwen3_moe_dir), "--adapter", str(tmp_path / "adapter"), "-o", str(tmp_path / "m.gguf")]):
        result = CliRunner().invoke(main, args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code != 0 and len(lines) == 1 and "target_parameters" in lines[0], (args[0], lines)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "m.gguf").exists()


def test_verify_passes_a_mixtral_q4_k_m(tmp_path):
    """verify's transformers reference reads the experts stored one by one as transformers 5 stacks them (gate and
    up rows together); every check, the exact tensor check and the judged conversion among them, passes. The source
    is F32, so the reference is too: at BF16, llama.cpp's rounded activations flip this random router's near ties
    (KLD mean 0.02 over 160 tokens), which verify's BF16 limit rightly calls a divergence."""
    from mt.verify.verify import VerifyOptions, verify

    src = build_mixtral(tmp_path / "src", dtype=torch.float32)
    convert(src, tmp_path / "m.gguf", "q4_k_m")
    report = verify(tmp_path / "m.gguf", src, VerifyOptions(max_tokens=160, n_ctx=256))
    statuses = {c.name: c.status.name for c in report.checks}
    assert report.passed and statuses["tensors"] == statuses["conversion"] == "PASS", statuses
