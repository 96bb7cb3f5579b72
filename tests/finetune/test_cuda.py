"""The same checks on a CUDA GPU (skipped without one; CI has none): packing isolation in float32 and bfloat16, the
default bf16 training learning the capitals task, and QLoRA with bitsandbytes' CUDA kernels.
Run on a GPU machine: PYTHONPATH=$PWD python3 -m pytest -q tests/finetune/test_cuda.py"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mt.finetune.lora import LoraOptions
from mt.finetune.packing import packed_batch
from mt.finetune.trainer import TrainOptions, causal_lm_loss, finetune
from tests.finetune.test_packing import samples, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_packed_equals_one_by_one_on_cuda(dtype: torch.dtype, tol: float) -> None:
    model = tiny_model("llama", "sdpa").to("cuda", dtype)
    parts = samples()
    with torch.no_grad():
        singles = [(model(**packed_batch([s]).model_inputs("cuda"), use_cache=False).loss.float(), s.trained)
                   for s in parts]
        packed = causal_lm_loss(model, packed_batch(parts), torch.device("cuda")).float()
    weighted = sum(loss * n for loss, n in singles) / sum(n for _, n in singles)
    torch.testing.assert_close(packed, weighted, rtol=tol, atol=tol)


def test_bf16_training_learns_on_cuda(tiny_llama3: Path, capitals_data: Path, tmp_path: Path) -> None:
    result = finetune(TrainOptions(base=tiny_llama3, data=capitals_data, output=tmp_path / "a", device="cuda",
                                   max_steps=30, batch_tokens=48, max_seq_len=48, lr=1e-2,
                                   lora=LoraOptions(r=8, alpha=16)))
    assert next(p for p in result.model.parameters() if not p.requires_grad).dtype == torch.bfloat16  # auto: bf16
    assert result.losses[-1] < 0.3 * result.losses[0], result.losses


def test_qlora_on_cuda(tiny_llama3: Path, capitals_data: Path, tmp_path: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    result = finetune(TrainOptions(base=tiny_llama3, data=capitals_data, output=tmp_path / "q", device="cuda",
                                   max_steps=10, batch_tokens=48, max_seq_len=48, lr=1e-2,
                                   lora=LoraOptions(r=8, alpha=16, qlora=True)))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in result.model.modules())
    assert result.losses[-1] < result.losses[0]
    assert (tmp_path / "q" / "adapter_model.safetensors").is_file()
