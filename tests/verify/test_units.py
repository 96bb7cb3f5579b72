"""The pieces of mt verify that need no model: divergence numbers, limits and bars, report rendering, causes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mt.verify.logit_check import divergence, quality_check
from mt.verify.report import Check, Status, VerifyReport
from mt.verify.thresholds import CONVERSION_LIMITS, QualityBars, conversion_limits, file_type_name
from mt.verify.tokens import likely_cause


def test_uniform_logits_have_perplexity_of_the_vocab_and_zero_kld():
    logits = np.zeros((5, 1000), dtype=np.float32)
    stats, kld = divergence(logits, logits, [1, 2, 3, 4, 5])
    assert stats.ppl_reference == pytest.approx(1000) and stats.delta_ppl == pytest.approx(0)
    assert stats.kld_mean == 0 and kld.shape == (5,) and stats.top1_agreement == 1


def test_kld_of_two_point_distributions_matches_closed_form():
    p, q = 0.9, 0.6
    ref = np.log(np.array([[p, 1 - p]], dtype=np.float32))
    cand = np.log(np.array([[q, 1 - q]], dtype=np.float32))
    stats, _ = divergence(ref, cand, [0])
    assert stats.kld_mean == pytest.approx(p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q)), rel=1e-5)
    assert stats.top1_agreement == 1 and stats.max_abs_dlogit == pytest.approx(np.log(0.4 / 0.1), rel=1e-5)


def test_perplexity_uses_the_next_token():
    ref = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]], dtype=np.float32))
    stats, _ = divergence(ref, ref, [0, 1])  # position 0 predicts id 1 with p = 0.25
    assert stats.ppl_reference == pytest.approx(4.0, rel=1e-5)


def test_file_type_names_and_conversion_limits():
    assert file_type_name(15) == "Q4_K_M" and file_type_name(7) == "Q8_0" and file_type_name(1) == "F16"
    assert file_type_name(0) == "F32" and file_type_name(32) == "BF16"
    assert file_type_name(None) == "unknown" and file_type_name(9999) == "unknown (9999)"
    # only the reference conversion is judged by a KLD: 16 or 32 bits, or those with a checkpoint's MXFP4 experts
    assert set(CONVERSION_LIMITS) == {"F32", "F16", "BF16", "MXFP4_MOE"}
    assert conversion_limits("F16").kld_p99 == pytest.approx(10 * conversion_limits("F16").kld_mean)


def test_quality_is_reported_unless_the_user_sets_bars():
    ref = np.log(np.array([[0.9, 0.1]], dtype=np.float32))
    cand = np.log(np.array([[0.4, 0.6]], dtype=np.float32))
    stats, kld = divergence(ref, cand, [0])
    assert quality_check(stats, kld, QualityBars()).status is Status.INFO
    assert quality_check(stats, kld, QualityBars(max_kld=10.0)).status is Status.PASS
    failing = quality_check(stats, kld, QualityBars(max_kld=0.01, min_top1=0.5))
    assert failing.status is Status.FAIL and len(failing.problems) == 2
    assert "top-1 agreement 0.00% < --min-top1 50.00%" in failing.problems[1]


def test_likely_causes_name_the_characters():
    assert "non-ASCII digits" in likely_cause(" ١٢٣\ufffd")
    assert "whitespace" in likely_cause("   \t")
    assert "emoji" in likely_cause("👩\u200d👩")
    assert "pre-tokenizer" in likely_cause("abc\ufffd")


def _report(*statuses: Status) -> VerifyReport:
    checks = [Check(f"c{i}", s, f"summary {i}", ["p | q"] if s is Status.FAIL else []) for i, s in enumerate(statuses)]
    return VerifyReport("m.gguf", "src", "llama", "Q8_0", {"file_type": "BF16"}, QualityBars().to_dict(), checks,
                        {"llama.cpp": 1.0})


def test_verdict_ignores_warnings_infos_and_skips():
    assert _report(Status.PASS, Status.WARN, Status.SKIP, Status.INFO).passed
    report = _report(Status.PASS, Status.FAIL, Status.WARN)
    assert not report.passed and report.to_text().endswith("FAIL: c1")
    data = json.loads(report.to_json())
    assert data["passed"] is False and [c["status"] for c in data["checks"]] == ["pass", "fail", "warn"]
    assert "p \\| q" in report.to_markdown()  # a pipe cannot break the markdown table
