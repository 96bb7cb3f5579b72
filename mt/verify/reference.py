"""The checked GGUF (header read once) and the source folder (config + its Hugging Face tokenizer)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from mt.errors import CheckpointError, GGUFError, TokenizerError
from mt.io.gguf_in import GGUFHeader, read_header

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class GGUFModel:
    path: Path
    header: GGUFHeader

    @property
    def arch(self) -> str:
        return str(self.header.value("general.architecture", ""))

    @cached_property
    def tokens(self) -> list[str]:
        return list(self.header.value("tokenizer.ggml.tokens", []))


def open_gguf(path: Path) -> GGUFModel:
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path} does not exist", "pass the GGUF file to verify")
    return GGUFModel(path, read_header(path))


@dataclass
class Reference:
    """The source checkpoint: config.json and its tokenizer (transformers), loaded lazily."""

    folder: Path
    config: dict[str, Any]

    @property
    def hf_architecture(self) -> str:
        return (self.config.get("architectures") or [""])[0]

    @cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.folder, trust_remote_code=False)
        except Exception as e:  # transformers raises many types for a broken tokenizer
            raise TokenizerError(f"transformers cannot load the tokenizer in {self.folder} ({type(e).__name__}: {e})",
                                 "check tokenizer.json / tokenizer_config.json") from None

    @property
    def is_sentencepiece(self) -> bool:
        return (self.folder / "tokenizer.model").is_file()

    def special_token_texts(self) -> dict[str, int]:
        """Every added special token (text -> id): the strings a tokenizer must keep whole."""
        return {t.content: i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}

    def chat_template(self) -> str | None:
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        return template if isinstance(template, str) else None


def open_reference(folder: Path) -> Reference:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # config notices would interleave with the report
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"reference {folder} is not a folder", "pass the Hugging Face folder the GGUF was made from")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"no config.json in {folder}", "pass the Hugging Face folder the GGUF was made from")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise TokenizerError(f"no tokenizer.json or tokenizer.model in {folder}",
                             "copy the source's tokenizer files into the folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e})", "fix or replace the file") from None
    return Reference(folder, config)


def split_on_specials(text: str, specials: dict[str, int]) -> list[str | int]:
    """Text pieces and special-token ids, longest special first (as tokenizers match added tokens)."""
    if not specials:
        return [text]
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    return [specials[p] if p in specials else p for p in re.split(pattern, text) if p]
