"""The CLI surface: dry-run plan, inspect of files and folders, JSON output."""

import json

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


def test_inspect_folder_names_family(qwen2_dir):
    result = CliRunner().invoke(main, ["inspect", str(qwen2_dir)])
    assert result.exit_code == 0
    assert "Qwen2ForCausalLM (mt module qwen2)" in result.output and "tokenizer.json" in result.output


def test_inspect_missing_and_not_gguf(tmp_path):
    assert CliRunner().invoke(main, ["inspect", str(tmp_path / "nope.gguf")]).exit_code == 1
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + bytes(20))
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "x.gguf")])
    assert result.exit_code == 1 and "not a GGUF file" in result.output
