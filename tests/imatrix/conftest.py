from __future__ import annotations

from pathlib import Path

import pytest

from mt.convert.convert import convert


@pytest.fixture(scope="session")
def smollm2_f32(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real model's F32 conversion: what llama-imatrix runs on for the comparison."""
    out = tmp_path_factory.mktemp("smollm2_f32") / "f32.gguf"
    convert(smollm2_dir, out, "f32")
    return out
