"""Metadata and vocabulary: the GGUF's hyperparameters, tokens and special ids against config.json and the tokenizer."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from mt.verify.reference import GGUFModel, Reference
from mt.verify.report import Check, Status


def _first(config: dict[str, Any], *keys: str) -> Any:
    return next((config[k] for k in keys if config.get(k) is not None), None)


def _head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _rope_theta(config: dict[str, Any]) -> float | None:
    theta = _first(config, "rope_theta")
    return theta if theta is not None else (config.get("rope_parameters") or {}).get("rope_theta")


def _f32(x: Any) -> float:
    return float(np.float32(x))


# GGUF key (after "<arch>.") -> its value derived from config.json. Floats are stored as float32 in GGUF.
HPARAMS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "block_count": lambda c: _first(c, "num_hidden_layers", "n_layers", "n_layer"),
    "embedding_length": lambda c: _first(c, "hidden_size", "n_embd"),
    "feed_forward_length": lambda c: _first(c, "intermediate_size", "n_inner"),
    "attention.head_count": lambda c: _first(c, "num_attention_heads", "n_head"),
    "attention.head_count_kv": lambda c: _first(c, "num_key_value_heads", "num_attention_heads"),
    "context_length": lambda c: _first(c, "max_position_embeddings", "n_ctx"),
    "rope.freq_base": lambda c: None if _rope_theta(c) is None else _f32(_rope_theta(c)),
    "attention.layer_norm_rms_epsilon": lambda c: None if c.get("rms_norm_eps") is None else _f32(c["rms_norm_eps"]),
}
# Written by the converter only for some models; checked when present.
OPTIONAL_HPARAMS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "attention.key_length": _head_dim,
    "attention.value_length": _head_dim,
    "vocab_size": lambda c: c.get("vocab_size"),
}


# What llama.cpp uses when the GGUF leaves a key out (src/llama-model.cpp); e.g. the converter writes no rope
# base for Gemma 2, whose 10000 is llama.cpp's default.
LLAMA_CPP_DEFAULTS: dict[str, Any] = {"rope.freq_base": 10000.0}


def _rope_scaling(config: dict[str, Any]) -> dict[str, Any] | None:
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or None
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return None
    return scaling


def check_metadata(gguf: GGUFModel, ref: Reference) -> Check:
    problems: list[str] = []
    compared: dict[str, Any] = {}
    for suffix, expected_of in (HPARAMS | OPTIONAL_HPARAMS).items():
        expected, actual = expected_of(ref.config), gguf.arch_value(suffix)
        if actual is None:
            actual = LLAMA_CPP_DEFAULTS.get(suffix)
        if expected is None or (actual is None and suffix in OPTIONAL_HPARAMS):
            continue
        compared[suffix] = {"gguf": actual, "source": expected}
        if actual is None:
            problems.append(f"{gguf.arch}.{suffix} is missing (source: {expected})")
        elif actual != expected:
            problems.append(f"{gguf.arch}.{suffix} = {actual}, source config says {expected}")
    problems += _check_vocab_size(gguf, ref) + _check_rope_scaling(gguf, ref)
    summary = f"{len(compared)} hyperparameters + rope scaling + vocab size agree" if not problems else "; ".join(problems)
    return Check("metadata", Status.FAIL if problems else Status.PASS, summary, problems, {"compared": compared})


def _check_vocab_size(gguf: GGUFModel, ref: Reference) -> list[str]:
    n_config = ref.config.get("vocab_size")
    if n_config is not None and len(gguf.tokens) != n_config:
        return [f"the GGUF has {len(gguf.tokens)} tokens, config.json vocab_size is {n_config}"]
    return []


def _check_rope_scaling(gguf: GGUFModel, ref: Reference) -> list[str]:
    scaling = _rope_scaling(ref.config)
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    has_factors = "rope_freqs.weight" in gguf.tensor_names()
    gguf_type = gguf.arch_value("rope.scaling.type")
    if kind == "llama3":
        if not has_factors:
            return ["source uses llama3 rope scaling but the GGUF has no rope_freqs tensor"]
        return _check_rope_factors(gguf, ref)
    if kind in ("linear", "yarn"):
        factor = gguf.arch_value("rope.scaling.factor")
        if gguf_type != kind or factor is None or abs(factor - scaling["factor"]) > 1e-6 * scaling["factor"]:
            return [f"source uses {kind} rope scaling x{scaling['factor']}, the GGUF says {gguf_type} x{factor}"]
        return []
    if has_factors or gguf_type not in (None, "none"):
        return [f"the GGUF scales rope ({'rope_freqs tensor' if has_factors else gguf_type}), the source does not"]
    return []


def _check_rope_factors(gguf: GGUFModel, ref: Reference) -> list[str]:
    """rope_freqs must equal transformers' default inv_freq / llama3 inv_freq for the source config."""
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(ref.folder)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    dim = _head_dim(ref.config)
    default = 1.0 / (_rope_theta(ref.config) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    expected = default / scaled.double().numpy()
    info = next(t for t in gguf.header.tensors if t.name == "rope_freqs.weight")
    actual = np.frombuffer(gguf.header.read_tensor(info), dtype=np.float32)
    if actual.shape != expected.shape or not np.allclose(actual, expected, rtol=1e-4):
        return [f"rope_freqs differs from the source's llama3 rope scaling (max rel. error "
                f"{_max_rel_error(actual, expected):.3g})"]
    return []


def _max_rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    if actual.shape != expected.shape:
        return float("inf")
    return float(np.max(np.abs(actual - expected) / np.abs(expected)))


def check_vocabulary(gguf: GGUFModel, ref: Reference) -> Check:
    """Every source token string at its id, the special ids, and whether BOS is added."""
    problems = _token_string_problems(gguf, ref)
    expected = ref.special_ids()
    for kind, tid in expected.items():
        actual = gguf.special_id(kind)
        if actual != tid:
            problems.append(f"{kind} id is {actual} ({gguf.token_text(actual)!r}), source has {tid} "
                            f"({gguf.token_text(tid)!r})")
    bos = expected.get("bos")
    source_adds_bos = bos is not None and ref.tokenizer("a")["input_ids"][:1] == [bos]
    gguf_adds_bos = gguf.header.value("tokenizer.ggml.add_bos_token")
    if gguf_adds_bos is not None and bool(gguf_adds_bos) != source_adds_bos:
        problems.append(f"add_bos_token is {bool(gguf_adds_bos)}, the source tokenizer {'adds' if source_adds_bos else 'does not add'} BOS")
    summary = (f"{len(ref.tokenizer)} token strings, special ids {expected} and add_bos agree" if not problems
               else f"{len(problems)} problem(s): " + "; ".join(problems[:3]))
    return Check("vocabulary", Status.FAIL if problems else Status.PASS, summary, problems,
                 {"special_ids": expected, "n_tokens_source": len(ref.tokenizer), "n_tokens_gguf": len(gguf.tokens)})


def _token_string_problems(gguf: GGUFModel, ref: Reference, limit: int = 20) -> list[str]:
    n = len(ref.tokenizer)
    source = ref.tokenizer.convert_ids_to_tokens(list(range(n)))
    theirs = gguf.tokens[:n]
    if len(theirs) < n:
        return [f"the GGUF has {len(gguf.tokens)} tokens, the source tokenizer {n}"]
    wrong = [i for i, (a, b) in enumerate(zip(theirs, source)) if a != b]
    problems = [f"token {i} is {theirs[i]!r} in the GGUF, {source[i]!r} in the source" for i in wrong[:limit]]
    if len(wrong) > limit:
        problems.append(f"... {len(wrong) - limit} more token strings differ")
    return problems
