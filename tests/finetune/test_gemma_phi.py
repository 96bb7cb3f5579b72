"""mt finetune on tiny Gemma 2 (softcapping, sliding window 16, tied embeddings, Gemma's SentencePiece tokenizer),
Gemma 3 text (q/k norms, 6 layers: 5 local, 1 global) and Phi-3 (fused qkv_proj and gate_up_proj) checkpoints from
tests/checkpoints.py: a few CPU steps save a PEFT adapter that peft reloads with the trained logits and that
`mt merge` merges; `--kernels torch` (the patched model
and the softcapped chunked loss) trains the steps plain PyTorch trains; Phi-3's --target names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mt.cli import main
from mt.errors import TrainingError
from mt.finetune.families import FAMILIES, resolve_targets
from mt.finetune.lora import LoraOptions
from mt.finetune.trainer import TrainOptions, finetune
from tests import checkpoints

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_gemma2(tmp_path_factory.mktemp("gemma2"), dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_gemma3(tmp_path_factory.mktemp("gemma3"), dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_phi3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_phi3(tmp_path_factory.mktemp("phi3"), dtype=torch.float32)


def options(base: Path, data: Path, out: Path, **kw) -> TrainOptions:
    defaults = dict(max_steps=3, batch_tokens=48, max_seq_len=48, lr=1e-2, threads=1, schedule="constant",
                    warmup_steps=0, lora=LoraOptions(r=4, alpha=8, target="all-linear"))
    return TrainOptions(base=base, data=data, output=out, **{**defaults, **kw})


def prompt_ids(base: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)("Q: capital of France? A:", return_tensors="pt").input_ids


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def base_model(base: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3"])
def test_adapter_reloads_in_peft_and_merges(family: str, request: pytest.FixtureRequest, capitals_data: Path,
                                            tmp_path: Path) -> None:
    from peft import PeftModel

    base = request.getfixturevalue(f"tiny_{family}")
    config = json.loads((base / "config.json").read_text())
    arch, layers = config["architectures"][0], config["num_hidden_layers"]
    out = tmp_path / "adapter"
    result = finetune(options(base, capitals_data, out))
    assert result.arch == arch and len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == sorted(FAMILIES[arch].linear)
    tensors = load_file(out / "adapter_model.safetensors")
    assert len(tensors) == 2 * len(FAMILIES[arch].linear) * layers  # A and B of each linear in each layer
    assert all(t.abs().max() > 0 for name, t in tensors.items() if "lora_B" in name)

    ids = prompt_ids(base)
    trained = logits(result.model, ids)
    assert (logits(base_model(base), ids) - trained).abs().max() > 1e-3
    reloaded = PeftModel.from_pretrained(base_model(base), out)
    torch.testing.assert_close(logits(reloaded, ids), trained, rtol=0, atol=1e-5)

    merged_dir = tmp_path / "merged"
    run = CliRunner().invoke(main, ["merge", str(base), str(out), "-o", str(merged_dir), "--quiet"])
    assert run.exit_code == 0, run.output
    torch.testing.assert_close(logits(base_model(merged_dir), ids), trained, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_kernels_torch_trains_as_plain_pytorch(family: str, request: pytest.FixtureRequest, capitals_data: Path,
                                               tmp_path: Path) -> None:
    """The patched model (Gemma's norms, GeGLU / Phi-3's fused SwiGLU, rope) and the chunked loss (Gemma 2's
    final softcapping) take the same steps as transformers + peft."""
    base = request.getfixturevalue(f"tiny_{family}")
    said: list[str] = []
    plain = finetune(options(base, capitals_data, tmp_path / "a", kernels="off"))
    patched = finetune(options(base, capitals_data, tmp_path / "b", kernels="torch"), info=said.append)
    kernels_line = next(line for line in said if line.startswith("kernels: torch for"))
    assert "keeps PyTorch" not in " ".join(said), said  # nothing fell back
    assert ("geglu" if family == "gemma2" else "swiglu") in kernels_line
    assert patched.losses == pytest.approx(plain.losses, rel=1e-4)
    got, want = load_file(tmp_path / "b" / "adapter_model.safetensors"), \
        load_file(tmp_path / "a" / "adapter_model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5)


def test_phi3_targets_name_the_fused_layers() -> None:
    phi3 = FAMILIES["Phi3ForCausalLM"]
    assert resolve_targets("qkv,o", phi3) == ["qkv_proj", "o_proj"]
    assert resolve_targets("gate_up_proj,down", phi3) == ["gate_up_proj", "down_proj"]
    with pytest.raises(TrainingError, match="fuses q, v into qkv_proj") as refused:
        resolve_targets("q,v", phi3)
    assert "target qkv instead" in refused.value.remedy
    with pytest.raises(TrainingError, match="fuses up into gate_up_proj"):
        resolve_targets("up_proj", phi3)
    with pytest.raises(TrainingError, match="qkv is not a linear layer"):
        resolve_targets("qkv", FAMILIES["Gemma2ForCausalLM"])


def test_phi3_separate_q_target_is_one_line_at_the_cli(tiny_phi3: Path, capitals_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    result = CliRunner().invoke(main, ["finetune", str(tiny_phi3), "--data", str(capitals_data), "-o", str(out),
                                       "--max-steps", "1", "--target", "q,v", "--threads", "1", "--quiet"])
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and "fuses q, v into qkv_proj" in result.output
    assert not out.exists()
