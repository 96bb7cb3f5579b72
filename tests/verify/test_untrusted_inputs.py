"""Nothing in a model folder runs: its Python (config.json and tokenizer_config.json may name custom classes,
`auto_map`, which transformers would offer to run, and run on "y"), nor its pickles without --allow-pickle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mt.cli import main
from mt.convert.convert import convert
from mt.errors import CheckpointError, MtError

PAYLOAD = """from pathlib import Path
Path(__file__).with_name("RAN").write_text("the folder's code ran")
"""


def hostile_copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (dest / f"{module}.py").write_text(PAYLOAD)
    config = json.loads((dest / "config.json").read_text())
    config["model_type"] = "evil-llama"  # a type transformers does not know: only the folder's code could build it
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (dest / "config.json").write_text(json.dumps(config))
    tconfig_path = dest / "tokenizer_config.json"
    tconfig = json.loads(tconfig_path.read_text()) if tconfig_path.is_file() else {}
    tconfig["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    tconfig_path.write_text(json.dumps(tconfig))
    return dest


def test_verify_never_runs_a_reference_folders_code(llama3_dir, tmp_path):
    evil = hostile_copy(llama3_dir, tmp_path / "evil")
    convert(llama3_dir, tmp_path / "m.gguf", "f16")
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "m.gguf"), "--reference", str(evil)], input="y\n" * 20)
    assert not (evil / "RAN").exists()
    assert "[y/N]" not in result.output
    assert result.exit_code == 1 and result.output.startswith("mt: error: ") and result.output.count("\n") == 1, result.output
    assert "internal error" not in result.output


def test_finetune_loaders_never_run_a_base_folders_code(llama3_dir, tmp_path, monkeypatch):
    import io

    import torch

    from mt.finetune.lora import meta_base
    from mt.finetune.trainer import load_tokenizer

    evil = hostile_copy(llama3_dir, tmp_path / "evil")
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 20))  # what a user answering transformers' prompt types
    with pytest.raises(MtError, match="cannot load the tokenizer"):
        load_tokenizer(evil)
    with pytest.raises(CheckpointError):
        meta_base(evil, dtype=torch.float32)
    assert not (evil / "RAN").exists()


def test_a_pickle_reference_needs_allow_pickle(llama3_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(llama3_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    convert(llama3_dir, tmp_path / "m.gguf", "f16")
    args = ["verify", str(tmp_path / "m.gguf"), "--reference", str(pickled)]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and refused.output.count("\n") == 1 and "--allow-pickle" in refused.output
    allowed = CliRunner().invoke(main, [*args, "--allow-pickle", "--max-tokens", "64", "--ctx", "128"])
    assert allowed.exit_code == 0, allowed.output
