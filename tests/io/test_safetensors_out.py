"""The streaming safetensors folder writer against safetensors, huggingface_hub and transformers themselves."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.serialization._base import parse_size_to_int
from safetensors import safe_open
from safetensors.torch import save as torch_save_bytes
from transformers.utils.hub import convert_file_size_to_int

from mt.errors import MtError, OutputExists, TensorWriteError
from mt.io.safetensors_out import INDEX_FILE, SafetensorsFolderWriter, TensorSpec, parse_size, plan_shards

TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MT_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


def spec_of(name: str, tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, MT_DTYPES[tensor.dtype], tuple(tensor.shape))


def storage_array(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as mt's writer takes them (BF16 as uint16)."""
    t = tensor.detach().contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def row_chunks(array: np.ndarray, rows: int = 3) -> Iterator[np.ndarray]:
    if array.ndim == 0 or array.shape[0] == 0:
        yield array
        return
    for start in range(0, array.shape[0], rows):
        yield array[start : start + rows]


def write_state_dict(out: Path, state: dict[str, torch.Tensor], max_size: int, **kw) -> SafetensorsFolderWriter:
    specs = [spec_of(name, t) for name, t in state.items()]
    with SafetensorsFolderWriter(out, specs, max_size, **kw) as writer:
        for name, t in state.items():
            writer.write_tensor(name, row_chunks(storage_array(t)))
    return writer


def mixed_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed.weight": torch.randn(11, 6, generator=g, dtype=torch.float32),
        "model.b.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "model.a.weight": torch.randn(4, 3, 2, generator=g).to(torch.float16),
        "Z.bias": torch.randn(9, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(1.5, dtype=torch.float32),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
        "ünï.weight": torch.randn(2, 3, generator=g, dtype=torch.float32),
    }


# --- parse_size -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["5GB", "500MB", "1KB", "2TB", "0.5GB", "1.5MB", "0.29KB", "5gb", " 10 MB ", "3.GB"])
def test_parse_size_decimal_units_as_huggingface_hub(text):
    assert parse_size(text) == parse_size_to_int(text)


@pytest.mark.parametrize("text", ["2GiB", "3MiB", "7KiB", "1gib"])
def test_parse_size_binary_units_as_transformers(text):
    assert parse_size(text) == convert_file_size_to_int(text)


def test_parse_size_plain_bytes():
    assert parse_size("1000") == 1000 and parse_size("1000B") == 1000


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-1GB", "0", "0.0001KB", "5 G B", "1e9", "abc", "5GBB"])
def test_parse_size_refuses_bad_text(text):
    with pytest.raises(MtError) as err:
        parse_size(text)
    assert err.value.remedy


# --- shard plan ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_size", [1, 40, 100, 150, 300, 10**9])
def test_shard_plan_equals_huggingface_hub(max_size):
    g = torch.Generator().manual_seed(1)
    sizes = [(10, 4, "F32"), (3,), (60, "F16"), (2, 2), (25, 5, "BF16"), (1,), (7, 3, "F16"), (0, 3), (30,)]
    state = {}
    for i, dims in enumerate(sizes):
        dtype = TORCH_DTYPES[dims[-1]] if isinstance(dims[-1], str) else torch.float32
        shape = [d for d in dims if isinstance(d, int)]
        state[f"t{i}"] = torch.randn(*shape, generator=g).to(dtype)
    assert any(t.nbytes > max_size for t in state.values()) or max_size >= 300
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_size)
    shards = plan_shards([spec_of(n, t) for n, t in state.items()], max_size)
    assert {s.filename: [t.name for t in s.tensors] for s in shards} == split.filename_to_tensors
    assert [s.filename for s in shards] == list(split.filename_to_tensors)


def test_tensor_over_the_limit_gets_its_own_shard_before_the_open_one():
    state = {"small": torch.zeros(2), "big": torch.zeros(100), "small2": torch.zeros(2)}
    split = split_torch_state_dict_into_shards(state, max_shard_size=64)
    shards = plan_shards([spec_of(n, t) for n, t in state.items()], 64)
    assert [[t.name for t in s.tensors] for s in shards] == [["big"], ["small", "small2"]]
    assert {s.filename: [t.name for t in s.tensors] for s in shards} == split.filename_to_tensors


# --- round trips and bytes ----------------------------------------------------------------------------


def test_single_shard_is_byte_identical_to_save_file(tmp_path):
    state = mixed_state()
    write_state_dict(tmp_path / "out", state, 10**9)
    assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == torch_save_bytes(state, metadata={"format": "pt"})


def test_shards_read_back_equal(tmp_path):
    state = mixed_state(3)
    write_state_dict(tmp_path / "out", state, 100)
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in state.values())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and sorted(p for p in os.listdir(tmp_path / "out") if p != INDEX_FILE) == files
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / "out" / file), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            got = f.get_tensor(name)
        assert got.dtype == state[name].dtype and torch.equal(got, state[name])
        if state[name].dtype != torch.bfloat16:  # numpy has no bfloat16
            with safe_open(str(tmp_path / "out" / file), framework="np") as f:
                assert np.array_equal(f.get_tensor(name), state[name].numpy())


def tiny_llama(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_llama_folder_equals_save_pretrained_and_loads(tmp_path, dtype):
    from transformers import LlamaForCausalLM

    model = tiny_llama(dtype)
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    state = model.state_dict()
    out = tmp_path / "mt"
    specs = [spec_of(n, t) for n, t in state.items()]
    with SafetensorsFolderWriter(out, specs, parse_size("100KB")) as writer:
        writer.add_file("config.json", (tmp_path / "hf" / "config.json").read_bytes())
        writer.add_file("generation_config.json", tmp_path / "hf" / "generation_config.json")
        for name, t in state.items():
            writer.write_tensor(name, row_chunks(storage_array(t), rows=5))

    hf_files = sorted(os.listdir(tmp_path / "hf"))
    assert len(hf_files) > 4 and sorted(os.listdir(out)) == hf_files
    for name in hf_files:
        assert (out / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name

    loaded = LlamaForCausalLM.from_pretrained(out, dtype=dtype).eval()
    assert all(torch.equal(t, loaded.state_dict()[name]) for name, t in state.items())
    # a bf16 model loaded by from_pretrained keeps its rope buffer in f32, unlike model.to(bf16): compare like with like
    reference = model if dtype == torch.float32 else LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=dtype).eval()
    ids = torch.tensor([[1, 5, 77, 200, 3, 9, 42]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


# --- atomicity ----------------------------------------------------------------------------------------


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if "mt-partial" in p.name or "mt-old" in p.name]


def test_failure_mid_write_leaves_nothing(tmp_path):
    state = mixed_state()
    specs = [spec_of(n, t) for n, t in state.items()]
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsFolderWriter(tmp_path / "out", specs, 100) as writer:
            writer.add_file("config.json", b"{}")
            writer.write_tensor("model.embed.weight", [storage_array(state["model.embed.weight"])])
            assert leftovers(tmp_path)
            raise RuntimeError("boom")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_existing_output_needs_force_and_survives_a_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    state = mixed_state()
    with pytest.raises(OutputExists):
        write_state_dict(out, state, 10**9)
    specs = [spec_of(n, t) for n, t in state.items()]
    with pytest.raises(TensorWriteError, match="not written"):
        with SafetensorsFolderWriter(out, specs, 10**9, force=True) as writer:
            writer.write_tensor("model.embed.weight", [storage_array(state["model.embed.weight"])])
    assert os.listdir(out) == ["old.txt"] and not leftovers(tmp_path)
    write_state_dict(out, state, 10**9, force=True)
    assert os.listdir(out) == ["model.safetensors"] and not leftovers(tmp_path)


def test_force_replaces_a_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("not a folder")
    write_state_dict(out, mixed_state(), 10**9, force=True)
    assert os.listdir(out) == ["model.safetensors"]


def test_disk_full_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(MtError, match="disk full"):
        write_state_dict(tmp_path / "out", mixed_state(), 10**9)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_missing_parent_folder(tmp_path):
    with pytest.raises(MtError, match="does not exist"):
        write_state_dict(tmp_path / "no" / "out", mixed_state(), 10**9)


# --- bad tensor data and specs ------------------------------------------------------------------------

SPECS = [TensorSpec("a", "F32", (4, 2)), TensorSpec("b", "BF16", (3,))]


def write_with(tmp_path: Path, *writes: tuple[str, list[np.ndarray]]) -> None:
    with SafetensorsFolderWriter(tmp_path / "out", SPECS, 10**9) as writer:
        for name, chunks in writes:
            writer.write_tensor(name, chunks)


A = np.zeros((4, 2), np.float32)
B = np.zeros(3, np.uint16)


@pytest.mark.parametrize(
    "writes, needle",
    [
        ([("a", [A[:3]])], "got 24 of its 32 bytes"),
        ([("a", [A, A[:1]])], "more than its 32 bytes"),
        ([("a", [A.astype(np.float64)[:, :1]])], "got a float64 chunk"),
        ([("a", [A]), ("b", [B.astype(np.float16)])], "got a float16 chunk"),
        ([("a", [A.astype(">f4")])], "chunk"),
        ([("b", [B])], "where .a. was planned"),
        ([("a", [A]), ("b", [B]), ("a", [A])], "after the last planned"),
        ([("a", [A])], "not written"),
    ],
)
def test_bad_tensor_data_is_an_error_and_leaves_nothing(tmp_path, writes, needle):
    with pytest.raises(TensorWriteError, match=needle):
        write_with(tmp_path, *writes)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize(
    "specs, needle",
    [
        ([], "no tensors"),
        ([TensorSpec("a", "F64", (2,))], "dtype"),
        ([TensorSpec("a", "F32", (2, -1))], "malformed shape"),
        ([TensorSpec("a", "F32", (2,)), TensorSpec("a", "F16", (2,))], "repeated"),
        ([TensorSpec("__metadata__", "F32", (2,))], "reserved"),
    ],
)
def test_bad_specs_refused_before_any_output(tmp_path, specs, needle):
    with pytest.raises(TensorWriteError, match=needle):
        SafetensorsFolderWriter(tmp_path / "out", specs, 10**9)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name", ["../x.json", "/abs.json", "", "model.safetensors", "a/../../b"])
def test_bad_side_file_names(tmp_path, name):
    with pytest.raises(TensorWriteError, match="side file"):
        with SafetensorsFolderWriter(tmp_path / "out", SPECS, 10**9) as writer:
            writer.add_file(name, b"x")
    assert not leftovers(tmp_path) and not (tmp_path / "out").exists()


def test_side_files_in_subfolders_and_copy_errors(tmp_path):
    src = tmp_path / "tpl.jinja"
    src.write_text("{{ x }}")
    with SafetensorsFolderWriter(tmp_path / "out", SPECS, 10**9) as writer:
        writer.add_file("additional_chat_templates/tool.jinja", src)
        with pytest.raises(TensorWriteError, match="added twice"):
            writer.add_file("additional_chat_templates/tool.jinja", b"again")
        with pytest.raises(MtError, match="not a file"):
            writer.add_file("missing.json", tmp_path / "missing.json")
        writer.write_tensor("a", [A])
        writer.write_tensor("b", [B])
    assert (tmp_path / "out" / "additional_chat_templates" / "tool.jinja").read_text() == "{{ x }}"
    assert not (tmp_path / "out" / "missing.json").exists()


def test_force_replaces_a_link_without_following_it(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    (tmp_path / "out").symlink_to(target)
    write_state_dict(tmp_path / "out", mixed_state(), 10**9, force=True)
    assert not (tmp_path / "out").is_symlink() and os.listdir(tmp_path / "out") == ["model.safetensors"]
    assert (target / "keep.txt").read_text() == "keep"
