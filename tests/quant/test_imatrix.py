"""Reading importance-matrix files (GGUF and legacy .dat) as quantize.cpp does, and every bad file."""

import struct
from pathlib import Path

import numpy as np
import pytest

from mt.quant.imatrix import Imatrix, ImatrixError, load_imatrix, output_keys
from tests.imatrix_files import random_imatrix, write_gguf, write_gguf_tensors, write_legacy

SHAPES = {"blk.0.ffn_up.weight": (1, 64), "blk.0.ffn_down.weight": (1, 128), "blk.0.ffn_up_exps.weight": (3, 32)}


def assert_entries_equal(loaded: Imatrix, expected: dict[str, np.ndarray]) -> None:
    assert sorted(loaded.entries) == sorted(expected)
    for name, values in expected.items():
        assert np.array_equal(loaded.entries[name], values), name


def test_gguf_entries_are_averaged_per_matrix(tmp_path):
    raw = random_imatrix(SHAPES, seed=1)
    raw.entries["blk.0.ffn_up_exps.weight"].counts[1] = 0  # an expert that saw no token -> weights 1
    raw.datasets = ["a.txt", "b.txt"]
    loaded = load_imatrix(write_gguf(raw, tmp_path / "i.gguf"))
    assert_entries_equal(loaded, raw.expected_gguf_map())
    assert np.all(loaded.entries["blk.0.ffn_up_exps.weight"][32:64] == 1)
    assert loaded.datasets == [b"a.txt", b"b.txt"] and loaded.chunk_count == 17 and not loaded.is_legacy


def test_gguf_counts_are_rounded_like_lround(tmp_path):
    raw = random_imatrix({"w": (2, 32)}, seed=2)
    raw.entries["w"].counts = np.array([2.5, 0.4])  # lround: 3, and 0 -> weights 1
    loaded = load_imatrix(write_gguf(raw, tmp_path / "i.gguf"))
    assert np.array_equal(loaded.entries["w"][:32], (raw.entries["w"].sums[0] / np.float32(3)).astype(np.float32))
    assert np.all(loaded.entries["w"][32:] == 1)


def test_legacy_entries_and_trailer(tmp_path):
    raw = random_imatrix(SHAPES, seed=3)
    raw.datasets = ["calib.txt"]
    loaded = load_imatrix(write_legacy(raw, tmp_path / "i.dat"))
    assert_entries_equal(loaded, raw.expected_legacy_map())
    assert loaded.datasets == [b"calib.txt"] and loaded.chunk_count == 17 and loaded.is_legacy


def test_legacy_zero_ncall_keeps_values(tmp_path):
    values = np.arange(1, 33, dtype=np.float32)
    path = tmp_path / "i.dat"
    path.write_bytes(struct.pack("<iI", 1, 1) + b"w" + struct.pack("<ii", 0, 32) + values.tobytes())
    loaded = load_imatrix(path)
    assert np.array_equal(loaded.entries["w"], values) and loaded.chunk_count == 0 and loaded.datasets == []


def test_weights_for_checks_sizes():
    imx = Imatrix({"a.weight": np.ones(64, np.float32), "token_embd.weight": np.ones(3, np.float32),
                   "exps.weight": np.ones(96, np.float32)})
    assert imx.weights_for("a.weight", (64, 10)).shape == (1, 64)
    assert imx.weights_for("exps.weight", (32, 5, 3)).shape == (3, 32)
    assert imx.weights_for("missing.weight", (64, 10)) is None
    assert imx.weights_for("token_embd.weight", (64, 10)) is None  # llama.cpp lets a misfit token_embd pass
    with pytest.raises(ImatrixError, match="'a.weight'.*needs 128"):
        imx.weights_for("a.weight", (128, 10))


def test_output_keys_in_llama_quantize_order():
    imx = Imatrix({"a": np.ones(1, np.float32), "b": np.ones(1, np.float32)}, [b"x" * 200 + b"\0tail"], 5)
    keys = output_keys(imx, "dir/" + "f" * 200)
    assert [k for k, _, _ in keys] == ["quantize.imatrix.file", "quantize.imatrix.dataset",
                                       "quantize.imatrix.entries_count", "quantize.imatrix.chunks_count"]
    assert len(keys[0][2]) == 127 and keys[1][2] == b"x" * 127 and keys[2][2] == 2 and keys[3][2] == 5
    assert [k for k, _, _ in output_keys(Imatrix({"a": np.ones(1, np.float32)}), "f")] == [
        "quantize.imatrix.file", "quantize.imatrix.entries_count"]


# --- bad files: one ImatrixError each, naming the problem


def gguf_file(tmp_path: Path, **kwargs) -> Path:
    return write_gguf(random_imatrix(SHAPES, seed=4), tmp_path / "i.gguf", **kwargs)


def test_bad_missing_file(tmp_path):
    with pytest.raises(ImatrixError, match="cannot read"):
        load_imatrix(tmp_path / "nope.gguf")


def test_bad_gguf_truncated_data(tmp_path):
    path = gguf_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ImatrixError, match="truncated"):
        load_imatrix(path)


def test_bad_gguf_truncated_header(tmp_path):
    path = gguf_file(tmp_path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ImatrixError, match="truncated or corrupt header"):
        load_imatrix(path)


def test_bad_gguf_without_metadata(tmp_path):
    with pytest.raises(ImatrixError, match="lacks the metadata imatrix.datasets"):
        load_imatrix(gguf_file(tmp_path, metadata=False))


def test_bad_gguf_counts_not_f32(tmp_path):
    with pytest.raises(ImatrixError, match="not F32"):
        load_imatrix(gguf_file(tmp_path, counts_dtype=np.float16))


def test_bad_gguf_sums_without_counts(tmp_path):
    path = write_gguf_tensors(tmp_path / "i.gguf", {"w.in_sum2": np.ones((1, 32), np.float32)}, ["d"])
    with pytest.raises(ImatrixError, match="'w' has sums but no counts"):
        load_imatrix(path)


def test_bad_gguf_sums_not_a_multiple_of_counts(tmp_path):
    raw = random_imatrix({"w": (1, 33)})
    raw.entries["w"].counts = np.array([5, 5])
    with pytest.raises(ImatrixError, match="33 sums for 2 counts"):
        load_imatrix(write_gguf(raw, tmp_path / "i.gguf"))


def test_bad_nan_values(tmp_path):
    raw = random_imatrix(SHAPES)
    raw.entries["blk.0.ffn_up.weight"].sums[0, 3] = np.nan
    with pytest.raises(ImatrixError, match="'blk.0.ffn_up.weight' holds NaN"):
        load_imatrix(write_gguf(raw, tmp_path / "i.gguf"))
    with pytest.raises(ImatrixError, match="'blk.0.ffn_up.weight' holds NaN"):
        load_imatrix(write_legacy(raw, tmp_path / "i.dat"))


def test_bad_legacy_truncated(tmp_path):
    path = write_legacy(random_imatrix(SHAPES), tmp_path / "i.dat", trailer=False)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ImatrixError, match="truncated"):
        load_imatrix(path)


def test_bad_legacy_truncated_trailer(tmp_path):
    path = write_legacy(random_imatrix(SHAPES), tmp_path / "i.dat")
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ImatrixError, match="truncated.*dataset name"):
        load_imatrix(path)


@pytest.mark.parametrize("content, match", [(b"", "too short"), (struct.pack("<i", 0), "entry count 0"),
                                            (struct.pack("<iI", 1, 1) + b"w" + struct.pack("<ii", 1, 0), "has 0 values")])
def test_bad_legacy_headers(tmp_path, content, match):
    path = tmp_path / "i.dat"
    path.write_bytes(content)
    with pytest.raises(ImatrixError, match=match):
        load_imatrix(path)


def test_bad_gguf_without_entries(tmp_path):
    path = write_gguf_tensors(tmp_path / "i.gguf", {"unrelated": np.ones(4, np.float32)}, ["d"])
    with pytest.raises(ImatrixError, match="no NAME.in_sum2"):
        load_imatrix(path)


def _sums(raw) -> "ImatrixSums":  # noqa: ANN001
    from mt.quant.imatrix import ImatrixSums

    return ImatrixSums({n: e.sums for n, e in raw.entries.items()}, {n: e.counts for n, e in raw.entries.items()},
                       "calibration.txt", raw.chunk_size)


def test_written_gguf_is_llama_imatrix_s_layout(tmp_path):
    """Read back by gguf-py: general.type, the three imatrix keys, tensors by sorted name with sums then counts, a
    single matrix stored 1-D as gguf_add_tensor drops ggml's trailing 1s, experts as [ne0, n_mat] and [1, n_mat]."""
    from gguf import GGUFReader

    from mt.quant.imatrix import write_imatrix_gguf

    raw = random_imatrix(SHAPES, seed=3)
    write_imatrix_gguf(tmp_path / "i.gguf", _sums(raw))
    reader = GGUFReader(tmp_path / "i.gguf")
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    most = max(int(e.counts.max()) for e in raw.entries.values())
    assert fields == {"general.type": "imatrix", "imatrix.datasets": ["calibration.txt"],
                      "imatrix.chunk_count": most // 512, "imatrix.chunk_size": 512}
    names = [t.name for t in reader.tensors]
    assert names == [f"{n}{s}" for n in sorted(SHAPES) for s in (".in_sum2", ".counts")]
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    assert shapes["blk.0.ffn_up.weight.in_sum2"] == [64] and shapes["blk.0.ffn_up.weight.counts"] == [1]
    assert shapes["blk.0.ffn_up_exps.weight.in_sum2"] == [32, 3] and shapes["blk.0.ffn_up_exps.weight.counts"] == [1, 3]
    assert_entries_equal(load_imatrix(tmp_path / "i.gguf"), raw.expected_gguf_map())


def test_written_dat_is_the_legacy_layout(tmp_path):
    """The legacy file averages per matrix and scales by the call count; quantize.cpp reads back the averages."""
    from mt.quant.imatrix import write_imatrix_dat

    raw = random_imatrix(SHAPES, seed=4)
    raw.entries["blk.0.ffn_up_exps.weight"].counts[2] = 0  # stored as 1 * ncall
    raw.entries["blk.0.ffn_down.weight"].counts[:] = 0  # no data: left out
    write_imatrix_dat(tmp_path / "i.dat", _sums(raw))
    loaded = load_imatrix(tmp_path / "i.dat")
    del raw.entries["blk.0.ffn_down.weight"]
    assert loaded.is_legacy and loaded.datasets == [b"calibration.txt"]
    assert loaded.chunk_count == max(int(e.counts.max()) for e in raw.entries.values()) // 512
    assert sorted(loaded.entries) == sorted(raw.entries)
    for name, values in raw.expected_legacy_map().items():
        np.testing.assert_allclose(loaded.entries[name], values, rtol=1e-6)
    assert np.all(loaded.entries["blk.0.ffn_up_exps.weight"][64:] == 1)
