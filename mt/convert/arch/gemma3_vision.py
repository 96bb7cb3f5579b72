"""Gemma 3 with vision (Gemma3ForConditionalGeneration): the Gemma 3 text model, and a SigLIP vision tower whose
patch embeddings are average-pooled to `mm_tokens_per_image` tokens, RMS-normed (Gemma's 1 + weight) and projected
to the text width: llama.cpp's `gemma3` projector, written as Gemma3VisionModel of convert_hf_to_gguf.py writes it.

Released checkpoints store the tower as vision_tower.vision_model.*; transformers 4.5x saves model.vision_tower.*,
transformers 5 saves vision_tower.* without vision_model: all three read as the first.
"""

from __future__ import annotations

from typing import Any

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType

from mt.convert.arch.base import NameTable
from mt.convert.arch.family import Family
from mt.convert.arch.gemma2 import add_one
from mt.convert.arch.gemma3 import Gemma3
from mt.convert.arch.projector import Multimodal, Projector, VisionConfig, common_forced_type
from mt.io.gguf_out import GGUFContents

TOWER = "vision_tower.vision_model"
VISION_NAMES = {
    f"{TOWER}.embeddings.patch_embedding": "v.patch_embd",
    f"{TOWER}.embeddings.position_embedding": "v.position_embd",
    f"{TOWER}.encoder.layers.{{bid}}.self_attn.q_proj": "v.blk.{bid}.attn_q",
    f"{TOWER}.encoder.layers.{{bid}}.self_attn.k_proj": "v.blk.{bid}.attn_k",
    f"{TOWER}.encoder.layers.{{bid}}.self_attn.v_proj": "v.blk.{bid}.attn_v",
    f"{TOWER}.encoder.layers.{{bid}}.self_attn.out_proj": "v.blk.{bid}.attn_out",
    f"{TOWER}.encoder.layers.{{bid}}.layer_norm1": "v.blk.{bid}.ln1",
    f"{TOWER}.encoder.layers.{{bid}}.layer_norm2": "v.blk.{bid}.ln2",
    f"{TOWER}.encoder.layers.{{bid}}.mlp.fc1": "v.blk.{bid}.ffn_up",
    f"{TOWER}.encoder.layers.{{bid}}.mlp.fc2": "v.blk.{bid}.ffn_down",
    f"{TOWER}.post_layernorm": "v.post_ln",
    "multi_modal_projector.mm_input_projection": "mm.input_projection",
    "multi_modal_projector.mm_soft_emb_norm": "mm.soft_emb_norm",
}
SKIPPED = (f"{TOWER}.head.",)  # SigLIP's pooling head, which Gemma 3 does not use

# SiglipVisionConfig's defaults for the keys the mmproj header holds (the converter reads the config via AutoConfig)
SIGLIP_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6,
}
DEFAULT_SCALE_FACTOR = 4  # llama.cpp's pooling for Gemma 3 (896 px, 14 px patches, 256 tokens)


def vision_name(name: str) -> str:
    """The released spelling of a stored vision name (the projector's mm_input_projection_weight included)."""
    name = name.removeprefix("model.")
    if name.startswith("vision_tower.") and not name.startswith(f"{TOWER}."):
        name = f"{TOWER}.{name.removeprefix('vision_tower.')}"
    return name.replace("_weight", ".weight")


def forced_type(hf_name: str, gguf_name: str, file_type: LlamaFileType) -> T | None:
    if "input_projection" in hf_name:
        return T.F16
    if ".embeddings." in hf_name:
        return T.F32
    return common_forced_type(hf_name, gguf_name, file_type)


def write_metadata(w: GGUFContents, v: VisionConfig) -> None:
    w.add_vision_attention_layernorm_eps(v.vision["layer_norm_eps"])
    w.add_vision_use_gelu(True)
    per_side = int(int(v.preprocessor.get("image_seq_length", 256)) ** 0.5)
    scale = (v.vision["image_size"] // v.vision["patch_size"]) // per_side
    if scale > 0 and scale != DEFAULT_SCALE_FACTOR:
        w.add_vision_projector_scale_factor(scale)


PROJECTOR = Projector(
    projector_type="gemma3",
    names=NameTable(VISION_NAMES),
    skipped_prefixes=SKIPPED,
    write_metadata=write_metadata,
    forced_type=forced_type,
    vision_defaults=SIGLIP_DEFAULTS,
    transforms={"mm.soft_emb_norm.weight": add_one},
)
MULTIMODAL = Multimodal(
    text_arch=Gemma3,
    vision_prefixes=("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."),
    vision_name=vision_name,
    projector=PROJECTOR,
)
FAMILY = Family()
