"""The checkpoint checked against its config.json before anything is written: a file llama.cpp cannot load (a layer
past the layer count, a missing or misshapen tensor, a vocabulary cut to a wrong size) is one line, never exit 0.

The shapes are those of a decoder's standard modules (Llama, Mistral, Qwen, Phi-3, Gemma), computed from the config;
tensors the table does not know are left to the family's own name table.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from mt.errors import CheckpointError
from mt.io.checkpoint import LazyTensor

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
REMEDY = "the checkpoint and its config.json disagree; re-download or fix config.json"


@dataclass(frozen=True)
class Dims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int | None
    vocab: int


def _positive_int(config: dict[str, Any], key: str, required: bool = True) -> int | None:
    value = config.get(key)
    if value is None and not required:
        return None
    if value is None:
        raise CheckpointError(f"config.json has no {key}", REMEDY)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"config.json's {key} is {value!r}, not a positive whole number", REMEDY)
    return value


NUMBERS = ("rms_norm_eps", "layer_norm_eps", "rope_theta", "max_position_embeddings", "sliding_window",
           "partial_rotary_factor", "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar")
OBJECTS = ("rope_scaling", "rope_parameters")


def check_value_types(config: dict[str, Any]) -> None:
    """Hyperparameters llama.cpp stores as numbers are numbers, and the rope settings an object (or null)."""
    for key in NUMBERS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value != value):
            raise CheckpointError(f"config.json's {key} is {value!r}, not a number", REMEDY)
    for key in OBJECTS:
        value = config.get(key)
        if value is not None and not isinstance(value, dict):
            raise CheckpointError(f"config.json's {key} is {value!r}, not an object", REMEDY)


def dims(config: dict[str, Any]) -> Dims:
    check_value_types(config)
    hidden = _positive_int(config, "hidden_size")
    heads = _positive_int(config, "num_attention_heads")
    kv_heads = _positive_int(config, "num_key_value_heads", required=False) or heads
    head_dim = _positive_int(config, "head_dim", required=False)
    assert hidden is not None and heads is not None
    if head_dim is None:
        if hidden % heads:
            raise CheckpointError(f"config.json's hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                                  "(and no head_dim is given)", REMEDY)
        head_dim = hidden // heads
    if heads % kv_heads:
        raise CheckpointError(f"config.json's num_attention_heads {heads} is not a multiple of num_key_value_heads "
                              f"{kv_heads}", REMEDY)
    layers = _positive_int(config, "num_hidden_layers")
    vocab = _positive_int(config, "vocab_size")
    assert layers is not None and vocab is not None
    return Dims(hidden, layers, heads, kv_heads, head_dim, _positive_int(config, "intermediate_size", required=False),
                vocab)


Shape = Callable[[Dims], tuple[int, ...] | list[tuple[int, ...]] | None]  # one shape, or those allowed

LAYER_SHAPES: dict[str, Shape] = {
    "self_attn.q_proj.weight": lambda d: (d.heads * d.head_dim, d.hidden),
    "self_attn.k_proj.weight": lambda d: (d.kv_heads * d.head_dim, d.hidden),
    "self_attn.v_proj.weight": lambda d: (d.kv_heads * d.head_dim, d.hidden),
    "self_attn.o_proj.weight": lambda d: (d.hidden, d.heads * d.head_dim),
    "self_attn.q_proj.bias": lambda d: (d.heads * d.head_dim,),
    "self_attn.k_proj.bias": lambda d: (d.kv_heads * d.head_dim,),
    "self_attn.v_proj.bias": lambda d: (d.kv_heads * d.head_dim,),
    "self_attn.qkv_proj.weight": lambda d: ((d.heads + 2 * d.kv_heads) * d.head_dim, d.hidden),
    # per head (Qwen3, Gemma 3) or over the whole projection (OLMo 2)
    "self_attn.q_norm.weight": lambda d: [(d.head_dim,), (d.heads * d.head_dim,)],
    "self_attn.k_norm.weight": lambda d: [(d.head_dim,), (d.kv_heads * d.head_dim,)],
    "mlp.gate_proj.weight": lambda d: (d.intermediate, d.hidden) if d.intermediate else None,
    "mlp.up_proj.weight": lambda d: (d.intermediate, d.hidden) if d.intermediate else None,
    "mlp.down_proj.weight": lambda d: (d.hidden, d.intermediate) if d.intermediate else None,
    "mlp.gate_up_proj.weight": lambda d: (2 * d.intermediate, d.hidden) if d.intermediate else None,
    "input_layernorm.weight": lambda d: (d.hidden,),
    "post_attention_layernorm.weight": lambda d: (d.hidden,),
    "pre_feedforward_layernorm.weight": lambda d: (d.hidden,),
    "post_feedforward_layernorm.weight": lambda d: (d.hidden,),
}
MODEL_SHAPES: dict[str, Shape] = {
    "model.norm.weight": lambda d: (d.hidden,),
}
VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


def check_against_config(config: dict[str, Any], tensors: Mapping[str, LazyTensor]) -> None:
    """Layer indices below the layer count, every layer holding the same tensors, the standard modules' shapes, and
    the embedding and output rows equal to vocab_size."""
    d = dims(config)
    layers: dict[int, set[str]] = defaultdict(set)
    for name, tensor in tensors.items():
        if found := _LAYER.match(name):
            index, role = int(found[1]), found[2]
            if index >= d.layers:
                raise CheckpointError(f"tensor {name!r} is in layer {index}, but config.json's num_hidden_layers is "
                                      f"{d.layers}", REMEDY)
            layers[index].add(role)
            _check_shape(name, tensor, LAYER_SHAPES.get(role), d)
        elif name in MODEL_SHAPES:
            _check_shape(name, tensor, MODEL_SHAPES[name], d)
        elif name in VOCAB_ROWS:
            _check_vocab_rows(name, tensor, d)
    _check_layers_complete(layers, d.layers)


def _check_shape(name: str, tensor: LazyTensor, expected: Shape | None, d: Dims) -> None:
    want = expected(d) if expected is not None else None
    allowed = want if isinstance(want, list) else [want] if want is not None else []
    if allowed and tuple(tensor.shape) not in allowed:
        implied = " or ".join(str(list(shape)) for shape in allowed)
        raise CheckpointError(f"tensor {name!r} has shape {list(tensor.shape)}, config.json implies {implied}", REMEDY)


def _check_vocab_rows(name: str, tensor: LazyTensor, d: Dims) -> None:
    shape = tuple(tensor.shape)
    if len(shape) != 2 or shape[1] != d.hidden:
        raise CheckpointError(f"tensor {name!r} has shape {list(shape)}, config.json implies [{d.vocab}, {d.hidden}]",
                              REMEDY)
    if shape[0] != d.vocab:
        raise CheckpointError(f"tensor {name!r} has {shape[0]} rows, but config.json's vocab_size is {d.vocab} (the "
                              "vocabulary would be cut or padded to the wrong size)", REMEDY)


def _check_layers_complete(layers: dict[int, set[str]], count: int) -> None:
    if not layers:
        return
    missing = next((i for i in range(count) if i not in layers), None)
    if missing is not None:
        raise CheckpointError(f"config.json's num_hidden_layers is {count}, but the checkpoint has no tensors for "
                              f"layer {missing}", REMEDY)
    every = set().union(*layers.values())
    for index in range(count):
        if lacking := sorted(every - layers[index]):
            raise CheckpointError(f"tensor 'model.layers.{index}.{lacking[0]}' is missing (the other layers have it)",
                                  "the checkpoint is incomplete; re-download it")
