"""The TADA backbone in llama.cpp (llama-cpp-python's C API): input embeddings in, the final-norm hidden state of
each position out (embeddings on, no pooling), one KV-cache sequence per branch (the text and, for guidance, the
negative one).

Token embeddings are read from the GGUF's token_embd rows by mt (llama.cpp takes either token ids or whole
embeddings for a batch, and TADA adds its acoustic terms to the token's row).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Sequence

import numpy as np

from mt.errors import GGUFError, MtError
from mt.io.quiet import native_stderr_silenced
from mt.speak.weights import GGUFWeights

GGML_TYPE_F32 = 0
POOLING_NONE = 0
MAX_BATCH = 512  # positions per llama_decode and sequence: a voice prompt's prefill longer than this goes in pieces


def check_backbone(weights: GGUFWeights) -> GGUFWeights:
    return weights.require_arch("llama", "a TADA backbone",
                                "pass the backbone GGUF that mt convert wrote for a TadaForCausalLM")


class Backbone:
    """A llama.cpp context over the backbone GGUF: `n_seq` sequences of up to `n_ctx` positions together."""

    def __init__(self, weights: GGUFWeights, n_ctx: int, n_seq: int, threads: int | None = None,
                 f32_cache: bool = False) -> None:
        import llama_cpp as ll

        self.ll = ll
        self.weights = check_backbone(weights)
        path = weights.path
        self.n_embd = int(self.weights.needed("llama.embedding_length"))
        self.n_seq = n_seq
        mparams = ll.llama_model_default_params()
        with native_stderr_silenced():
            self.model = ll.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise GGUFError(f"llama.cpp cannot load {path}", "convert the model again with mt convert")
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = n_ctx * n_seq
        cparams.n_batch = cparams.n_ubatch = min(n_ctx, MAX_BATCH) * n_seq
        cparams.n_seq_max = n_seq
        cparams.kv_unified = True
        cparams.embeddings = True
        cparams.pooling_type = POOLING_NONE
        if threads:
            cparams.n_threads = cparams.n_threads_batch = threads
        if f32_cache:  # and no flash attention: llama.cpp's CPU kernel for it rounds the queries to F16
            cparams.type_k = cparams.type_v = GGML_TYPE_F32
            cparams.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        with native_stderr_silenced():
            self.ctx = ll.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            ll.llama_model_free(self.model)
            raise MtError(f"llama.cpp cannot make a context of {n_ctx} positions for {path}", "speak a shorter text")

    def close(self) -> None:
        with native_stderr_silenced():
            self.ll.llama_free(self.ctx)
            self.ll.llama_model_free(self.model)

    def __enter__(self) -> "Backbone":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset(self) -> None:
        """Forget every sequence (a new utterance starts at position 0)."""
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)

    def token_rows(self, ids: Sequence[int]) -> np.ndarray:
        return self.weights.rows("token_embd.weight", ids)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """llama.cpp's tokenization of `text` (special tokens written as text are parsed), no BOS added."""
        vocab = self.ll.llama_model_get_vocab(self.model)
        raw = text.encode("utf-8")
        size = len(raw) + 16
        buffer = (self.ll.llama_token * size)()
        n = self.ll.llama_tokenize(vocab, raw, len(raw), buffer, size, False, special)
        if n < 0:
            raise MtError("the text is too long to tokenize", "speak a shorter text")
        return list(buffer[:n])

    def forward(self, embeddings: Sequence[np.ndarray], start: int) -> list[np.ndarray]:
        """`embeddings[s]` ([n, n_embd] float32, the same n for every s) at positions start.. of sequence s; the hidden
        state of every position, per sequence. At most MAX_BATCH positions go in one llama_decode."""
        n = len(embeddings[0])
        pieces = [self._decode([e[i:i + MAX_BATCH] for e in embeddings], start + i) for i in range(0, n, MAX_BATCH)]
        return [np.concatenate([piece[s] for piece in pieces]) for s in range(len(embeddings))]

    def _decode(self, embeddings: Sequence[np.ndarray], start: int) -> list[np.ndarray]:
        ll = self.ll
        counts = [len(e) for e in embeddings]
        total = sum(counts)
        batch = ll.llama_batch_init(total, self.n_embd, self.n_seq)
        try:
            flat = np.ascontiguousarray(np.concatenate(embeddings), dtype=np.float32)
            ctypes.memmove(batch.embd, flat.ctypes.data, flat.nbytes)
            i = 0
            for seq, count in enumerate(counts):
                for k in range(count):
                    batch.pos[i] = start + k
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = 1
                    i += 1
            batch.n_tokens = total
            with native_stderr_silenced():
                status = ll.llama_decode(self.ctx, batch)
            if status != 0:
                raise MtError(f"llama.cpp could not run the backbone (llama_decode returned {status})",
                              "speak a shorter text")
            out = []
            i = 0
            for count in counts:
                rows = [np.ctypeslib.as_array(ll.llama_get_embeddings_ith(self.ctx, i + k), shape=(self.n_embd,)).copy()
                        for k in range(count)]
                out.append(np.stack(rows))
                i += count
            return out
        finally:
            ll.llama_batch_free(batch)
