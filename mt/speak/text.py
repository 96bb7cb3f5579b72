"""The text normalisation HumeAI's `generate` applies before tokenizing (tada/utils/text.py's rules): typographic
punctuation to ASCII, a few marks TADA reads badly rewritten, lower case except where a sentence starts."""

from __future__ import annotations

import re

ASCII = {
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"',
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
    "\u2013": "-", "\u2014": "-", "\u2015": "-", "\u2010": "-", "\u2011": "-",
    "\u2026": "...",
    "\u2039": "<", "\u203a": ">", "\u00ab": "<<", "\u00bb": ">>",
}
REWRITES = (("; ", ". "), ('"', ""), (":", ","), ("(", ""), (")", ""), ("--", "-"), ("-", ", "), (",,", ","),
            (" '", " "), ("' ", " "), ("  ", " "))
_ASCII_PATTERN = re.compile("|".join(re.escape(c) for c in ASCII))


def normalize_text(text: str) -> str:
    text = _ASCII_PATTERN.sub(lambda m: ASCII[m.group(0)], text)
    for old, new in REWRITES:  # in order, each once over the whole text
        text = text.replace(old, new)
    text = re.sub(r"\s+([.,?!])", r"\1", text)
    text = re.sub(r"([.!?]\s*)(\w)", lambda m: m.group(1) + m.group(2).upper(), text.lower())
    return text[:1].upper() + text[1:]
