"""Check results and the three renderings of a verify report: terminal text, JSON, markdown."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class Status(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    WARN = "warn"  # reported, never fails the run (e.g. llama.cpp's non-jinja chat formatter)
    INFO = "info"  # measured and reported, not judged (the file's divergence from the source without --max-kld)
    SKIP = "skip"


@dataclass
class Check:
    name: str
    status: Status
    summary: str  # one line: the numbers, or why it failed
    problems: list[str] = field(default_factory=list)  # one entry per failed item
    data: dict[str, Any] = field(default_factory=dict)  # numbers for --json

    @property
    def failed(self) -> bool:
        return self.status is Status.FAIL


@dataclass
class VerifyReport:
    gguf: str
    reference: str
    architecture: str
    file_type: str
    reference_conversion: dict[str, Any]  # the 16-bit file mt wrote from the source: type, layers run, KLD limits
    quality_bars: dict[str, Any]  # --max-kld / --min-top1, None when not asked for
    checks: list[Check]
    peak_rss_mib: dict[str, float]

    @property
    def passed(self) -> bool:
        return not any(c.failed for c in self.checks)

    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if c.failed]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed
        for check in out["checks"]:
            check["status"] = Status(check["status"]).value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=float)

    def to_text(self, max_problems: int = 5) -> str:
        lines = [f"mt verify {self.gguf} against {self.reference}",
                 f"  {self.architecture}, file type {self.file_type}"]
        for c in self.checks:
            lines.append(f"  {c.status.value.upper():4}  {c.name:<14} {c.summary}")
            shown = max_problems if c.failed else 2
            for p in c.problems[:shown]:
                lines.append(f"          - {p}")
            if len(c.problems) > shown:
                lines.append(f"          ... {len(c.problems) - shown} more (--json lists all)")
        rss = ", ".join(f"{k} {v:.0f} MiB" for k, v in self.peak_rss_mib.items())
        if rss:
            lines.append(f"  peak RSS: {rss}")
        failed = [c.name for c in self.failed_checks()]
        lines.append("PASS" if self.passed else f"FAIL: {', '.join(failed)}")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        verdict = "pass" if self.passed else "fail"
        lines = [f"### GGUF verification: {verdict}", "",
                 f"`{self.gguf}` ({self.architecture}, {self.file_type}) against `{self.reference}`: metadata, "
                 "vocabulary and every tensor's bytes against mt's conversion of the source; that conversion run in "
                 "llama.cpp against transformers (float32); the file's divergence from the source measured.", "",
                 "| check | result | details |", "|---|---|---|"]
        for c in self.checks:
            lines.append(f"| {c.name} | {c.status.value} | {_md_cell(c.summary)} |")
        runs = [(c.name, c.data) for c in self.checks if c.name in ("conversion", "quality") and "kld_mean" in c.data]
        if runs:
            lines += ["", "| run | KLD mean | KLD p99 | KLD max | top-1 agreement | max abs Δlogit | PPL GGUF | PPL source | ΔPPL |",
                      "|---|---|---|---|---|---|---|---|---|"]
            lines += [f"| {name} | {d['kld_mean']:.3g} | {d['kld_p99']:.3g} | {d['kld_max']:.3g} | {d['top1_agreement']:.2%} | "
                      f"{d['max_abs_dlogit']:.3g} | {d['ppl_gguf']:.4g} | {d['ppl_reference']:.4g} | {d['delta_ppl']:+.3g} |"
                      for name, d in runs]
        problems = [(c.name, p) for c in self.checks for p in c.problems]
        if problems:
            lines += ["", "Problems and warnings:", ""] + [f"- **{n}**: {_md_cell(p)}" for n, p in problems]
        return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
