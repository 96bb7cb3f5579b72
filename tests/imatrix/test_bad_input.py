"""Every input mt imatrix refuses: one line naming the problem and the fix, exit 1, no output left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from mt.cli import main
from mt.convert.convert import convert
from tests.imatrix.test_compute import calibration_text
from tests.merge import adapters
from tests.merge.test_bad_adapters import assert_refused as refused


def assert_refused(args: list[str], words: tuple[str, ...], out: Path) -> None:
    refused(["imatrix", *args, "-o", str(out)], words, out)


@pytest.fixture()
def text(tmp_path: Path) -> Path:
    path = tmp_path / "calibration.txt"
    path.write_text(calibration_text(), encoding="utf-8")
    return path


def test_empty_text(llama3_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text(" \n\n", encoding="utf-8")
    assert_refused([str(llama3_dir), "--text", str(tmp_path / "empty.txt")], ("empty.txt is empty", "1024 tokens"),
                   tmp_path / "imatrix.gguf")


def test_text_too_short_for_two_contexts(llama3_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("A short text of a few words.", encoding="utf-8")
    assert_refused([str(llama3_dir), "--text", str(tmp_path / "short.txt"), "--ctx", "64"],
                   ("short.txt tokenizes to", "a context of 64 needs at least 128", "smaller --ctx"),
                   tmp_path / "imatrix.gguf")


def test_text_not_utf8(llama3_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 500)
    assert_refused([str(llama3_dir), "--text", str(tmp_path / "latin1.txt")], ("not UTF-8",), tmp_path / "imatrix.gguf")


def test_context_longer_than_the_model_s(llama3_dir: Path, text: Path, tmp_path: Path) -> None:
    assert_refused([str(llama3_dir), "--text", str(text), "--ctx", "4096"],
                   ("--ctx 4096 is longer than the model's context (2048 tokens)", "at most 2048"), tmp_path / "im.gguf")


def test_adapter_that_does_not_fit(llama3_f32_untied_dir: Path, text: Path, tmp_path: Path) -> None:
    adapter = adapters.build_bad_adapter("shape_mismatch", llama3_f32_untied_dir, tmp_path / "adapter")
    assert_refused([str(llama3_f32_untied_dir), "--text", str(text), "--adapter", str(adapter)],
                   ("model.layers.0.self_attn.q_proj.weight", "[96, 96]", "[64, 64]"), tmp_path / "imatrix.gguf")


def test_gguf_of_another_model(llama3_dir: Path, qwen3_dir: Path, text: Path, tmp_path: Path) -> None:
    other = tmp_path / "qwen3.gguf"
    convert(qwen3_dir, other, "f16")
    assert_refused([str(llama3_dir), "--text", str(text), "--from", str(other)],
                   ("--from", "qwen3.gguf has no tensor blk.0.attn_output.weight of 64 columns", "converted from this model"),
                   tmp_path / "imatrix.gguf")


@pytest.mark.parametrize(("options", "words"), [
    (["--batch", "300", "--ctx", "128"], ("--batch 300 is above --ctx 128 but not a multiple of it",)),
    (["--chunks", "0"], ("must be positive",)),
])
def test_sizes(options: list[str], words: tuple[str, ...], llama3_dir: Path, text: Path, tmp_path: Path) -> None:
    assert_refused([str(llama3_dir), "--text", str(text), *options], words, tmp_path / "imatrix.gguf")


def test_existing_output_needs_force(llama3_dir: Path, text: Path, tmp_path: Path) -> None:
    out = tmp_path / "imatrix.gguf"
    out.write_bytes(b"kept")
    result = CliRunner().invoke(main, ["imatrix", str(llama3_dir), "--text", str(text), "-o", str(out)])
    assert result.exit_code == 1 and "exists" in result.output and "--force" in result.output
    assert out.read_bytes() == b"kept"
