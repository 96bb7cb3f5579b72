"""scripts/bench_finetune.py: the --small CPU smoke run trains the plain transformers + PEFT anchor and mt's trainer
on the same rows and they agree (same LoRA init, same order, same losses); without a GPU the full run is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_finetune.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          timeout=300)


@pytest.mark.parametrize("qlora, kernels", [(False, "auto"), (True, "torch")], ids=["lora", "qlora-kernels-torch"])
def test_small_run_matches_the_plain_peft_loop(qlora: bool, kernels: str, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    proc = bench("--small", "--steps", "3", "--json", str(report), "--kernels", kernels, *(["--qlora"] if qlora else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("kernels: ")
    r = json.loads(report.read_text())
    assert r["kernels"] == ("off" if kernels == "auto" else kernels)  # auto: plain PyTorch on the CPU
    assert r["qlora"] is qlora and r["steps"] == 3 and r["seq"] == 64
    assert len(r["plain"]["losses"]) == len(r["mt"]["losses"]) == 3
    assert r["mt"]["losses"][-1] < r["mt"]["losses"][0]  # it trains
    tolerance = 1e-5 if r["kernels"] == "off" else 2e-2  # Triton kernels round differently
    assert r["loss_max_rel_diff"] < tolerance, r


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the benchmark")
def test_exits_with_a_message_without_cuda() -> None:
    proc = bench()
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("bench_finetune: no CUDA device") and len(proc.stderr.strip().splitlines()) == 1
