"""The TADA codec decoder (HumeAI/tada-codec/decoder): weight norm folded into plain weights, equal to what
torch.nn.utils.parametrizations.weight_norm computes for the same g and v."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGMLQuantizationType, GGUFReader
from safetensors.torch import load_file, save_file

from mt.cli import main
from mt.convert.convert import convert
from mt.errors import MissingTensor
from tests import checkpoints
from tests.tada_reference import CodecDecoder

WN = ".parametrizations.weight.original"


def reference_decoder(folder: Path) -> CodecDecoder:
    d = checkpoints.TADA_CODEC_DIMS
    state = load_file(str(folder / "model.safetensors"))
    max_seq_len = state["local_attention_decoder.layers.0.self_attn.rope_freqs"].shape[0]
    module = CodecDecoder(d["embed_dim"], d["hidden_dim"], d["num_attn_layers"], d["num_attn_heads"],
                          d["attn_dim_feedforward"], d["wav_decoder_channels"], d["strides"], max_seq_len)
    module.load_state_dict(state, strict=True)
    return module


def torch_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parametrized module's computed weight, as torch's weight_norm gives it."""
    with torch.no_grad():
        return {f"{name}.weight": m.weight.detach().clone() for name, m in module.named_modules()
                if hasattr(m, "parametrizations")}


@pytest.fixture(scope="module")
def gguf_tensors(tada_codec_dir, tmp_path_factory):
    def read(outtype: str) -> tuple[dict[str, tuple[GGMLQuantizationType, np.ndarray]], dict]:
        out = tmp_path_factory.mktemp(outtype) / "tada-codec.gguf"
        convert(tada_codec_dir, out, outtype)
        reader = GGUFReader(out)
        tensors = {t.name: (GGMLQuantizationType(t.tensor_type), np.array(t.data)) for t in reader.tensors}
        return tensors, {name: f.contents() for name, f in reader.fields.items()}
    return {outtype: read(outtype) for outtype in ("f32", "f16")}


@pytest.mark.parametrize("outtype, rtol, atol", [("f32", 2e-6, 1e-8), ("f16", 1e-3, 1e-6)])
def test_folded_weights_equal_torch_weight_norm(tada_codec_dir, gguf_tensors, outtype, rtol, atol):
    tensors, _ = gguf_tensors[outtype]
    expected = torch_weights(reference_decoder(tada_codec_dir))
    assert len(expected) == 1 + 4 * 7 + 1  # first conv, per block: conv-transpose + 3 residual units x 2, last conv
    for name, weight in expected.items():
        qtype, data = tensors[name]
        assert qtype == (GGMLQuantizationType.F32 if outtype == "f32" else GGMLQuantizationType.F16), name
        assert data.shape == tuple(weight.shape), name
        np.testing.assert_allclose(data.astype(np.float32), weight.numpy(), rtol=rtol, atol=atol, err_msg=name)


def test_other_tensors_pass_through_and_the_mask_buffers_are_dropped(tada_codec_dir, gguf_tensors):
    tensors, _ = gguf_tensors["f32"]
    source = load_file(str(tada_codec_dir / "model.safetensors"))
    assert not any(WN in n or n.endswith("_precomputed_mask") for n in tensors)
    plain = {n: t for n, t in source.items() if WN not in n and not n.endswith("_precomputed_mask")}
    assert set(plain) | set(torch_weights(reference_decoder(tada_codec_dir))) == set(tensors)
    for name, t in plain.items():
        assert np.array_equal(tensors[name][1], t.numpy()), name
    f16_tensors, _ = gguf_tensors["f16"]
    for name, t in plain.items():  # biases, norms, Snake alphas and the RoPE tables stay F32
        if t.ndim == 1 or name.endswith((".alpha", ".rope_freqs")):
            assert f16_tensors[name][0] == GGMLQuantizationType.F32, name


def test_metadata(gguf_tensors):
    _, fields = gguf_tensors["f16"]
    assert fields["general.architecture"] == "tada_codec"
    for key, value in checkpoints.TADA_CODEC_DIMS.items():
        assert fields[f"tada_codec.{key}"] == value, key
    assert fields["tada_codec.block_attention"] == "v2"
    assert fields["tada_codec.sample_rate"] == 24000
    assert fields["tada_codec.attn_max_seq_len"] == 16


@pytest.mark.parametrize("part", ["0", "1"])
def test_missing_half_of_a_weight_norm_pair_is_named(tada_codec_dir, tmp_path, part):
    src = Path(shutil.copytree(tada_codec_dir, tmp_path / "decoder"))
    state = load_file(str(src / "model.safetensors"))
    missing = f"wav_decoder.model.2.block.1{WN}{part}"
    del state[missing]
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MissingTensor, match=missing.replace(".", r"\.")):
        convert(src, tmp_path / "c.gguf", "f16")
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "c.gguf")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mt: error: ") and missing in lines[0], result.output
    assert not (tmp_path / "c.gguf").exists()


def test_k_quant_outtype_is_refused(tada_codec_dir, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(tada_codec_dir), "-o", str(tmp_path / "c.gguf"), "--outtype", "q4_k_m"])
    assert result.exit_code == 1 and "f32, f16" in result.output, result.output
    assert not (tmp_path / "c.gguf").exists()


def test_config_that_disagrees_with_the_tensors_is_refused(tada_codec_dir, tmp_path):
    import json

    src = Path(shutil.copytree(tada_codec_dir, tmp_path / "decoder"))
    config = json.loads((src / "config.json").read_text())
    config["hidden_dim"] = 1024
    (src / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "c.gguf")])
    assert result.exit_code == 1 and "hidden_dim" in result.output, result.output


def test_norm_that_does_not_fit_its_direction_is_refused(tada_codec_dir, tmp_path):
    src = Path(shutil.copytree(tada_codec_dir, tmp_path / "decoder"))
    state = load_file(str(src / "model.safetensors"))
    name = f"wav_decoder.model.0{WN}0"
    state[name] = torch.ones(state[name].shape[0], 2, 1)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "c.gguf")])
    assert result.exit_code == 1 and name in result.output and "dim=0" in result.output, result.output
    assert not (tmp_path / "c.gguf").exists()
