"""A checkpoint's side files: the folder's own, some replaced in memory."""

from __future__ import annotations

import os
from pathlib import Path

from mt.io.checkpoint import SideFiles


def folder(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    (tmp_path / ".hidden").write_text("")
    (tmp_path / "additional_chat_templates").mkdir()
    for name in ("tool_use", "rag"):
        (tmp_path / "additional_chat_templates" / f"{name}.jinja").write_text(name)
    return tmp_path


def test_replaced_files_take_the_place_of_the_folders(tmp_path):
    files = SideFiles(folder(tmp_path), {"config.json": b'{"a": 2}', "added_tokens.json": tmp_path / "config.json"})
    assert (files / "config.json").read_text() == '{"a": 2}'
    assert str(files / "config.json") == "config.json (merged)"
    assert (files / "tokenizer.json").is_file() and str(files / "tokenizer.json") == str(tmp_path / "tokenizer.json")
    assert not (files / "tokenizer.model").is_file() and str(files / "tokenizer.model") == str(tmp_path / "tokenizer.model")
    assert (files / "added_tokens.json").read_text() == '{"a": 1}'


def test_mapping_holds_side_files_only_and_templates_keep_the_folders_order(tmp_path):
    files = SideFiles(folder(tmp_path), {"config.json": b"{}"})
    assert set(files.mapping()) == {"config.json", "tokenizer.json", "additional_chat_templates/rag.jinja",
                                    "additional_chat_templates/tool_use.jinja"}
    assert files.mapping()["config.json"] == b"{}"
    listed = [p.stem for p in (tmp_path / "additional_chat_templates").glob("*.jinja")]  # as gguf-py globs them
    assert [t.stem for t in files.templates()] == listed


def test_cache_key_changes_with_the_content(tmp_path):
    files = SideFiles(folder(tmp_path))
    before = (files / "tokenizer.json").cache_key
    os.utime(tmp_path / "tokenizer.json", ns=(1, 1))
    assert (files / "tokenizer.json").cache_key != before
    assert SideFiles(tmp_path, {"x": b"1"}) / "x" != SideFiles(tmp_path, {"x": b"2"}) / "x"
