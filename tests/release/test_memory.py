"""The memory estimate from a GGUF header against what llama.cpp allocates for the model and its KV cache."""

from __future__ import annotations

import ctypes
import re

import llama_cpp
import pytest

from mt.convert.convert import convert
from mt.io.gguf_in import read_header
from mt.release.memory import cache_types, contexts, estimate

MIB = 2**20


def llama_cpp_allocations(path, n_ctx: int, cache_type: str, swa_full: bool) -> tuple[int, int]:
    """(llama_model_size, the sum of the KV buffers llama.cpp logs) for a context of n_ctx."""
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode(errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        kv_type = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}[cache_type]
        model = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=2, verbose=True, type_k=kv_type, type_v=kv_type,
                                flash_attn=cache_type != "f16", swa_full=swa_full)
        model_size = llama_cpp.llama_model_size(model.model)
        del model
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))
    kv = sum(float(m) for m in re.findall(r"KV buffer size =\s*([\d.]+) MiB", "".join(lines)))
    return model_size, round(kv * MIB)


@pytest.mark.parametrize("fixture", ["llama3_dir", "qwen3_dir", "phi3_dir", "gemma2_dir", "gemma3_dir"])
@pytest.mark.parametrize("n_ctx, cache_type, swa_full", [(512, "f16", False), (2048, "f16", False), (2048, "q8_0", False),
                                                         (2048, "f16", True)])
def test_estimate_within_ten_percent_of_llama_cpp(fixture, n_ctx, cache_type, swa_full, request, tmp_path):
    path = tmp_path / "model.gguf"
    convert(request.getfixturevalue(fixture), path, "f16")
    header = read_header(path)
    if cache_type not in cache_types(header):  # llama.cpp refuses it too
        with pytest.raises(ValueError, match="Failed to create llama_context"):
            llama_cpp_allocations(path, n_ctx, cache_type, swa_full)
        return
    expected = estimate(header, n_ctx, cache_type, swa_full)
    model_size, kv = llama_cpp_allocations(path, n_ctx, cache_type, swa_full)
    assert kv > 0
    assert abs(expected.weights - model_size) <= 0.1 * model_size
    assert abs(expected.kv_cache - kv) <= 0.1 * kv, (expected.kv_cache / MIB, kv / MIB)


def test_contexts_stop_at_the_models_own(llama3_dir, tmp_path):
    path = tmp_path / "model.gguf"
    convert(llama3_dir, path, "f16")
    header = read_header(path)
    longest = int(header.value("llama.context_length"))
    assert contexts(header)[-1] == longest and all(c < longest for c in contexts(header)[:-1])
