"""Every architecture module carries its family record, and the records name what exists."""

from __future__ import annotations

import importlib

import pytest

from mt.convert.arch import MODULES, families
from mt.convert.arch.family import Family
from mt.finetune.families import FAMILIES as LORA_TARGETS
from mt.finetune.patch import FAMILIES as KERNEL_FAMILIES
from mt.merge.qlora import LAYOUTS


@pytest.mark.parametrize("hf_arch", sorted(MODULES))
def test_each_module_has_its_converter_and_its_record(hf_arch):
    module = importlib.import_module(f"mt.convert.arch.{MODULES[hf_arch]}")
    multimodal = getattr(module, "MULTIMODAL", None)
    assert isinstance(module.FAMILY, Family)
    assert callable(module.ARCH if multimodal is None else multimodal.text_arch)


@pytest.mark.parametrize("hf_arch", sorted(h for h, f in families().items() if f.kernels is not None))
def test_kernel_classes_exist_in_transformers(hf_arch):
    kernels = families()[hf_arch].kernels
    modeling = importlib.import_module(kernels.modeling)
    for name in (kernels.norm, kernels.mlp, kernels.attention, hf_arch):
        assert hasattr(modeling, name), f"{kernels.modeling} has no {name}"


def test_the_views_come_from_the_records():
    records = families()
    assert set(LORA_TARGETS) == set(KERNEL_FAMILIES) == {h for h, f in records.items() if f.trainable}
    assert set(LAYOUTS) == {h for h, f in records.items() if f.qlora}
    phi3 = LORA_TARGETS["Phi3ForCausalLM"]
    assert phi3.fused_into["k_proj"] == "qkv_proj" and phi3.fused_into["up_proj"] == "gate_up_proj"
    assert all(part not in phi3.linear for part in phi3.fused_into)
