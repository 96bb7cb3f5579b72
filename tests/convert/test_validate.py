"""The checkpoint against its config.json, before anything is written: each disagreement is one line, exit 1, no
output (llama.cpp could not load the file mt would otherwise write with exit 0)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from mt.cli import main
from mt.demo import build_tiny_llama


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("src") / "tiny")


def convert_fails(src: Path, tmp_path: Path, *needles: str) -> None:
    out = tmp_path / "o.gguf"
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--outtype", "f16", "--quiet"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mt: error: ") and "internal error" not in lines[0], result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "mt-partial" in p.name]


@pytest.mark.parametrize("key, value, needle", [
    ("vocab_size", None, "config.json has no vocab_size"),
    ("num_attention_heads", 7, "not a multiple of num_attention_heads 7"),
    ("num_key_value_heads", 0, "num_key_value_heads is 0, not a positive whole number"),
    ("num_key_value_heads", 3, "not a multiple of num_key_value_heads 3"),
    ("hidden_size", "64", "hidden_size is '64'"),
    ("hidden_size", 0, "hidden_size is 0"),
    ("num_hidden_layers", 8, "no tensors for layer 2"),
    ("num_hidden_layers", 1, "is in layer 1, but config.json's num_hidden_layers is 1"),
    ("vocab_size", 100, "has 600 rows, but config.json's vocab_size is 100"),
    ("intermediate_size", 100, "config.json implies [64, 100]"),
    ("head_dim", 8, "config.json implies"),
])
def test_config_that_disagrees_with_the_tensors(good, tmp_path, key, value, needle):
    src = Path(shutil.copytree(good, tmp_path / "src"))
    config = json.loads((src / "config.json").read_text())
    if value is None:
        del config[key]
    else:
        config[key] = value
    (src / "config.json").write_text(json.dumps(config))
    convert_fails(src, tmp_path, needle)


def edit_tensors(src: Path, edit) -> None:
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(src / "model.safetensors"))


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.update({"model.layers.9.self_attn.q_proj.weight": t.pop("model.layers.1.self_attn.q_proj.weight")}),
     "is in layer 9"),
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "'model.layers.1.mlp.up_proj.weight' is missing"),
    (lambda t: t.update({"lm_head.weight": np.ascontiguousarray(t["lm_head.weight"].T)}), "'lm_head.weight' has shape [64, 600]"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": t["model.layers.0.self_attn.q_proj.weight"]}),
     "'model.layers.0.self_attn.k_proj.weight' has shape [64, 64], config.json implies [32, 64]"),
])
def test_tensors_that_disagree_with_the_config(good, tmp_path, edit, needle):
    src = Path(shutil.copytree(good, tmp_path / "src"))
    edit_tensors(src, edit)
    convert_fails(src, tmp_path, needle)
