"""`mt release --push` and Hub sources against a local stand-in for the Hub (tests/release/fake_hub.py): the real
huggingface_hub client, in mt's command line run as its own process with HF_ENDPOINT pointing at it. Xet is turned
off (HF_HUB_DISABLE_XET) so the client speaks the LFS protocol the stand-in answers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.release.fake_hub import ABSENT, GATED, FakeHub

ROOT = Path(__file__).resolve().parents[2]


def mt(args: list[str], hub: FakeHub, home: Path, token: str | None = "hf_test") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(ROOT)}
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE"):
        env.pop(key, None)
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "mt", *args], env=env, capture_output=True, text=True, cwd=ROOT)


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mt: error: "), proc.stderr
    return lines[0]


def short_text(tmp_path: Path) -> list[str]:
    """verify's logits on one short text: what is pushed, not how close it is, is checked here."""
    (tmp_path / "verify.txt").write_text("The quick brown fox jumps over the lazy dog. " * 4, encoding="utf-8")
    return ["--verify-text", str(tmp_path / "verify.txt")]


def test_push_uploads_exactly_the_release(llama3_dir: Path, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    with FakeHub() as hub:
        proc = mt(["release", str(llama3_dir), "-o", str(dist), "--quants", "q8_0", "--push", "acme/tiny-GGUF",
                   "--private", "--revision", "v1", "--quiet", *short_text(tmp_path)], hub, tmp_path / "home")
        assert proc.returncode == 0, proc.stderr
        state = hub.state
    assert state.repos["acme/tiny-GGUF"] == {"private": True, "branches": {"main", "v1"}}
    assert len(state.commits) == 1 and state.commits[0]["revision"] == "v1"
    uploaded = state.commits[0]["files"]
    assert sorted(uploaded) == sorted(p.name for p in dist.iterdir())
    assert {name for name in uploaded} >= {"README.md", "manifest.json", f"{llama3_dir.name}-Q8_0.gguf",
                                            f"{llama3_dir.name}-Q8_0.Modelfile"}
    for name, data in uploaded.items():
        assert data == (dist / name).read_bytes(), name


def test_no_token_stops_before_any_work(llama3_dir: Path, tmp_path: Path) -> None:
    with FakeHub() as hub:
        line = one_line(mt(["release", str(llama3_dir), "-o", str(tmp_path / "dist"), "--quants", "q8_0", "--push",
                            "acme/tiny-GGUF"], hub, tmp_path / "home", token=None))
        assert hub.state.calls == []
    assert "--push needs a Hugging Face token" in line and "HF_TOKEN" in line
    assert not (tmp_path / "dist").exists()


def test_a_failed_verify_uploads_nothing(llama3_dir: Path, tmp_path: Path) -> None:
    with FakeHub() as hub:
        proc = mt(["release", str(llama3_dir), "-o", str(tmp_path / "dist"), "--quants", "q4_k_m", "--max-kld", "1e-9",
                   "--push", "acme/tiny-GGUF", *short_text(tmp_path)], hub, tmp_path / "home")
        assert proc.returncode == 1, proc.stderr
        assert hub.state.calls == [] and hub.state.commits == []
    assert not (tmp_path / "dist").exists()


def test_push_goes_with_verify(llama3_dir: Path, tmp_path: Path) -> None:
    with FakeHub() as hub:
        proc = mt(["release", str(llama3_dir), "-o", str(tmp_path / "dist"), "--quants", "q8_0", "--no-verify",
                   "--push", "acme/x"], hub, tmp_path / "home")
    assert proc.returncode == 2 and "drop --no-verify" in proc.stderr


@pytest.mark.parametrize("repo, words", [(GATED, ("is gated", "HF_TOKEN")), (ABSENT, ("no repository acme/absent",))])
def test_gated_and_absent_sources_are_one_line(repo: str, words: tuple[str, ...], tmp_path: Path) -> None:
    with FakeHub() as hub:
        line = one_line(mt(["convert", repo, "-o", str(tmp_path / "x.gguf")], hub, tmp_path / "home"))
    assert all(w in line for w in words), line
    assert not (tmp_path / "x.gguf").exists()
