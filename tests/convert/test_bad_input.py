"""Each bad input: one line naming the problem and the fix, exit code 1, no output left behind."""

import errno
import json
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from mt.cli import main
from mt.demo import build_tiny_llama


@pytest.fixture(scope="module")
def good_src(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("src") / "tiny")


@pytest.fixture
def src(good_src, tmp_path) -> Path:
    return Path(shutil.copytree(good_src, tmp_path / "src"))


def run_convert(src: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--outtype", "f16", "--quiet", *extra])


def assert_clean_failure(result, out: Path, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mt: error: "), result.output
    for needle in needles:
        assert needle in lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if "mt-partial" in p.name]


def test_good_source_converts(src, tmp_path):
    out = tmp_path / "out.gguf"
    result = run_convert(src, out)
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0


def test_missing_config(src, tmp_path):
    (src / "config.json").unlink()
    assert_clean_failure(run_convert(src, tmp_path / "o.gguf"), tmp_path / "o.gguf", "no config.json", "Hugging Face checkpoint folder")


def test_unknown_architecture_lists_supported(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["FancyNetForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    assert_clean_failure(run_convert(src, tmp_path / "o.gguf"), tmp_path / "o.gguf", "FancyNetForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM")


def test_truncated_safetensors(src, tmp_path):
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert_clean_failure(run_convert(src, tmp_path / "o.gguf"), tmp_path / "o.gguf", "model.safetensors", "past the data section")


def test_header_length_beyond_file(src, tmp_path):
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    assert_clean_failure(run_convert(src, tmp_path / "o.gguf"), tmp_path / "o.gguf", "header length")


def test_shape_byte_size_mismatch(src, tmp_path):
    path = src / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["model.norm.weight"]["shape"] = [65]
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n
    raw = raw.ljust(n)
    path.write_bytes(data[:8] + raw + data[8 + n :])
    assert_clean_failure(run_convert(src, tmp_path / "o.gguf"), tmp_path / "o.gguf", "model.norm.weight", "needs")


def _make_index(src: Path, shard_name: str) -> None:
    from mt.io.safetensors import read_header

    refs, _ = read_header(src / "model.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard_name for n in refs}}))


def test_index_names_missing_shard(src, tmp_path):
    _make_index(src, "model-00001-of-00002.safetensors")
    assert_clean_failure(run_convert(src, tmp_path / "o.gguf"), tmp_path / "o.gguf", "model-00001-of-00002.safetensors", "missing")


def test_index_path_outside_folder(src, tmp_path):
    shutil.copy(src / "model.safetensors", tmp_path / "evil.safetensors")
    _make_index(src, "../evil.safetensors")
    assert_clean_failure(run_convert(src, tmp_path / "o.gguf"), tmp_path / "o.gguf", "outside")


@pytest.mark.parametrize("value", [None, "", 3])
def test_index_maps_a_tensor_to_no_file(src, tmp_path, value):
    from mt.io.safetensors import read_header

    refs, _ = read_header(src / "model.safetensors")
    weight_map = {n: "model.safetensors" for n in refs} | {next(iter(refs)): value}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_clean_failure(run_convert(src, tmp_path / "o.gguf"), tmp_path / "o.gguf", "not a shard file name")


def test_missing_tokenizer_says_how_to_proceed(src, tmp_path):
    (src / "tokenizer.json").unlink()
    assert_clean_failure(run_convert(src, tmp_path / "o.gguf"), tmp_path / "o.gguf", "no tokenizer", "copy the tokenizer files")


def test_output_exists_without_force(src, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    result = run_convert(src, out)
    assert result.exit_code == 1 and "--force" in result.output
    assert out.read_bytes() == b"keep me"
    assert run_convert(src, out, "--force").exit_code == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_unknown_tensor_is_named(src, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.0.mlp.mystery.weight"] = tensors["model.norm.weight"]
    save_file(tensors, str(src / "model.safetensors"))
    assert_clean_failure(run_convert(src, tmp_path / "o.gguf"), tmp_path / "o.gguf", "model.layers.0.mlp.mystery.weight")


def test_pickle_refused_by_default_and_loaded_with_flag(src, tmp_path):
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(src / "model.safetensors")), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    out = tmp_path / "o.gguf"
    assert_clean_failure(run_convert(src, out), out, "pickle", "--allow-pickle")
    result = run_convert(src, out, "--allow-pickle")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("exc, needle", [(KeyboardInterrupt(), "interrupted"), (OSError(errno.ENOSPC, "No space left"), "disk full")])
def test_interrupt_and_disk_full_leave_nothing(src, tmp_path, monkeypatch, exc, needle):
    from mt.io import gguf_out

    calls = {"n": 0}
    original = gguf_out._pad  # called before and after each tensor's data

    def failing(fout, n, alignment):
        calls["n"] += 1
        if calls["n"] == 5:
            raise exc
        return original(fout, n, alignment)

    monkeypatch.setattr(gguf_out, "_pad", failing)
    out = tmp_path / "o.gguf"
    result = run_convert(src, out)
    assert result.exit_code != 0
    assert needle in result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "mt-partial" in p.name]


def test_usage_error_exit_2(src):
    result = CliRunner().invoke(main, ["convert", str(src), "--outtype", "q3_zz"])
    assert result.exit_code == 2


def test_internal_error_is_one_line_and_debug_shows_traceback(src, tmp_path, monkeypatch):
    from mt.convert import plan

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(plan, "tensor_types", broken)
    out = tmp_path / "o.gguf"
    assert_clean_failure(run_convert(src, out), out, "internal error: ZeroDivisionError: boom", "MT_DEBUG=1")
    monkeypatch.setenv("MT_DEBUG", "1")
    result = run_convert(src, out)
    assert isinstance(result.exception, ZeroDivisionError)


def test_tokenizer_config_that_is_not_an_object(src, tmp_path):
    (src / "tokenizer_config.json").write_text("[]")
    assert_clean_failure(run_convert(src, tmp_path / "o.gguf"), tmp_path / "o.gguf", "tokenizer_config.json is not a JSON object")


def test_model_card_with_broken_front_matter(src, tmp_path):
    (src / "README.md").write_text("---\nlicense: [unclosed\n---\n# a card\n")
    assert_clean_failure(run_convert(src, tmp_path / "o.gguf"), tmp_path / "o.gguf", "front matter is not valid YAML")


def test_force_onto_a_folder_fails_before_converting(src, tmp_path):
    (tmp_path / "o.gguf").mkdir()
    result = run_convert(src, tmp_path / "o.gguf", "--force")
    assert result.exit_code == 1 and "is a folder" in result.output and (tmp_path / "o.gguf").is_dir(), result.output


def test_a_tensor_named_twice_in_the_header(src, tmp_path):
    path = src / "model.safetensors"
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = "model.norm.weight"
    entry = json.dumps({name: header[name]})[1:-1]
    text = json.dumps(header)
    doubled = text[:-1] + ", " + entry + "}"
    raw = doubled.encode().ljust(len(doubled.encode()) + (-len(doubled.encode()) % 8))
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    assert_clean_failure(run_convert(src, tmp_path / "o.gguf"), tmp_path / "o.gguf", "names tensor 'model.norm.weight' twice")


def test_json_nested_too_deeply(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config)[:-1] + ', "deep": ' + "[" * 200000 + "]" * 200000 + "}")
    assert_clean_failure(run_convert(src, tmp_path / "o.gguf"), tmp_path / "o.gguf", "config.json is not valid JSON")
