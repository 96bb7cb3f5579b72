"""Qwen3: the Qwen2 layout without q/k/v biases, with RMS norms over each head of Q and K and an explicit head_dim."""

from __future__ import annotations

from typing import Any


from mt.io.gguf_out import GGUFContents
from mt.convert.arch.family import decoder_family
from mt.convert.arch.base import NameTable
from mt.convert.arch.common import warn_if_window_ignored
from mt.convert.arch.llama import DECODER_NAMES, DROPPED
from mt.convert.arch.qwen2 import Qwen2

QWEN3_NAMES = {
    **DECODER_NAMES,
    "model.layers.{bid}.self_attn.q_norm": "blk.{bid}.attn_q_norm",
    "model.layers.{bid}.self_attn.k_norm": "blk.{bid}.attn_k_norm",
}


# Qwen3Config's default (not hidden / heads): the converter reads config.json through transformers, which fills it in
DEFAULT_HEAD_DIM = 128


class Qwen3(Qwen2):
    gguf_arch = "qwen3"
    names = NameTable(QWEN3_NAMES, DROPPED)

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__({**config, "head_dim": config.get("head_dim") or DEFAULT_HEAD_DIM})

    def write_hparams(self, w: GGUFContents, file_type: int) -> None:
        window = self.config.get("sliding_window") if self.config.get("use_sliding_window") else None
        warn_if_window_ignored(self.config, window, "Qwen3")
        super().write_hparams(w, file_type)


FAMILY = decoder_family("Qwen3", "qwen3")  # q_norm/k_norm are RMSNorms, not trained
ARCH = Qwen3
