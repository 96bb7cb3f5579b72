"""Chat template: the template embedded in the GGUF against the source's, rendered on a few conversations."""

from __future__ import annotations

import ctypes
from typing import Any

from mt.verify.reference import GGUFModel, Reference
from mt.verify.report import Check, Status

Message = dict[str, str]

CONVERSATIONS: dict[str, list[Message]] = {
    "user": [{"role": "user", "content": "Hello! Wie geht's?"}],
    "system+user": [{"role": "system", "content": "You are a terse assistant."},
                    {"role": "user", "content": "Quelle heure est-il ? 🦙"}],
    "multi-turn": [{"role": "system", "content": "Answer in Japanese."},
                   {"role": "user", "content": "What is 2+2?"},
                   {"role": "assistant", "content": "4です。"},
                   {"role": "user", "content": "¿Y 3+3?"}],
}
FIXED_DATE = "26 Jul 2024"  # templates that print today's date (Llama 3.x) render the same on both sides


def _render(ref: Reference, template: str, messages: list[Message], add_generation_prompt: bool,
            **special_tokens: str | None) -> str:
    """transformers' jinja renderer; an exception the template raises is part of what it renders."""
    try:
        return ref.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt,
                                                 date_string=FIXED_DATE, **special_tokens)
    except Exception as e:  # jinja's raise_exception, undefined names ...
        return f"<template error: {type(e).__name__}: {e}>"


def _cases() -> list[tuple[str, list[Message], bool]]:
    return [(f"{name}{' +generation prompt' if gen else ''}", msgs, gen)
            for name, msgs in CONVERSATIONS.items() for gen in (False, True)]


def check_chat_template(gguf: GGUFModel, ref: Reference) -> Check:
    """The GGUF's template, with the GGUF's own BOS/EOS strings, must render every case as the source does."""
    source = ref.chat_template()
    embedded = gguf.header.value("tokenizer.chat_template")
    if source is None:
        status = Status.SKIP if embedded is None else Status.WARN
        return Check("chat template", status, "the source has no chat template" +
                     ("" if embedded is None else "; the GGUF has one"))
    if embedded is None:
        return Check("chat template", Status.FAIL, "the GGUF has no chat template (tokenizer.chat_template); the source has one",
                     ["tokenizer.chat_template is missing"])
    tokens = {"bos_token": gguf.token_text(gguf.special_id("bos")), "eos_token": gguf.token_text(gguf.special_id("eos"))}
    problems, renders = [], {}
    for name, messages, gen in _cases():
        want = _render(ref, source, messages, gen)
        got = _render(ref, embedded, messages, gen, **tokens)
        renders[name] = {"gguf": got, "source": want}
        if got != want:
            problems.append(f"{name}: GGUF renders {_excerpt(got, want)!r}, source {_excerpt(want, got)!r}")
    same_text = embedded == source
    summary = (f"{len(renders)} renderings identical" + ("" if same_text else " (template text differs, renders the same)")
               if not problems else f"{len(problems)} of {len(renders)} renderings differ")
    return Check("chat template", Status.FAIL if problems else Status.PASS, summary, problems,
                 {"same_text": same_text, "renders": renders})


def _excerpt(text: str, other: str, width: int = 40) -> str:
    """`text` around its first difference from `other`."""
    i = next((k for k, (a, b) in enumerate(zip(text, other)) if a != b), min(len(text), len(other)))
    return ("…" if i > width else "") + text[max(0, i - width):i + width] + ("…" if i + width < len(text) else "")


def llama_cpp_apply_template(template: str, messages: list[Message], add_generation_prompt: bool) -> str | None:
    """llama.cpp's built-in formatter (llama_chat_apply_template: the template's family by heuristics, no jinja)."""
    import llama_cpp

    chat = (llama_cpp.llama_chat_message * len(messages))()
    keep: list[bytes] = []
    for slot, message in zip(chat, messages):
        keep += [message["role"].encode(), message["content"].encode()]
        slot.role, slot.content = keep[-2], keep[-1]
    tmpl = template.encode()
    n = llama_cpp.llama_chat_apply_template(tmpl, chat, len(messages), add_generation_prompt, None, 0)
    if n < 0:
        return None
    buf = ctypes.create_string_buffer(n + 1)
    n = llama_cpp.llama_chat_apply_template(tmpl, chat, len(messages), add_generation_prompt, buf, n + 1)
    return buf.raw[:n].decode("utf-8", errors="replace")


def check_llama_cpp_chat(gguf: GGUFModel, ref: Reference) -> Check:
    """What llama.cpp's non-jinja formatter makes of the embedded template, compared with the source's rendering.

    It recognises a template's family and formats in C++; it does not run the jinja, so it legitimately
    drops e.g. Llama 3.x's date header or a leading BOS (llama.cpp adds BOS at tokenization). A difference
    is therefore a warning for users of that formatter (llama-server without --jinja), not a failure.
    """
    embedded, source = gguf.header.value("tokenizer.chat_template"), ref.chat_template()
    if embedded is None or source is None:
        return Check("llama.cpp chat", Status.SKIP, "no chat template to compare")
    bos = gguf.token_text(gguf.special_id("bos")) or ""
    differ: list[str] = []
    data: dict[str, Any] = {}
    for name, messages, gen in _cases():
        got = llama_cpp_apply_template(embedded, messages, gen)
        if got is None:
            return Check("llama.cpp chat", Status.WARN, "llama.cpp's built-in formatter does not recognise the template "
                         "(llama-server needs --jinja)", ["llama_chat_apply_template returned an error"])
        want = _render(ref, source, messages, gen)
        data[name] = {"llama_cpp": got, "source": want}
        if bos and want.startswith(bos) and not got.startswith(bos):
            want = want[len(bos):]  # llama.cpp adds BOS when it tokenizes the rendered prompt
        if got != want:
            differ.append(f"{name}: llama.cpp {_excerpt(got, want)!r}, source {_excerpt(want, got)!r}")
    if not differ:
        return Check("llama.cpp chat", Status.PASS, f"built-in formatter renders all {len(data)} cases like the source", [], data)
    return Check("llama.cpp chat", Status.WARN, f"built-in formatter (no jinja) differs in {len(differ)} of {len(data)} "
                 "cases; use the jinja template (llama-server --jinja)", differ, data)
