"""The kernel modules decorated (and run) under TRITON_INTERPRET=1, so the Triton kernels run on CPU tensors.

TRITON_INTERPRET is read when a kernel is decorated, so the modules are imported (or reloaded) with it set and
dropped from sys.modules afterwards; tests reach them through the `kernels` fixture, never a top-level import.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

KERNEL_MODULES = ("rms_norm", "rope", "swiglu", "geglu", "lora_linear", "cross_entropy")


class InterpretedKernels:
    """`kernels.rms_norm` etc.: each module imported on first use, while TRITON_INTERPRET=1 is set."""

    def __getattr__(self, name: str) -> ModuleType:
        if name not in KERNEL_MODULES:
            raise AttributeError(name)
        module = importlib.import_module(f"mt.kernels.{name}")
        setattr(self, name, module)
        return module


@pytest.fixture(scope="package")
def kernels() -> InterpretedKernels:
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    names = [f"mt.kernels.{name}" for name in KERNEL_MODULES]
    try:
        for name in names:
            sys.modules.pop(name, None)
        yield InterpretedKernels()
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
        for name in names:
            sys.modules.pop(name, None)  # a later import decorates for the real device again


@pytest.fixture
def device_kernels(kernels):
    """`device_kernels("rope")`: the module decorated for a real device (TRITON_INTERPRET unset while it is
    imported): CPU tensors then take the PyTorch path. Taken after `kernels`, and dropped again afterwards."""
    loaded = []

    def load(name: str) -> ModuleType:
        module_name = f"mt.kernels.{name}"
        saved = os.environ.pop("TRITON_INTERPRET", None)
        try:
            sys.modules.pop(module_name, None)
            module = importlib.import_module(module_name)
        finally:
            if saved is not None:
                os.environ["TRITON_INTERPRET"] = saved
        loaded.append(module_name)
        return module

    yield load
    for module_name in loaded:
        sys.modules.pop(module_name, None)
