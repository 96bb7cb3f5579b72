"""mt quantize --imatrix against llama_model_quantize given the same importance matrix (the map and
quantize.imatrix.* keys tools/quantize/quantize.cpp builds): the whole output file, byte for byte."""

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T

from mt.cli import main
from mt.convert.convert import convert
from mt.io.gguf_in import read_header
from mt.quant.quantize import _quantize_by_matrix, parse_file_type, quantize_gguf
from tests.ggml_ref import ggml_quantize
from tests.gguf_compare import read_gguf
from tests.imatrix_files import RawImatrix, random_imatrix, write_gguf, write_legacy
from tests.llama_quantize import llama_quantize
from tests.gguf_compare import assert_same_file


def model_imatrix(gguf_path: Path, seed: int = 0, complete: bool = False) -> RawImatrix:
    """An entry for every matrix llama-imatrix would see (2-D weights but token_embd), one of them never
    exercised (counts 0), plus an entry for a tensor the model lacks; unless `complete`, one matrix is left without
    an entry (Q2_K_S refuses that)."""
    tensors = [t for t in read_header(gguf_path).tensors if len(t.shape) >= 2 and t.name != "token_embd.weight"]
    shapes = {t.name: (1, t.shape[0]) for t in tensors if complete or t.name != "blk.1.attn_q.weight"}
    shapes["blk.99.ffn_up.weight"] = (1, 48)
    raw = random_imatrix(shapes, seed)
    raw.entries["blk.0.attn_k.weight"].counts[:] = 0
    return raw


def reference(src: Path, out: Path, mix: str, imatrix_arg: str, weights: dict[str, np.ndarray], raw: RawImatrix,
              dataset: str | None) -> None:
    kv: list[tuple[str, str | int]] = [("quantize.imatrix.file", imatrix_arg)]
    if dataset is not None:
        kv.append(("quantize.imatrix.dataset", dataset))
    kv.append(("quantize.imatrix.entries_count", len(weights)))
    if raw.chunk_count > 0:
        kv.append(("quantize.imatrix.chunks_count", raw.chunk_count))
    llama_quantize(src, out, parse_file_type(mix), imatrix=weights, kv_overrides=kv)


@pytest.fixture(scope="module")
def f32_gguf(llama2_256_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("f32imx") / "m-f32.gguf"
    convert(llama2_256_dir, out, "f32")
    return out


@pytest.mark.parametrize("mix", ["q4_k_m", "q5_k_m", "q6_k", "q4_k_s", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0",
                                 "q2_k", "q2_k_s", "q3_k_s", "q3_k_m", "q3_k_l", "iq4_nl", "iq4_xs"])
def test_gguf_imatrix_same_file_as_llama_quantize(f32_gguf, tmp_path, mix):
    raw = model_imatrix(f32_gguf, complete=mix == "q2_k_s")
    path = write_gguf(raw, tmp_path / "imatrix.gguf")
    ref, ours = tmp_path / "ref.gguf", tmp_path / "mt.gguf"
    reference(f32_gguf, ref, mix, str(path), raw.expected_gguf_map(), raw, raw.datasets[0])
    result = quantize_gguf(f32_gguf, ours, mix, imatrix=str(path))
    assert_same_file(ours, ref)
    if mix in ("q4_0", "q5_0"):  # with an imatrix the first n_layer/8 ffn_down layers get the _1 type
        assert result.types["blk.0.ffn_down.weight"] == (T.Q4_1 if mix == "q4_0" else T.Q5_1)
        assert result.types["blk.1.ffn_down.weight"] == (T.Q4_0 if mix == "q4_0" else T.Q5_0)


def test_legacy_imatrix_same_file_as_llama_quantize(f32_gguf, tmp_path):
    raw = model_imatrix(f32_gguf, seed=3)
    raw.datasets = ["calibration/data set.txt"]
    path = write_legacy(raw, tmp_path / "imatrix.dat")
    ref, ours = tmp_path / "ref.gguf", tmp_path / "mt.gguf"
    reference(f32_gguf, ref, "q4_k_m", str(path), raw.expected_legacy_map(), raw, raw.datasets[0])
    quantize_gguf(f32_gguf, ours, "q4_k_m", imatrix=str(path))
    assert_same_file(ours, ref)
    keys = read_gguf(ours).kv_dict()
    assert keys["quantize.imatrix.dataset"] == "calibration/data set.txt"
    assert keys["quantize.imatrix.entries_count"] == len(raw.entries) and keys["quantize.imatrix.chunks_count"] == 17


def test_legacy_imatrix_without_trailer(f32_gguf, tmp_path):
    """No chunk count and dataset: llama.cpp writes neither key."""
    raw = model_imatrix(f32_gguf, seed=4)
    path = write_legacy(raw, tmp_path / "old.dat", trailer=False)
    raw.chunk_count = 0
    ref, ours = tmp_path / "ref.gguf", tmp_path / "mt.gguf"
    reference(f32_gguf, ref, "q5_k_m", str(path), raw.expected_legacy_map(), raw, None)
    quantize_gguf(f32_gguf, ours, "q5_k_m", imatrix=str(path))
    assert_same_file(ours, ref)
    assert "quantize.imatrix.dataset" not in read_gguf(ours).kv_dict()


@pytest.mark.parametrize("mix", ["q4_k_m", "q5_k_s", "q6_k", "q2_k_s", "q3_k_l", "iq4_xs"])
def test_fallback_rows_bf16_and_tied_embeddings(llama3_dir, tmp_path, mix):
    """Rows of 64: Q5_0/Q5_1/Q8_0 fallbacks with the imatrix; BF16 source; tied token_embd."""
    bf16 = tmp_path / "bf16.gguf"
    convert(llama3_dir, bf16, "bf16")
    raw = model_imatrix(bf16, seed=5, complete=mix == "q2_k_s")
    path = write_gguf(raw, tmp_path / "imatrix.gguf")
    ref, ours = tmp_path / "ref.gguf", tmp_path / "mt.gguf"
    reference(bf16, ref, mix, str(path), raw.expected_gguf_map(), raw, raw.datasets[0])
    quantize_gguf(bf16, ours, mix, imatrix=str(path))
    assert_same_file(ours, ref)


def test_f16_fallback_rows_and_misfit_token_embd(llama2_odd_rows_f16_dir, tmp_path):
    """ffn rows of 80 (F16 fallback, F16 source kept as is) and a token_embd entry of the wrong size,
    which llama.cpp passes over."""
    f16 = tmp_path / "f16.gguf"
    convert(llama2_odd_rows_f16_dir, f16, "f16")
    raw = model_imatrix(f16, seed=6)
    raw.entries.update(random_imatrix({"token_embd.weight": (1, 7)}, seed=7).entries)
    path = write_gguf(raw, tmp_path / "imatrix.gguf")
    ref, ours = tmp_path / "ref.gguf", tmp_path / "mt.gguf"
    reference(f16, ref, "q4_k_m", str(path), raw.expected_gguf_map(), raw, raw.datasets[0])
    quantize_gguf(f16, ours, "q4_k_m", imatrix=str(path))
    assert_same_file(ours, ref)


def test_the_imatrix_changes_the_file(f32_gguf, tmp_path):
    """A test of the tests above: with an imatrix the tensors differ from a plain quantization."""
    path = write_gguf(model_imatrix(f32_gguf), tmp_path / "imatrix.gguf")
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    quantize_gguf(f32_gguf, plain, "q4_k_m")
    quantize_gguf(f32_gguf, weighted, "q4_k_m", imatrix=str(path))
    a, b = dict((t[0], t[3]) for t in read_gguf(plain).tensors), dict((t[0], t[3]) for t in read_gguf(weighted).tensors)
    assert a["blk.2.ffn_up.weight"] != b["blk.2.ffn_up.weight"]
    assert a["blk.1.attn_q.weight"] == b["blk.1.attn_q.weight"]  # no entry: quantized without weights


def test_expert_matrices_get_their_own_imatrix_rows():
    """A 3-D tensor [ne0, ne1, n_expert]: rows of expert j use imatrix row j (llama_tensor_quantize_impl)."""
    rng = np.random.default_rng(0)
    ne0, ne1, n_exp = 256, 3, 4
    values = rng.standard_normal((ne1 * n_exp, ne0)).astype(np.float32)
    weights = (rng.standard_normal((n_exp, ne0)) ** 2).astype(np.float32)
    first_row = 2  # a slab that starts inside expert 0 and crosses expert boundaries
    ours = np.concatenate(list(_quantize_by_matrix(T.Q4_K, values[first_row:], first_row, ne1, weights)))
    expected = [ggml_quantize(int(T.Q4_K), values[r : r + 1], weights[r // ne1]) for r in range(first_row, ne1 * n_exp)]
    assert np.array_equal(ours, np.concatenate(expected))


def test_cli_imatrix(f32_gguf, tmp_path):
    raw = model_imatrix(f32_gguf)
    path = write_gguf(raw, tmp_path / "imatrix.gguf")
    out = tmp_path / "q.gguf"
    result = CliRunner().invoke(main, ["quantize", str(f32_gguf), str(out), "Q4_K_M", "--imatrix", str(path)])
    assert result.exit_code == 0, result.output
    assert read_gguf(out).kv_dict()["quantize.imatrix.file"] == str(path)


def test_cli_misfit_imatrix_is_one_line_and_leaves_nothing(f32_gguf, tmp_path):
    raw = random_imatrix({"blk.3.ffn_down.weight": (1, 100)})
    path = write_gguf(raw, tmp_path / "imatrix.gguf")
    out = tmp_path / "q.gguf"
    result = CliRunner().invoke(main, ["quantize", str(f32_gguf), str(out), "Q4_K_M", "--imatrix", str(path)])
    assert result.exit_code == 1
    assert "blk.3.ffn_down.weight" in result.output and "100" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == [path]


def test_q2_k_s_without_weights_is_refused_as_llama_quantize_refuses(f32_gguf, tmp_path):
    """Q2_K_S quantizes most matrices to Q2_K, which llama.cpp will not do without importance weights: no imatrix,
    or one that lacks a matrix, is one line and no file (llama_model_quantize fails on both)."""
    partial = write_gguf(model_imatrix(f32_gguf), tmp_path / "partial.gguf")
    for imatrix, says in ((None, "needs an importance matrix"), (partial, "has no weights for 'blk.1.attn_q.weight'")):
        with pytest.raises(RuntimeError):
            llama_quantize(f32_gguf, tmp_path / "ref.gguf", parse_file_type("q2_k_s"),
                           imatrix=None if imatrix is None else model_imatrix(f32_gguf).expected_gguf_map())
        args = ["quantize", str(f32_gguf), str(tmp_path / "q.gguf"), "q2_k_s"]
        result = CliRunner().invoke(main, args + ([] if imatrix is None else ["--imatrix", str(imatrix)]))
        assert result.exit_code != 0 and says in result.output and len(result.output.strip().splitlines()) == 1
        assert not (tmp_path / "q.gguf").exists()
