"""The loader fuzz harness (onebit.testing.fuzz): a short seeded run over every format must have
no failure, and the harness itself must see each failure class it claims to detect.

The long run is `scripts/fuzz.py --cases 2000 --format all --seed 0` (docs/results.md, Fuzzing)."""

from __future__ import annotations

import pytest

from onebit.testing import fuzz

pytest.importorskip("gguf", reason="the gguf package (dev extra) writes the GGUF seed files")

CASES = 20  # per format; ~40 s for all six on a busy 2-core machine


@pytest.mark.slow
def test_seeded_fuzz_run_has_no_failures(tmp_path):
    report = fuzz.run(fuzz.FORMATS, cases=CASES, seed=0, workers=2, timeout=120, workdir=tmp_path)
    lines = [f"{r.fmt}#{r.index} {r.outcome}: {r.what} -> {r.detail[-300:]}" for r in report.failures]
    assert not report.failures, "\n".join(lines)
    for fmt in fuzz.FORMATS:
        c = report.counts[fmt]
        assert sum(c.values()) == CASES
        assert c["error"] > 0, (fmt, c)  # the mutations do reach the loaders' checks
    assert sum(c["ok"] for c in report.counts.values()) > 0, report.counts  # and not everything fails


def test_harness_detects_every_failure_class(tmp_path):
    """A harness that cannot fail proves nothing: cases that crash, hang, allocate without bound,
    raise the wrong type or an error that names no file, each run through the real pool."""
    want = {"segv": "signal", "hang": "timeout", "alloc": "MemoryError", "unnamed": "unnamed-error",
            "named": "error", "panic": "other-exception", "recursion": "RecursionError"}

    def maker(i, what):
        def make():
            d = tmp_path / "cases" / f"{i}"
            d.mkdir(parents=True)
            (d / "input").write_text("x")
            return fuzz.Case("selftest", i, d / "input", f"selftest-{what}", what)
        return make

    makers = [maker(i, w) for i, w in enumerate(want)] + [maker(len(want), "named")]  # after a restart
    report = fuzz.run_cases(makers, ["selftest"], workers=2, timeout=5, mem_gib=2, workdir=tmp_path)
    got = {r.what: r.outcome for r in report.results}
    assert got == want, report.results
    assert sum(report.counts["selftest"].values()) == len(makers)
