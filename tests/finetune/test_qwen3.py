"""Qwen3 (q_norm/k_norm, head_dim x heads != hidden): a few finetune steps write an adapter that mt merge and
mt convert --adapter take; the merged model (transformers) and the merged GGUF (llama.cpp) compute what the trained
PEFT model does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from mt.cli import main
from mt.finetune.lora import LoraOptions
from mt.finetune.trainer import TrainOptions, finetune
from tests import checkpoints
from tests.finetune.conftest import write_jsonl

TEXT = "The quick brown fox jumps over the lazy dog."


def llama_cpp_logits(gguf: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), logits_all=True, n_ctx=64, n_threads=1, verbose=False,
                          type_k=0, type_v=0)  # f32 KV cache (GGML_TYPE_F32), not the default f16
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()


@pytest.fixture(scope="module")
def qwen3_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """float32 weights: mt convert --adapter keeps each tensor's dtype (a bf16 base's merged weights are rounded
    to bf16, as mt merge's default output would be), so only an f32 base lets the GGUF match the trained model."""
    return checkpoints.build_qwen3(tmp_path_factory.mktemp("qwen3_f32"), dtype=torch.float32)


def test_qwen3_adapter_merges_and_converts(qwen3_f32: Path, tmp_path: Path) -> None:
    qwen3_dir = qwen3_f32
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": TEXT}, {"text": "Pack my box with five dozen liquor jugs."}] * 3)
    out = tmp_path / "adapter"
    result = finetune(TrainOptions(base=qwen3_dir, data=data, output=out, max_steps=3, lr=1e-2, batch_tokens=64,
                                   max_seq_len=64, threads=1, device="cpu", lora=LoraOptions(r=4, alpha=8)))
    assert result.arch == "Qwen3ForCausalLM" and result.losses[-1] < result.losses[0]

    ids = AutoTokenizer.from_pretrained(qwen3_dir)(TEXT)["input_ids"]
    with torch.no_grad():
        trained = result.model(input_ids=torch.tensor([ids])).logits[0].float()
        base = AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32)(input_ids=torch.tensor([ids])).logits[0]
    assert (trained - base).abs().max() > 1e-3  # the adapter moved the logits

    merged = tmp_path / "merged"
    run = CliRunner().invoke(main, ["merge", str(qwen3_dir), str(out), "-o", str(merged), "--dtype", "f32", "--quiet"])
    assert run.exit_code == 0, run.output
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(merged_logits, trained, rtol=0, atol=1e-4)

    gguf = tmp_path / "ft.gguf"
    run = CliRunner().invoke(main, ["convert", str(qwen3_dir), "--adapter", str(out), "-o", str(gguf), "--outtype", "f32",
                                    "--quiet"])
    assert run.exit_code == 0, run.output
    base_gguf = tmp_path / "base.gguf"
    run = CliRunner().invoke(main, ["convert", str(qwen3_dir), "-o", str(base_gguf), "--outtype", "f32", "--quiet"])
    assert run.exit_code == 0, run.output
    np.testing.assert_allclose(llama_cpp_logits(base_gguf, ids), base.numpy(), rtol=0, atol=1e-4)  # the yardstick
    np.testing.assert_allclose(llama_cpp_logits(gguf, ids), trained.numpy(), rtol=0, atol=1e-4)
