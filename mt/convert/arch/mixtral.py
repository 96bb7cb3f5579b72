"""Mixtral (MixtralForCausalLM): the Mistral layout with a mixture of experts in every layer, written as `llama`
with expert counts; each layer's experts w1/w2/w3, stored one by one, become the stacked
ffn_gate_exps/ffn_down_exps/ffn_up_exps, the router ffn_gate_inp."""

from __future__ import annotations

import re
from typing import Mapping

from mt.io.checkpoint import LazyTensor
from mt.convert.arch.base import NameTable
from mt.convert.arch.experts import expert_count, stack_experts, transformers_experts
from mt.convert.arch.family import ATTENTION_LINEAR, Family
from mt.convert.arch.llama import DECODER_NAMES, DROPPED
from mt.convert.arch.mistral import Mistral

EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight")
MLP_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(w1|w2|w3)\.weight")
EXPERT_PARTS = ("w1", "w2", "w3")  # the converter's order
MIXTRAL_NAMES = {
    **DECODER_NAMES,
    "model.layers.{bid}.block_sparse_moe.gate": "blk.{bid}.ffn_gate_inp",
    "model.layers.{bid}.block_sparse_moe.experts.w1": "blk.{bid}.ffn_gate_exps",
    "model.layers.{bid}.block_sparse_moe.experts.w2": "blk.{bid}.ffn_down_exps",
    "model.layers.{bid}.block_sparse_moe.experts.w3": "blk.{bid}.ffn_up_exps",
}


def stacked_name(layer: int, part: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{part}.weight"


class Mixtral(Mistral):
    names = NameTable(MIXTRAL_NAMES, DROPPED)

    def source_tensors(self, tensors: Mapping[str, LazyTensor]) -> Mapping[str, LazyTensor]:
        return stack_experts(tensors, EXPERT, expert_count(self.config), EXPERT_PARTS, stacked_name)

    def transformers_tensors(self, tensors: Mapping[str, LazyTensor]) -> Mapping[str, LazyTensor]:
        """transformers 5 calls block_sparse_moe `mlp` and holds w1 and w3 as gate_up, w2 as down."""
        renamed = {name.replace(".block_sparse_moe.", ".mlp."): t for name, t in tensors.items()}
        return transformers_experts(renamed, MLP_EXPERT, expert_count(self.config), ("w1", "w3"), "w2",
                                    lambda layer: f"model.layers.{layer}.mlp.experts")


FAMILY = Family(ATTENTION_LINEAR)  # merged (LoRA on attention) and converted; not trained by mt
ARCH = Mixtral
