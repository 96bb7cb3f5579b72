"""scripts/bench_kernels_train.py without a GPU: one clear line, exit 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the benchmark")
def test_exits_with_a_message_without_cuda():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_kernels_train.py")], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("bench_kernels_train: no CUDA device")
