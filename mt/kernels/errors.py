"""The error the kernels raise for inputs they cannot take (shapes, dtypes, an index out of range)."""

from __future__ import annotations

from mt.errors import MtError


class KernelInputError(MtError):
    """A kernel was handed tensors whose shapes, dtypes or indices do not fit together."""
