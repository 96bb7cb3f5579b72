"""Which path a kernel call takes: without triton (or on CPU tensors with a device-decorated kernel) the
PyTorch one."""

from __future__ import annotations

import torch

from mt.kernels import _triton


def test_without_triton_every_call_takes_the_pytorch_path(kernels, monkeypatch):
    kernel = kernels.swiglu._swiglu_forward
    assert _triton.triton_runs(kernel, torch.ones(2))  # interpreted: runs on CPU tensors
    monkeypatch.setattr(_triton, "triton", None)
    assert not _triton.triton_runs(kernel, torch.ones(2))


def test_device_decorated_kernel_does_not_take_cpu_tensors(device_kernels):
    kernel = device_kernels("swiglu")._swiglu_forward
    assert not _triton.is_interpreted(kernel)
    assert not _triton.triton_runs(kernel, torch.ones(2), torch.ones(2))
