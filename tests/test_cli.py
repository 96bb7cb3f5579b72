"""The CLI surface: dry-run plan, inspect of files and folders, JSON output, signals."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mt.cli import main


def test_dry_run_prints_plan_without_writing(llama3_dir, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(llama3_dir), "--outtype", "q8_0", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    names = [t["name"] for t in plan["tensors"]]
    assert names[0] == "rope_freqs.weight" and "token_embd.weight" in names and "output.weight" not in names  # tied
    types = {t["name"]: t["type"] for t in plan["tensors"]}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert plan["file_type"] == "MOSTLY_Q8_0"
    assert plan["tensor_bytes"] == sum(t["bytes"] for t in plan["tensors"])
    assert not list(tmp_path.iterdir())


def test_dry_run_text(llama3_dir):
    result = CliRunner().invoke(main, ["convert", str(llama3_dir), "--outtype", "bf16", "--dry-run"])
    assert result.exit_code == 0
    assert "blk.1.ffn_down.weight" in result.output and "file type MOSTLY_BF16" in result.output


def test_convert_json_and_inspect(llama3_dir, tmp_path):
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(main, ["convert", str(llama3_dir), "-o", str(out), "--outtype", "q8_0", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["arch"] == "llama" and summary["pre_tokenizer"] == "llama-bpe" and summary["bytes"] == out.stat().st_size

    result = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    report = json.loads(result.output)
    assert report["metadata"]["general.architecture"] == "llama"
    assert report["metadata"]["general.file_type"] == 7
    by_name = {t["name"]: t for t in report["tensors"]}
    assert by_name["blk.0.ffn_up.weight"]["type"] == "Q8_0" and by_name["blk.0.ffn_up.weight"]["bpw"] == 8.5
    text = CliRunner().invoke(main, ["inspect", str(out)]).output
    assert "bits per weight" in text and "tokenizer.ggml.pre = llama-bpe" in text
    assert "GGUF v3, architecture llama," in text


def test_inspect_says_what_llama_cpp_would_refuse(llama3_dir, tmp_path):
    from tests.verify import corrupt

    good = tmp_path / "m.gguf"
    assert CliRunner().invoke(main, ["convert", str(llama3_dir), "-o", str(good), "--outtype", "f16"]).exit_code == 0
    report = json.loads(CliRunner().invoke(main, ["inspect", str(good), "--json"]).output)
    assert report["loadable"] and report["load_problem"] is None
    bad = corrupt.rewrite(good, tmp_path / "bad.gguf", tensors=corrupt.drop_tensor("blk.1.ffn_up.weight"))
    result = CliRunner().invoke(main, ["inspect", str(bad)])
    assert result.exit_code == 0, result.output
    assert "llama.cpp cannot load this file: " in result.output
    assert "tensor 'blk.1.ffn_up.weight' is missing (the other layers have it)" in result.output


def test_inspect_folder_names_family(qwen2_dir):
    result = CliRunner().invoke(main, ["inspect", str(qwen2_dir)])
    assert result.exit_code == 0
    assert "Qwen2ForCausalLM (mt module qwen2, GGUF architecture qwen2)" in result.output and "tokenizer.json" in result.output


def test_inspect_missing_and_not_gguf(tmp_path):
    assert CliRunner().invoke(main, ["inspect", str(tmp_path / "nope.gguf")]).exit_code == 1
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + bytes(20))
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "x.gguf")])
    assert result.exit_code == 1 and "not a GGUF file" in result.output


def test_inspect_folder_lists_recognised_roles(qwen2_dir):
    report = json.loads(CliRunner().invoke(main, ["inspect", str(qwen2_dir), "--json"]).output)
    assert report["family"] == "qwen2" and report["gguf_architecture"] == "qwen2"
    roles = report["recognised"]["roles"]
    assert roles["blk.*.attn_q.bias"] == 2 and roles["token_embd.weight"] == 1
    assert report["recognised"]["unknown"] == []


def _copy_with(src: Path, dst: Path, config_changes: dict, extra_tensor: str | None = None) -> Path:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **config_changes}))
    if extra_tensor is not None:
        tensors = load_file(dst / "model.safetensors")
        tensors[extra_tensor] = torch.zeros(4, dtype=torch.bfloat16)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_inspect_names_unknown_tensors(qwen2_dir, tmp_path):
    src = _copy_with(qwen2_dir, tmp_path / "m", {}, extra_tensor="model.layers.0.self_attn.mystery.weight")
    result = CliRunner().invoke(main, ["inspect", str(src)])
    assert result.exit_code == 0
    assert "NOT recognised (1; mt convert stops at these): model.layers.0.self_attn.mystery.weight" in result.output


def test_unsupported_architecture_lists_supported(qwen2_dir, tmp_path):
    from mt.convert.arch import supported

    src = _copy_with(qwen2_dir, tmp_path / "m", {"architectures": ["FooForCausalLM"]})
    shown = CliRunner().invoke(main, ["inspect", str(src)]).output
    assert "FooForCausalLM (not supported by mt; mt converts " + ", ".join(supported()) in shown
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "x.gguf")])
    assert result.exit_code == 1 and not (tmp_path / "x.gguf").exists()
    assert "'FooForCausalLM' is not supported" in result.output and ", ".join(supported()) in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_inspect_tada_lists_backbone_and_companion_roles(tada_dir):
    report = json.loads(CliRunner().invoke(main, ["inspect", str(tada_dir), "--json"]).output)
    assert report["family"] == "tada" and report["gguf_architecture"] == "llama"
    roles = report["recognised"]["roles"]
    assert roles["blk.*.attn_q.weight"] == 2
    assert roles["companion -acoustic: prediction_head.layers.*.ffn.gate_proj.weight"] == 2
    assert roles["companion -acoustic: acoustic_proj.weight"] == 1
    assert report["recognised"]["unknown"] == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_clean_up_as_ctrl_c_does(llama3_dir, tmp_path, signum):
    """A release in progress (its hidden staging folder written) is stopped: exit 128 + the signal, one line,
    nothing left in the folder."""
    dist = tmp_path / "dist"
    proc = subprocess.Popen([sys.executable, "-m", "mt", "release", str(llama3_dir), "-o", str(dist), "--quiet",
                             "--quants", "f32,f16,q8_0,q4_k_m,q5_k_m,q6_k", "--no-verify"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(".mt-partial-" in p.name for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "the release ended before it could be stopped"
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert err.strip().splitlines() == [f"mt: error: stopped by {signal.Signals(signum).name}; no output was left behind"]
    assert list(tmp_path.iterdir()) == []
