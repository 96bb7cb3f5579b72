"""Hub repositories where a folder is expected (ORG/NAME[@REVISION]), read from a standard huggingface_hub cache laid
out by the test, offline (HF_HUB_OFFLINE=1, HF_HOME pointing at it), through the command line in a process of its own
so huggingface_hub reads the environment as a user's shell gives it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mt.convert.convert import convert
from mt.io.hub import hub_source
from tests.io.test_hf_cache import as_cache_snapshot

REVISION = "1" * 40


@pytest.fixture(scope="module")
def hf_home(llama3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("hf_home")
    as_cache_snapshot(llama3_dir, home / "hub", "acme/tiny-llama", REVISION)
    return home


def mt(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "mt", *args], env=env, capture_output=True, text=True)


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mt: error: "), proc.stderr
    return lines[0]


def test_ids_and_paths() -> None:
    assert hub_source("acme/tiny-llama").repo == "acme/tiny-llama"
    assert hub_source("acme/tiny-llama@v1.0").revision == "v1.0"
    assert hub_source("just-a-name") is None and hub_source("a/b/c") is None and hub_source(".") is None


@pytest.mark.parametrize("spec", ["acme/tiny-llama", f"acme/tiny-llama@{REVISION}", "acme/tiny-llama@main"])
def test_convert_reads_the_cached_repository(spec: str, hf_home: Path, llama3_dir: Path, tmp_path: Path) -> None:
    proc = mt(["convert", spec, "-o", str(tmp_path / "hub.gguf"), "--outtype", "q8_0", "--quiet"], hf_home)
    assert proc.returncode == 0, proc.stderr
    plain = Path(shutil.copytree(llama3_dir, tmp_path / "tiny-llama"))  # general.name comes from the repository name
    convert(plain, tmp_path / "plain.gguf", "q8_0")
    assert (tmp_path / "hub.gguf").read_bytes() == (tmp_path / "plain.gguf").read_bytes()


def test_release_names_its_files_after_the_repository(hf_home: Path, tmp_path: Path) -> None:
    proc = mt(["release", "acme/tiny-llama", "-o", str(tmp_path / "dist"), "--quants", "q8_0", "--no-verify", "--quiet"],
              hf_home)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "dist" / "tiny-llama-Q8_0.gguf").is_file()


@pytest.mark.parametrize("spec, words", [
    ("acme/tiny-llama@v9", ("acme/tiny-llama@v9 is not in the Hugging Face cache", "pass a local folder")),
    ("acme/absent", ("acme/absent is not in the Hugging Face cache",)),
])
def test_what_the_cache_lacks_is_one_line(spec: str, words: tuple[str, ...], hf_home: Path, tmp_path: Path) -> None:
    line = one_line(mt(["convert", spec, "-o", str(tmp_path / "x.gguf")], hf_home))
    assert all(w in line for w in words), line
    assert not (tmp_path / "x.gguf").exists()


def test_a_local_folder_of_that_name_wins(hf_home: Path, llama3_dir: Path, tmp_path: Path) -> None:
    local = tmp_path / "acme" / "tiny-llama"
    shutil.copytree(llama3_dir, local)
    env_cwd = tmp_path
    proc = subprocess.run([sys.executable, "-m", "mt", "convert", "acme/tiny-llama", "-o", "x.gguf", "--quiet"],
                          cwd=env_cwd, env={**os.environ, "HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1",
                                            "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
