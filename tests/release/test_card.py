"""The release's model card: the Hub's GGUF layout, the numbers mt verify measured, the source card kept."""

from __future__ import annotations

import hashlib
import json

import yaml
from gguf import GGUFReader
from click.testing import CliRunner

from mt.cli import main
from mt.release.card import split_card

def test_card_front_matter_table_and_source_text(verified_release):
    dist, summary = verified_release.dist, verified_release.summary
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
    manifest = json.loads((dist / "manifest.json").read_text())
    memory = [line for line in body.splitlines() if line.startswith("| tiny-chat-")]
    assert [line.split("|")[1].strip() for line in memory] == [f["file"] for f in summary["files"]]
    for line, f in zip(memory, manifest["files"]):
        totals = [m["total_bytes"] for m in f["memory"] if m["kv_cache_type"] == "f16"]
        cells = [c.strip() for c in line.strip("|").split("|")[1:]]
        assert len(cells) == len(totals) and all(c.endswith("MiB") or c.endswith("GiB") for c in cells)
        assert float(cells[-1].split()[0]) == round(totals[-1] / 2**(30 if cells[-1].endswith("GiB") else 20), 2 if cells[-1].endswith("GiB") else 1)
    assert "## Original model card" in body and body.rstrip().endswith("A model card of the source's own.")
    assert "llama-cli -m tiny-chat-Q4_K_M.gguf" in body


def test_unverified_card_says_so(llama3_dir, tmp_path):
    dist = tmp_path / "dist"
    out = CliRunner().invoke(main, ["release", str(llama3_dir), "-o", str(dist), "--quants", "q8_0", "--no-verify", "--quiet"])
    assert out.exit_code == 0, out.output
    meta, body = split_card((dist / "README.md").read_text())
    assert yaml.safe_dump(meta) and "not checked by `mt verify`" in body and "not verified" in body
    assert "Original model card" not in body


def test_split_files_are_listed_by_first_part_with_each_parts_hash(llama3_dir, tmp_path):
    dist = tmp_path / "dist"
    out = CliRunner().invoke(main, ["release", str(llama3_dir), "-o", str(dist), "--quants", "f16,q8_0", "--name", "m",
                                    "--no-verify", "--split-max-tensors", "8", "--json"])
    assert out.exit_code == 0, out.output
    manifest = json.loads((dist / "manifest.json").read_text())
    for f in manifest["files"]:
        names = [p["file"] for p in f["parts"]]
        assert f["file"] == names[0] and f["sha256"] is None
        assert names == [f"m-{f['type'].upper()}-{i:05d}-of-{len(names):05d}.gguf" for i in range(1, len(names) + 1)]
        for part in f["parts"]:
            assert part["sha256"] == hashlib.sha256((dist / part["file"]).read_bytes()).hexdigest()
            assert part["bytes"] == (dist / part["file"]).stat().st_size
        assert f["bytes"] == sum(p["bytes"] for p in f["parts"])
    _, body = split_card((dist / "README.md").read_text())
    assert "| [m-F16-00001-of-00003.gguf](./m-F16-00001-of-00003.gguf) (3 parts) | F16 |" in body
