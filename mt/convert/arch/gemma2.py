"""Gemma 2: RMS norms stored as offsets from 1, post-attention/post-FFN norms, logit softcapping, sliding window.

llama.cpp's converter reads the config through transformers (`AutoConfig`), so keys a config.json leaves out
take Gemma2Config's defaults; `DEFAULTS` holds those that reach the GGUF.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mt.io.checkpoint import SideFiles
from mt.io.gguf_out import GGUFContents
from mt.convert.arch.family import decoder_family
from mt.convert.arch.base import Architecture, NameTable
from mt.convert.arch.common import require_layer_types
from mt.convert.vocab import VocabSummary
from mt.errors import UnsupportedArchitecture
from mt.io.dtypes import bf16_bits_to_f32

GEMMA_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "model.layers.{bid}.input_layernorm": "blk.{bid}.attn_norm",
    "model.layers.{bid}.self_attn.q_proj": "blk.{bid}.attn_q",
    "model.layers.{bid}.self_attn.k_proj": "blk.{bid}.attn_k",
    "model.layers.{bid}.self_attn.v_proj": "blk.{bid}.attn_v",
    "model.layers.{bid}.self_attn.o_proj": "blk.{bid}.attn_output",
    "model.layers.{bid}.post_attention_layernorm": "blk.{bid}.post_attention_norm",
    "model.layers.{bid}.pre_feedforward_layernorm": "blk.{bid}.ffn_norm",
    "model.layers.{bid}.post_feedforward_layernorm": "blk.{bid}.post_ffw_norm",
    "model.layers.{bid}.mlp.gate_proj": "blk.{bid}.ffn_gate",
    "model.layers.{bid}.mlp.up_proj": "blk.{bid}.ffn_up",
    "model.layers.{bid}.mlp.down_proj": "blk.{bid}.ffn_down",
}
# llama.cpp's converter skips lm_head: Gemma 2 always ties it to the embedding
GEMMA2_DROPPED = ("lm_head.weight", "model.layers.{bid}.self_attn.rotary_emb.inv_freq")

DEFAULTS: dict[str, Any] = {
    "max_position_embeddings": 8192,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "sliding_window": 4096,
}


def add_one(w: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """Gemma's RMSNorm scales by (1 + weight), llama.cpp's by weight. The converter adds 1 after widening bf16
    to float32 (so the sum is not rounded back to bf16); f16 and f32 stay in their dtype."""
    if w.dtype == np.uint16:  # bf16 bits
        return bf16_bits_to_f32(w) + np.float32(1.0)
    return w + w.dtype.type(1.0)


NORM_OFFSET = {"norm.weight": add_one}


def with_defaults(config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    return {**defaults, **config}


def require_softcaps(config: dict[str, Any]) -> None:
    """llama.cpp always softcaps Gemma 2's attention and logits (50 and 30 unless told): a config that turns
    either off describes a model llama.cpp would compute differently."""
    off = [key for key in ("attn_logit_softcapping", "final_logit_softcapping") if config.get(key) is None]
    if off:
        raise UnsupportedArchitecture(
            f"config.json sets {', '.join(off)} to null, which llama.cpp's gemma2 graph cannot honour",
            "use the released value (attn_logit_softcapping 50.0, final_logit_softcapping 30.0); "
            "a model trained without softcapping cannot run in llama.cpp as gemma2",
        )


def require_tied_output(config: dict[str, Any]) -> None:
    """llama.cpp's gemma2 graph multiplies the output by token_embd (it has no output tensor, and the converter drops
    lm_head.weight): a config that unties lm_head (a merged adapter that trained its own) describes another model."""
    if config.get("tie_word_embeddings") is False:
        raise UnsupportedArchitecture(
            "config.json unties lm_head from the token embedding (tie_word_embeddings false), but llama.cpp's gemma2 "
            "always computes the output with the embedding and its converter drops lm_head.weight",
            "llama.cpp cannot run a Gemma 2 with an lm_head of its own; for a finetune, train a LoRA on lm_head "
            "(it merges into the tied embedding) instead of saving lm_head with modules_to_save",
        )


def require_attention_scale(config: dict[str, Any], n_layer: int, layers_27b: int) -> None:
    """llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B models (known by their
    layer count), and ignores `query_pre_attn_scalar`; refuse a config that asks for another scale."""
    scalar = config.get("query_pre_attn_scalar")
    if n_layer == layers_27b:
        expected = config["hidden_size"] // config["num_attention_heads"]
    else:
        expected = config["head_dim"]
    if scalar is not None and scalar != expected:
        raise UnsupportedArchitecture(
            f"config.json's query_pre_attn_scalar is {scalar}, but llama.cpp scales attention by 1/sqrt({expected}) "
            f"for a {n_layer}-layer {config.get('model_type', 'model')}",
            "llama.cpp cannot run this attention scale; released Gemma checkpoints use the value llama.cpp assumes",
        )


def write_gemma_vocab(arch: Architecture, files: SideFiles, w: GGUFContents) -> VocabSummary:
    """SentencePiece vocabulary, then add_space_prefix false (Gemma's tokenizer.model adds no "▁")."""
    summary = Architecture.write_vocab(arch, files, w)
    w.add_add_space_prefix(False)
    return summary


class Gemma2(Architecture):
    gguf_arch = "gemma2"
    names = NameTable(GEMMA_NAMES, GEMMA2_DROPPED)
    transforms = NORM_OFFSET
    vocab_loaders = ("sentencepiece",)

    def write_hparams(self, w: GGUFContents, file_type: int) -> None:
        """Gemma2Model.set_gguf_parameters' keys, in its order (it does not write the rope base: llama.cpp's
        default 10000 is Gemma 2's)."""
        c = with_defaults(self.config, DEFAULTS)
        require_softcaps(c)
        require_tied_output(c)
        require_layer_types(c, self.block_count(), 2, 2)
        require_attention_scale(c, self.block_count(), 46)
        w.add_context_length(c["max_position_embeddings"])
        w.add_embedding_length(c["hidden_size"])
        w.add_block_count(self.block_count())
        w.add_feed_forward_length(c["intermediate_size"])
        w.add_head_count(c["num_attention_heads"])
        w.add_head_count_kv(c["num_key_value_heads"])
        w.add_layer_norm_rms_eps(c["rms_norm_eps"])
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])
        w.add_file_type(file_type)
        w.add_attn_logit_softcapping(c["attn_logit_softcapping"])
        w.add_final_logit_softcapping(c["final_logit_softcapping"])
        w.add_sliding_window(c["sliding_window"])

    def write_vocab(self, files: SideFiles, w: GGUFContents) -> VocabSummary:
        return write_gemma_vocab(self, files, w)


FAMILY = decoder_family("Gemma2", "gemma2", norm_style="one_plus_weight", activation_key="hidden_activation")
ARCH = Gemma2
