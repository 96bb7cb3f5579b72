"""OLMo 2: norms after attention and after the MLP (none before), RMS norms over the whole of Q and K, NeoX rope
(no Q/K permutation)."""

from __future__ import annotations

from mt.io.gguf_out import GGUFContents
from mt.convert.arch.family import DECODER_LINEAR, Family
from mt.convert.arch.base import Architecture, NameTable
from mt.convert.arch.common import write_text_hparams
from mt.convert.arch.llama import DROPPED

OLMO2_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "model.layers.{bid}.self_attn.q_proj": "blk.{bid}.attn_q",
    "model.layers.{bid}.self_attn.k_proj": "blk.{bid}.attn_k",
    "model.layers.{bid}.self_attn.v_proj": "blk.{bid}.attn_v",
    "model.layers.{bid}.self_attn.o_proj": "blk.{bid}.attn_output",
    "model.layers.{bid}.self_attn.q_norm": "blk.{bid}.attn_q_norm",
    "model.layers.{bid}.self_attn.k_norm": "blk.{bid}.attn_k_norm",
    "model.layers.{bid}.post_attention_layernorm": "blk.{bid}.post_attention_norm",
    "model.layers.{bid}.post_feedforward_layernorm": "blk.{bid}.post_ffw_norm",
    "model.layers.{bid}.mlp.gate_proj": "blk.{bid}.ffn_gate",
    "model.layers.{bid}.mlp.up_proj": "blk.{bid}.ffn_up",
    "model.layers.{bid}.mlp.down_proj": "blk.{bid}.ffn_down",
}


class Olmo2(Architecture):
    gguf_arch = "olmo2"
    names = NameTable(OLMO2_NAMES, DROPPED)

    def write_hparams(self, w: GGUFContents, file_type: int) -> None:
        write_text_hparams(w, self.config, self.block_count(), file_type)


FAMILY = Family(DECODER_LINEAR)  # merged and converted; mt's training kernels assume pre-norm layers
ARCH = Olmo2
