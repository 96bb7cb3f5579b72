"""Tokenizer -> GGUF vocabulary: BPE from tokenizer.json, SentencePiece from tokenizer.model, or from a
SentencePiece-style tokenizer.json alone.

Token lists, types and scores come out as llama.cpp's converter writes them. The BPE pre-tokenizer
is named from the probe hash llama.cpp uses and, failing that, from the pre_tokenizer definition in
tokenizer.json, so renamed or derived tokenizers are still recognised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from hashlib import sha256
from typing import Any, Callable

from gguf import TokenType

from mt.io.checkpoint import TOKENIZER_FILES, SideFile, SideFiles
from mt.io.gguf_out import GGUFContents
from mt.convert.special import load_special_vocab, read_tokenizer_json
from mt.errors import TokenizerError

# The probe string llama.cpp's convert_hf_to_gguf.py tokenizes; sha256(str(ids)) names the pre-tokenizer.
PROBE_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# Probe hashes from llama.cpp's converter for the pre-tokenizers of the supported families.
PROBE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",  # StarCoder's, Granite 3's
}
LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
QWEN2_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
# What a pre_tokenizer definition reduces to (see `pre_tokenizer_signature`) -> llama.cpp's name.
PRE_TOKENIZER_DEFINITIONS = {
    (("split", LLAMA3_SPLIT), ("bytelevel", False)): "llama-bpe",
    (("split", QWEN2_SPLIT), ("bytelevel", False)): "qwen2",
    (("bytelevel", True),): "gpt-2",
}
SPM_TYPES = {"normal": 1, "unknown": 2, "control": 3, "user_defined": 4, "unused": 5, "byte": 6}


def does_token_look_special(token: str) -> bool:
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def pre_tokenizer_signature(pre: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    if not pre:
        return ()
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    sig: list[tuple[str, Any]] = []
    for step in steps:
        if step.get("type") == "Split":
            sig.append(("split", (step.get("pattern") or {}).get("Regex")))
        elif step.get("type") == "ByteLevel":
            sig.append(("bytelevel", bool(step.get("use_regex", True))))
        else:
            sig.append((str(step.get("type")), None))
    return tuple(sig)


@dataclass
class VocabSummary:
    model: str
    pre: str | None
    n_tokens: int


def read_json(path: SideFile) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e})", "fix or replace the tokenizer file") from None


def _load_fast_tokenizer(files: SideFiles):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str((files / "tokenizer.json").read_text())
    except Exception as e:  # tokenizers raises a bare Exception for a bad file
        raise TokenizerError(f"{files / 'tokenizer.json'} cannot be loaded ({e})", "replace it with the model's own") from None


def _clean_up_spaces(text: str) -> str:
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def detect_pre_tokenizer(files: SideFiles, tokenizer: Any, tokenizer_json: dict[str, Any]) -> str:
    ids = tokenizer.encode(PROBE_TEXT, add_special_tokens=True).ids
    digest = sha256(str(ids).encode()).hexdigest()
    if name := PROBE_HASHES.get(digest):
        return name
    signature = pre_tokenizer_signature(tokenizer_json.get("pre_tokenizer"))
    if name := PRE_TOKENIZER_DEFINITIONS.get(signature):
        return name
    raise TokenizerError(
        f"the BPE pre-tokenizer in {files / 'tokenizer.json'} is not one llama.cpp knows (probe hash {digest[:16]}…, "
        f"definition {signature})",
        "use the tokenizer files of the base model this checkpoint was finetuned from",
    )


def write_gpt2(files: SideFiles, config: dict[str, Any], w: GGUFContents) -> VocabSummary:
    """Byte-level BPE from tokenizer.json (Llama-3, Qwen2, GPT-2 …)."""
    tj = read_tokenizer_json(files / "tokenizer.json")
    tokenizer = _load_fast_tokenizer(files)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    vocab_size = config.get("vocab_size", len(vocab))
    if vocab and max(vocab.values()) >= vocab_size:
        raise TokenizerError(
            f"tokenizer has token id {max(vocab.values())} but config.json vocab_size is {vocab_size}",
            "resize the embeddings or fix vocab_size in config.json",
        )
    pre = detect_pre_tokenizer(files, tokenizer, tj)
    added = tokenizer.get_added_tokens_decoder()
    added_by_content = {t.content for t in added.values()}
    tconfig = read_json(files / "tokenizer_config.json") if (files / "tokenizer_config.json").is_file() else {}
    clean_up = bool(tconfig.get("clean_up_tokenization_spaces", False))
    reverse = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        if token in added_by_content and i in added:
            if not added[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
                token = _clean_up_spaces(token) if clean_up else token
            if added[i].special or does_token_look_special(token):
                types.append(TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(token)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    load_special_vocab(files, load_merges=True).write(w)
    return VocabSummary("gpt2", pre, len(tokens))


def write_sentencepiece(files: SideFiles, config: dict[str, Any], w: GGUFContents) -> VocabSummary:
    """SentencePiece tokenizer.model (Llama-2, Mistral …) with added tokens from the JSON files."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto((files / "tokenizer.model").read_bytes())
    except Exception as e:  # sentencepiece raises OSError/RuntimeError for a bad model
        raise TokenizerError(f"{files / 'tokenizer.model'} cannot be loaded ({e})", "replace it with the model's own") from None
    vocab_size = config.get("vocab_size") or sp.vocab_size()
    tokens, scores, types = spm_pieces(sp, files, vocab_size)
    tconfig_path = files / "tokenizer_config.json"
    decoder = read_json(tconfig_path).get("added_tokens_decoder", {}) if tconfig_path.is_file() else {}
    for tid_text, data in decoder.items():
        tid, text = int(tid_text), data["content"]
        if tid >= vocab_size:
            continue
        if data.get("special") or does_token_look_special(text):
            types[tid] = SPM_TYPES["control"]
        else:
            text = text.replace("\u2581", " ")
            types[tid] = SPM_TYPES["user_defined"]
        scores[tid], tokens[tid] = -1000.0, text.encode("utf-8")
    return write_spm_arrays(files, w, tokens, scores, types)


def spm_pieces(sp: Any, files: SideFiles, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """Token bytes, scores and types for ids 0..vocab_size-1: the model's pieces, then added_tokens.json,
    padding ids as [PADn] (unused)."""
    if sp.vocab_size() > vocab_size:
        raise TokenizerError(f"tokenizer.model has {sp.vocab_size()} tokens, config.json's vocab_size is {vocab_size}: "
                             "the vocabulary would be cut", "use the tokenizer that belongs to this checkpoint")
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [SPM_TYPES["unused"]] * vocab_size
    for i in range(sp.vocab_size()):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = _spm_type(sp, i)
    added_json = files / "added_tokens.json"
    if added_json.is_file():
        added = read_json(added_json)
        if not isinstance(added, dict):
            raise TokenizerError(f"{added_json} is not a JSON object", "fix or replace the tokenizer file")
        for text, tid in added.items():
            if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
                raise TokenizerError(f"{added_json} gives {text!r} the id {tid!r}, not a token id",
                                     "fix or replace the tokenizer file")
            if tid < vocab_size:
                tokens[tid], scores[tid], types[tid] = text.encode("utf-8"), -1000.0, SPM_TYPES["user_defined"]
    return tokens, scores, types


def write_spm_arrays(files: SideFiles, w: GGUFContents, tokens: list[bytes], scores: list[float], types: list[int]) -> VocabSummary:
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    load_special_vocab(files, n_vocab=len(tokens)).write(w)
    return VocabSummary("llama", "default", len(tokens))


def write_llama_hf(files: SideFiles, config: dict[str, Any], w: GGUFContents) -> VocabSummary:
    """A SentencePiece-style BPE (byte fallback) given as tokenizer.json alone, read by gguf-py's LlamaHfVocab as
    llama.cpp's converter reads it: the tokenizer's own tokens and added tokens, every score -1000 (the file has
    merges, not scores), so llama.cpp's SentencePiece tokenizer merges left to right where tokenizer.json ranks."""
    from gguf.vocab import LlamaHfVocab

    with files.as_folder((*TOKENIZER_FILES, "config.json")) as folder:
        try:
            vocab = LlamaHfVocab(folder)
        except (ValueError, KeyError, OSError, TypeError, AssertionError) as e:
            raise TokenizerError(f"{files / 'tokenizer.json'} cannot be read as a SentencePiece-style tokenizer ({e})",
                                 "copy tokenizer.model from the base model into the folder") from None
        entries = list(vocab.all_tokens())
    tokens = [text for text, _, _ in entries]
    scores = [score for _, score, _ in entries]
    types = [int(kind) for _, _, kind in entries]
    return write_spm_arrays(files, w, tokens, scores, types)


def _spm_type(sp: Any, i: int) -> int:
    if sp.IsUnknown(i):
        return SPM_TYPES["unknown"]
    if sp.IsControl(i):
        return SPM_TYPES["control"]
    if sp.IsUnused(i):
        return SPM_TYPES["unused"]
    if sp.IsByte(i):
        return SPM_TYPES["byte"]
    return SPM_TYPES["normal"]


def _is_byte_fallback_bpe(files: SideFiles) -> bool:
    model = read_tokenizer_json(files / "tokenizer.json").get("model", {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback", False))


def _is_llama_hf(files: SideFiles) -> bool:
    """What gguf-py's LlamaHfVocab takes: byte-fallback BPE with a Sequence decoder."""
    if not (files / "tokenizer.json").is_file() or not _is_byte_fallback_bpe(files):
        return False
    return (read_tokenizer_json(files / "tokenizer.json").get("decoder") or {}).get("type") == "Sequence"


def write_add_space_prefix(files: SideFiles, w: GGUFContents) -> None:
    path = files / "tokenizer_config.json"
    if path.is_file() and (value := read_json(path).get("add_prefix_space")) is not None:
        w.add_add_space_prefix(value)


# loader name -> (applies to this folder?, writer)
LOADERS: dict[str, tuple[Callable[[SideFiles], bool], Callable[[SideFiles, dict[str, Any], GGUFContents], VocabSummary]]] = {
    "sentencepiece": (lambda f: (f / "tokenizer.model").is_file(), write_sentencepiece),
    "llama_hf": (_is_llama_hf, write_llama_hf),
    "gpt2": (lambda f: (f / "tokenizer.json").is_file() and not _is_byte_fallback_bpe(f), write_gpt2),
}


def write_vocab(files: SideFiles, config: dict[str, Any], w: GGUFContents, loaders: tuple[str, ...]) -> VocabSummary:
    for name in loaders:
        if name not in LOADERS:
            continue
        applies, write = LOADERS[name]
        if applies(files):
            return write(files, config, w)
    if (files / "tokenizer.json").is_file():
        raise TokenizerError(
            f"{files / 'tokenizer.json'} is a SentencePiece-style BPE without tokenizer.model, which llama.cpp's "
            "converter also needs for this family",
            "copy tokenizer.model from the base model into the folder",
        )
    raise TokenizerError(
        f"no tokenizer in {files} (tokenizer.json or tokenizer.model)",
        "copy the tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json) from the base model",
    )
