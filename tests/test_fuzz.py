"""A seeded mutation fuzzer over what mt reads: the safetensors header, the shard index, config.json, the tokenizer
files and GGUF headers. Each case ends in exit 0 with a file llama.cpp loads, or exit 1 with one line and nothing left
behind; never a traceback, an "internal error", a hang or a stray file."""

from __future__ import annotations

import json
import random
import shutil
import signal
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from mt.cli import main
from mt.demo import build_tiny_llama

SEED = 20261205
CASE_SECONDS = 20
ODD_VALUES = [None, 0, -1, 1, 2, 7, 10**9, 2**63, 0.5, float("nan"), "", "64", [], {}, [1, 2], True]


@pytest.fixture(scope="module")
def seed_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("fuzz") / "tiny")


@pytest.fixture(scope="module")
def seed_gguf(seed_model, tmp_path_factory) -> Path:
    from mt.convert.convert import convert

    out = tmp_path_factory.mktemp("fuzz-gguf") / "m.gguf"
    convert(seed_model, out, "f16")
    return out


def flip_bytes(data: bytes, start: int, stop: int, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(start, stop)
        out[at] = rng.choice([0, 0xFF, ord("0"), ord("9"), ord('"'), ord("{"), ord(","), rng.randrange(256)])
    return bytes(out)


def mutate_safetensors(folder: Path, rng: random.Random) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    if rng.random() < 0.2:
        path.write_bytes(data[: rng.randrange(len(data))])  # truncated
    elif rng.random() < 0.2:
        path.write_bytes(struct.pack("<Q", rng.choice([0, 1, n + 8, 2**40])) + data[8:])
    else:
        path.write_bytes(flip_bytes(data, 8, 8 + n, rng))


def mutate_config(folder: Path, rng: random.Random) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for _ in range(rng.randint(1, 2)):
        key = rng.choice(sorted(config) + ["head_dim", "rope_scaling", "tie_word_embeddings"])
        value = rng.choice(ODD_VALUES)
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def mutate_tokenizer(folder: Path, rng: random.Random) -> None:
    name = rng.choice(["tokenizer.json", "tokenizer_config.json"])
    path = folder / name
    data = path.read_bytes()
    if rng.random() < 0.3:
        path.write_bytes(data[: rng.randrange(len(data))])
    elif rng.random() < 0.3 and name == "tokenizer_config.json":
        config = json.loads(data)
        config[rng.choice(["bos_token", "eos_token", "chat_template", "add_bos_token"])] = rng.choice(ODD_VALUES[1:])
        path.write_text(json.dumps(config))
    else:
        path.write_bytes(flip_bytes(data, 0, len(data), rng))


def mutate_index(folder: Path, rng: random.Random) -> None:
    from mt.io.safetensors import read_header

    refs, _ = read_header(folder / "model.safetensors")
    weight_map = {name: "model.safetensors" for name in refs}
    victim = rng.choice(sorted(weight_map))
    weight_map[victim] = rng.choice([None, "", "../model.safetensors", "/etc/passwd", "other.safetensors", 3, []])
    index = {"weight_map": weight_map} if rng.random() < 0.8 else rng.choice([[], {"weight_map": []}, {}])
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


FOLDER_MUTATIONS: dict[str, tuple[Callable[[Path, random.Random], None], int]] = {
    "safetensors header": (mutate_safetensors, 70),
    "config.json": (mutate_config, 70),
    "tokenizer": (mutate_tokenizer, 40),
    "index": (mutate_index, 20),
}


class _Hang(BaseException):
    pass


def run_case(args: list[str]) -> tuple[int, str]:
    def expire(signum, frame):
        raise _Hang

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(CASE_SECONDS)
    try:
        result = CliRunner().invoke(main, args, catch_exceptions=True)
    except _Hang:
        pytest.fail(f"hung: mt {' '.join(args)}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        pytest.fail(f"traceback from mt {' '.join(args)}: {result.exception!r}")
    return result.exit_code, result.output


def judge(code: int, output: str, out: Path, work: Path, outcomes: Counter, label: str) -> None:
    assert "internal error" not in output and "Traceback" not in output, f"{label}: {output}"
    stray = [p.name for p in work.iterdir() if "mt-partial" in p.name or p.name.endswith(".header")]
    assert not stray, f"{label}: left {stray}"
    if code == 0:
        if out.suffix == ".gguf":
            assert_llama_cpp_loads(out, label)
        outcomes[label, "written"] += 1
    else:
        lines = [line for line in output.splitlines() if line.strip()]
        assert code == 1 and len(lines) == 1 and lines[0].startswith("mt: error: "), f"{label}: exit {code}: {output}"
        assert not out.exists(), f"{label}: failed but left {out.name}"
        outcomes[label, "refused"] += 1


LOAD = """
import sys, llama_cpp
llama_cpp.llama_backend_init()
model = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), llama_cpp.llama_model_default_params())
sys.exit(0 if model else 3)
"""


def assert_llama_cpp_loads(path: Path, label: str) -> None:
    """llama.cpp's own loader takes the file, in a process of its own (llama.cpp aborts on some files it refuses;
    its C API is used, as llama-cpp-python's Llama would also parse the chat template with jinja in Python, and a
    template the mutation broke is copied as the source has it, as llama.cpp's converter copies it)."""
    proc = subprocess.run([sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        reason = next((line for line in proc.stderr.splitlines() if "error" in line.lower() or "assert" in line.lower()),
                      f"exit {proc.returncode}")
        pytest.fail(f"{label}: exit 0 but llama.cpp cannot load {path.name}: {reason}")


def test_fuzzed_checkpoints(seed_model, tmp_path):
    rng = random.Random(SEED)
    outcomes: Counter = Counter()
    for label, (mutate, count) in FOLDER_MUTATIONS.items():
        for i in range(count):
            work = tmp_path / f"{label.split()[0]}-{i}"
            work.mkdir()
            src = Path(shutil.copytree(seed_model, work / "src"))
            mutate(src, rng)
            out = work / "o.gguf"
            code, output = run_case(["convert", str(src), "-o", str(out), "--outtype", rng.choice(["f16", "q8_0", "q4_k_m"]),
                                     "--quiet"])
            judge(code, output, out, work, outcomes, label)
            shutil.rmtree(work)
    print("\nfuzzed checkpoints:", dict(sorted(outcomes.items())))
    assert sum(outcomes.values()) == sum(count for _, count in FOLDER_MUTATIONS.values())


def test_fuzzed_gguf_headers(seed_gguf, tmp_path):
    from mt.io.gguf_in import read_header

    rng = random.Random(SEED + 1)
    header_end = min(t.offset for t in read_header(seed_gguf).tensors)
    data = seed_gguf.read_bytes()
    outcomes: Counter = Counter()
    for i in range(80):
        work = tmp_path / f"gguf-{i}"
        work.mkdir()
        bad = work / "in.gguf"
        bad.write_bytes(data[: rng.randrange(len(data))] if rng.random() < 0.15 else flip_bytes(data, 0, header_end, rng))
        out = work / "q.gguf"
        code, output = run_case(["quantize", str(bad), str(out), rng.choice(["q8_0", "q4_k_m"])])
        judge(code, output, out, work, outcomes, "gguf header (quantize)")
        code, output = run_case(["inspect", str(bad)])
        if code != 0:
            judge(code, output, work / "none.gguf", work, outcomes, "gguf header (inspect)")
        shutil.rmtree(work)
    print("\nfuzzed GGUF headers:", dict(sorted(outcomes.items())))
