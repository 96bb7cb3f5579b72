"""RMSNorm: the Triton kernels (interpreted) against the PyTorch reference, forward and gradients."""

from __future__ import annotations

import pytest
import torch

from mt.kernels.errors import KernelInputError
from mt.kernels.rms_norm import rms_norm_reference
from tests.kernels.helpers import assert_close, forward_and_grads


def inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    weight = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(dtype)
    upstream = torch.randn(shape, generator=g)
    return [x, weight, upstream]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,offset", [((37, 96), 0.0), ((2, 5, 64), 1.0), ((3, 130), 0.0)])
def test_forward_and_gradients_match_reference(kernels, dtype, shape, offset):
    x, weight, upstream = inputs(shape, dtype, seed=len(shape) * 100 + shape[-1])
    eps = 1e-6
    fast = lambda x, w: kernels.rms_norm.rms_norm(x, w, eps, offset)
    slow = lambda x, w: rms_norm_reference(x, w, eps, offset)
    out, (dx, dw) = forward_and_grads(fast, [x, weight], upstream, grad_of=[0, 1])
    ref, (dx_ref, dw_ref) = forward_and_grads(slow, [x, weight], upstream, grad_of=[0, 1])
    assert_close(out, ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dx")
    assert_close(dw, dw_ref, dtype, "dweight")


def test_gemma_offset_is_one_plus_weight(kernels):
    """offset=1 with weight w equals offset=0 with weight 1 + w (Gemma stores w - 1)."""
    x, weight, _ = inputs((4, 32), torch.float32, seed=3)
    assert torch.allclose(kernels.rms_norm.rms_norm(x, weight, 1e-6, offset=1.0),
                          kernels.rms_norm.rms_norm(x, 1 + weight, 1e-6), atol=1e-6)


def test_reference_equals_transformers_llama_rmsnorm():
    """The reference against transformers' own module (float32, where both round only at the end)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, weight, _ = inputs((5, 48), torch.float32, seed=4)
    module = LlamaRMSNorm(48, eps=1e-5)
    module.weight.data.copy_(weight)
    assert torch.allclose(rms_norm_reference(x, weight, 1e-5), module(x), atol=1e-6, rtol=1e-6)


def test_non_contiguous_rows_and_frozen_weight(kernels):
    """x a strided view (every other row), weight without grad: dx still matches, no dweight is made."""
    base, weight, _ = inputs((10, 64), torch.float32, seed=5)
    x = base[::2]
    out, (dx,) = forward_and_grads(lambda x, w: kernels.rms_norm.rms_norm(x, w, 1e-6), [x, weight], None, [0])
    ref, (dx_ref,) = forward_and_grads(lambda x, w: rms_norm_reference(x, w, 1e-6), [x, weight], None, [0])
    assert_close(out, ref, torch.float32, "y")
    assert_close(dx, dx_ref, torch.float32, "dx")


def test_output_view_can_be_rotated_in_place_with_gradients(kernels):
    """Qwen3 normalizes q per head and rotates a transposed view of the result in place: the output must not be
    a view made inside the autograd Function (autograd forbids modifying those in place)."""
    x, weight, upstream = inputs((2, 5, 4, 32), torch.float32, seed=11)

    def normed_then_doubled_in_place(norm):
        leaf = x.clone().requires_grad_()
        y = norm(leaf * 1, weight, 1e-6).transpose(1, 2)
        y.mul_(2.0)
        (y * upstream.transpose(1, 2)).sum().backward()
        return y.detach(), leaf.grad

    fast = normed_then_doubled_in_place(kernels.rms_norm.rms_norm)
    slow = normed_then_doubled_in_place(rms_norm_reference)
    assert_close(fast[0], slow[0], torch.float32, "y")
    assert_close(fast[1], slow[1], torch.float32, "dx")


def test_weight_that_does_not_fit_is_refused(kernels):
    with pytest.raises(KernelInputError, match=r"weight \(63,\) does not fit x \(4, 64\)"):
        kernels.rms_norm.rms_norm(torch.ones(4, 64), torch.ones(63), 1e-6)


def test_cpu_without_interpreter_is_the_reference(device_kernels):
    module = device_kernels("rms_norm")  # decorated for a real device: CPU tensors take the reference
    x, weight, _ = inputs((3, 40), torch.bfloat16, seed=6)
    assert torch.equal(module.rms_norm(x, weight, 1e-6, 1.0), rms_norm_reference(x, weight, 1e-6, 1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_with_offset_one_equals_transformers_gemma_rmsnorm(dtype):
    """Gemma computes x * rstd * (1 + w) in float32 and rounds once, as the reference does: equal bits."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    x, weight, _ = inputs((5, 48), dtype, seed=7)
    module = GemmaRMSNorm(48, eps=1e-6).to(dtype)
    module.weight.data.copy_(weight)
    assert torch.equal(rms_norm_reference(x, weight, 1e-6, offset=1.0), module(x))
