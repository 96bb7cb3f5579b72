"""mt merge against peft's own merge_and_unload, the folder transformers loads, and convert --adapter."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from mt.cli import main
from mt.convert.convert import convert
from mt.merge.merge import merge
from tests.merge import adapters
from tests.merge.conftest import base_for

PEFT_EQUAL = [name for name in adapters.ALL_SPECS if name != "dora_embed_lm_head"]


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for part in sorted(folder.glob("*.safetensors")):
        with safe_open(part, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def max_relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("name", PEFT_EQUAL)
def test_merge_equals_peft_merge_and_unload(name: str, built: Callable[[str], Path], request: pytest.FixtureRequest,
                                            tmp_path: Path) -> None:
    """fp32 base: every tensor within 1e-6 relative of peft's merge; config (vocab, tying) as peft leaves it."""
    base, adapter = base_for(request, name), built(name)
    merge(base, adapter, tmp_path / "out", dtype="f32")
    got = read_folder(tmp_path / "out")
    model = adapters.peft_merged_model(base, adapter)
    want = adapters.unaliased(model.state_dict())
    assert set(got) == set(want) - {"model.rotary_emb.inv_freq"}
    for key, tensor in want.items():
        if key in got:
            assert got[key].shape == tensor.shape, key
            assert max_relative_error(got[key], tensor) <= 1e-6, key
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == model.config.vocab_size
    assert config.get("tie_word_embeddings", True) == model.config.tie_word_embeddings


def test_bf16_base_merges_as_peft_does_in_bf16(llama3_dir: Path, tmp_path: Path) -> None:
    """peft adds the fp32 delta to a bf16 weight and rounds once; mt computes in fp32 and casts once: the same bits,
    except where the two matmuls' float32 sums differ in the last place and that flips a bf16 rounding."""
    adapter = adapters.build_adapter(llama3_dir, tmp_path / "ad", adapters.AdapterSpec())
    merge(llama3_dir, adapter, tmp_path / "out")
    got = read_folder(tmp_path / "out")
    want = adapters.unaliased(adapters.peft_merged_model(llama3_dir, adapter, torch.bfloat16).state_dict())
    for key, tensor in got.items():
        assert tensor.dtype == torch.bfloat16, key
        bits_differ = (tensor.view(torch.int16) != want[key].view(torch.int16)).float().mean().item()
        assert bits_differ <= 1e-3, key
        assert max_relative_error(tensor, want[key]) <= 1e-2, key


def test_merged_folder_loads_in_transformers_with_peft_logits(built: Callable[[str], Path], llama3_f32_untied_dir: Path,
                                                             tmp_path: Path) -> None:
    adapter = built("dora")
    result = CliRunner().invoke(main, ["merge", str(llama3_f32_untied_dir), str(adapter), "-o", str(tmp_path / "out"),
                                       "--max-shard-size", "300KB", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["shards"] > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    ids = torch.tensor([[1, 5, 900, 17, 4000, 23]])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)(ids).logits
        theirs = adapters.peft_merged_model(llama3_f32_untied_dir, adapter)(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "generation_config.json").is_file()


def test_resized_vocabulary_takes_the_adapters_tokenizer(built: Callable[[str], Path], llama2_spm_dir: Path,
                                                         tmp_path: Path) -> None:
    adapter = built("resized_saved")
    merge(llama2_spm_dir, adapter, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 32000 + len(adapters.ADDED_TOKENS)
    tokenizer = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    assert {t["content"] for t in tokenizer["added_tokens"]} >= set(adapters.ADDED_TOKENS)


@pytest.mark.parametrize("outtype", ["f16", "q8_0", "q4_k_m"])
@pytest.mark.parametrize("name", ["dora", "resized_targeted", "tied_dora_lm_head"])
def test_convert_adapter_equals_converting_the_merged_folder(name: str, outtype: str, built: Callable[[str], Path],
                                                             request: pytest.FixtureRequest, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Merged on the fly inside the conversion loop, its side files in memory: the same bytes as mt merge followed
    by mt convert, and no temporary folder."""
    base, adapter = base_for(request, name), built(name)
    merged = tmp_path / "merged" / base.name  # the same folder name, so general.name agrees too
    merged.parent.mkdir()
    merge(base, adapter, merged)
    convert(merged, tmp_path / "two_steps.gguf", outtype)

    def no_folder(*args: object, **kwargs: object) -> str:
        raise AssertionError("the merged source made a temporary folder")

    monkeypatch.setattr(tempfile, "mkdtemp", no_folder)
    convert(base, tmp_path / "on_the_fly.gguf", outtype, adapter=adapter)
    assert (tmp_path / "two_steps.gguf").read_bytes() == (tmp_path / "on_the_fly.gguf").read_bytes()


def test_dry_run_with_adapter_shows_the_resized_plan(built: Callable[[str], Path], llama2_spm_dir: Path) -> None:
    result = CliRunner().invoke(main, ["convert", str(llama2_spm_dir), "--adapter", str(built("resized_auto")),
                                       "--outtype", "q8_0", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    shapes = {t["name"]: t["shape"] for t in json.loads(result.output)["tensors"]}
    assert shapes["token_embd.weight"][1] == 32000 + len(adapters.ADDED_TOKENS)


def test_dtype_option_casts_every_float_tensor(built: Callable[[str], Path], llama3_f32_untied_dir: Path, tmp_path: Path) -> None:
    merge(llama3_f32_untied_dir, built("plain"), tmp_path / "out", dtype="bf16")
    got = read_folder(tmp_path / "out")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    f32 = adapters.peft_merged_state_dict(llama3_f32_untied_dir, built("plain"))
    for key, tensor in got.items():
        assert torch.equal(tensor, f32[key].to(torch.bfloat16)), key


def test_merge_streams_rows_without_reading_whole_tensors(built: Callable[[str], Path], llama3_f32_untied_dir: Path,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer asks for slabs: with a tiny slab every matrix arrives in several pieces and the result is unchanged."""
    import mt.merge.merge as merge_module

    monkeypatch.setattr(merge_module, "SLAB_BYTES", 4096)
    merge(llama3_f32_untied_dir, built("dora"), tmp_path / "small_slabs", dtype="f32")
    monkeypatch.undo()
    merge(llama3_f32_untied_dir, built("dora"), tmp_path / "default", dtype="f32")
    small, default = read_folder(tmp_path / "small_slabs"), read_folder(tmp_path / "default")
    assert all(torch.equal(small[k], default[k]) for k in default)
    monkeypatch.setattr(merge_module, "SLAB_BYTES", 4096)
    slabs = [list(merge_module.row_slabs(t)) for t in _merged_tensors(llama3_f32_untied_dir, built("dora"))]
    assert min(len(s) for s in slabs) >= 2  # every matrix (8 KiB and up) arrived in pieces
    assert max(s[0].nbytes for s in slabs) <= 4096 * 2


def _merged_tensors(base: Path, adapter: Path) -> list:
    from mt.merge.source import open_merged

    merged, _, _ = open_merged(base, adapter)
    return [t for t in merged.tensors.values() if len(t.shape) == 2]


def test_numpy_delta_matches_peft_in_float32_exactly_for_plain_lora(built: Callable[[str], Path],
                                                                   llama3_f32_untied_dir: Path, tmp_path: Path) -> None:
    merge(llama3_f32_untied_dir, built("plain"), tmp_path / "out")
    got = read_folder(tmp_path / "out")
    want = adapters.peft_merged_state_dict(llama3_f32_untied_dir, built("plain"))
    worst = max(max_relative_error(got[k], want[k]) for k in got)
    assert worst <= 1e-6
    assert np.isfinite(worst)
