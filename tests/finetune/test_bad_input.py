"""Every bad input to mt finetune: one line, exit 1 (2 for usage errors), no adapter folder left behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaForCausalLM

from mt.cli import main
from tests.finetune.conftest import write_jsonl

FAST = ["--max-steps", "2", "--batch-tokens", "48", "--max-seq-len", "48", "--threads", "1", "--lora-r", "2"]


def finetune_args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", str(base), "--data", str(data), "-o", str(out), *FAST, *extra]


def assert_refused(args: list[str], words: tuple[str, ...], out: Path, code: int = 1) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    if code == 1:  # the error is one line, the last; before it only what a run prints as it goes (the data line)
        assert lines[-1].startswith("mt: error: ") and "Traceback" not in result.output, result.output
        assert len(lines) == 1 or (len(lines) == 2 and lines[0].startswith("data: ")), result.output
    for word in words:
        assert word in result.output, (word, result.output)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if "mt-partial" in p.name]
    return lines[-1]


@pytest.mark.parametrize("lines, words", [
    (['{"text": "a"}', '{"text": "b",}'], ("bad.jsonl:2: not valid JSON", "each line must be one JSON object")),
    (['{"text": "fine"}', '{"title": "x", "body": "y"}'], ("bad.jsonl:2: no usable field (has 'body', 'title')",
                                                          "each row needs 'text', 'messages' (or ShareGPT 'conversations') or 'prompt' + 'completion'")),
    (['{"prompt": "q", "completion": 3}'], ("bad.jsonl:1: 'completion' is a int, not a string",)),
    ([], ("bad.jsonl holds no rows",)),
    (["", "   "], ("bad.jsonl holds no rows",)),
])
def test_bad_data(lines: list[str], words: tuple[str, ...], tiny_llama3: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines))
    assert_refused(finetune_args(tiny_llama3, data, tmp_path / "out"), words, tmp_path / "out")


def test_missing_data_file(tiny_llama3: Path, tmp_path: Path) -> None:
    assert_refused(finetune_args(tiny_llama3, tmp_path / "nope.jsonl", tmp_path / "out"),
                   ("cannot read", "nope.jsonl"), tmp_path / "out")


def test_not_utf8(tiny_llama3: Path, tmp_path: Path) -> None:
    data = tmp_path / "latin1.jsonl"
    data.write_bytes('{"text": "café"}\n'.encode("latin-1"))
    assert_refused(finetune_args(tiny_llama3, data, tmp_path / "out"), ("is not UTF-8",), tmp_path / "out")


def test_nothing_trainable_within_max_seq_len(tiny_llama3: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "word " * 60, "completion": " end"}])
    assert_refused(finetune_args(tiny_llama3, data, tmp_path / "out"),
                   ("no row of", "has a token to train on within --max-seq-len 48", "raise --max-seq-len"), tmp_path / "out")


def test_truncation_warns_and_trains(tiny_llama3: Path, capitals_data: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in capitals_data.read_text().splitlines()] + [{"text": "word " * 100}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    result = CliRunner().invoke(main, finetune_args(tiny_llama3, data, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    warning = re.search(r"mt: warning: 1 of 9 rows were longer than --max-seq-len 48 tokens \(longest (\d+)\) and were "
                        r"truncated; raise --max-seq-len", result.output)
    assert warning and int(warning.group(1)) > 100, result.output  # BOS + 100 words + EOS at least
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("config, words", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
     ("mt finetune does not train GPT2LMHeadModel", "it trains Gemma2ForCausalLM, Gemma3ForCausalLM, LlamaForCausalLM, "
      "MistralForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM")),
    ({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"},  # multimodal: text class only
     ("mt finetune does not train Gemma3ForConditionalGeneration", "Gemma3ForCausalLM")),
    ({"model_type": "llama"}, ("does not train a model without config.architectures",)),
])
def test_unsupported_architecture(config: dict, words: tuple[str, ...], capitals_data: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(config))
    assert_refused(finetune_args(base, capitals_data, tmp_path / "out"), words, tmp_path / "out")


def test_base_is_not_a_checkpoint(capitals_data: Path, tmp_path: Path) -> None:
    assert_refused(finetune_args(tmp_path / "missing", capitals_data, tmp_path / "out"), ("is not a folder",), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    assert_refused(finetune_args(tmp_path / "empty", capitals_data, tmp_path / "out"), ("has no config.json",), tmp_path / "out")


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"),
])
def test_out_of_memory_suggests_smaller_batches(error: Exception, tiny_llama3: Path, capitals_data: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def forward(self, *args, **kwargs):  # the allocation failure a too large batch gives, without allocating it
        raise error

    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
    line = assert_refused(finetune_args(tiny_llama3, capitals_data, tmp_path / "out"),
                          ("out of memory on cpu at step 1 with a batch of", "(--batch-tokens 48, --max-seq-len 48)",
                           "lower --batch-tokens or --max-seq-len, or add --grad-checkpointing or --qlora"), tmp_path / "out")
    assert "internal error" not in line


def test_non_finite_loss(tiny_llama3: Path, capitals_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = LlamaForCausalLM.forward

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
    assert_refused(finetune_args(tiny_llama3, capitals_data, tmp_path / "out"),
                   ("the loss is nan at step 1", "lower --lr"), tmp_path / "out")


def test_existing_output_needs_force(tiny_llama3: Path, capitals_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    result = CliRunner().invoke(main, finetune_args(tiny_llama3, capitals_data, out))
    assert result.exit_code == 1 and "exists; pass --force to overwrite it" in result.output
    assert [p.name for p in out.iterdir()] == ["keep"]


@pytest.mark.parametrize("extra, words, code", [
    (["--epochs", "1"], ("pass --max-steps or --epochs, not both",), 2),
    (["--target", "q,x"], ("--target 'q,x': x is not a linear layer of this model", "use all-linear or some of q,k,v,o,gate,up,down"), 1),
    (["--batch-tokens", "32"], ("--max-seq-len 48 is longer than a packed row (--batch-tokens 32)",), 1),
    (["--lora-r", "0"], ("--lora-r must be at least 1",), 1),
    (["--lr", "0"], ("--lr must be positive",), 1),
])
def test_bad_options(extra: list[str], words: tuple[str, ...], code: int, tiny_llama3: Path, capitals_data: Path,
                     tmp_path: Path) -> None:
    assert_refused(finetune_args(tiny_llama3, capitals_data, tmp_path / "out", *extra), words, tmp_path / "out", code)


def test_resume_from_a_folder_that_is_not_a_run(tiny_llama3: Path, capitals_data: Path, tmp_path: Path) -> None:
    (tmp_path / "notarun").mkdir()
    assert_refused(finetune_args(tiny_llama3, capitals_data, tmp_path / "out", "--resume", str(tmp_path / "notarun")),
                   ("has no trainer_state.json", "--resume takes a folder mt finetune wrote"), tmp_path / "out")


def test_resume_of_a_finished_run(tiny_llama3: Path, capitals_data: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    assert CliRunner().invoke(main, finetune_args(tiny_llama3, capitals_data, first, "--quiet")).exit_code == 0
    assert_refused(finetune_args(tiny_llama3, capitals_data, tmp_path / "out", "--resume", str(first)),
                   ("already took 2 steps, --max-steps/--epochs ask for 2", "raise --max-steps"), tmp_path / "out")


def test_out_of_memory_loading_the_base(tiny_llama3: Path, capitals_data: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def from_pretrained(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    assert_refused(finetune_args(tiny_llama3, capitals_data, tmp_path / "out"),
                   (f"out of memory loading {tiny_llama3} on cpu in float32", "add --qlora"), tmp_path / "out")


def test_base_without_weights_or_tokenizer(tiny_llama3: Path, capitals_data: Path, tmp_path: Path) -> None:
    import shutil

    base = tmp_path / "no_weights"
    base.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama3 / name, base / name)
    assert_refused(finetune_args(base, capitals_data, tmp_path / "out"), (f"transformers cannot load {base}",),
                   tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).unlink()
    assert_refused(finetune_args(base, capitals_data, tmp_path / "out"), (f"cannot load the tokenizer of {base}",),
                   tmp_path / "out")
