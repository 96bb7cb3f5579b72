"""The mmproj GGUF of a vision-language checkpoint (llama.cpp's `clip` architecture): the vision tower and its
projector, as `convert_hf_to_gguf.py --mmproj` writes them. llama.cpp's multimodal library (mtmd) loads it beside
the text model's GGUF."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType as T

from mt.convert.arch import multimodal
from mt.convert.arch.projector import VISION_PART, Projector, VisionConfig, vision_config
from mt.convert.general import write_general_metadata
from mt.convert.plan import PlanEntry, TensorPlan, check_float, resolve_outtype, write_planned
from mt.convert.vocab import read_json
from mt.errors import CheckpointError, MtError
from mt.io.checkpoint import Checkpoint, SideFiles
from mt.io.gguf_out import GGUFContents
from mt.io.stream import Progress
from mt.quant.outtypes import OutType, row_fits

MMPROJ_ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ]  # "clip"
MMPROJ_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # the converter's; llama-quantize does not take mmproj files
DEFAULT_MMPROJ_OUTTYPE = "f16"  # for the text model's llama.cpp mixes (Q4_K_M …), as GGUF releases ship it
POSITION_EMBEDDINGS = (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_POS] + ".weight",
                       gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.A_ENC_EMBD_POS] + ".weight")
PREPROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def vision_part(ckpt: Checkpoint) -> Checkpoint | None:
    return ckpt.parts.get(VISION_PART)


def projector_of(part: Checkpoint) -> Projector:
    found = multimodal(part.architecture)
    assert found is not None, part.architecture
    return found.projector


def mmproj_path(out: Path) -> Path:
    """Where the mmproj of the text file `out` goes: mmproj-<stem>.gguf beside it."""
    return out.with_name(f"mmproj-{out.stem}{out.suffix or '.gguf'}")


def mmproj_outtype(outtype: str, ckpt: Checkpoint) -> OutType:
    """The text file's type where the converter writes it (auto resolved as the converter does), else F16."""
    return resolve_outtype(outtype if outtype in (*MMPROJ_OUTTYPES, "auto") else DEFAULT_MMPROJ_OUTTYPE, ckpt)


def read_preprocessor(files: SideFiles) -> dict:
    """The image processor's settings: preprocessor_config.json, then processor_config.json's (its image_processor
    lifted to the top), as the converter merges them."""
    merged: dict = {}
    for name, nested in zip(PREPROCESSOR_FILES, ("media_proc_cfg", "image_processor")):
        if (files / name).is_file():
            cfg = read_json(files / name)
            if not isinstance(cfg, dict):
                raise CheckpointError(f"{files / name} is not a JSON object", "fix or replace the file")
            merged.update({**cfg, **(cfg.get(nested) or {})})
    if "image_mean" not in merged or "image_std" not in merged:
        raise CheckpointError(f"{files.folder} has no image_mean/image_std (preprocessor_config.json), which the "
                              "mmproj file records", "copy preprocessor_config.json from the base model")
    return merged


def mmproj_plan(part: Checkpoint, out: OutType) -> TensorPlan:
    """The vision part's tensors in checkpoint order, typed by the converter's rules for mmproj files."""
    projector = projector_of(part)
    entries = []
    for hf_name, name, ref in projector.written(part.tensors):
        check_float(hf_name, ref)
        qtype = _tensor_type(projector, hf_name, name, len(ref.shape), ref.shape[-1], out)
        entries.append(PlanEntry(name, ref.shape, qtype, source=ref, transform=projector.transform_for(name)))
    return TensorPlan(out.file_type, entries)


def _tensor_type(projector: Projector, hf_name: str, name: str, n_dims: int, n_per_row: int, out: OutType) -> T:
    forced = projector.forced_type(hf_name, name, out.file_type)
    if n_dims <= 1 or name.endswith("_norm.weight"):
        return T.F32
    if forced is not None:
        return forced
    if name in POSITION_EMBEDDINGS or not name.endswith(".weight"):
        return T.F32
    return out.base if row_fits(out.base, n_per_row) else T.F16


def mmproj_contents(part: Checkpoint, plan: TensorPlan) -> GGUFContents:
    """MmprojModel's header: general.*, the common vision keys, the family's, the quantization version."""
    projector = projector_of(part)
    w = GGUFContents(MMPROJ_ARCH)
    for e in plan.entries:
        w.add_slot(e.name, e.shape, e.qtype, e.nbytes)
    w.add_type(gguf.GGUFType.MMPROJ)
    write_general_metadata(w, part.folder)
    w.add_file_type(int(plan.file_type))
    v = vision_config(part.config, projector, read_preprocessor(part.side_files))
    _write_vision_keys(w, v)
    w.add_clip_projector_type(projector.projector_type)
    projector.write_metadata(w, v)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return w


def _write_vision_keys(w: GGUFContents, v: VisionConfig) -> None:
    if v.text_hidden_size <= 0:
        raise MtError("the config gives no hidden_size for the text model", "add text_config.hidden_size to config.json")
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(v.text_hidden_size)
    w.add_vision_image_size(v.vision["image_size"])
    w.add_vision_patch_size(v.vision["patch_size"])
    w.add_vision_embedding_length(v.vision["hidden_size"])
    w.add_vision_feed_forward_length(v.vision["intermediate_size"])
    w.add_vision_block_count(v.vision["num_hidden_layers"])
    w.add_vision_head_count(v.vision["num_attention_heads"])
    w.add_vision_image_mean(v.preprocessor["image_mean"])
    w.add_vision_image_std(v.preprocessor["image_std"])


@dataclass
class MmprojOutput:
    """The mmproj file of a conversion: the vision part it holds, where it goes, its plan and header (made before
    anything is written, so a config llama.cpp cannot run stops the conversion first)."""

    part: Checkpoint
    path: Path
    plan: TensorPlan
    contents: GGUFContents

    def write(self, path: Path, progress: Progress | None, total: int, check_finite: bool = True) -> int:
        return write_planned(path, self.contents, self.plan, self.part.config, progress, total, check_finite)


def mmproj_output(ckpt: Checkpoint, path: Path, out: OutType) -> MmprojOutput | None:
    """The mmproj file of type `out` at `path` for a vision-language source, None for the others."""
    part = vision_part(ckpt)
    if part is None:
        return None
    plan = mmproj_plan(part, out)
    return MmprojOutput(part, path, plan, mmproj_contents(part, plan))
