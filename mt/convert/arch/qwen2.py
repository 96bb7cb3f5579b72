"""Qwen2 / Qwen2.5: the Llama layout with q/k/v biases and NeoX rope (no Q/K permutation)."""

from __future__ import annotations


from mt.io.gguf_out import GGUFContents
from mt.convert.arch.family import decoder_family
from mt.convert.arch.base import Architecture, NameTable
from mt.convert.arch.common import write_text_hparams
from mt.convert.arch.llama import DECODER_NAMES, DROPPED


class Qwen2(Architecture):
    gguf_arch = "qwen2"
    names = NameTable(DECODER_NAMES, DROPPED)

    def write_hparams(self, w: GGUFContents, file_type: int) -> None:
        write_text_hparams(w, self.config, self.block_count(), file_type)

    vocab_loaders = ("sentencepiece", "gpt2")


FAMILY = decoder_family("Qwen2", "qwen2", qlora=True)
ARCH = Qwen2
