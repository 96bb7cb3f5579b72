"""Hume's TADA (issue #6): the backbone is the llama GGUF llama.cpp's tools make for a plain LlamaForCausalLM with
the same weights; the acoustic modules go, unquantized, into `<stem>-acoustic.gguf`, checked by running an
independent PyTorch reference of the head (tests/tada_reference.py) on the tensors read back."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType
from safetensors.torch import load_file, save_file

from mt.cli import main
from mt.convert.convert import convert
from mt.errors import UnknownTensor
from mt.io.atomic import atomic_paths
from mt.verify.corpus import CORPUS
from mt.verify.logits import compare_logits, hf_logits, llama_cpp_logits
from tests import checkpoints
from tests.llama_quantize import llama_quantize
from tests.oracle import run_converter
from tests.tada_reference import TadaAcoustic

ACOUSTIC_PREFIXES = ("acoustic_proj.", "time_start_embed.", "time_end_embed.", "acoustic_mask_emb.", "bottleneck_proj.",
                     "prediction_head.")


def plain_llama_twin(tada: Path, parent: Path) -> Path:
    """The same backbone as a plain LlamaForCausalLM folder (same folder name, so the same general.name)."""
    twin = parent / tada.name
    twin.mkdir(parents=True)
    for f in tada.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, twin / f.name)
    config = json.loads((tada / "config.json").read_text())
    tada_keys = {*checkpoints.TADA_DIMS, *checkpoints.TADA_EXTRA_CONFIG, "bottleneck_dim"}
    config = {k: v for k, v in config.items() if k not in tada_keys}
    config["architectures"] = ["LlamaForCausalLM"]
    (twin / "config.json").write_text(json.dumps(config, indent=2))
    state = load_file(str(tada / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith(ACOUSTIC_PREFIXES)}, str(twin / "model.safetensors"),
              metadata={"format": "pt"})
    return twin


@pytest.fixture(scope="module")
def twin(tada_dir, tmp_path_factory) -> Path:
    return plain_llama_twin(tada_dir, tmp_path_factory.mktemp("twin"))


@pytest.fixture(scope="module")
def converted(tada_dir, tmp_path_factory):
    """outtype -> (backbone GGUF, acoustic GGUF) of tada_dir, each converted once."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(outtype: str) -> tuple[Path, Path]:
        if outtype not in made:
            out = tmp_path_factory.mktemp(outtype) / "tada.gguf"
            result = convert(tada_dir, out, outtype)
            assert [c.path for c in result.companions] == [out.with_name("tada-acoustic.gguf")]
            made[outtype] = out, out.with_name("tada-acoustic.gguf")
        return made[outtype]

    return get


@pytest.fixture(scope="module")
def q4_outputs(converted) -> tuple[Path, Path]:
    return converted("q4_k_m")


# ---------------------------------------------------------------- the backbone


def test_backbone_q4_k_m_is_llama_cpp_converter_then_llama_quantize_of_the_plain_llama(twin, q4_outputs, tmp_path):
    f32, ref = tmp_path / "f32.gguf", tmp_path / "ref.gguf"
    run_converter(twin, f32, "f32")
    llama_quantize(f32, ref, LlamaFileType.MOSTLY_Q4_K_M)
    assert q4_outputs[0].read_bytes() == ref.read_bytes()


def test_backbone_logits_match_transformers_llama(twin, tada_dir, converted):
    out, _ = converted("f16")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tada_dir)(CORPUS["en"] + " " + CORPUS["de"])["input_ids"][:40]
    stats = compare_logits(hf_logits(twin, ids), llama_cpp_logits(out, ids))
    assert stats.kld_max <= 1e-5, stats
    assert stats.top1_agreement == 1.0, stats


# ---------------------------------------------------------------- the acoustic companion


def read_companion(path: Path) -> tuple[dict[str, tuple[GGMLQuantizationType, np.ndarray]], dict[str, object]]:
    reader = GGUFReader(path)
    tensors = {t.name: (GGMLQuantizationType(t.tensor_type), np.array(t.data)) for t in reader.tensors}
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return tensors, fields


def module_from_gguf(config: dict, tensors: dict[str, tuple[GGMLQuantizationType, np.ndarray]]) -> TadaAcoustic:
    module = TadaAcoustic(config["hidden_size"], config["acoustic_dim"], config["num_time_classes"], config["head_layers"],
                          config["head_ffn_ratio"], config.get("bottleneck_dim"))
    module.load_state_dict({name: torch.from_numpy(data.astype(np.float32)) for name, (_, data) in tensors.items()}, strict=True)
    return module.eval()


def run_reference(module: TadaAcoustic, config: dict, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(head velocity, input-embedding contribution) on seeded inputs."""
    gen = torch.Generator().manual_seed(seed)
    n, hidden, a, classes = 6, config["hidden_size"], config["acoustic_dim"], config["num_time_classes"]
    latent = a + 2 * math.ceil(math.log2(classes))
    z, t, cond = torch.randn(n, latent, generator=gen), torch.rand(n, generator=gen), torch.randn(n, hidden, generator=gen)
    acoustic = torch.randn(n, a, generator=gen)
    mask = torch.randint(0, 2, (n,), generator=gen)
    t_before, t_after = torch.randint(0, classes, (n,), generator=gen), torch.randint(0, classes, (n,), generator=gen)
    with torch.no_grad():
        return module.velocity(z, t, cond), module.input_embedding_extra(acoustic, mask, t_before, t_after)


def test_acoustic_tensors_are_f16_and_f32_never_quantized(q4_outputs, tada_dir):
    backbone, companion = q4_outputs
    tensors, fields = read_companion(companion)
    source = load_file(str(tada_dir / "model.safetensors"))
    assert set(tensors) == {k for k in source if k.startswith(ACOUSTIC_PREFIXES)}
    for name, (qtype, data) in tensors.items():
        assert qtype == (GGMLQuantizationType.F16 if source[name].ndim >= 2 else GGMLQuantizationType.F32), name
        assert data.shape == tuple(source[name].shape), name
    assert fields["general.architecture"] == "tada"
    from tests.gguf_compare import read_gguf

    backbone_names = {name for name, *_ in read_gguf(backbone).tensors}
    assert len(backbone_names) == 21 and not any(n.startswith(ACOUSTIC_PREFIXES) for n in backbone_names)


def test_acoustic_metadata_is_the_tada_config(q4_outputs, tada_dir):
    _, fields = read_companion(q4_outputs[1])
    config = json.loads((tada_dir / "config.json").read_text())
    for key in [*checkpoints.TADA_DIMS, *checkpoints.TADA_EXTRA_CONFIG, "rms_norm_eps"]:
        expected = config[key]
        got = fields[f"tada.{key}"]
        assert got == pytest.approx(expected, rel=1e-7) if isinstance(expected, float) else got == expected, key
    bits = math.ceil(math.log2(config["num_time_classes"]))
    assert fields["tada.num_time_bits"] == bits
    assert fields["tada.latent_size"] == config["acoustic_dim"] + 2 * bits
    assert fields["tada.head_hidden_size"] == config["hidden_size"]
    assert fields["tada.head_ffn_length"] == int(config["hidden_size"] * config["head_ffn_ratio"])
    assert fields["tada.embedding_length"] == config["hidden_size"]
    assert fields["tada.head_rms_norm_eps"] == pytest.approx(1e-5)
    assert "tada.bottleneck_dim" not in fields


def test_acoustic_metadata_carries_the_generation_frame(q4_outputs, tada_dir):
    """What the speech runtime needs besides numbers: the prompt frame and the ids of the tokens it treats apart,
    as the checkpoint's tokenizer numbers them (Llama 3.2's)."""
    from transformers import AutoTokenizer

    _, fields = read_companion(q4_outputs[1])
    tokenizer = AutoTokenizer.from_pretrained(tada_dir)
    assert fields["tada.prompt_prefix"] == ("<|start_header_id|>system<|end_header_id|><|eot_id|>"
                                            "<|start_header_id|>assistant<|end_header_id|>")
    for role, text in {"pad": "<|finetune_right_pad_id|>", "start_header": "<|start_header_id|>",
                       "end_header": "<|end_header_id|>", "eot": "<|eot_id|>"}.items():
        assert fields[f"tada.token.{role}_id"] == tokenizer.convert_tokens_to_ids(text), role
    assert fields["tada.token.pad_id"] == 128004


def test_a_tokenizer_without_tada_s_pad_token_is_refused(tada_dir, tmp_path):
    src = Path(shutil.copytree(tada_dir, tmp_path / "src"))
    checkpoints.write_llama3_tokenizer(src)  # Llama 3's: id 128004 is still <|reserved_special_token_2|>
    out = tmp_path / "t.gguf"
    result = run_cli(src, out)
    assert_one_line_error(result, "<|finetune_right_pad_id|>", "Llama 3.2 tokenizer")
    assert not out.exists()


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_head_on_tensors_read_back_matches_original(tada_dir, converted, outtype):
    tensors, _ = read_companion(converted(outtype)[1])
    config = json.loads((tada_dir / "config.json").read_text())
    original = checkpoints.tada_acoustic_module(tada_dir)
    got = run_reference(module_from_gguf(config, tensors), config)
    want = run_reference(original, config)
    if outtype == "f32":
        for g, w in zip(got, want):
            assert torch.equal(g, w)
        return
    f16 = GGMLQuantizationType.F16
    rounded = module_from_gguf(config, {n: (tensors[n][0], (v.half() if tensors[n][0] == f16 else v).numpy())
                                        for n, v in original.state_dict().items()})
    for g, w, r in zip(got, want, run_reference(rounded, config)):
        assert torch.equal(g, r)  # the file holds exactly the f16-rounded weights
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-3)


def test_bottleneck_variant(tmp_path):
    src = checkpoints.build_tada(tmp_path / "tada-bn", bottleneck_dim=32, seed=3)
    out = tmp_path / "bn.gguf"
    convert(src, out, "f32")
    tensors, fields = read_companion(tmp_path / "bn-acoustic.gguf")
    config = json.loads((src / "config.json").read_text())
    assert tensors["bottleneck_proj.weight"][1].shape == (32, config["hidden_size"])
    assert fields["tada.bottleneck_dim"] == 32 and fields["tada.head_hidden_size"] == 32
    assert fields["tada.head_ffn_length"] == int(32 * config["head_ffn_ratio"])
    for g, w in zip(run_reference(module_from_gguf(config, tensors), config, seed=1),
                    run_reference(checkpoints.tada_acoustic_module(src), config, seed=1)):
        assert torch.equal(g, w)


# ---------------------------------------------------------------- outputs and bad input


def run_cli(src: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--outtype", "f16", "--quiet", *extra])


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mt: error: "), result.output
    for needle in needles:
        assert needle in lines[0]


def no_partials(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if "mt-partial" in p.name]


def test_existing_companion_is_refused_before_anything_is_written(tada_dir, tmp_path):
    (tmp_path / "m-acoustic.gguf").write_bytes(b"keep")
    result = run_cli(tada_dir, tmp_path / "m.gguf")
    assert_one_line_error(result, "m-acoustic.gguf exists", "--force")
    assert not (tmp_path / "m.gguf").exists()
    assert (tmp_path / "m-acoustic.gguf").read_bytes() == b"keep"
    result = run_cli(tada_dir, tmp_path / "m.gguf", "--force", "--json")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m-acoustic.gguf").read_bytes()[:4] == b"GGUF"
    (companion,) = json.loads(result.output)["companions"]
    assert companion["output"] == str(tmp_path / "m-acoustic.gguf") and companion["arch"] == "tada"
    assert companion["bytes"] == (tmp_path / "m-acoustic.gguf").stat().st_size


def test_failing_companion_leaves_neither_file(tada_dir, tmp_path, monkeypatch):
    import mt.convert.convert as convert_module

    def broken(*args, **kwargs):
        raise OSError("disk went away")

    monkeypatch.setattr(convert_module, "write_companion", broken)
    with pytest.raises(OSError):
        convert(tada_dir, tmp_path / "m.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


def test_atomic_paths_takes_back_earlier_files_when_a_later_rename_fails(tmp_path):
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    second.mkdir()
    (second / "blocker").write_text("x")  # rename(2) cannot put a file over a non-empty folder
    with pytest.raises(OSError):
        with atomic_paths([first, second]) as (tmp_a, tmp_b):
            tmp_a.write_bytes(b"a")
            tmp_b.write_bytes(b"b")
    assert not first.exists() and no_partials(tmp_path)


def test_unknown_acoustic_tensor_is_named(tada_dir, tmp_path):
    src = Path(shutil.copytree(tada_dir, tmp_path / "src"))
    state = load_file(str(src / "model.safetensors"))
    state["prediction_head.extra_gate.weight"] = torch.zeros(4, 4)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnknownTensor, match="prediction_head.extra_gate.weight"):
        convert(src, tmp_path / "m.gguf", "f16")
    assert_one_line_error(run_cli(src, tmp_path / "m.gguf"), "prediction_head.extra_gate.weight")
    assert no_partials(tmp_path) and not (tmp_path / "m.gguf").exists()


def test_embedded_codec_decoder_is_left_out(tada_dir, tmp_path):
    src = Path(shutil.copytree(tada_dir, tmp_path / "src"))
    state = load_file(str(src / "model.safetensors"))
    state["_decoder.decoder_proj.weight"] = torch.zeros(8, 4)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    from mt.convert.convert import load
    from mt.convert.plan import companion_plans

    ckpt, arch, plan = load(src, "f16")
    names = {e.name for e in plan.entries} | {e.name for _, p in companion_plans(ckpt, arch, "f16") for e in p.entries}
    assert not any("decoder_proj" in n for n in names) and "prediction_head.cond_proj.weight" in names


def test_dry_run_lists_the_companion(tada_dir):
    result = CliRunner().invoke(main, ["convert", str(tada_dir), "--dry-run", "--outtype", "q4_k_m", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    (companion,) = plan["companions"]
    assert companion["suffix"] == "-acoustic" and companion["arch"] == "tada"
    assert {t["type"] for t in companion["tensors"]} == {"F16", "F32"}
    assert "prediction_head.final_layer.linear.weight" in {t["name"] for t in companion["tensors"]}


def test_companion_names_over_the_gguf_limit_are_refused():
    from mt.convert.arch.base import Companion, NameTable
    from mt.errors import MtError

    long_stem = "prediction_head." + "x" * 60
    companion = Companion("-a", ("prediction_head.",), "tada", NameTable({long_stem: long_stem}), lambda w, c: None)
    with pytest.raises(MtError, match="63 bytes"):
        companion.tensor_name(long_stem + ".weight")
