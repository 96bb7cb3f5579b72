"""The trainer: PEFT output that peft and mt merge load, exact resume, QLoRA on the CPU, the schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from mt.cli import main
from mt.finetune.lora import LoraOptions
from mt.finetune.trainer import OPTIMIZER_NAME, STATE_NAME, TrainOptions, finetune, lr_at
from tests.finetune.conftest import write_jsonl

PROMPT_IDS = torch.tensor([[128000, 48, 25, 6864, 315, 9822, 30, 362, 25]])  # "Q: capital of France? A:"


def options(base: Path, data: Path, out: Path, **kw) -> TrainOptions:
    defaults = dict(max_steps=3, batch_tokens=48, max_seq_len=48, lr=1e-2, threads=1,
                    lora=LoraOptions(r=4, alpha=8, target="q,v,down"))
    return TrainOptions(base=base, data=data, output=out, **{**defaults, **kw})


def logits(model, ids: torch.Tensor = PROMPT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def test_adapter_round_trips_through_peft_and_mt_merge(tiny_llama3: Path, capitals_data: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    out = tmp_path / "adapter"
    result = finetune(options(tiny_llama3, capitals_data, out))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", STATE_NAME, OPTIMIZER_NAME])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    tensors = adapter_tensors(out)
    assert len(tensors) == 2 * 3 * 2  # A and B of 3 modules in 2 layers
    assert all(t.abs().max() > 0 for name, t in tensors.items() if "lora_B" in name)  # trained away from peft's zeros

    trained = logits(result.model)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama3, dtype=torch.float32)
    assert (logits(base) - trained).abs().max() > 1e-3
    reloaded = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(logits(reloaded), trained, rtol=0, atol=1e-5)

    merged_dir = tmp_path / "merged"
    run = CliRunner().invoke(main, ["merge", str(tiny_llama3), str(out), "-o", str(merged_dir), "--quiet"])
    assert run.exit_code == 0, run.output
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    torch.testing.assert_close(logits(merged), trained, rtol=0, atol=1e-4)


def losses(log: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in log.read_text().splitlines()]


def test_resume_continues_exactly(tiny_llama3: Path, capitals_data: Path, tmp_path: Path) -> None:
    common = dict(schedule="constant", warmup_steps=0)
    straight = finetune(options(tiny_llama3, capitals_data, tmp_path / "straight", max_steps=6,
                                json_log=tmp_path / "straight.jsonl", **common))
    finetune(options(tiny_llama3, capitals_data, tmp_path / "half", max_steps=3, **common))
    resumed = finetune(options(tiny_llama3, capitals_data, tmp_path / "resumed", max_steps=6, resume=tmp_path / "half",
                               json_log=tmp_path / "resumed.jsonl", **common))
    assert resumed.steps == 3 and json.loads((tmp_path / "resumed" / STATE_NAME).read_text())["step"] == 6
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed.jsonl").read_text().splitlines()]
    assert steps == [4, 5, 6]
    assert losses(tmp_path / "resumed.jsonl") == pytest.approx(losses(tmp_path / "straight.jsonl")[3:], rel=1e-5)
    want, got = adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "resumed")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_a_crashed_run_resumes_from_its_checkpoint(tiny_llama3: Path, capitals_data: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """--save-every: a run that dies at step 5 of 6 leaves OUT.checkpoints/step-000004 (step 2's was replaced) and no
    OUT; resuming from it finishes the run as the uninterrupted one did (same cosine schedule: same total)."""
    straight = finetune(options(tiny_llama3, capitals_data, tmp_path / "straight", max_steps=6))
    out = tmp_path / "out"
    original, calls = LlamaForCausalLM.forward, []

    def dies_at_step_5(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", dies_at_step_5)
    with pytest.raises(RuntimeError, match="killed"):
        finetune(options(tiny_llama3, capitals_data, out, max_steps=6, save_every=2))
    monkeypatch.undo()
    checkpoints = tmp_path / "out.checkpoints"
    assert not out.exists() and [p.name for p in checkpoints.iterdir()] == ["step-000004"]

    resumed = finetune(options(tiny_llama3, capitals_data, out, max_steps=6, resume=checkpoints / "step-000004"))
    assert resumed.losses == pytest.approx(straight.losses[4:], rel=1e-5)
    want, got = adapter_tensors(tmp_path / "straight"), adapter_tensors(out)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    assert not checkpoints.exists()  # removed once the run completed


def test_gradient_checkpointing_computes_the_same_steps(tiny_llama3: Path, capitals_data: Path, tmp_path: Path) -> None:
    plain = finetune(options(tiny_llama3, capitals_data, tmp_path / "a"))
    checkpointed = finetune(options(tiny_llama3, capitals_data, tmp_path / "b", grad_checkpointing=True))
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)


def test_qlora_trains_on_the_cpu(tiny_llama3: Path, capitals_data: Path, tmp_path: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    out = tmp_path / "qlora"
    result = finetune(options(tiny_llama3, capitals_data, out, lora=LoraOptions(r=4, alpha=8, target="all-linear", qlora=True)))
    four_bit = [m for m in result.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 7 * 2  # every decoder linear is NF4
    assert four_bit[0].weight.quant_state.quant_type == "nf4"
    assert all(math.isfinite(x) for x in result.losses) and result.losses[-1] < result.losses[0]
    tensors = adapter_tensors(out)
    assert len(tensors) == 2 * 7 * 2 and all(t.abs().max() > 0 for n, t in tensors.items() if "lora_B" in n)

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama3, quantization_config=config, device_map="cpu",
                                                dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(logits(reloaded), logits(result.model), rtol=0, atol=1e-4)

    # mt merge --dequantized-base: each weight is bitsandbytes' dequantized NF4 weight + alpha/r * B @ A, read from
    # a fresh 4-bit load (bitsandbytes' CPU backend repacks a layer's data at its first forward). Logits are not
    # compared: bitsandbytes 0.50.2's CPU Linear4bit differs from x @ dequantize_4bit(W).T by ~0.5% of the
    # output's largest value (measured), far more than the merge's float32 rounding.
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama3, quantization_config=config, device_map="cpu",
                                                 dtype=torch.float32)
    merged = tmp_path / "merged"
    run = CliRunner().invoke(main, ["merge", str(tiny_llama3), str(out), "-o", str(merged), "--dequantized-base", "--quiet"])
    assert run.exit_code == 0, run.output
    weights = load_file(merged / "model.safetensors")
    for name, module in fresh.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            dequantized = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            a, b = (tensors[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
            torch.testing.assert_close(weights[f"{name}.weight"], dequantized + (b @ a) * (8 / 4), rtol=1e-6, atol=1e-6)


def test_no_packing_trains_too(tiny_llama3: Path, capitals_data: Path, tmp_path: Path) -> None:
    result = finetune(options(tiny_llama3, capitals_data, tmp_path / "a", packing=False, max_steps=None, epochs=2))
    # 8 rows of 10-11 tokens, 4 to a padded group of <= 48 tokens: 2 steps an epoch
    assert result.total_steps == 4 and result.tokens == 2 * result.data.tokens
    assert result.losses[-1] < result.losses[0]


def test_every_row_kind_on_qwen2(tiny_qwen2: Path, tmp_path: Path) -> None:
    """A Qwen2 base (q/k/v biases, its own chat template) trained on text, prompt/completion and messages rows."""
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]
    rows = [{"text": "Plain text to model."}, {"prompt": "2+2=", "completion": "4"}, {"messages": conversation}] * 2
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    result = finetune(options(tiny_qwen2, data, tmp_path / "out", max_steps=None, epochs=2))
    assert result.arch == "Qwen2ForCausalLM" and result.data.kinds == {"text": 2, "prompt": 2, "messages": 2}
    assert result.total_steps == len(result.losses) >= 2 and all(math.isfinite(x) for x in result.losses)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 4


def test_schedule() -> None:
    peak, total, warmup = 1e-3, 100, 10
    assert [lr_at(s, total, warmup, peak, "cosine") for s in range(warmup)] == pytest.approx(
        [peak * (s + 1) / warmup for s in range(warmup)])
    assert lr_at(warmup, total, warmup, peak, "cosine") == pytest.approx(peak)
    assert lr_at(warmup + 45, total, warmup, peak, "cosine") == pytest.approx(peak / 2)  # halfway down the cosine
    assert 0 < lr_at(total - 1, total, warmup, peak, "cosine") < peak * 1e-3
    assert lr_at(warmup + 45, total, warmup, peak, "linear") == pytest.approx(peak / 2)
    assert lr_at(total - 1, total, 0, peak, "constant") == peak


def test_progress_line_and_json_log_line(capsys: pytest.CaptureFixture[str]) -> None:
    from mt.commands import TrainProgress
    from mt.finetune.trainer import StepLog

    entry = StepLog(step=5, total=20, loss=1.23456, lr=2e-4, tokens_per_s=1234.5)
    assert json.loads(entry.json_line()) == {"step": 5, "loss": 1.23456, "lr": 2e-4, "tokens_per_s": 1234.5}
    bar = TrainProgress()
    bar.update(entry)
    bar.close()
    line = capsys.readouterr().err
    assert "[######------------------] step 5/20  loss 1.2346  lr 2.00e-04  1,234 tok/s" in line


def test_kernels_torch_trains_as_plain_pytorch(tiny_llama3: Path, capitals_data: Path, tmp_path: Path) -> None:
    """--kernels torch runs the patched model (the kernels' PyTorch paths) and the chunked loss: same steps."""
    said: list[str] = []
    plain = finetune(options(tiny_llama3, capitals_data, tmp_path / "a", kernels="off"))
    patched = finetune(options(tiny_llama3, capitals_data, tmp_path / "b", kernels="torch"), info=said.append)
    assert any(line.startswith("kernels: torch for LlamaForCausalLM") for line in said), said
    assert patched.losses == pytest.approx(plain.losses, rel=1e-4)
    got, want = adapter_tensors(tmp_path / "b"), adapter_tensors(tmp_path / "a")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5)


def test_kernels_auto_stays_on_pytorch_on_the_cpu(tiny_llama3: Path, capitals_data: Path, tmp_path: Path) -> None:
    said: list[str] = []
    finetune(options(tiny_llama3, capitals_data, tmp_path / "a", max_steps=1), info=said.append)
    assert not any(line.startswith("kernels:") for line in said), said


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton runs on a CUDA device")
def test_kernels_triton_without_a_gpu_is_one_line(tiny_llama3: Path, capitals_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    result = CliRunner().invoke(main, ["finetune", str(tiny_llama3), "--data", str(capitals_data), "-o", str(out),
                                       "--max-steps", "1", "--kernels", "triton", "--threads", "1", "--quiet"])
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Triton kernels cannot run" in result.output
    assert not out.exists()
