"""llama-imatrix's computation, run by llama.cpp itself through llama-cpp-python: the model graph evaluated with an
eval callback (ggml_backend_sched_eval_callback), as tools/imatrix/imatrix.cpp installs it. The activations are
llama.cpp's; what is replayed here is the tool's small driver: the text tokenized whole with special tokens added,
chunks of n_ctx tokens whose first is BOS, n_batch tokens per decode with logits for every token (so the last
layer runs on every row), and its collect_imatrix: for MUL_MAT nodes of `blk.*` weights with at least 16 F32
input rows, each input row's squares added to a float32 accumulator, one count per row."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_NAME, GGML_OBJECT_SIZE = 4, 10, 64, 32
GGML_TYPE_F32 = 0


class GgmlTensor(ctypes.Structure):  # struct ggml_tensor (ggml.h)
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
                ("nb", ctypes.c_size_t * GGML_MAX_DIMS), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * GGML_MAX_SRC), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * GGML_MAX_NAME),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


@cache
def _ggml() -> tuple[ctypes.CDLL, int]:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    lib.ggml_tensor_overhead.restype = ctypes.c_size_t
    lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    assert lib.ggml_tensor_overhead() - GGML_OBJECT_SIZE == ctypes.sizeof(GgmlTensor), "struct ggml_tensor changed"
    mul_mat = next(op for op in range(200) if lib.ggml_op_name(op) == b"MUL_MAT")
    return lib, mul_mat


def filter_tensor_name(name: str) -> str:
    """CUDA0#blk.0.attn_k.weight#0 -> blk.0.attn_k.weight"""
    if "#" not in name:
        return name
    return name.split("#", 2)[1]


@dataclass
class Collected:
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # float32 [n_mat, ne0]
    counts: dict[str, int] = field(default_factory=dict)
    n_tokens: int = 0  # the text's
    n_chunks: int = 0


def _strided(t: GgmlTensor) -> np.ndarray:
    """[ne3, ne2, ne1, ne0] float32 view of a host tensor's data."""
    size = sum((n - 1) * s for n, s in zip(t.ne, t.nb)) + 4
    flat = np.ctypeslib.as_array((ctypes.c_char * size).from_address(t.data))
    return np.lib.stride_tricks.as_strided(flat.view(np.uint8), shape=tuple(reversed(list(t.ne))) + (4,),
                                           strides=tuple(reversed(list(t.nb))) + (1,)).copy().view(np.float32)[..., 0]


def _collector(out: Collected):  # noqa: ANN202
    lib, mul_mat = _ggml()

    def collect(t_ptr: int, ask: bool, _user: int) -> bool:
        t = GgmlTensor.from_address(t_ptr)
        if t.op != mul_mat:
            return False  # the models checked here have no MUL_MAT_ID (experts)
        src0, src1 = GgmlTensor.from_address(t.src[0]), GgmlTensor.from_address(t.src[1])
        name = filter_tensor_name(src0.name.decode())
        if ask:
            return src1.ne[1] >= 16 and src1.type == GGML_TYPE_F32 and name.startswith("blk.")
        assert lib.ggml_backend_buffer_is_host(src1.buffer) and src1.nb[0] == 4
        x = _strided(src1)  # [ne3, ne2, ne1, ne0]
        n_mat = src0.ne[2] * src0.ne[3]
        acc = out.sums.setdefault(name, np.zeros((n_mat, src1.ne[0]), dtype=np.float32))
        for i3 in range(x.shape[0]):
            for i2 in range(x.shape[1]):
                mat = (i3 % src0.ne[3]) * src0.ne[2] + (i2 % src0.ne[2])
                rows = np.concatenate([acc[mat][None], x[i3, i2] * x[i3, i2]])
                acc[mat] = np.cumsum(rows, axis=0, dtype=np.float32)[-1]  # row after row in float32, as the C++ loop
        out.counts[name] = out.counts.get(name, 0) + int(np.prod(list(src1.ne[1:]))) // n_mat
        return True

    return collect


def llama_imatrix(gguf: Path, text: str, n_ctx: int, n_chunks: int | None = None, n_batch: int | None = None,
                  n_threads: int | None = None, f32_attention: bool = True) -> Collected:
    """What `llama-imatrix -m gguf -f text -c n_ctx [--chunks n] [-b n_batch]` collects (n_batch default: n_ctx);
    with `f32_attention` as with `-ctk f32 -ctv f32 -fa off` (llama.cpp's default F16 KV cache and flash attention
    round keys, values and queries to F16, ~1e-3 of the attention's output)."""
    import llama_cpp

    n_batch = n_batch or n_ctx
    n_seq = max(1, n_batch // n_ctx)
    assert n_batch < n_ctx or n_batch % n_ctx == 0
    out = Collected()
    callback = llama_cpp.ggml_backend_sched_eval_callback(_collector(out))
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), mparams)
    assert model, f"llama.cpp cannot load {gguf}"
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_seq_max, cparams.n_batch = n_seq * n_ctx, n_seq, min(n_batch, n_seq * n_ctx)
    cparams.n_threads = cparams.n_threads_batch = n_threads or os.cpu_count() or 1
    cparams.cb_eval, cparams.cb_eval_user_data = callback, None
    if f32_attention:
        cparams.type_k = cparams.type_v = GGML_TYPE_F32
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    assert ctx, "llama.cpp cannot make a context"
    batch = llama_cpp.llama_batch_init(min(n_batch, n_seq * n_ctx), 0, n_seq)
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        tokens = _tokenize(vocab, text)
        out.n_tokens = len(tokens)
        assert len(tokens) >= 2 * n_ctx, f"llama-imatrix needs at least {2 * n_ctx} tokens, the text has {len(tokens)}"
        n_chunk = len(tokens) // n_ctx if n_chunks is None else min(n_chunks, len(tokens) // n_ctx)
        bos = llama_cpp.llama_vocab_bos(vocab) if llama_cpp.llama_vocab_get_add_bos(vocab) else None
        for i in range(0, n_chunk, n_seq):
            _decode_chunks(ctx, batch, tokens, i, min(n_seq, n_chunk - i), n_ctx, n_batch, bos)
        out.n_chunks = n_chunk
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    del callback
    return out


def _tokenize(vocab: int, text: str) -> list[int]:
    import llama_cpp

    raw = text.encode("utf-8")
    room = len(raw) + 16
    ids = (llama_cpp.llama_token * room)()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), ids, room, True, False)
    assert n >= 0
    return list(ids[:n])


def _decode_chunks(ctx: int, batch, tokens: list[int], first: int, n_seq: int, n_ctx: int, n_batch: int,  # noqa: ANN001
                   bos: int | None) -> None:
    import llama_cpp

    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    start = first * n_ctx
    for j in range((n_ctx + n_batch - 1) // n_batch):
        batch_start = start + j * n_batch
        size = min(start + n_ctx - batch_start, n_batch)
        batch.n_tokens = 0
        for seq in range(n_seq):
            seq_start = batch_start + seq * n_ctx
            for k in range(size):
                token = bos if (bos is not None and j == 0 and k == 0) else tokens[seq_start + k]
                at = batch.n_tokens
                batch.token[at], batch.pos[at], batch.n_seq_id[at] = token, j * n_batch + k, 1
                batch.seq_id[at][0], batch.logits[at] = seq, True
                batch.n_tokens += 1
        assert llama_cpp.llama_decode(ctx, batch) == 0, "llama_decode failed"
