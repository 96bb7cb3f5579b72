"""Granite (GraniteForCausalLM): the Llama layout scaled by four multipliers: of the embeddings, of each residual
branch, of the attention scores (in place of 1/sqrt(head size)) and of the logits (divided by)."""

from __future__ import annotations

from typing import Any

from mt.io.gguf_out import GGUFContents
from mt.convert.arch.family import DECODER_LINEAR, Family
from mt.convert.arch.llama import Llama


class Granite(Llama):
    gguf_arch = "granite"

    def __init__(self, config: dict[str, Any]) -> None:
        # Granite's attention takes its head size from hidden / heads; the converter drops a stray head_dim
        super().__init__({k: v for k, v in config.items() if k != "head_dim"})

    def write_hparams(self, w: GGUFContents, file_type: int) -> None:
        super().write_hparams(w, file_type)
        multipliers = (
            ("attention_multiplier", w.add_attention_scale),
            ("embedding_multiplier", w.add_embedding_scale),
            ("residual_multiplier", w.add_residual_scale),
            ("logits_scaling", w.add_logit_scale),
        )
        for key, add in multipliers:
            if value := self.config.get(key):  # the converter skips a zero as it skips a missing key
                add(value)


FAMILY = Family(DECODER_LINEAR)  # merged and converted; mt's training kernels do not apply the multipliers
ARCH = Granite
