"""A bitsandbytes 4-bit weight (NF4/FP4) as the LoRA matmul kernel reads it: packed bytes, block scales, code table.

bitsandbytes stores W [out, in] flattened row-major: element i (i = row * in + col) is the high nibble of byte i // 2
when i is even and the low nibble when it is odd, and its value is code[nibble] * absmax[i // blocksize] in float32,
rounded to the quant state's dtype. Blocks run over the flat order, so a block may span rows. With double
quantization (`quant_state.nested`), absmax holds one byte per block and the float32 scale is
state2.code[byte] * state2.absmax[block // state2.blocksize] + offset. These are the formulas of bitsandbytes'
portable backend (backends/default/ops.py), which its CUDA kernels compute too; the code table is the one
bitsandbytes' dequantize_4bit uses for the quant type (`get_4bit_type`), not quant_state.code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from mt.kernels.errors import KernelInputError

QUANT_TYPES = ("nf4", "fp4")
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class NestedScales:
    """Double-quantized block scales: absmax (uint8, one per block) decoded through these."""

    absmax: torch.Tensor  # [ceil(blocks / blocksize)] float32: state2.absmax
    code: torch.Tensor  # [256] float32: state2.code
    offset: torch.Tensor  # [] float32: quant_state.offset
    blocksize: int


@dataclass(frozen=True)
class Packed4bit:
    """W [out, in] in 4 bits, seen as a matmul operand of `shape` whose element (r, c) is W's flat element
    r * strides[0] + c * strides[1] (W itself: strides (in, 1); W^T: `t()`)."""

    data: torch.Tensor  # [ceil(out * in / 2)] uint8
    absmax: torch.Tensor  # [ceil(out * in / blocksize)]: float scales, or uint8 when nested
    code: torch.Tensor  # [16] float32
    blocksize: int
    dtype: torch.dtype  # what bitsandbytes dequantizes to (quant_state.dtype)
    nested: NestedScales | None
    shape: tuple[int, int]
    strides: tuple[int, int]

    def t(self) -> Packed4bit:
        """W^T as an operand, as Tensor.t() (no data moves)."""
        return replace(self, shape=self.shape[::-1], strides=self.strides[::-1])


_CODE_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def code_table(quant_type: str, device: torch.device) -> torch.Tensor:
    key = (quant_type, device)
    if key not in _CODE_TABLES:
        from bitsandbytes.functional import get_4bit_type

        _CODE_TABLES[key] = get_4bit_type(quant_type, device=device).float().contiguous()
    return _CODE_TABLES[key]


def packed_and_state(base_weight: Any) -> tuple[torch.Tensor, Any] | None:
    """(packed tensor, QuantState) of a Params4bit or a (packed, QuantState) pair; None for a dense weight."""
    if isinstance(base_weight, tuple):
        return base_weight
    quant_state = getattr(base_weight, "quant_state", None)
    return None if quant_state is None else (base_weight.data, quant_state)


def _refuse(problem: str, remedy: str) -> KernelInputError:
    return KernelInputError(f"lora_linear: {problem}; {remedy}")


def _check_state(quant_state: Any) -> None:
    if quant_state.quant_type not in QUANT_TYPES:
        raise _refuse(f"4-bit quant type {quant_state.quant_type!r} is not one of {QUANT_TYPES}",
                      "quantize the base with bitsandbytes' nf4 or fp4")
    if quant_state.dtype not in WEIGHT_DTYPES:
        raise _refuse(f"4-bit weight dequantizes to {quant_state.dtype}, not a float dtype",
                      "quantize a float32, bfloat16 or float16 weight")
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise _refuse("the 4-bit weight is in bitsandbytes' CPU inference layout (packing_format_for_cpu)",
                      "let bitsandbytes run this layer, or reload the model for training")
    if not (isinstance(quant_state.blocksize, int) and quant_state.blocksize > 0):
        raise _refuse(f"4-bit blocksize {quant_state.blocksize!r} is not a positive integer",
                      "pass the QuantState bitsandbytes' quantize_4bit returned")
    if len(quant_state.shape) != 2:
        raise _refuse(f"4-bit weight of shape {tuple(quant_state.shape)} is not a matrix", "pass a [out, in] weight")


def _packed_bytes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The packed storage as [ceil(numel / 2)] bytes, whatever quant_storage dtype holds them."""
    expected = (numel + 1) // 2
    if packed.dim() != 2 or packed.shape[1] != 1:
        raise _refuse(f"packed 4-bit weight of shape {tuple(packed.shape)} is not [bytes, 1] as quantize_4bit "
                      "returns it (bitsandbytes' [1, bytes] form dequantizes to W transposed)",
                      "pass the packed tensor as quantize_4bit or Params4bit hold it")
    data = packed.contiguous().view(torch.uint8).reshape(-1)
    if data.numel() != expected:
        raise _refuse(f"packed 4-bit weight holds {data.numel()} bytes but W {numel} values need {expected}",
                      "pass the QuantState that belongs to this packed weight")
    return data


def _nested_scales(quant_state: Any, blocks: int) -> NestedScales | None:
    if not quant_state.nested:
        return None
    state2 = quant_state.state2
    groups = -(-blocks // state2.blocksize)
    if (quant_state.absmax.dtype != torch.uint8 or state2.absmax.numel() != groups or state2.code.numel() != 256
            or quant_state.offset is None or quant_state.offset.numel() != 1):
        raise _refuse("the double-quantized absmax does not fit (uint8 absmax per block, state2.absmax per "
                      f"{state2.blocksize} blocks, a 256-entry state2.code, one offset)",
                      "pass the QuantState bitsandbytes' quantize_4bit(compress_statistics=True) returned")
    return NestedScales(state2.absmax.float().contiguous(), state2.code.float().contiguous(),
                        quant_state.offset.float().reshape(1), state2.blocksize)


def as_packed_4bit(base_weight: Any) -> Packed4bit | None:
    """The kernel's view of a bitsandbytes 4-bit weight (no dense copy is made); None for a dense weight.
    KernelInputError for a quant state or packed layout the kernel cannot read."""
    pair = packed_and_state(base_weight)
    if pair is None:
        return None
    packed, quant_state = pair
    _check_state(quant_state)
    out_features, in_features = (int(d) for d in quant_state.shape)
    numel = out_features * in_features
    blocks = -(-numel // quant_state.blocksize)
    data = _packed_bytes(packed, numel)
    if quant_state.absmax.numel() != blocks:
        raise _refuse(f"absmax holds {quant_state.absmax.numel()} scales but W needs {blocks} blocks of "
                      f"{quant_state.blocksize}", "pass the QuantState that belongs to this packed weight")
    packed_4bit = Packed4bit(data, quant_state.absmax.contiguous(), code_table(quant_state.quant_type, data.device),
                             quant_state.blocksize, quant_state.dtype, _nested_scales(quant_state, blocks),
                             (out_features, in_features), (in_features, 1))
    _check_devices(packed_4bit)
    return packed_4bit


def _check_devices(w: Packed4bit) -> None:
    scales = {"absmax": w.absmax}
    if w.nested is not None:
        scales.update({"state2.absmax": w.nested.absmax, "state2.code": w.nested.code, "offset": w.nested.offset})
    elsewhere = [f"{name} on {t.device}" for name, t in scales.items() if t.device != w.data.device]
    if elsewhere:
        raise _refuse(f"the packed 4-bit weight is on {w.data.device} but its quant state's {', '.join(elsewhere)}",
                      "move the Params4bit (or the packed tensor and its QuantState with .to) to one device")
