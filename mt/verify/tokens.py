"""Tokenization: llama.cpp's tokenizer on the GGUF vs the source's tokenizer, text by text."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from mt.verify.corpus import CORPUS, with_special_tokens
from mt.verify.logits import native_stderr_silenced
from mt.verify.reference import Reference, split_on_specials
from mt.verify.report import Check, Status

Tokenize = Callable[[str], list[int]]


@contextmanager
def llama_cpp_tokenizer(gguf_path: Path) -> Iterator[Tokenize]:
    """llama.cpp's tokenizer for the GGUF (vocab only): add_special per the file's add_bos, specials parsed."""
    from llama_cpp import Llama

    with native_stderr_silenced():
        llm = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        def tokenize(text: str) -> list[int]:
            with native_stderr_silenced():  # llama.cpp warns about a doubled BOS in text that starts with one
                return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

        yield tokenize
    finally:
        llm.close()


def reference_tokenizer(ref: Reference) -> Tokenize:
    """The source's tokenization, with special tokens added as the source adds them.

    transformers 5 tokenizes a SentencePiece (tokenizer.model) checkpoint through `tokenizers`, which
    departs from sentencepiece on runs of spaces and after special tokens; llama.cpp follows
    sentencepiece, the library those models were trained with, so sentencepiece is the reference there.
    """
    tok = ref.tokenizer
    if not ref.is_sentencepiece:
        return lambda text: list(tok(text)["input_ids"])
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(ref.folder / "tokenizer.model"))
    specials = ref.special_token_texts()
    probe = tok("a")["input_ids"]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id] else []

    def encode(text: str) -> list[int]:
        ids = list(bos)
        for part in split_on_specials(text, specials):
            ids.extend([part] if isinstance(part, int) else sp.encode(part))
        return ids

    return encode


def verify_texts(ref: Reference, user_text: str | None) -> dict[str, str]:
    """The built-in multilingual corpus, a text with the source's special tokens, and the user's text."""
    texts = dict(CORPUS)
    texts["special"] = with_special_tokens(ref.tokenizer.bos_token, ref.tokenizer.eos_token)
    if user_text:
        texts["user text"] = user_text
    return texts


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_tokenization(gguf_path: Path, ref: Reference, user_text: str | None) -> Check:
    reference = reference_tokenizer(ref)
    texts = verify_texts(ref, user_text)
    try:
        mismatches = _mismatches(gguf_path, reference, texts)
    except ValueError as e:  # llama-cpp-python: "Failed to load model from file"
        return Check("tokenization", Status.FAIL, f"llama.cpp cannot load the GGUF's vocabulary ({e})")
    problems = [_describe(name, m) for name, m in mismatches.items()]
    summary = (f"{len(texts)} texts identical ({', '.join(texts)})" if not mismatches
               else f"{len(mismatches)} of {len(texts)} texts differ: {', '.join(mismatches)}")
    return Check("tokenization", Status.FAIL if mismatches else Status.PASS, summary, problems,
                 {"texts": len(texts), "mismatches": mismatches})


def _mismatches(gguf_path: Path, reference: Tokenize, texts: dict[str, str]) -> dict[str, dict[str, Any]]:
    mismatches: dict[str, dict[str, Any]] = {}
    with llama_cpp_tokenizer(gguf_path) as llama_cpp:
        for name, text in texts.items():
            ours, theirs = llama_cpp(text), reference(text)
            if ours != theirs:
                mismatches[name] = {"text": text, "llama_cpp": ours, "reference": theirs,
                                    "first_difference": _first_difference(ours, theirs)}
    return mismatches


def _describe(name: str, m: dict[str, Any]) -> str:
    i = m["first_difference"]
    lo = max(0, i - 3)
    return (f"{name}: first difference at token {i}: llama.cpp {m['llama_cpp'][lo:i + 4]} "
            f"vs source {m['reference'][lo:i + 4]} (tokens {lo}..; {len(m['llama_cpp'])} vs {len(m['reference'])} tokens)")
