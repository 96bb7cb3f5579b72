from click.testing import CliRunner

from mt.cli import main


def test_demo_runs_convert_quantize_verify_and_passes(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tiny-llama-F16.gguf").is_file() and (tmp_path / "tiny-llama-Q4_K_M.gguf").is_file()
    verdicts = [line for line in result.output.splitlines() if line in ("PASS",) or line.startswith("FAIL")]
    assert verdicts == ["PASS", "PASS"]
    assert "file type Q4_K_M" in result.output and result.output.count("PASS  tensors") == 2
