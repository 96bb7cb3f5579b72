"""Chat template: the template embedded in the GGUF against the source's, rendered on a few conversations."""

from __future__ import annotations

import ctypes
from typing import Any

from mt.io.chat_template import TemplateRunaway, render_bounded
from mt.io.gguf_in import GGUFHeader
from mt.verify.reference import Reference
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
TEMPLATE_KEY = "tokenizer.chat_template"
FIXED_DATE = "26 Jul 2024"  # templates that print today's date (Llama 3.x) render the same on both sides
ERROR, TOO_LONG = "<template error: ", "<template did not end: "


def _render(ref: Reference, template: str, messages: list[Message], add_generation_prompt: bool,
            **special_tokens: str | None) -> str:
    """transformers' jinja renderer (its sandbox), bounded in time and size; an exception the template raises is
    part of what it renders."""
    try:
        return render_bounded(ref.tokenizer, messages, chat_template=template, add_generation_prompt=add_generation_prompt,
                              date_string=FIXED_DATE, **special_tokens)
    except TemplateRunaway as e:
        return f"{TOO_LONG}{e}>"
    except Exception as e:  # jinja's raise_exception, undefined names ...
        return f"{ERROR}{type(e).__name__}: {e}>"


def _cases() -> list[tuple[str, list[Message], bool]]:
    return [(f"{name}{' +generation prompt' if gen else ''}", msgs, gen)
            for name, msgs in CONVERSATIONS.items() for gen in (False, True)]


def _templates(header: GGUFHeader) -> dict[str, str]:
    """The default template and the named ones (tokenizer.chat_template.NAME)."""
    return {k: v for k, (_, v) in header.kv.items() if k == TEMPLATE_KEY or k.startswith(TEMPLATE_KEY + ".")}


def check_chat_template(checked: GGUFHeader, reference: GGUFHeader, ref: Reference) -> Check:
    """Every template mt writes for the source must be in the file; a text that differs must render every case
    the same (with the file's own BOS/EOS strings)."""
    expected, embedded = _templates(reference), _templates(checked)
    if not expected:
        status = Status.SKIP if not embedded else Status.WARN
        return Check("chat template", status, "the source has no chat template" + ("" if not embedded else "; the file has one"))
    problems = [f"{key} is missing" for key in expected if key not in embedded]
    problems += [f"{key} is not in mt's conversion of the source" for key in embedded if key not in expected]
    tokens = {"bos_token": _special_text(checked, "bos"), "eos_token": _special_text(checked, "eos")}
    renders: dict[str, dict[str, str]] = {}
    both_fail = 0
    for key in (k for k in expected if k in embedded and embedded[k] != expected[k]):
        for name, messages, gen in _cases():
            want, got = _render(ref, expected[key], messages, gen), _render(ref, embedded[key], messages, gen, **tokens)
            renders[f"{key}: {name}"] = {"gguf": got, "source": want}
            if got.startswith(TOO_LONG) or want.startswith(TOO_LONG):
                side, text = ("the file's", got) if got.startswith(TOO_LONG) else ("the source's", want)
                problems.append(f"{key} ({name}): rendering {side} template did not end ({text[len(TOO_LONG):-1]})")
            elif got != want:
                problems.append(f"{key} ({name}): the file renders {_excerpt(got, want)!r}, the source {_excerpt(want, got)!r}")
            elif got.startswith(ERROR):
                both_fail += 1
    same_text = all(embedded.get(k) == v for k, v in expected.items())
    data = {"same_text": same_text, "renders": renders}
    if problems:
        summary = problems[0] if problems[0].endswith(("missing", "source")) or "did not end" in problems[0] \
            else f"{len(problems)} rendering(s) differ"
        return Check("chat template", Status.FAIL, summary, problems, data)
    if same_text:
        return Check("chat template", Status.PASS, f"{len(expected)} template(s) identical", [], data)
    if both_fail == len(renders):
        return Check("chat template", Status.WARN, f"{len(expected)} template(s): the text differs and every rendering "
                     "fails on both sides; nothing shows they agree", [], data)
    failing = f" ({both_fail} fail the same way on both sides)" if both_fail else ""
    return Check("chat template", Status.PASS, f"{len(expected)} template(s): the text differs, all {len(renders)} "
                 f"renderings are the same{failing}", [], data)


def _special_text(header: GGUFHeader, kind: str) -> str | None:
    tokens = header.value("tokenizer.ggml.tokens") or []
    token_id = header.value(f"tokenizer.ggml.{kind}_token_id")
    return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None


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


def check_llama_cpp_chat(checked: GGUFHeader, ref: Reference) -> Check:
    """What llama.cpp's non-jinja formatter makes of the embedded template, compared with the source's rendering.

    It recognises a template's family and formats in C++; it does not run the jinja, so it legitimately
    drops e.g. Llama 3.x's date header or a leading BOS (llama.cpp adds BOS at tokenization). A difference
    is therefore a warning for users of that formatter (llama-server without --jinja), not a failure.
    """
    embedded, source = checked.value(TEMPLATE_KEY), ref.chat_template()
    if embedded is None or source is None:
        return Check("llama.cpp chat", Status.SKIP, "no chat template to compare")
    bos = _special_text(checked, "bos") or ""
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
