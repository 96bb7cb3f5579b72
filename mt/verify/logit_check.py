"""Logit comparisons: the divergence of two [tokens, vocab] logit arrays, judged (conversion) or reported (quality)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from mt.verify.logits import _log_softmax
from mt.verify.report import Check, Status
from mt.verify.thresholds import Limits, QualityBars


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


ROWS_PER_STEP = 16  # float64 temporaries of [rows, vocab]: a 128k vocabulary costs 16 MiB each


def divergence(reference: np.ndarray, candidate: np.ndarray, ids: list[int]) -> tuple[Divergence, np.ndarray]:
    """Per-token KL(reference || candidate) and the summary; [n, vocab] logits for the n ids, a few rows at a time."""
    n, n_vocab = len(ids), min(reference.shape[-1], candidate.shape[-1])
    kld, same_top1, max_diff = np.empty(n), np.empty(n, dtype=bool), 0.0
    nll_ref, nll_gguf = np.empty(max(0, n - 1)), np.empty(max(0, n - 1))
    for start in range(0, n, ROWS_PER_STEP):
        stop = min(n, start + ROWS_PER_STEP)
        p, q = reference[start:stop, :n_vocab], candidate[start:stop, :n_vocab]
        lp, lq = _log_softmax(p), _log_softmax(q)
        kld[start:stop] = (np.exp(lp) * (lp - lq)).sum(axis=-1)
        same_top1[start:stop] = lp.argmax(-1) == lq.argmax(-1)
        max_diff = max(max_diff, float(np.abs(p - q).max()))
        rows = np.arange(start, min(stop, n - 1))  # position i predicts ids[i + 1]
        nll_ref[rows], nll_gguf[rows] = -lp[rows - start, np.asarray(ids)[rows + 1]], -lq[rows - start, np.asarray(ids)[rows + 1]]
    ppl_ref, ppl_gguf = (float(np.exp(x.mean())) if len(x) else float("nan") for x in (nll_ref, nll_gguf))
    stats = Divergence(n, float(kld.mean()), float(np.percentile(kld, 99)), float(kld.max()), float(same_top1.mean()),
                       max_diff, ppl_gguf, ppl_ref, ppl_gguf - ppl_ref)
    return stats, kld


def _summary(d: Divergence) -> str:
    return (f"{d.n_tokens} tokens: KLD mean {d.kld_mean:.3g} p99 {d.kld_p99:.3g} max {d.kld_max:.3g}, "
            f"top-1 {d.top1_agreement:.1%}, max |Δlogit| {d.max_abs_dlogit:.3g}, "
            f"PPL {d.ppl_gguf:.4g} vs {d.ppl_reference:.4g} (Δ {d.delta_ppl:+.3g})")


def _data(d: Divergence, kld: np.ndarray) -> dict:
    return asdict(d) | {"kld_per_token": [round(float(x), 9) for x in kld]}


def conversion_check(d: Divergence, kld: np.ndarray, limits: Limits, file_type: str, layers: int, of_layers: int) -> Check:
    """The reference conversion against the source: a 16-bit file differs only by llama.cpp's arithmetic."""
    problems = []
    if d.kld_mean > limits.kld_mean:
        problems.append(f"mean KLD {d.kld_mean:.3g} > {limits.kld_mean:.3g}")
    if d.kld_p99 > limits.kld_p99:
        problems.append(f"p99 KLD {d.kld_p99:.3g} > {limits.kld_p99:.3g}")
    depth = "every layer" if layers == of_layers else f"the first {layers} of {of_layers} layers"
    what = f"mt's {file_type} conversion of the source ({depth}) in llama.cpp vs transformers"
    summary = f"{what}: {_summary(d)}"
    if problems:
        return Check("conversion", Status.FAIL, f"{'; '.join(problems)}: {summary}", problems, _data(d, kld))
    return Check("conversion", Status.PASS, summary, [], _data(d, kld))


def quality_check(d: Divergence, kld: np.ndarray, bars: QualityBars) -> Check:
    """The checked file against the source: measured; judged only against the bars the user set."""
    problems = bars.violations(d.kld_mean, d.top1_agreement)
    if problems:
        return Check("quality", Status.FAIL, f"{'; '.join(problems)} ({_summary(d)})", problems, _data(d, kld))
    status = Status.PASS if bars.max_kld is not None or bars.min_top1 is not None else Status.INFO
    return Check("quality", status, _summary(d), [], _data(d, kld))
