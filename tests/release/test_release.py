"""mt release: every type from one read of the source, each file the one mt convert writes, verified, atomic."""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from mt.cli import main
from mt.convert.convert import convert
from mt.io import gguf_out
from mt.release.release import file_name, release
from mt.verify.verify import VerifyOptions

TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q5_1", "q4_k_m", "q5_k_s", "q6_k", "q3_k_m", "q2_k"]


def no_stray_files(dist: Path) -> bool:
    return not dist.exists() and not [p for p in dist.parent.iterdir() if "mt-partial" in p.name]


# every type on the source whose rows need the fallbacks; the types that differ in kind on the 128k-token one
TYPES_BY_FIXTURE = {"llama2_odd_rows_f16_dir": TYPES, "llama3_dir": ["bf16", "q8_0", "q4_k_m", "q2_k"]}


@pytest.mark.parametrize("fixture", ["llama3_dir", "llama2_odd_rows_f16_dir"])
def test_every_file_is_the_file_mt_convert_writes(fixture, request, tmp_path):
    src, types = request.getfixturevalue(fixture), TYPES_BY_FIXTURE[fixture]
    result = release(src, tmp_path / "dist", types, name="tiny", verify=None)
    assert [f.path.name for f in result.files] == [f"tiny-{t.upper()}.gguf" for t in types]
    modelfiles = [f"tiny-{t.upper()}.Modelfile" for t in types]
    assert [f.modelfile for f in result.files] == modelfiles
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == sorted(
        [*(f.path.name for f in result.files), *modelfiles, "README.md", "manifest.json"])
    for outtype, f in zip(types, result.files):
        convert(src, tmp_path / "one.gguf", outtype, force=True)
        assert f.path.read_bytes() == (tmp_path / "one.gguf").read_bytes(), outtype


def test_adapter_merged_once_for_every_type(built: Callable[[str], Path], llama3_f32_untied_dir, tmp_path):
    adapter = built("dora")
    result = release(llama3_f32_untied_dir, tmp_path / "dist", ["f16", "q4_k_m"], adapter=adapter, verify=None)
    for f in result.files:
        convert(llama3_f32_untied_dir, tmp_path / "one.gguf", f.outtype, adapter=adapter, force=True)
        assert f.path.read_bytes() == (tmp_path / "one.gguf").read_bytes(), f.outtype


def test_verified_release_reports_each_file(verified_release):
    summary = verified_release.summary
    assert [f["file"] for f in summary["files"]] == ["tiny-chat-F16.gguf", "tiny-chat-Q4_K_M.gguf"]
    for f in summary["files"]:
        assert f["verify"]["passed"] is True
        assert f["bytes"] == (verified_release.dist / f["file"]).stat().st_size
    f16, q4 = (f["verify"]["quality"]["kld_mean"] for f in summary["files"])
    assert 0 <= f16 < q4  # a 4-bit file moves further from the source than the 16-bit one


def test_a_file_failing_verify_releases_nothing(llama3_dir, tmp_path):
    dist = tmp_path / "dist"
    out = CliRunner().invoke(main, ["release", str(llama3_dir), "-o", str(dist), "--quants", "q8_0,q4_k_m",
                                    "--name", "tiny", "--max-kld", "1e-12"])
    assert out.exit_code == 1
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "tiny-Q8_0.gguf failed mt verify: quality" in lines[0], out.output
    assert no_stray_files(dist)


@pytest.mark.parametrize("quants, needle", [("q8_0,q3_zz", "unknown type 'q3_zz'"), ("q8_0,f16,q8_0", "q8_0 twice"),
                                            (",", "names no type")])
def test_bad_quant_lists(llama3_dir, tmp_path, quants, needle):
    out = CliRunner().invoke(main, ["release", str(llama3_dir), "-o", str(tmp_path / "dist"), "--quants", quants])
    assert out.exit_code == 1 and needle in out.output and len(out.output.strip().splitlines()) == 1, out.output
    assert no_stray_files(tmp_path / "dist")


def test_existing_dist_needs_force(llama3_dir, tmp_path):
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "keep.txt").write_text("x")
    args = ["release", str(llama3_dir), "-o", str(dist), "--quants", "q8_0", "--no-verify", "--quiet"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 1 and "--force" in out.output
    assert (dist / "keep.txt").exists()
    assert CliRunner().invoke(main, [*args, "--force"]).exit_code == 0
    assert sorted(p.name for p in dist.iterdir()) == sorted([file_name(llama3_dir.name, "q8_0"), "README.md", "manifest.json",
                                                            f"{llama3_dir.name}-Q8_0.Modelfile"])


def test_a_family_with_companion_files_is_refused(tada_dir, tmp_path):
    out = CliRunner().invoke(main, ["release", str(tada_dir), "-o", str(tmp_path / "dist"), "--quants", "f16"])
    assert out.exit_code == 1 and "mt convert" in out.output
    assert no_stray_files(tmp_path / "dist")


@pytest.mark.parametrize("exc, needle", [(KeyboardInterrupt(), "interrupted"), (OSError(errno.ENOSPC, "No space left"), "disk full")])
def test_interrupt_or_full_disk_mid_release_leaves_nothing(llama3_dir, tmp_path, monkeypatch, exc, needle):
    calls = {"n": 0}
    original = gguf_out.PlacedTensors.write

    def failing(self, name, chunk):
        calls["n"] += 1
        if calls["n"] == 7:
            raise exc
        return original(self, name, chunk)

    monkeypatch.setattr(gguf_out.PlacedTensors, "write", failing)
    dist = tmp_path / "dist"
    out = CliRunner().invoke(main, ["release", str(llama3_dir), "-o", str(dist), "--quants", "f16,q4_k_m", "--no-verify"])
    assert out.exit_code != 0 and needle in out.output
    assert no_stray_files(dist)


def test_verify_options_reach_every_file(llama3_dir, tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 8
    result = release(llama3_dir, tmp_path / "dist", ["q8_0"], verify=VerifyOptions(text=text, max_tokens=32))
    (report,) = [f.report for f in result.files]
    assert report is not None and report.passed and report.gguf == str(tmp_path / "dist" / result.files[0].path.name)


def test_manifest_names_each_file_with_its_hash_verdict_and_memory(verified_release, llama3_dir):
    dist = verified_release.dist
    listing = json.loads((dist / "manifest.json").read_text())
    assert listing["schema"] == "mt-release-manifest" and listing["version"] == 1
    assert listing["architecture"] == "llama" and listing["context_length"] == json.loads(
        (llama3_dir / "config.json").read_text())["max_position_embeddings"]
    summary = verified_release.summary
    for entry, printed in zip(listing["files"], summary["files"]):
        path = dist / entry["file"]
        assert entry["sha256"] == printed["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["bytes"] == path.stat().st_size and entry["verify"]["passed"] is True
        modelfile = (dist / entry["modelfile"]).read_text()
        assert modelfile.startswith(f"FROM ./{entry['file']}\nTEMPLATE") and 'PARAMETER stop "<|eot_id|>"' in modelfile
        tensors = GGUFReader(path).tensors
        assert {row["weights_bytes"] for row in entry["memory"]} == {sum(int(t.n_bytes) for t in tensors)}
        assert max(row["n_ctx"] for row in entry["memory"]) == listing["context_length"]
        assert {row["kv_cache_type"] for row in entry["memory"]} == {"f16"}  # 16-wide heads: no q8_0 cache
        from_disk = json.loads(CliRunner().invoke(main, ["inspect", str(path), "--memory", "--json"]).output)["memory"]
        assert [[r["n_ctx"], r["cache_type"], r["weights"], r["kv_cache"]] for r in from_disk] == [
            [r["n_ctx"], r["kv_cache_type"], r["weights_bytes"], r["kv_cache_bytes"]] for r in entry["memory"]]


def test_cuda_asked_for_without_one_is_one_line(llama3_dir, tmp_path, monkeypatch):
    from mt.quant import device

    monkeypatch.setattr(device, "cuda_unusable_reason", lambda probe_nodes=True: "torch 2.13.0+cpu sees no CUDA device")
    out = CliRunner().invoke(main, ["release", str(llama3_dir), "-o", str(tmp_path / "dist"), "--quants", "q8_0",
                                    "--device", "cuda", "--no-verify"])
    assert out.exit_code == 1 and "--device cuda" in out.output and len(out.output.strip().splitlines()) == 1
    assert no_stray_files(tmp_path / "dist")


def test_imatrix_weighs_the_mixes_and_verify_checks_them(llama2_256_dir, tmp_path):
    """With --imatrix each mix is the file mt convert --imatrix writes (itself llama_model_quantize's, in
    tests/convert/test_convert_imatrix.py); the converter's types take none; verify, given it, checks every tensor."""
    from tests.imatrix_files import write_gguf
    from tests.quant.test_quantize_imatrix import model_imatrix

    convert(llama2_256_dir, tmp_path / "f32.gguf", "f32")
    imatrix = write_gguf(model_imatrix(tmp_path / "f32.gguf", complete=True), tmp_path / "imatrix.gguf")
    out = CliRunner().invoke(main, ["release", str(llama2_256_dir), "-o", str(tmp_path / "dist"), "--name", "m",
                                    "--quants", "q8_0,q4_k_m,q5_k_s,q2_k_s,iq3_xxs", "--imatrix", str(imatrix), "--json"])
    assert out.exit_code == 0, out.output
    assert all(f["verify"]["passed"] for f in json.loads(out.output.strip().splitlines()[-1])["files"])
    for outtype in ("q8_0", "q4_k_m", "q5_k_s", "q2_k_s", "iq3_xxs"):
        weighed = {"imatrix": str(imatrix)} if outtype != "q8_0" else {}
        convert(llama2_256_dir, tmp_path / "one.gguf", outtype, force=True, **weighed)
        assert (tmp_path / "dist" / file_name("m", outtype)).read_bytes() == (tmp_path / "one.gguf").read_bytes(), outtype
    convert(llama2_256_dir, tmp_path / "plain.gguf", "q4_k_m")
    assert (tmp_path / "plain.gguf").read_bytes() != (tmp_path / "dist" / file_name("m", "q4_k_m")).read_bytes()


@pytest.mark.parametrize("quant", ["q2_k_s", "iq2_xs"])
def test_a_type_needing_an_imatrix_without_one_is_one_line(llama2_256_dir, tmp_path, quant):
    """(On rows of 64 every Q2_K tensor falls back to Q4_0 and nothing needs the imatrix, as in llama.cpp.)"""
    dist = tmp_path / "dist"
    out = CliRunner().invoke(main, ["release", str(llama2_256_dir), "-o", str(dist), "--quants", f"q8_0,{quant}"])
    assert out.exit_code != 0 and f"{quant.upper()} needs an importance matrix" in out.output
    assert len(out.output.strip().splitlines()) == 1 and no_stray_files(dist)


def test_a_type_the_family_cannot_take_is_one_line(tada_codec_dir, tmp_path):
    """TADA's codec decoder is written as F32 or F16 only: a K-quant in --quants is refused before anything is written."""
    out = CliRunner().invoke(main, ["release", str(tada_codec_dir), "-o", str(tmp_path / "dist"), "--quants", "f16,q4_k_m",
                                    "--no-verify"])
    assert out.exit_code == 1 and out.output.count("\n") == 1 and "--outtype q4_k_m does not apply" in out.output, out.output
    assert list(tmp_path.iterdir()) == []


def test_imatrix_auto_computes_uses_and_ships_the_matrix(llama2_256_dir, tmp_path, monkeypatch):
    """--imatrix auto: the matrix mt imatrix writes for the same text and chunks, used for every mix (each file is the
    one mt convert --imatrix imatrix.gguf writes), verified with it, shipped and named in the card."""
    from tests.imatrix.test_compute import calibration_text

    text = tmp_path / "calibration.txt"
    text.write_text(calibration_text(), encoding="utf-8")
    dist = tmp_path / "dist"
    out = CliRunner().invoke(main, ["release", str(llama2_256_dir), "-o", str(dist), "--name", "m", "--quants",
                                    "q4_k_m,iq2_xxs", "--imatrix", "auto", "--calibration", str(text),
                                    "--calibration-ctx", "128", "--calibration-chunks", "4", "--json"])
    assert out.exit_code == 0, out.output
    assert all(f["verify"]["passed"] for f in json.loads(out.output.strip().splitlines()[-1])["files"])
    alone = CliRunner().invoke(main, ["imatrix", str(llama2_256_dir), "--text", str(text), "--ctx", "128", "--chunks", "4",
                                      "-o", str(tmp_path / "alone.gguf"), "--quiet"])
    assert alone.exit_code == 0, alone.output
    assert (dist / "imatrix.gguf").read_bytes() == (tmp_path / "alone.gguf").read_bytes()
    monkeypatch.chdir(dist)  # the files record the matrix as imatrix.gguf, the name it ships under
    for outtype in ("q4_k_m", "iq2_xxs"):
        convert(llama2_256_dir, tmp_path / "one.gguf", outtype, force=True, imatrix="imatrix.gguf")
        assert (dist / file_name("m", outtype)).read_bytes() == (tmp_path / "one.gguf").read_bytes(), outtype
    card = (dist / "README.md").read_text(encoding="utf-8")
    assert f"computed over `{text}` (4 chunks of 128 tokens). It ships as `imatrix.gguf`." in card


@pytest.mark.parametrize("options", [["--imatrix", "auto"], ["--calibration", "README.md"]])
def test_imatrix_auto_and_calibration_go_together(options, llama2_256_dir, tmp_path):
    dist = tmp_path / "dist"
    out = CliRunner().invoke(main, ["release", str(llama2_256_dir), "-o", str(dist), "--quants", "q4_k_m", *options])
    assert out.exit_code == 1 and "--imatrix auto and --calibration go together" in out.output, out.output
    assert len(out.output.strip().splitlines()) == 1 and no_stray_files(dist)


def test_a_vision_model_ships_its_projector_once(gemma3_vision_dir, tmp_path):
    """Each text file verified as a Gemma 3 text model; one mmproj (F16 unless asked) beside them, mt convert's
    bytes, in the manifest with its hash and in the card's run lines; bf16 on request."""
    result = CliRunner().invoke(main, ["release", str(gemma3_vision_dir), "-o", str(tmp_path / "dist"), "--name", "g3",
                                       "--quants", "q8_0", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.splitlines()[-1])
    dist = tmp_path / "dist"
    assert summary["files"][0]["verify"]["passed"] is True
    convert(gemma3_vision_dir, tmp_path / "one.gguf", "f16")
    assert (dist / "mmproj-g3-F16.gguf").read_bytes() == (tmp_path / "mmproj-one.gguf").read_bytes()
    listing = json.loads((dist / "manifest.json").read_text())
    assert listing["mmproj"] == summary["mmproj"] == {
        "file": "mmproj-g3-F16.gguf", "type": "f16", "bytes": (dist / "mmproj-g3-F16.gguf").stat().st_size,
        "sha256": hashlib.sha256((dist / "mmproj-g3-F16.gguf").read_bytes()).hexdigest()}
    card = (dist / "README.md").read_text()
    assert "--mmproj mmproj-g3-F16.gguf" in card and "pipeline_tag: image-text-to-text" in card
    other = release(gemma3_vision_dir, tmp_path / "bf16", ["q8_0"], name="g3", verify=None, mmproj_type="bf16")
    assert other.mmproj is not None and other.mmproj.path.name == "mmproj-g3-BF16.gguf"
    convert(gemma3_vision_dir, tmp_path / "two.gguf", "bf16")
    assert other.mmproj.path.read_bytes() == (tmp_path / "mmproj-two.gguf").read_bytes()
