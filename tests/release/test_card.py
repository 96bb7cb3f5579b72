"""The release's model card: the Hub's GGUF layout, the numbers mt verify measured, the source card kept."""

from __future__ import annotations

import json
import shutil

import yaml
from gguf import GGUFReader
from click.testing import CliRunner

from mt.cli import main
from mt.release.card import split_card

SOURCE_CARD = """---
license: apache-2.0
language:
- en
- "no"
tags:
- chat
base_model: someone/parent-model
---

# Tiny

A model card of the source's own.
"""


def test_card_front_matter_table_and_source_text(llama3_dir, tmp_path):
    src = tmp_path / "tiny-chat"
    shutil.copytree(llama3_dir, src)
    (src / "README.md").write_text(SOURCE_CARD)
    dist = tmp_path / "dist"
    out = CliRunner().invoke(main, ["release", str(src), "-o", str(dist), "--quants", "f16,q4_k_m", "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output.strip().splitlines()[-1])
    meta, body = split_card((dist / "README.md").read_text())
    assert meta["base_model_relation"] == "quantized" and meta["quantized_by"] == "mt"
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en", "no"]
    assert meta["tags"][:2] == ["gguf", "llama.cpp"] and "chat" in meta["tags"]
    assert meta["base_model"] == "tiny-chat"  # no repo id in config.json: the folder; not the parent model
    rows = [line for line in body.splitlines() if line.startswith("| [")]
    assert len(rows) == 2
    for row, f in zip(rows, summary["files"]):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == f"[{f['file']}](./{f['file']})" and cells[1] == f["type"].upper()
        q = f["verify"]["quality"]
        assert cells[4] == f"{q['kld_mean']:.4g}" and cells[6] == f"{q['top1_agreement']:.1%}"
    for row, f in zip(rows, summary["files"]):
        tensors = GGUFReader(dist / f["file"]).tensors
        bits = 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)
        assert float(row.strip("|").split("|")[3]) == round(bits, 2)
    assert "## Original model card" in body and body.rstrip().endswith("A model card of the source's own.")
    assert "llama-cli -m tiny-chat-Q4_K_M.gguf" in body


def test_unverified_card_says_so(llama3_dir, tmp_path):
    dist = tmp_path / "dist"
    out = CliRunner().invoke(main, ["release", str(llama3_dir), "-o", str(dist), "--quants", "q8_0", "--no-verify", "--quiet"])
    assert out.exit_code == 0, out.output
    meta, body = split_card((dist / "README.md").read_text())
    assert yaml.safe_dump(meta) and "not checked by `mt verify`" in body and "not verified" in body
    assert "Original model card" not in body
