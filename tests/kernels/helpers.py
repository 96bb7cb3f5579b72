"""Comparison helpers shared by the kernel tests: tolerance per dtype, forward + gradients of a callable."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 sums: bool = False) -> None:
    """|a - e| <= tol * (|e| + floor) elementwise, tol per dtype. floor is 1 for elementwise results; for sums of
    many products (matmul outputs, gradients through them; sums=True) it is the RMS of e, since their rounding
    error scales with the terms summed, not with a result that cancels to near zero."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    tol = TOLERANCE[dtype]
    a, e = actual.double(), expected.double()
    floor = e.pow(2).mean().sqrt().item() if sums else 1.0
    excess = (a - e).abs() - tol * (e.abs() + floor)
    worst = excess.max().item() if excess.numel() else 0.0
    diff = (a - e).abs().max().item()
    assert worst <= 0, f"{what}: max |diff| {diff:.3g} over tolerance {tol} ({dtype}, floor {floor:.3g})"


def forward_and_grads(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], upstream: torch.Tensor | None,
                      grad_of: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fn(*fresh copies of inputs), then the gradients of sum(out * upstream) for the inputs listed in grad_of."""
    leaves = [t.detach().clone().requires_grad_(i in grad_of) for i, t in enumerate(inputs)]
    out = fn(*leaves)
    loss = out.float().sum() if upstream is None else (out.float() * upstream.float()).sum()
    loss.backward()
    return out.detach(), [leaves[i].grad for i in grad_of]
