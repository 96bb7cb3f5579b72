"""GeGLU: the Triton kernels (interpreted) against the reference (torch's tanh-approximated GELU), forward and
gradients, and against float64 autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mt.kernels.errors import KernelInputError
from mt.kernels.geglu import geglu_reference
from tests.kernels.helpers import assert_close, forward_and_grads

# gates below about -10 make exp(-2u) overflow to inf in the interpreter's numpy, giving s = 0 as intended
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")


def in_float32(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The reference computed in float32 on the same values and rounded once, as the kernel does."""
    return geglu_reference(gate.float(), up.float()).to(gate.dtype)


def inputs(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(sum(shape))
    gate = (torch.randn(shape, generator=g) * 4).to(dtype)  # both tails of the GELU
    up = torch.randn(shape, generator=g).to(dtype)
    return gate, up, torch.randn(shape, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 96), (1500,), (2, 1, 1031)])  # not multiples of the 1024 block
def test_forward_and_gradients_match_reference(kernels, dtype, shape):
    gate, up, upstream = inputs(shape, dtype)
    out, grads = forward_and_grads(kernels.geglu.geglu, [gate, up], upstream, grad_of=[0, 1])
    ref, grads_ref = forward_and_grads(in_float32, [gate, up], upstream, grad_of=[0, 1])
    assert_close(out, ref, dtype, "h")
    assert_close(grads[0], grads_ref[0], dtype, "dgate")
    assert_close(grads[1], grads_ref[1], dtype, "dup")


def test_float32_matches_float64_autograd(kernels):
    """The hand-written derivative against autograd through 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in
    float64 (written out here, not torch's gelu)."""
    gate, up, upstream = inputs((5, 333), torch.float32)

    def written_out(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3))) * u

    out, grads = forward_and_grads(kernels.geglu.geglu, [gate, up], upstream, grad_of=[0, 1])
    exact, grads_exact = forward_and_grads(written_out, [gate.double(), up.double()], upstream.double(),
                                           grad_of=[0, 1])
    assert_close(out.double(), exact, torch.float32, "h")
    assert_close(grads[0].double(), grads_exact[0], torch.float32, "dgate")
    assert_close(grads[1].double(), grads_exact[1], torch.float32, "dup")
    assert (geglu_reference(gate, up) - F.silu(gate) * up).abs().max() > 0.1  # not SwiGLU under another name


def test_extreme_gates_stay_finite(kernels):
    gate = torch.tensor([-200.0, -12.0, -1e-3, 0.0, 1e-3, 12.0, 200.0])
    up = torch.ones(7)
    out, (dgate, dup) = forward_and_grads(kernels.geglu.geglu, [gate, up], None, grad_of=[0, 1])
    ref, (dgate_ref, dup_ref) = forward_and_grads(geglu_reference, [gate, up], None, grad_of=[0, 1])
    assert torch.isfinite(out).all() and torch.isfinite(dgate).all()
    assert_close(out, ref, torch.float32, "h")
    assert_close(dgate, dgate_ref, torch.float32, "dgate")


def test_shape_mismatch_is_refused(kernels):
    with pytest.raises(KernelInputError, match="must have one shape and dtype"):
        kernels.geglu.geglu(torch.ones(4, 8), torch.ones(4, 9))
    with pytest.raises(KernelInputError, match="must have one shape and dtype"):
        kernels.geglu.geglu(torch.ones(4, 8), torch.ones(4, 8, dtype=torch.bfloat16))


def test_cpu_without_interpreter_is_the_reference(device_kernels):
    module = device_kernels("geglu")  # decorated for a real device: CPU tensors take the reference
    gate, up = torch.randn(5, 33), torch.randn(5, 33)
    assert torch.equal(module.geglu(gate, up), geglu_reference(gate, up))
