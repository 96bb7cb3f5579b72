"""The one judged logit comparison (the 16-bit reference conversion against transformers) and the user's quality bars.

A quantized file's divergence from its source depends on the model (a correct Q8_0 of a 135M model diverges more
than a broken file of a 500M one), so it is measured and reported, and judged only against bars the user sets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gguf import LlamaFileType


@dataclass(frozen=True)
class Limits:
    kld_mean: float  # mean per-token KL(source || GGUF), nats
    kld_p99: float  # 99th percentile of the per-token KLD

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The reference conversion holds the source's weights bit for bit (F32/BF16) or rounded once to F16, so its
# divergence is llama.cpp's own arithmetic: BF16 rounds activations to bf16 in ggml's CPU matmul, F16 to f16.
# The p99 limit is 10 x the mean (per-token KLD is heavy-tailed: llama.cpp's Llama-3-8B BF16-vs-FP16 run has
# p99 = 9 x mean). A checkpoint whose experts are MXFP4 (gpt-oss) keeps them in its reference (labelled MXFP4_MOE):
# llama.cpp multiplies them by activations rounded to Q8_0, 8 bits a value as BF16's.
CONVERSION_LIMITS: dict[str, float] = {"F32": 1e-4, "F16": 5e-4, "BF16": 1e-3, "MXFP4_MOE": 1e-3}
P99_OVER_MEAN = 10


def conversion_limits(file_type: str) -> Limits:
    mean = CONVERSION_LIMITS[file_type]
    return Limits(mean, P99_OVER_MEAN * mean)


@dataclass(frozen=True)
class QualityBars:
    """What a pipeline asks of the checked file's divergence from the source (--max-kld, --min-top1); none by default."""

    max_kld: float | None = None  # mean KLD
    min_top1: float | None = None  # top-1 agreement, 0..1

    def violations(self, kld_mean: float, top1: float) -> list[str]:
        out = []
        if self.max_kld is not None and kld_mean > self.max_kld:
            out.append(f"mean KLD {kld_mean:.3g} > --max-kld {self.max_kld:.3g}")
        if self.min_top1 is not None and top1 < self.min_top1:
            out.append(f"top-1 agreement {top1:.2%} < --min-top1 {self.min_top1:.2%}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def file_type_name(file_type: int | None) -> str:
    """general.file_type -> "Q4_K_M" etc.; "unknown" when absent or not a LlamaFileType."""
    if file_type is None:
        return "unknown"
    try:
        return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"unknown ({file_type})"
