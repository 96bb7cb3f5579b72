"""The type of each tensor, per writer: llama.cpp's converter, its LoRA converter and llama-quantize."""

from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as T

from mt.quant.choose import Writer, tensor_types
from mt.quant.mix import ModelFacts, TensorSpec
from mt.quant.outtypes import OUT_TYPES


def one(out: str, writer: Writer, name: str, ne: tuple[int, ...]) -> T:
    return tensor_types(OUT_TYPES[out], writer, [TensorSpec(name, ne, T.F32)])[name]


def test_the_converters_rule():
    assert one("q8_0", Writer.CONVERTER, "blk.0.attn_norm.weight", (64, 64)) == T.F32
    assert one("f16", Writer.CONVERTER, "blk.0.attn_q.bias", (64,)) == T.F32
    assert one("q8_0", Writer.CONVERTER, "blk.0.ffn_down.weight", (80, 64)) == T.F16  # 80 is not a multiple of 32
    assert one("q8_0", Writer.CONVERTER, "blk.0.ffn_down.weight", (96, 64)) == T.Q8_0
    assert one("bf16", Writer.CONVERTER, "token_embd.weight", (64, 100)) == T.BF16


def test_the_lora_converters_rule_takes_pairs_whose_names_do_not_end_in_weight():
    assert one("q8_0", Writer.LORA_CONVERTER, "blk.0.attn_q.weight.lora_a", (64, 8)) == T.Q8_0
    assert one("q8_0", Writer.LORA_CONVERTER, "blk.0.attn_q.weight.lora_b", (8, 64)) == T.F16  # rank 8 rows
    assert one("f16", Writer.LORA_CONVERTER, "blk.0.attn_q.weight.lora_b", (8, 64)) == T.F16
    assert one("q8_0", Writer.CONVERTER, "blk.0.attn_q.weight.lora_a", (64, 8)) == T.F32


def test_llama_quantize_needs_the_models_facts():
    specs = [TensorSpec("token_embd.weight", (256, 100), T.F32), TensorSpec("blk.0.attn_v.weight", (256, 256), T.F32)]
    with pytest.raises(TypeError):
        tensor_types(OUT_TYPES["q4_k_m"], Writer.QUANTIZER, specs)
    types = tensor_types(OUT_TYPES["q4_k_m"], Writer.QUANTIZER, specs, ModelFacts(arch="llama", n_layer=1))
    # tied embeddings are the output: Q6_K; the one attn_v of a 1-layer model takes more bits: Q6_K
    assert types == {"token_embd.weight": T.Q6_K, "blk.0.attn_v.weight": T.Q6_K}
