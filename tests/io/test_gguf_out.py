import hashlib
import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from mt.errors import MtError
from mt.io.gguf_out import GGUFContents, PlacedTensors, write_gguf
from mt.io.safetensors import FileSpan

VOCAB = ["a", "ü", "🦙", "", "x y"] * 100


def fill(w: GGUFWriter) -> None:
    w.add_name("tiny")
    w.add_uint32("tiny.block_count", 2)
    w.add_float32("tiny.rope.freq_base", 10000.0)
    w.add_key_value("tokenizer.ggml.tokens", VOCAB, GGUFValueType.ARRAY, GGUFValueType.STRING)
    w.add_key_value("tokenizer.ggml.token_type", [1] * len(VOCAB), GGUFValueType.ARRAY, GGUFValueType.INT32)
    w.add_bool("tiny.flag", True)


TENSORS = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "b.weight": np.ones(5, dtype=np.float16)}
TYPES = {"a.weight": GGMLQuantizationType.F32, "b.weight": GGMLQuantizationType.F16}


def gguf_py_file(path, alignment: int = 32):
    """The same file written by gguf-py's own writer, start to end."""
    w = GGUFWriter(path, "tiny")
    w.data_alignment = alignment
    if alignment != 32:
        w.add_custom_alignment(alignment)
    fill(w)
    for name, t in TENSORS.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def contents(alignment: int = 32) -> GGUFContents:
    c = GGUFContents("tiny")
    c.data_alignment = alignment
    if alignment != 32:
        c.add_custom_alignment(alignment)
    fill(c)
    for name, t in TENSORS.items():
        c.add_slot(name, t.shape, TYPES[name], t.nbytes)
    return c


@pytest.mark.parametrize("alignment", [32, 64])
def test_same_bytes_as_gguf_py(tmp_path, alignment):
    out = tmp_path / "mt.gguf"
    written = write_gguf(out, contents(alignment), ([t] for t in TENSORS.values()))
    assert written == sum(t.nbytes for t in TENSORS.values())
    assert out.read_bytes() == gguf_py_file(tmp_path / "ref.gguf", alignment)


def test_tensor_in_chunks_and_copied_from_a_file_span(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"junk" + TENSORS["b.weight"].tobytes() + b"tail")
    a = TENSORS["a.weight"]
    payloads = [[a[:1], a[1:]], [FileSpan(src, 4, TENSORS["b.weight"].nbytes)]]
    out = tmp_path / "mt.gguf"
    write_gguf(out, contents(), payloads)
    assert out.read_bytes() == gguf_py_file(tmp_path / "ref.gguf")


def test_removed_key_set_again_moves_to_the_end(tmp_path):
    c = contents()
    c.remove("tiny.block_count")
    c.add_uint32("tiny.block_count", 3)
    assert c.value("tiny.block_count") == 3
    out = tmp_path / "mt.gguf"
    write_gguf(out, c, ([t] for t in TENSORS.values()))
    reader = GGUFReader(out)
    assert list(reader.fields)[-1] == "tiny.block_count"
    assert list(reader.fields)[:2] == ["GGUF.version", "GGUF.tensor_count"]
    assert [t.name for t in reader.tensors] == list(TENSORS)


def test_metadata_is_dropped_once_written(tmp_path):
    c = contents()
    write_gguf(tmp_path / "mt.gguf", c, ([t] for t in TENSORS.values()))
    assert c.metadata == {}


@pytest.mark.parametrize("payloads, needle", [
    ([[TENSORS["a.weight"]]], "1 tensors written, 2 planned"),
    ([[TENSORS["a.weight"]], [TENSORS["b.weight"]], [TENSORS["b.weight"]]], "more tensors written"),
    ([[TENSORS["a.weight"]], [TENSORS["a.weight"]]], "b.weight wrote 48 bytes, planned 10"),
])
def test_payloads_that_miss_the_plan_are_an_error(tmp_path, payloads, needle):
    with pytest.raises(MtError, match=needle):
        write_gguf(tmp_path / "mt.gguf", contents(), payloads)


def test_tensor_info_without_ggml_type_refused():
    with pytest.raises(TypeError, match="raw_dtype"):
        GGUFContents("tiny").add_tensor_info("x", (2,), np.dtype(np.float32), 8)


@pytest.mark.parametrize("alignment", [32, 64])
def test_placed_tensors_in_any_order_make_the_same_file(tmp_path, alignment):
    src = tmp_path / "src.bin"
    src.write_bytes(b"junk" + TENSORS["b.weight"].tobytes())
    placed = PlacedTensors(tmp_path / "mt.gguf", contents(alignment))
    placed.write("b.weight", FileSpan(src, 4, TENSORS["b.weight"].nbytes))
    a = TENSORS["a.weight"]
    placed.write("a.weight", a[:2])
    placed.write("a.weight", a[2:])
    placed.finish()
    assert (tmp_path / "mt.gguf").read_bytes() == gguf_py_file(tmp_path / "ref.gguf", alignment)
    assert placed.sha256 == hashlib.sha256((tmp_path / "mt.gguf").read_bytes()).hexdigest()


def test_placed_tensors_hash_from_memory_when_written_in_order(tmp_path, monkeypatch):
    placed = PlacedTensors(tmp_path / "mt.gguf", contents())
    monkeypatch.setattr(os, "pread", lambda *args: pytest.fail("read back bytes that came in order"))
    for name, t in TENSORS.items():
        placed.write(name, t)
    placed.finish()
    assert placed.sha256 == hashlib.sha256((tmp_path / "mt.gguf").read_bytes()).hexdigest()


def test_a_placed_tensor_left_short_is_an_error(tmp_path):
    placed = PlacedTensors(tmp_path / "mt.gguf", contents())
    placed.write("a.weight", TENSORS["a.weight"])
    with pytest.raises(MtError, match="b.weight wrote 0 bytes, planned 10"):
        placed.finish()


def test_header_written_last_from_another_thread_makes_the_same_file(tmp_path):
    """The tensors placed first, the header packed on another thread after them: the same bytes, the same hash."""
    import threading

    placed = PlacedTensors(tmp_path / "mt.gguf", contents(), header_later=True)
    for name, t in TENSORS.items():
        placed.write(name, t)
    worker = threading.Thread(target=placed.write_header)
    worker.start()
    worker.join()
    placed.finish()
    data = (tmp_path / "mt.gguf").read_bytes()
    assert data == gguf_py_file(tmp_path / "ref.gguf")
    assert placed.sha256 == hashlib.sha256(data).hexdigest()
    assert [p.name for p in tmp_path.iterdir() if "header" in p.name] == []


def test_a_header_never_written_is_an_error(tmp_path):
    placed = PlacedTensors(tmp_path / "mt.gguf", contents(), header_later=True)
    for name, t in TENSORS.items():
        placed.write(name, t)
    with pytest.raises(MtError, match="header was never written"):
        placed.finish()


@pytest.mark.parametrize("value, vtype, sub_type", [
    (["a", "ü", "🦙", ""], GGUFValueType.ARRAY, None), ([b"\xff", b"ab"], GGUFValueType.ARRAY, GGUFValueType.STRING),
    ([1.5, 2.0], GGUFValueType.ARRAY, None), ([True, False], GGUFValueType.ARRAY, None),
    ([[1, 2], [3]], GGUFValueType.ARRAY, None), (b"raw", GGUFValueType.ARRAY, None), ("名前", GGUFValueType.STRING, None),
    (7, GGUFValueType.UINT64, None), (-1, GGUFValueType.INT8, None), (True, GGUFValueType.BOOL, None),
])
def test_header_size_is_what_gguf_py_writes(tmp_path, value, vtype, sub_type):
    from mt.io.gguf_out import header_size

    c = contents()
    c.add_key_value("x.value", value, vtype, sub_type)
    write_gguf(tmp_path / "h.gguf", c)
    assert header_size(c) == (tmp_path / "h.gguf").stat().st_size
