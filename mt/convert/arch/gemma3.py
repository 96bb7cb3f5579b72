"""Gemma 3 text (Gemma3ForCausalLM): Gemma 2's layout without attention softcapping, plus q/k norms, a local
rope base for the sliding-window layers and rope scaling on the global ones.

llama.cpp takes the layer pattern from the model (every 6th layer global) and the attention scale from the head
size; the converter writes neither `layer_types` nor `query_pre_attn_scalar`, so configs that differ are refused.
"""

from __future__ import annotations

from typing import Any


from mt.io.checkpoint import SideFiles
from mt.io.gguf_out import GGUFContents
from mt.convert.arch.family import decoder_family
from mt.convert.arch.base import Architecture, NameTable
from mt.convert.arch.common import require_layer_types, write_text_hparams
from mt.convert.arch.gemma2 import (
    GEMMA_NAMES, NORM_OFFSET, require_attention_scale, with_defaults, write_gemma_vocab,
)
from mt.convert.vocab import VocabSummary

GEMMA3_NAMES = {
    **GEMMA_NAMES,
    "lm_head": "output",
    "model.layers.{bid}.self_attn.q_norm": "blk.{bid}.attn_q_norm",
    "model.layers.{bid}.self_attn.k_norm": "blk.{bid}.attn_k_norm",
}
DROPPED = ("model.layers.{bid}.self_attn.rotary_emb.inv_freq",)

# Gemma3TextConfig's defaults for the keys that reach the GGUF (the converter reads the config via AutoConfig)
DEFAULTS: dict[str, Any] = {
    "max_position_embeddings": 131072,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "sliding_window": 4096,
}


class Gemma3(Architecture):
    gguf_arch = "gemma3"
    names = NameTable(GEMMA3_NAMES, DROPPED)
    transforms = NORM_OFFSET
    vocab_loaders = ("sentencepiece",)

    def write_hparams(self, w: GGUFContents, file_type: int) -> None:
        """The common text keys, then Gemma3Model's (those it sets again keep their place)."""
        c = with_defaults(self.config, DEFAULTS)
        global_only = c.get("sliding_window_pattern") == 1
        require_layer_types(c, self.block_count(), 1 if global_only else 6, 6)
        require_attention_scale(c, self.block_count(), 62)
        write_text_hparams(w, c, self.block_count(), file_type)
        if c.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(c["final_logit_softcapping"])
        if not global_only:
            w.add_sliding_window(c["sliding_window"])

    def write_vocab(self, files: SideFiles, w: GGUFContents) -> VocabSummary:
        return write_gemma_vocab(self, files, w)


FAMILY = decoder_family("Gemma3", "gemma3", norm_style="one_plus_weight", activation_key="hidden_activation")
ARCH = Gemma3
