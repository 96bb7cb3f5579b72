"""Tokenizer variants people ship: derived BPE tokenizers, chat templates in separate files."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from mt.convert.convert import convert
from mt.errors import TokenizerError
from tests.gguf_compare import read_gguf
from tests.oracle import run_converter


def copy_src(src: Path, dest: Path) -> Path:
    return Path(shutil.copytree(src, dest))


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_derived_tokenizer_recognised_from_its_definition(llama3_dir, tmp_path):
    # A finetune that repurposed a reserved token as a word ("🦙🦙", which the probe text contains):
    # the probe hash changes, so llama.cpp's converter refuses it, but the pre-tokenizer is still
    # Llama-3's and mt names it from the definition.
    src = copy_src(llama3_dir, tmp_path / "src")

    def repurpose(entries):
        for entry in entries:
            if entry["content"] == "<|reserved_special_token_5|>":
                entry.update(content="🦙🦙", special=False)

    edit_json(src / "tokenizer.json", lambda t: repurpose(t["added_tokens"]))
    edit_json(src / "tokenizer_config.json", lambda t: repurpose(t["added_tokens_decoder"].values()))
    with pytest.raises(RuntimeError, match="pre-tokenizer was not recognized"):
        run_converter(src, tmp_path / "ref.gguf", "f16")
    out = tmp_path / "mt.gguf"
    result = convert(src, out, "f16")
    assert result.vocab is not None and result.vocab.pre == "llama-bpe"
    kv = read_gguf(out).kv_dict()
    assert kv["tokenizer.ggml.pre"] == "llama-bpe"
    llama_id = kv["tokenizer.ggml.tokens"].index("🦙🦙")
    assert kv["tokenizer.ggml.token_type"][llama_id] == 4  # USER_DEFINED

    from llama_cpp import Llama

    llm = Llama(model_path=str(out), vocab_only=True, verbose=False)
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(src / "tokenizer.json"))
    text = "Größe 12345 — I've been 'told ¿qué? 你好 🦙🦙 herd"
    ours = llm.tokenize(text.encode(), add_bos=False, special=False)
    assert ours == hf.encode(text, add_special_tokens=False).ids and llama_id in ours
    llm.close()


def test_unknown_pre_tokenizer_is_a_clear_error(llama3_dir, tmp_path):
    src = copy_src(llama3_dir, tmp_path / "src")

    def change_regex(t):
        t["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\p{L}+|\\p{N}+|\\s+|[^\\s\\p{L}\\p{N}]+"

    edit_json(src / "tokenizer.json", change_regex)
    with pytest.raises(TokenizerError, match="not one llama.cpp knows") as e:
        convert(src, tmp_path / "o.gguf", "f16")
    assert "base model" in e.value.one_line()
    assert not (tmp_path / "o.gguf").exists()


def test_chat_templates_from_jinja_files_match_converter(llama3_dir, tmp_path):
    src = copy_src(llama3_dir, tmp_path / "src")
    template = json.loads((src / "tokenizer_config.json").read_text()).pop("chat_template")
    edit_json(src / "tokenizer_config.json", lambda t: t.pop("chat_template"))
    (src / "chat_template.jinja").write_text(template)
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages | tojson }}")
    ref_out, mt_out = tmp_path / "ref.gguf", tmp_path / "mt.gguf"
    run_converter(src, ref_out, "f16", ["--vocab-only"])
    convert(src, mt_out, "f16", vocab_only=True)
    assert mt_out.read_bytes() == ref_out.read_bytes()
    kv = read_gguf(mt_out).kv_dict()
    assert kv["tokenizer.chat_template"] == template
    assert kv["tokenizer.chat_template.tool_use"] == "{{ messages | tojson }}"
    assert kv["tokenizer.chat_templates"] == ["tool_use"]


def test_special_token_ids_and_flags(llama3_dir, qwen2_dir, llama2_spm_dir, tmp_path):
    expected = {
        llama3_dir: {"tokenizer.ggml.bos_token_id": 128000, "tokenizer.ggml.eos_token_id": 128009, "tokenizer.ggml.add_bos_token": True},
        qwen2_dir: {"tokenizer.ggml.eos_token_id": 151645, "tokenizer.ggml.add_bos_token": False},
        llama2_spm_dir: {"tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0},
    }
    for src, keys in expected.items():
        out = tmp_path / f"{src.name}.gguf"
        convert(src, out, "f16", vocab_only=True)
        kv = read_gguf(out).kv_dict()
        assert {k: kv.get(k) for k in keys} == keys, src.name
