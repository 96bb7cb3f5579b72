"""What the matrix is for: files quantized with mt's matrix and with llama-imatrix's (llama.cpp's defaults, F16 KV
cache) are equally close to the source. Both go through the same quantizer; KLD is measured in llama.cpp against
the F32 conversion on text the matrices did not see."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mt.imatrix.chunks import tokenize
from mt.imatrix.compute import ImatrixOptions, compute_imatrix
from mt.io.quiet import native_stderr_silenced
from mt.quant.imatrix import ImatrixSums, write_imatrix_gguf
from mt.quant.quantize import quantize_gguf
from mt.verify.logit_check import divergence
from mt.verify.logits import llama_cpp_logits
from tests.imatrix.test_compute import calibration_text
from tests.llama_imatrix import llama_imatrix

CTX, CHUNKS = 128, 8
EVAL_TOKENS = 4096  # files differing in a few rounding choices differ by ~1% in KLD over 512 tokens, ~0.2% over 4096
HELD_OUT_CHARS = 30000  # the text's end, past the chunks the matrices saw


@pytest.fixture(scope="module")
def matrices(smollm2_dir: Path, smollm2_f32: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("matrices")
    text = calibration_text()[:-HELD_OUT_CHARS]
    run = compute_imatrix(smollm2_dir, text, "docs", ImatrixOptions(ctx=CTX, chunks=CHUNKS))
    with native_stderr_silenced():
        theirs = llama_imatrix(smollm2_f32, text, CTX, CHUNKS, f32_attention=False)
    counts = {name: np.array([count]) for name, count in theirs.counts.items()}
    write_imatrix_gguf(folder / "mt.gguf", run.imatrix)
    write_imatrix_gguf(folder / "llama.gguf", ImatrixSums(theirs.sums, counts, "docs", CTX))
    return {"mt": folder / "mt.gguf", "llama-imatrix": folder / "llama.gguf"}


@pytest.fixture(scope="module")
def reference(smollm2_f32: Path) -> tuple[list[int], np.ndarray]:
    ids = [int(i) for i in tokenize(smollm2_f32, calibration_text()[-HELD_OUT_CHARS:]).tokens[:EVAL_TOKENS]]
    assert len(ids) == EVAL_TOKENS
    return ids, llama_cpp_logits(smollm2_f32, ids)


@pytest.mark.parametrize("file_type", ["q4_k_m", "iq2_xxs"])
def test_kld_within_two_percent_of_llama_imatrix_s(file_type: str, matrices: dict[str, Path], smollm2_f32: Path,
                                                    reference: tuple[list[int], np.ndarray], tmp_path: Path) -> None:
    ids, reference_logits = reference
    kld = {}
    for name, imatrix in matrices.items():
        out = tmp_path / f"{name}.gguf"
        quantize_gguf(smollm2_f32, out, file_type, imatrix=imatrix)
        kld[name] = divergence(reference_logits, llama_cpp_logits(out, ids), ids)[0].kld_mean
    print(f"\n{file_type} mean KLD: mt's matrix {kld['mt']:.5f}, llama-imatrix's {kld['llama-imatrix']:.5f}")
    assert abs(kld["mt"] / kld["llama-imatrix"] - 1) < 0.02, kld
