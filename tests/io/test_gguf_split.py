"""Split GGUF files: the parts llama.cpp's converter writes, what llama.cpp loads, and one file again on merge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader, GGUFWriter, LlamaFileType

from mt.cli import main
from mt.convert.convert import convert
from mt.demo import build_tiny_llama
from mt.io.gguf_in import read_header
from mt.io.gguf_split import SplitLimit, merge_gguf, parse_size, split_gguf
from mt.quant.quantize import quantize_gguf
from mt.release.release import release
from mt.verify.logits import llama_cpp_logits
from tests.llama_quantize import llama_quantize
from tests.oracle import run_converter


def parts_of(folder: Path, stem: str) -> list[Path]:
    return sorted(folder.glob(f"{stem}-*-of-*.gguf"))


def converter_parts(src: Path, folder: Path, outtype: str, max_tensors: int) -> list[Path]:
    """convert_hf_to_gguf.py --split-max-tensors: its parts m-00001-of-0000N.gguf …"""
    folder.mkdir()
    run_converter(src, folder / "m.gguf", outtype, ["--split-max-tensors", str(max_tensors)])
    return parts_of(folder, "m")


def test_split_then_merge_gives_back_the_file(llama3_dir, tmp_path):
    whole = tmp_path / "m.gguf"
    convert(llama3_dir, whole, "q4_k_m")
    parts = split_gguf(whole, tmp_path / "parts", SplitLimit(max_tensors=5))
    assert [p.name for p in parts] == [f"parts-{i:05d}-of-{len(parts):05d}.gguf" for i in range(1, len(parts) + 1)]
    assert len(parts) > 2
    merge_gguf(parts[0], tmp_path / "again.gguf")
    assert (tmp_path / "again.gguf").read_bytes() == whole.read_bytes()


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_release_parts_are_the_converters_parts(llama3_dir, tmp_path, outtype):
    theirs = converter_parts(llama3_dir, tmp_path / "ref", outtype, 6)
    result = release(llama3_dir, tmp_path / "dist", [outtype], name="m", verify=None, split=SplitLimit(max_tensors=6))
    ours = [p.path for p in result.files[0].parts]
    assert len(theirs) > 2 and [p.name for p in ours] == [f"m-{outtype.upper()}{p.name[1:]}" for p in theirs]
    for mine, ref in zip(ours, theirs):
        assert mine.read_bytes() == ref.read_bytes(), mine.name
    assert result.files[0].path == ours[0]
    modelfile = (tmp_path / "dist" / result.files[0].modelfile).read_text()
    assert result.files[0].modelfile == f"m-{outtype.upper()}.Modelfile" and modelfile.startswith(f"FROM ./{ours[0].name}\n")
    assert any("Ollama takes a single file" in note for note in result.notes)


def test_mt_split_by_tensors_matches_the_converters_parts(llama3_dir, tmp_path):
    theirs = converter_parts(llama3_dir, tmp_path / "ref", "f16", 4)
    convert(llama3_dir, tmp_path / "whole.gguf", "f16")
    ours = split_gguf(tmp_path / "whole.gguf", tmp_path / "m", SplitLimit(max_tensors=4))
    assert [p.name for p in ours] == [p.name for p in theirs]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(ours, theirs))


def test_parts_by_size_fill_up_to_the_limit_in_order(tmp_path):
    """gguf-split's rule, checked from the files: each part's padded tensor bytes stay within the limit, and the
    next part's first tensor would have taken the part over it. (The demo's model: a 600-token vocabulary, so
    no tensor dwarfs the others.)"""
    whole = tmp_path / "m.gguf"
    convert(build_tiny_llama(tmp_path / "tiny"), whole, "q8_0")
    limit = 50_000
    parts = split_gguf(whole, tmp_path / "p", SplitLimit(max_bytes=limit))
    readers = [GGUFReader(p) for p in parts]
    sizes = [[GGUFWriter.ggml_pad(int(t.n_bytes), 32) for t in r.tensors] for r in readers]
    assert len(parts) > 2
    assert all(sum(s) <= limit for s in sizes)
    assert all(sum(a) + b[0] > limit for a, b in zip(sizes, sizes[1:]))
    assert [t.name for r in readers for t in r.tensors] == [t.name for t in GGUFReader(whole).tensors]
    for i, r in enumerate(readers):
        assert r.fields["split.no"].contents() == i and r.fields["split.count"].contents() == len(parts)
        assert r.fields["split.tensors.count"].contents() == sum(len(x.tensors) for x in readers)
        assert ("general.architecture" in r.fields) == (i == 0)


def test_llama_cpp_loads_the_parts_and_computes_the_same_logits(llama3_dir, tmp_path):
    whole = tmp_path / "m.gguf"
    convert(llama3_dir, whole, "q8_0")
    parts = split_gguf(whole, tmp_path / "p", SplitLimit(max_tensors=3))
    ids = list(range(1, 40))
    assert np.array_equal(llama_cpp_logits(parts[0], ids), llama_cpp_logits(whole, ids))


def test_quantize_takes_a_first_part_as_llama_quantize_does(llama3_dir, tmp_path):
    whole = tmp_path / "m.gguf"
    convert(llama3_dir, whole, "f16")
    parts = split_gguf(whole, tmp_path / "p", SplitLimit(max_tensors=5))
    quantize_gguf(parts[0], tmp_path / "ours.gguf", "q4_k_m")
    llama_quantize(parts[0], tmp_path / "theirs.gguf", LlamaFileType.MOSTLY_Q4_K_M)
    quantize_gguf(whole, tmp_path / "from-whole.gguf", "q4_k_m")
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "theirs.gguf").read_bytes()
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "from-whole.gguf").read_bytes()


def test_verify_and_inspect_take_a_first_part(llama3_dir, tmp_path):
    whole = tmp_path / "m.gguf"
    convert(llama3_dir, whole, "q8_0")
    parts = split_gguf(whole, tmp_path / "p", SplitLimit(max_tensors=4))
    verified = CliRunner().invoke(main, ["verify", str(parts[0]), "--reference", str(llama3_dir), "--max-tokens", "64",
                                         "--ctx", "128"])
    assert verified.exit_code == 0, verified.output
    shown = CliRunner().invoke(main, ["inspect", str(parts[0])])
    assert shown.exit_code == 0 and f"split in {len(parts)} parts" in shown.output.splitlines()[0]
    assert len(read_header(parts[0]).tensors) == len(read_header(whole).tensors)


@pytest.mark.parametrize("text, expected", [("2G", 2_000_000_000), ("500M", 500_000_000), ("300k", 300_000),
                                            ("12345", 12345)])
def test_sizes_are_decimal(text, expected):
    assert parse_size(text) == expected


def _one_error_line(result) -> str:
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mt: error: "), result.output
    return lines[0]


@pytest.mark.parametrize("args, needle", [
    (["--split-max-size", "10K"], "alone is"),
    (["--split-max-size", "2X"], "is not a size"),
    (["--split-max-size", "1G", "--split-max-tensors", "3"], "both given"),
    (["--split-max-tensors", "0"], "below 1"),
])
def test_bad_split_options_are_one_line_and_write_nothing(llama3_dir, tmp_path, args, needle):
    whole = tmp_path / "m.gguf"
    convert(llama3_dir, whole, "f16")
    result = CliRunner().invoke(main, ["split", str(whole), str(tmp_path / "p"), *args])
    assert needle in _one_error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_release_with_a_split_size_below_a_tensor_leaves_nothing(llama3_dir, tmp_path):
    result = CliRunner().invoke(main, ["release", str(llama3_dir), "-o", str(tmp_path / "dist"), "--quants", "f16",
                                       "--no-verify", "--split-max-size", "20K"])
    assert "over --split-max-size" in _one_error_line(result)
    assert list(tmp_path.iterdir()) == []


def test_bad_parts_are_named(llama3_dir, tmp_path):
    whole = tmp_path / "m.gguf"
    convert(llama3_dir, whole, "f16")
    parts = split_gguf(whole, tmp_path / "p", SplitLimit(max_tensors=8))
    runner = CliRunner()
    assert "pass p-00001-of" in _one_error_line(runner.invoke(main, ["inspect", str(parts[1])]))
    assert "is not split" in _one_error_line(runner.invoke(main, ["split", "--merge", str(whole), str(tmp_path / "x.gguf")]))
    parts[-1].rename(tmp_path / "elsewhere.gguf")
    assert "is missing" in _one_error_line(runner.invoke(main, ["split", "--merge", str(parts[0]), str(tmp_path / "x.gguf")]))
    assert not (tmp_path / "x.gguf").exists()
    result = runner.invoke(main, ["split", str(whole), str(tmp_path / "p"), "--split-max-tensors", "8"])
    assert "exists" in _one_error_line(result)
