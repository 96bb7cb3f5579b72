"""Qwen3: the Qwen2 layout without q/k/v biases, with RMS norms over each head of Q and K and an explicit head_dim."""

from __future__ import annotations

from gguf import GGUFWriter

from mt.convert.arch.base import NameTable
from mt.convert.arch.common import warn_if_window_ignored
from mt.convert.arch.llama import DECODER_NAMES, DROPPED
from mt.convert.arch.qwen2 import Qwen2

QWEN3_NAMES = {
    **DECODER_NAMES,
    "model.layers.{bid}.self_attn.q_norm": "blk.{bid}.attn_q_norm",
    "model.layers.{bid}.self_attn.k_norm": "blk.{bid}.attn_k_norm",
}


class Qwen3(Qwen2):
    gguf_arch = "qwen3"
    names = NameTable(QWEN3_NAMES, DROPPED)

    def write_hparams(self, w: GGUFWriter, file_type: int) -> None:
        window = self.config.get("sliding_window") if self.config.get("use_sliding_window") else None
        warn_if_window_ignored(self.config, window, "Qwen3")
        super().write_hparams(w, file_type)


ARCH = Qwen3
