"""llama.cpp's own converter and vocab test data, taken from the llama-cpp-python sdist."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mt.cache import cache_root

LLAMA_CPP_PYTHON_VERSION = "0.3.36"

_SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
_CACHE_NAME = f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"
_VENDOR = "vendor/llama.cpp"
_WANTED_PREFIXES = (
    f"{_VENDOR}/conversion/",
    f"{_VENDOR}/gguf-py/",
    f"{_VENDOR}/models/ggml-vocab-",
    f"{_VENDOR}/models/templates/",
)
_WANTED_FILES = (f"{_VENDOR}/convert_hf_to_gguf.py", f"{_VENDOR}/convert_lora_to_gguf.py")
_VOCAB_TEST_SEP = "\n__ggml_vocab_test__\n"


def sdist_dir() -> Path:
    """The sdist's vendor/llama.cpp folder, downloaded and extracted on first use."""
    root = cache_root()
    target = root / _CACHE_NAME
    vendored = target / _VENDOR
    if not (vendored / "convert_hf_to_gguf.py").is_file():
        root.mkdir(parents=True, exist_ok=True)
        _populate(root, target)
    return vendored


def _populate(root: Path, target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=root, prefix=".tmp-sdist-") as tmp:
        work = Path(tmp)
        tarball = _fetch_tarball(work)
        _extract_wanted(tarball, work / "x")
        try:
            os.rename(work / "x" / _SDIST_NAME, target)
        except OSError:
            if not (target / _VENDOR / "convert_hf_to_gguf.py").is_file():
                raise


def _fetch_tarball(work: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(work),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download failed:\n{proc.stdout}\n{proc.stderr}")
    return work / f"{_SDIST_NAME}.tar.gz"


def _is_wanted(name: str) -> bool:
    prefix = f"{_SDIST_NAME}/"
    if not name.startswith(prefix):
        return False
    rel = name[len(prefix):]
    return rel in _WANTED_FILES or rel.startswith(_WANTED_PREFIXES)


def _extract_wanted(tarball: Path, dest: Path) -> None:
    with tarfile.open(tarball, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and _is_wanted(m.name)]
        tar.extractall(dest, members=members, filter="data")


def _converter_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_LOCAL_GGUF", "PYTHONPATH")}
    env["PYTHONNOUSERSITE"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_converter(src: Path, out: Path, outtype: str, extra_args: Sequence[str] = ()) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py (with its vendored gguf-py) on an HF folder."""
    cwd = sdist_dir()
    cmd = [
        sys.executable, str(cwd / "convert_hf_to_gguf.py"), str(Path(src).resolve()),
        "--outfile", str(Path(out).resolve()), "--outtype", outtype, *extra_args,
    ]
    proc = subprocess.run(cmd, cwd=cwd, env=_converter_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"convert_hf_to_gguf.py failed (rc={proc.returncode}): {' '.join(cmd)}\n{proc.stderr}"
        )


def lora_converter() -> Path:
    """convert_lora_to_gguf.py; a cache made before it was wanted gets it from the sdist now."""
    path = sdist_dir() / "convert_lora_to_gguf.py"
    if not path.is_file():
        with tempfile.TemporaryDirectory(dir=cache_root(), prefix=".tmp-sdist-") as tmp:
            work = Path(tmp)
            _extract_wanted(_fetch_tarball(work), work / "x")
            os.replace(work / "x" / _SDIST_NAME / _VENDOR / path.name, path)
    return path


def run_lora_converter(adapter: Path, base: Path, out: Path, outtype: str) -> None:
    """Run llama.cpp's convert_lora_to_gguf.py on a PEFT adapter folder, with the base's config from `base`."""
    script = lora_converter()
    cmd = [
        sys.executable, str(script), str(Path(adapter).resolve()), "--base", str(Path(base).resolve()),
        "--outfile", str(Path(out).resolve()), "--outtype", outtype,
    ]
    proc = subprocess.run(cmd, cwd=script.parent, env=_converter_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_lora_to_gguf.py failed (rc={proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")


def vocab_gguf(name: str) -> Path:
    path = sdist_dir() / "models" / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def vocab_vectors(name: str) -> list[tuple[str, list[int]]]:
    """(text, expected ids without special tokens) pairs from ggml-vocab-NAME.gguf.inp/.out."""
    base = vocab_gguf(name)
    raw = Path(f"{base}.inp").read_bytes().decode("utf-8")
    texts = _split_inputs(raw)
    lines = Path(f"{base}.out").read_bytes().decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(texts) != len(lines):
        raise ValueError(f"{name}: {len(texts)} inputs but {len(lines)} outputs")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


def _split_inputs(raw: str) -> list[str]:
    texts: list[str] = []
    pos = 0
    while pos < len(raw):
        nxt = raw.find(_VOCAB_TEST_SEP, pos)
        if nxt < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(_VOCAB_TEST_SEP)
    return texts


def template(name: str) -> str:
    path = sdist_dir() / "models" / "templates" / f"{name}.jinja"
    return path.read_bytes().decode("utf-8")
