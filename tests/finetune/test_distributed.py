"""`torchrun --nproc-per-node 2 --standalone -m mt finetune ...` on the CPU (gloo): the same adapter and losses as
one process training the same global batch (--grad-accum 2), through a --save-every checkpoint and a --resume,
only rank 0 writing, and a bad setup as one line.

torchrun itself is launched (as `python -m torch.distributed.run`, the module behind the torchrun script), so the
test covers the environment handshake (RANK / WORLD_SIZE / LOCAL_RANK), process-group setup and `python -m mt`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mt.finetune.lora import LoraOptions
from mt.finetune.trainer import STATE_NAME, TrainOptions, finetune
from tests.finetune.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[2]
ANIMALS = ("cat", "dog", "cow", "owl", "bee", "fox", "elk", "yak", "ant", "emu")
# 10 rows of 8-9 tokens packed two to a row of <= 18 tokens: 5 packed rows an epoch, so with 2 processes each
# epoch's last step (3 and 6) has one row and rank 1 takes the weight-0 stand-in
COMMON = dict(batch_tokens=18, max_seq_len=18, lr=1e-2, threads=1, seed=3, schedule="constant", warmup_steps=0,
              lora=LoraOptions(r=4, alpha=8, target="q,v,down"))


@pytest.fixture(scope="module")
def animals_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [{"prompt": f"The {a} says", "completion": f" hello {i}"} for i, a in enumerate(ANIMALS)]
    return write_jsonl(tmp_path_factory.mktemp("ddp") / "animals.jsonl", rows)


def torchrun(nproc: int, args: list[str], tmp_path: Path, entry: tuple[str, ...] = ("-m", "mt"),
             env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`mt finetune ARGS` in `nproc` processes under torchrun (`entry`: what torchrun starts in place of -m mt)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MT_DEBUG")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TORCHELASTIC_ERROR_FILE="",
               **(env_extra or {}))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
               *entry, "finetune", *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)


def cli_args(base: Path, data: Path, out: Path, grad_accum: int, **extra: str) -> list[str]:
    args = [str(base), "--data", str(data), "-o", str(out), "--batch-tokens", "18", "--max-seq-len", "18",
            "--lr", "1e-2", "--threads", "1", "--seed", "3", "--lora-r", "4", "--lora-alpha", "8", "--schedule",
            "constant", "--warmup-steps", "0", "--target", "q,v,down", "--device", "cpu", "--grad-accum", str(grad_accum)]
    return args + [x for k, v in extra.items() for x in (f"--{k.replace('_', '-')}", v)]


def losses(log: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tiny_llama3: Path, animals_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process, 2 packed rows a step (--grad-accum 2), 2 epochs; its folder holds one/ and one.jsonl."""
    folder = tmp_path_factory.mktemp("one_process")
    one = finetune(TrainOptions(base=tiny_llama3, data=animals_data, output=folder / "one", grad_accum=2,
                                epochs=2, json_log=folder / "one.jsonl", device="cpu", **COMMON))
    assert one.total_steps == 6  # ceil(5 rows / 2 per step) x 2 epochs
    return folder


def assert_same_adapter(got_dir: Path, want_dir: Path) -> None:
    want, got = (load_file(d / "adapter_model.safetensors") for d in (want_dir, got_dir))
    assert want.keys() == got.keys() and len(want) == 12
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_two_processes_train_what_one_does_with_the_same_global_batch(tiny_llama3: Path, animals_data: Path,
                                                                      one_process: Path, tmp_path: Path) -> None:

    # steps 1-3 (a checkpoint after step 2, removed when the run completes), then 4-6 resumed
    run = torchrun(2, cli_args(tiny_llama3, animals_data, tmp_path / "half", 1, max_steps="3", save_every="2",
                               json_log=str(tmp_path / "half.jsonl")), tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1, run.stdout  # rank 0 alone reports
    assert "3 steps of 2 rows of <= 18 tokens (2 processes x 1)" in run.stderr
    run = torchrun(2, cli_args(tiny_llama3, animals_data, tmp_path / "two", 1, max_steps="6", resume=str(tmp_path / "half"),
                               json_log=str(tmp_path / "two.jsonl")), tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]

    two_losses = losses(tmp_path / "half.jsonl") + losses(tmp_path / "two.jsonl")
    assert two_losses == pytest.approx(losses(one_process / "one.jsonl"), rel=1e-5)
    assert losses(one_process / "one.jsonl")[-1] < losses(one_process / "one.jsonl")[0]
    assert_same_adapter(tmp_path / "two", one_process / "one")
    state = json.loads((tmp_path / "two" / STATE_NAME).read_text())
    assert state["step"] == 6 and state["world_size"] == 2 and state["grad_accum"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("two", "half"))) == [
        "half", "half.jsonl", "two", "two.jsonl"]


@pytest.mark.parametrize("engine", ["ddp", "fsdp-grad-checkpointing"])
def test_kernels_under_torchrun_take_the_chunked_loss_and_train_what_one_process_does(
        engine: str, tiny_llama3: Path, animals_data: Path, one_process: Path, tmp_path: Path) -> None:
    """--kernels torch under DDP (the chunked cross-entropy inside the DDP-wrapped module, ChunkedLossModel) and under
    FSDP (a method FSDP runs as a forward; with gradient checkpointing, which recomputes the sharded layers in the
    backward): the run trains the steps one plain process takes (kernels off) to 1e-4.
    The model's own forward (full logits) raises in these runs: every loss must be the chunked one."""
    entry = (str(Path(__file__).with_name("without_full_logits.py")),)
    args = cli_args(tiny_llama3, animals_data, tmp_path / "k", 1, epochs="2", kernels="torch",
                    json_log=str(tmp_path / "k.jsonl"))
    run = torchrun(2, args + (["--fsdp", "--grad-checkpointing"] if engine.startswith("fsdp") else []), tmp_path, entry)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "loss: chunked cross-entropy (no [tokens, vocab] logits)" in run.stderr
    assert "kernels: torch for LlamaForCausalLM" in run.stderr
    assert losses(tmp_path / "k.jsonl") == pytest.approx(losses(one_process / "one.jsonl"), rel=1e-4)
    want, got = (load_file(d / "adapter_model.safetensors") for d in (one_process / "one", tmp_path / "k"))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp_trains_what_one_process_does(tiny_llama3: Path, animals_data: Path, one_process: Path,
                                          tmp_path: Path) -> None:
    run = torchrun(2, cli_args(tiny_llama3, animals_data, tmp_path / "fsdp", 1, epochs="2",
                               json_log=str(tmp_path / "fsdp.jsonl")) + ["--fsdp"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert losses(tmp_path / "fsdp.jsonl") == pytest.approx(losses(one_process / "one.jsonl"), rel=1e-5)
    assert_same_adapter(tmp_path / "fsdp", one_process / "one")
    assert json.loads((tmp_path / "fsdp" / STATE_NAME).read_text())["fsdp"] is True


@pytest.mark.parametrize("extra, message", [
    ([], "--fsdp shards the model over torchrun's processes, and this is one process"),
    (["--qlora"], "--fsdp does not support --qlora: FSDP2 does not shard bitsandbytes' NF4 weights; "
                  "drop --qlora or --fsdp (DDP keeps --qlora)"),
], ids=["one-process", "qlora"])
def test_fsdp_refusals_are_one_line(extra: list[str], message: str, tiny_llama3: Path, animals_data: Path,
                                    tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mt.cli import main

    run = CliRunner().invoke(main, ["finetune", *cli_args(tiny_llama3, animals_data, tmp_path / "o", 1), "--fsdp", *extra])
    assert run.exit_code == 1 and run.output.startswith(f"mt: error: {message}") and run.output.count("\n") == 1, run.output
    assert not (tmp_path / "o").exists()


def test_the_step_loss_is_the_mean_over_every_trained_token_of_the_global_batch(tiny_llama3: Path,
                                                                                tmp_path: Path) -> None:
    """Step 1 of a one-process --grad-accum 5 run (every packed row, weights untouched): the loss it reports must be
    plain transformers' mean cross-entropy over all trained tokens of the epoch, not a mean of the rows' means."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mt.finetune.data import load_samples

    rows = [{"prompt": f"The {a}", "completion": " says" + " hi" * (i % 4)} for i, a in enumerate(ANIMALS)]
    data = write_jsonl(tmp_path / "uneven.jsonl", rows)  # 1 to 4 trained tokens a row: means of means would differ
    options = TrainOptions(base=tiny_llama3, data=data, output=tmp_path / "a", grad_accum=5, device="cpu",
                           json_log=tmp_path / "a.jsonl", epochs=1, **COMMON)
    result = finetune(options)
    assert result.total_steps == 1 and result.tokens == result.data.tokens

    samples, _ = load_samples(data, AutoTokenizer.from_pretrained(tiny_llama3), 18)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama3, dtype=torch.float32)
    total, count, row_means = 0.0, 0, []
    with torch.no_grad():
        for s in samples:  # LoRA B starts at zero: the first step's forward is the base's
            logits = model(input_ids=torch.tensor([s.input_ids])).logits[0, :-1]
            labels = torch.tensor(s.labels[1:])
            nll = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
            total, count = total + nll.item(), count + s.trained
            row_means.append(nll.item() / s.trained)
    assert losses(tmp_path / "a.jsonl")[0] == pytest.approx(total / count, rel=1e-5)
    assert abs(total / count - sum(row_means) / len(row_means)) > 1e-4  # the two means differ on this data


@pytest.mark.parametrize("rank", ["0", "1"])
def test_more_processes_than_packed_rows_is_one_line(rank: str, tiny_llama3: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """As torchrun's rank 0 and rank 1 see it (the check runs before the process group is set up, so the
    environment alone stands in for torchrun): rank 0 prints the line, rank 1 exits 1 silently."""
    from click.testing import CliRunner

    from mt.cli import main

    for name, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MT_DEBUG", raising=False)
    data = write_jsonl(tmp_path / "one_row.jsonl", [{"text": "just one short row"}])
    run = CliRunner().invoke(main, ["finetune", *cli_args(tiny_llama3, data, tmp_path / "out", 1)])
    assert run.exit_code == 1
    expected = ("mt: error: the data makes 1 packed rows of <= 18 tokens, fewer than the 2 processes; "
                "lower --batch-tokens, add data or start fewer processes\n")
    assert run.output == (expected if rank == "0" else ""), run.output
    assert not (tmp_path / "out").exists()


def test_grad_accum_must_be_positive(tiny_llama3: Path, animals_data: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mt.cli import main

    run = CliRunner().invoke(main, ["finetune", *cli_args(tiny_llama3, animals_data, tmp_path / "o", 0)])
    assert run.exit_code == 1 and "--grad-accum must be at least 1 (got 0)" in run.output


@pytest.mark.parametrize("env, message", [
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK / WORLD_SIZE / LOCAL_RANK are not integers"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK 2 does not fit WORLD_SIZE 2"),
], ids=["not-integer", "rank-too-large"])
def test_a_broken_torchrun_environment_is_one_line(env: dict[str, str], message: str, tiny_llama3: Path,
                                                   animals_data: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from mt.cli import main

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("MT_DEBUG", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    run = CliRunner().invoke(main, ["finetune", *cli_args(tiny_llama3, animals_data, tmp_path / "o", 1)])
    assert run.exit_code == 1 and message in run.output and run.output.count("\n") == 1, run.output
    assert not (tmp_path / "o").exists()
