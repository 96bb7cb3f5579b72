"""Tool use in an Ollama template: where a jinja chat template puts the tool definitions, how it writes an assistant's
tool calls and the tools' results, read from renderings of probe conversations as ChatShape reads the chat itself.

Between two messages a template writes a gap that depends on both messages' kinds (user, assistant, call: an
assistant message with tool calls, tool: a tool's result), so a Qwen-style template that wraps consecutive results in
one turn is a gap tool→tool unlike the gap tool→assistant. A call is what the model writes after the generation
prompt: `prefix name mid arguments`, calls of one message joined by `separator`. The tool definitions are JSON the
template prints (each tool, or the whole list); Ollama prints them with its own JSON encoder, so the proof compares
JSON by value and every other character as text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

TOOLS_AT = "\x00tools\x00"  # where a piece holds the tool definitions
ARG_KEY = "Qz7arg"
KINDS = ("user", "assistant", "call", "tool")


def _tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": f"{name} describes itself",
        "parameters": {"type": "object", "required": [ARG_KEY],
                       "properties": {ARG_KEY: {"type": "string", "description": "an argument"}}}}}


PROBE_TOOLS = [_tool("Qz7toolA"), _tool("Qz7toolB")]
# the contents of the probe conversations (the chat's first four, modelfile.py's too): unique, and plain text
MARK = {"system": "Qz7system", "user1": "Qz7first", "assistant1": "Qz7reply", "user2": "Qz7second",
        "name1": "Qz7nameA", "name2": "Qz7nameB", "args1": "Qz7argsA", "args2": "Qz7argsB",
        "result1": "Qz7resultA", "result2": "Qz7resultB"}


class NoToolShape(Exception):
    """The template's tool renderings do not fit the shape; the message says how."""


def call_message(*calls: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}


def json_regions(text: str, wanted: Callable[[Any], bool]) -> list[tuple[int, int, Any]]:
    """The outermost JSON values in `text` that `wanted` accepts: (start, end, value), in order."""
    decoder, found, at = json.JSONDecoder(), [], 0
    for i, ch in enumerate(text):
        if i < at or ch not in "{[":
            continue
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            continue
        if wanted(value):
            found.append((i, end, value))
            at = end
    return found


def same_up_to_json(a: str, b: str) -> bool:
    """`a` and `b` equal as text, except that JSON values in them are compared as values."""
    decoder = json.JSONDecoder()
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] in '{["' and a[i] == b[j]:
            try:
                va, ea = decoder.raw_decode(a, i)
                vb, eb = decoder.raw_decode(b, j)
            except ValueError:
                pass
            else:
                if va != vb:
                    return False
                i, j = ea, eb
                continue
        if a[i] != b[j]:
            return False
        i, j = i + 1, j + 1
    return a[i:] == b[j:]


@dataclass(frozen=True)
class ToolsBlock:
    """How the definitions are printed: `unit` "list" (one JSON array), "tool" or "function" (each tool's JSON, or its
    function's, joined by `separator`)."""

    unit: str
    separator: str = ""

    def render(self, tools: list[dict[str, Any]]) -> str:
        dump = lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":"))  # noqa: E731  Ollama's encoding
        if self.unit == "list":
            return dump(tools)
        return self.separator.join(dump(t if self.unit == "tool" else t["function"]) for t in tools)

    def go(self) -> str:
        if self.unit == "list":
            return "{{ json $.Tools }}"
        value = "$t" if self.unit == "tool" else "$t.Function"
        sep = "{{ if $k }}" + go_literal(self.separator) + "{{ end }}" if self.separator else ""
        return "{{ range $k, $t := $.Tools }}" + sep + "{{ json " + value + " }}{{ end }}"


def go_literal(text: str) -> str:
    """`text` as a Go template action printing it (nothing for an empty text)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def _chain(cases: list[tuple[str, str]]) -> str:
    """`if c1 }}t1{{ else if c2 }}t2 … {{ end`: the text of the first condition that holds."""
    if not cases:
        return ""
    return "".join(("{{- if " if i == 0 else "{{ else if ") + cond + " }}" + go_literal(text)
                   for i, (cond, text) in enumerate(cases)) + "{{ end }}"


def _raw(text: str) -> str:
    """Text as a Go template text node (what Ollama's tool-call parser reads its tag from) where it can be one."""
    return text if "{{" not in text and "}}" not in text and not text.endswith("{") else go_literal(text)


@dataclass(frozen=True)
class ToolShape:
    """The chat with tools offered. The pieces before/after the system prompt and the head may hold TOOLS_AT."""

    block: ToolsBlock
    before_system: str
    after_system: str
    head: str
    gaps: dict[tuple[str, str], str]  # (kind, next kind) -> text; next kind "end": the generation prompt
    call_prefix: str
    call_mid: str
    call_separator: str | None  # between one call's arguments and the next call's prefix; None: one call only
    quoted_results: bool = False  # a tool's result is written as a JSON string

    def _piece(self, text: str, tools: list[dict[str, Any]]) -> str:
        return text.replace(TOOLS_AT, self.block.render(tools))

    def render(self, messages: list[dict[str, Any]], system: str, tools: list[dict[str, Any]]) -> str:
        """What the Go template renders for Ollama's values (.Messages, .System, .Tools)."""
        out = [self._piece(f"{self.before_system}{system}{self.after_system}" if system else self.head, tools)]
        turns = [m for m in messages if m["role"] != "system"]
        prev = None
        for m in turns:
            kind = "call" if m.get("tool_calls") else m["role"]
            if prev is not None:
                out.append(self.gaps.get((prev, kind), ""))
            if kind == "call":
                calls = m["tool_calls"] if self.call_separator is not None else m["tool_calls"][:1]
                out.append((self.call_separator or "").join(
                    self.call_prefix + c["function"]["name"] + self.call_mid
                    + json.dumps(c["function"]["arguments"], ensure_ascii=False, separators=(",", ":")) for c in calls))
            elif kind == "tool" and self.quoted_results:
                out.append(json.dumps(m["content"], ensure_ascii=False))
            else:
                out.append(m["content"])
            prev = kind
        if prev is not None:
            out.append(self.gaps.get((prev, "end"), ""))
        return "".join(out)

    def go_template(self) -> str:
        def piece(text: str) -> str:
            return self.block.go().join(go_literal(p) for p in text.split(TOOLS_AT))

        head = ("{{- if .System }}" + piece(self.before_system) + "{{ $.System }}" + piece(self.after_system)
                + "{{- else }}" + piece(self.head) + "{{- end }}\n")
        gaps = _chain([(f'and (eq $prev "{a}") (eq $kind "{b}")', t) for (a, b), t in self.gaps.items() if b != "end"])
        ends = _chain([(f'eq $kind "{a}"', t) for (a, b), t in self.gaps.items() if b == "end"])
        one_call = self.call_separator is None
        result = '{{ else if eq .Role "tool" }}{{ json .Content }}' if self.quoted_results else ""
        more = "" if one_call else \
            "{{ if ne (len (slice $m.ToolCalls $j)) 1 }}" + go_literal(self.call_separator) + "{{ end }}"
        call = _raw(self.call_prefix) + "{{ .Function.Name }}" + go_literal(self.call_mid) + "{{ json .Function.Arguments }}"
        calls = ("{{ with index .ToolCalls 0 }}" + call + "{{ end }}" if one_call
                 else "{{ range $j, $c := .ToolCalls }}" + call + more + "{{ end }}")
        return (head + '{{- $prev := "" }}\n'
                "{{- range $i, $m := .Messages }}{{ if ne .Role \"system\" }}\n"
                "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
                "{{- $kind := .Role }}{{ with .ToolCalls }}{{ $kind = \"call\" }}{{ end }}\n"
                "{{- if $prev }}" + gaps + "{{ end }}\n"
                "{{- if .ToolCalls }}" + calls + result + "{{ else }}{{ .Content }}{{ end }}\n"
                "{{- if $last }}" + ends + "{{ end }}\n"
                "{{- $prev = $kind }}\n"
                "{{- end }}{{ end }}")


def _normalize(text: str, tools: list[dict[str, Any]], args: dict[str, dict[str, Any]]) -> tuple[str, ToolsBlock | None]:
    """`text` with the tool definitions replaced by TOOLS_AT and each call's arguments by its marker."""
    block = None
    lists = json_regions(text, lambda v: v == tools)
    if lists:
        block = ToolsBlock("list")
        for start, end, _ in reversed(lists):
            text = text[:start] + TOOLS_AT + text[end:]
    else:
        functions = [t["function"] for t in tools]
        each = json_regions(text, lambda v: v in tools or v in functions)
        pairs = [(a, b) for a, b in zip(each, each[1:]) if a[2] in (tools[0], functions[0])
                 and b[2] in (tools[1], functions[1])]
        if pairs:
            a, b = pairs[0]
            block = ToolsBlock("tool" if a[2] == tools[0] else "function", text[a[1]:b[0]])
            for a, b in reversed(pairs):
                text = text[:a[0]] + TOOLS_AT + text[b[1]:]
    for marker, value in args.items():
        for start, end, _ in reversed(json_regions(text, lambda v, value=value: v == value)):
            text = text[:start] + marker + text[end:]
    return text, block


def split_at(text: str, markers: list[str]) -> list[str] | None:
    """The text between the markers, or None unless each appears exactly once and in this order."""
    pieces, at = [], 0
    for marker in markers:
        found = text.find(marker, at)
        if found < 0 or text.count(marker) != 1:
            return None
        pieces.append(text[at:found])
        at = found + len(marker)
    return [*pieces, text[at:]]


def probe_tool_shape(render: Callable[..., str]) -> ToolShape:
    """`render(messages, tools=...)`: the template's text after the BOS, with the generation prompt."""
    m = MARK
    args = {m["args1"]: {ARG_KEY: "Qz7valueA"}, m["args2"]: {ARG_KEY: "Qz7valueB"}}
    user1, user2 = ({"role": "user", "content": m[k]} for k in ("user1", "user2"))
    reply = {"role": "assistant", "content": m["assistant1"]}
    result1, result2 = ({"role": "tool", "content": m[k]} for k in ("result1", "result2"))
    call1, call2 = call_message((m["name1"], args[m["args1"]])), call_message((m["name2"], args[m["args2"]]))
    blocks: list[ToolsBlock] = []

    def run(messages: list[dict[str, Any]], markers: list[str], rendered: str | None = None) -> list[str]:
        text, block = _normalize(rendered or render(messages, tools=PROBE_TOOLS), PROBE_TOOLS, args)
        if block is None:
            raise NoToolShape("the tool definitions are not written as their JSON")
        blocks.append(block)
        pieces = split_at(text, markers)
        if pieces is None:
            raise NoToolShape("the template does not write every message and call once and in order")
        return pieces

    head, u_a, a_u, u_end = run([user1, reply, user2], [m["user1"], m["assistant1"], m["user2"]])
    head1, u_c, mid, c_t, t_end = run([user1, call1, result1], [m["user1"], m["name1"], m["args1"], m["result1"]])
    *_, t_t, t_a, _, _ = run([user1, call1, result1, result2, reply, user2],
                             [m["user1"], m["name1"], m["args1"], m["result1"], m["result2"], m["assistant1"],
                              m["user2"]])
    t_c = run([user1, call1, result1, call2, result2],
              [m["user1"], m["name1"], m["args1"], m["result1"], m["name2"], m["args2"], m["result2"]])[4]
    if head1 != head or not u_c.startswith(u_end) or not t_c.startswith(t_end):
        raise NoToolShape("a tool call does not follow the generation prompt")
    prefix = u_c[len(u_end):]
    if t_c[len(t_end):] != prefix:
        raise NoToolShape("a tool call after a result starts unlike one after a user message")
    two_calls = [user1, call_message((m["name1"], args[m["args1"]]), (m["name2"], args[m["args2"]])), result1, result2]
    try:
        rendered = render(two_calls, tools=PROBE_TOOLS)
    except Exception:  # the template refuses two calls in one message (Llama 3.1's raises)
        separator = None
    else:
        separator = run(two_calls, [m["user1"], m["name1"], m["args1"], m["name2"], m["args2"]], rendered)[3]
    if separator is not None:
        if not separator.endswith(prefix):
            raise NoToolShape("the calls of one message are not written alike")
        separator = separator[:len(separator) - len(prefix)]
    before, after, *_ = run([{"role": "system", "content": m["system"]}, user1, call1, result1],
                            [m["system"], m["user1"], m["name1"], m["args1"], m["result1"]])
    if len(set(blocks)) != 1:
        raise NoToolShape("the tool definitions are written differently from one conversation to another")
    gaps = {("user", "assistant"): u_a, ("assistant", "user"): a_u, ("user", "call"): u_end,
            ("call", "tool"): c_t, ("tool", "tool"): t_t, ("tool", "assistant"): t_a, ("tool", "call"): t_end,
            ("user", "end"): u_end, ("tool", "end"): t_end}
    quoted = all(g.endswith('"') for k, g in gaps.items() if k[1] == "tool") and \
        all(g.startswith('"') for k, g in gaps.items() if k[0] == "tool")
    if quoted:  # the results written as JSON strings (Llama 3.1's template)
        gaps = {k: g[1 if k[0] == "tool" else 0:len(g) - (k[1] == "tool")] for k, g in gaps.items()}
    return ToolShape(blocks[0], before, after, head, gaps, prefix, mid, separator, quoted)
