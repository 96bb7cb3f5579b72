"""Every adapter mt must refuse: one line naming the problem and the fix, exit 1, no output left behind."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from mt.cli import main
from tests.merge import adapters

# kind -> (extra mt merge options, words the one-line error must hold)
BAD: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "shape_mismatch": ([], ("model.layers.0.self_attn.q_proj.weight", "[96, 96]", "[64, 64]")),
    "missing_module": ([], (adapters.MISSING_MODULE, "another model")),
    "lora_bias_without_base_bias": ([], ("lora_bias", "has none")),
    "ia3": ([], ("'IA3'", "LoRA adapters")),
    "prompt_tuning": ([], ("'PROMPT_TUNING'", "LoRA adapters")),
    "no_weights": ([], ("no adapter_model.safetensors",)),
    "no_config": ([], ("no adapter_config.json",)),
    "pickle_only": ([], ("adapter_model.bin", "pickle", "safetensors")),
    "overflow_f16": (["--dtype", "f16"], (adapters.OVERFLOW_TENSOR, "NaN or Inf in F16", "--dtype f32/bf16")),
    "nan": ([], (adapters.NAN_TENSOR, "NaN or Inf")),
    "rank_zero": ([], ("r = 0", "at least 1")),
    "rank_negative": ([], ("r = -4",)),
    "alpha_pattern_regex": ([], ("alpha_pattern", "'q_proj('", "not a regular expression")),
    "rank_zero_tensors": ([], (adapters.NAN_TENSOR.removesuffix(".weight"), "(rank 0)")),
}


@pytest.fixture(scope="module")
def bad(llama3_f32_untied_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = adapters.build_bad_adapter(kind, llama3_f32_untied_dir, tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


def assert_refused(args: list[str], words: tuple[str, ...], out: Path) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mt: error: "), result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if "mt-partial" in p.name]


@pytest.mark.parametrize("kind", list(BAD))
def test_merge_refuses(kind: str, bad: Callable[[str], Path], llama3_f32_untied_dir: Path, tmp_path: Path) -> None:
    options, words = BAD[kind]
    out = tmp_path / "merged"
    assert_refused(["merge", str(llama3_f32_untied_dir), str(bad(kind)), "-o", str(out), *options], words, out)


@pytest.mark.parametrize("kind", ["shape_mismatch", "nan", "ia3"])
def test_convert_with_adapter_refuses(kind: str, bad: Callable[[str], Path], llama3_f32_untied_dir: Path,
                                      tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    assert_refused(["convert", str(llama3_f32_untied_dir), "--adapter", str(bad(kind)), "-o", str(out),
                    "--outtype", "q8_0"], BAD[kind][1], out)


def test_overflowing_adapter_merges_in_bf16(bad: Callable[[str], Path], llama3_f32_untied_dir: Path, tmp_path: Path) -> None:
    """The f16 overflow is about the dtype, not the adapter: bf16 holds it."""
    result = CliRunner().invoke(main, ["merge", str(llama3_f32_untied_dir), str(bad("overflow_f16")), "-o",
                                       str(tmp_path / "m"), "--dtype", "bf16", "--quiet"])
    assert result.exit_code == 0, result.output


def test_adapter_for_another_architecture(qwen2_dir: Path, llama3_f32_untied_dir: Path, tmp_path: Path) -> None:
    adapter = adapters.build_foreign_arch_adapter(qwen2_dir, tmp_path / "qwen_adapter")
    out = tmp_path / "merged"
    assert_refused(["merge", str(llama3_f32_untied_dir), str(adapter), "-o", str(out)],
                   ("Qwen2ForCausalLM", "LlamaForCausalLM"), out)


def test_dora_on_an_embedding_is_refused(built: Callable[[str], Path], llama3_f32_untied_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert_refused(["merge", str(llama3_f32_untied_dir), str(built("dora_embed_lm_head")), "-o", str(out)],
                   ("model.embed_tokens", "DoRA embedding"), out)


def test_missing_adapter_folder(llama3_f32_untied_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert_refused(["merge", str(llama3_f32_untied_dir), str(tmp_path / "nope"), "-o", str(out)], ("not a folder",), out)


def test_resized_embedding_lora_without_the_resized_rows(built: Callable[[str], Path], llama2_spm_dir: Path,
                                                         tmp_path: Path) -> None:
    """An embed_tokens LoRA trained on a resized vocabulary, with the saved (resized) base layers stripped."""
    from safetensors.torch import load_file, save_file
    import shutil

    adapter = tmp_path / "stripped"
    shutil.copytree(built("resized_targeted"), adapter)
    tensors = {k: v for k, v in load_file(adapter / "adapter_model.safetensors").items() if "base_layer" not in k}
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "merged"
    assert_refused(["merge", str(llama2_spm_dir), str(adapter), "-o", str(out)],
                   ("resized to 32003", "modules_to_save"), out)


def test_existing_output_needs_force(built: Callable[[str], Path], llama3_f32_untied_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["merge", str(llama3_f32_untied_dir), str(built("plain")), "-o", str(out)])
    assert result.exit_code == 1 and "--force" in result.output
    assert (out / "keep.txt").read_text() == "mine"


def test_activated_lora_is_not_merged(built: Callable[[str], Path], llama3_f32_untied_dir: Path, tmp_path: Path) -> None:
    """An aLoRA acts only after its invocation tokens; merged into the weights it would act everywhere."""
    import json
    import shutil

    adapter = tmp_path / "alora"
    shutil.copytree(built("plain"), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "alora_invocation_tokens": [5, 9]}))
    out = tmp_path / "merged"
    assert_refused(["merge", str(llama3_f32_untied_dir), str(adapter), "-o", str(out)], ("activated LoRA", "convert-lora"), out)


def _base_with_nan(src: Path, dest: Path, name: str, index: tuple[int, ...]) -> Path:
    shutil.copytree(src, dest)
    tensors = load_file(dest / "model.safetensors")
    tensors[name] = tensors[name].copy()
    tensors[name][index] = np.nan
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def _read_merged(folder: Path) -> dict[str, np.ndarray]:
    return {k: v for shard in folder.glob("*.safetensors") for k, v in load_file(shard).items()}


@pytest.mark.parametrize("name, index", [("model.layers.0.self_attn.q_proj.weight", (2, 5)), ("model.norm.weight", (7,))])
def test_a_nan_in_the_base_is_the_checkpoint_s_fault(name: str, index: tuple[int, ...], built: Callable[[str], Path],
                                                     llama3_f32_untied_dir: Path, tmp_path: Path) -> None:
    """q_proj is merged with a delta, the norm passes through untouched: both are checked on the way out."""
    base = _base_with_nan(llama3_f32_untied_dir, tmp_path / "base", name, index)
    out = tmp_path / "merged"
    assert_refused(["merge", str(base), str(built("plain")), "-o", str(out)],
                   (f"tensor {name!r} holds NaN or Inf values (first at {list(index)})", "--allow-non-finite"), out)
    result = CliRunner().invoke(main, ["merge", str(base), str(built("plain")), "-o", str(out), "--quiet",
                                       "--allow-non-finite"])
    assert result.exit_code == 0, result.output
    assert np.isnan(_read_merged(out)[name][index])


def test_allow_non_finite_writes_the_adapter_s_nan(bad: Callable[[str], Path], llama3_f32_untied_dir: Path,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(llama3_f32_untied_dir), str(bad("nan")), "-o", str(out), "--quiet",
                                       "--allow-non-finite"])
    assert result.exit_code == 0, result.output
    column = np.isnan(_read_merged(out)[adapters.NAN_TENSOR])
    assert column.any(axis=0).sum() == 1 and column.all(axis=0).any()  # one whole column, as the adapter's NaN makes
