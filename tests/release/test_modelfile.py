"""Ollama Modelfiles: every TEMPLATE mt writes is rendered by Go's own text/template (tests/release/ollama_render, as
Ollama executes it: .System and .Messages, the default system prompt put first, the system messages joined) and must
equal transformers' rendering of the jinja template (its render_jinja_template, what apply_chat_template runs), less
the BOS llama.cpp adds itself, for every family's real template."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner
from llama_cpp.llama_chat_format import MISTRAL_INSTRUCT_CHAT_TEMPLATE, MIXTRAL_INSTRUCT_CHAT_TEMPLATE

from mt.cache import cache_root
from mt.cli import main
from mt.release.modelfile import FIXED_DATE, make_modelfile, ollama_values
from tests import oracle
from tests.checkpoints import LLAMA2_CHAT_TEMPLATE
from tests.mistral_oracle import VERSIONS, mistral_templates

GO_SOURCE = Path(__file__).parent / "ollama_render"
LLAMA3 = ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"])
CHATML = (None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"])
MISTRAL = ("<s>", "</s>", ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[AVAILABLE_TOOLS]"])
# family -> (template, BOS, EOS, other control tokens)
FAMILIES = {
    "llama3.1": (oracle.template("meta-llama-Llama-3.1-8B-Instruct"), *LLAMA3),
    "llama3.2": (oracle.template("meta-llama-Llama-3.2-3B-Instruct"), *LLAMA3),
    "llama3.3": (oracle.template("meta-llama-Llama-3.3-70B-Instruct"), *LLAMA3),
    "qwen2.5": (oracle.template("Qwen-Qwen2.5-7B-Instruct"), *CHATML),
    "qwen3": (oracle.template("Qwen-Qwen3-0.6B"), *CHATML),
    "smollm3": (oracle.template("HuggingFaceTB-SmolLM3-3B"), *CHATML),
    "gemma2": (oracle.template("google-gemma-2-2b-it"), "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "phi3.5": (oracle.template("microsoft-Phi-3.5-mini-instruct"), "<s>", "<|endoftext|>",
               ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
    "mistral-nemo (tekken)": (oracle.template("mistralai-Mistral-Nemo-Instruct-2407"), *MISTRAL),
    "mistral-small-3.2 (v7)": (oracle.template("Mistral-Small-3.2-24B-Instruct-2506"), *MISTRAL),
    "devstral": (oracle.template("unsloth-mistral-Devstral-Small-2507"), *MISTRAL),
    "llama2": (LLAMA2_CHAT_TEMPLATE, "<s>", "</s>", []),
    "mistral v1": (MISTRAL_INSTRUCT_CHAT_TEMPLATE, "<s>", "</s>", ["[INST]", "[/INST]"]),
    "mixtral": (MIXTRAL_INSTRUCT_CHAT_TEMPLATE, "<s>", "</s>", ["[INST]", "[/INST]"]),
    "granite4.1": (oracle.template("ibm-granite-granite-4.1"), None, "<|end_of_text|>",
                   ["<|start_of_role|>", "<|end_of_role|>"]),
    "ministral3": (oracle.template("mistralai-Ministral-3-14B-Reasoning-2512"), *MISTRAL[:2],
                   [*MISTRAL[2], "[TOOL_CALLS]", "[TOOL_RESULTS]", "[ARGS]", "[THINK]"]),
}
STOPS = {"llama3.1": "<|eot_id|>", "qwen2.5": "<|im_end|>", "gemma2": "<end_of_turn>", "phi3.5": "<|end|>",
         "llama2": "</s>", "mistral-nemo (tekken)": "</s>"}
# conversations beyond the ones mt proves its shape on
CONVERSATIONS = [
    [{"role": "user", "content": "Write a haiku about autumn."}],
    [{"role": "system", "content": "You speak like a pirate."}, {"role": "user", "content": "Where is the treasure?"}],
    [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Olá"}, {"role": "assistant", "content": "Oi!"},
     {"role": "user", "content": "日本語で答えて"}],
]


@pytest.fixture(scope="module")
def go_render() -> Path:
    """The Go renderer, built once into the tests' cache (Go from Debian's golang-go: scripts/setup.sh)."""
    go = shutil.which("go")
    if go is None:
        pytest.fail("Go is not installed: run scripts/setup.sh (it installs Debian's golang-go)")
    out = cache_root() / "ollama-render" / "ollama_render"
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([go, "build", "-o", str(out), "."], cwd=GO_SOURCE, check=True, capture_output=True)
    return out


def run_go(binary: Path, template: str, cases: list[dict]) -> dict:
    """{"renderings": [...], "tool_tag": the tag Ollama's tool-call parser would read from the template}"""
    proc = subprocess.run([str(binary)], input=json.dumps({"template": template, "cases": cases}), capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout)


def render_go(binary: Path, template: str, cases: list[dict]) -> list[str]:
    return run_go(binary, template, cases)["renderings"]


def render_jinja(template: str, messages: list[dict], bos: str | None, eos: str, tools: list[dict] | None = None) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    text = render_jinja_template(conversations=[messages], chat_template=template, add_generation_prompt=True,
                                 bos_token=bos or "", eos_token=eos, date_string=FIXED_DATE, tools=tools)[0][0]
    return text[len(bos):] if bos and text.startswith(bos) else text


def vocab_gguf(path: Path, template: str, bos: str | None, eos: str, controls: list[str]) -> Path:
    """A vocabulary-only GGUF: the family's special tokens (control), a few plain ones, the template."""
    specials = [t for t in dict.fromkeys([bos, eos, *controls]) if t]
    tokens = specials + ["Hello", "world", "!"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * 3)
    if bos:
        w.add_bos_token_id(tokens.index(bos))
    w.add_add_bos_token(bos is not None)
    w.add_eos_token_id(tokens.index(eos))
    if "<|eot_id|>" in tokens:
        w.add_eot_token_id(tokens.index("<|eot_id|>"))
    w.add_chat_template(template)
    w.add_license("apache-2.0")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def parse(modelfile: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for m in re.finditer(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER|LICENSE) ("""(.*?)"""|[^\n]*)$', modelfile, re.M | re.S):
        found.setdefault(m[1], []).append(m[3] if m[3] is not None else m[2])
    return found


MISTRAL_CONTROLS = [*MISTRAL[2], "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
REFUSES_SYSTEM = ("gemma2", "mistral v1", "mixtral")  # templates that raise on a system message


def check_chat(template: str, bos: str | None, eos: str, controls: list[str], go_render: Path, tmp_path: Path,
               refuses_system: bool = False) -> dict[str, list[str]]:
    """The Modelfile of a GGUF with `template`: proven, and Go's rendering of its TEMPLATE equals transformers' one on
    CONVERSATIONS. Its parts."""
    model = vocab_gguf(tmp_path / "m.gguf", template, bos, eos, controls)
    made = make_modelfile(model)
    assert made.template_proven, made.notes
    parts = parse(made.text)
    assert parts["FROM"] == ["./m.gguf"]
    go_template, default = parts["TEMPLATE"][0], (parts.get("SYSTEM") or [None])[0]
    cases = [ollama_values(messages, default) for messages in CONVERSATIONS]
    cases = [{"System": c["System"], "Messages": c["Messages"]} for c in cases]
    for messages, got in zip(CONVERSATIONS, render_go(go_render, go_template, cases)):
        if refuses_system and messages[0]["role"] == "system":
            continue  # the jinja template raises: there is nothing to equal
        assert got == render_jinja(template, messages, bos, eos), messages
    return parts


@pytest.mark.parametrize("family", list(FAMILIES))
def test_go_renders_the_template_as_transformers_does(family: str, go_render: Path, tmp_path: Path) -> None:
    template, bos, eos, controls = FAMILIES[family]
    parts = check_chat(template, bos, eos, controls, go_render, tmp_path, family in REFUSES_SYSTEM)
    if family in STOPS:
        assert f'"{STOPS[family]}"' in parts["PARAMETER"][0] or any(STOPS[family] in p for p in parts["PARAMETER"])


@pytest.fixture(scope="module")
def mistral() -> dict[str, str]:
    return mistral_templates()


@pytest.mark.parametrize("version", [f"{v}-{t}" for v in VERSIONS for t in ("spm", "tekken")
                                     if not (t == "spm" and v in ("v11", "v13"))])
def test_mistral_templates_of_every_tokenizer_version(version: str, mistral: dict[str, str], go_render: Path,
                                                       tmp_path: Path) -> None:
    """The templates mistral-common generates (v1 to v13, SentencePiece and Tekken)."""
    parts = check_chat(mistral[version], *MISTRAL[:2], MISTRAL_CONTROLS, go_render, tmp_path)
    assert 'stop "</s>"' in "\n".join(parts["PARAMETER"])


def test_default_system_prompt_becomes_system(tmp_path: Path) -> None:
    template, bos, eos, controls = FAMILIES["qwen2.5"]
    parts = parse(make_modelfile(vocab_gguf(tmp_path / "q.gguf", template, bos, eos, controls)).text)
    assert parts["SYSTEM"] == ["You are Qwen, created by Alibaba Cloud. You are a helpful assistant."]
    assert parts["LICENSE"] == ["apache-2.0"]
    assert 'stop "<|im_end|>"' in "\n".join(parts["PARAMETER"]) and 'stop "<|im_start|>"' in "\n".join(parts["PARAMETER"])


def test_an_unprovable_template_gets_no_template_line(tmp_path: Path) -> None:
    """The system prompt printed after the conversation: no shape fits, so no TEMPLATE, and the reason."""
    template = ("{% for m in messages if m.role != 'system' %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                "{% for m in messages if m.role == 'system' %}[{{ m.content }}]{% endfor %}<assistant>")
    made = make_modelfile(vocab_gguf(tmp_path / "odd.gguf", template, "<s>", "</s>", []))
    assert not made.template_proven and "TEMPLATE" not in made.text
    assert len(made.notes) == 1 and "Ollama's own template detection applies" in made.notes[0]


def test_cli_writes_the_modelfile_and_says_what_it_could_not(tmp_path: Path) -> None:
    template, bos, eos, controls = FAMILIES["llama3.2"]
    model = vocab_gguf(tmp_path / "m.gguf", template, bos, eos, controls)
    result = CliRunner().invoke(main, ["modelfile", str(model), "-o", str(tmp_path / "Modelfile")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./m.gguf\nTEMPLATE \"\"\"")
    bare = vocab_gguf(tmp_path / "bare.gguf", "", bos, eos, controls)
    result = CliRunner().invoke(main, ["modelfile", str(bare)])
    assert result.exit_code == 0 and "mt: note: the GGUF has no chat template" in result.output
    assert "FROM ./bare.gguf" in result.output
    missing = CliRunner().invoke(main, ["modelfile", str(tmp_path / "nope.gguf")])
    assert missing.exit_code == 1 and len(missing.output.strip().splitlines()) == 1


def _tool(name: str, description: str, **properties: dict) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "required": list(properties)[:1], "properties": properties}}}


SEARCH = _tool("search_flights", "Flights between two airports on a day.",
               origin={"type": "string", "description": "IATA code"}, destination={"type": "string"},
               day={"type": "string", "description": "YYYY-MM-DD"})
CONVERT = _tool("convert_currency", "An amount in another currency.", amount={"type": "number"},
                to={"type": "string", "enum": ["EUR", "USD", "JPY"]})
RATE = _tool("exchange_rate", "Today's rate between two currencies.", pair={"type": "string"})


def _calls(*calls: tuple[str, dict]) -> dict:
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}


# (tools, conversation), unlike the ones mt proves its tool shape on; TWO_CALLS has two calls in one message
TOOL_CONVERSATIONS = [
    ([SEARCH, CONVERT, RATE], [{"role": "user", "content": "Flights from LIS to NRT on 2027-03-01?"}]),
    ([SEARCH, CONVERT], [
        {"role": "system", "content": "You book travel.\nAlways confirm."},
        {"role": "user", "content": "Find me a flight LIS→NRT."},
        _calls(("search_flights", {"origin": "LIS", "destination": "NRT", "day": "2027-03-01"})),
        {"role": "tool", "content": '[{"flight": "TP 123", "price": 812.5}]'},
        {"role": "assistant", "content": "TP 123 costs 812.50 EUR."},
        {"role": "user", "content": "In yen?"},
        _calls(("convert_currency", {"amount": 812.5, "to": "JPY"})),
        {"role": "tool", "content": "He said \"about 130000\"\nand left."}]),
    ([RATE, CONVERT], [
        {"role": "user", "content": "Rate, then 10 EUR in USD."},
        _calls(("exchange_rate", {"pair": "EURUSD"})), {"role": "tool", "content": "1.08"},
        _calls(("convert_currency", {"amount": 10, "to": "USD"})), {"role": "tool", "content": "10.80"},
        {"role": "assistant", "content": "10 EUR is 10.80 USD."}, {"role": "user", "content": "Merci"}]),
]
TWO_CALLS = ([RATE, CONVERT], [
    {"role": "user", "content": "Both at once."},
    _calls(("exchange_rate", {"pair": "EURJPY"}), ("convert_currency", {"amount": 3, "to": "EUR"})),
    {"role": "tool", "content": "161.2"}, {"role": "tool", "content": "3.00"}])
# family -> the tag Ollama's tool-call parser reads from the TEMPLATE ("" makes it look for JSON)
TOOL_FAMILIES = {"llama3.1": "", "llama3.2": "", "llama3.3": "", "qwen2.5": "<tool_call>\n", "qwen3": "<tool_call>\n",
                 "devstral": "[TOOL_CALLS]", "granite4.1": "<tool_call>\n", "ministral3": "[TOOL_CALLS]"}


def canonical_json(text: str) -> str:
    """`text` with every JSON value in it (an object, array or string) written one way: keys sorted, compact."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i] in '{["':
            try:
                value, end = decoder.raw_decode(text, i)
            except ValueError:
                pass
            else:
                out.append(json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")))
                i = end
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


def _ollama_case(values: dict, tools: list[dict]) -> dict:
    return {"System": values["System"], "Messages": values["Messages"], "Tools": tools}


def check_tools(template: str, bos: str | None, eos: str, controls: list[str], go_render: Path, tmp_path: Path,
                one_call: bool) -> str:
    """Tool definitions, calls and results through Go's text/template equal transformers' rendering with `tools`,
    JSON compared as values (Ollama prints it with Go's encoder). The tag Ollama's tool-call parser reads."""
    made = make_modelfile(vocab_gguf(tmp_path / "m.gguf", template, bos, eos, controls))
    assert made.template_proven and made.tools, made.notes
    parts = parse(made.text)
    go_template, default = parts["TEMPLATE"][0], (parts.get("SYSTEM") or [None])[0]
    cases = TOOL_CONVERSATIONS + ([] if one_call else [TWO_CALLS])
    out = run_go(go_render, go_template, [_ollama_case(ollama_values(m, default), t) for t, m in cases])
    for (tools, messages), got in zip(cases, out["renderings"]):
        want = render_jinja(template, messages, bos, eos, tools)
        assert canonical_json(got) == canonical_json(want), messages[-1]
    return out["tool_tag"]


@pytest.mark.parametrize("family", list(TOOL_FAMILIES))
def test_tool_use_renders_as_transformers_does(family: str, go_render: Path, tmp_path: Path) -> None:
    tag = check_tools(*FAMILIES[family], go_render, tmp_path, one_call=family.startswith("llama"))  # Llama 3: one
    assert tag == TOOL_FAMILIES[family]


def test_tool_use_of_mistral_v13(mistral: dict[str, str], go_render: Path, tmp_path: Path) -> None:
    tag = check_tools(mistral["v13-tekken"], *MISTRAL[:2], MISTRAL_CONTROLS, go_render, tmp_path, one_call=False)
    assert tag == "[TOOL_CALLS]"


def test_a_tool_template_it_cannot_write_keeps_the_chat(go_render: Path, tmp_path: Path) -> None:
    """Mistral Small 3.2's template demands tool call ids Ollama's values do not carry: the chat TEMPLATE stays,
    without tools, and the reason is one note."""
    template, bos, eos, controls = FAMILIES["mistral-small-3.2 (v7)"]
    made = make_modelfile(vocab_gguf(tmp_path / "m.gguf", template, bos, eos, controls))
    assert made.template_proven and not made.tools
    assert len(made.notes) == 1 and made.notes[0].startswith("the TEMPLATE leaves tools out: ")
    assert ".Tools" not in parse(made.text)["TEMPLATE"][0]
    gemma = make_modelfile(vocab_gguf(tmp_path / "g.gguf", *FAMILIES["gemma2"]))
    assert not gemma.tools and gemma.notes == []  # Gemma 2's template takes no tools: nothing to say
