"""llama.cpp's own quantizer (llama_model_quantize through llama-cpp-python): the whole-file oracle."""

from __future__ import annotations

from pathlib import Path

from gguf import LlamaFileType


def llama_quantize(src: Path, out: Path, ftype: LlamaFileType, nthread: int = 2, *, pure: bool = False,
                   output_tensor_type: int | None = None, token_embedding_type: int | None = None) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = nthread
    params.pure = pure
    if output_tensor_type is not None:
        params.output_tensor_type = output_tensor_type
    if token_embedding_type is not None:
        params.token_embedding_type = token_embedding_type
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with {rc}")
