"""Training data: JSONL rows -> token ids + labels (-100 where no loss is taken).

Three row kinds, tried in this order:
  {"messages": [{"role": ..., "content": ...}, ...]}  the tokenizer's chat template is applied; loss only on the
                                                      assistant turns (their content and the template's end-of-turn)
                                                      and not on one marked "weight": 0
  {"conversations": [{"from": ..., "value": ...}]}    ShareGPT's spelling of the same (human/gpt/system/tool)
  {"prompt": "...", "completion": "..."}              loss only on the completion and the EOS appended to it
  {"text": "..."}                                     loss on every token, and on the EOS appended to it

Every kind becomes one string plus the character spans to train on; that string is tokenized once (with the
tokenizer's special tokens for `text`/`prompt`, without them for `messages`, whose template writes its own BOS)
and a token is trained when its character span (offset mapping) overlaps a trained span. One tokenization of the
whole string is what the model sees at inference, so no merge across a prompt/completion boundary is lost; a
token that straddles the boundary (prompt "A: " + completion "Paris" -> " Paris") is trained.

Assistant spans are found by rendering the template incrementally: for the assistant message i, the
conversation up to i-1 rendered with the generation prompt must be a prefix of the conversation up to i, which
must be a prefix of the whole; the characters between are the assistant's turn. This works with every stock
template (Llama 3, Qwen2.5, Mistral, Llama 2: none has `{% generation %}`, which `return_assistant_tokens_mask`
needs); a template that renders earlier turns differently once later ones exist is refused with the line.

A message's content is a string, or OpenAI-style parts [{"type": "text", "text": ...}, ...], joined without a
separator before the template sees them (text models only: another part type is refused).

The first token of every sample is never trained (nothing precedes it), so samples can be packed end to end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mt.errors import DataError
from mt.io.chat_template import TemplateRunaway, render_bounded

IGNORE = -100
ROW_KINDS = "'text', 'messages' (or ShareGPT 'conversations') or 'prompt' + 'completion'"
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool", "function": "tool", "observation": "tool"}


@dataclass(frozen=True)
class Sample:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE where no loss is taken

    @property
    def trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


@dataclass(frozen=True)
class Rendered:
    """One row as a string, the character spans trained on, and whether the tokenizer adds its special tokens."""

    text: str
    spans: list[tuple[int, int]]
    add_special_tokens: bool
    append_eos: bool


@dataclass
class DataStats:
    rows: int = 0
    truncated: int = 0  # rows longer than max_seq_len, cut to it
    longest: int = 0  # tokens of the longest row before truncation
    dropped: int = 0  # rows left without a trained token after truncation
    tokens: int = 0
    trained_tokens: int = 0
    kinds: dict[str, int] = field(default_factory=dict)

    def warnings(self, max_seq_len: int) -> list[str]:
        out = []
        if self.truncated:
            out.append(f"{self.truncated} of {self.rows} rows were longer than --max-seq-len {max_seq_len} tokens "
                       f"(longest {self.longest}) and were truncated; raise --max-seq-len to keep them whole")
        if self.dropped:
            out.append(f"{self.dropped} rows had no trained token left after truncation and were skipped")
        return out


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each non-blank line; a line that is not a JSON object is an error naming it."""
    try:
        handle = path.open(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror})", "pass a JSONL file to --data") from None
    with handle:
        try:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield number, _parse_line(path, number, line)
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text", "save the data as UTF-8 JSONL") from None


def _parse_line(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})",
                        "each line must be one JSON object") from None
    except RecursionError:
        raise DataError(f"{path}:{number}: JSON nested too deeply to read", "each line must be one JSON object") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{number}: a JSON {type(row).__name__}, not an object",
                        f"each line must be an object with {ROW_KINDS}")
    return row


class RowError(Exception):
    """A row that cannot be used; turned into a DataError with the file and line."""


def render_row(row: dict[str, Any], tokenizer: Any) -> tuple[str, Rendered]:
    """(kind, rendered) for one row."""
    if "messages" in row:
        return "messages", _render_messages(row["messages"], tokenizer)
    if "conversations" in row:
        return "messages", _render_messages(_sharegpt_messages(row["conversations"]), tokenizer)
    if "prompt" in row or "completion" in row:
        prompt, completion = _string(row, "prompt"), _string(row, "completion")
        if not completion:
            raise RowError("'completion' is empty: nothing to train on")
        return "prompt", Rendered(prompt + completion, [(len(prompt), len(prompt) + len(completion))], True, True)
    if "text" in row:
        text = _string(row, "text")
        if not text:
            raise RowError("'text' is empty")
        return "text", Rendered(text, [(0, len(text))], True, True)
    keys = ", ".join(repr(k) for k in sorted(row)) or "none"
    raise RowError(f"no usable field (has {keys})")


def _string(row: dict[str, Any], key: str) -> str:
    if key not in row:
        raise RowError(f"has {'completion' if key == 'prompt' else 'prompt'} but no {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"{key!r} is a {type(value).__name__}, not a string")
    return value


def _sharegpt_messages(turns: Any) -> list[dict[str, Any]]:
    """ShareGPT turns {"from", "value"} as chat messages {"role", "content"} (other keys, e.g. weight, kept)."""
    if not isinstance(turns, list) or not turns:
        raise RowError("'conversations' must be a non-empty list of {\"from\", \"value\"} objects")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError(f"conversations[{i}] is not an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise RowError(f"conversations[{i}] is from {turn['from']!r}, which is none of {', '.join(SHAREGPT_ROLES)}")
        rest = {k: v for k, v in turn.items() if k not in ("from", "value")}
        messages.append({"role": role, "content": turn["value"], **rest})
    return messages


def _render_messages(raw: Any, tokenizer: Any) -> Rendered:
    messages = _checked_messages(raw)
    if not getattr(tokenizer, "chat_template", None):
        raise RowError("a 'messages' row needs a chat template, and the base's tokenizer has none")
    whole = _apply_template(tokenizer, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or not _trained(raw[i]):
            continue
        before = _apply_template(tokenizer, messages[:i], True) if i else ""
        upto = _apply_template(tokenizer, messages[:i + 1], False)
        if not (upto.startswith(before) and whole.startswith(upto)):
            raise RowError(f"the chat template renders the conversation before message {i} differently once it "
                           "continues, so the assistant turn cannot be located")
        spans.append((len(before), len(upto)))
    if not spans:
        raise RowError("every assistant message has \"weight\": 0: nothing to train on")
    return Rendered(whole, spans, False, False)


def _checked_messages(messages: Any) -> list[dict[str, Any]]:
    """The messages as the template takes them: string contents, without mt's own "weight" key."""
    if not isinstance(messages, list) or not messages:
        raise RowError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise RowError(f"message {i} is not an object with string 'role' and 'content'")
        if m.get("weight", 1) not in (0, 1):
            raise RowError(f"message {i} has \"weight\": {m['weight']!r}; it must be 0 (not trained) or 1")
        rest = {k: v for k, v in m.items() if k not in ("content", "weight")}
        checked.append({**rest, "content": _content_text(m["content"], i)})
    if not any(m["role"] == "assistant" for m in checked):
        raise RowError("no assistant message: nothing to train on")
    return checked


def _content_text(content: Any, index: int) -> str:
    """A string content, or the texts of OpenAI-style parts [{"type": "text", "text": ...}] joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RowError(f"message {index} is not an object with string 'role' and 'content'")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = repr(kind) if kind else "a part that is not {\"type\": \"text\", \"text\": ...}"
            raise RowError(f"message {index} has {what} content; mt finetune trains text models on text parts only")
        texts.append(part["text"])
    return "".join(texts)


def _trained(message: dict[str, Any]) -> bool:
    return message.get("weight", 1) == 1


def _apply_template(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    try:
        return render_bounded(tokenizer, messages, add_generation_prompt=generation_prompt)
    except TemplateRunaway as e:
        raise RowError(f"the chat template did not end rendering the conversation ({e}); fix the template") from None
    except Exception as e:  # jinja's raise_exception (e.g. roles that do not alternate) or a template error
        raise RowError(f"the chat template refused the conversation ({e})") from None


def tokenize(rendered: Rendered, tokenizer: Any) -> Sample:
    encoded = tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [t if _overlaps(start, end, rendered.spans) else IGNORE
              for t, (start, end) in zip(ids, encoded["offset_mapping"])]
    eos = tokenizer.eos_token_id
    if rendered.append_eos and eos is not None:
        if ids[-1] == eos:  # a tokenizer that adds EOS itself (add_eos_token=True): train that one
            labels[-1] = eos
        else:
            ids.append(eos)
            labels.append(eos)
    labels[0] = IGNORE
    return Sample(ids, labels)


def _overlaps(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    return end > start and any(start < e and end > s for s, e in spans)


def load_samples(path: Path, tokenizer: Any, max_seq_len: int) -> tuple[list[Sample], DataStats]:
    """Every row of the JSONL file as a training sample of at most max_seq_len tokens."""
    stats = DataStats()
    samples = []
    for number, row in read_jsonl(path):
        try:
            kind, rendered = render_row(row, tokenizer)
        except RowError as e:
            raise DataError(f"{path}:{number}: {e}", f"each row needs {ROW_KINDS}") from None
        sample = tokenize(rendered, tokenizer)
        stats.rows += 1
        stats.kinds[kind] = stats.kinds.get(kind, 0) + 1
        stats.longest = max(stats.longest, len(sample.input_ids))
        if len(sample.input_ids) > max_seq_len:
            stats.truncated += 1
            sample = Sample(sample.input_ids[:max_seq_len], sample.labels[:max_seq_len])
        if sample.trained == 0:
            stats.dropped += 1
            continue
        stats.tokens += len(sample.input_ids)
        stats.trained_tokens += sample.trained
        samples.append(sample)
    if stats.rows == 0:
        raise DataError(f"{path} holds no rows", f"write one JSON object per line with {ROW_KINDS}")
    if not samples:
        raise DataError(f"no row of {path} has a token to train on within --max-seq-len {max_seq_len}",
                        "raise --max-seq-len or shorten the prompts")
    return samples, stats
