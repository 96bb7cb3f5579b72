"""Phi-3 / Phi-3.5 (Phi3ForCausalLM): fused qkv_proj -> attn_qkv and gate_up_proj -> ffn_up, both kept fused as
llama.cpp's converter keeps them; NeoX rope (no Q/K permutation); longrope written as rope_factors_long/short."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from mt.io.checkpoint import SideFile, SideFiles
from mt.io.gguf_out import GGUFContents
from mt.convert.arch.base import Architecture, ExtraTensor, NameTable, find_key
from mt.convert.arch.family import Family, Kernels
from mt.convert.arch.common import rope_parameters, warn_if_window_ignored
from mt.convert.vocab import SPM_TYPES, VocabSummary, read_json, spm_pieces, write_gpt2, write_spm_arrays
from mt.errors import CheckpointError, TokenizerError, UnsupportedArchitecture

PHI3_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "model.layers.{bid}.input_layernorm": "blk.{bid}.attn_norm",
    "model.layers.{bid}.self_attn.qkv_proj": "blk.{bid}.attn_qkv",
    "model.layers.{bid}.self_attn.o_proj": "blk.{bid}.attn_output",
    "model.layers.{bid}.post_attention_layernorm": "blk.{bid}.ffn_norm",
    "model.layers.{bid}.mlp.gate_up_proj": "blk.{bid}.ffn_up",
    "model.layers.{bid}.mlp.down_proj": "blk.{bid}.ffn_down",
}
DROPPED = ("model.layers.{bid}.self_attn.rotary_emb.inv_freq",)
log = logging.getLogger(__name__)


# Phi3Config's defaults: llama.cpp's converter reads config.json through transformers, which fills them in.
PHI3_DEFAULTS: dict[str, Any] = {
    "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
    "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}
LONGROPE_NAMES = ("longrope", "su", "yarn")  # transformers reads Phi-3's older "su" and "yarn" as longrope


def with_phi3_defaults(config: dict[str, Any]) -> dict[str, Any]:
    filled = {**PHI3_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    filled.setdefault("num_key_value_heads", filled["num_attention_heads"])
    filled["sliding_window"] = config.get("sliding_window")
    return filled


def longrope_attn_factor(scale: float, orig_ctx: int) -> float:
    """The attention factor llama.cpp's converter computes for longrope."""
    return math.sqrt(1 + math.log(scale) / math.log(orig_ctx)) if scale > 1.0 else 1.0


class Phi3(Architecture):
    gguf_arch = "phi3"
    names = NameTable(PHI3_NAMES, DROPPED)

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(with_phi3_defaults(config))

    def _rope(self) -> dict[str, Any]:
        return rope_parameters(self.config)

    def _context(self) -> int:
        return int(find_key(self.config, ("n_positions", "max_position_embeddings")))

    def _orig_ctx(self) -> int:
        return int(self._rope()["original_max_position_embeddings"])

    def _rope_dims(self) -> int:
        partial = self._rope().get("partial_rotary_factor", 1.0)
        return int(partial * self.config["hidden_size"]) // self.config["num_attention_heads"]

    def fused_parts(self) -> dict[str, tuple[tuple[str, int], ...]]:
        """qkv_proj's rows are q | k | v, gate_up_proj's gate | up (Phi3Attention and Phi3MLP split them so)."""
        c = self.config
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        q_rows, kv_rows, ffn_rows = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim, c["intermediate_size"]
        rows = {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows, "gate_proj": ffn_rows, "up_proj": ffn_rows}
        return {fused: tuple((part, rows[part.rpartition(".")[2]]) for part in parts) for fused, parts in FAMILY.fused.items()}

    def write_hparams(self, w: GGUFContents, file_type: int) -> None:
        """Phi3MiniModel.set_gguf_parameters' keys in its order (no rope scaling type: longrope is the factor tensors)."""
        c, window = self.config, self.config["sliding_window"]
        warn_if_window_ignored(c, window, "Phi-3")
        w.add_context_length(self._context())
        w.add_rope_scaling_orig_ctx_len(self._orig_ctx())
        w.add_embedding_length(c["hidden_size"])
        w.add_feed_forward_length(c["intermediate_size"])
        w.add_block_count(self.block_count())
        w.add_head_count(c["num_attention_heads"])
        w.add_head_count_kv(c["num_key_value_heads"])
        w.add_layer_norm_rms_eps(c["rms_norm_eps"])
        w.add_rope_dimension_count(self._rope_dims())
        w.add_rope_freq_base(self._rope().get("full_attention", self._rope())["rope_theta"])
        w.add_file_type(file_type)
        w.add_sliding_window(window if window is not None else 0)  # 0 marks Phi-4 (no window) for llama.cpp

    def _factors(self) -> tuple[list[float], list[float]] | None:
        """longrope's (long, short) per-dimension factors, checked as transformers and the converter check them."""
        rope = self._rope()
        long, short = rope.get("long_factor"), rope.get("short_factor")
        if not long:
            return None
        rope_type = str(rope.get("rope_type") or "").lower()
        if rope_type not in LONGROPE_NAMES:
            raise UnsupportedArchitecture(
                f"Phi-3 rope_scaling type {rope_type!r} with long/short factors is not supported (llama.cpp's converter refuses it)",
                "mt converts Phi-3 with longrope (or its older names su, yarn) or without rope scaling",
            )
        n = self._rope_dims() // 2
        if short is None or len(long) != len(short) or len(long) != n:
            raise CheckpointError(
                f"rope_scaling long_factor/short_factor must both have {n} values (rope dimensions / 2), "
                f"config.json has {len(long)} and {len(short) if short is not None else 'no'} short_factor",
                "use the model's own config.json",
            )
        return list(long), list(short)

    def write_tensor_pass_keys(self, w: GGUFContents) -> None:
        if self._factors() is not None:
            w.add_rope_scaling_attn_factors(longrope_attn_factor(self._context() / self._orig_ctx(), self._orig_ctx()))

    def extra_tensors(self) -> list[ExtraTensor]:
        if (factors := self._factors()) is None:
            return []
        long, short = factors
        return [
            ExtraTensor("rope_factors_long.weight", lambda: np.array(long, dtype=np.float32), (len(long),)),
            ExtraTensor("rope_factors_short.weight", lambda: np.array(short, dtype=np.float32), (len(short),)),
        ]

    def write_vocab(self, files: SideFiles, w: GGUFContents) -> VocabSummary:
        tconfig_path = files / "tokenizer_config.json"
        tconfig = read_json(tconfig_path) if tconfig_path.is_file() else {}
        if tconfig.get("tokenizer_class") == "GPT2Tokenizer":  # Phi-4
            return write_gpt2(files, self.config, w)
        warn_if_name_hides_phi3(w)
        return write_phi3_sentencepiece(files, self.config, tconfig, w)


def warn_if_name_hides_phi3(w: GGUFContents) -> None:
    """llama.cpp gives Phi-3's special tokens their rstrip only when general.name says phi3 / phi-3."""
    name = str(w.value("general.name") or "")
    if not any(marker in name.lower() for marker in ("phi3", "phi-3")):
        log.warning(
            "mt: warning: general.name %r does not contain 'phi3' or 'phi-3', so llama.cpp keeps the whitespace after "
            "Phi-3's special tokens (<|user|>, <|end|>, <|assistant|> ...) that transformers strips, and chat prompts "
            "tokenize differently; name the folder (or the model card's model_name) with Phi-3 in it", name,
        )


def _load_sentencepiece(path: SideFile) -> Any:
    from sentencepiece import SentencePieceProcessor

    if not path.is_file():
        raise TokenizerError(f"{path} is missing", "copy tokenizer.model from the base model into the folder")
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(path.read_bytes())
    except Exception as e:  # sentencepiece raises OSError/RuntimeError for a bad model
        raise TokenizerError(f"{path} cannot be loaded ({e})", "replace it with the model's own") from None
    return sp


def _added_tokens(files: SideFiles, tconfig: dict[str, Any]) -> list[tuple[int, str, bool]]:
    """(id, text, special) from tokenizer_config.json's added_tokens_decoder, then tokenizer.json's added_tokens."""
    found = [(int(tid), data["content"], bool(data.get("special"))) for tid, data in tconfig.get("added_tokens_decoder", {}).items()]
    if (files / "tokenizer.json").is_file():
        tokenizer_json = read_json(files / "tokenizer.json")
        found += [(int(t["id"]), t["content"], bool(t.get("special"))) for t in tokenizer_json.get("added_tokens", [])]
    return found


def write_phi3_sentencepiece(files: SideFiles, config: dict[str, Any], tconfig: dict[str, Any], w: GGUFContents) -> VocabSummary:
    """Phi3MiniModel.set_vocab: like Llama's SentencePiece vocab, but every added token is CONTROL when marked
    special and USER_DEFINED otherwise, as written (no look-special guess, no ▁ -> space), from both JSON files."""
    sp = _load_sentencepiece(files / "tokenizer.model")
    vocab_size = config.get("vocab_size") or sp.vocab_size()
    if sp.vocab_size() > vocab_size:
        raise TokenizerError(f"tokenizer.model has {sp.vocab_size()} pieces but config.json vocab_size is {vocab_size}",
                             "fix vocab_size in config.json")
    tokens, scores, types = spm_pieces(sp, files, vocab_size)
    for tid, text, special in _added_tokens(files, tconfig):
        if tid >= vocab_size:
            raise TokenizerError(f"added token {text!r} has id {tid} but config.json vocab_size is {vocab_size}",
                                 "resize the embeddings or fix vocab_size in config.json")
        tokens[tid], scores[tid] = text.encode("utf-8"), -1000.0
        types[tid] = SPM_TYPES["control"] if special else SPM_TYPES["user_defined"]
    return write_spm_arrays(files, w, tokens, scores, types)


FAMILY = Family(
    linear=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    fused={"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")},
    kernels=Kernels("transformers.models.phi3.modeling_phi3", "Phi3RMSNorm", "Phi3MLP", "Phi3Attention",
                    mlp_layout="fused_gate_up"),
)
ARCH = Phi3
