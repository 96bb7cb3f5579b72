"""`mt finetune --fsdp` under torchrun on the CPU (gloo, 2 processes): rank 0 alone reads the weights (measured: the
other rank's parameters hold no storage before sharding and its peak memory stays below rank 0's by most of the
model), every rank ends with rank 0's weights and buffers, a failure to load on rank 0 stops every rank, and
--save-every / --resume checkpoints in the one-process format resume under FSDP and under one process alike, to
the weights of the uninterrupted one-process run (tests/finetune/test_distributed.py's reference)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mt.finetune.trainer import OPTIMIZER_NAME, STATE_NAME, TrainOptions, finetune
from tests import checkpoints
from tests.finetune.test_distributed import (COMMON, ROOT, animals_data, assert_same_adapter, cli_args, losses,  # noqa: F401
                                             one_process, torchrun)

DIES_AT_STEP = (str(ROOT / "tests" / "finetune" / "dies_at_step.py"),)


@pytest.fixture(scope="module")
def one_process_4_steps(tiny_llama3: Path, animals_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference's first 4 steps (a constant schedule: a shorter run takes the same steps) in one process."""
    out = tmp_path_factory.mktemp("one_4") / "one_4"
    finetune(TrainOptions(base=tiny_llama3, data=animals_data, output=out, grad_accum=2, max_steps=4, device="cpu",
                          **COMMON))
    return out


@pytest.fixture(scope="module")
def fsdp_checkpoint(tiny_llama3: Path, animals_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An --fsdp run of the reference's 6 steps with --save-every 2 that dies in step 5: step-000004 is left."""
    folder = tmp_path_factory.mktemp("fsdp_crash")
    run = torchrun(2, cli_args(tiny_llama3, animals_data, folder / "crashed", 1, epochs="2", save_every="2") + ["--fsdp"],
                   folder, entry=DIES_AT_STEP, env_extra={"MT_TEST_DIE_AT_FORWARD": "5"})
    assert run.returncode != 0 and "killed" in run.stderr, run.stderr[-3000:]
    assert not (folder / "crashed").exists()
    assert [p.name for p in (folder / "crashed.checkpoints").iterdir()] == ["step-000004"]
    return folder / "crashed.checkpoints" / "step-000004"


def test_the_fsdp_checkpoint_is_the_one_process_checkpoint(fsdp_checkpoint: Path, one_process_4_steps: Path) -> None:
    """Gathered to rank 0: the whole adapter and AdamW's moments, keyed by parameter index as one process keys them."""
    assert_same_adapter(fsdp_checkpoint, one_process_4_steps)
    state = json.loads((fsdp_checkpoint / STATE_NAME).read_text())
    assert state["step"] == 4 and state["fsdp"] is True and state["world_size"] == 2
    got, want = (torch.load(d / OPTIMIZER_NAME, weights_only=True) for d in (fsdp_checkpoint, one_process_4_steps))
    assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
    assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys() == set(range(12))
    for index, moments in want["optimizer"]["state"].items():
        assert moments.keys() == got["optimizer"]["state"][index].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for name, value in moments.items():
            torch.testing.assert_close(got["optimizer"]["state"][index][name], value, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(got["torch_rng"], want["torch_rng"], rtol=0, atol=0)


def test_an_fsdp_checkpoint_resumes_under_fsdp(tiny_llama3: Path, animals_data: Path, one_process: Path,
                                               fsdp_checkpoint: Path, tmp_path: Path) -> None:
    run = torchrun(2, cli_args(tiny_llama3, animals_data, tmp_path / "resumed", 1, epochs="2",
                               resume=str(fsdp_checkpoint), json_log=str(tmp_path / "resumed.jsonl")) + ["--fsdp"],
                   tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resuming after step 4" in run.stderr
    assert losses(tmp_path / "resumed.jsonl") == pytest.approx(losses(one_process / "one.jsonl")[4:], rel=1e-5)
    assert_same_adapter(tmp_path / "resumed", one_process / "one")


def test_an_fsdp_checkpoint_resumes_in_one_process(tiny_llama3: Path, animals_data: Path, one_process: Path,
                                                   fsdp_checkpoint: Path, tmp_path: Path) -> None:
    resumed = finetune(TrainOptions(base=tiny_llama3, data=animals_data, output=tmp_path / "resumed", grad_accum=2,
                                    epochs=2, resume=fsdp_checkpoint, device="cpu", **COMMON))
    assert resumed.steps == 2
    assert resumed.losses == pytest.approx(losses(one_process / "one.jsonl")[4:], rel=1e-5)
    assert_same_adapter(tmp_path / "resumed", one_process / "one")


def test_a_one_process_run_resumes_under_fsdp(tiny_llama3: Path, animals_data: Path, one_process: Path,
                                              one_process_4_steps: Path, tmp_path: Path) -> None:
    run = torchrun(2, cli_args(tiny_llama3, animals_data, tmp_path / "resumed", 1, epochs="2",
                               resume=str(one_process_4_steps)) + ["--fsdp"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_adapter(tmp_path / "resumed", one_process / "one")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_rank(rank: int, base: Path, data: Path, port: int) -> None:
    """One of 2 spawned processes: build the --fsdp model as torchrun's rank `rank` does, then compare every
    parameter (gathered whole) and buffer with the model one process builds (same seed: the same LoRA init)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from mt.finetune.distributed import World, destroy_process_group, world_from_env
    from mt.finetune.trainer import build

    torch.set_num_threads(1)
    options = TrainOptions(base=base, data=data, output=base / "unused", fsdp=True, device="cpu", **COMMON)
    try:
        sharded = build(options, "LlamaForCausalLM", world_from_env()).model
        gathered = {name: t.full_tensor() if hasattr(t, "full_tensor") else t
                    for name, t in [*sharded.named_parameters(), *sharded.named_buffers()]}
    finally:
        destroy_process_group()
    one = build(replace(options, fsdp=False), "LlamaForCausalLM", World()).model
    want = {**dict(one.named_parameters()), **dict(one.named_buffers())}
    assert any(name.endswith("inv_freq") for name in want) and any("lora_A" in name for name in want)
    assert gathered.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(gathered[name], tensor, rtol=0, atol=0, msg=f"rank {rank}: {name}")


def test_every_rank_gets_rank_0s_weights_and_buffers(tiny_llama3: Path, animals_data: Path) -> None:
    torch.multiprocessing.spawn(_check_rank, args=(tiny_llama3, animals_data, free_port()), nprocs=2)


@pytest.fixture(scope="module")
def wide_llama2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~82 MB of f32 weights in many similar tensors (6 layers of 64 x 16384 MLPs; the 32000 x 64 embedding, the
    largest, is 8 MB): a rank that never holds the whole model shows in its peak memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("wide_llama2")
    checkpoints.write_llama2_tokenizer(folder)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=16384,
                         num_hidden_layers=6, vocab_size=checkpoints.LLAMA2_VOCAB, tie_word_embeddings=True,
                         max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_rank_1_never_holds_the_whole_model(wide_llama2: Path, animals_data: Path, tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    entry = (str(Path(__file__).with_name("reports_memory.py")),)
    run = torchrun(2, cli_args(wide_llama2, animals_data, tmp_path / "out", 1, max_steps="1") + ["--fsdp"], tmp_path,
                   entry, env_extra={"MT_TEST_MEMORY_LOG": str(tmp_path / "memory")})
    assert run.returncode == 0, run.stderr[-3000:]
    model_bytes = sum(t.numel() * t.element_size() for t in load_file(wide_llama2 / "model.safetensors").values())
    rank0, rank1 = (json.loads((tmp_path / "memory" / f"rank-{r}.json").read_text()) for r in (0, 1))
    print(f"model {model_bytes / 2**20:.1f} MiB; peak RSS rank 0 {rank0['peak_rss_bytes'] / 2**20:.1f} MiB, "
          f"rank 1 {rank1['peak_rss_bytes'] / 2**20:.1f} MiB")
    assert rank0["loaded_param_bytes"] >= model_bytes and rank1["loaded_param_bytes"] == 0
    assert rank0["peak_rss_bytes"] - rank1["peak_rss_bytes"] > 0.5 * model_bytes


def test_a_base_rank_0_cannot_read_stops_every_rank(tiny_llama3: Path, animals_data: Path, tmp_path: Path) -> None:
    """Only rank 0 reads the weights: its failure must reach the meta ranks (else they wait in the broadcast)."""
    base = tmp_path / "base"
    shutil.copytree(tiny_llama3, base)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    run = torchrun(2, cli_args(base, animals_data, tmp_path / "out", 1) + ["--fsdp"], tmp_path)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.startswith("mt: error:")]
    assert len(lines) == 1 and "transformers cannot load" in lines[0], run.stderr[-3000:]
    assert not (tmp_path / "out").exists()
