"""Default pass limits for the logits check, per GGUF file type (README: "mt verify thresholds")."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gguf import LlamaFileType


@dataclass(frozen=True)
class Thresholds:
    kld_mean: float  # mean per-token KL(source || GGUF), nats
    kld_p99: float  # 99th percentile of the per-token KLD
    source: str  # where the numbers come from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FLOAT = "float formats: bit-exact weights; drift only from llama.cpp's arithmetic (BF16 rounds activations)"
_PUBLISHED = "2 x llama.cpp's Llama-3-8B mean KLD vs FP16 (tools/perplexity/README.md)"

# file type -> mean KLD limit; the p99 limit is 10 x the mean limit (real models' per-token KLD is heavy-tailed:
# llama.cpp's Llama-3-8B BF16-vs-FP16 run has p99 = 9 x mean). Quantized rows: 2 x the published Llama-3-8B KLD
# of that type (Q8_0 0.0014, Q6_K 0.0055, Q5_K_M 0.011, Q5_K_S 0.017, Q5_1 0.018, Q5_0 0.022, Q4_K_M 0.031,
# Q4_K_S 0.043, Q4_0 0.072); float rows: well below Q8_0 but above llama.cpp's own arithmetic drift.
TABLE: dict[str, tuple[float, str]] = {
    "F32": (1e-4, _FLOAT),
    "F16": (5e-4, _FLOAT),
    "BF16": (1e-3, _FLOAT),
    "Q8_0": (0.0028, _PUBLISHED),
    "Q6_K": (0.011, _PUBLISHED),
    "Q5_K_M": (0.022, _PUBLISHED),
    "Q5_K_S": (0.034, _PUBLISHED),
    "Q5_1": (0.036, _PUBLISHED),
    "Q5_0": (0.044, _PUBLISHED),
    "Q4_K_M": (0.062, _PUBLISHED),
    "Q4_K_S": (0.086, _PUBLISHED),
    "Q4_0": (0.144, _PUBLISHED),
}
P99_OVER_MEAN = 10
UNKNOWN = "Q4_0"  # a file type not in the table gets the loosest limits, and the report says so


def file_type_name(file_type: int | None) -> str:
    """general.file_type -> "Q4_K_M" etc.; "unknown" when absent or not a LlamaFileType."""
    if file_type is None:
        return "unknown"
    try:
        return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"unknown ({file_type})"


def thresholds_for(file_type: str, kld_mean: float | None = None) -> Thresholds:
    """The table's limits for the type; --threshold-kld replaces the mean limit (p99 scales with it)."""
    mean, source = TABLE.get(file_type, TABLE[UNKNOWN])
    if kld_mean is not None:
        mean, source = kld_mean, "--threshold-kld"
    elif file_type not in TABLE:
        source = f"{file_type} is not in the table: {UNKNOWN} limits"
    return Thresholds(mean, P99_OVER_MEAN * mean, source)
