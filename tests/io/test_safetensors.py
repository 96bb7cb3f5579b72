import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from mt.errors import CorruptTensorFile
from mt.io.safetensors import read_header


def write_raw(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_reads_rows_lazily_in_storage_dtype(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    b = np.arange(6, dtype=np.float16)
    save_file({"a": a, "b": b}, str(tmp_path / "m.safetensors"))
    refs, _ = read_header(tmp_path / "m.safetensors")
    assert refs["a"].shape == (4, 3) and refs["a"].dtype == "F32"
    assert np.array_equal(refs["a"].read_rows(1, 3), a[1:3])
    assert np.array_equal(refs["b"].read(), b)


def test_bf16_is_raw_uint16(tmp_path):
    bits = np.array([0x3F80, 0xC000], dtype=np.uint16)
    path = write_raw(tmp_path / "m.safetensors", {"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, bits.tobytes())
    refs, _ = read_header(path)
    assert refs["w"].read().tolist() == [0x3F80, 0xC000]


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "past the data section"),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12"),
        ({"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "malformed data_offsets"),
        ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "malformed shape"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            b"\0" * 12,
            "overlap",
        ),
    ],
)
def test_corrupt_headers_are_refused(tmp_path, header, data, message):
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CorruptTensorFile, match=message) as e:
        read_header(path)
    assert "download it again" in e.value.one_line()


def test_header_length_beyond_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CorruptTensorFile, match="runs past the end"):
        read_header(path)


def test_truncated_file_and_bad_json(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\1\2")
    with pytest.raises(CorruptTensorFile, match="too short"):
        read_header(tmp_path / "short.safetensors")
    raw = b"{not json"
    (tmp_path / "j.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CorruptTensorFile, match="not valid JSON"):
        read_header(tmp_path / "j.safetensors")
