from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from mt.cli import main
from tests.merge.conftest import built  # noqa: F401  (the adapters built for the merge tests)

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


@dataclass(frozen=True)
class VerifiedRelease:
    src: Path  # the tiny Llama 3 as the folder tiny-chat, with a model card of its own
    dist: Path
    summary: dict  # what `mt release --json` printed


@pytest.fixture(scope="session")
def verified_release(llama3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> VerifiedRelease:
    """`mt release SRC -o DIST --quants f16,q4_k_m --json`, each file verified: read by the card, manifest and report
    tests (one run of verify for all of them)."""
    root = tmp_path_factory.mktemp("verified_release")
    src = root / "tiny-chat"
    shutil.copytree(llama3_dir, src)
    (src / "README.md").write_text(SOURCE_CARD)
    out = CliRunner().invoke(main, ["release", str(src), "-o", str(root / "dist"), "--quants", "f16,q4_k_m", "--json"])
    assert out.exit_code == 0, out.output
    return VerifiedRelease(src, root / "dist", json.loads(out.output.strip().splitlines()[-1]))
