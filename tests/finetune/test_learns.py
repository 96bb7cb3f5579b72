"""Proof that mt finetune learns: a tiny Llama with the real Llama-3 tokenizer learns four "capital of X" answers
in a few dozen CPU steps, and llama.cpp answers them: the adapter merged into a GGUF by mt convert --adapter, and
as a GGUF LoRA (mt convert-lora) on the base GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mt.cli import main
from tests.finetune.conftest import CAPITALS, capital_prompt

STEPS = 30


def greedy(gguf: Path, prompts: list[str], lora: Path | None = None) -> list[tuple[str, str]]:
    """llama.cpp's greedy continuation of each prompt: (text, finish reason)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), lora_path=str(lora) if lora else None, n_ctx=64, n_threads=1,
                          verbose=False)
    try:
        outs = [llm.create_completion(p, max_tokens=6, temperature=0.0)["choices"][0] for p in prompts]
        return [(out["text"], out["finish_reason"]) for out in outs]
    finally:
        llm.close()


@pytest.fixture(scope="module")
def base_gguf(tiny_llama3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base") / "base.gguf"
    run = CliRunner().invoke(main, ["convert", str(tiny_llama3), "-o", str(out), "--outtype", "f32", "--quiet"])
    assert run.exit_code == 0, run.output
    return out


def test_finetune_learns_and_llama_cpp_answers(tiny_llama3: Path, capitals_data: Path, base_gguf: Path,
                                               tmp_path: Path) -> None:
    adapter, log = tmp_path / "adapter", tmp_path / "log.jsonl"
    run = CliRunner().invoke(main, [
        "finetune", str(tiny_llama3), "--data", str(capitals_data), "-o", str(adapter), "--max-steps", str(STEPS),
        "--lr", "1e-2", "--batch-tokens", "48", "--max-seq-len", "48", "--lora-r", "8", "--lora-alpha", "16",
        "--json-log", str(log), "--threads", "1"])
    assert run.exit_code == 0, run.output
    assert "data: 8 rows (8 prompt), " in run.output and f"; {STEPS} steps of <= 48 tokens (packed)" in run.output
    assert f"{STEPS} steps (to step {STEPS})" in run.output and f"wrote {adapter}" in run.output

    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["step"] for e in entries] == list(range(1, STEPS + 1))
    assert all(set(e) == {"step", "loss", "lr", "tokens_per_s"} and e["tokens_per_s"] > 0 for e in entries)
    start, end = entries[0]["loss"], entries[-1]["loss"]
    assert end < 0.3 * start, (start, end)

    merged = tmp_path / "ft.gguf"
    run = CliRunner().invoke(main, ["convert", str(tiny_llama3), "--adapter", str(adapter), "-o", str(merged),
                                    "--outtype", "f32", "--quiet"])
    assert run.exit_code == 0, run.output
    prompts = [capital_prompt(country) for country, _ in CAPITALS]
    assert greedy(merged, prompts) == [(f" {capital}", "stop") for _, capital in CAPITALS]  # the answer, then <|eot_id|>
    # the base model does not know them: the answers come from the adapter
    assert all(text != f" {capital}" for (text, _), (_, capital) in zip(greedy(base_gguf, prompts), CAPITALS))

    # the same adapter as a llama.cpp LoRA on the base GGUF (mt convert-lora)
    lora = tmp_path / "adapter.gguf"
    run = CliRunner().invoke(main, ["convert-lora", str(adapter), "--base", str(tiny_llama3), "-o", str(lora), "--quiet"])
    assert run.exit_code == 0, run.output
    assert greedy(base_gguf, prompts, lora) == [(f" {capital}", "stop") for _, capital in CAPITALS]
