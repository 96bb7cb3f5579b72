"""Where quantization runs: `--device auto|cpu|cuda`.

auto picks CUDA when an NVIDIA device node exists and torch + triton can use it; the CPU path never
imports torch when there is clearly no GPU (the import alone costs ~1.5 s). The GPU path handles
Q8_0, Q4_K, Q5_K and Q6_K (mt/quant/triton_quant.py); every other type stays on the CPU.
"""

from __future__ import annotations

import glob
import importlib.util
import warnings
from typing import TYPE_CHECKING

import numpy as np
from gguf import GGMLQuantizationType as T

from mt.errors import DeviceUnavailable, NonFiniteWeights
from mt.quant.types import types_with

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")
GPU_TYPES = types_with("triton")
GPU_SLAB_VALUES = 1 << 24  # values per upload: bounds GPU memory at ~0.5 GB per slab
STORAGE_DTYPES = {"BF16": np.int16, "F16": np.float16, "F32": np.float32}


class GpuQuantizer:
    """Quantizes row slabs with the Triton kernels on one torch device (cuda, or cpu under TRITON_INTERPRET=1)."""

    def __init__(self, device: str = "cuda") -> None:
        import torch

        from mt.quant import triton_quant

        self._torch = torch
        self._kernels = triton_quant
        self.device = torch.device(device)

    def handles(self, ggml_type: T, n_per_row: int) -> bool:
        return ggml_type in GPU_TYPES and n_per_row % self._kernels.SHAPES[ggml_type][0] == 0

    def quantize(self, raw: np.ndarray, storage: str, ggml_type: T, n_per_row: int, tensor_name: str | None = None) -> np.ndarray:
        """Rows in their storage type (BF16 bits, F16, F32; any array or raw bytes) -> uint8 [rows, row bytes].

        With `tensor_name`, a NaN or Inf value is an error naming the tensor (mt quantize's check).
        """
        torch = self._torch
        block_size, type_size, _ = self._kernels.SHAPES[ggml_type]
        flat = np.ascontiguousarray(raw).reshape(-1).view(STORAGE_DTYPES[storage])
        n_rows = flat.size // n_per_row
        out = np.empty((n_rows, n_per_row // block_size * type_size), dtype=np.uint8)
        rows_per_slab = max(1, GPU_SLAB_VALUES // n_per_row)
        for start in range(0, n_rows, rows_per_slab):
            stop = min(n_rows, start + rows_per_slab)
            values = self._to_f32(flat[start * n_per_row : stop * n_per_row], storage)
            if tensor_name is not None and not bool(torch.isfinite(values).all()):
                raise NonFiniteWeights(tensor_name)
            packed = self._kernels.quantize_blocks(values.view(-1, block_size), ggml_type)
            out[start:stop] = packed.view(stop - start, -1).cpu().numpy()
        return out

    def _to_f32(self, raw: np.ndarray, storage: str) -> "torch.Tensor":
        """Upload, then widen on the device (bf16 bits << 16 is exact, NaN payloads included)."""
        torch = self._torch
        with warnings.catch_warnings():  # slabs read from a file are read-only; torch only reads them
            warnings.simplefilter("ignore", UserWarning)
            on_device = torch.from_numpy(raw).to(self.device)
        if storage == "BF16":
            return (on_device.to(torch.int32) << 16).view(torch.float32)
        return on_device.to(torch.float32)


def cuda_unusable_reason(probe_nodes: bool = True) -> str | None:
    """Why the CUDA path cannot run here, or None when it can."""
    if probe_nodes and not glob.glob("/dev/nvidia[0-9]*"):
        return "no NVIDIA GPU found (no /dev/nvidia* device)"
    for module in ("torch", "triton"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return None


def select_device(name: str) -> GpuQuantizer | None:
    """auto | cpu | cuda -> a GPU quantizer, or None for the CPU path."""
    if name not in DEVICES:
        raise DeviceUnavailable(f"unknown device {name!r}", f"choose one of {', '.join(DEVICES)}")
    if name == "cpu":
        return None
    reason = cuda_unusable_reason(probe_nodes=name == "auto")
    if reason is None:
        return GpuQuantizer("cuda")
    if name == "cuda":
        raise DeviceUnavailable(f"--device cuda: {reason}", "install a CUDA build of torch with triton, or use --device cpu")
    return None
