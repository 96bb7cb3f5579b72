"""Logits: the same token ids through llama.cpp (GGUF) and transformers (source, float32), one side at a time."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mt.verify.logits import _log_softmax, hf_logits, llama_cpp_logits
from mt.verify.memory import peak_rss_mib, reset_peak_rss
from mt.verify.report import Check, Status
from mt.verify.thresholds import Thresholds


@dataclass
class Divergence:
    n_tokens: int
    kld_mean: float
    kld_p99: float
    kld_max: float
    top1_agreement: float
    max_abs_dlogit: float
    ppl_gguf: float
    ppl_reference: float
    delta_ppl: float


def divergence(reference: np.ndarray, candidate: np.ndarray, ids: list[int]) -> tuple[Divergence, np.ndarray]:
    """Per-token KL(reference || candidate) and the summary; [n, vocab] logits for the n ids."""
    n_vocab = min(reference.shape[-1], candidate.shape[-1])
    lp, lq = _log_softmax(reference[:, :n_vocab]), _log_softmax(candidate[:, :n_vocab])
    kld = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    top1 = float((lp.argmax(-1) == lq.argmax(-1)).mean())
    nxt = np.asarray(ids[1:])
    rows = np.arange(len(nxt))
    ppl_ref, ppl_gguf = (float(np.exp(-lx[rows, nxt].mean())) if len(nxt) else float("nan") for lx in (lp, lq))
    stats = Divergence(len(ids), float(kld.mean()), float(np.percentile(kld, 99)), float(kld.max()), top1,
                       float(np.abs(reference[:, :n_vocab] - candidate[:, :n_vocab]).max()),
                       ppl_gguf, ppl_ref, ppl_gguf - ppl_ref)
    return stats, kld


def _violations(d: Divergence, t: Thresholds) -> list[str]:
    out = []
    if d.kld_mean > t.kld_mean:
        out.append(f"mean KLD {d.kld_mean:.3g} > {t.kld_mean:.3g}")
    if d.kld_p99 > t.kld_p99:
        out.append(f"p99 KLD {d.kld_p99:.3g} > {t.kld_p99:.3g}")
    return out


@dataclass
class LogitRun:
    check: Check
    kld_per_token: np.ndarray
    peak_rss_mib: dict[str, float]


def check_logits(gguf_path: Path, reference_dir: Path, ids: list[int], n_ctx: int, thresholds: Thresholds,
                 n_vocab_gguf: int, adapter: Path | None = None) -> LogitRun:
    """llama.cpp first (then freed), transformers second: one copy of the model in memory at a time."""
    if any(i >= n_vocab_gguf for i in ids):
        check = Check("logits", Status.FAIL, f"the text has token ids the GGUF's {n_vocab_gguf}-token vocabulary lacks")
        return LogitRun(check, np.zeros(0), {})
    reset_peak_rss()
    try:
        candidate = llama_cpp_logits(gguf_path, ids, n_ctx=n_ctx)
    except (ValueError, RuntimeError) as e:  # llama-cpp-python's "Failed to load model from file"
        return LogitRun(Check("logits", Status.FAIL, f"llama.cpp cannot run the GGUF ({e})"), np.zeros(0), {})
    rss = {"llama.cpp": peak_rss_mib()}
    reset_peak_rss()
    reference = hf_logits(reference_dir, ids, adapter)
    rss["transformers"] = peak_rss_mib()
    stats, kld = divergence(reference, candidate, ids)
    problems = _violations(stats, thresholds)
    summary = (f"{stats.n_tokens} tokens: KLD mean {stats.kld_mean:.3g} p99 {stats.kld_p99:.3g} max {stats.kld_max:.3g}, "
               f"top-1 {stats.top1_agreement:.1%}, max |Δlogit| {stats.max_abs_dlogit:.3g}, "
               f"PPL {stats.ppl_gguf:.4g} vs {stats.ppl_reference:.4g} (Δ {stats.delta_ppl:+.3g})")
    if problems:
        summary = "; ".join(problems) + f" ({summary})"
    data = asdict(stats) | {"kld_per_token": [round(float(x), 9) for x in kld]}
    return LogitRun(Check("logits", Status.FAIL if problems else Status.PASS, summary, problems, data), kld, rss)
