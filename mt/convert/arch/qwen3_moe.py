"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3's attention with a mixture of experts in every layer; each layer's experts,
stored one by one, become llama.cpp's stacked ffn_{gate,up,down}_exps, the router ffn_gate_inp.

llama.cpp's qwen3moe puts experts in every layer and always renormalises the chosen experts' weights; a config
with dense layers or without that renormalisation is refused rather than converted to another model.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from mt.io.checkpoint import LazyTensor
from mt.io.gguf_out import GGUFContents
from mt.convert.arch.base import NameTable
from mt.convert.arch.experts import expert_count, stack_experts, transformers_experts
from mt.convert.arch.family import ATTENTION_LINEAR, Family
from mt.convert.arch.llama import DROPPED
from mt.convert.arch.qwen3 import QWEN3_NAMES, Qwen3
from mt.errors import UnsupportedArchitecture

EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
EXPERT_PARTS = ("down_proj", "gate_proj", "up_proj")  # the converter's order
QWEN3_MOE_NAMES = {
    **QWEN3_NAMES,
    "model.layers.{bid}.mlp.gate": "blk.{bid}.ffn_gate_inp",
    "model.layers.{bid}.mlp.experts.gate_proj": "blk.{bid}.ffn_gate_exps",
    "model.layers.{bid}.mlp.experts.up_proj": "blk.{bid}.ffn_up_exps",
    "model.layers.{bid}.mlp.experts.down_proj": "blk.{bid}.ffn_down_exps",
}


def stacked_name(layer: int, part: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{part}.weight"


def require_llama_cpp_routing(config: dict[str, Any]) -> None:
    dense = list(config.get("mlp_only_layers") or [])
    if dense or config.get("decoder_sparse_step", 1) != 1:
        raise UnsupportedArchitecture(
            f"config.json makes some layers dense (mlp_only_layers {dense}, decoder_sparse_step "
            f"{config.get('decoder_sparse_step', 1)}); llama.cpp's qwen3moe has experts in every layer",
            "llama.cpp cannot run this layout")
    if config.get("norm_topk_prob") is False:
        raise UnsupportedArchitecture(
            "config.json's norm_topk_prob is false; llama.cpp's qwen3moe always renormalises the chosen experts' weights",
            "llama.cpp cannot run this router")


class Qwen3Moe(Qwen3):
    gguf_arch = "qwen3moe"
    names = NameTable(QWEN3_MOE_NAMES, DROPPED)
    vocab_loaders = ("gpt2",)

    def write_hparams(self, w: GGUFContents, file_type: int) -> None:
        require_llama_cpp_routing(self.config)
        super().write_hparams(w, file_type)
        if (n_ff := self.config.get("moe_intermediate_size")) is not None:
            w.add_expert_feed_forward_length(n_ff)
        if (n_ff_shared := self.config.get("shared_expert_intermediate_size")) is not None:
            w.add_expert_shared_feed_forward_length(n_ff_shared)

    def source_tensors(self, tensors: Mapping[str, LazyTensor]) -> Mapping[str, LazyTensor]:
        return stack_experts(tensors, EXPERT, expert_count(self.config), EXPERT_PARTS, stacked_name)

    def transformers_tensors(self, tensors: Mapping[str, LazyTensor]) -> Mapping[str, LazyTensor]:
        return transformers_experts(tensors, EXPERT, expert_count(self.config), ("gate_proj", "up_proj"), "down_proj",
                                    lambda layer: f"model.layers.{layer}.mlp.experts")


FAMILY = Family(ATTENTION_LINEAR)  # merged (LoRA on attention) and converted; not trained by mt
ARCH = Qwen3Moe
