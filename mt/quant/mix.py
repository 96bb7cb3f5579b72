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
            T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0, T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL,
            T.IQ2_XS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL, T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL}
_F = LlamaFileType
IQ4 = (_F.MOSTLY_IQ4_NL, _F.MOSTLY_IQ4_XS)
# the file types below 3 bits, with rules of their own for every category
IQ2_FAMILY = (_F.MOSTLY_IQ2_XXS, _F.MOSTLY_IQ2_XS, _F.MOSTLY_IQ1_S, _F.MOSTLY_IQ2_S, _F.MOSTLY_IQ2_M, _F.MOSTLY_IQ1_M)
IQ2_S_M = (_F.MOSTLY_IQ2_S, _F.MOSTLY_IQ2_M)  # these step up to IQ3_S where the others step up to Q2_K
Q5_K_OUTPUT = (*IQ2_FAMILY, _F.MOSTLY_IQ3_XXS)  # the output (and tied embeddings) get Q5_K, not Q6_K
# types llama.cpp will not write without importance weights (tensor_requires_imatrix), bar token_embd and output
NEEDS_IMATRIX = (T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S)
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
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
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
        if ftype == F.MOSTLY_MXFP4_MOE or model.arch == "falcon" or not row_fits(new, spec.ne[0]):
            return T.Q8_0
        if ftype in Q5_K_OUTPUT:
            return T.Q5_K
        return T.Q6_K if new != T.Q8_0 else new
    if ftype == F.MOSTLY_MXFP4_MOE:  # the experts' stacks MXFP4, every other matrix Q8_0
        return T.MXFP4 if len(spec.ne) > 2 and spec.ne[2] > 1 else T.Q8_0
    if cat == "token_embd":
        if options.token_embedding_type is not None:
            return options.token_embedding_type
        return _token_embd_type(new, ftype)
    if ftype in IQ2_FAMILY:
        return _iq2_family_type(new, cat, ftype, model, c)
    if cat in ATTN_V_LIKE:
        if ftype == F.MOSTLY_Q2_K:
            new = T.Q4_K if model.n_gqa >= 4 else T.Q3_K
        elif ftype == F.MOSTLY_Q2_K_S and model.n_gqa >= 4:
            new = T.Q4_K
        elif ftype == F.MOSTLY_IQ3_XXS:
            new = T.Q4_K if model.n_gqa >= 4 else T.IQ3_XXS if options.has_imatrix else T.IQ3_S
        elif ftype in (F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_S) and model.n_gqa >= 4:
            new = T.Q4_K
        elif ftype == F.MOSTLY_IQ3_M:
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
    if cat in ("attn_k", "attn_q"):
        if cat == "attn_k" and model.n_expert == 8:
            return T.Q8_0
        return {F.MOSTLY_IQ3_XS: T.IQ3_XXS, F.MOSTLY_IQ3_XXS: T.IQ2_S}.get(ftype, new)
    if cat in ("ffn_gate", "ffn_up"):
        counter = "i_ffn_gate" if cat == "ffn_gate" else "i_ffn_up"
        i_layer, n_layer = _layer(spec.name, getattr(c, counter), model)
        setattr(c, counter, getattr(c, counter) + 1)
        middle = n_layer // 8 <= i_layer < 7 * n_layer // 8
        return T.IQ3_XXS if ftype == F.MOSTLY_IQ3_XS and middle else new
    if cat == "ffn_down":
        i_layer, n_layer = _layer(spec.name, c.i_ffn_down, model)
        falcon = model.arch == "falcon"
        if ftype == F.MOSTLY_Q2_K:
            new = T.Q3_K
        elif ftype == F.MOSTLY_Q2_K_S:
            new = T.Q4_K if i_layer < n_layer // 8 else new
        elif ftype == F.MOSTLY_IQ3_XXS and not options.has_imatrix:
            new = T.Q4_K if i_layer < n_layer // 8 else T.Q3_K
        elif ftype == F.MOSTLY_Q3_K_M:
            new = T.Q5_K if i_layer < n_layer // 16 else T.Q4_K if not falcon or use_more_bits(i_layer, n_layer) else T.Q3_K
        elif ftype == F.MOSTLY_IQ3_M and (i_layer < n_layer // 8 or (model.n_expert == 8 and use_more_bits(i_layer, n_layer))):
            new = T.Q4_K
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
        bumped = (F.MOSTLY_Q2_K, F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M, F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M, *IQ4,
                  F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_IQ3_S, F.MOSTLY_IQ3_M)
        return T.Q5_K if ftype in bumped else new
    return {F.MOSTLY_Q2_K: T.Q3_K, F.MOSTLY_IQ3_XXS: T.IQ3_S, F.MOSTLY_Q3_K_M: T.Q4_K, F.MOSTLY_Q3_K_L: T.Q5_K,
            F.MOSTLY_IQ3_M: T.Q4_K}.get(ftype, new)


def _token_embd_type(new: T, ftype: LlamaFileType) -> T:
    """Untied token embeddings: the low-bit types keep them at 2.5-3.4 bits, the ternary ones at Q4_K."""
    F = LlamaFileType
    if ftype in (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
        return T.Q2_K
    if ftype in (*IQ2_S_M, F.MOSTLY_IQ3_XXS):
        return T.IQ3_S
    return T.Q4_K if ftype in (F.MOSTLY_TQ1_0, F.MOSTLY_TQ2_0) else new


def _iq2_family_type(new: T, cat: str, ftype: LlamaFileType, model: ModelFacts, c: _Counters) -> T:
    """The 1- and 2-bit file types: attn_v, the first eighth of ffn_down and attn_output step up."""
    step_up = T.IQ3_S if ftype in IQ2_S_M else T.Q2_K
    if cat in ATTN_V_LIKE:
        c.i_attention_wv += 1
        return T.Q4_K if model.n_gqa >= 4 or model.n_expert >= 4 else step_up
    if cat == "attn_k" and model.n_expert == 8:
        return T.Q4_K
    if cat == "ffn_down":
        first_eighth = c.i_ffn_down < model.n_layer // 8
        c.i_ffn_down += 1
        return step_up if first_eighth else new
    if cat == "attn_output":
        if model.n_expert == 8:
            return T.Q5_K
        if ftype in (LlamaFileType.MOSTLY_IQ1_S, LlamaFileType.MOSTLY_IQ1_M):
            return T.IQ2_XXS
        return T.IQ3_S if ftype in IQ2_S_M else new
    return new


def needs_imatrix(name: str, qtype: T, ftype: LlamaFileType) -> bool:
    """llama.cpp's tensor_requires_imatrix: the grid i-quants below IQ3_S, and Q2_K in a Q2_K_S file; never the
    token embeddings or the output."""
    if category(name) in ("token_embd", "output"):
        return False
    return qtype in NEEDS_IMATRIX or (qtype == T.Q2_K and ftype == LlamaFileType.MOSTLY_Q2_K_S)


def check_imatrix_given(types: dict[str, T], ftype: LlamaFileType, weighted: Collection[str] | None) -> None:
    """llama-quantize refuses a file whose tensors of a type that needs importance weights (`needs_imatrix`) lack
    them. `weighted`: the tensors the imatrix has weights for, None without an imatrix."""
    needing = [n for n, t in types.items() if needs_imatrix(n, t, ftype)]
    name = ftype.name.removeprefix("MOSTLY_")
    if weighted is None and needing:
        raise MtError(f"{name} needs an importance matrix (tensor {needing[0]!r} would be {types[needing[0]].name} "
                      "without one)", "pass --imatrix FILE (llama-imatrix makes one), or choose Q2_K, which needs none")
    missing = [n for n in needing if weighted is not None and n not in weighted]
    if missing:
        raise MtError(f"the importance matrix has no weights for {missing[0]!r}, which {name} makes "
                      f"{types[missing[0]].name}", "use an importance matrix computed on this model")


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
