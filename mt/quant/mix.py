"""Which GGML type each tensor gets for a llama.cpp file type (Q4_K_M, Q5_K_S …), as src/llama-quant.cpp decides.

`choose_types` walks the tensors in llama.cpp's order (see `llama_order`) because the attn_v and
ffn_down rules count the tensors of their kind seen so far.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Collection

from gguf import LlamaFileType
from gguf import GGMLQuantizationType as T

from mt.errors import MtError
from mt.quant.outtypes import QUANTIZER_TYPES, row_fits

DEFAULT_TYPE: dict[LlamaFileType, T] = {o.file_type: o.base for o in QUANTIZER_TYPES.values()}
FILE_TYPES: dict[str, LlamaFileType] = {name: o.file_type for name, o in QUANTIZER_TYPES.items()}
# a K-quant whose block does not divide the row falls back to a 32-block type, else F16
FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.IQ4_XS: T.IQ4_NL,
            T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0}
IQ4 = (LlamaFileType.MOSTLY_IQ4_NL, LlamaFileType.MOSTLY_IQ4_XS)
# substrings of tensors llama.cpp never quantizes (llama-quant.cpp tensor_allows_quantization)
NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight", "time_mix_first.weight",
    "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight",
    "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
NEVER_QUANTIZED_EXACT = ("position_embd.weight", "token_types.weight")
CATEGORIES = (  # first match wins, as in tensor_get_category
    ("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"),
)
ATTN_V_LIKE = ("attn_v", "attn_qkv", "attn_kv_b")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    type: T


@dataclass
class MixOptions:
    pure: bool = False
    output_tensor_type: T | None = None
    token_embedding_type: T | None = None
    quantize_output_tensor: bool = True
    has_imatrix: bool = False  # llama.cpp's qs.has_imatrix: changes the first ffn_down layers of Q4_0/Q5_0


@dataclass
class ModelFacts:
    arch: str
    n_layer: int
    n_expert: int = 0
    n_head: int = 0  # of the first layer, as llama.cpp's hparams.n_gqa() reads them
    n_head_kv: int = 0

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B for the llama architecture: 80 layers."""
        return self.arch == "llama" and self.n_layer == 80

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


def header_facts(value: Callable[[str], Any]) -> ModelFacts:
    """The facts of a GGUF header (`value(key)` reads a key, None when absent). A per-layer head count gives its
    first layer's; no head_count_kv means as many KV heads as heads, as llama.cpp's loader defaults it."""
    raw = value("general.architecture") or ""
    arch = raw.decode() if isinstance(raw, bytes) else str(raw)  # a header read with raw_strings

    def first(key: str, default: int = 0) -> int:
        v = value(f"{arch}.{key}")
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        return int(v) if v is not None else default

    n_head = first("attention.head_count")
    return ModelFacts(arch, first("block_count"), first("expert_count"), n_head, first("attention.head_count_kv", n_head))


@dataclass
class _Counters:
    n_attention_wv: int = 0
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    tied_embeddings: bool = True
    seen: dict[str, int] = field(default_factory=dict)


def category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    return next((cat for needle, cat in CATEGORIES if needle in name), "other")


def llama_order(names: list[str]) -> list[str]:
    """llama.cpp's weights_map order: non-block tensors first, then blk.N by N, names sorted within."""

    def key(name: str) -> tuple[int, str]:
        m = re.match(r"blk\.(\d+)\.", name)
        return (int(m.group(1)) if m else -1, name)

    return sorted(names, key=key)


def allows_quantization(spec: TensorSpec, options: MixOptions) -> bool:
    name = spec.name
    if len(spec.ne) < 2 or not name.endswith("weight"):
        return False
    if any(s in name for s in NEVER_QUANTIZED) or name in NEVER_QUANTIZED_EXACT:
        return False
    return options.quantize_output_tensor or name != "output.weight"


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def choose_types(specs: list[TensorSpec], ftype: LlamaFileType, model: ModelFacts, options: MixOptions | None = None) -> dict[str, T]:
    """Tensor name -> GGML type, for tensors given in llama.cpp's order."""
    options = options or MixOptions()
    if ftype not in DEFAULT_TYPE:
        raise MtError(f"file type {ftype.name} is not supported by mt quantize", f"choose one of {', '.join(FILE_TYPES)}")
    counters = _Counters(n_attention_wv=sum(category(s.name) in ATTN_V_LIKE for s in specs))
    counters.tied_embeddings = not any(s.name == "output.weight" for s in specs)
    return {s.name: _choose(s, ftype, model, options, counters) for s in specs}


def _choose(spec: TensorSpec, ftype: LlamaFileType, model: ModelFacts, options: MixOptions, c: _Counters) -> T:
    if not allows_quantization(spec, options):
        return spec.type
    cat = category(spec.name)
    if options.token_embedding_type is not None and cat == "token_embd":
        return options.token_embedding_type
    if options.output_tensor_type is not None and cat == "output":
        return options.output_tensor_type
    new = DEFAULT_TYPE[ftype]
    if not options.pure:
        new = _mixed_type(spec, new, cat, ftype, model, options, c)
    return _fallback(spec, new)


def _mixed_type(spec: TensorSpec, new: T, cat: str, ftype: LlamaFileType, model: ModelFacts, options: MixOptions, c: _Counters) -> T:
    F = LlamaFileType
    if cat == "output" or (c.tied_embeddings and cat == "token_embd"):
        if options.output_tensor_type is not None:
            return options.output_tensor_type
        if model.arch == "falcon" or not row_fits(new, spec.ne[0]):
            return T.Q8_0
        return T.Q6_K if new != T.Q8_0 else new
    if cat == "token_embd":
        if options.token_embedding_type is not None:
            return options.token_embedding_type
        return T.Q4_K if ftype in (F.MOSTLY_TQ1_0, F.MOSTLY_TQ2_0) else new
    if cat in ATTN_V_LIKE:
        if ftype == F.MOSTLY_Q2_K:
            new = T.Q4_K if model.n_gqa >= 4 else T.Q3_K
        elif ftype == F.MOSTLY_Q2_K_S and model.n_gqa >= 4:
            new = T.Q4_K
        elif ftype == F.MOSTLY_Q3_K_M:
            new = T.Q5_K if c.i_attention_wv < 2 else T.Q4_K
        elif ftype == F.MOSTLY_Q3_K_L:
            new = T.Q5_K
        elif ftype in IQ4 and model.n_gqa >= 4:
            new = T.Q5_K
        elif ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and use_more_bits(c.i_attention_wv, c.n_attention_wv):
            new = T.Q6_K
        elif ftype == F.MOSTLY_Q4_K_S and c.i_attention_wv < 4:
            new = T.Q5_K
        if model.is_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K
        if model.n_expert == 8:
            new = T.Q8_0
        c.i_attention_wv += 1
        return new
    if cat == "attn_k":
        return T.Q8_0 if model.n_expert == 8 else new
    if cat == "ffn_down":
        i_layer, n_layer = _layer(spec.name, c.i_ffn_down, model)
        falcon = model.arch == "falcon"
        if ftype == F.MOSTLY_Q2_K:
            new = T.Q3_K
        elif ftype == F.MOSTLY_Q2_K_S:
            new = T.Q4_K if i_layer < n_layer // 8 else new
        elif ftype == F.MOSTLY_Q3_K_M:
            new = T.Q5_K if i_layer < n_layer // 16 else T.Q4_K if not falcon or use_more_bits(i_layer, n_layer) else T.Q3_K
        elif ftype == F.MOSTLY_Q3_K_L:
            new = T.Q4_K if falcon else T.Q5_K
        elif ftype == F.MOSTLY_Q4_K_M:
            if falcon:
                new = T.Q6_K if i_layer < n_layer // 16 else T.Q5_K if use_more_bits(i_layer, n_layer) else T.Q4_K
            elif use_more_bits(i_layer, n_layer):
                new = T.Q6_K
        elif ftype in IQ4 and i_layer < n_layer // 8 and not options.has_imatrix:
            new = T.Q5_K
        elif ftype == F.MOSTLY_Q5_K_M and use_more_bits(i_layer, n_layer):
            new = T.Q6_K
        elif ftype == F.MOSTLY_Q4_K_S and not falcon and i_layer < n_layer // 8:
            new = T.Q5_K
        elif ftype in (F.MOSTLY_Q4_0, F.MOSTLY_Q5_0) and options.has_imatrix and i_layer < n_layer // 8:
            new = T.Q4_1 if ftype == F.MOSTLY_Q4_0 else T.Q5_1
        c.i_ffn_down += 1
        return new
    if cat == "attn_output":
        return _attn_output_type(new, ftype, model)
    return new


def _attn_output_type(new: T, ftype: LlamaFileType, model: ModelFacts) -> T:
    F = LlamaFileType
    if model.arch == "falcon":
        return T.Q4_K if ftype == F.MOSTLY_Q3_K_L else new
    if model.n_expert == 8:
        bumped = (F.MOSTLY_Q2_K, F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M, F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M, *IQ4)
        return T.Q5_K if ftype in bumped else new
    return {F.MOSTLY_Q2_K: T.Q3_K, F.MOSTLY_Q3_K_M: T.Q4_K, F.MOSTLY_Q3_K_L: T.Q5_K}.get(ftype, new)


def check_imatrix_given(types: dict[str, T], ftype: LlamaFileType, weighted: Collection[str] | None) -> None:
    """llama-quantize refuses a Q2_K_S file whose Q2_K tensors (bar the token embeddings and the output) lack
    importance-matrix weights (tensor_requires_imatrix). `weighted`: the tensors the imatrix has weights for, None
    without an imatrix."""
    if ftype != LlamaFileType.MOSTLY_Q2_K_S:
        return
    needing = [n for n, t in types.items() if t == T.Q2_K and category(n) not in ("token_embd", "output")]
    name = ftype.name.removeprefix("MOSTLY_")
    if weighted is None and needing:
        raise MtError(f"{name} needs an importance matrix (tensor {needing[0]!r} would be Q2_K without one)",
                      "pass --imatrix FILE, or choose Q2_K")
    missing = [n for n in needing if weighted is not None and n not in weighted]
    if missing:
        raise MtError(f"the importance matrix has no weights for {missing[0]!r}, which {name} makes Q2_K",
                      "use an importance matrix computed on this model, or choose Q2_K")


def _layer(name: str, counter: int, model: ModelFacts) -> tuple[int, int]:
    if model.n_expert > 1:
        m = re.match(r"blk\.(\d+)\.", name)
        if not m:
            raise MtError(f"cannot tell the layer of tensor {name!r}", "the file's tensor names are not llama.cpp's")
        return int(m.group(1)), model.n_layer
    return counter, model.n_layer


def _fallback(spec: TensorSpec, new: T) -> T:
    if row_fits(new, spec.ne[0]):
        return new
    fallback = FALLBACK.get(new, new)
    return fallback if row_fits(fallback, spec.ne[0]) else T.F16
