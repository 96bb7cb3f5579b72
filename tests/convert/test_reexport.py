"""`mt convert --format safetensors`: every tensor cast to the asked dtype, a folder transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mt.cli import main

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def reexport(src: Path, out: Path, outtype: str, *extra: str):
    return CliRunner().invoke(main, ["convert", str(src), "--format", "safetensors", "--outtype", outtype, "-o", str(out),
                                     "--quiet", *extra])


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


@pytest.mark.parametrize("fixture, outtype", [("tada_dir", "bf16"), ("tada_dir", "f16"), ("llama3_dir", "f16")])
def test_tensors_are_exactly_the_cast_source(request, tmp_path, fixture, outtype):
    src = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    result = reexport(src, out, outtype)
    assert result.exit_code == 0, result.output
    source, written = load_folder(src), load_folder(out)
    assert set(written) == set(source)
    for name, t in source.items():
        assert written[name].dtype == DTYPES[outtype], name
        assert torch.equal(written[name], t.to(DTYPES[outtype])), name
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == str(DTYPES[outtype]).removeprefix("torch.")
    assert config["architectures"] == json.loads((src / "config.json").read_text())["architectures"]
    for side in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / side).read_bytes() == (src / side).read_bytes(), side


def test_transformers_loads_the_tada_backbone(tada_dir, tmp_path):
    from transformers import LlamaForCausalLM

    out = tmp_path / "out"
    assert reexport(tada_dir, out, "bf16").exit_code == 0
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    source = load_folder(tada_dir)
    state = model.state_dict()
    for name, t in source.items():
        if name.startswith("model."):
            assert torch.equal(state[name], t.to(torch.bfloat16)), name
    with torch.no_grad():
        logits = model(torch.tensor([[128000, 9906, 1917]])).logits
    assert torch.isfinite(logits).all()


def test_gguf_only_outtype_is_refused_naming_the_allowed_types(tada_dir, tmp_path):
    result = reexport(tada_dir, tmp_path / "out", "q4_k_m")
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mt: error: ") and "bf16, f16, f32" in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_existing_folder_needs_force(tada_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    result = reexport(tada_dir, out, "f16")
    assert result.exit_code == 1 and "exists" in result.output and "--force" in result.output
    assert (out / "keep").exists()
    assert reexport(tada_dir, out, "f16", "--force").exit_code == 0
    assert not (out / "keep").exists() and (out / "model.safetensors").exists()


def test_f16_overflow_is_named(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    save_file({"big.weight": torch.full((2, 2), 1e6)}, str(src / "model.safetensors"))
    result = reexport(src, tmp_path / "out", "f16")
    assert result.exit_code == 1 and "big.weight" in result.output and "bf16" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_non_float_tensors_are_refused_naming_one(tada_codec_dir, tmp_path):
    result = reexport(tada_codec_dir, tmp_path / "out", "f16")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "_precomputed_mask" in lines[0] and "BOOL" in lines[0]
    assert not (tmp_path / "out").exists()
