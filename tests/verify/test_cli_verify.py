"""mt verify on the command line: exit codes, reports, one-line errors for bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mt.cli import main
from mt.convert.convert import convert
from tests.verify import corrupt

SMALL = ["--max-tokens", "64", "--ctx", "128"]


@pytest.fixture(scope="module")
def llama2_f16(llama2_spm_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli_verify") / "m-f16.gguf"
    convert(llama2_spm_dir, out, "f16")
    return out


def run(*args: str):
    return CliRunner().invoke(main, ["verify", *map(str, args)])


def test_pass_writes_json_and_markdown(llama2_spm_dir, llama2_f16, tmp_path):
    result = run(llama2_f16, "--reference", llama2_spm_dir, *SMALL, "--json", tmp_path / "r.json", "--markdown", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().endswith("PASS") and "PASS  tensors" in result.output and "INFO  quality" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is True and report["file_type"] == "F16"
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses["tokenization"] == statuses["conversion"] == statuses["tensors"] == "pass"
    quality = next(c for c in report["checks"] if c["name"] == "quality")["data"]
    assert len(quality["kld_per_token"]) == 64 and max(quality["kld_per_token"]) == pytest.approx(quality["kld_max"], abs=1e-9)
    md = (tmp_path / "r.md").read_text()
    assert md.startswith("### GGUF verification: pass") and "| tensors | pass |" in md and "| quality | info |" in md


def test_json_to_stdout(llama2_spm_dir, llama2_f16):
    result = run(llama2_f16, "--reference", llama2_spm_dir, *SMALL, "--json", "-")
    assert result.exit_code == 0
    assert json.loads(result.output)["checks"][0]["name"] == "metadata"


def test_fail_exits_1_and_names_the_checks(llama2_spm_dir, llama2_f16, tmp_path):
    bad = corrupt.rewrite(llama2_f16, tmp_path / "bad.gguf", kv={"tokenizer.ggml.bos_token_id": 2,
                                                                 "tokenizer.chat_template": corrupt.DROP})
    result = run(bad, "--reference", llama2_spm_dir, *SMALL, "--markdown", tmp_path / "r.md")
    assert result.exit_code == 1
    last = result.output.rstrip().splitlines()[-1]
    assert last.startswith("FAIL: ") and "vocabulary" in last and "chat template" in last
    assert "tokenizer.ggml.bos_token_id = 2, mt's conversion of the source has 1" in result.output
    assert "### GGUF verification: fail" in (tmp_path / "r.md").read_text()


def test_usage_errors_exit_2(llama2_f16):
    assert run(llama2_f16).exit_code == 2  # no --reference
    assert run(llama2_f16, "--reference", ".", "--max-tokens", "0").exit_code == 2
    assert run(llama2_f16, "--reference", ".", "--max-kld", "-1").exit_code == 2
    assert run(llama2_f16, "--reference", ".", "--min-top1", "1.5").exit_code == 2
    assert run(llama2_f16, "--reference", ".", "--reference-layers", "0").exit_code == 2


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mt: error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_and_not_gguf(llama2_spm_dir, tmp_path):
    _one_line_error(run(tmp_path / "nope.gguf", "--reference", llama2_spm_dir), "does not exist")
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + bytes(64))
    _one_line_error(run(tmp_path / "x.gguf", "--reference", llama2_spm_dir), "not a GGUF file")


def test_reference_without_config_or_tokenizer(llama2_spm_dir, llama2_f16, tmp_path):
    _one_line_error(run(llama2_f16, "--reference", tmp_path / "missing"), "is not a folder")
    no_config = tmp_path / "no_config"
    shutil.copytree(llama2_spm_dir, no_config)
    (no_config / "config.json").unlink()
    _one_line_error(run(llama2_f16, "--reference", no_config), "no config.json")
    no_tok = tmp_path / "no_tok"
    shutil.copytree(llama2_spm_dir, no_tok)
    for name in ("tokenizer.json", "tokenizer.model"):
        (no_tok / name).unlink()
    _one_line_error(run(llama2_f16, "--reference", no_tok), "no tokenizer.json or tokenizer.model")


def test_architecture_mismatch(qwen2_dir, llama2_f16):
    _one_line_error(run(llama2_f16, "--reference", qwen2_dir), "is a 'llama' model", "Qwen2ForCausalLM")


def test_existing_report_needs_force(llama2_spm_dir, llama2_f16, tmp_path):
    (tmp_path / "r.json").write_text("old")
    _one_line_error(run(llama2_f16, "--reference", llama2_spm_dir, "--json", tmp_path / "r.json"), "exists", "--force")
    assert (tmp_path / "r.json").read_text() == "old"


def test_text_file_not_utf8(llama2_spm_dir, llama2_f16, tmp_path):
    (tmp_path / "t.txt").write_bytes(b"\xff\xfe bad")
    _one_line_error(run(llama2_f16, "--reference", llama2_spm_dir, "--text", tmp_path / "t.txt"), "not UTF-8")
    _one_line_error(run(llama2_f16, "--reference", llama2_spm_dir, "--text", tmp_path / "none.txt"), "cannot read")


def test_adapter_without_config(llama2_spm_dir, llama2_f16, tmp_path):
    _one_line_error(run(llama2_f16, "--reference", llama2_spm_dir, "--adapter", tmp_path), "no adapter_config.json")


def test_quality_bar_fails_a_correct_file_with_exit_1(llama2_spm_dir, llama2_f16):
    result = run(llama2_f16, "--reference", llama2_spm_dir, *SMALL, "--max-kld", "1e-12")
    assert result.exit_code == 1, result.output
    assert result.output.rstrip().splitlines()[-1] == "FAIL: quality"


def test_missing_or_damaged_imatrix(llama2_spm_dir, llama2_f16, tmp_path):
    _one_line_error(run(llama2_f16, "--reference", llama2_spm_dir, "--imatrix", tmp_path / "none.gguf"), "none.gguf")
    (tmp_path / "bad.dat").write_bytes(b"\x01\x00")
    _one_line_error(run(llama2_f16, "--reference", llama2_spm_dir, "--imatrix", tmp_path / "bad.dat"), "bad.dat")
