"""Triton, when installed, and the one rule every kernel module dispatches by.

A kernel runs through Triton when its tensors are on a CUDA device, or when the kernel was decorated under
TRITON_INTERPRET=1 (Triton's interpreter then runs it on CPU tensors, as the tests do); otherwise the caller
takes the PyTorch path. Without triton installed every call takes the PyTorch path.

Kernels use only Triton builtins (tl.reduce with the standard combine functions, tl.full, tl.exp ...), never
the @jit helpers of triton's standard library (tl.sum, tl.max, tl.zeros, tl.sigmoid): the interpreter cannot
call those when triton was imported before TRITON_INTERPRET was set, which a test session does.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch paths still work
    triton = None
    tl = None


def jit(fn: Callable[..., Any]) -> Any:
    """triton.jit when triton is installed; the bare function (never launched) otherwise."""
    return triton.jit(fn) if triton is not None else fn


def is_interpreted(kernel: Any) -> bool:
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def triton_runs(kernel: Any, *tensors: torch.Tensor) -> bool:
    """Whether `kernel` can run on these tensors (all on CUDA, or the kernel is interpreted)."""
    if triton is None:
        return False
    return is_interpreted(kernel) or all(t.is_cuda for t in tensors)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
