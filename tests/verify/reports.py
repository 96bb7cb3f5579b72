"""Reading mt verify reports in tests."""

from __future__ import annotations

from mt.verify.report import Check, Status, VerifyReport

EXACT = ("metadata", "vocabulary", "chat template", "tensors", "conversion")


def check(report: VerifyReport, name: str) -> Check:
    return next(c for c in report.checks if c.name == name)


def failed(report: VerifyReport) -> set[str]:
    return {c.name for c in report.failed_checks()}


def assert_exact_pass(report: VerifyReport, also: tuple[str, ...] = ()) -> None:
    """Passed, every exact check passed (plus `also`), and the quality numbers are reported, not judged."""
    assert report.passed, report.to_text()
    for name in EXACT + also:
        assert check(report, name).status is Status.PASS, report.to_text()
    assert check(report, "quality").status is Status.INFO
