"""Hume's TADA (tada-3b-ml): a Llama-3.2 backbone plus acoustic modules llama.cpp has no architecture for.

The backbone (model.*, lm_head) becomes a standard `llama` GGUF, exactly what a plain LlamaForCausalLM with the
same weights gives. The acoustic modules (acoustic_proj, the time and mask embeddings, bottleneck_proj and the
VibeVoice flow-matching prediction_head) go into the companion `<stem>-acoustic.gguf` under their HF names, with
TadaConfig's keys as `tada.*` metadata. Names, keys and defaults follow HumeAI's tada/modules/tada.py (TadaConfig,
TadaForCausalLM) and VibeVoice's diffusion head.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping


from mt.io.gguf_out import GGUFContents
from mt.convert.arch.family import Family
from mt.convert.arch.base import Companion, NameTable
from mt.convert.arch.llama import Llama
from mt.convert.vocab import read_json
from mt.errors import TokenizerError
from mt.io.checkpoint import LazyTensor, SideFiles

ACOUSTIC_GGUF_ARCH = "tada"

# HF stems the companion keeps (suffix .weight/.bias carries over); {bid} = head layer
ACOUSTIC_NAMES = {stem: stem for stem in (
    "acoustic_proj",
    "time_start_embed",
    "time_end_embed",
    "acoustic_mask_emb",
    "bottleneck_proj",
    "prediction_head.noisy_images_proj",
    "prediction_head.cond_proj",
    "prediction_head.t_embedder.mlp.0",
    "prediction_head.t_embedder.mlp.2",
    "prediction_head.layers.{bid}.norm",
    "prediction_head.layers.{bid}.ffn.gate_proj",
    "prediction_head.layers.{bid}.ffn.up_proj",
    "prediction_head.layers.{bid}.ffn.down_proj",
    "prediction_head.layers.{bid}.adaLN_modulation.1",
    "prediction_head.final_layer.linear",
    "prediction_head.final_layer.adaLN_modulation.1",
)}
ACOUSTIC_PREFIXES = ("acoustic_proj.", "time_start_embed.", "time_end_embed.", "acoustic_mask_emb.", "bottleneck_proj.",
                     "prediction_head.")
# a TadaForCausalLM saved after from_pretrained holds the codec decoder it attached; the codec is converted on its
# own (mt convert tada-codec/decoder), as HumeAI's MLX converter strips these too
EMBEDDED_CODEC_PREFIXES = ("_decoder.", "decoder.")

# generate's conversation frame (system_prompt None, no user turn) and the tokens its loop treats apart: the guidance
# sequence keeps the structural ones and pads the rest with <|finetune_right_pad_id|>
PROMPT_PREFIX = "<|start_header_id|>system<|end_header_id|><|eot_id|><|start_header_id|>assistant<|end_header_id|>"
SPECIAL_TOKENS = {"pad": "<|finetune_right_pad_id|>", "start_header": "<|start_header_id|>",
                  "end_header": "<|end_header_id|>", "eot": "<|eot_id|>"}

HEAD_RMS_NORM_EPS = 1e-5  # TadaForCausalLM builds the head with rms_norm_eps=1e-05 whatever config.rms_norm_eps is
TIMESTEP_FREQUENCY_SIZE = 256  # VibeVoice TimestepEmbedder: sinusoidal features (cos, sin halves) of this size

Writer = Callable[[GGUFContents, str, Any], None]


def _u32(w: GGUFContents, key: str, value: Any) -> None:
    w.add_uint32(key, int(value))


def _i32(w: GGUFContents, key: str, value: Any) -> None:
    w.add_int32(key, int(value))


def _f32(w: GGUFContents, key: str, value: Any) -> None:
    w.add_float32(key, float(value))


def _str(w: GGUFContents, key: str, value: Any) -> None:
    w.add_string(key, str(value))


# TadaConfig key -> (GGUF writer, TadaConfig's default when config.json leaves it out)
CONFIG_KEYS: dict[str, tuple[Writer, Any]] = {
    "acoustic_dim": (_u32, 512),
    "num_time_classes": (_u32, 1024),
    "head_layers": (_u32, 4),
    "head_ffn_ratio": (_f32, 3.0),
    "shift_acoustic": (_u32, 5),
    "context_window": (_u32, 8),
    "acoustic_mean": (_f32, 0.0),
    "acoustic_std": (_f32, 1.5),
    "latent_dropout": (_f32, 0.0),
    "add_semantic_to_condition": (_f32, 0.0),
    "acoustic_from_nth_hidden_state": (_i32, -1),
    "dist_type": (_str, "fixed"),
    "diffusion_head_type": (_str, "vibevoice"),
    "rms_norm_eps": (_f32, 1e-6),
}


def tada_value(config: dict[str, Any], key: str) -> Any:
    value = config.get(key)
    return CONFIG_KEYS[key][1] if value is None else value


def head_dims(config: dict[str, Any]) -> dict[str, int]:
    """The sizes TadaForCausalLM derives: gray-code time bits, the head's latent, hidden and FFN widths."""
    time_bits = math.ceil(math.log2(int(tada_value(config, "num_time_classes"))))
    hidden = config.get("bottleneck_dim") or config["hidden_size"]
    return {
        "num_time_bits": time_bits,
        "latent_size": int(tada_value(config, "acoustic_dim")) + 2 * time_bits,
        "head_hidden_size": int(hidden),
        "head_ffn_length": int(hidden * float(tada_value(config, "head_ffn_ratio"))),
    }


def special_token_ids(files: SideFiles) -> dict[str, int]:
    """The ids of SPECIAL_TOKENS in the checkpoint's tokenizer (tokenizer.json's added tokens, else
    tokenizer_config.json's added_tokens_decoder)."""
    by_text: dict[str, int] = {}
    tokenizer, tokenizer_config = files / "tokenizer.json", files / "tokenizer_config.json"
    if tokenizer.is_file():
        by_text.update({t.get("content"): t.get("id") for t in read_json(tokenizer).get("added_tokens") or []
                        if isinstance(t, dict)})
    if tokenizer_config.is_file():
        decoder = read_json(tokenizer_config).get("added_tokens_decoder") or {}
        by_text.update({t.get("content"): int(i) for i, t in decoder.items() if isinstance(t, dict) and str(i).isdigit()})
    ids = {}
    for role, text in SPECIAL_TOKENS.items():
        if not isinstance(by_text.get(text), int):
            raise TokenizerError(f"the tokenizer has no {text} token, which TADA's generation needs",
                                 "use the Llama 3.2 tokenizer the TADA checkpoint was trained with")
        ids[role] = by_text[text]
    return ids


def write_acoustic_metadata(w: GGUFContents, config: dict[str, Any], files: SideFiles) -> None:
    ns = ACOUSTIC_GGUF_ARCH
    _u32(w, f"{ns}.embedding_length", config["hidden_size"])
    for key, (write, _) in CONFIG_KEYS.items():
        write(w, f"{ns}.{key}", tada_value(config, key))
    if config.get("bottleneck_dim") is not None:
        _u32(w, f"{ns}.bottleneck_dim", config["bottleneck_dim"])
    for key, value in head_dims(config).items():
        _u32(w, f"{ns}.{key}", value)
    _f32(w, f"{ns}.head_rms_norm_eps", HEAD_RMS_NORM_EPS)
    _u32(w, f"{ns}.head_timestep_frequency_size", TIMESTEP_FREQUENCY_SIZE)
    if config.get("tokenizer_name"):
        _str(w, f"{ns}.tokenizer_name", config["tokenizer_name"])
    _str(w, f"{ns}.prompt_prefix", PROMPT_PREFIX)
    for role, token_id in special_token_ids(files).items():
        _u32(w, f"{ns}.token.{role}_id", token_id)


ACOUSTIC = Companion(
    suffix="-acoustic",
    prefixes=ACOUSTIC_PREFIXES,
    gguf_arch=ACOUSTIC_GGUF_ARCH,
    names=NameTable(ACOUSTIC_NAMES),
    write_metadata=write_acoustic_metadata,
)


class Tada(Llama):
    companions = (ACOUSTIC,)

    def source_tensors(self, tensors: Mapping[str, LazyTensor]) -> Mapping[str, LazyTensor]:
        return {name: t for name, t in tensors.items() if not name.startswith(EMBEDDED_CODEC_PREFIXES)}


FAMILY = Family()
ARCH = Tada
