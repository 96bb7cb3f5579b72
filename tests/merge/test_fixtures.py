"""Smoke tests of the adapter builders: peft writes what the docstring of adapters.py says, reloads it,
and its merge is the plain arithmetic (W + scaling * B @ A, DoRA's row norms) computed here by hand."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from peft import PeftModel

from tests.merge import adapters
from tests.merge.adapters import ALL_SPECS, PEFT_PREFIX, lora_scaling
from tests.merge.conftest import base_for as _base

Q0 = "model.layers.0.self_attn.q_proj"
EMBED, LM_HEAD = "model.embed_tokens", "lm_head"
LORA_PAIR = (f"{Q0}.lora_A.weight", f"{Q0}.lora_B.weight")
EMBED_LORA = (f"{EMBED}.lora_embedding_A", f"{EMBED}.lora_embedding_B", f"{EMBED}.base_layer.weight")
LM_HEAD_LORA = (f"{LM_HEAD}.lora_A.weight", f"{LM_HEAD}.lora_B.weight", f"{LM_HEAD}.base_layer.weight")
LINEAR_WEIGHTS = tuple(f"{Q0.rsplit('.', 2)[0]}.{part}.weight" for part in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
NEW_VOCAB = 32000 + len(adapters.ADDED_TOKENS)


class Expect(NamedTuple):
    keys: tuple[str, ...]  # adapter tensor names (after PEFT_PREFIX) that must be there
    changed: tuple[str, ...]  # merged tensors that must differ from the base's
    unchanged: tuple[str, ...] = ()


EXPECT: dict[str, Expect] = {
    "plain": Expect(LORA_PAIR, LINEAR_WEIGHTS, (f"{EMBED}.weight", f"{LM_HEAD}.weight")),
    "all_linear_rslora": Expect(LORA_PAIR, LINEAR_WEIGHTS, (f"{LM_HEAD}.weight",)),
    "dora": Expect((*LORA_PAIR, f"{Q0}.lora_magnitude_vector"), LINEAR_WEIGHTS),
    "patterns": Expect(LORA_PAIR, LINEAR_WEIGHTS),
    "embed_lm_head": Expect((*LORA_PAIR, *EMBED_LORA, *LM_HEAD_LORA),
                            (f"{EMBED}.weight", f"{LM_HEAD}.weight", f"{Q0}.weight"),
                            ("model.layers.0.self_attn.k_proj.weight",)),
    "dora_embed_lm_head": Expect(
        (*EMBED_LORA, *LM_HEAD_LORA, f"{EMBED}.lora_magnitude_vector", f"{LM_HEAD}.lora_magnitude_vector"),
        (f"{EMBED}.weight", f"{LM_HEAD}.weight")),
    "modules_to_save": Expect((*LORA_PAIR, f"{LM_HEAD}.weight"), (f"{LM_HEAD}.weight", f"{Q0}.weight"), (f"{EMBED}.weight",)),
    "lora_bias": Expect((*LORA_PAIR, f"{Q0}.lora_B.bias"), (f"{Q0}.weight", f"{Q0}.bias"),
                        ("model.layers.0.self_attn.o_proj.weight",)),
    "bf16_adapter": Expect(LORA_PAIR, LINEAR_WEIGHTS),
    "resized_saved": Expect((f"{EMBED}.weight", f"{LM_HEAD}.weight", f"{LM_HEAD}.modules_to_save.weight",
                             f"{LM_HEAD}.original_module.weight"), (f"{EMBED}.weight", f"{LM_HEAD}.weight")),
    "resized_targeted": Expect((*EMBED_LORA, *LM_HEAD_LORA), (f"{EMBED}.weight", f"{LM_HEAD}.weight")),
    "resized_auto": Expect((*LORA_PAIR, f"{EMBED}.weight", f"{LM_HEAD}.weight"), (f"{EMBED}.weight", f"{LM_HEAD}.weight")),
    # tied: one shared tensor, which the unaliased state dict names model.embed_tokens.weight
    "tied_embed_lm_head": Expect((*EMBED_LORA, *LM_HEAD_LORA), (f"{EMBED}.weight",)),
    "tied_dora_lm_head": Expect((*LM_HEAD_LORA, f"{LM_HEAD}.lora_magnitude_vector"), (f"{EMBED}.weight",)),
    "tied_modules_to_save": Expect((f"{LM_HEAD}.weight",), (f"{LM_HEAD}.weight",), (f"{EMBED}.weight",)),
}


def _base_state(base: Path) -> dict[str, torch.Tensor]:
    return adapters.unaliased(adapters.load_base(base, torch.float32).state_dict())


def test_every_spec_has_expectations() -> None:
    assert set(EXPECT) == set(ALL_SPECS)


@pytest.mark.parametrize("name", list(ALL_SPECS))
def test_builder_output_reloads_and_merges(name: str, built: Callable[[str], Path], request: pytest.FixtureRequest) -> None:
    adapter, base, expect = built(name), _base(request, name), EXPECT[name]
    config, tensors = adapters.read_adapter(adapter)
    assert config["peft_type"] == "LORA"
    missing = [k for k in expect.keys if PEFT_PREFIX + k not in tensors]
    assert not missing, f"{name}: peft did not write {missing}; it wrote {sorted(tensors)[:12]}"
    before, merged = _base_state(base), adapters.peft_merged_state_dict(base, adapter)
    assert all(torch.isfinite(t).all() for t in merged.values())
    for key in expect.changed:
        assert key not in before or before[key].shape != merged[key].shape or not torch.equal(before[key], merged[key]), key
    for key in expect.unchanged:
        assert torch.equal(before[key], merged[key]), key


def _lora_delta(config: dict, tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    a, b = (tensors[f"{PEFT_PREFIX}{module}.lora_{x}.weight"].double() for x in "AB")
    return lora_scaling(config, module) * (b @ a)


@pytest.mark.parametrize("name, module", [
    ("plain", Q0),
    ("all_linear_rslora", "model.layers.1.mlp.down_proj"),
    ("patterns", Q0),  # rank 4 from rank_pattern
    ("patterns", "model.layers.0.mlp.up_proj"),  # alpha 40 from alpha_pattern
    ("patterns", "model.layers.1.mlp.down_proj"),  # rank 2
    ("bf16_adapter", "model.layers.0.mlp.gate_proj"),
])
def test_merge_is_base_plus_scaled_ba(name: str, module: str, built: Callable[[str], Path],
                                      request: pytest.FixtureRequest) -> None:
    adapter, base = built(name), _base(request, name)
    config, tensors = adapters.read_adapter(adapter)
    key = f"{module}.weight"
    expected = _base_state(base)[key].double() + _lora_delta(config, tensors, module)
    got = adapters.peft_merged_state_dict(base, adapter)[key].double()
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_dora_merge_rescales_rows_to_the_magnitude(built: Callable[[str], Path], request: pytest.FixtureRequest) -> None:
    """DoRA: W' = m * (W + s·BA) / ||W + s·BA|| with the norm of each output row."""
    adapter, base = built("dora"), _base(request, "dora")
    config, tensors = adapters.read_adapter(adapter)
    module = "model.layers.1.self_attn.v_proj"
    combined = _base_state(base)[f"{module}.weight"].double() + _lora_delta(config, tensors, module)
    magnitude = tensors[f"{PEFT_PREFIX}{module}.lora_magnitude_vector"].double()
    expected = combined * (magnitude / combined.norm(dim=1))[:, None]
    got = adapters.peft_merged_state_dict(base, adapter)[f"{module}.weight"].double()
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_lora_bias_adds_scaled_bias(built: Callable[[str], Path], request: pytest.FixtureRequest) -> None:
    adapter, base = built("lora_bias"), _base(request, "lora_bias")
    config, tensors = adapters.read_adapter(adapter)
    lora_bias = tensors[f"{PEFT_PREFIX}{Q0}.lora_B.bias"].double()
    expected = _base_state(base)[f"{Q0}.bias"].double() + lora_scaling(config, Q0) * lora_bias
    got = adapters.peft_merged_state_dict(base, adapter)[f"{Q0}.bias"].double()
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()


def _embedding_delta(config: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    a, b = (tensors[f"{PEFT_PREFIX}{EMBED}.lora_embedding_{x}"].double() for x in "AB")
    return lora_scaling(config, EMBED) * (b @ a).T


def test_tied_base_gets_both_deltas_in_its_one_matrix(built: Callable[[str], Path], request: pytest.FixtureRequest) -> None:
    """The adapters.py docstring's claim: tied W' = W + Δembed + Δlm_head, still one tensor, still tied."""
    adapter, base = built("tied_embed_lm_head"), _base(request, "tied_embed_lm_head")
    config, tensors = adapters.read_adapter(adapter)
    shared = _base_state(base)[f"{EMBED}.weight"].double()
    expected = shared + _embedding_delta(config, tensors) + _lora_delta(config, tensors, LM_HEAD)
    model = adapters.peft_merged_model(base, adapter)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    merged = adapters.unaliased(model.state_dict())
    assert f"{LM_HEAD}.weight" not in merged
    assert (merged[f"{EMBED}.weight"].double() - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_tied_base_with_lm_head_in_modules_to_save_comes_out_untied(built: Callable[[str], Path],
                                                                     request: pytest.FixtureRequest) -> None:
    adapter, base = built("tied_modules_to_save"), _base(request, "tied_modules_to_save")
    _, tensors = adapters.read_adapter(adapter)
    model = adapters.peft_merged_model(base, adapter)
    assert not model.config.tie_word_embeddings
    merged = adapters.unaliased(model.state_dict())
    assert torch.equal(merged[f"{LM_HEAD}.weight"], tensors[f"{PEFT_PREFIX}{LM_HEAD}.weight"].float())
    assert torch.equal(merged[f"{EMBED}.weight"], _base_state(base)[f"{EMBED}.weight"])


@pytest.mark.parametrize("name", ["resized_saved", "resized_targeted", "resized_auto"])
def test_resized_vocabulary_reaches_the_merge(name: str, built: Callable[[str], Path], request: pytest.FixtureRequest) -> None:
    adapter, base = built(name), _base(request, name)
    assert (adapter / "tokenizer.json").is_file()
    model = adapters.peft_merged_model(base, adapter)
    assert model.config.vocab_size == NEW_VOCAB
    merged = adapters.unaliased(model.state_dict())
    assert merged[f"{EMBED}.weight"].shape == merged[f"{LM_HEAD}.weight"].shape == (NEW_VOCAB, 64)
    old = _base_state(base)[f"{EMBED}.weight"]
    new_rows = merged[f"{EMBED}.weight"][32000:]
    assert torch.isfinite(new_rows).all() and new_rows.abs().max() > 0  # NaN if peft had not loaded them
    if name == "resized_saved":  # the trained copy replaces the tensor, old rows included
        _, tensors = adapters.read_adapter(adapter)
        assert torch.equal(merged[f"{EMBED}.weight"], tensors[f"{PEFT_PREFIX}{EMBED}.weight"].float())
        assert not torch.equal(merged[f"{EMBED}.weight"][:32000], old)


# ---------------------------------------------------------------- bad adapters


def _peft_load(base: Path, adapter: Path) -> PeftModel:
    return PeftModel.from_pretrained(adapters.load_base(base, torch.float32), str(adapter))


def _check_shape_mismatch(base: Path, adapter: Path) -> None:
    with pytest.raises(RuntimeError, match="size mismatch"):
        _peft_load(base, adapter)


def _check_missing_module(base: Path, adapter: Path) -> None:
    _, tensors = adapters.read_adapter(adapter)
    assert f"{PEFT_PREFIX}{adapters.MISSING_MODULE}.lora_A.weight" in tensors
    with pytest.warns(UserWarning, match="missing adapter keys"):
        _peft_load(base, adapter)


def _check_lora_bias_without_base_bias(base: Path, adapter: Path) -> None:
    with pytest.raises(RuntimeError, match="base layer has no bias"):
        _peft_load(base, adapter).merge_and_unload()


def _check_peft_type(expected: str) -> Callable[[Path, Path], None]:
    def check(base: Path, adapter: Path) -> None:
        config, _ = adapters.read_adapter(adapter)
        assert config["peft_type"] == expected
        _peft_load(base, adapter)

    return check


def _check_no_weights(base: Path, adapter: Path) -> None:
    assert not (adapter / adapters.WEIGHTS_NAME).exists() and (adapter / adapters.CONFIG_NAME).exists()
    with pytest.raises(ValueError):
        _peft_load(base, adapter)


def _check_no_config(base: Path, adapter: Path) -> None:
    assert (adapter / adapters.WEIGHTS_NAME).exists() and not (adapter / adapters.CONFIG_NAME).exists()
    with pytest.raises(ValueError, match="adapter_config.json"):
        _peft_load(base, adapter)


def _check_pickle_only(base: Path, adapter: Path) -> None:
    assert (adapter / "adapter_model.bin").is_file() and not (adapter / adapters.WEIGHTS_NAME).exists()
    _peft_load(base, adapter)


def _nonfinite_after_cast(base: Path, adapter: Path, dtype: torch.dtype) -> list[str]:
    merged = adapters.peft_merged_state_dict(base, adapter)
    return [name for name, t in merged.items() if not torch.isfinite(t.to(dtype)).all()]


def _check_overflow_f16(base: Path, adapter: Path) -> None:
    assert _nonfinite_after_cast(base, adapter, torch.float32) == []
    assert _nonfinite_after_cast(base, adapter, torch.bfloat16) == []
    assert _nonfinite_after_cast(base, adapter, torch.float16) == [adapters.OVERFLOW_TENSOR]


def _check_nan(base: Path, adapter: Path) -> None:
    assert _nonfinite_after_cast(base, adapter, torch.float32) == [adapters.NAN_TENSOR]


def _check_rank(expected: int) -> Callable[[Path, Path], None]:
    def check(base: Path, adapter: Path) -> None:
        config, _ = adapters.read_adapter(adapter)
        assert config["r"] == expected
        with pytest.raises(ValueError, match="`r` should be a positive integer"):
            _peft_load(base, adapter)

    return check


def _check_alpha_pattern_regex(base: Path, adapter: Path) -> None:
    config, _ = adapters.read_adapter(adapter)
    assert list(config["alpha_pattern"]) == ["q_proj("]
    with pytest.raises(re.error):
        _peft_load(base, adapter)


def _check_rank_zero_tensors(base: Path, adapter: Path) -> None:
    _, tensors = adapters.read_adapter(adapter)
    assert tensors[f"{PEFT_PREFIX}{adapters.NAN_TENSOR.removesuffix('.weight')}.lora_A.weight"].shape[0] == 0
    with pytest.raises(RuntimeError, match="size mismatch"):
        _peft_load(base, adapter)


BAD_CHECKS: dict[str, Callable[[Path, Path], None]] = {
    "shape_mismatch": _check_shape_mismatch,
    "missing_module": _check_missing_module,
    "lora_bias_without_base_bias": _check_lora_bias_without_base_bias,
    "ia3": _check_peft_type("IA3"),
    "prompt_tuning": _check_peft_type("PROMPT_TUNING"),
    "no_weights": _check_no_weights,
    "no_config": _check_no_config,
    "pickle_only": _check_pickle_only,
    "overflow_f16": _check_overflow_f16,
    "nan": _check_nan,
    "rank_zero": _check_rank(0),
    "rank_negative": _check_rank(-4),
    "alpha_pattern_regex": _check_alpha_pattern_regex,
    "rank_zero_tensors": _check_rank_zero_tensors,
}


def test_every_bad_adapter_has_a_check() -> None:
    assert set(BAD_CHECKS) == set(adapters.BAD_ADAPTERS)


@pytest.mark.parametrize("kind", list(adapters.BAD_ADAPTERS))
def test_bad_adapter_is_what_it_claims(kind: str, llama3_f32_untied_dir: Path, tmp_path: Path) -> None:
    adapter = adapters.build_bad_adapter(kind, llama3_f32_untied_dir, tmp_path / kind)
    BAD_CHECKS[kind](llama3_f32_untied_dir, adapter)


def test_foreign_arch_adapter_names_qwen2_but_peft_merges_it_into_llama(qwen2_dir: Path, llama3_f32_untied_dir: Path,
                                                                       tmp_path: Path) -> None:
    adapter = adapters.build_foreign_arch_adapter(qwen2_dir, tmp_path / "qwen2-adapter")
    config, _ = adapters.read_adapter(adapter)
    assert config["auto_mapping"]["base_model_class"] == "Qwen2ForCausalLM"
    merged = adapters.peft_merged_state_dict(llama3_f32_untied_dir, adapter)
    assert not torch.equal(merged[f"{Q0}.weight"], _base_state(llama3_f32_untied_dir)[f"{Q0}.weight"])
