"""The GGML type of every tensor of a file: one function for mt's three writers.

llama.cpp decides per tensor in three places: its converter (`convert_hf_to_gguf.py --outtype`: 1-D tensors,
norms and non-weights stay F32, rows a block does not divide fall back to F16), its LoRA converter (the same,
for lora_a/lora_b pairs, whose names do not end in .weight) and llama-quantize (the mixes, `mix.choose_types`).
"""

from __future__ import annotations

from enum import Enum

from gguf import GGMLQuantizationType as T

from mt.quant.mix import MixOptions, ModelFacts, TensorSpec, choose_types
from mt.quant.outtypes import OutType, row_fits


class Writer(Enum):
    CONVERTER = "convert_hf_to_gguf.py"
    LORA_CONVERTER = "convert_lora_to_gguf.py"
    QUANTIZER = "llama-quantize"


def tensor_types(out: OutType, writer: Writer, specs: list[TensorSpec], model: ModelFacts | None = None,
                 options: MixOptions | None = None) -> dict[str, T]:
    """Tensor name -> GGML type for a file of type `out` made by `writer`. llama-quantize's rules count tensors of
    a kind, so `specs` come in llama.cpp's order (`mix.llama_order`) and `model` is needed for it."""
    if writer is Writer.QUANTIZER:
        if model is None:
            raise TypeError("llama-quantize's rules need the model's facts")
        return choose_types(specs, out.file_type, model, options)
    rule = converter_type if writer is Writer.CONVERTER else lora_converter_type
    return {s.name: rule(s, out.base) for s in specs}


KEPT_F32 = (".ffn_gate_inp.", ".ffn_gate_inp_shexp.")  # expert routers: llama.cpp's converter keeps them F32


def converter_type(spec: TensorSpec, base: T) -> T:
    if spec.type not in (T.F32, T.F16, T.BF16):  # quantized in the checkpoint already: kept
        return spec.type
    if len(spec.ne) <= 1 or spec.name.endswith("_norm.weight") or not spec.name.endswith(".weight"):
        return T.F32
    if any(part in spec.name for part in KEPT_F32):
        return T.F32
    return base if row_fits(base, spec.ne[0]) else T.F16


def lora_converter_type(spec: TensorSpec, base: T) -> T:
    if len(spec.ne) <= 1:
        return T.F32
    return base if row_fits(base, spec.ne[0]) else T.F16
