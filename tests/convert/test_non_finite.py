"""NaN, Inf and values an output type cannot hold: refused by convert, release and quantize with the tensor and the
first place named (whatever the out type: a copied span, a cast, a quantized block), or written as they are with
--allow-non-finite."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader
from safetensors.numpy import load_file, save_file

from mt.cli import main
from mt.demo import build_tiny_llama

TENSOR = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny")


def with_value(src: Path, dest: Path, value: float, dtype: type | None = None) -> Path:
    shutil.copytree(src, dest)
    tensors = load_file(dest / "model.safetensors")
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    tensors[TENSOR] = tensors[TENSOR].copy()
    tensors[TENSOR][3, 17] = value
    save_file(tensors, str(dest / "model.safetensors"))
    return dest


def one_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mt: error: "), result.output
    return lines[0]


@pytest.mark.parametrize("outtype", ["f16", "bf16", "f32", "q8_0", "q4_0", "q4_k_m", "q6_k"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_refused_for_every_type(tiny, tmp_path, outtype, value):
    src = with_value(tiny, tmp_path / "src", value)
    out = tmp_path / "o.gguf"
    line = one_line(CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--outtype", outtype, "--quiet"]))
    assert f"'{TENSOR}' holds NaN or Inf values (first at [3, 17])" in line and "--allow-non-finite" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_copied_bf16_span_is_checked_too(llama3_dir, tmp_path):
    """bf16 -> bf16 copies the source's bytes without decoding them: the check reads them as they are copied."""
    from mt.io.safetensors import read_header

    src = Path(shutil.copytree(llama3_dir, tmp_path / "src"))
    name = "model.layers.0.mlp.down_proj.weight"
    ref = read_header(src / "model.safetensors")[0][name]
    assert ref.dtype == "BF16"
    with open(src / "model.safetensors", "r+b") as f:
        f.seek(ref.offset + (1 * ref.shape[1] + 5) * 2)
        f.write(np.uint16(0x7F80).tobytes())  # bf16 +Inf at [1, 5]
    line = one_line(CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "o.gguf"), "--outtype", "bf16",
                                              "--quiet"]))
    assert f"'{name}' holds NaN or Inf values (first at [1, 5])" in line


def test_values_too_large_for_f16(tiny, tmp_path):
    src = with_value(tiny, tmp_path / "src", 1e6, np.float32)
    runner = CliRunner()
    line = one_line(runner.invoke(main, ["convert", str(src), "-o", str(tmp_path / "o.gguf"), "--outtype", "f16", "--quiet"]))
    assert f"'{TENSOR}' holds values too large for F16 (first at [3, 17]), which become Inf" in line
    assert runner.invoke(main, ["convert", str(src), "-o", str(tmp_path / "o.gguf"), "--outtype", "f32", "--quiet"]).exit_code == 0


def test_allow_non_finite_writes_them_as_they_are(tiny, tmp_path):
    src = with_value(tiny, tmp_path / "src", np.inf)
    out = tmp_path / "o.gguf"
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--outtype", "f16", "--quiet", "--allow-non-finite"])
    assert result.exit_code == 0, result.output
    up = np.asarray(next(t for t in GGUFReader(out).tensors if t.name == "blk.1.ffn_up.weight").data)
    assert np.isinf(up[3, 17]) and np.isinf(up).sum() == 1


def test_release_and_quantize_refuse_them_too(tiny, tmp_path):
    src = with_value(tiny, tmp_path / "src", np.nan)
    runner = CliRunner()
    line = one_line(runner.invoke(main, ["release", str(src), "-o", str(tmp_path / "dist"), "--quants", "f16,q4_k_m",
                                         "--no-verify", "--quiet"]))
    assert f"'{TENSOR}' holds NaN or Inf values (first at [3, 17])" in line and not (tmp_path / "dist").exists()
    f16 = tmp_path / "nan.gguf"
    assert runner.invoke(main, ["convert", str(src), "-o", str(f16), "--outtype", "f16", "--allow-non-finite"]).exit_code == 0
    line = one_line(runner.invoke(main, ["quantize", str(f16), str(tmp_path / "q.gguf"), "q4_k_m", "--quiet"]))
    assert "'blk.1.ffn_up.weight' holds NaN or Inf values (first at [3, 17])" in line
    allowed = runner.invoke(main, ["quantize", str(f16), str(tmp_path / "q.gguf"), "q4_k_m", "--quiet", "--allow-non-finite"])
    assert allowed.exit_code == 0, allowed.output


def test_safetensors_reexport_follows_the_same_rule(tiny, tmp_path):
    src = with_value(tiny, tmp_path / "src", np.inf)
    out = tmp_path / "re"
    runner = CliRunner()
    line = one_line(runner.invoke(main, ["convert", str(src), "-o", str(out), "--format", "safetensors",
                                         "--outtype", "f32", "--quiet"]))
    assert f"'{TENSOR}' holds NaN or Inf values (first at [3, 17])" in line and not out.exists()
    allowed = runner.invoke(main, ["convert", str(src), "-o", str(out), "--format", "safetensors", "--outtype", "f32",
                                   "--quiet", "--allow-non-finite"])
    assert allowed.exit_code == 0, allowed.output
    assert np.isinf(load_file(out / "model.safetensors")[TENSOR][3, 17])
