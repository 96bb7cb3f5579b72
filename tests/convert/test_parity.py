"""mt convert against llama.cpp's own convert_hf_to_gguf.py: same tensors, same bytes, same metadata."""

from pathlib import Path

import pytest

from mt.convert.convert import convert
from tests.gguf_compare import read_gguf
from tests.oracle import run_converter

CASES = [
    ("llama3_dir", "bf16"),
    ("llama3_dir", "f32"),
    ("llama3_dir", "q8_0"),
    ("llama3_dir", "auto"),
    ("llama3_sharded_dir", "bf16"),
    ("llama2_spm_dir", "f16"),
    ("llama2_spm_dir", "q8_0"),
    ("qwen2_dir", "bf16"),
    ("qwen2_dir", "q8_0"),
    ("mistral_dir", "q8_0"),
    ("llama2_odd_rows_f16_dir", "q8_0"),
    ("llama2_odd_rows_f16_dir", "auto"),
    ("llama3_f32_untied_dir", "f16"),
    ("llama3_f32_untied_dir", "bf16"),
    ("llama3_f32_untied_dir", "f32"),
]


@pytest.mark.parametrize("fixture, outtype", CASES)
def test_same_file_as_llama_cpp_converter(request, tmp_path, fixture, outtype):
    src: Path = request.getfixturevalue(fixture)
    ref_out, mt_out = tmp_path / "ref.gguf", tmp_path / "mt.gguf"
    run_converter(src, ref_out, outtype)
    convert(src, mt_out, outtype)
    if mt_out.read_bytes() == ref_out.read_bytes():
        return
    ref, ours = read_gguf(ref_out), read_gguf(mt_out)
    assert [t[:3] for t in ours.tensors] == [t[:3] for t in ref.tensors]
    for (name, *_, ref_bytes), (_, *_, our_bytes) in zip(ref.tensors, ours.tensors):
        assert our_bytes == ref_bytes, f"{name}: tensor data differs"
    assert ours.kv == ref.kv
    pytest.fail("files differ outside tensor data and metadata (alignment or padding)")


@pytest.mark.parametrize("fixture", ["llama3_dir", "llama2_spm_dir", "qwen2_dir"])
def test_vocab_only_same_file(request, tmp_path, fixture):
    src: Path = request.getfixturevalue(fixture)
    ref_out, mt_out = tmp_path / "ref.gguf", tmp_path / "mt.gguf"
    run_converter(src, ref_out, "f16", ["--vocab-only"])
    convert(src, mt_out, "f16", vocab_only=True)
    if mt_out.read_bytes() != ref_out.read_bytes():
        assert read_gguf(mt_out).kv == read_gguf(ref_out).kv
        pytest.fail("vocab-only files differ outside the metadata")


def test_bf16_nan_payloads_quieted_like_converter(llama3_dir, tmp_path):
    """Signalling NaNs in a bf16 tensor take ggml's quieting, not the byte-copy fast path (written with
    --allow-non-finite: mt refuses NaN weights by default, tests/convert/test_non_finite.py)."""
    import json
    import shutil
    import struct

    src = Path(shutil.copytree(llama3_dir, tmp_path / "src"))
    path = src / "model.safetensors"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    begin = 8 + n + header["model.layers.0.mlp.up_proj.weight"]["data_offsets"][0]
    data[begin : begin + 8] = struct.pack("<4H", 0x7F81, 0xFF81, 0x7FC0, 0x7F80)
    path.write_bytes(bytes(data))
    ref_out, mt_out = tmp_path / "ref.gguf", tmp_path / "mt.gguf"
    run_converter(src, ref_out, "bf16")
    convert(src, mt_out, "bf16", allow_non_finite=True)
    assert mt_out.read_bytes() == ref_out.read_bytes()
