"""GGUF inputs llama.cpp could not load are refused before any work: one line naming the problem."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from mt.cli import main
from mt.convert.convert import convert
from mt.demo import build_tiny_llama
from mt.io.gguf_in import read_header


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gguf")
    out = folder / "m.gguf"
    convert(build_tiny_llama(folder / "tiny"), out, "f16")
    return out


def edited(good: Path, tmp_path: Path, edit) -> Path:
    data = bytearray(good.read_bytes())
    edit(data)
    out = tmp_path / "bad.gguf"
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d.__setitem__(slice(4, 8), struct.pack("<I", 99)), "GGUF version 99"),
    (lambda d: d.__setitem__(slice(24, 32), struct.pack("<Q", 1 << 60)), "past the end of the file"),
    (lambda d: d.__delitem__(slice(len(d) - 100, len(d))), "past the end of the file"),
])
def test_bad_headers_and_truncation_are_one_line_in_every_command(good, tmp_path, edit, needle):
    bad = edited(good, tmp_path, edit)
    for args in (["inspect", str(bad)], ["quantize", str(bad), str(tmp_path / "q.gguf"), "q4_k_m"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and needle in result.output and result.output.count("\n") == 1, result.output
        assert "internal error" not in result.output
    assert not (tmp_path / "q.gguf").exists()


def test_overlapping_tensors_are_refused(good, tmp_path):
    header = read_header(good)
    second = header.tensors[1]
    # the second tensor's offset field is the last 8 bytes of its info; point it at the first tensor's data
    data = bytearray(good.read_bytes())
    name = second.name.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    offset_at = at + 4 + 8 * n_dims + 4
    struct.pack_into("<Q", data, offset_at, 0)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["inspect", str(bad)])
    assert result.exit_code == 1 and "overlaps" in result.output, result.output


def test_a_folder_given_as_a_gguf_is_named(tmp_path):
    result = CliRunner().invoke(main, ["quantize", str(tmp_path), str(tmp_path / "q.gguf"), "q4_k_m"])
    assert result.exit_code == 1 and "is a folder" in result.output, result.output
