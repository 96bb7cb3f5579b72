"""SwiGLU: the Triton kernels (interpreted) against the reference, forward and gradients."""

from __future__ import annotations

import pytest
import torch

from mt.kernels.errors import KernelInputError
from mt.kernels.swiglu import swiglu_reference
from tests.kernels.helpers import assert_close, forward_and_grads


def in_float32(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The reference computed in float32 on the same values and rounded once, as the kernel does. (In bf16 the
    reference rounds silu(gate) before the product, which alone moves some outputs by 2 ulp, > 1e-2 relative.)"""
    return swiglu_reference(gate.float(), up.float()).to(gate.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 96), (1500,), (2, 1, 1031)])  # not multiples of the 1024 block
def test_forward_and_gradients_match_reference(kernels, dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    gate = (torch.randn(shape, generator=g) * 4).to(dtype)  # reaches the tails of the sigmoid
    up = torch.randn(shape, generator=g).to(dtype)
    upstream = torch.randn(shape, generator=g)
    out, grads = forward_and_grads(kernels.swiglu.swiglu, [gate, up], upstream, grad_of=[0, 1])
    ref, grads_ref = forward_and_grads(in_float32, [gate, up], upstream, grad_of=[0, 1])
    assert_close(out, ref, dtype, "h")
    assert_close(grads[0], grads_ref[0], dtype, "dgate")
    assert_close(grads[1], grads_ref[1], dtype, "dup")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy exp(200) = inf, as intended
def test_extreme_gates_stay_finite(kernels):
    gate = torch.tensor([-200.0, -90.0, 0.0, 90.0, 200.0])
    up = torch.ones(5)
    out, (dgate, dup) = forward_and_grads(kernels.swiglu.swiglu, [gate, up], None, grad_of=[0, 1])
    ref, (dgate_ref, dup_ref) = forward_and_grads(swiglu_reference, [gate, up], None, grad_of=[0, 1])
    assert torch.isfinite(out).all() and torch.isfinite(dgate).all()
    assert_close(out, ref, torch.float32, "h")
    assert_close(dgate, dgate_ref, torch.float32, "dgate")


def test_shape_mismatch_is_refused(kernels):
    with pytest.raises(KernelInputError, match="must have one shape and dtype"):
        kernels.swiglu.swiglu(torch.ones(4, 8), torch.ones(4, 9))


def test_cpu_without_interpreter_is_the_reference(device_kernels):
    module = device_kernels("swiglu")  # decorated for a real device: CPU tensors take the reference
    gate, up = torch.randn(5, 33), torch.randn(5, 33)
    assert torch.equal(module.swiglu(gate, up), swiglu_reference(gate, up))
