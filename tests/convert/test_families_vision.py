"""Gemma 3 with vision: the text GGUF and the mmproj GGUF are the converter's bytes (its run without and with
--mmproj), and llama.cpp's multimodal library, given the pair, embeds an image as transformers' vision tower and
projector do."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mt.cli import main
from mt.convert.convert import convert
from mt.verify.verify import verify
from tests.checkpoints import GEMMA3_PREPROCESSOR
from tests.gguf_compare import assert_same_file
from tests.mtmd_oracle import image_embeddings
from tests.oracle import run_converter


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_same_files_as_llama_cpp_converter(gemma3_vision_dir, tmp_path, outtype):
    result = convert(gemma3_vision_dir, tmp_path / "model.gguf", outtype)
    assert result.mmproj is not None and result.mmproj.path == tmp_path / "mmproj-model.gguf"
    run_converter(gemma3_vision_dir, tmp_path / "ref.gguf", outtype)
    run_converter(gemma3_vision_dir, tmp_path / "ref-mmproj.gguf", outtype, ["--mmproj"])
    assert_same_file(tmp_path / "model.gguf", tmp_path / "ref.gguf")
    assert_same_file(tmp_path / "mmproj-model.gguf", tmp_path / "ref-mmproj.gguf")


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
    value (4e-4 without). Without Gemma's 1 + weight on the projector's norm the embeddings are far off: the check
    sees the projector's arithmetic."""
    image = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    convert(gemma3_vision_dir, tmp_path / "model.gguf", "f32")
    got = image_embeddings(tmp_path / "model.gguf", tmp_path / "mmproj-model.gguf", image)
    want = transformers_image_features(gemma3_vision_dir, image, llama_cpp_rounding=True)
    assert got.shape == want.shape == (16, 256)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 2e-4 * scale, np.abs(got - want).max() / scale

    broken = tmp_path / "broken.gguf"
    shutil.copyfile(tmp_path / "mmproj-model.gguf", broken)
    _subtract_one(broken, "mm.soft_emb_norm.weight")
    off = image_embeddings(tmp_path / "model.gguf", broken, image)
    assert np.abs(off - want).max() > 0.1 * scale


def _subtract_one(path: Path, name: str) -> None:
    import gguf

    reader = gguf.GGUFReader(path, "r+")
    tensor = next(t for t in reader.tensors if t.name == name)
    tensor.data[...] -= 1.0
    reader.data.flush()


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


def test_no_image_statistics_is_one_line(gemma3_vision_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for file in gemma3_vision_dir.iterdir():
        if file.name != "preprocessor_config.json":
            (src / file.name).symlink_to(file)
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(out)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
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
