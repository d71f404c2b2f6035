"""The CI gate of metrics_diff on `dvc metrics diff --json` entries (the real dvc run is in test_team)."""

from __future__ import annotations

import pytest

from mnist_gan.metrics_diff import MetricsDiffError, find_metric, judge
from mnist_gan.params import CiParams

FID = CiParams(metric="fid", lower_is_better=True, max_regression=0.10)
PRECISION = CiParams(metric="precision", lower_is_better=False, max_regression=0.05)


def verdict(ci: CiParams, old, new):
    return judge({"old": old, "new": new}, ci, "`main`", "workspace")


@pytest.mark.parametrize(("old", "new", "ok"), [
    (20.0, 20.0, True), (20.0, 21.9, True), (20.0, 15.0, True),  # equal, within 10 %, better
    (20.0, 22.1, False), (20.0, 40.0, False),                    # past 10 %
    (0.0, 0.0, True), (0.0, 0.1, False),                         # from a zero baseline
])
def test_lower_is_better(old, new, ok):
    result = verdict(FID, old, new)
    assert result.ok is ok
    assert "`fid`" in result.message and result.message.startswith("**PASS**" if ok else "**FAIL**")


def test_higher_is_better():
    assert verdict(PRECISION, 0.80, 0.77).ok  # 3.75 % worse, 5 % allowed
    failed = verdict(PRECISION, 0.80, 0.70)
    assert not failed.ok and "12.5% worse" in failed.message and "higher is better" in failed.message


def test_missing_metric_fails_and_a_new_one_passes():
    assert not judge(None, FID, "`main`", "workspace").ok  # in neither revision
    assert not verdict(FID, 20.0, None).ok                   # dropped by the new revision
    new = verdict(FID, None, 20.0)                           # the baseline predates the metric
    assert new.ok and "no baseline" in new.message


def test_find_metric_prefers_eval_json_and_refuses_ambiguity():
    entry = {"old": 1, "new": 2, "diff": 1}
    diff = {"metrics/train.json": {"p_real": {"old": 0, "new": 0}}, "metrics/eval.json": {"p_real": entry}}
    assert find_metric(diff, "p_real") == entry
    assert find_metric(diff, "fid") is None
    with pytest.raises(MetricsDiffError, match="several files"):
        find_metric({"a.json": {"x": entry}, "b.json": {"x": entry}}, "x")


@pytest.mark.parametrize("lower_is_better, at, past, short", [(True, 20.0, 20.001, 19.999),
                                                               (False, 12.0, 11.999, 12.001)])
def test_gate_passes_at_its_exact_threshold_and_fails_just_past_it(lower_is_better, at, past, short):
    """A quarter worse than 16 (exact in binary floating point): allowed; any more is not."""
    ci = CiParams(metric="fid", lower_is_better=lower_is_better, max_regression=0.25)
    exact = verdict(ci, 16.0, at)
    assert exact.ok and "(+25.0% worse" in exact.message and "within the 25% allowed" in exact.message
    assert not verdict(ci, 16.0, past).ok
    assert verdict(ci, 16.0, short).ok
