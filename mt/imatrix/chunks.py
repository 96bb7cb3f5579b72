"""The calibration text as llama-imatrix cuts it: tokenized whole by llama.cpp's tokenizer (special tokens
added as the vocabulary says, none parsed from the text), split into chunks of n_ctx tokens whose first token
becomes BOS where the vocabulary adds one; at least two chunks' worth of tokens are needed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mt.errors import MtError
from mt.io.quiet import native_stderr_silenced
from mt.verify.tokens import llama_cpp_vocab_only

MIN_CHUNKS_OF_TEXT = 2  # llama-imatrix refuses text shorter than 2 * n_ctx tokens


@dataclass(frozen=True)
class Vocabulary:
    tokens: np.ndarray  # int32, the whole text
    bos: int | None  # the id put first in each chunk, None where the vocabulary adds no BOS


def tokenize(gguf: Path, text: str) -> Vocabulary:
    """`text` through the tokenizer of the GGUF `gguf` (its vocabulary suffices)."""
    with llama_cpp_vocab_only(gguf) as llm, native_stderr_silenced():
        tokens = np.asarray(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False), dtype=np.int32)
        bos = llm._model.token_bos() if llm._model.add_bos_token() else None
    return Vocabulary(tokens, None if bos is None or bos < 0 else int(bos))


def cut_chunks(vocab: Vocabulary, n_ctx: int, max_chunks: int | None, text_name: str) -> np.ndarray:
    """[n_chunks, n_ctx] int64 token ids: as many whole chunks as the text holds (at most `max_chunks`)."""
    n_tokens = int(vocab.tokens.size)
    if n_tokens < MIN_CHUNKS_OF_TEXT * n_ctx:
        raise MtError(f"{text_name} tokenizes to {n_tokens} tokens; a context of {n_ctx} needs at least "
                      f"{MIN_CHUNKS_OF_TEXT * n_ctx}", "give a longer calibration text or a smaller --ctx")
    n_chunks = n_tokens // n_ctx if max_chunks is None else min(max_chunks, n_tokens // n_ctx)
    chunks = vocab.tokens[: n_chunks * n_ctx].reshape(n_chunks, n_ctx).astype(np.int64)
    if vocab.bos is not None:
        chunks[:, 0] = vocab.bos
    return chunks
