"""gpt-oss (GptOssForCausalLM): attention with sinks and biases, sliding on every other layer, and a mixture of
experts whose gate and up rows are interleaved in one tensor.

A released checkpoint holds the experts in MXFP4 (`*_blocks` and `*_scales`); they are carried into the file as
llama.cpp's MXFP4 blocks, byte for byte, whatever the out type, and written first, as the converter writes them. A
checkpoint with float experts (transformers' save_pretrained) has them transposed and split as the converter does.
llama.cpp fixes the layer layout (sliding, full, sliding …) and the SwiGLU's alpha and limit: a config that differs
is refused.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Mapping

import gguf.quants
import numpy as np

from mt.io.checkpoint import LazyTensor
from mt.io.gguf_out import GGUFContents
from mt.convert.arch.base import Architecture, NameTable
from mt.convert.arch.common import full_attention_rope, require_layer_types, write_text_hparams
from mt.convert.arch.family import ATTENTION_LINEAR, Family
from mt.convert.arch.llama import DROPPED
from mt.errors import CheckpointError, UnsupportedArchitecture

GPT_OSS_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "model.layers.{bid}.input_layernorm": "blk.{bid}.attn_norm",
    "model.layers.{bid}.post_attention_layernorm": "blk.{bid}.post_attention_norm",
    "model.layers.{bid}.self_attn.q_proj": "blk.{bid}.attn_q",
    "model.layers.{bid}.self_attn.k_proj": "blk.{bid}.attn_k",
    "model.layers.{bid}.self_attn.v_proj": "blk.{bid}.attn_v",
    "model.layers.{bid}.self_attn.o_proj": "blk.{bid}.attn_output",
    "model.layers.{bid}.self_attn.sinks": "blk.{bid}.attn_sinks",
    "model.layers.{bid}.mlp.router": "blk.{bid}.ffn_gate_inp",
    "model.layers.{bid}.mlp.experts.gate_proj": "blk.{bid}.ffn_gate_exps",
    "model.layers.{bid}.mlp.experts.up_proj": "blk.{bid}.ffn_up_exps",
    "model.layers.{bid}.mlp.experts.down_proj": "blk.{bid}.ffn_down_exps",
}
log = logging.getLogger(__name__)
LLAMA_CPP_SWIGLU = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}  # llama.cpp's LLM_FFN_SWIGLU_OAI_MOE constants
EXPERTS = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?")
MXFP4_BLOCK, MXFP4_BYTES = 32, 17  # values per block; e8m0 exponent + 16 bytes of nibbles


@dataclass(frozen=True)
class ExpertView:
    """A fused float expert tensor as llama.cpp stores a part of it: [E, in, out] transposed to [E, out, in]
    (weights), and of gate_up's interleaved rows (or bias columns) the even ones (gate) or the odd ones (up)."""

    name: str
    source: LazyTensor
    transposed: bool
    parity: int | None  # 0: gate, 1: up, None: all

    @property
    def dtype(self) -> str:
        return self.source.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.source.shape)
        if self.transposed:
            shape[-1], shape[-2] = shape[-2], shape[-1]
        if self.parity is not None:
            axis = -2 if self.transposed else -1
            shape[axis] //= 2
        return tuple(shape)

    @property
    def nbytes(self) -> int:
        return self.source.nbytes // (2 if self.parity is not None else 1)

    def read_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        x = self.source.read_rows(start, stop)
        if self.transposed:
            x = x.swapaxes(-1, -2)
        if self.parity is not None:
            x = x[..., self.parity::2, :] if self.transposed else x[..., self.parity::2]
        return np.ascontiguousarray(x)

    def read(self) -> np.ndarray:
        return self.read_rows()


@dataclass(frozen=True)
class Mxfp4Experts:
    """A released checkpoint's MXFP4 experts (blocks [E, rows, cols/32, 16] of nibbles, scales [E, rows, cols/32] of
    e8m0 exponents) read as llama.cpp's MXFP4 blocks: each scale byte followed by its 16 bytes, the nibbles reordered
    as the converter reorders them. `parity` picks gate (0) or up (1) of gate_up's interleaved rows."""

    name: str
    blocks: LazyTensor
    scales: LazyTensor
    parity: int | None

    dtype = "MXFP4"

    @property
    def shape(self) -> tuple[int, ...]:
        n_expert, rows, n_blocks, _ = self.blocks.shape
        return (n_expert, rows // (2 if self.parity is not None else 1), n_blocks * MXFP4_BLOCK)

    @property
    def nbytes(self) -> int:
        n_expert, rows, cols = self.shape
        return n_expert * rows * cols // MXFP4_BLOCK * MXFP4_BYTES

    def read_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        blocks, scales = self.blocks.read_rows(start, stop), self.scales.read_rows(start, stop)
        if self.parity is not None:
            blocks, scales = blocks[:, self.parity::2], scales[:, self.parity::2]
        packed = np.concatenate([scales[..., None], ggml_nibble_order(blocks)], axis=-1)
        return np.ascontiguousarray(packed.reshape(*packed.shape[:2], -1))

    def read(self) -> np.ndarray:
        return self.read_rows()


@dataclass(frozen=True)
class DequantizedMxfp4:
    """MXFP4 experts as transformers' float parameter: [E, cols, rows] float32 (its layout, transposed)."""

    name: str
    source: Mxfp4Experts
    dtype = "F32"

    @property
    def shape(self) -> tuple[int, ...]:
        n_expert, rows, cols = self.source.shape
        return (n_expert, cols, rows)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4

    def read_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        values = gguf.quants.dequantize(self.source.read_rows(start, stop), gguf.GGMLQuantizationType.MXFP4)
        return np.ascontiguousarray(values.swapaxes(-1, -2))

    def read(self) -> np.ndarray:
        return self.read_rows()


def ggml_nibble_order(blocks: np.ndarray) -> np.ndarray:
    """The checkpoint's 16 bytes of a block hold values 2i (low nibble) and 2i+1 (high) in byte i; ggml's hold values
    i (low) and i+16 (high)."""
    values = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    return (values[..., :16] | (values[..., 16:] << 4)).astype(np.uint8)


def _expert_tensors(tensors: Mapping[str, LazyTensor]) -> dict[str, LazyTensor]:
    """The experts as llama.cpp stores them, MXFP4 ones first (in checkpoint order), then the rest in place."""
    first: dict[str, LazyTensor] = {}
    rest: dict[str, LazyTensor] = {}
    for name, tensor in tensors.items():
        found = EXPERTS.fullmatch(name)
        if name.endswith(".self_attn.sinks"):
            rest[f"{name}.weight"] = tensor
        elif found is None:
            rest[name] = tensor
        elif found[3] == "_scales":
            first |= _mxfp4(found[1], found[2], tensors)
        elif found[3] == "_blocks":
            if f"{found[1]}.{found[2]}_scales" not in tensors:
                raise CheckpointError(f"{name} has no {found[1]}.{found[2]}_scales beside it",
                                      "the checkpoint is incomplete; download the missing shards")
        else:
            rest |= _float_experts(found[1], found[2], found[3] == "_bias", tensor)
    return first | rest


def _mxfp4(prefix: str, kind: str, tensors: Mapping[str, LazyTensor]) -> dict[str, LazyTensor]:
    blocks_name = f"{prefix}.{kind}_blocks"
    if blocks_name not in tensors:
        raise CheckpointError(f"{prefix}.{kind}_scales has no {blocks_name} beside it",
                              "the checkpoint is incomplete; download the missing shards")
    blocks, scales = tensors[blocks_name], tensors[f"{prefix}.{kind}_scales"]
    if kind == "down_proj":
        return {f"{prefix}.down_proj.weight": Mxfp4Experts(f"{prefix}.down_proj.weight", blocks, scales, None)}
    return {f"{prefix}.{part}.weight": Mxfp4Experts(f"{prefix}.{part}.weight", blocks, scales, parity)
            for part, parity in (("gate_proj", 0), ("up_proj", 1))}


def _float_experts(prefix: str, kind: str, bias: bool, tensor: LazyTensor) -> dict[str, LazyTensor]:
    suffix = "bias" if bias else "weight"
    if kind == "down_proj":
        name = f"{prefix}.down_proj.{suffix}"
        return {name: tensor if bias else ExpertView(name, tensor, True, None)}
    return {f"{prefix}.{part}.{suffix}": ExpertView(f"{prefix}.{part}.{suffix}", tensor, not bias, parity)
            for part, parity in (("gate_proj", 0), ("up_proj", 1))}


def warn_if_yarn_untruncated(config: dict[str, Any]) -> None:
    """llama.cpp rounds yarn's correction range to whole dimensions; gpt-oss's config asks transformers not to."""
    rope = full_attention_rope(config)
    if rope.get("rope_type") == "yarn" and rope.get("truncate") is False:
        log.warning("mt: warning: this gpt-oss config computes yarn rope without rounding its correction range "
                    "(truncate: false); llama.cpp rounds it, so its logits differ slightly from transformers' "
                    "(KLD ~1e-5 on the test model)")


def require_llama_cpp_layout(config: dict[str, Any], n_layer: int) -> None:
    require_layer_types(config, n_layer, 2, 2)
    for key, value in LLAMA_CPP_SWIGLU.items():
        if config.get(key, value) != value:
            raise UnsupportedArchitecture(f"config.json's {key} is {config[key]}; llama.cpp's gpt-oss uses {value}",
                                          "llama.cpp cannot run this activation")


class GptOss(Architecture):
    gguf_arch = "gpt-oss"
    names = NameTable(GPT_OSS_NAMES, DROPPED)

    def write_hparams(self, w: GGUFContents, file_type: int) -> None:
        require_llama_cpp_layout(self.config, self.block_count())
        warn_if_yarn_untruncated(self.config)
        write_text_hparams(w, self.config, self.block_count(), file_type)
        w.add_sliding_window(self.config["sliding_window"])
        w.add_expert_feed_forward_length(self.config["intermediate_size"])

    def source_tensors(self, tensors: Mapping[str, LazyTensor]) -> Mapping[str, LazyTensor]:
        return _expert_tensors(tensors)

    def transformers_tensors(self, tensors: Mapping[str, LazyTensor]) -> Mapping[str, LazyTensor]:
        """A released checkpoint's MXFP4 experts dequantized, as transformers loads them without MXFP4 kernels."""
        out: dict[str, LazyTensor] = {}
        for name, tensor in tensors.items():
            found = EXPERTS.fullmatch(name)
            if found is None or found[3] not in ("_blocks", "_scales"):
                out[name] = tensor
            elif found[3] == "_scales":
                fused = f"{found[1]}.{found[2]}"
                packed = Mxfp4Experts(fused, tensors[f"{fused}_blocks"], tensor, None)
                out[fused] = DequantizedMxfp4(fused, packed)
        return out


FAMILY = Family(ATTENTION_LINEAR)  # merged (LoRA on attention) and converted; not trained by mt
ARCH = GptOss
