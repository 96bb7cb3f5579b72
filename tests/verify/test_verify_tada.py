"""mt verify on Hume's TADA: the backbone as any Llama, plus the acoustic file beside it; the codec decoder on its own
(its metadata and every tensor: it is not a language model llama.cpp runs)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mt.convert.convert import convert
from mt.verify.verify import Verifier, VerifyOptions
from tests.verify import corrupt
from tests.verify.reports import check, failed

FAST = VerifyOptions(max_tokens=96, n_ctx=128)


@pytest.fixture(scope="module")
def tada_files(tada_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tada") / "tada.gguf"
    convert(tada_dir, out, "q4_k_m")
    return out


@pytest.fixture(scope="module")
def tada_verifier(tada_dir: Path):
    with Verifier(tada_dir, FAST) as verifier:
        yield verifier


def copy_pair(backbone: Path, folder: Path) -> Path:
    folder.mkdir()
    for f in (backbone, backbone.with_name("tada-acoustic.gguf")):
        shutil.copy(f, folder / f.name)
    return folder / backbone.name


def test_backbone_and_acoustic_file_pass(tada_verifier, tada_files: Path) -> None:
    report = tada_verifier.verify(tada_files)
    assert report.passed, report.to_text()
    acoustic = check(report, "acoustic file")
    assert "tada-acoustic.gguf" in acoustic.summary and "byte-identical" in acoustic.summary


@pytest.mark.parametrize("edit, needle", [
    (dict(kv={"tada.shift_acoustic": 4}), "tada.shift_acoustic"),
    (dict(tensors=corrupt.scale_tensor("prediction_head.cond_proj.weight", 1.01)), "prediction_head.cond_proj.weight"),
    (dict(tensors=corrupt.drop_tensor("time_end_embed.weight")), "time_end_embed.weight is missing"),
])
def test_a_changed_acoustic_file_fails(tada_verifier, tada_files: Path, tmp_path: Path, edit: dict, needle: str) -> None:
    backbone = copy_pair(tada_files, tmp_path / "pair")
    acoustic = backbone.with_name("tada-acoustic.gguf")
    corrupt.rewrite(tada_files.with_name("tada-acoustic.gguf"), acoustic, **edit)
    report = tada_verifier.verify(backbone)
    assert failed(report) == {"acoustic file"}, report.to_text()
    assert any(needle in p for p in check(report, "acoustic file").problems), check(report, "acoustic file").problems


def test_a_missing_acoustic_file_fails(tada_verifier, tada_files: Path, tmp_path: Path) -> None:
    alone = tmp_path / "tada.gguf"
    shutil.copy(tada_files, alone)
    report = tada_verifier.verify(alone)
    assert failed(report) == {"acoustic file"}
    assert "tada-acoustic.gguf is missing beside tada.gguf" in check(report, "acoustic file").summary


def test_codec_decoder_is_checked_exactly(tada_codec_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tada-codec.gguf"
    convert(tada_codec_dir, out, "f16")
    with Verifier(tada_codec_dir, FAST) as verifier:
        report = verifier.verify(out)
        assert report.passed and [c.name for c in report.checks] == ["metadata", "tensors"], report.to_text()
        bad = corrupt.rewrite(out, tmp_path / "bad.gguf",
                              tensors=corrupt.scale_tensor("wav_decoder.model.0.weight", 1.01))
        report = verifier.verify(bad)
        assert failed(report) == {"tensors"} and "wav_decoder.model.0.weight" in check(report, "tensors").summary
