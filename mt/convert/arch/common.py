"""Hyperparameter keys shared by the decoder-only text families, written as llama.cpp's converter does."""

from __future__ import annotations

import logging
from typing import Any

from gguf import ExpertGatingFuncType, RopeScalingType

from mt.io.gguf_out import GGUFContents
from mt.convert.arch.base import EXPERT_COUNT_KEYS, HEAD_COUNT_KEYS, HEAD_COUNT_KV_KEYS, find_key
from mt.errors import UnsupportedArchitecture

log = logging.getLogger(__name__)


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """One dict for old (`rope_theta` + `rope_scaling`) and new (`rope_parameters`) config styles."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "full_attention" in rope or "sliding_attention" in rope:
        return rope
    theta = find_key(config, ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"))
    local_theta = find_key(config, ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta", "rope_local_base_freq"))
    partial = find_key(config, ("partial_rotary_factor", "rope_pct", "rope_percent"))
    orig_ctx = config.get("original_max_position_embeddings")
    if local_theta is not None:
        rope["sliding_attention"] = {"rope_theta": local_theta}
    if "rope_theta" not in rope and theta is not None:
        rope["rope_theta"] = theta
    if "rope_type" not in rope and rope.get("type") is not None:
        rope["rope_type"] = rope["type"]
    if "partial_rotary_factor" not in rope and partial is not None:
        rope["partial_rotary_factor"] = partial
    if "original_max_position_embeddings" not in rope and orig_ctx is not None:
        rope["original_max_position_embeddings"] = orig_ctx
    return rope


def full_attention_rope(config: dict[str, Any]) -> dict[str, Any]:
    rope = rope_parameters(config)
    return rope.get("full_attention", rope)


def write_rope_scaling(w: GGUFContents, rope: dict[str, Any]) -> None:
    rope_type, factor = rope.get("rope_type"), rope.get("factor")
    if rope_type is None:
        return
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        optional = (
            ("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
            ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
        )
        for key, add in optional:
            value = rope.get(key, rope.get("attn_factor") if key == "attention_factor" else None)
            if value is not None:
                add(value)
    elif rope_type in ("su", "longrope"):
        w.add_rope_scaling_type(RopeScalingType.LONGROPE)
    elif rope_type.lower() not in ("llama3", "dynamic", "default", "mrope"):
        log.warning("unknown rope type %r: written without scaling", rope_type)


CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
                       "model_max_length")


def write_text_hparams(w: GGUFContents, config: dict[str, Any], block_count: int, file_type: int) -> None:
    """The keys llama.cpp's TextModel.set_gguf_parameters writes, in its order."""
    w.add_block_count(block_count)
    scalar_keys = (
        (CONTEXT_LENGTH_KEYS, w.add_context_length),
        (("hidden_size", "n_embd", "dim"), w.add_embedding_length),
        (("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size", "n_inner", "hidden_dim"), w.add_feed_forward_length),
        (HEAD_COUNT_KEYS, w.add_head_count),
        (HEAD_COUNT_KV_KEYS, w.add_head_count_kv),
    )
    for keys, add in scalar_keys:
        if (value := find_key(config, keys)) is not None:
            add(value)
    if config.get("is_causal") is False:
        w.add_causal_attention(False)
    rope_all = rope_parameters(config)
    rope = rope_all.get("full_attention", rope_all)
    write_rope_scaling(w, rope)
    if (sections := rope_all.get("mrope_section")) is not None:  # multimodal rope: [time, height, width, extra]
        w.add_rope_dimension_sections([*sections, 0, 0, 0, 0][:4])
    if (theta := rope.get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)
    if (local_theta := rope_all.get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(local_theta)
    if (eps := find_key(config, ("rms_norm_eps", "norm_eps"))) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (eps := find_key(config, ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))) is not None:
        w.add_layer_norm_eps(eps)
    write_expert_counts(w, config)
    if (head_dim := config.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(file_type)


def llama_cpp_layer_types(n_layer: int, pattern: int) -> list[str]:
    """llama.cpp's fixed layout (hparams.set_swa_pattern): the last layer of every `pattern` is global."""
    return ["sliding_attention" if i % pattern < pattern - 1 else "full_attention" for i in range(n_layer)]


def require_layer_types(config: dict[str, Any], n_layer: int, llama_cpp_pattern: int, hf_pattern: int) -> None:
    """The converter writes no per-layer attention types, so llama.cpp assumes its own; refuse a config whose
    layers (`layer_types`, else transformers' layout from `sliding_window_pattern`) differ from them rather than
    write a file that computes another model."""
    expected = llama_cpp_layer_types(n_layer, llama_cpp_pattern)
    layer_types = config.get("layer_types") or llama_cpp_layer_types(
        n_layer, config.get("sliding_window_pattern") or hf_pattern)
    if list(layer_types) != expected:
        raise UnsupportedArchitecture(
            f"config.json's attention layers {list(layer_types)} differ from the layout llama.cpp assumes for "
            f"{config.get('model_type', 'this model')} ({expected})",
            "llama.cpp cannot run this attention layout; the checkpoint needs a llama.cpp that reads layer types",
        )


EXPERTS_USED_KEYS = ("num_experts_per_tok", "num_experts_per_token", "top_k_experts")
GATING_KEYS = ("score_function", "scoring_func", "score_func", "moe_router_activation", "moe_router_activation_func",
               "expert_selection_fn")
GATING_FUNCS = {"sigmoid": ExpertGatingFuncType.SIGMOID, "softmax": ExpertGatingFuncType.SOFTMAX}


def write_expert_counts(w: GGUFContents, config: dict[str, Any]) -> None:
    """A mixture of experts' counts and router function, as TextModel writes them (nothing for a dense model)."""
    if (n_expert := find_key(config, EXPERT_COUNT_KEYS)) is not None:
        w.add_expert_count(n_expert)
    if (n_used := find_key(config, EXPERTS_USED_KEYS)) is not None:
        w.add_expert_used_count(n_used)
    if (n_group := config.get("n_group")) is not None:
        w.add_expert_group_count(n_group)
    if (n_group_used := config.get("topk_group")) is not None:
        w.add_expert_group_used_count(n_group_used)
    if (func := find_key(config, GATING_KEYS)) is not None:
        if func not in GATING_FUNCS:
            raise UnsupportedArchitecture(f"config.json's expert router function {func!r} is not one llama.cpp has",
                                          f"llama.cpp's routers: {', '.join(GATING_FUNCS)}")
        w.add_expert_gating_func(GATING_FUNCS[func])


def warn_if_window_ignored(config: dict[str, Any], window: int | None, family: str) -> None:
    """llama.cpp runs `family` with full attention; say so when the checkpoint's sliding window is shorter than its context."""
    context = find_key(config, ("max_position_embeddings", "n_ctx", "n_positions"))
    if window is None or context is None or window <= 0 or window >= context:
        return
    log.warning(
        "mt: warning: %s uses a sliding window of %d tokens but llama.cpp attends the full context; prompts longer "
        "than %d tokens (of the %d it accepts) compute something else than transformers", family, window, window, context
    )
