"""SentencePiece-style tokenizers given as tokenizer.json alone (no tokenizer.model), as finetunes and re-uploads
of Llama 2 and Mistral often ship them: converted as llama.cpp's converter converts them (gguf-py's LlamaHfVocab).

Such a file carries no scores, so llama.cpp's tokenizer merges pieces left to right where tokenizer.json ranks its
merges; the tests pin that this is the only difference from the tokenizer.model conversion, and that verify says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mt.convert.convert import convert
from mt.errors import TokenizerError
from mt.verify.reference import Reference
from mt.verify.tokens import check_tokenization
from mt.verify.report import Status
from tests.checkpoints import read_gguf_fields
from tests.gguf_compare import assert_same_file
from tests.oracle import run_converter


def without_tokenizer_model(src: Path, dest: Path) -> Path:
    """`src` seen without its tokenizer.model (weights linked, not copied)."""
    dest.mkdir()
    for file in src.iterdir():
        if file.name != "tokenizer.model":
            (dest / file.name).symlink_to(file)
    return dest


@pytest.fixture(scope="module")
def llama2_json_only(llama2_spm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return without_tokenizer_model(llama2_spm_dir, tmp_path_factory.mktemp("llama2-json") / "model")


@pytest.fixture(scope="module")
def llama2_json_only_gguf(llama2_json_only: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llama2-json-gguf") / "f32.gguf"
    convert(llama2_json_only, out, "f32")
    return out


@pytest.mark.parametrize("fixture", ["llama2_spm_dir", "mistral_dir"])
def test_same_file_as_llama_cpp_converter(request, tmp_path, fixture):
    src = without_tokenizer_model(request.getfixturevalue(fixture), tmp_path / "model")
    convert(src, tmp_path / "mt.gguf", "f16")
    run_converter(src, tmp_path / "ref.gguf", "f16")
    assert_same_file(tmp_path / "mt.gguf", tmp_path / "ref.gguf")


def test_only_the_scores_differ_from_the_tokenizer_model_conversion(llama2_spm_dir, llama2_json_only_gguf, tmp_path):
    convert(llama2_spm_dir, tmp_path / "spm.gguf", "f32", vocab_only=True)
    spm, json_only = read_gguf_fields(tmp_path / "spm.gguf"), read_gguf_fields(llama2_json_only_gguf)
    tokenizer_keys = {k for k in spm if k.startswith("tokenizer.")}
    assert tokenizer_keys == {k for k in json_only if k.startswith("tokenizer.")}
    differing = {k for k in tokenizer_keys if spm[k] != json_only[k]}
    assert differing == {"tokenizer.ggml.scores"}
    assert set(json_only["tokenizer.ggml.scores"]) == {-1000.0}
    assert len(set(spm["tokenizer.ggml.scores"])) > 1000


def test_verify_warns_and_names_the_missing_scores(llama2_json_only, llama2_json_only_gguf):
    """llama.cpp parts from tokenizer.json on real words here; that is a warning with its cause, not a failure."""
    ref = Reference(llama2_json_only, json.loads((llama2_json_only / "config.json").read_text()))
    check = check_tokenization(llama2_json_only_gguf, llama2_json_only_gguf, ref, None)
    assert check.status == Status.WARN, check
    assert len(check.data["llama_cpp_limits"]) >= 5
    assert all("has no scores" in p for p in check.problems), check.problems


def test_tokenizer_model_still_wins_when_both_are_there(llama2_spm_dir, tmp_path):
    convert(llama2_spm_dir, tmp_path / "m.gguf", "f32", vocab_only=True)
    assert len(set(read_gguf_fields(tmp_path / "m.gguf")["tokenizer.ggml.scores"])) > 1000


def test_gemma_without_tokenizer_model_is_refused_as_by_the_converter(gemma3_dir, tmp_path):
    """llama.cpp's converter reads Gemma's vocabulary only from tokenizer.model (Gemma 2) or from a tokenizer.json
    whose pre-tokenizer it knows by hash (Gemma 3; Gemma's own is not among them): one line, no file."""
    src = without_tokenizer_model(gemma3_dir, tmp_path / "model")
    with pytest.raises(TokenizerError, match="converter also needs") as refused:
        convert(src, tmp_path / "m.gguf", "f16")
    assert "copy tokenizer.model from the base model" in refused.value.one_line()
    assert not (tmp_path / "m.gguf").exists()
