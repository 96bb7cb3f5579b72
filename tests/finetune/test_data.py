"""Rows -> token ids + labels, checked against the tokenizer run on the pieces independently."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mt.errors import DataError
from mt.finetune.data import IGNORE, Sample, load_samples
from tests import checkpoints
from tests.finetune.conftest import write_jsonl

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six, of course."},
]


@pytest.fixture(scope="module")
def llama3_tok(llama3_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(llama3_tokenizer_dir)


@pytest.fixture(scope="module")
def qwen2_tok(qwen2_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)


def one_sample(tmp_path: Path, row: dict, tokenizer, max_seq_len: int = 4096) -> Sample:
    samples, stats = load_samples(write_jsonl(tmp_path / "d.jsonl", [row]), tokenizer, max_seq_len)
    assert stats.rows == 1 and len(samples) == 1
    return samples[0]


def trained_runs(sample: Sample) -> list[list[int]]:
    """The maximal runs of consecutive trained labels."""
    runs: list[list[int]] = []
    previous = IGNORE
    for label in sample.labels:
        if label != IGNORE:
            if previous == IGNORE:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def test_text_row_trains_every_token_and_eos(llama3_tok, tmp_path: Path) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    sample = one_sample(tmp_path, {"text": text}, llama3_tok)
    expected = llama3_tok(text)["input_ids"] + [llama3_tok.eos_token_id]
    assert expected[0] == llama3_tok.bos_token_id
    assert sample.input_ids == expected
    assert sample.labels == [IGNORE] + expected[1:]


def test_prompt_completion_trains_the_completion_only(llama3_tok, tmp_path: Path) -> None:
    prompt, completion = "Q: capital of France? A:", " Paris, on the Seine."
    sample = one_sample(tmp_path, {"prompt": prompt, "completion": completion}, llama3_tok)
    prompt_ids = llama3_tok(prompt)["input_ids"]
    completion_ids = llama3_tok(completion, add_special_tokens=False)["input_ids"] + [llama3_tok.eos_token_id]
    assert sample.input_ids == prompt_ids + completion_ids
    assert sample.labels == [IGNORE] * len(prompt_ids) + completion_ids


def test_a_token_across_the_prompt_boundary_is_trained(llama3_tok, tmp_path: Path) -> None:
    # "A: " + "Paris": the whole text tokenizes to ... ":", " Paris"; the " Paris" token holds the answer
    sample = one_sample(tmp_path, {"prompt": "Q: capital of France? A: ", "completion": "Paris"}, llama3_tok)
    paris = llama3_tok(" Paris", add_special_tokens=False)["input_ids"]
    assert trained_runs(sample) == [paris + [llama3_tok.eos_token_id]]


@pytest.mark.parametrize("tok, end_of_turn", [("llama3_tok", "<|eot_id|>"), ("qwen2_tok", "<|im_end|>\n")])
def test_messages_train_only_the_assistant_turns(tok: str, end_of_turn: str, request, tmp_path: Path) -> None:
    tokenizer = request.getfixturevalue(tok)
    sample = one_sample(tmp_path, {"messages": CONVERSATION}, tokenizer)
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert sample.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # each assistant turn is its content and the template's end of turn, tokenized on its own
    expected = [tokenizer(m["content"] + end_of_turn, add_special_tokens=False)["input_ids"]
                for m in CONVERSATION if m["role"] == "assistant"]
    assert trained_runs(sample) == expected
    assert sample.trained == sum(map(len, expected))


def as_parts(text: str) -> list[dict]:
    """OpenAI-style content parts that join back to text."""
    middle = len(text) // 2
    return [{"type": "text", "text": text[:middle]}, {"type": "text", "text": text[middle:]}]


def test_content_parts_and_sharegpt_rows_equal_plain_messages(llama3_tok, tmp_path: Path) -> None:
    plain = one_sample(tmp_path, {"messages": CONVERSATION}, llama3_tok)
    parts = [{**m, "content": as_parts(m["content"])} for m in CONVERSATION]
    sharegpt_roles = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": sharegpt_roles[m["role"]], "value": m["content"]} for m in CONVERSATION]
    assert as_parts("It is 4.")[0]["text"] == "It i"  # split mid-word: joined without a separator
    assert one_sample(tmp_path, {"messages": parts}, llama3_tok) == plain
    assert one_sample(tmp_path, {"conversations": sharegpt}, llama3_tok) == plain


@pytest.mark.parametrize("tok, end_of_turn", [("llama3_tok", "<|eot_id|>"), ("qwen2_tok", "<|im_end|>\n")])
@pytest.mark.parametrize("key", ["messages", "conversations"])
def test_an_assistant_turn_with_weight_0_is_not_trained(tok: str, end_of_turn: str, key: str, request,
                                                        tmp_path: Path) -> None:
    tokenizer = request.getfixturevalue(tok)
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["weight"] = 0  # "It is 4." is context only
    messages[4]["weight"] = 1
    if key == "conversations":
        roles = {"system": "system", "user": "human", "assistant": "gpt"}
        messages = [{"from": roles[m.pop("role")], "value": m.pop("content"), **m} for m in messages]
    sample = one_sample(tmp_path, {key: messages}, tokenizer)
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)  # the weights are not shown to it
    assert sample.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert trained_runs(sample) == [tokenizer("Six, of course." + end_of_turn, add_special_tokens=False)["input_ids"]]


def test_truncation_is_counted(llama3_tok, tmp_path: Path) -> None:
    rows = [{"text": "word " * 40}, {"text": "short"}, {"prompt": "x " * 30, "completion": " y"}]
    samples, stats = load_samples(write_jsonl(tmp_path / "d.jsonl", rows), llama3_tok, max_seq_len=16)
    longest = len(llama3_tok("word " * 40)["input_ids"]) + 1  # + EOS
    assert stats.rows == 3 and stats.truncated == 2 and stats.longest == longest
    assert stats.dropped == 1  # the prompt filled all 16 tokens: nothing left to train
    assert [len(s.input_ids) for s in samples] == [16, len(llama3_tok("short")["input_ids"]) + 1]
    warnings = stats.warnings(16)
    assert f"2 of 3 rows were longer than --max-seq-len 16 tokens (longest {longest})" in warnings[0]
    assert "1 rows had no trained token left" in warnings[1]


@pytest.mark.parametrize("lines, words", [
    (['{"text": "a"}', '{"text": "b"', '{"text": "c"}'], ("d.jsonl:2: not valid JSON",)),
    (['{"text": "a"}', '', '["text"]'], ("d.jsonl:3: a JSON list, not an object",)),
    (['{"text": "a"}', '{"content": "b", "id": 3}'], ("d.jsonl:2: no usable field (has 'content', 'id')",)),
    (['{"text": 5}'], ("d.jsonl:1: 'text' is a int, not a string",)),
    (['{"text": ""}'], ("d.jsonl:1: 'text' is empty",)),
    (['{"prompt": "q"}'], ("d.jsonl:1: has prompt but no 'completion'",)),
    (['{"prompt": "q", "completion": ""}'], ("d.jsonl:1: 'completion' is empty",)),
    (['{"messages": []}'], ("d.jsonl:1: 'messages' must be a non-empty list",)),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], ("d.jsonl:1: no assistant message",)),
    (['{"messages": [{"role": "user"}]}'], ("d.jsonl:1: message 0 is not an object",)),
    (['{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}'],
     ("d.jsonl:1: message 0 is not an object",)),
    (['{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, '
      '{"role": "assistant", "content": "a"}]}'], ("d.jsonl:1: message 0 has 'image_url' content", "text parts")),
    (['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"text": "a"}]}]}'],
     ("d.jsonl:1: message 1 has a part that is not",)),
    (['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}'],
     ("d.jsonl:1: every assistant message has \"weight\": 0",)),
    (['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]}'],
     ("d.jsonl:1: message 1 has \"weight\": 0.5", "0 (not trained) or 1")),
    (['{"conversations": []}'], ("d.jsonl:1: 'conversations' must be a non-empty list",)),
    (['{"conversations": [{"from": "human"}]}'], ("d.jsonl:1: conversations[0] is not an object with 'from'",)),
    (['{"conversations": [{"from": "bot", "value": "a"}]}'], ("d.jsonl:1: conversations[0] is from 'bot'",)),
])
def test_bad_rows_name_their_line(lines: list[str], words: tuple[str, ...], llama3_tok, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as caught:
        load_samples(path, llama3_tok, 64)
    for word in words:
        assert word in caught.value.one_line()


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_dataset(content: str, llama3_tok, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="holds no rows"):
        load_samples(path, llama3_tok, 64)


def with_template(tokenizer_dir: Path, template: str | None):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = template
    return tokenizer


def test_template_that_refuses_the_conversation(llama3_tokenizer_dir: Path, tmp_path: Path) -> None:
    # Llama 2's template raises when roles do not alternate
    tokenizer = with_template(llama3_tokenizer_dir, checkpoints.LLAMA2_CHAT_TEMPLATE)
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "c"}]}
    with pytest.raises(DataError, match=r"d.jsonl:1: the chat template refused the conversation"):
        load_samples(write_jsonl(tmp_path / "d.jsonl", [row]), tokenizer, 64)


def test_template_that_rewrites_earlier_turns(llama3_tokenizer_dir: Path, tmp_path: Path) -> None:
    # a header that counts the messages changes once the conversation goes on: no assistant span can be found
    template = "{{ messages|length }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    tokenizer = with_template(llama3_tokenizer_dir, template)
    with pytest.raises(DataError, match=r"d.jsonl:1: the chat template renders the conversation before message 2"):
        load_samples(write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATION}]), tokenizer, 64)


@pytest.mark.parametrize("template, limit", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "over 0.3 s"),
    ("{% set s = namespace(t='ab') %}{% for i in range(22) %}{% set s.t = s.t ~ s.t %}{% endfor %}{{ s.t }}",
     "over 1,048,576 characters"),
])
def test_template_that_does_not_end(template: str, limit: str, llama3_tokenizer_dir: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from mt.io import chat_template

    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.3)
    tokenizer = with_template(llama3_tokenizer_dir, template)
    with pytest.raises(DataError, match=rf"d.jsonl:1: the chat template did not end rendering the conversation \({limit}\)"):
        load_samples(write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATION}]), tokenizer, 64)


def test_llama2_template_trains_the_answer_and_eos(llama3_tokenizer_dir: Path, tmp_path: Path) -> None:
    tokenizer = with_template(llama3_tokenizer_dir, checkpoints.LLAMA2_CHAT_TEMPLATE)
    sample = one_sample(tmp_path, {"messages": CONVERSATION}, tokenizer)
    # the template writes " " + content + " " + eos_token after each [/INST]
    expected = [tokenizer(f" {m['content']} {tokenizer.eos_token}", add_special_tokens=False)["input_ids"]
                for m in CONVERSATION if m["role"] == "assistant"]
    assert trained_runs(sample) == expected


def test_messages_without_a_chat_template(llama3_tokenizer_dir: Path, tmp_path: Path) -> None:
    tokenizer = with_template(llama3_tokenizer_dir, None)
    with pytest.raises(DataError, match="needs a chat template"):
        load_samples(write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATION}]), tokenizer, 64)


def test_eos_is_not_doubled_when_the_tokenizer_adds_it(llama3_tokenizer_dir: Path, tmp_path: Path) -> None:
    from tokenizers.processors import TemplateProcessing

    tokenizer = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tokenizer.bos_token} $A {tokenizer.eos_token}",
        special_tokens=[(tokenizer.bos_token, bos), (tokenizer.eos_token, eos)])
    plain = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    body = plain("Hello world", add_special_tokens=False)["input_ids"]
    assert tokenizer("Hello world")["input_ids"] == [bos, *body, eos]  # the tokenizer now ends rows with EOS
    sample = one_sample(tmp_path, {"text": "Hello world"}, tokenizer)
    assert sample.input_ids == [bos, *body, eos] and sample.labels == [IGNORE, *body, eos]
