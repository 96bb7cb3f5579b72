"""Tokenization: llama.cpp on the checked file against llama.cpp on mt's conversion of the source, text by text, and
both against the source's own tokenizer."""

from __future__ import annotations

import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from mt.verify.corpus import CORPUS, with_special_tokens
from mt.io.gguf_in import read_header
from mt.io.quiet import native_stderr_silenced
from mt.verify.reference import Reference, split_on_specials
from mt.verify.report import Check, Status

Tokenize = Callable[[str], list[int]]


@dataclass
class LlamaCppVocab:
    tokenize: Tokenize
    text_of: Callable[[list[int]], str]  # the text of some token ids (llama.cpp's detokenizer)


@contextmanager
def llama_cpp_vocab_only(gguf_path: Path) -> Iterator["Llama"]:  # noqa: F821
    """llama-cpp-python's Llama on the GGUF's vocabulary alone (no weights loaded), closed afterwards."""
    from llama_cpp import Llama

    with native_stderr_silenced():
        llm = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        yield llm
    finally:
        llm.close()


@contextmanager
def llama_cpp_tokenizer(gguf_path: Path) -> Iterator[LlamaCppVocab]:
    """llama.cpp's tokenizer for the GGUF (vocab only): add_special per the file's add_bos, specials parsed."""
    with llama_cpp_vocab_only(gguf_path) as llm:
        def tokenize(text: str) -> list[int]:
            with native_stderr_silenced():  # llama.cpp warns about a doubled BOS in text that starts with one
                return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

        def text_of(ids: list[int]) -> str:
            return llm.detokenize(ids, special=True).decode("utf-8", errors="replace")

        yield LlamaCppVocab(tokenize, text_of)


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


def check_tokenization(checked: Path, reference: Path, ref: Reference, user_text: str | None) -> Check:
    """llama.cpp on the file must tokenize every text as llama.cpp on mt's conversion of the source (exact); where
    both differ from the source's own tokenizer, that is llama.cpp's tokenizer for this vocabulary: a warning."""
    texts = verify_texts(ref, user_text)
    hf = reference_tokenizer(ref)
    try:
        with llama_cpp_tokenizer(checked) as mine, llama_cpp_tokenizer(reference) as theirs:
            failures, limits = _compare(texts, mine, theirs, hf, is_unscored_sentencepiece(reference))
    except ValueError as e:  # llama-cpp-python: "Failed to load model from file"
        return Check("tokenization", Status.FAIL, f"llama.cpp cannot load the GGUF's vocabulary ({e})")
    data = {"texts": len(texts), "mismatches": failures, "llama_cpp_limits": limits}
    if failures:
        return Check("tokenization", Status.FAIL, f"{len(failures)} of {len(texts)} texts tokenize differently from mt's "
                     f"conversion of the source: {', '.join(failures)}", [m["description"] for m in failures.values()], data)
    summary = f"{len(texts)} texts tokenized as mt's conversion of the source tokenizes them"
    if limits:
        return Check("tokenization", Status.WARN, f"{summary}; llama.cpp differs from the source's tokenizer on "
                     f"{', '.join(limits)} (a limit of llama.cpp's tokenizer, not of the conversion)",
                     [m["description"] for m in limits.values()], data)
    return Check("tokenization", Status.PASS, f"{summary} and as the source's tokenizer does", [], data)


def is_unscored_sentencepiece(gguf_path: Path) -> bool:
    """A SentencePiece vocabulary whose pieces all have one score: what a tokenizer.json without tokenizer.model
    converts to (tokenizer.json ranks merges; it has no scores)."""
    header = read_header(gguf_path)
    scores = header.value("tokenizer.ggml.scores") or []
    return header.value("tokenizer.ggml.model") == "llama" and len(set(scores)) == 1


UNSCORED_CAUSE = ("the vocabulary has no scores (tokenizer.json without tokenizer.model, converted as llama.cpp's "
                  "converter converts it), so llama.cpp merges pieces left to right, not in tokenizer.json's order; "
                  "copy tokenizer.model from the base model and convert again")


def _compare(texts: dict[str, str], mine: LlamaCppVocab, theirs: LlamaCppVocab, hf: Tokenize,
             unscored: bool) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    failures: dict[str, dict[str, Any]] = {}
    limits: dict[str, dict[str, Any]] = {}
    for name, text in texts.items():
        ours, expected, original = mine.tokenize(text), theirs.tokenize(text), hf(text)
        if ours != expected:
            failures[name] = _difference(name, text, ours, expected, "mt's conversion", mine.text_of)
        elif ours != original:
            limits[name] = _difference(name, text, ours, original, "the source's tokenizer", mine.text_of)
            cause = UNSCORED_CAUSE if unscored else likely_cause(limits[name]["window"])
            limits[name]["description"] += f"; likely cause: {cause}"
    return failures, limits


def _difference(name: str, text: str, ours: list[int], other: list[int], other_name: str,
                text_of: Callable[[list[int]], str]) -> dict[str, Any]:
    i = _first_difference(ours, other)
    lo = max(0, i - 2)
    window = text_of(ours[i:i + 4]).strip("\ufffd")  # decoded together: a byte-level token may hold part of a character
    description = (f"{name}: llama.cpp {ours[lo:i + 4]} vs {other_name} {other[lo:i + 4]} from token {lo}, at {window!r} "
                   f"({len(ours)} vs {len(other)} tokens) in {text[:40]!r}…")
    return {"text": text, "llama_cpp": ours, "reference": other, "first_difference": i, "window": window,
            "description": description}


def likely_cause(chars: str) -> str:
    """What the characters where llama.cpp's tokens part from the source's have in common, in words."""
    chars = chars.replace("\ufffd", "")
    if any(unicodedata.category(c) == "Nd" and not c.isascii() for c in chars):
        return "non-ASCII digits, which llama.cpp's pre-tokenizer groups differently"
    if chars and chars.isspace():
        return "a run of whitespace, which llama.cpp's pre-tokenizer splits differently"
    if any(unicodedata.category(c) in ("So", "Sk", "Cf", "Mn") for c in chars):
        return "emoji, joiners or combining marks, which llama.cpp's pre-tokenizer splits differently"
    return "llama.cpp's pre-tokenizer for this vocabulary splits this text differently"
