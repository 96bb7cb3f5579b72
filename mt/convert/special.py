"""Special tokens, add_bos/add_eos flags, merges and chat templates, decided as llama.cpp's converter does.

Sources, in llama.cpp's order of precedence: tokenizer.json (merges, normalizer, post-processor),
tokenizer_config.json (token strings, add_* flags, chat template), chat_template.jinja /
additional_chat_templates/*.jinja / chat_template.json, then config.json's *_token_id.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any


from mt.io.checkpoint import SideFile, SideFiles
from mt.io.gguf_out import GGUFContents
from mt.errors import TokenizerError

log = logging.getLogger(__name__)
DEFAULT_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


@dataclass
class SpecialVocab:
    merges: list[str] = field(default_factory=list)
    token_ids: dict[str, int] = field(default_factory=dict)
    add_token: dict[str, bool] = field(default_factory=dict)
    chat_template: str | list[dict[str, str]] | None = None
    lowercase: bool | None = None
    strip_accents: bool | None = None

    def write(self, w: GGUFContents) -> None:
        if self.merges:
            w.add_token_merges(self.merges)
        for typ, tid in self.token_ids.items():
            getattr(w, f"add_{typ}_token_id")(tid)
        for typ, value in self.add_token.items():
            if (add := getattr(w, f"add_add_{typ}_token", None)) is not None:
                add(value)
        if self.chat_template is not None:
            w.add_chat_template(self.chat_template)
        if self.lowercase is not None:
            w.add_bool("tokenizer.ggml.normalizer.lowercase", self.lowercase)
        if self.strip_accents is not None:
            w.add_bool("tokenizer.ggml.normalizer.strip_accents", self.strip_accents)


def _read_json(path: SideFile) -> Any:
    return json.loads(path.read_bytes())


@lru_cache(maxsize=4)
def _read_json_cached(key: tuple[Any, ...], path: SideFile) -> Any:
    try:
        return _read_json(path)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e})", "replace it with the model's own") from None


def read_tokenizer_json(path: SideFile) -> dict[str, Any]:
    """tokenizer.json parsed once per conversion (it is read by several steps and can be 10+ MB)."""
    return _read_json_cached(path.cache_key, path)


read_tokenizer_json.cache_clear = _read_json_cached.cache_clear  # type: ignore[attr-defined]


def encode_merges(merges: list[Any]) -> list[str]:
    if not merges or isinstance(merges[0], str):
        return list(merges)
    # pair form (transformers >= 4.45): spaces inside a part are written as U+0120 like byte-level BPE
    return [f"{a.replace(' ', chr(0x120))} {b.replace(' ', chr(0x120))}" for a, b in merges]


class _Loader:
    def __init__(self, files: SideFiles, load_merges: bool, n_vocab: int | None) -> None:
        self.files = files
        self.load_merges = load_merges
        self.n_vocab = n_vocab
        self.types: tuple[str, ...] = DEFAULT_TYPES
        self.sv = SpecialVocab()

    def set_token(self, typ: str, tid: Any) -> None:
        if not isinstance(tid, int) or isinstance(tid, bool):
            return
        if tid < 0:
            raise TokenizerError(f"the {typ} token id is {tid}, a negative id", "fix it in config.json or tokenizer_config.json")
        if (self.n_vocab is None or tid < self.n_vocab) and typ not in self.sv.token_ids:
            self.sv.token_ids[typ] = tid

    def parse_normalizer(self, normalizer: dict[str, Any]) -> None:
        kind = normalizer.get("type")
        if kind == "Lowercase":
            self.sv.lowercase = True
        elif kind == "StripAccents":
            self.sv.strip_accents = True
        elif kind == "BertNormalizer":
            if "lowercase" in normalizer:
                self.sv.lowercase = normalizer["lowercase"]
            if "strip_accents" in normalizer:
                self.sv.strip_accents = normalizer["strip_accents"]
        elif kind == "Sequence":
            for inner in normalizer.get("normalizers", []):
                self.parse_normalizer(inner)

    def load(self) -> SpecialVocab:
        tokenizer_json = self.files / "tokenizer.json"
        tokenizer = read_tokenizer_json(tokenizer_json) if tokenizer_json.is_file() else None
        config_path = self.files / "tokenizer_config.json"
        tconfig = _read_json(config_path) if config_path.is_file() else None
        added_tokens: list[dict[str, Any]] = []
        if tokenizer:
            if self.load_merges:
                self.sv.merges = encode_merges(tokenizer.get("model", {}).get("merges") or [])
            if normalizer := tokenizer.get("normalizer"):
                self.parse_normalizer(normalizer)
            added_tokens = tokenizer.get("added_tokens", [])
            self.post_processor(tokenizer, tconfig)
        if tconfig:
            self.tokenizer_config(tconfig, added_tokens)
        self.config_json()
        if self.load_merges and not self.sv.merges:
            self.merges_txt()
        return self.sv

    def post_processor(self, tokenizer: dict[str, Any], tc: dict[str, Any] | None) -> None:
        special = {k: (tc or {}).get(f"{k}_token") for k in ("bos", "cls", "eos", "sep")}
        if not special["bos"] and special["cls"] and tc:
            tc["bos_token"] = special["bos"] = special["cls"]
        if not special["eos"] and special["sep"] and tc:
            tc["eos_token"] = special["eos"] = special["sep"]
        post = tokenizer.get("post_processor")
        if not post:
            return
        for proc in post.get("processors", [post]):
            kind = proc.get("type")
            if kind == "ByteLevel":
                self.sv.add_token.setdefault("bos", False)
                self.sv.add_token.setdefault("eos", False)
            elif kind == "RobertaProcessing":
                self.sv.add_token.update(bos=True, eos=True, sep=True)
                if not special["cls"] and tc:
                    special["cls"] = tc["cls_token"] = proc.get("cls", [special["bos"]])[0]
                if not special["sep"] and tc:
                    special["sep"] = tc["sep_token"] = proc.get("sep", [special["eos"]])[0]
            elif kind == "TemplateProcessing":
                self.template_processing(proc, tc, special)

    def template_processing(self, proc: dict[str, Any], tc: dict[str, Any] | None, special: dict[str, Any]) -> None:
        single, pair = proc.get("single", []), proc.get("pair", [])
        first = last = None
        if len(single) > 1:
            if first := single[0].get("SpecialToken", {}).get("id"):
                if not tc:
                    special["bos"] = first
                elif first not in (special["bos"], special["cls"]):
                    if not special["bos"]:
                        tc["bos_token"] = special["bos"] = first
                    if not special["cls"]:
                        tc["cls_token"] = special["cls"] = first
                self.sv.add_token["bos"] = first in (special["bos"], special["cls"])
            if last := single[-1].get("SpecialToken", {}).get("id"):
                if not tc:
                    special["eos"] = last
                elif last != special["eos"]:
                    if "eot" not in self.types:
                        self.types += ("eot",)
                        tc["eot_token"] = special["eos"]
                    elif "eom" not in self.types:
                        self.types += ("eom",)
                        tc["eom_token"] = special["eos"]
                    tc["eos_token"] = special["eos"] = last
                self.sv.add_token["eos"] = last == special["eos"]
        if not pair:
            return
        start = 1 if first and pair[0].get("SpecialToken", {}).get("id") == first else 0
        stop = -1 if last and pair[-1].get("SpecialToken", {}).get("id") == last else None
        pair = pair[slice(start, stop)]
        if not pair:
            return
        seq_a, seq_b = pair[0].get("Sequence", {}).get("id"), pair[-1].get("Sequence", {}).get("id")
        middle = pair[1:-1]
        if seq_a != "A" or seq_b != "B" or not middle:
            return
        add_sep = False
        separators = (special["sep"], special["eos"])
        if (entry := middle[0].get("SpecialToken", {}).get("id")) and entry in separators and not last:
            add_sep = True
        if len(middle) == 2 and (entry := middle[1].get("SpecialToken", {}).get("id")) and entry in separators:
            add_sep = True
        self.sv.add_token["sep"] = add_sep
        if add_sep and not special["sep"] and tc:
            tc["sep_token"] = special["eos"]

    def tokenizer_config(self, tc: dict[str, Any], added_tokens: list[dict[str, Any]]) -> None:
        self.sv.chat_template = self.chat_template(tc)
        for typ in self.types:
            add_entry = tc.get(f"add_{typ}_token")
            if isinstance(add_entry, bool) and typ not in self.sv.add_token:
                self.sv.add_token[typ] = add_entry
            entry = tc.get(f"{typ}_token")
            content = entry.get("content") if isinstance(entry, dict) else entry
            if not isinstance(content, str):
                continue
            tid = next((t.get("id") for t in added_tokens if t.get("content") == content), None)
            self.set_token(typ, tid)

    def chat_template(self, tc: dict[str, Any]) -> str | list[dict[str, str]] | None:
        alt: Any = None
        jinja, as_json = self.files / "chat_template.jinja", self.files / "chat_template.json"
        if jinja.is_file():
            alt = jinja.read_text(encoding="utf-8")
            if extra := self.files.templates():
                alt = [{"name": "default", "template": alt}]
                alt += [{"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
        elif as_json.is_file():
            alt = _read_json(as_json).get("chat_template")
        template = tc.get("chat_template", alt)
        if template is None or isinstance(template, (str, list)):
            return template
        log.warning("chat_template in tokenizer_config.json is neither a string nor a list: ignored")
        return None

    def config_json(self) -> None:
        path = self.files / "config.json"
        if not path.is_file():
            return
        config = _read_json(path)
        for typ in self.types:
            tid = config.get(f"{typ}_token_id")
            if tid is None and "text_config" in config:
                tid = config["text_config"].get(f"{typ}_token_id")
            self.set_token(typ, tid)

    def merges_txt(self) -> None:
        path = self.files / "merges.txt"
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        if lines and lines[0].strip().startswith("#"):
            lines = lines[1:]
        for line in lines:
            parts = line.strip().split(None, 3)
            if len(parts) == 2:
                self.sv.merges.append(f"{parts[0]} {parts[1]}")


def load_special_vocab(files: SideFiles, load_merges: bool = False, n_vocab: int | None = None) -> SpecialVocab:
    return _Loader(files, load_merges, n_vocab).load()
