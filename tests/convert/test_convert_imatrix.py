"""mt convert --outtype MIX --imatrix: the file llama_model_quantize writes from the F32 conversion with the same
importance matrix (weights and quantize.imatrix.* keys), byte for byte."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mt.cli import main
from mt.convert.convert import convert
from tests.gguf_compare import assert_same_file
from tests.imatrix_files import write_gguf
from tests.quant.test_quantize_imatrix import model_imatrix, reference


@pytest.mark.parametrize("mix", ["q4_k_m", "q5_k_s", "q4_0"])
def test_mix_with_imatrix_is_llama_quantizes_file(llama2_256_dir, tmp_path, mix):
    f32 = tmp_path / "m-f32.gguf"
    convert(llama2_256_dir, f32, "f32")
    raw = model_imatrix(f32)
    path = write_gguf(raw, tmp_path / "imatrix.gguf")
    reference(f32, tmp_path / "ref.gguf", mix, str(path), raw.expected_gguf_map(), raw, raw.datasets[0])
    convert(llama2_256_dir, tmp_path / "mt.gguf", mix, imatrix=str(path))
    assert_same_file(tmp_path / "mt.gguf", tmp_path / "ref.gguf")


def test_imatrix_for_a_converter_type_is_one_line(llama2_256_dir, tmp_path):
    f32 = tmp_path / "m-f32.gguf"
    convert(llama2_256_dir, f32, "f32")
    path = write_gguf(model_imatrix(f32), tmp_path / "imatrix.gguf")
    result = CliRunner().invoke(main, ["convert", str(llama2_256_dir), "-o", str(tmp_path / "q8.gguf"), "--outtype", "q8_0",
                                       "--imatrix", str(path)])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "--imatrix goes with llama.cpp's mixes" in result.output and not (tmp_path / "q8.gguf").exists()
