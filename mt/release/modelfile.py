"""Ollama Modelfiles: the GGUF's jinja chat template turned into a Go `text/template` that renders the same text.

The template's structure is read from its renderings of probe conversations whose contents are unique markers, not
from a table of model names. A conversation renders, after the BOS that llama.cpp adds itself, as

    head(system) + user₁ + after_user + assistant₁ + after_assistant + user₂ + … + user_last + generation

where head(system) is the text before the system prompt, the prompt, and the text up to the first user message (or,
without a system message, a head of its own, which may hold a default system prompt). That shape is written as a
Go template over Ollama's variables (.System, .Messages with .Role and .Content); it is kept only if rendering the
shape reproduces the jinja template on every probe conversation. Otherwise no TEMPLATE is written (Ollama's own
detection applies) and the reason is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mt.io.chat_template import TemplateRunaway, render_template
from mt.io.gguf_in import GGUFHeader, read_header
from mt.release.tool_shape import (
    MARK, NoToolShape, ToolShape, call_message, go_literal, probe_tool_shape, same_up_to_json, split_at,
)

FIXED_DATE = "26 Jul 2024"  # templates that print today's date render it as this (the Modelfile cannot ask Ollama)
CONTROL = 3  # llama.cpp's token type of control tokens
# conversations whose rendering the shape must reproduce: (messages, add_generation_prompt)
PROOF_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
    [{"role": "system", "content": "Answer in French.\nBe brief."}, {"role": "user", "content": "Good morning"},
     {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "How are you?"},
     {"role": "assistant", "content": "Très bien."}, {"role": "user", "content": "Thanks 🦙"}],
]


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "The city's name"},
        "unit": {"type": "string", "description": "The temperature's unit", "enum": ["celsius", "fahrenheit"]}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone.",
    "parameters": {"type": "object", "required": ["zone"], "properties": {
        "zone": {"type": "string", "description": "An IANA zone such as Europe/Lisbon"}}}}}
_LISBON = call_message(("get_weather", {"city": "Lisbon", "unit": "celsius"}))
_CLOCK = call_message(("get_time", {"zone": "Europe/Lisbon"}))
# (tools, conversation) pairs the tool shape must reproduce; the last one has two calls in one message
TOOL_PROOFS: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]] = [
    ([WEATHER], [{"role": "user", "content": "What is the weather in Paris?"}]),
    ([WEATHER, CLOCK], [{"role": "system", "content": "You plan trips."},
                        {"role": "user", "content": "How warm is Lisbon?"}, _LISBON,
                        {"role": "tool", "content": '{"temperature": 21, "sky": "clear"}'}]),
    ([WEATHER], [{"role": "user", "content": "How warm is Lisbon?"}, _LISBON, {"role": "tool", "content": "21 °C"},
                 {"role": "assistant", "content": "It is 21 °C in Lisbon."}, {"role": "user", "content": "Thanks!"}]),
    ([WEATHER, CLOCK], [{"role": "user", "content": "Lisbon: weather, then time."}, _LISBON,
                        {"role": "tool", "content": "21 °C"}, _CLOCK, {"role": "tool", "content": "14:05"}]),
    ([CLOCK, WEATHER], [{"role": "user", "content": "Both, please."},
                        call_message(("get_weather", {"city": "Lisbon"}), ("get_time", {"zone": "Europe/Lisbon"})),
                        {"role": "tool", "content": "21 °C"}, {"role": "tool", "content": "14:05"}]),
]


class NoShape(Exception):
    """The template's renderings do not fit the shape; the message says how."""


@dataclass(frozen=True)
class ChatShape:
    """`placement`: where a system prompt goes: "first" (before_system + prompt + after_system, then the first user
    message), "last" (before_system + prompt + after_system just before the last user message's content, as Mistral's
    templates do) or "none" (the template takes none: .System is not used)."""

    placement: str
    before_system: str
    after_system: str
    head: str  # with no system message: everything before the first user message's content
    default_system: str | None  # the system prompt the head holds when none is given, if it has that form
    after_user: str
    after_assistant: str
    generation: str

    def render(self, messages: list[dict[str, str]], system: str = "") -> str:
        """What the Go template renders for `messages` (the last one a user's) with Ollama's .System."""
        first = self.placement == "first" and system
        out = [f"{self.before_system}{system}{self.after_system}" if first else self.head]
        turns = [m for m in messages if m["role"] != "system"]
        for i, m in enumerate(turns):
            last = i == len(turns) - 1
            if last and system and self.placement == "last" and m["role"] == "user":
                out.append(f"{self.before_system}{system}{self.after_system}")
            out.append(m["content"])
            if m["role"] == "user":
                out.append(self.generation if last else self.after_user)
            elif not last:
                out.append(self.after_assistant)
        return "".join(out)

    def go_template(self) -> str:
        system = go_literal(self.before_system) + "{{ $.System }}" + go_literal(self.after_system)
        head = "{{- if .System }}" + system + "{{- else }}" + go_literal(self.head) + "{{- end }}\n" \
            if self.placement == "first" else go_literal(self.head) + "\n"
        at_last = "{{ if and $last $.System }}" + system + "{{ end }}" if self.placement == "last" else ""
        return (head + "{{- range $i, $_ := .Messages }}\n"
                "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
                "{{- if eq .Role \"user\" }}" + at_last + "{{ .Content }}{{ if $last }}" + go_literal(self.generation)
                + "{{ else }}" + go_literal(self.after_user) + "{{ end }}\n"
                "{{- else if eq .Role \"assistant\" }}{{ .Content }}{{ if not $last }}"
                + go_literal(self.after_assistant) + "{{ end }}\n"
                "{{- end }}\n"
                "{{- end }}")


@dataclass
class Modelfile:
    text: str
    template_proven: bool
    notes: list[str] = field(default_factory=list)
    tools: bool = False  # the TEMPLATE writes .Tools, tool calls and tool results


class TemplateRenderer:
    """The jinja template as transformers renders it, with the file's BOS/EOS, the leading BOS taken off (llama.cpp
    adds it when it tokenizes)."""

    def __init__(self, template: str, bos: str | None, eos: str | None) -> None:
        self.template, self.bos, self.eos = template, bos, eos

    def __call__(self, messages: list[dict[str, Any]], generation: bool = True,
                 tools: list[dict[str, Any]] | None = None) -> str:
        try:
            text = render_template(self.template, messages, add_generation_prompt=generation, bos_token=self.bos or "",
                                   eos_token=self.eos or "", date_string=FIXED_DATE, tools=tools)
        except TemplateRunaway as e:
            raise NoShape(f"the template did not end ({e})") from None
        except Exception as e:  # the template's raise_exception, an undefined name …
            what = "a conversation with tools" if tools else "a plain conversation"
            raise NoShape(f"the template fails on {what} ({type(e).__name__}: {e})") from None
        return text[len(self.bos):] if self.bos and text.startswith(self.bos) else text


def _split(text: str, markers: list[str]) -> list[str]:
    """The text between the markers, which must each appear once and in this order."""
    pieces = split_at(text, markers)
    if pieces is None:
        raise NoShape("the template does not place every message once and in order (the system prompt may go "
                      "with a later message, or a turn may be dropped)")
    return pieces


def probe_shape(render: TemplateRenderer) -> ChatShape:
    s, u1, a1, u2 = (MARK[k] for k in ("system", "user1", "assistant1", "user2"))
    plain = render([{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                    {"role": "user", "content": u2}])
    head, after_user, after_assistant, generation = _split(plain, [u1, a1, u2])
    try:
        with_system = render([{"role": "system", "content": s}, {"role": "user", "content": u1},
                              {"role": "assistant", "content": a1}, {"role": "user", "content": u2}])
    except NoShape:  # a template that refuses system messages (Gemma 2's)
        return ChatShape("none", "", "", head, None, after_user, after_assistant, generation)
    if with_system.find(s) < with_system.find(u1):
        return _system_first(with_system, head, after_user, after_assistant, generation)
    return _system_last(with_system, head, after_user, after_assistant, generation)


def _system_first(text: str, head: str, after_user: str, after_assistant: str, generation: str) -> ChatShape:
    s, u1, a1, u2 = (MARK[k] for k in ("system", "user1", "assistant1", "user2"))
    before, after, *rest = _split(text, [s, u1, a1, u2])
    if rest != [after_user, after_assistant, generation]:
        raise NoShape("the turns render differently with and without a system message")
    default = None
    if head.startswith(before) and head.endswith(after) and len(head) >= len(before) + len(after):
        default = head[len(before):len(head) - len(after)]
    return ChatShape("first", before, after, head, default, after_user, after_assistant, generation)


def _system_last(text: str, head: str, after_user: str, after_assistant: str, generation: str) -> ChatShape:
    s, u1, a1, u2 = (MARK[k] for k in ("system", "user1", "assistant1", "user2"))
    start, first_gap, between, after, end = _split(text, [u1, a1, s, u2])
    if [start, first_gap, end] != [head, after_user, generation] or not between.startswith(after_assistant):
        raise NoShape("the turns render differently with and without a system message")
    return ChatShape("last", between[len(after_assistant):], after, head, None, after_user, after_assistant, generation)


def prove(shape: ChatShape, render: TemplateRenderer) -> None:
    """The shape, as Ollama would fill it, against the jinja template on every proof conversation."""
    for messages in PROOF_CONVERSATIONS:
        if shape.placement == "none" and any(m["role"] == "system" for m in messages):
            continue  # the jinja template refuses them
        values = ollama_values(messages, shape.default_system)
        want, got = render(messages), shape.render(values["Messages"], values["System"])
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise NoShape(f"the Go template would render {got[at:at + 30]!r} where the jinja one renders "
                          f"{want[at:at + 30]!r}")


def tool_shape_of(render: TemplateRenderer, chat: ChatShape) -> ToolShape | None:
    """The template's tool use, proven as `prove` proves the chat; None when the template ignores tools. NoToolShape
    when it uses them in a way the shape cannot write."""
    try:
        return _proven_tool_shape(render, chat)
    except NoShape as e:
        raise NoToolShape(str(e)) from None


def _proven_tool_shape(render: TemplateRenderer, chat: ChatShape) -> ToolShape | None:
    plain = [{"role": "user", "content": "Hello!"}]
    if render(plain, tools=[WEATHER]) == render(plain):
        return None
    if chat.placement != "first":
        raise NoToolShape("tool use is written only for templates that put the system prompt first")
    shape = probe_tool_shape(render)
    for tools, messages in TOOL_PROOFS:
        if shape.call_separator is None and any(len(m.get("tool_calls", [])) > 1 for m in messages):
            continue  # the template takes one call per message
        values = ollama_values(messages, chat.default_system)
        want = render(messages, tools=tools)
        got = shape.render(values["Messages"], values["System"], tools)
        if not same_up_to_json(got, want):
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise NoToolShape(f"with tools the Go template would render {got[at:at + 30]!r} where the jinja one "
                              f"renders {want[at:at + 30]!r}")
    return shape


def _token_text(header: GGUFHeader, key: str) -> str | None:
    tokens, token_id = header.value("tokenizer.ggml.tokens"), header.value(key)
    return tokens[token_id] if tokens is not None and isinstance(token_id, int) and 0 <= token_id < len(tokens) else None


def stop_tokens(header: GGUFHeader, shape: ChatShape | None) -> list[str]:
    """The vocabulary's end-of-turn tokens (EOS, EOT, EOM) and the control tokens that close an assistant turn in the
    template (they start the next turn: generation stops there)."""
    stops = [t for t in (_token_text(header, f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom", "eos")) if t]
    tokens, types = header.value("tokenizer.ggml.tokens") or [], header.value("tokenizer.ggml.token_type") or []
    bos = _token_text(header, "tokenizer.ggml.bos_token_id")
    if shape is not None:
        between = shape.after_assistant
        found = [(between.find(t), t) for t, kind in zip(tokens, types) if kind == CONTROL and t and t != bos and t in between]
        stops += [t for _, t in sorted(found)]
    return list(dict.fromkeys(stops))


def _quoted(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def make_modelfile(gguf: Path, from_path: str | None = None) -> Modelfile:
    """The Modelfile of `gguf` (FROM names it relative to the Modelfile's folder unless `from_path` is given)."""
    header = read_header(gguf)
    template = header.value("tokenizer.chat_template")
    lines = [f"FROM {from_path or './' + Path(gguf).name}"]
    notes: list[str] = []
    shape = tool_shape = None
    if not isinstance(template, str) or not template:
        notes.append("the GGUF has no chat template: no TEMPLATE line (Ollama's own detection applies)")
    else:
        render = TemplateRenderer(template, _token_text(header, "tokenizer.ggml.bos_token_id")
                                  if header.value("tokenizer.ggml.add_bos_token", True) else None,
                                  _token_text(header, "tokenizer.ggml.eos_token_id"))
        try:
            shape = probe_shape(render)
            prove(shape, render)
        except NoShape as e:
            notes.append(f"no TEMPLATE line: {e}; Ollama's own template detection applies")
            shape = None
        if shape is not None:
            try:
                tool_shape = tool_shape_of(render, shape)
            except NoToolShape as e:
                notes.append(f"the TEMPLATE leaves tools out: {e}")
    if shape is not None:
        go = shape.go_template() if tool_shape is None else \
            "{{- if .Tools }}" + tool_shape.go_template() + "\n{{- else }}" + shape.go_template() + "\n{{- end }}"
        lines.append(f"TEMPLATE {_quoted(go)}")
        if shape.default_system:
            lines.append(f"SYSTEM {_quoted(shape.default_system)}")
    lines += [f"PARAMETER stop {json.dumps(t, ensure_ascii=False)}" for t in stop_tokens(header, shape)]
    license_text = header.value("general.license")
    if isinstance(license_text, str) and license_text:
        lines.append(f"LICENSE {_quoted(license_text)}")
    return Modelfile("\n".join(lines) + "\n", shape is not None, notes, tool_shape is not None)


def ollama_values(messages: list[dict[str, Any]], default_system: str | None) -> dict[str, Any]:
    """What Ollama hands a template for a chat: the default system prompt put first when none is given, .System the
    system messages joined, consecutive messages of one role merged (a tool's results are not)."""
    if default_system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": default_system}, *messages]
    merged: list[dict[str, Any]] = []
    for m in messages:
        if merged and merged[-1]["role"] == m["role"] and m["role"] != "tool":
            merged[-1] = {**merged[-1], "content": merged[-1]["content"] + "\n\n" + m["content"]}
        else:
            merged.append(dict(m))
    return {"System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"), "Messages": merged}
