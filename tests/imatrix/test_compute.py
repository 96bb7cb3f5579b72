"""mt imatrix against llama-imatrix's computation run by llama.cpp (tests/llama_imatrix.py) on the F32 conversion of
the same checkpoint, with the same text, context, chunks and batch: every matrix's sums within 1e-4 relative, the
counts identical. llama.cpp runs attention in F32 here (-ctk f32 -ctv f32 -fa off); its default F16 KV cache
rounds keys and values, which moves the sums by ~1e-3 (test_quality.py)."""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from mt.convert.convert import convert
from mt.imatrix.compute import ImatrixOptions, compute_imatrix
from mt.io.quiet import native_stderr_silenced
from tests.llama_imatrix import Collected, llama_imatrix
from tests.oracle import sdist_dir

TOLERANCE = 1e-4
TEXT_CHARS = 200_000


@cache
def calibration_text() -> str:
    """Python with comments and docstrings that stays the same from run to run: llama.cpp's converter modules from the
    pinned sdist, one after another (the first 200k characters)."""
    modules = sorted((sdist_dir() / "conversion").glob("*.py"))
    return "\n\n".join(p.read_text(encoding="utf-8") for p in modules)[:TEXT_CHARS]


def f32_gguf(src: Path, out: Path) -> Path:
    convert(src, out, "f32")
    return out


def oracle(gguf: Path, ctx: int, chunks: int, batch: int | None = None, f32_attention: bool = True) -> Collected:
    with native_stderr_silenced():
        return llama_imatrix(gguf, calibration_text(), ctx, chunks, batch, f32_attention=f32_attention)


def worst_relative(sums: dict[str, np.ndarray], expected: Collected) -> tuple[float, str]:
    """The largest |mt - llama.cpp| / |llama.cpp| over every value of every matrix, and where."""
    worst = (0.0, "")
    for name, values in expected.sums.items():
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.abs(sums[name] - values) / np.abs(values)
        rel = np.where(values == 0, np.abs(sums[name] - values), rel)
        worst = max(worst, (float(rel.max()), name))
    return worst


def assert_agrees(src: Path, gguf: Path, ctx: int, chunks: int, batch: int) -> float:
    run = compute_imatrix(src, calibration_text(), "docs", ImatrixOptions(ctx=ctx, chunks=chunks, batch=batch, dtype="f32"))
    expected = oracle(gguf, ctx, chunks, batch)
    assert set(run.imatrix.sums) == set(expected.sums)
    assert {n: int(c[0]) for n, c in run.imatrix.counts.items()} == expected.counts
    assert run.chunks == expected.n_chunks == chunks and run.text_tokens == expected.n_tokens
    assert run.imatrix.chunk_count == chunks
    worst, where = worst_relative(run.imatrix.sums, expected)
    print(f"\nworst relative difference from llama.cpp: {worst:.2e} ({where})")
    assert worst < TOLERANCE, (worst, where)
    return worst


def test_real_model_agrees_with_llama_imatrix(smollm2_dir: Path, smollm2_f32: Path) -> None:
    assert_agrees(smollm2_dir, smollm2_f32, ctx=128, chunks=4, batch=128)


@pytest.mark.parametrize(("family", "batch"), [("llama3_dir", 64), ("qwen2_dir", 256), ("phi3_dir", 128)])
def test_tiny_families_agree_with_llama_imatrix(family: str, batch: int, request: pytest.FixtureRequest,
                                                tmp_path: Path) -> None:
    """Llama 3 (BOS first in every chunk, a chunk in two pieces with a KV cache), Qwen2 (biases, two chunks side by
    side in one forward), Phi-3 (fused qkv and gate_up)."""
    src = request.getfixturevalue(family)
    assert_agrees(src, f32_gguf(src, tmp_path / "f32.gguf"), ctx=128, chunks=4, batch=batch)


def test_an_adapter_is_merged_in(llama3_f32_untied_dir: Path, tmp_path: Path) -> None:
    """base + adapter gives the matrix of the merged folder (mt merge's output) to the bit."""
    from mt.merge.merge import merge
    from tests.merge.adapters import build_adapter

    adapter = build_adapter(llama3_f32_untied_dir, tmp_path / "adapter")
    merged = tmp_path / "merged"
    merge(llama3_f32_untied_dir, adapter, merged)
    options = ImatrixOptions(ctx=64, chunks=2, batch=64)
    on_the_fly = compute_imatrix(llama3_f32_untied_dir, calibration_text(), "docs", replace(options, adapter=adapter))
    from_folder = compute_imatrix(merged, calibration_text(), "docs", options)
    base = compute_imatrix(llama3_f32_untied_dir, calibration_text(), "docs", options)
    for name, values in from_folder.imatrix.sums.items():
        np.testing.assert_array_equal(on_the_fly.imatrix.sums[name], values)
    assert any(not np.array_equal(base.imatrix.sums[n], v) for n, v in from_folder.imatrix.sums.items())
