"""A SentencePiece vocabulary that does not fit its checkpoint: one line, never a cut or overwritten token list."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mt.cli import main


def convert_fails(src: Path, tmp_path: Path, needle: str) -> None:
    out = tmp_path / "o.gguf"
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--outtype", "f16", "--quiet"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and needle in lines[0], result.output
    assert not out.exists()


def test_a_tokenizer_larger_than_the_model_is_not_cut(llama2_spm_dir, tmp_path):
    """config.json and the embedding agree on 100 rows; tokenizer.model has 32000 pieces."""
    src = Path(shutil.copytree(llama2_spm_dir, tmp_path / "src"))
    tensors = load_file(src / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in tensors:
            tensors[name] = tensors[name][:100].contiguous()
    save_file(tensors, str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["vocab_size"] = 100
    (src / "config.json").write_text(json.dumps(config))
    convert_fails(src, tmp_path, "the vocabulary would be cut")


def test_an_added_token_with_a_negative_id(llama2_spm_dir, tmp_path):
    src = Path(shutil.copytree(llama2_spm_dir, tmp_path / "src"))
    (src / "added_tokens.json").write_text(json.dumps({"<extra>": -3}))
    convert_fails(src, tmp_path, "gives '<extra>' the id -3, not a token id")
