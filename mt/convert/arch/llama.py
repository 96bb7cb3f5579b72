"""Llama 2/3/3.1/3.2 (and Mistral, which shares the layout)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mt.io.checkpoint import SideFiles
from mt.io.gguf_out import GGUFContents
from mt.convert.arch.family import decoder_family
from mt.convert.arch.base import Architecture, ExtraTensor, NameTable, find_key
from mt.convert.arch.common import full_attention_rope, write_text_hparams
from mt.convert.vocab import VocabSummary, write_add_space_prefix

DECODER_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "model.layers.{bid}.input_layernorm": "blk.{bid}.attn_norm",
    "model.layers.{bid}.self_attn.q_proj": "blk.{bid}.attn_q",
    "model.layers.{bid}.self_attn.k_proj": "blk.{bid}.attn_k",
    "model.layers.{bid}.self_attn.v_proj": "blk.{bid}.attn_v",
    "model.layers.{bid}.self_attn.o_proj": "blk.{bid}.attn_output",
    "model.layers.{bid}.post_attention_layernorm": "blk.{bid}.ffn_norm",
    "model.layers.{bid}.mlp.gate_proj": "blk.{bid}.ffn_gate",
    "model.layers.{bid}.mlp.up_proj": "blk.{bid}.ffn_up",
    "model.layers.{bid}.mlp.down_proj": "blk.{bid}.ffn_down",
}
DROPPED = ("model.layers.{bid}.self_attn.rotary_emb.inv_freq",)
# llama.cpp's converter turns BOS off for every Llama-architecture vocabulary of this size (Granite's small models;
# SmolLM and SmolLM2 share it)
GRANITE_SMALL_VOCAB = 49152


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half Q/K rows -> llama.cpp's interleaved rope order: [n_head, 2, d/2] -> [n_head, d/2, 2]."""
    shape = w.shape
    return np.ascontiguousarray(
        w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def _n_heads(config: dict[str, Any]) -> tuple[int, int]:
    n_head = int(find_key(config, ("n_heads", "num_attention_heads")))
    n_kv = find_key(config, ("n_kv_heads", "num_key_value_heads"))
    return n_head, int(n_kv) if n_kv is not None else n_head


def _permute_q(w: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    return permute_rows(w, _n_heads(config)[0])


def _permute_k(w: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    return permute_rows(w, _n_heads(config)[1])


def head_dim(config: dict[str, Any]) -> int:
    if (dim := config.get("head_dim")) is not None:
        return int(dim)
    return config["hidden_size"] // config["num_attention_heads"]


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray:
    """rope_freqs as llama.cpp's converter computes it: float32 torch arithmetic, element by element."""
    import torch

    rope = full_attention_rope(config)
    base = rope.get("rope_theta", 10000.0)
    dim = head_dim(config)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low = rope.get("low_freq_factor", 1.0)
    high = rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors: list[Any] = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).numpy()


class Llama(Architecture):
    gguf_arch = "llama"
    names = NameTable(DECODER_NAMES, DROPPED)
    transforms = {
        "attn_q.weight": _permute_q,
        "attn_q.bias": _permute_q,
        "attn_k.weight": _permute_k,
        "attn_k.bias": _permute_k,
    }

    def write_hparams(self, w: GGUFContents, file_type: int) -> None:
        write_text_hparams(w, self.config, self.block_count(), file_type)
        w.add_vocab_size(self.config["vocab_size"])
        w.add_rope_dimension_count(head_dim(self.config))

    def extra_tensors(self) -> list[ExtraTensor]:
        rope = full_attention_rope(self.config)
        if (rope.get("rope_type") or "").lower() != "llama3":
            return []
        n = len(range(0, head_dim(self.config), 2))
        return [ExtraTensor("rope_freqs.weight", lambda: llama3_rope_factors(self.config), (n,))]

    vocab_loaders = ("sentencepiece", "llama_hf", "gpt2")

    def write_vocab(self, files: SideFiles, w: GGUFContents) -> VocabSummary:
        write_add_space_prefix(files, w)
        summary = super().write_vocab(files, w)
        if self.config.get("vocab_size", 32000) == GRANITE_SMALL_VOCAB:
            w.add_add_bos_token(False)  # a key the tokenizer already set keeps its place and takes this value
        return summary


FAMILY = decoder_family("Llama", "llama", qlora=True)
ARCH = Llama
