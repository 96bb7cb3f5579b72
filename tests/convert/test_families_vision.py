"""Gemma 3 with vision and Qwen2.5-VL: the text GGUF and the mmproj GGUF are the converter's bytes (its run without
and with --mmproj), llama.cpp runs the text file as transformers runs the vision-language model on text, and
llama.cpp's multimodal library, given the pair, embeds an image as transformers' vision tower and projector do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mt.cli import main
from mt.convert.convert import convert
from mt.merge.merge import merge
from mt.verify.logits import compare_logits, llama_cpp_logits
from mt.verify.verify import verify
from tests.checkpoints import GEMMA3_PREPROCESSOR, QWEN2_5_VL_PREPROCESSOR
from tests.convert.test_families_dense import edited_copy, linked_copy
from tests.convert.test_families_moe import run_convert
from tests.convert.test_families_qwen3_phi3 import assert_same_top1_where_decided, prompt_ids
from tests.gguf_compare import assert_same_file
from tests.merge import adapters
from tests.merge.test_merge import max_relative_error, read_folder
from tests.mtmd_oracle import image_embeddings
from tests.oracle import run_converter


TOLERANCE = 2e-4  # of the largest embedding value, llama.cpp's roundings applied to the reference


@pytest.mark.parametrize("fixture, outtype", [("gemma3_vision_dir", "f32"), ("gemma3_vision_dir", "q8_0"),
                                              ("qwen2_5_vl_dir", "f16"), ("qwen2_5_vl_dir", "q8_0")])
def test_same_files_as_llama_cpp_converter(request, tmp_path, fixture, outtype):
    src = request.getfixturevalue(fixture)
    result = convert(src, tmp_path / "model.gguf", outtype)
    assert result.mmproj is not None and result.mmproj.path == tmp_path / "mmproj-model.gguf"
    run_converter(src, tmp_path / "ref.gguf", outtype)
    run_converter(src, tmp_path / "ref-mmproj.gguf", outtype, ["--mmproj"])
    assert_same_file(tmp_path / "model.gguf", tmp_path / "ref.gguf")
    assert_same_file(tmp_path / "mmproj-model.gguf", tmp_path / "ref-mmproj.gguf")


@pytest.mark.parametrize("fixture", ["gemma3_vision_dir", "qwen2_5_vl_dir"])
def test_text_logits_match_transformers(request, tmp_path, fixture):
    """The text file in llama.cpp against the vision-language model in transformers on text alone (Qwen2.5-VL's
    multimodal rope with its three positions equal included): F32, 48 tokens, KLD ≤ 1e-5."""
    from transformers import AutoModelForImageTextToText

    src = request.getfixturevalue(fixture)
    convert(src, tmp_path / "m.gguf", "f32")
    ids = prompt_ids(src, 48)
    model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    ours = llama_cpp_logits(tmp_path / "m.gguf", ids)
    assert compare_logits(ref, ours).kld_max <= 1e-5
    assert_same_top1_where_decided(ref, ours)


def test_a_mix_comes_with_an_f16_mmproj(gemma3_vision_dir, tmp_path):
    """llama-quantize takes no mmproj file: beside a Q4_K_M the projector is the converter's F16 one."""
    convert(gemma3_vision_dir, tmp_path / "model.gguf", "q4_k_m")
    run_converter(gemma3_vision_dir, tmp_path / "ref-mmproj.gguf", "f16", ["--mmproj"])
    assert_same_file(tmp_path / "mmproj-model.gguf", tmp_path / "ref-mmproj.gguf")


def test_transformers5_layout_reads_as_the_released_one(gemma3_vision_dir, tmp_path):
    """transformers 5 saves the tower without `vision_model.`: the same two files (the folder named alike)."""
    saved = _transformers5_copy(gemma3_vision_dir, tmp_path / "t5" / gemma3_vision_dir.name)
    convert(saved, tmp_path / "t5.gguf", "f16")
    convert(gemma3_vision_dir, tmp_path / "hub.gguf", "f16")
    assert_same_file(tmp_path / "t5.gguf", tmp_path / "hub.gguf")
    assert_same_file(tmp_path / "mmproj-t5.gguf", tmp_path / "mmproj-hub.gguf")


def _transformers5_copy(src: Path, dest: Path) -> Path:
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True)
    for file in src.iterdir():
        if file.suffix != ".safetensors":
            (dest / file.name).symlink_to(file)
    tower = "vision_tower.vision_model."
    stored = load_file(src / "model.safetensors")
    save_file({("vision_tower." + k.removeprefix(tower) if k.startswith(tower) else k): v for k, v in stored.items()},
              dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_image_embedding_matches_transformers(gemma3_vision_dir, tmp_path):
    """The 16 image tokens libmtmd computes from mt's F32 pair, against Gemma3Model.get_image_features in float32
    with llama.cpp's own roundings applied: its patch embedding takes the image as F16, its CPU GELU reads an F16
    table, the converter keeps the input projection F16 in every file. Then they differ by 8e-5 of the largest
    value (4e-4 without). Without Gemma's 1 + weight on the projector's norm they move 50 times the tolerance: the
    check sees the projector's arithmetic."""
    image = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    convert(gemma3_vision_dir, tmp_path / "model.gguf", "f32")
    got = image_embeddings(tmp_path / "model.gguf", tmp_path / "mmproj-model.gguf", image)
    want = transformers_image_features(gemma3_vision_dir, image, llama_cpp_rounding=True)
    assert got.shape == want.shape == (16, 256)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= TOLERANCE * scale, np.abs(got - want).max() / scale

    broken = tmp_path / "broken.gguf"
    shutil.copyfile(tmp_path / "mmproj-model.gguf", broken)
    _subtract_one(broken, "mm.soft_emb_norm.weight")
    off = image_embeddings(tmp_path / "model.gguf", broken, image)
    assert np.abs(off - want).max() > 50 * TOLERANCE * scale


def _subtract_one(path: Path, name: str) -> None:
    import gguf

    reader = gguf.GGUFReader(path, "r+")
    tensor = next(t for t in reader.tensors if t.name == name)
    tensor.data[...] -= 1.0
    reader.data.flush()


def test_qwen2_5_vl_image_embedding_matches_transformers(qwen2_5_vl_dir, tmp_path):
    """The 64 image tokens of a 224 px image (16x16 patches, four attention windows on layers 0 and 2) from mt's F32
    pair, against Qwen2_5_VLModel.get_image_features in float32 with llama.cpp's roundings (F16 image) and its
    choice for the merger's GELU (tanh, F16 table; transformers: erf): 1e-4 of the largest value (5e-4 without).
    With the fused qkv split in another order (q and k swapped) the embeddings move 50 times the tolerance. (A still
    image is both frames: the patch kernel's two temporal planes could swap unseen; the bytes test holds their
    order.)"""
    image = np.random.default_rng(0).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    convert(qwen2_5_vl_dir, tmp_path / "model.gguf", "f32")
    got = image_embeddings(tmp_path / "model.gguf", tmp_path / "mmproj-model.gguf", image)
    want = qwen2_5_vl_image_features(qwen2_5_vl_dir, image)
    assert got.shape == want.shape == (64, 64)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= TOLERANCE * scale, np.abs(got - want).max() / scale

    broken = tmp_path / "broken.gguf"
    shutil.copyfile(tmp_path / "mmproj-model.gguf", broken)
    _swap_tensors(broken, "v.blk.0.attn_q.weight", "v.blk.0.attn_k.weight")
    off = image_embeddings(tmp_path / "model.gguf", broken, image)
    assert np.abs(off - want).max() > 50 * TOLERANCE * scale


def _swap_tensors(path: Path, a: str, b: str) -> None:
    import gguf

    reader = gguf.GGUFReader(path, "r+")
    first, second = (next(t for t in reader.tensors if t.name == name) for name in (a, b))
    held = np.array(first.data)
    first.data[...] = second.data
    second.data[...] = held
    reader.data.flush()


def qwen2_5_vl_patches(image: np.ndarray, patch: int = 14, temporal: int = 2, merge: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2VLImageProcessor's pixel_values and image_grid_thw for an image it would not resize (transformers'
    processor needs torchvision): normalized, repeated over the two frames, patches grouped by 2x2 merge unit."""
    mean, std = (np.array(QWEN2_5_VL_PREPROCESSOR[k], dtype=np.float32) for k in ("image_mean", "image_std"))
    frames = np.repeat(((image.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)[None], temporal, axis=0)
    channels, height, width = frames.shape[1:]
    grid_h, grid_w = height // patch, width // patch
    grouped = frames.reshape(1, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    grouped = grouped.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return grouped.reshape(grid_h * grid_w, channels * temporal * patch * patch), np.array([[1, grid_h, grid_w]])


def qwen2_5_vl_image_features(src: Path, image: np.ndarray) -> np.ndarray:
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    model.model.visual.merger.mlp[1] = _GeluF16Table()
    pixels, grid = qwen2_5_vl_patches(image)
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=torch.from_numpy(pixels).half().float(),
                                             image_grid_thw=torch.from_numpy(grid))
    features = out if torch.is_tensor(out) else out.pooler_output
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    return features.reshape(-1, features.shape[-1]).numpy()


class _GeluF16Table(torch.nn.Module):
    """ggml's CPU GELU: tanh GELU looked up in a table indexed by the input as F16, holding F16 outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


def transformers_image_features(src: Path, image: np.ndarray, *, llama_cpp_rounding: bool) -> np.ndarray:
    from transformers import Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    mean, std = (np.array(GEMMA3_PREPROCESSOR[k], dtype=np.float32) for k in ("image_mean", "image_std"))
    pixels = torch.from_numpy(((image.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)[None].copy())
    if llama_cpp_rounding:
        pixels = pixels.half().float()
        for layer in model.model.vision_tower.encoder.layers:
            layer.mlp.activation_fn = _GeluF16Table()
        projector = model.model.multi_modal_projector
        with torch.no_grad():
            projector.mm_input_projection_weight.copy_(projector.mm_input_projection_weight.half().float())
        normed = projector.mm_soft_emb_norm.forward
        projector.mm_soft_emb_norm.forward = lambda x: normed(x).half().float()
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pixels)
    features = out if torch.is_tensor(out) else out.pooler_output
    return features.reshape(-1, features.shape[-1]).numpy()


@pytest.mark.parametrize("change, needle", [
    ({"fullatt_block_indexes": [1, 2]}, "fullatt_block_indexes [1, 2]"),
    ({"window_size": 224}, "window_size 224"),
])
def test_qwen2_5_vl_vision_layouts_llama_cpp_cannot_run_are_one_line(qwen2_5_vl_dir, tmp_path, change, needle):
    vision = json.loads((qwen2_5_vl_dir / "config.json").read_text())["vision_config"]
    lines = run_convert(edited_copy(qwen2_5_vl_dir, tmp_path / "src", vision_config={**vision, **change}),
                        tmp_path / "m.gguf")
    assert len(lines) == 1 and needle in lines[0], lines
    assert not list(tmp_path.glob("*.gguf*"))


AS_TRANSFORMERS_HOLDS = {"language_model.model.": "model.language_model.", "vision_tower.vision_model.": "model.vision_tower.",
                         "multi_modal_projector.": "model.multi_modal_projector."}


def test_a_lora_on_text_and_tower_merges_as_peft(gemma3_vision_dir, tmp_path):
    """peft names the layers as transformers 5 holds them (model.language_model.*, model.vision_tower.*), the
    checkpoint stores them as language_model.model.* and vision_tower.vision_model.*: mt merge puts each update on
    the stored tensor, within 1e-6 relative of peft's merge_and_unload (6 text layers x 4 and 2 tower layers x 3
    matrices changed, the rest as stored); the mmproj of `--adapter` holds the tower's updates as the merged
    folder's does."""
    spec = adapters.AdapterSpec(target_modules=r".*\.(q_proj|v_proj|o_proj|gate_proj|fc1)")
    adapter = adapters.build_adapter(gemma3_vision_dir, tmp_path / "adapter", spec)
    merge(gemma3_vision_dir, adapter, tmp_path / "out", dtype="f32")
    got, stored = read_folder(tmp_path / "out"), read_folder(gemma3_vision_dir)
    want = adapters.unaliased(adapters.peft_merged_model(gemma3_vision_dir, adapter).state_dict())
    changed = []
    for key, tensor in got.items():
        held = next((new + key.removeprefix(old) for old, new in AS_TRANSFORMERS_HOLDS.items() if key.startswith(old)), key)
        assert max_relative_error(tensor, want[held]) <= 1e-6, key
        if not torch.equal(tensor, stored[key].float()):
            changed.append(key)
    assert len([k for k in changed if k.startswith("language_model.")]) == 6 * 4
    assert len([k for k in changed if k.startswith("vision_tower.")]) == 2 * 3
    result = convert(gemma3_vision_dir, tmp_path / "m.gguf", "f32", adapter=adapter)
    merge(gemma3_vision_dir, adapter, tmp_path / "bf16")  # the base's dtype, as --adapter merges
    convert(tmp_path / "bf16", tmp_path / "from-merged.gguf", "f32")
    assert result.mmproj is not None
    assert _tensor_bytes(result.mmproj.path) == _tensor_bytes(tmp_path / "mmproj-from-merged.gguf")


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    import gguf

    return {t.name: bytes(np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def test_no_image_statistics_is_one_line(gemma3_vision_dir, tmp_path):
    src = linked_copy(gemma3_vision_dir, tmp_path / "src", ("preprocessor_config.json",))
    lines = run_convert(src, tmp_path / "m.gguf")
    assert len(lines) == 1 and "image_mean" in lines[0] and "preprocessor_config.json" in lines[0], lines
    assert not list(tmp_path.glob("*.gguf*"))


def test_inspect_shows_the_text_model_and_the_projector(gemma3_vision_dir):
    result = CliRunner().invoke(main, ["inspect", str(gemma3_vision_dir)])
    assert result.exit_code == 0, result.output
    assert "Gemma3ForConditionalGeneration" in result.output and "GGUF architecture gemma3" in result.output
    assert "hidden_size = 256" in result.output and "NOT recognised" not in result.output
    assert "mmproj: v.blk.*.attn_q.weight x2" in result.output and "mmproj: mm.input_projection.weight" in result.output


def test_verify_checks_an_mmproj_file_byte_for_byte(gemma3_vision_dir, tmp_path):
    """mt verify on the mmproj: every tensor against mt's mmproj of the source; one changed value fails it."""
    import gguf

    convert(gemma3_vision_dir, tmp_path / "model.gguf", "q8_0")
    mmproj = tmp_path / "mmproj-model.gguf"
    report = verify(mmproj, gemma3_vision_dir)
    assert report.passed and report.architecture == "clip" and report.file_type == "Q8_0", report.to_text()
    reader = gguf.GGUFReader(mmproj, "r+")
    tensor = next(t for t in reader.tensors if t.name == "v.blk.1.attn_q.bias")
    tensor.data[0] += 1.0
    reader.data.flush()
    report = verify(mmproj, gemma3_vision_dir)
    assert [c.name for c in report.failed_checks()] == ["tensors"] and "v.blk.1.attn_q.bias" in report.to_text()
