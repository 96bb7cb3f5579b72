"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): a Qwen2 text model with multimodal rope (`qwen2vl` in llama.cpp,
its rope sections in the header) and a ViT with RMS norms, SwiGLU MLPs, fused qkv, window attention on all layers
but every `n_wa_pattern`-th and a 2x2 patch merger: llama.cpp's `qwen2.5vl_merger` projector, written as
Qwen2VLVisionModel of convert_hf_to_gguf.py writes it (qkv split in three, the Conv3d patch kernel in its two
temporal planes).

On text alone the three rope positions are equal and multimodal rope is plain rope: transformers' Qwen2 computes
the same, and is the text model's reference.
"""

from __future__ import annotations

from typing import Any

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType

from mt.convert.arch.base import NameTable
from mt.convert.arch.family import Family
from mt.convert.arch.projector import (AxisSlice, Multimodal, Projector, RowRange, VisionConfig,
                                       common_forced_type)
from mt.convert.arch.qwen2 import Qwen2
from mt.errors import UnsupportedArchitecture
from mt.io.checkpoint import LazyTensor
from mt.io.gguf_out import GGUFContents


class Qwen2VL(Qwen2):
    gguf_arch = "qwen2vl"


VISION_NAMES = {
    "visual.patch_embed.proj": "v.patch_embd",
    "visual.patch_embed.proj.weight.1": "v.patch_embd.weight.1",  # the kernel's second temporal plane
    "visual.blocks.{bid}.attn.q": "v.blk.{bid}.attn_q",
    "visual.blocks.{bid}.attn.k": "v.blk.{bid}.attn_k",
    "visual.blocks.{bid}.attn.v": "v.blk.{bid}.attn_v",
    "visual.blocks.{bid}.attn.proj": "v.blk.{bid}.attn_out",
    "visual.blocks.{bid}.norm1": "v.blk.{bid}.ln1",
    "visual.blocks.{bid}.norm2": "v.blk.{bid}.ln2",
    "visual.blocks.{bid}.mlp.gate_proj": "v.blk.{bid}.ffn_gate",
    "visual.blocks.{bid}.mlp.up_proj": "v.blk.{bid}.ffn_up",
    "visual.blocks.{bid}.mlp.down_proj": "v.blk.{bid}.ffn_down",
    "visual.merger.ln_q": "v.post_ln",
    "visual.merger.mlp.0": "mm.0",
    "visual.merger.mlp.2": "mm.2",
}
PATCH_KERNEL = "visual.patch_embed.proj.weight"
TEMPORAL_AXIS = 2  # Conv3d weight [out, in, time, height, width]

# Qwen2_5_VLVisionConfig's defaults; llama.cpp's image size when the config has none (the converter's)
VISION_DEFAULTS: dict[str, Any] = {
    "depth": 32, "hidden_size": 3584, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
    "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "image_size": 560,
}
LLAMA_CPP_MERGE, LLAMA_CPP_WINDOW = 2, 112  # clip.cpp's spatial merge and attention window (pixels), not read


def vision_name(name: str) -> str:
    return name.removeprefix("model.")


def pieces(name: str, tensor: LazyTensor) -> list[tuple[str, LazyTensor]]:
    """qkv as its q, k and v rows; the patch kernel as its two temporal planes."""
    if ".attn.qkv." in name:
        third = tensor.shape[0] // 3
        return [(name.replace(".qkv.", f".{part}."), RowRange(name, tensor, i * third, (i + 1) * third))
                for i, part in enumerate("qkv")]
    if name == PATCH_KERNEL:
        if tensor.shape[TEMPORAL_AXIS] != 2:
            raise UnsupportedArchitecture(f"the patch kernel spans {tensor.shape[TEMPORAL_AXIS]} frames",
                                          "llama.cpp's Qwen2.5-VL takes temporal_patch_size 2")
        return [(PATCH_KERNEL, AxisSlice(name, tensor, TEMPORAL_AXIS, 0)),
                (f"{PATCH_KERNEL}.1", AxisSlice(name, tensor, TEMPORAL_AXIS, 1))]
    return [(name, tensor)]


def vision_keys(vision: dict[str, Any]) -> dict[str, Any]:
    """The converter's renames (num_heads, depth) and the layouts llama.cpp can run checked."""
    if vision["spatial_merge_size"] != LLAMA_CPP_MERGE or vision["window_size"] != LLAMA_CPP_WINDOW:
        raise UnsupportedArchitecture(
            f"vision spatial_merge_size {vision['spatial_merge_size']} and window_size {vision['window_size']}: "
            f"llama.cpp's Qwen2.5-VL merges {LLAMA_CPP_MERGE}x{LLAMA_CPP_MERGE} patches in {LLAMA_CPP_WINDOW} px windows",
            "llama.cpp cannot run this vision layout")
    return {**vision, "num_attention_heads": vision["num_heads"], "num_hidden_layers": vision["depth"]}


def window_pattern(full_attention_layers: list[int], depth: int) -> int:
    """llama.cpp's n_wa_pattern: every pattern-th layer attends fully, the others in windows."""
    pattern = full_attention_layers[0] + 1
    expected = list(range(pattern - 1, depth, pattern))
    if list(full_attention_layers) != expected:
        raise UnsupportedArchitecture(f"vision fullatt_block_indexes {full_attention_layers} are not every "
                                      f"{pattern}th layer", "llama.cpp's Qwen2.5-VL takes a fixed window pattern")
    return pattern


def forced_type(hf_name: str, gguf_name: str, file_type: LlamaFileType) -> T | None:
    if ".position_embd." in gguf_name:
        return T.F32
    return common_forced_type(hf_name, gguf_name, file_type)


def write_metadata(w: GGUFContents, v: VisionConfig) -> None:
    w.add_vision_use_silu(True)
    full = v.vision.get("fullatt_block_indexes")
    if not full:
        raise UnsupportedArchitecture("the vision config has no fullatt_block_indexes",
                                      "Qwen2.5-VL's config lists its full-attention layers")
    w.add_vision_n_wa_pattern(window_pattern(full, v.vision["depth"]))
    w.add_vision_attention_layernorm_eps(v.config.get("rms_norm_eps", 1e-6))


def default_rope(text: dict[str, Any]) -> dict[str, Any]:
    """Multimodal rope as transformers' Qwen2 takes it: of the default type (it computes plain rope on text); the
    sections stay for the header."""
    fixed = dict(text)
    for key in ("rope_scaling", "rope_parameters"):
        rope = text.get(key)
        if isinstance(rope, dict) and "mrope" in (rope.get("type"), rope.get("rope_type")):
            fixed[key] = {**{k: v for k, v in rope.items() if k != "type"}, "rope_type": "default"}
    return fixed


PROJECTOR = Projector(
    projector_type="qwen2.5vl_merger",
    names=NameTable(VISION_NAMES),
    write_metadata=write_metadata,
    forced_type=forced_type,
    vision_defaults=VISION_DEFAULTS,
    pieces=pieces,
    vision_keys=vision_keys,
)
MULTIMODAL = Multimodal(
    text_arch=Qwen2VL,
    vision_prefixes=("visual.", "model.visual."),
    vision_name=vision_name,
    projector=PROJECTOR,
    text_model_type="qwen2",
    text_config_fix=default_rope,
)
FAMILY = Family()
