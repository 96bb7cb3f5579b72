"""mt demo: a verified release of SmolLM2-135M-Instruct and a chat answer from each file in llama.cpp."""

from click.testing import CliRunner

from mt.cli import main

TYPES = ("F16", "Q8_0", "Q4_K_M")


def test_demo_on_the_tiny_model_releases_verifies_and_prints_the_tables(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--tiny", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for t in TYPES:
        assert (tmp_path / "release" / f"tiny-llama-{t}.gguf").is_file()
        assert f"tiny-llama-{t}.gguf: " in result.output
    assert result.output.count("verify PASS") == 3
    quality = [line for line in result.output.splitlines() if line.startswith("| [tiny-llama-")]
    memory = [line for line in result.output.splitlines() if line.startswith("| tiny-llama-")]
    assert len(quality) == 3 and len(memory) == 3
    assert result.output.count("  user: What is the capital of France?") == 1


def test_demo_on_smollm2_answers_in_llama_cpp(smollm2_dir, tmp_path):
    """The real model: transformers answers Paris (tests/test_real_model.py); so does llama.cpp from the F16 file."""
    result = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.count("verify PASS") == 3
    answers = {t: line for line in result.output.splitlines() for t in TYPES if line.strip().startswith(f"{t}: ")}
    assert set(answers) == set(TYPES) and "Paris" in answers["F16"]
    assert f"files are in {tmp_path / 'release'}" in result.output
