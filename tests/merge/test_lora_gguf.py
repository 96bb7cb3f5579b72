"""mt convert-lora: llama.cpp running base GGUF + the GGUF adapter computes what the merged GGUF computes, the file
is the one convert_lora_to_gguf.py writes, and what a llama.cpp LoRA cannot carry is a one-line error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader

from mt.cli import main
from mt.convert.convert import convert
from mt.merge import lora_gguf
from mt.verify.logits import llama_cpp_logits
from tests import oracle

peft = pytest.importorskip("peft")

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
F32_TOLERANCE = 1e-2  # the acceptance limit for an f32 adapter
EFFECT_FACTOR = 20  # the adapter must move the logits by far more than the tolerance, or the test proves nothing
N_TOKENS = 32


# ---------------------------------------------------------------- builders


def save_adapter(base: Path, out: Path, *, seed: int = 1, std: float = 0.05,
                 edit: Callable[[Any], None] | None = None, **config: Any) -> Path:
    """A real peft adapter on `base`: every LoRA parameter (A and B; peft starts B, or an embedding's A, at zero)
    set to seeded normal values, then `edit(peft_model)`, saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_" in name:
                param.copy_(std * torch.randn(param.shape, generator=gen))
        if edit is not None:
            edit(model)
    model.save_pretrained(out)
    return out


def merged_gguf(base: Path, adapter: Path, work: Path) -> Path:
    """peft's merge_and_unload of `adapter` into `base` (float32), saved, then `mt convert --outtype f32`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
    folder = work / "merged"
    model.merge_and_unload().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if (base / name).is_file():
            shutil.copy(base / name, folder / name)
    return convert(folder, work / "merged.gguf", "f32").output


def token_ids(vocab: int, bos: int | None) -> list[int]:
    ids = np.random.default_rng(7).integers(300, vocab, N_TOKENS).tolist()
    return ([bos] if bos is not None else []) + ids[: N_TOKENS - (bos is not None)]


def assert_logits_match(base_gguf: Path, adapter_gguf: Path, merged: Path, ids: list[int], tolerance: float) -> float:
    """llama.cpp: base + adapter against the merged model; returns max |Δlogit|."""
    with_adapter = llama_cpp_logits(base_gguf, ids, n_ctx=64, lora=adapter_gguf)
    reference = llama_cpp_logits(merged, ids, n_ctx=64)
    effect = float(np.abs(reference - llama_cpp_logits(base_gguf, ids, n_ctx=64)).max())
    assert effect > EFFECT_FACTOR * tolerance, f"the adapter moves the logits by only {effect}"
    error = float(np.abs(with_adapter - reference).max())
    assert error <= tolerance, f"max |Δlogit| {error} (adapter effect {effect})"
    return error


def write_lora(adapter: Path, base: Path, out: Path, outtype: str = "f32") -> Path:
    result = CliRunner().invoke(main, ["convert-lora", str(adapter), "--base", str(base), "-o", str(out),
                                       "--outtype", outtype, "--quiet"])
    assert result.exit_code == 0, result.output
    return out


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def llama_base_gguf(llama2_spm_dir, tmp_path_factory) -> Path:
    return convert(llama2_spm_dir, tmp_path_factory.mktemp("base") / "base-f32.gguf", "f32").output


@pytest.fixture(scope="module")
def llama_ids(llama2_spm_dir) -> list[int]:
    return token_ids(json.loads((llama2_spm_dir / "config.json").read_text())["vocab_size"], bos=1)


@pytest.fixture(scope="module")
def all_linear(llama2_spm_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(adapter, merged GGUF): LoRA on every linear layer, the token embedding and lm_head of the Llama."""
    work = tmp_path_factory.mktemp("all_linear")
    adapter = save_adapter(llama2_spm_dir, work / "adapter", r=8, lora_alpha=16,
                           target_modules=[*LINEAR, "embed_tokens", "lm_head"])
    return adapter, merged_gguf(llama2_spm_dir, adapter, work)


# ---------------------------------------------------------------- llama.cpp logits: base + adapter == merged


def test_llama_all_linear_embedding_lm_head_f32(llama2_spm_dir, llama_base_gguf, llama_ids, all_linear, tmp_path):
    adapter, merged = all_linear
    out = write_lora(adapter, llama2_spm_dir, tmp_path / "lora.gguf")
    assert_logits_match(llama_base_gguf, out, merged, llama_ids, F32_TOLERANCE)


def test_llama_without_qk_permutation_fails(llama2_spm_dir, llama_base_gguf, llama_ids, all_linear, tmp_path, monkeypatch):
    """Control: B's rows left in HF order for attn_q/attn_k puts llama.cpp far off the merged model."""
    adapter, merged = all_linear
    monkeypatch.setattr(lora_gguf, "row_order", lambda *args: None)
    out = write_lora(adapter, llama2_spm_dir, tmp_path / "unpermuted.gguf")
    with pytest.raises(AssertionError, match=r"max \|Δlogit\|"):
        assert_logits_match(llama_base_gguf, out, merged, llama_ids, F32_TOLERANCE)


@pytest.mark.parametrize("outtype, tolerance", [
    # f16 rounds A and B (relative 2^-11); the delta is a fraction of each weight, so the logits move far less
    ("f16", F32_TOLERANCE),
    # q8_0: lora_a in 8-bit blocks (~0.4% of each block's max), and ggml quantizes the activations it multiplies
    # to q8_0 too; lora_b (rows of rank 8) and token_embd.lora_a stay F16 as llama.cpp's converter writes them
    ("q8_0", 5e-2),
])
def test_llama_outtypes(llama2_spm_dir, llama_base_gguf, llama_ids, all_linear, tmp_path, outtype, tolerance):
    adapter, merged = all_linear
    out = write_lora(adapter, llama2_spm_dir, tmp_path / f"lora-{outtype}.gguf", outtype)
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight.lora_a"] == outtype.upper() and types["blk.0.attn_q.weight.lora_b"] == "F16"
    assert_logits_match(llama_base_gguf, out, merged, llama_ids, tolerance)


def test_llama_rslora_alpha_and_rank_patterns(llama2_spm_dir, llama_base_gguf, llama_ids, tmp_path):
    """Scales llama.cpp's alpha / rank cannot express (rsLoRA's alpha / sqrt(r), alpha_pattern) are folded into B;
    rank_pattern needs nothing, llama.cpp reads each pair's rank from lora_b."""
    adapter = save_adapter(llama2_spm_dir, tmp_path / "adapter", r=8, lora_alpha=16, use_rslora=True,
                           alpha_pattern={"v_proj": 48}, rank_pattern={"o_proj": 4}, target_modules=LINEAR)
    out = write_lora(adapter, llama2_spm_dir, tmp_path / "lora.gguf")
    assert_logits_match(llama_base_gguf, out, merged_gguf(llama2_spm_dir, adapter, tmp_path), llama_ids, F32_TOLERANCE)


def test_qwen2_all_linear(qwen2_dir, tmp_path):
    """Qwen2: q/k/v biases in the base, no Q/K permutation, tied embeddings (so no lm_head/embed_tokens LoRA)."""
    adapter = save_adapter(qwen2_dir, tmp_path / "adapter", r=8, lora_alpha=16, target_modules=LINEAR)
    out = write_lora(adapter, qwen2_dir, tmp_path / "lora.gguf")
    base = convert(qwen2_dir, tmp_path / "base.gguf", "f32").output
    ids = token_ids(json.loads((qwen2_dir / "config.json").read_text())["vocab_size"], bos=None)
    assert_logits_match(base, out, merged_gguf(qwen2_dir, adapter, tmp_path), ids, F32_TOLERANCE)


# ---------------------------------------------------------------- the same file as llama.cpp's converter


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_same_bytes_as_convert_lora_to_gguf(llama2_spm_dir, all_linear, tmp_path, outtype):
    adapter, _ = all_linear
    ours = write_lora(adapter, llama2_spm_dir, tmp_path / "mt.gguf", outtype)
    oracle.run_lora_converter(adapter, llama2_spm_dir, tmp_path / "llama.cpp.gguf", outtype)
    assert ours.read_bytes() == (tmp_path / "llama.cpp.gguf").read_bytes()


def test_same_bytes_qwen2_bf16_adapter(qwen2_dir, tmp_path):
    """An adapter stored in bf16 (A and B), to f16: both convert through float32 the same way."""
    def to_bf16(model: Any) -> None:
        model.to(torch.bfloat16)

    adapter = save_adapter(qwen2_dir, tmp_path / "adapter", r=16, lora_alpha=32, target_modules=LINEAR, edit=to_bf16)
    ours = write_lora(adapter, qwen2_dir, tmp_path / "mt.gguf", "f16")
    oracle.run_lora_converter(adapter, qwen2_dir, tmp_path / "llama.cpp.gguf", "f16")
    assert ours.read_bytes() == (tmp_path / "llama.cpp.gguf").read_bytes()


def test_folded_scales_differ_from_llama_cpp_converter_by_peft_ratio(llama2_spm_dir, tmp_path):
    """convert_lora_to_gguf.py ignores rsLoRA and alpha_pattern; mt's file differs from it exactly where peft's scale
    differs from alpha / r: lora_b times (peft's scaling / (alpha / r)), read from peft's own layers."""
    scalings: dict[str, float] = {}

    def record(model: Any) -> None:
        for name, module in model.named_modules():
            if hasattr(module, "scaling") and isinstance(module.scaling, dict) and "default" in module.scaling:
                scalings[name.removeprefix("base_model.model.")] = module.scaling["default"]

    adapter = save_adapter(llama2_spm_dir, tmp_path / "adapter", r=8, lora_alpha=16, use_rslora=True,
                           alpha_pattern={"k_proj": 4}, target_modules=["q_proj", "k_proj", "v_proj"], edit=record)
    ours = GGUFReader(write_lora(adapter, llama2_spm_dir, tmp_path / "mt.gguf"))
    oracle.run_lora_converter(adapter, llama2_spm_dir, tmp_path / "llama.cpp.gguf", "f32")
    theirs = GGUFReader(tmp_path / "llama.cpp.gguf")
    assert [f for f in ours.fields] == [f for f in theirs.fields]
    proj = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj"}
    for mine, other in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.name == other.name
        if mine.name.endswith(".lora_a"):
            assert np.array_equal(mine.data, other.data)
            continue
        layer, kind = mine.name.split(".")[1:3]
        ratio = scalings[f"model.layers.{layer}.self_attn.{proj[kind]}"] / (16 / 8)
        np.testing.assert_allclose(mine.data, other.data * ratio, rtol=1e-6)


# ---------------------------------------------------------------- what llama.cpp does with a tied base


def _llama_cpp_run(base_gguf: Path, adapter_gguf: Path) -> subprocess.CompletedProcess:
    """Load and run base + adapter in a child process (llama.cpp may abort); verbose, so its log lands in stderr."""
    code = ("import sys, llama_cpp\n"
            "m = llama_cpp.Llama(sys.argv[1], lora_path=sys.argv[2], logits_all=True, n_ctx=32, verbose=True)\n"
            "m.eval([1, 2, 3])\nprint('ran')\n")
    return subprocess.run([sys.executable, "-c", code, str(base_gguf), str(adapter_gguf)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "GGML_NO_BACKTRACE": "1"})


@pytest.fixture(scope="module")
def qwen2_base_gguf(qwen2_dir, tmp_path_factory) -> Path:
    return convert(qwen2_dir, tmp_path_factory.mktemp("qwen2") / "base.gguf", "f32").output


def test_llama_cpp_cannot_apply_embedding_or_lm_head_lora_on_tied_base(qwen2_dir, qwen2_base_gguf, tmp_path):
    """Why mt refuses these: with tied embeddings llama.cpp multiplies the output by token_embd.weight and applies
    token_embd's LoRA there too (ggml_mul_mat asserts on the embedding layout and aborts the process), and it has
    no output.weight for an lm_head LoRA (llama_adapter_lora_init fails; llama-cpp-python 0.3.36 misses the NULL it
    returns and crashes on it). Files from llama.cpp's own converter."""
    embed = save_adapter(qwen2_dir, tmp_path / "embed", r=8, lora_alpha=16, target_modules=["q_proj", "embed_tokens"])
    oracle.run_lora_converter(embed, qwen2_dir, tmp_path / "embed.gguf", "f32")
    run = _llama_cpp_run(qwen2_base_gguf, tmp_path / "embed.gguf")
    assert run.returncode != 0 and "ran" not in run.stdout and "GGML_ASSERT" in run.stderr, run.stderr[-2000:]

    head = save_adapter(qwen2_dir, tmp_path / "head", r=8, lora_alpha=16, target_modules=["q_proj", "lm_head"])
    oracle.run_lora_converter(head, qwen2_dir, tmp_path / "head.gguf", "f32")
    run = _llama_cpp_run(qwen2_base_gguf, tmp_path / "head.gguf")
    assert "ran" not in run.stdout and "output.weight' does not exist in base model" in run.stderr, run.stderr[-2000:]


# ---------------------------------------------------------------- bad inputs: one line, exit 1, no file


def run_cli(adapter: Path, base: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["convert-lora", str(adapter), "--base", str(base), "-o", str(out), "--quiet", *extra])


def assert_clean_failure(result, out: Path, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mt: error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if "mt-partial" in p.name]


def test_tied_base_embedding_lora_refused(qwen2_dir, tmp_path):
    adapter = save_adapter(qwen2_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    out = tmp_path / "out" / "lora.gguf"
    out.parent.mkdir()
    assert_clean_failure(run_cli(adapter, qwen2_dir, out), out, "model.embed_tokens", "ties its output", "mt merge")


def test_tied_base_lm_head_lora_refused(qwen2_dir, tmp_path):
    adapter = save_adapter(qwen2_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    out = tmp_path / "out" / "lora.gguf"
    out.parent.mkdir()
    assert_clean_failure(run_cli(adapter, qwen2_dir, out), out, "lm_head", "no output tensor", "mt convert BASE --adapter")


def test_dora_refused(llama2_spm_dir, tmp_path):
    adapter = save_adapter(llama2_spm_dir, tmp_path / "adapter", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    assert_clean_failure(run_cli(adapter, llama2_spm_dir, tmp_path / "o.gguf"), tmp_path / "o.gguf", "DoRA", "mt merge")


def test_lora_bias_refused(llama2_spm_dir, tmp_path):
    adapter = save_adapter(llama2_spm_dir, tmp_path / "adapter", r=4, lora_alpha=8, lora_bias=True, target_modules=["v_proj"])
    assert_clean_failure(run_cli(adapter, llama2_spm_dir, tmp_path / "o.gguf"), tmp_path / "o.gguf", "lora_bias", "v_proj")


def test_trained_modules_to_save_refused(llama2_spm_dir, tmp_path):
    def train_head(model: Any) -> None:
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.01)

    adapter = save_adapter(llama2_spm_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"],
                           modules_to_save=["lm_head"], edit=train_head)
    assert_clean_failure(run_cli(adapter, llama2_spm_dir, tmp_path / "o.gguf"), tmp_path / "o.gguf",
                         "lm_head", "modules_to_save", "differs")


def test_untrained_modules_to_save_and_saved_base_layers_accepted(llama2_spm_dir, tmp_path):
    """peft saves the embedding's base layer beside an embedding LoRA, and modules_to_save copies; equal to the
    base's own tensors they carry nothing and are left out, as llama.cpp's converter leaves base layers out."""
    adapter = save_adapter(llama2_spm_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"],
                           modules_to_save=["lm_head"])
    out = write_lora(adapter, llama2_spm_dir, tmp_path / "o.gguf")
    assert [t.name for t in GGUFReader(out).tensors][:2] == ["token_embd.weight.lora_a", "token_embd.weight.lora_b"]


def test_saved_base_layer_that_differs_refused(llama2_spm_dir, tmp_path):
    """An embedding LoRA trained on a different embedding than the base's (peft saved that base layer)."""
    def other_base(model: Any) -> None:
        model.base_model.model.model.embed_tokens.base_layer.weight.mul_(1.5)

    adapter = save_adapter(llama2_spm_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["embed_tokens"],
                           edit=other_base)
    assert_clean_failure(run_cli(adapter, llama2_spm_dir, tmp_path / "o.gguf"), tmp_path / "o.gguf",
                         "model.embed_tokens", "differs from the base")


def _hand_adapter(folder: Path, tensors: dict[str, np.ndarray], **config: Any) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir()
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **config}))
    return folder


def _pair(module: str, out_dim: int, in_dim: int) -> dict[str, np.ndarray]:
    prefix = f"base_model.model.{module}"
    return {f"{prefix}.lora_A.weight": np.ones((4, in_dim)), f"{prefix}.lora_B.weight": np.ones((out_dim, 4))}


def test_shape_mismatch_refused(llama2_spm_dir, tmp_path):
    adapter = _hand_adapter(tmp_path / "adapter", _pair("model.layers.0.self_attn.q_proj", 96, 64))
    assert_clean_failure(run_cli(adapter, llama2_spm_dir, tmp_path / "o.gguf"), tmp_path / "o.gguf",
                         "model.layers.0.self_attn.q_proj.weight", "[96, 64]", "[64, 64]")


def test_missing_target_module_refused(llama2_spm_dir, tmp_path):
    adapter = _hand_adapter(tmp_path / "adapter", _pair("model.layers.7.self_attn.q_proj", 64, 64))
    assert_clean_failure(run_cli(adapter, llama2_spm_dir, tmp_path / "o.gguf"), tmp_path / "o.gguf",
                         "model.layers.7.self_attn.q_proj", "does not have")


def test_resized_vocabulary_refused(llama2_spm_dir, tmp_path):
    """Added tokens: embed_tokens and lm_head saved whole with 32001 rows; the base GGUF has 32000."""
    resized = {f"base_model.model.{m}.weight": np.zeros((32001, 64))  # how peft saves modules_to_save
               for m in ("model.embed_tokens", "lm_head")}
    adapter = _hand_adapter(tmp_path / "adapter", {**_pair("model.layers.0.self_attn.q_proj", 64, 64), **resized})
    assert_clean_failure(run_cli(adapter, llama2_spm_dir, tmp_path / "o.gguf"), tmp_path / "o.gguf",
                         "[32001, 64]", "resized vocabulary", "mt merge")


def test_other_architecture_refused(llama2_spm_dir, tmp_path):
    adapter = _hand_adapter(tmp_path / "adapter", _pair("model.layers.0.self_attn.q_proj", 64, 64),
                            auto_mapping={"base_model_class": "Qwen2ForCausalLM"})
    assert_clean_failure(run_cli(adapter, llama2_spm_dir, tmp_path / "o.gguf"), tmp_path / "o.gguf",
                         "Qwen2ForCausalLM", "LlamaForCausalLM")


def test_alora_invocation_string_without_tokens_refused(llama2_spm_dir, tmp_path):
    adapter = _hand_adapter(tmp_path / "adapter", _pair("model.layers.0.self_attn.q_proj", 64, 64),
                            invocation_string="<|assistant|>")
    assert_clean_failure(run_cli(adapter, llama2_spm_dir, tmp_path / "o.gguf"), tmp_path / "o.gguf",
                         "invocation_string", "alora_invocation_tokens")


def test_alora_invocation_tokens_written(llama2_spm_dir, tmp_path):
    adapter = _hand_adapter(tmp_path / "adapter", _pair("model.layers.0.self_attn.q_proj", 64, 64),
                            alora_invocation_tokens=[5, 77, 1234])
    reader = GGUFReader(write_lora(adapter, llama2_spm_dir, tmp_path / "o.gguf"))
    assert reader.fields["adapter.alora.invocation_tokens"].contents() == [5, 77, 1234]


def test_existing_output_needs_force(llama2_spm_dir, tmp_path):
    adapter = _hand_adapter(tmp_path / "adapter", _pair("model.layers.0.self_attn.q_proj", 64, 64))
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep")
    result = run_cli(adapter, llama2_spm_dir, out)
    assert result.exit_code == 1 and result.output.strip().startswith("mt: error: ") and "--force" in result.output
    assert out.read_bytes() == b"keep"
    assert run_cli(adapter, llama2_spm_dir, out, "--force").exit_code == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_missing_adapter_refused(llama2_spm_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_failure(run_cli(tmp_path / "empty", llama2_spm_dir, tmp_path / "o.gguf"), tmp_path / "o.gguf",
                         "adapter_config.json")
