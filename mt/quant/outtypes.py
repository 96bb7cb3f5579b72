"""Output types: every type `mt convert --outtype`, `mt quantize` and `mt convert-lora` can write, in one table.

A type says which of llama.cpp's writers makes it: its converter (F32, F16, BF16, Q8_0) or llama-quantize (the
mixes); `mt convert --outtype q4_k_m` is the converter's F32 file quantized. The type each tensor of a file gets
is `choose.tensor_types`.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F


@dataclass(frozen=True)
class OutType:
    name: str
    file_type: F
    base: T  # what a weight tensor gets when no rule says otherwise
    converter: bool  # convert_hf_to_gguf.py writes it (--outtype), under the converter's rule
    quantizer: bool  # llama-quantize makes it, under llama-quant.cpp's rules


OUT_TYPES: dict[str, OutType] = {o.name: o for o in (
    OutType("f32", F.ALL_F32, T.F32, converter=True, quantizer=False),
    OutType("f16", F.MOSTLY_F16, T.F16, converter=True, quantizer=False),
    OutType("bf16", F.MOSTLY_BF16, T.BF16, converter=True, quantizer=False),
    OutType("q8_0", F.MOSTLY_Q8_0, T.Q8_0, converter=True, quantizer=True),
    OutType("q4_0", F.MOSTLY_Q4_0, T.Q4_0, converter=False, quantizer=True),
    OutType("q4_1", F.MOSTLY_Q4_1, T.Q4_1, converter=False, quantizer=True),
    OutType("q5_0", F.MOSTLY_Q5_0, T.Q5_0, converter=False, quantizer=True),
    OutType("q5_1", F.MOSTLY_Q5_1, T.Q5_1, converter=False, quantizer=True),
    OutType("q2_k", F.MOSTLY_Q2_K, T.Q2_K, converter=False, quantizer=True),
    OutType("q2_k_s", F.MOSTLY_Q2_K_S, T.Q2_K, converter=False, quantizer=True),
    OutType("q3_k_s", F.MOSTLY_Q3_K_S, T.Q3_K, converter=False, quantizer=True),
    OutType("q3_k_m", F.MOSTLY_Q3_K_M, T.Q3_K, converter=False, quantizer=True),
    OutType("q3_k_l", F.MOSTLY_Q3_K_L, T.Q3_K, converter=False, quantizer=True),
    OutType("iq1_s", F.MOSTLY_IQ1_S, T.IQ1_S, converter=False, quantizer=True),
    OutType("iq1_m", F.MOSTLY_IQ1_M, T.IQ1_M, converter=False, quantizer=True),
    OutType("iq2_xxs", F.MOSTLY_IQ2_XXS, T.IQ2_XXS, converter=False, quantizer=True),
    OutType("iq2_xs", F.MOSTLY_IQ2_XS, T.IQ2_XS, converter=False, quantizer=True),
    OutType("iq2_s", F.MOSTLY_IQ2_S, T.IQ2_XS, converter=False, quantizer=True),
    OutType("iq2_m", F.MOSTLY_IQ2_M, T.IQ2_S, converter=False, quantizer=True),
    OutType("iq3_xxs", F.MOSTLY_IQ3_XXS, T.IQ3_XXS, converter=False, quantizer=True),
    OutType("iq3_xs", F.MOSTLY_IQ3_XS, T.IQ3_S, converter=False, quantizer=True),
    OutType("iq3_s", F.MOSTLY_IQ3_S, T.IQ3_S, converter=False, quantizer=True),
    OutType("iq3_m", F.MOSTLY_IQ3_M, T.IQ3_S, converter=False, quantizer=True),
    OutType("iq4_nl", F.MOSTLY_IQ4_NL, T.IQ4_NL, converter=False, quantizer=True),
    OutType("iq4_xs", F.MOSTLY_IQ4_XS, T.IQ4_XS, converter=False, quantizer=True),
    OutType("tq1_0", F.MOSTLY_TQ1_0, T.TQ1_0, converter=False, quantizer=True),
    OutType("tq2_0", F.MOSTLY_TQ2_0, T.TQ2_0, converter=False, quantizer=True),
    OutType("q4_k_s", F.MOSTLY_Q4_K_S, T.Q4_K, converter=False, quantizer=True),
    OutType("q4_k_m", F.MOSTLY_Q4_K_M, T.Q4_K, converter=False, quantizer=True),
    OutType("q5_k_s", F.MOSTLY_Q5_K_S, T.Q5_K, converter=False, quantizer=True),
    OutType("q5_k_m", F.MOSTLY_Q5_K_M, T.Q5_K, converter=False, quantizer=True),
    OutType("q6_k", F.MOSTLY_Q6_K, T.Q6_K, converter=False, quantizer=True),
    OutType("mxfp4_moe", F.MOSTLY_MXFP4_MOE, T.MXFP4, converter=False, quantizer=True),
)}
CONVERTER_TYPES = {name: o for name, o in OUT_TYPES.items() if o.converter}
QUANTIZER_TYPES = {name: o for name, o in OUT_TYPES.items() if o.quantizer}
CONVERT_CHOICES = [*CONVERTER_TYPES, "auto", *(n for n in QUANTIZER_TYPES if n not in CONVERTER_TYPES)]  # mt convert


def by_file_type(file_type: int) -> OutType | None:
    return next((o for o in OUT_TYPES.values() if int(o.file_type) == int(file_type)), None)


def row_fits(qtype: T, n_per_row: int) -> bool:
    return n_per_row % GGML_QUANT_SIZES[qtype][0] == 0

