"""llama.cpp's multimodal library (libmtmd, through llama-cpp-python's bindings) as the oracle for mmproj files: the
embeddings it gives an image with a text model and its projector, as llama-mtmd-cli computes them before decoding."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

IMAGE_CHUNK = 1  # MTMD_INPUT_CHUNK_TYPE_IMAGE
FLASH_ATTN_DISABLED = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED


def image_embeddings(text_gguf: Path, mmproj: Path, image: np.ndarray) -> np.ndarray:
    """[tokens, n_embd] float32 for `image` (uint8, height x width x RGB), llama.cpp's own preprocessing included.
    Flash attention off (-fa off): its F16 K and V would add their rounding to the comparison."""
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    llm = llama_cpp.Llama(model_path=str(text_gguf), n_ctx=256, verbose=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, 2, False, False
    params.flash_attn_type = FLASH_ATTN_DISABLED
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
    if not ctx:
        raise RuntimeError(f"libmtmd could not load {mmproj} with {text_gguf}")
    height, width, _ = image.shape
    pixels = (ctypes.c_ubyte * image.size).from_buffer_copy(np.ascontiguousarray(image).tobytes())
    bitmap = mtmd.mtmd_bitmap_init(width, height, pixels)
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        marker = mtmd.mtmd_default_marker()
        text = mtmd.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
        if mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (ctypes.c_void_p * 1)(bitmap), 1) != 0:
            raise RuntimeError("mtmd_tokenize failed")
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) != IMAGE_CHUNK:
                continue
            n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            if mtmd.mtmd_encode_chunk(ctx, chunk) != 0:
                raise RuntimeError("mtmd_encode_chunk failed")
            out = mtmd.mtmd_get_output_embd(ctx)
            return np.ctypeslib.as_array(out, shape=(n_tokens * llm.n_embd(),)).reshape(n_tokens, -1).copy()
        raise RuntimeError("the prompt held no image chunk")
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)
        llm.close()
