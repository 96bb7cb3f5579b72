"""llama.cpp's own quantizer (llama_model_quantize through llama-cpp-python): the whole-file oracle."""

from __future__ import annotations

from pathlib import Path

from gguf import LlamaFileType


def llama_quantize(src: Path, out: Path, ftype: LlamaFileType, nthread: int = 2) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = nthread
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with {rc}")
