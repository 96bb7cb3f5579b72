"""Tiny, seeded Hugging Face checkpoints with real tokenizers rebuilt from llama.cpp's vocab GGUFs."""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from sentencepiece import SentencePieceProcessor
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from tests import oracle

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
MAX_POSITIONS = 2048
INIT_RANGE = 0.1
ONE_D_NOISE = 0.1

LLAMA3_VOCAB = 128256
LLAMA2_VOCAB = 32000
QWEN2_VOCAB = 151936

LLAMA3_ROPE_SCALING = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}

LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

QWEN25_EXTRA_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True),
    ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)

LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

_GGUF_NORMAL = 1


@dataclass(frozen=True)
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    scores: list[float]
    merges: list[str]


@dataclass(frozen=True)
class AddedToken:
    id: int
    content: str
    special: bool = True


_SCALARS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9


class _KVReader:
    """Reads the key/value header of a GGUF file (GGUFReader takes ~10 s on a 128k-token vocab)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        self.pos += n
        return self.data[self.pos - n:self.pos].decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if itype in _SCALARS and itype != 7:
                arr = np.frombuffer(self.data, dtype=np.dtype(_SCALARS[itype]), count=count, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(itype) for _ in range(count)]
        return self.unpack(_SCALARS[vtype])

    def fields(self) -> dict[str, Any]:
        if self.data[:4] != b"GGUF":
            raise ValueError("not a GGUF file")
        self.pos = 4
        if self.unpack("<I") < 2:
            raise ValueError("GGUF v1 is not supported")
        self.unpack("<Q")
        out: dict[str, Any] = {}
        for _ in range(self.unpack("<Q")):
            key = self.string()
            out[key] = self.value(self.unpack("<I"))
        return out


def read_gguf_fields(path: Path) -> dict[str, Any]:
    return _KVReader(Path(path).read_bytes()).fields()


def read_gguf_vocab(name: str) -> GGUFVocab:
    fields = read_gguf_fields(oracle.vocab_gguf(name))
    return GGUFVocab(
        tokens=fields.get("tokenizer.ggml.tokens", []),
        token_types=fields.get("tokenizer.ggml.token_type", []),
        scores=fields.get("tokenizer.ggml.scores", []),
        merges=fields.get("tokenizer.ggml.merges", []),
    )


# ---------------------------------------------------------------- tokenizers


def _byte_level(add_prefix_space: bool, trim_offsets: bool, use_regex: bool) -> dict[str, Any]:
    return {
        "type": "ByteLevel",
        "add_prefix_space": add_prefix_space,
        "trim_offsets": trim_offsets,
        "use_regex": use_regex,
    }


def _split_then_byte_level(regex: str, trim_offsets: bool) -> dict[str, Any]:
    split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
    return {"type": "Sequence", "pretokenizers": [split, _byte_level(False, trim_offsets, False)]}


def _bos_template(bos: str, bos_id: int) -> dict[str, Any]:
    special = {"SpecialToken": {"id": bos, "type_id": 0}}
    return {
        "type": "TemplateProcessing",
        "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            special, {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def _added_token_json(tok: AddedToken) -> dict[str, Any]:
    return {
        "id": tok.id, "content": tok.content, "single_word": False, "lstrip": False,
        "rstrip": False, "normalized": False, "special": tok.special,
    }


def _bpe_model(vocab: GGUFVocab, n_base: int, ignore_merges: bool) -> dict[str, Any]:
    return {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": ignore_merges,
        "vocab": {tok: i for i, tok in enumerate(vocab.tokens[:n_base])},
        "merges": [m.split(" ") for m in vocab.merges],
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _added_tokens_decoder(added: list[AddedToken]) -> dict[str, Any]:
    return {
        str(t.id): {k: v for k, v in _added_token_json(t).items() if k != "id"} for t in added
    }


def write_llama3_tokenizer(dir: Path) -> None:
    vocab = read_gguf_vocab("llama-bpe")
    n_base = vocab.token_types.index(3)
    added = [AddedToken(i, vocab.tokens[i]) for i in range(n_base, len(vocab.tokens))]
    bos_id = vocab.tokens.index("<|begin_of_text|>")
    post = {
        "type": "Sequence",
        "processors": [_byte_level(True, False, True), _bos_template("<|begin_of_text|>", bos_id)],
    }
    _write_json(dir / "tokenizer.json", {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token_json(t) for t in added],
        "normalizer": None,
        "pre_tokenizer": _split_then_byte_level(LLAMA3_SPLIT_REGEX, True),
        "post_processor": post,
        "decoder": _byte_level(True, True, True),
        "model": _bpe_model(vocab, n_base, ignore_merges=True),
    })
    _write_json(dir / "tokenizer_config.json", {
        "added_tokens_decoder": _added_tokens_decoder(added),
        "bos_token": "<|begin_of_text|>",
        "chat_template": oracle.template("meta-llama-Llama-3.2-3B-Instruct"),
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })


LLAMA32_RENAMED = {128004: "<|finetune_right_pad_id|>", 128008: "<|eom_id|>", 128010: "<|python_tag|>"}


def write_llama32_tokenizer(dir: Path) -> None:
    """Llama 3.2's tokenizer: Llama 3's, with the special tokens 3.1 named in place of reserved ones (TADA pads with
    <|finetune_right_pad_id|>, id 128004)."""
    write_llama3_tokenizer(dir)
    tokenizer = json.loads((dir / "tokenizer.json").read_text(encoding="utf-8"))
    for token in tokenizer["added_tokens"]:
        token["content"] = LLAMA32_RENAMED.get(token["id"], token["content"])
    _write_json(dir / "tokenizer.json", tokenizer)
    config = json.loads((dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    for token_id, name in LLAMA32_RENAMED.items():
        config["added_tokens_decoder"][str(token_id)]["content"] = name
    _write_json(dir / "tokenizer_config.json", config)


REFACT_DIGITS = {"type": "Split", "pattern": {"Regex": "\\p{N}"}, "behavior": "Isolated", "invert": False}
REFACT_VOCAB = 49152


def write_refact_tokenizer(dir: Path) -> None:
    """The StarCoder-style BPE Granite 3 ships (digits split one by one, then byte-level), from llama.cpp's refact
    test vocabulary; it tokenizes llama.cpp's probe text to the hash the converter names "refact"."""
    vocab = read_gguf_vocab("refact")
    added = [AddedToken(i, vocab.tokens[i]) for i in range(REFACT_VOCAB) if vocab.token_types[i] == 3]
    _write_json(dir / "tokenizer.json", {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token_json(t) for t in added],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [REFACT_DIGITS, _byte_level(False, True, True)]},
        "post_processor": None,
        "decoder": _byte_level(False, True, True),
        "model": _bpe_model(vocab, REFACT_VOCAB, ignore_merges=False),
    })
    _write_json(dir / "tokenizer_config.json", {
        "added_tokens_decoder": _added_tokens_decoder(added),
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": True,
        "model_max_length": 4096,
        "tokenizer_class": "GPT2Tokenizer",
    })


def write_qwen2_tokenizer(dir: Path) -> None:
    vocab = read_gguf_vocab("qwen2")
    n_base = vocab.token_types.index(3)
    n_real = vocab.token_types.index(4)
    added = [AddedToken(i, vocab.tokens[i]) for i in range(n_base, n_real)]
    added += [AddedToken(n_real + k, text, special) for k, (text, special) in enumerate(QWEN25_EXTRA_TOKENS)]
    bpe = _bpe_model(vocab, n_base, ignore_merges=False)
    bpe.update(continuing_subword_prefix="", end_of_word_suffix="")
    _write_json(dir / "tokenizer.json", {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token_json(t) for t in added],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": _split_then_byte_level(QWEN2_SPLIT_REGEX, False),
        "post_processor": _byte_level(False, False, False),
        "decoder": _byte_level(False, False, False),
        "model": bpe,
    })
    _write_json(dir / "tokenizer_config.json", {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": _added_tokens_decoder(added),
        "additional_special_tokens": [t.content for t in added if t.special and t.id > n_base],
        "bos_token": None,
        "chat_template": oracle.template("Qwen-Qwen2.5-7B-Instruct"),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })


def _sp_model_proto(vocab: GGUFVocab) -> sp_pb2.ModelProto:
    proto = sp_pb2.ModelProto()
    for text, score, kind in zip(vocab.tokens, vocab.scores, vocab.token_types):
        proto.pieces.add(piece=text, score=score, type=kind)
    ts = proto.trainer_spec
    ts.model_type = sp_pb2.TrainerSpec.BPE
    ts.vocab_size = len(vocab.tokens)
    ts.byte_fallback = True
    ts.split_digits = True
    ts.allow_whitespace_only_pieces = True
    ts.max_sentencepiece_length = 16
    ts.vocabulary_output_piece_score = True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = 0, 1, 2, -1
    ts.unk_piece, ts.bos_piece, ts.eos_piece = "<unk>", "<s>", "</s>"
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = True
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return proto


def check_sentencepiece(model_file: Path, n: int = 12) -> None:
    """Raise if the model does not reproduce llama.cpp's llama-spm test vectors."""
    sp = SentencePieceProcessor(model_file=str(model_file))
    vectors = [(t, ids) for t, ids in oracle.vocab_vectors("llama-spm") if t.strip()][:n]
    for text, expected in vectors:
        got = sp.encode(text)
        if got != expected:
            raise AssertionError(f"spm mismatch for {text!r}: {got} != {expected}")


def _spm_merges(vocab: GGUFVocab, by_score: bool = False) -> list[list[str]]:
    """BPE merges implied by a SentencePiece BPE vocab, ordered by the merged piece's id, or with `by_score` as
    SentencePiece applies them: the merged piece's score, highest first (then its id). llama-spm's "▁▁…" pieces sit
    at low ids with the lowest scores, so the id order merges runs of spaces before SentencePiece does."""
    ids = {tok: i for i, tok in enumerate(vocab.tokens)}
    merges: list[tuple[Any, ...]] = []
    for i, (piece, kind) in enumerate(zip(vocab.tokens, vocab.token_types)):
        if kind != _GGUF_NORMAL:
            continue
        rank = (-vocab.scores[i], i) if by_score else (i,)
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                merges.append((*rank, ids[left], ids[right], left, right))
    return [[left, right] for *_, left, right in sorted(merges)]


def _llama2_tokenizer_json(vocab: GGUFVocab, specials: list[AddedToken]) -> dict[str, Any]:
    replace_space = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    decoders = [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token_json(t) for t in specials],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, replace_space],
        },
        "pre_tokenizer": None,
        "post_processor": _bos_template("<s>", 1),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(vocab.tokens)},
            "merges": _spm_merges(vocab),
        },
    }


def write_llama2_tokenizer(dir: Path) -> None:
    vocab = read_gguf_vocab("llama-spm")
    model_file = dir / "tokenizer.model"
    model_file.write_bytes(_sp_model_proto(vocab).SerializeToString())
    check_sentencepiece(model_file)
    specials = [AddedToken(i, vocab.tokens[i]) for i in range(3)]
    _write_json(dir / "tokenizer.json", _llama2_tokenizer_json(vocab, specials))
    _write_json(dir / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": _added_tokens_decoder(specials),
        "bos_token": "<s>",
        "chat_template": LLAMA2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": 4096,
        "pad_token": None,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
    })
    _write_json(dir / "special_tokens_map.json", {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    })


# ---------------------------------------------------------------- weights


def _init_model(model: PreTrainedModel, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.ndim == 1:
                param.add_(ONE_D_NOISE * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(INIT_RANGE * torch.randn(param.shape, generator=gen))


def _shard_size(model: PreTrainedModel, shards: int) -> int:
    """Smallest max_shard_size for which save_pretrained's splitter yields exactly `shards` files."""
    state = model.state_dict()
    sizes = [t.numel() * t.element_size() for t in state.values()]
    if shards <= 1:
        return sum(sizes) + 1
    spans = sorted({sum(sizes[i:j]) for i in range(len(sizes)) for j in range(i + 1, len(sizes) + 1)})
    for size in spans:
        split = split_torch_state_dict_into_shards(state, max_shard_size=size)
        if len(split.filename_to_tensors) == shards:
            return size
    raise ValueError(f"cannot split this model into {shards} shards")


def _save_model(model: PreTrainedModel, dir: Path, dtype: torch.dtype, shards: int) -> None:
    model = model.to(dtype)
    model.save_pretrained(dir, max_shard_size=_shard_size(model, shards))
    written = sorted(dir.glob("model*.safetensors"))
    if len(written) != shards:
        raise RuntimeError(f"asked for {shards} shards, save_pretrained wrote {len(written)}")


def _hub_style_config(dir: Path) -> None:
    """Rewrite transformers-5 config.json keys the way released checkpoints spell them."""
    path = dir / "config.json"
    cfg = json.loads(path.read_text())
    rope = dict(cfg.pop("rope_parameters", None) or {})
    if "rope_theta" in rope:
        cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    _write_json(path, dict(sorted(cfg.items())))


def _common_dims(n_layers: int) -> dict[str, Any]:
    return {
        "hidden_size": HIDDEN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": n_layers,
        "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": INIT_RANGE,
    }


def _finish(model: PreTrainedModel, dir: Path, *, dtype: torch.dtype, shards: int, seed: int) -> Path:
    _init_model(model, seed)
    _save_model(model, dir, dtype, shards)
    _hub_style_config(dir)
    return dir


# ---------------------------------------------------------------- builders


def build_llama3(
    dir: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    tie: bool = True,
    rope_llama3: bool = True,
    n_layers: int = 2,
    shards: int = 1,
    seed: int = 0,
) -> Path:
    """Llama-3.2-style checkpoint: real Llama-3 BPE tokenizer, GQA, llama3 rope scaling."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        **_common_dims(n_layers),
        vocab_size=LLAMA3_VOCAB,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=dict(LLAMA3_ROPE_SCALING) if rope_llama3 else None,
        tie_word_embeddings=tie,
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
    )
    write_llama3_tokenizer(dir)
    return _finish(LlamaForCausalLM(config), dir, dtype=dtype, shards=shards, seed=seed)


def build_llama2_spm(
    dir: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    n_layers: int = 2,
    shards: int = 1,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Llama-2-style checkpoint: SentencePiece tokenizer.model, untied lm_head, no rope scaling.

    `overrides` replace config values (e.g. intermediate_size=80 for rows Q8_0 blocks do not divide).
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    values = {**_common_dims(n_layers), "vocab_size": LLAMA2_VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, **overrides}
    write_llama2_tokenizer(dir)
    return _finish(LlamaForCausalLM(LlamaConfig(**values)), dir, dtype=dtype, shards=shards, seed=seed)


def build_mistral(dir: Path, *, dtype: torch.dtype = torch.bfloat16, n_layers: int = 2, seed: int = 0) -> Path:
    """Mistral-7B-v0.1-style checkpoint: the Llama-2 SentencePiece tokenizer, GQA, sliding window."""
    from transformers import MistralConfig, MistralForCausalLM

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    config = MistralConfig(**_common_dims(n_layers), vocab_size=LLAMA2_VOCAB, rms_norm_eps=1e-5, rope_theta=10000.0,
                           sliding_window=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    write_llama2_tokenizer(dir)
    return _finish(MistralForCausalLM(config), dir, dtype=dtype, shards=1, seed=seed)


def build_qwen2(
    dir: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    n_layers: int = 2,
    shards: int = 1,
    seed: int = 0,
) -> Path:
    """Qwen2.5-Instruct-style checkpoint: qkv biases, tied embeddings, padded vocab 151936."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    config = Qwen2Config(
        **_common_dims(n_layers),
        vocab_size=QWEN2_VOCAB,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=151643,
        eos_token_id=151645,
    )
    write_qwen2_tokenizer(dir)
    return _finish(Qwen2ForCausalLM(config), dir, dtype=dtype, shards=shards, seed=seed)


# ---------------------------------------------------------------- Qwen3, Phi-3, Mistral with a sliding window

QWEN3_EXTRA_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
# Rows of 256 and 512 so that the K-quant mixes pick K types (rows of 64 all fall back), with matrices of
# std 0.05 (0.1 at width 64) so that activations stay as large as in the narrow models.
WIDE_HIDDEN = 256
WIDE_INTERMEDIATE = 512
WIDE_MATRIX_SCALE = 0.5


def _finish_wide(model: PreTrainedModel, dir: Path, *, dtype: torch.dtype, seed: int) -> Path:
    _init_model(model, seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.mul_(WIDE_MATRIX_SCALE)
    _save_model(model, dir, dtype, 1)
    _hub_style_config(dir)
    return dir


def write_qwen3_tokenizer(dir: Path) -> None:
    """Qwen3's tokenizer: Qwen2.5's plus <tool_response>, </tool_response>, <think>, </think>, and Qwen3's template."""
    write_qwen2_tokenizer(dir)
    tj = json.loads((dir / "tokenizer.json").read_text(encoding="utf-8"))
    tc = json.loads((dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    first = max(t["id"] for t in tj["added_tokens"]) + 1
    added = [AddedToken(first + k, text, special) for k, (text, special) in enumerate(QWEN3_EXTRA_TOKENS)]
    tj["added_tokens"] += [_added_token_json(t) for t in added]
    tc["added_tokens_decoder"].update(_added_tokens_decoder(added))
    tc["chat_template"] = oracle.template("Qwen-Qwen3-0.6B")
    _write_json(dir / "tokenizer.json", tj)
    _write_json(dir / "tokenizer_config.json", tc)


def build_qwen3(dir: Path, *, dtype: torch.dtype = torch.bfloat16, n_layers: int = 2, seed: int = 0) -> Path:
    """Qwen3-0.6B-style checkpoint: q_norm/k_norm, no biases, head_dim × heads (128) != hidden (64), tied embeddings."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    config = Qwen3Config(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=n_layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=32, vocab_size=QWEN2_VOCAB,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        use_sliding_window=False, max_window_layers=28, attention_bias=False, initializer_range=INIT_RANGE,
        bos_token_id=151643, eos_token_id=151645,
    )
    write_qwen3_tokenizer(dir)
    return _finish(Qwen3ForCausalLM(config), dir, dtype=dtype, shards=1, seed=seed)


# Phi-3's tokenizer_config: these added tokens have rstrip set (llama.cpp sets the same by the model's name).
PHI3_ADDED: tuple[tuple[int, str, bool, bool], ...] = (  # id, content, special, rstrip
    (0, "<unk>", True, False), (1, "<s>", True, False), (2, "</s>", False, True),
    (32000, "<|endoftext|>", True, False), (32001, "<|assistant|>", True, True),
    (32002, "<|placeholder1|>", True, True), (32003, "<|placeholder2|>", True, True),
    (32004, "<|placeholder3|>", True, True), (32005, "<|placeholder4|>", True, True),
    (32006, "<|system|>", True, True), (32007, "<|end|>", True, True),
    (32008, "<|placeholder5|>", True, True), (32009, "<|placeholder6|>", True, True), (32010, "<|user|>", True, True),
)
PHI3_VOCAB = 32064


def _phi3_added_json(tid: int, content: str, special: bool, rstrip: bool) -> dict[str, Any]:
    return {**_added_token_json(AddedToken(tid, content, special)), "rstrip": rstrip}


def write_phi3_tokenizer(dir: Path) -> None:
    """Phi-3-mini's tokenizer: Llama-2's tokenizer.model plus <|endoftext|>, <|user|>, <|end|> … (ids 32000-32010)."""
    vocab = read_gguf_vocab("llama-spm")
    phi3 = read_gguf_fields(oracle.vocab_gguf("phi-3"))
    model_file = dir / "tokenizer.model"
    model_file.write_bytes(_sp_model_proto(vocab).SerializeToString())
    check_sentencepiece(model_file)
    tj = _llama2_tokenizer_json(vocab, [])
    tj["added_tokens"] = [_phi3_added_json(*t) for t in PHI3_ADDED]
    _write_json(dir / "tokenizer.json", tj)
    decoder = {str(t[0]): {k: v for k, v in _phi3_added_json(*t).items() if k != "id"} for t in PHI3_ADDED}
    _write_json(dir / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "chat_template": phi3["tokenizer.chat_template"],
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    })
    _write_json(dir / "special_tokens_map.json", {
        "bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>",
    })


def longrope_factors(n: int) -> dict[str, list[float]]:
    """Long/short factors shaped like Phi-3-mini-128k's (short from 1 to ~3, long from 1 to tens)."""
    return {
        "long_factor": [round(1.0 + 0.9 * k * k / n, 4) for k in range(n)],
        "short_factor": [round(1.0 + 2.0 * k * k / (n * n), 4) for k in range(n)],
    }


def build_phi3(
    dir: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    n_layers: int = 2,
    seed: int = 0,
    longrope: bool = False,
) -> Path:
    """Phi-3-mini-4k-style checkpoint (fused qkv_proj and gate_up_proj, sliding_window 2047 in a 4096 context);
    `longrope`: Phi-3-mini-128k-style rope_scaling (long/short factors, original context 1024 of 4096 here)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    head_dim = WIDE_HIDDEN // HEADS
    rope = {"type": "longrope", **longrope_factors(head_dim // 2)} if longrope else None
    config = Phi3Config(
        hidden_size=WIDE_HIDDEN, intermediate_size=WIDE_INTERMEDIATE, num_hidden_layers=n_layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=PHI3_VOCAB,
        max_position_embeddings=4096, original_max_position_embeddings=1024 if longrope else 4096,
        rope_theta=10000.0, rope_scaling=rope, sliding_window=262144 if longrope else 2047, rms_norm_eps=1e-5,
        tie_word_embeddings=False, initializer_range=INIT_RANGE, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
    )
    write_phi3_tokenizer(dir)
    _finish_wide(Phi3ForCausalLM(config), dir, dtype=dtype, seed=seed)
    if longrope:  # as Phi-3-mini-128k's config.json spells it
        path = dir / "config.json"
        cfg = json.loads(path.read_text())
        cfg["rope_scaling"] = {"type": "longrope", **longrope_factors(head_dim // 2)}
        _write_json(path, cfg)
    return dir


def build_mistral_sliding(dir: Path, *, sliding_window: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Mistral-7B-v0.1-style checkpoint whose sliding window (`sliding_window`) is shorter than its context (2048)."""
    from transformers import MistralConfig, MistralForCausalLM

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    config = MistralConfig(**_common_dims(2), vocab_size=LLAMA2_VOCAB, rms_norm_eps=1e-5, rope_theta=10000.0,
                           sliding_window=sliding_window, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    write_llama2_tokenizer(dir)
    return _finish(MistralForCausalLM(config), dir, dtype=dtype, shards=1, seed=seed)


# ---------------------------------------------------------------- Hume's TADA (issue #6)

TADA_DIMS = {"acoustic_dim": 16, "num_time_classes": 64, "head_layers": 2, "head_ffn_ratio": 3.0}
TADA_EXTRA_CONFIG = {  # TadaConfig's other keys, with HumeAI's defaults
    "shift_acoustic": 5, "context_window": 8, "acoustic_mean": 0.0, "acoustic_std": 1.5, "latent_dropout": 0.0,
    "add_semantic_to_condition": 0.0, "acoustic_from_nth_hidden_state": -1, "dist_type": "fixed",
    "diffusion_head_type": "vibevoice", "tokenizer_name": "meta-llama/Llama-3.2-1B",
}
TADA_CODEC_DIMS = {"embed_dim": 16, "hidden_dim": 32, "num_attn_layers": 2, "num_attn_heads": 4,
                   "attn_dim_feedforward": 64, "wav_decoder_channels": 64, "strides": [2, 3, 2, 2]}


def _random_params(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            param.copy_(INIT_RANGE * torch.randn(param.shape, generator=gen))


def _save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def build_tada(dir: Path, *, dtype: torch.dtype = torch.float32, bottleneck_dim: int | None = None, seed: int = 0) -> Path:
    """A tiny TadaForCausalLM: the Llama-3 backbone of build_llama3 (with Llama 3.2's tokenizer) plus TADA's acoustic
    modules, with the real tensor names and config keys (HumeAI tada/modules/tada.py)."""
    from tests.tada_reference import TadaAcoustic

    dir = build_llama3(dir, dtype=dtype, seed=seed)
    write_llama32_tokenizer(dir)  # TADA's generation pads with <|finetune_right_pad_id|>
    config = json.loads((dir / "config.json").read_text())
    acoustic = TadaAcoustic(HIDDEN, bottleneck_dim=bottleneck_dim, **TADA_DIMS)
    _random_params(acoustic, seed + 1)
    from safetensors.torch import load_file

    state = load_file(str(dir / "model.safetensors"))
    state.update({k: v.to(dtype) for k, v in acoustic.state_dict().items()})
    _save_state(state, dir / "model.safetensors")
    config.update(TADA_DIMS, **TADA_EXTRA_CONFIG, bottleneck_dim=bottleneck_dim, architectures=["TadaForCausalLM"])
    _write_json(dir / "config.json", dict(sorted(config.items())))
    return dir


def tada_acoustic_module(dir: Path) -> "torch.nn.Module":
    """The reference acoustic modules of a build_tada checkpoint, loaded with its tensors (as float32)."""
    from safetensors.torch import load_file

    from tests.tada_reference import TadaAcoustic

    config = json.loads((dir / "config.json").read_text())
    module = TadaAcoustic(config["hidden_size"], config["acoustic_dim"], config["num_time_classes"], config["head_layers"],
                          config["head_ffn_ratio"], config.get("bottleneck_dim"))
    state = {k: v.float() for k, v in load_file(str(dir / "model.safetensors")).items() if k in module.state_dict()}
    module.load_state_dict(state, strict=True)
    return module.eval()


def build_tada_codec_decoder(dir: Path, *, dtype: torch.dtype = torch.float32, max_seq_len: int = 16, seed: int = 0) -> Path:
    """A tiny HumeAI/tada-codec `decoder` folder: weight-norm parametrized convolutions (original0/original1),
    Snake alphas, the rope_freqs and _precomputed_mask buffers, config.json as save_pretrained writes it."""
    from tests.tada_reference import CodecDecoder

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    d = TADA_CODEC_DIMS
    module = CodecDecoder(d["embed_dim"], d["hidden_dim"], d["num_attn_layers"], d["num_attn_heads"],
                          d["attn_dim_feedforward"], d["wav_decoder_channels"], d["strides"], max_seq_len)
    _random_params(module, seed)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in module.state_dict().items()}
    _save_state(state, dir / "model.safetensors")
    _write_json(dir / "config.json", {"architectures": ["Decoder"], "model_type": "", "torch_dtype": str(dtype).split(".")[1],
                                      "transformers_version": "4.57.1", **d, "block_attention": "v2",
                                      "attn_dropout": 0.1, "use_flash_attn": True})
    return dir


# ---------------------------------------------------------------- gemma

GEMMA_HIDDEN = 256
GEMMA_HEAD_DIM = 64
GEMMA_INTERMEDIATE = 512
GEMMA_SLIDING_WINDOW = 16
GEMMA_UNUSED = 99  # <unused0> … <unused98>, as in Gemma 3's tokenizer.model
# Gemma 3's id layout: <pad> <eos> <bos> <unk> <mask> [@BOS@] <unused0..98> <start_of_turn> <end_of_turn>
GEMMA_SPECIALS: tuple[tuple[str, int], ...] = (
    ("<pad>", sp_pb2.ModelProto.SentencePiece.CONTROL),
    ("<eos>", sp_pb2.ModelProto.SentencePiece.CONTROL),
    ("<bos>", sp_pb2.ModelProto.SentencePiece.CONTROL),
    ("<unk>", sp_pb2.ModelProto.SentencePiece.UNKNOWN),
    ("<mask>", sp_pb2.ModelProto.SentencePiece.USER_DEFINED),
    ("[@BOS@]", sp_pb2.ModelProto.SentencePiece.USER_DEFINED),
    *((f"<unused{i}>", sp_pb2.ModelProto.SentencePiece.USER_DEFINED) for i in range(GEMMA_UNUSED)),
    ("<start_of_turn>", sp_pb2.ModelProto.SentencePiece.USER_DEFINED),
    ("<end_of_turn>", sp_pb2.ModelProto.SentencePiece.USER_DEFINED),
    # Gemma's runs of newlines, spaces and tabs, whole pieces of their own
    *(("\n" * n, sp_pb2.ModelProto.SentencePiece.USER_DEFINED) for n in range(1, 32)),
    *(("\t" * n, sp_pb2.ModelProto.SentencePiece.USER_DEFINED) for n in range(1, 32)),
)


def gemma_vocab() -> GGUFVocab:
    """Gemma's special-token layout over llama-spm's byte tokens and scored pieces (a real SentencePiece vocabulary).

    Token types are GGUF's (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte), which equal SentencePiece's.
    """
    spm = read_gguf_vocab("llama-spm")
    body = [i for i, kind in enumerate(spm.token_types) if kind in (1, 6)]  # byte tokens, then the scored pieces
    return GGUFVocab(
        tokens=[text for text, _ in GEMMA_SPECIALS] + [spm.tokens[i] for i in body],
        token_types=[kind for _, kind in GEMMA_SPECIALS] + [spm.token_types[i] for i in body],
        scores=[0.0] * len(GEMMA_SPECIALS) + [spm.scores[i] for i in body],
        merges=[],
    )




def _gemma_sp_model(vocab: GGUFVocab) -> sp_pb2.ModelProto:
    proto = _sp_model_proto(vocab)
    ts = proto.trainer_spec
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = 3, 2, 1, 0
    ts.unk_piece, ts.bos_piece, ts.eos_piece, ts.pad_piece = "<unk>", "<bos>", "<eos>", "<pad>"
    proto.normalizer_spec.add_dummy_prefix = False  # Gemma's tokenizer.model adds no leading "▁"
    ts.split_by_whitespace = False  # runs of spaces merge into "▁▁…" pieces
    return proto


def _gemma_tokenizer_json(vocab: GGUFVocab, added: list[AddedToken]) -> dict[str, Any]:
    tj = _llama2_tokenizer_json(vocab, added)
    tj["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    tj["post_processor"] = _bos_template("<bos>", 2)
    tj["decoder"]["decoders"] = tj["decoder"]["decoders"][:3]  # no Strip: no dummy prefix to take off
    tj["model"]["unk_token"] = "<unk>"
    tj["model"]["merges"] = _spm_merges(vocab, by_score=True)
    return tj


def write_gemma_tokenizer(dir: Path) -> None:
    """tokenizer.model + tokenizer.json + tokenizer_config.json laid out as Gemma 2/3 ship them (GemmaTokenizer)."""
    vocab = gemma_vocab()
    (dir / "tokenizer.model").write_bytes(_gemma_sp_model(vocab).SerializeToString())
    added = [AddedToken(i, text, special=text.startswith(("<", "["))) for i, (text, _) in enumerate(GEMMA_SPECIALS)]
    _write_json(dir / "tokenizer.json", _gemma_tokenizer_json(vocab, added))
    _write_json(dir / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": _added_tokens_decoder(added),
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "bos_token": "<bos>",
        "chat_template": oracle.template("google-gemma-2-2b-it"),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    })
    _write_json(dir / "special_tokens_map.json", {
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
    })


def _gemma_dims(n_layers: int, vocab_size: int) -> dict[str, Any]:
    """Rows of 256/512 so the K-quants apply; head_dim set apart from hidden/heads as Gemma does. llama.cpp
    scales attention by 1/sqrt(head_dim) for these sizes, so query_pre_attn_scalar is head_dim (as in Gemma 2 2B/9B)."""
    return {
        "hidden_size": GEMMA_HIDDEN, "intermediate_size": GEMMA_INTERMEDIATE, "num_hidden_layers": n_layers,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": GEMMA_HEAD_DIM,
        "query_pre_attn_scalar": GEMMA_HEAD_DIM, "vocab_size": vocab_size, "max_position_embeddings": 8192,
        "initializer_range": INIT_RANGE, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": GEMMA_SLIDING_WINDOW, "tie_word_embeddings": True,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
    }


def _edit_config(dir: Path, edit: Any) -> None:
    path = dir / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    _write_json(path, dict(sorted(cfg.items())))


# Softcaps low enough that this tiny model's scores and logits reach tanh's bend (released: 50 and 30).
GEMMA2_ATTN_SOFTCAP = 4.0
GEMMA2_FINAL_SOFTCAP = 3.0


def build_gemma2(dir: Path, *, dtype: torch.dtype = torch.bfloat16, n_layers: int = 2, seed: int = 0) -> Path:
    """Gemma-2-style checkpoint: Gemma's SentencePiece layout, tied embeddings, softcapping, sliding window 16
    on every other layer (layer 0 local, layer 1 global)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    write_gemma_tokenizer(dir)
    config = Gemma2Config(**_gemma_dims(n_layers, len(gemma_vocab().tokens)), rope_theta=10000.0,
                          attn_logit_softcapping=GEMMA2_ATTN_SOFTCAP, final_logit_softcapping=GEMMA2_FINAL_SOFTCAP)
    _finish(Gemma2ForCausalLM(config), dir, dtype=dtype, shards=1, seed=seed)
    _edit_config(dir, lambda cfg: cfg.pop("layer_types", None))  # released Gemma 2 configs predate layer_types
    return dir


GEMMA3_ROPE_SCALING = {"factor": 8.0, "rope_type": "linear"}  # as Gemma 3 4B/12B/27B


def _gemma3_hub_rope(cfg: dict[str, Any]) -> None:
    """transformers 5 writes rope_parameters per layer type; released configs spell them as below."""
    cfg.pop("rope_scaling", None)
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope["full_attention"]["rope_theta"]
    cfg["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    scaling = {k: v for k, v in rope["full_attention"].items() if k != "rope_theta"}
    cfg["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    cfg["sliding_window_pattern"] = 6
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")


def build_gemma3(dir: Path, *, dtype: torch.dtype = torch.bfloat16, n_layers: int = 6, seed: int = 0) -> Path:
    """Gemma-3-text-style checkpoint (Gemma3ForCausalLM): q/k norms, sliding window 16 on layers 0-4 and global
    attention with linear rope scaling on layer 5 (llama.cpp's fixed pattern of 6), local rope base 10000."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    write_gemma_tokenizer(dir)
    config = Gemma3TextConfig(**_gemma_dims(n_layers, len(gemma_vocab().tokens)), rope_theta=1_000_000.0,
                              rope_local_base_freq=10000.0, rope_scaling=dict(GEMMA3_ROPE_SCALING),
                              sliding_window_pattern=6, final_logit_softcapping=None, attn_logit_softcapping=None)
    model = Gemma3ForCausalLM(config)
    _init_model(model, seed)
    _save_model(model, dir, dtype, 1)
    _edit_config(dir, _gemma3_hub_rope)
    return dir


GEMMA3_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "image_size": 64, "patch_size": 8, "vision_use_head": False}
GEMMA3_IMAGE_TOKENS = 16  # 8x8 patches pooled 2x2: llama.cpp's scale factor 2 (4 in the released models)
GEMMA3_PREPROCESSOR = {
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_seq_length": GEMMA3_IMAGE_TOKENS,
    "size": {"height": 64, "width": 64}, "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255,
    "resample": 2, "do_resize": True, "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
}


def build_gemma3_vision(dir: Path, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Gemma-3-with-vision checkpoint (Gemma3ForConditionalGeneration): the 6-layer text model of build_gemma3 and a
    2-layer SigLIP tower on 64 px images in 8 px patches, pooled to 16 tokens, stored as the released checkpoints
    store it (vision_tower.vision_model.*; transformers 5's save_pretrained writes vision_tower.*)."""
    from safetensors.torch import load_file, save_file
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    write_gemma_tokenizer(dir)
    text = Gemma3TextConfig(**_gemma_dims(6, len(gemma_vocab().tokens)), rope_theta=1_000_000.0,
                            rope_local_base_freq=10000.0, rope_scaling=dict(GEMMA3_ROPE_SCALING),
                            sliding_window_pattern=6, final_logit_softcapping=None, attn_logit_softcapping=None)
    config = Gemma3Config(text_config=text, vision_config=SiglipVisionConfig(**GEMMA3_VISION),
                          mm_tokens_per_image=GEMMA3_IMAGE_TOKENS, boi_token_index=3, eoi_token_index=4,
                          image_token_index=5)
    torch.manual_seed(seed)  # SigLIP's biases are drawn at construction; _init_model adds to them
    model = Gemma3ForConditionalGeneration(config)
    _init_model(model, seed)
    _save_model(model, dir, dtype, 1)
    _write_json(dir / "preprocessor_config.json", GEMMA3_PREPROCESSOR)
    stored = load_file(dir / "model.safetensors")
    save_file({_hub_vision_name(k): v for k, v in stored.items()}, dir / "model.safetensors", metadata={"format": "pt"})
    _edit_config(dir, lambda cfg: _gemma3_hub_rope(cfg["text_config"]))
    return dir


def _hub_vision_name(name: str) -> str:
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + name.removeprefix("vision_tower.")
    return name


QWEN2_5_VL_VISION = {"depth": 4, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "patch_size": 14,
                     "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                     "fullatt_block_indexes": [1, 3], "in_channels": 3}
QWEN2_5_VL_MROPE = [2, 3, 3]  # of the 8 rotary pairs of a 16-wide head (released: [16, 24, 24] of 64)
QWEN2_5_VL_PREPROCESSOR = {
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}


def build_qwen2_5_vl(dir: Path, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Qwen2.5-VL checkpoint (Qwen2_5_VLForConditionalGeneration): build_qwen2's 2-layer text model with multimodal
    rope, and a 4-layer ViT (14 px patches, window attention but on layers 1 and 3, 2x2 merger), its config.json
    flat as the released ones are (text keys at the top, rope_scaling of type mrope)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    write_qwen2_tokenizer(dir)
    text = dict(**_common_dims(2), vocab_size=QWEN2_VOCAB, rms_norm_eps=1e-6, rope_theta=1000000.0,
                tie_word_embeddings=True, use_sliding_window=False, bos_token_id=151643, eos_token_id=151645,
                rope_scaling={"type": "mrope", "mrope_section": QWEN2_5_VL_MROPE})
    config = Qwen2_5_VLConfig(text_config=text, vision_config={**QWEN2_5_VL_VISION, "out_hidden_size": HIDDEN},
                              image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                              vision_end_token_id=151653, tie_word_embeddings=True)
    torch.manual_seed(seed)  # as build_gemma3_vision
    model = Qwen2_5_VLForConditionalGeneration(config)
    _init_model(model, seed)
    _save_model(model, dir, dtype, 1)
    _write_json(dir / "preprocessor_config.json", QWEN2_5_VL_PREPROCESSOR)
    _edit_config(dir, _qwen2_5_vl_hub_config)
    return dir


def _qwen2_5_vl_hub_config(cfg: dict[str, Any]) -> None:
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope["rope_theta"]
    text["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    text.pop("model_type", None)
    cfg.update(text)


def build_llamafied_phi3(src: Path, dir: Path) -> Path:
    """The Phi-3 checkpoint in `src` as a LlamaForCausalLM (float32), qkv_proj split into q/k/v_proj and gate_up_proj
    into gate/up_proj, as Unsloth's "Llama-fied" Phi-3 checkpoints are: the same function, unfused layers."""
    from transformers import Phi3ForCausalLM

    dir = Path(dir)
    phi = Phi3ForCausalLM.from_pretrained(src, dtype=torch.float32)
    c = phi.config
    head_dim = c.hidden_size // c.num_attention_heads
    config = LlamaConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads, vocab_size=c.vocab_size,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_parameters["rope_theta"], tie_word_embeddings=False, hidden_act=c.hidden_act,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
    )
    sizes = [c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim, c.num_key_value_heads * head_dim]
    state: dict[str, torch.Tensor] = {}
    for name, tensor in phi.state_dict().items():
        if "qkv_proj" in name:
            for part, rows in zip(("q_proj", "k_proj", "v_proj"), tensor.split(sizes)):
                state[name.replace("qkv_proj", part)] = rows
        elif "gate_up_proj" in name:
            for part, rows in zip(("gate_proj", "up_proj"), tensor.chunk(2)):
                state[name.replace("gate_up_proj", part)] = rows
        else:
            state[name] = tensor
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(dir)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(src) / name, dir / name)
    return dir


def build_smollm3(dir: Path, *, dtype: torch.dtype = torch.bfloat16, n_layers: int = 4, seed: int = 0,
                  **overrides: Any) -> Path:
    """SmolLM3-3B-style checkpoint: the Llama-3 tokenizer, tied embeddings, layer 3 (of each 4) without rope."""
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    config = SmolLM3Config(**{**_common_dims(n_layers), "vocab_size": LLAMA3_VOCAB, "rms_norm_eps": 1e-6,
                              "rope_theta": 2_000_000.0, "tie_word_embeddings": True, "bos_token_id": 128000,
                              "eos_token_id": 128001, "pad_token_id": 128004, **overrides})
    write_llama3_tokenizer(dir)
    return _finish(SmolLM3ForCausalLM(config), dir, dtype=dtype, shards=1, seed=seed)


def build_olmo2(dir: Path, *, dtype: torch.dtype = torch.bfloat16, n_layers: int = 2, seed: int = 0) -> Path:
    """OLMo-2-style checkpoint: post-norms, whole-Q/K norms, untied head (the Llama-3 tokenizer stands in for
    OLMo's own)."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    config = Olmo2Config(**_common_dims(n_layers), vocab_size=LLAMA3_VOCAB, rms_norm_eps=1e-6, rope_theta=500000.0,
                         tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001, pad_token_id=128004)
    write_llama3_tokenizer(dir)
    return _finish(Olmo2ForCausalLM(config), dir, dtype=dtype, shards=1, seed=seed)


GRANITE_MULTIPLIERS = {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0078125,
                       "logits_scaling": 8.0}  # granite-3.x's


def build_granite(dir: Path, *, dtype: torch.dtype = torch.bfloat16, n_layers: int = 2, seed: int = 0,
                  **overrides: Any) -> Path:
    """Granite-3-style checkpoint: its four multipliers, its StarCoder-style tokenizer (49152 tokens), untied head."""
    from transformers import GraniteConfig, GraniteForCausalLM

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    config = GraniteConfig(**{**_common_dims(n_layers), **GRANITE_MULTIPLIERS, "vocab_size": REFACT_VOCAB,
                              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
                              "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, **overrides})
    write_refact_tokenizer(dir)
    return _finish(GraniteForCausalLM(config), dir, dtype=dtype, shards=1, seed=seed)


def build_qwen3_moe(dir: Path, *, dtype: torch.dtype = torch.bfloat16, n_layers: int = 2, seed: int = 0,
                    **overrides: Any) -> Path:
    """Qwen3-30B-A3B-style checkpoint: Qwen3's attention, 4 experts per layer (2 chosen, renormalised), stored one
    by one as released checkpoints store them."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    config = Qwen3MoeConfig(**{
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "moe_intermediate_size": 32, "num_experts": 4,
        "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "num_hidden_layers": n_layers, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": 16,
        "vocab_size": QWEN2_VOCAB, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "initializer_range": INIT_RANGE, "bos_token_id": 151643,
        "eos_token_id": 151645, **overrides})
    write_qwen3_tokenizer(dir)
    return _finish(Qwen3MoeForCausalLM(config), dir, dtype=dtype, shards=1, seed=seed)


def build_mixtral(dir: Path, *, dtype: torch.dtype = torch.bfloat16, n_layers: int = 2, seed: int = 0) -> Path:
    """Mixtral-8x7B-style checkpoint: the Llama-2 tokenizer, 8 experts per layer (2 chosen), stored one by one;
    rows of 256, so llama-quantize's K types (and its rules for 8 experts) apply to every matrix."""
    from transformers import MixtralConfig, MixtralForCausalLM

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    dims = {**_common_dims(n_layers), "hidden_size": 256, "intermediate_size": 256}
    config = MixtralConfig(**dims, vocab_size=LLAMA2_VOCAB, num_local_experts=8, num_experts_per_tok=2,
                           rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False,
                           bos_token_id=1, eos_token_id=2)
    write_llama2_tokenizer(dir)
    return _finish(MixtralForCausalLM(config), dir, dtype=dtype, shards=1, seed=seed)


def build_gpt_oss(dir: Path, *, dtype: torch.dtype = torch.bfloat16, n_layers: int = 2, seed: int = 0,
                  **overrides: Any) -> Path:
    """gpt-oss-20b-style checkpoint with float experts (as transformers saves it): attention sinks and biases, a
    16-token window on every other layer, 4 experts (2 chosen) with gate and up interleaved, yarn rope; the
    Llama-3 tokenizer stands in for o200k."""
    from transformers import GptOssConfig, GptOssForCausalLM

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    config = GptOssConfig(**{
        "hidden_size": HIDDEN, "intermediate_size": HIDDEN, "num_hidden_layers": n_layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
        "sliding_window": 16, "vocab_size": LLAMA3_VOCAB, "initializer_range": INIT_RANGE, "tie_word_embeddings": False,
        "bos_token_id": 128000, "eos_token_id": 128001, "pad_token_id": 128004, **overrides})
    write_llama3_tokenizer(dir)
    torch.manual_seed(seed)  # the sinks and router biases are drawn at construction; _init_model adds to them
    return _finish(GptOssForCausalLM(config), dir, dtype=dtype, shards=1, seed=seed)


def checkpoint_nibble_order(ggml_qs: np.ndarray) -> np.ndarray:
    """ggml's 16 MXFP4 bytes (byte i: value i low, value i+16 high) in a released checkpoint's order (byte i: value
    2i low, value 2i+1 high)."""
    values = np.concatenate([ggml_qs & 0x0F, ggml_qs >> 4], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _mxfp4_pair(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float rows [E, out, in] -> (blocks [E, out, in/32, 16], scales [E, out, in/32]) as gpt-oss ships them."""
    import gguf.quants

    n_expert, n_out, n_in = rows.shape
    packed = gguf.quants.MXFP4.quantize_blocks(rows.float().numpy().reshape(-1, 32))  # [blocks, 1 + 16]
    scales = packed[:, 0].reshape(n_expert, n_out, n_in // 32)
    blocks = checkpoint_nibble_order(packed[:, 1:]).reshape(n_expert, n_out, n_in // 32, 16)
    return torch.from_numpy(np.ascontiguousarray(blocks)), torch.from_numpy(np.ascontiguousarray(scales))


def build_gpt_oss_mxfp4(dir: Path, float_dir: Path) -> Path:
    """`float_dir` (build_gpt_oss) with its experts in MXFP4 as released gpt-oss checkpoints hold them (`*_blocks`,
    `*_scales`, quantization_config mxfp4); the biases and everything else as they were."""
    from safetensors.torch import load_file, save_file

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    state = load_file(Path(float_dir) / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            out[f"{name}_blocks"], out[f"{name}_scales"] = _mxfp4_pair(tensor.transpose(-1, -2))
        else:
            out[name] = tensor
    save_file(out, dir / "model.safetensors", metadata={"format": "pt"})
    for file in Path(float_dir).iterdir():
        if file.name not in ("model.safetensors", "config.json"):
            shutil.copy(file, dir / file.name)
    config = json.loads((Path(float_dir) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    _write_json(dir / "config.json", config)
    return dir
