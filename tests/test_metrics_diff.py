"""The CI gate of metrics_diff on `dvc metrics diff --json` entries, then the report on a real tiny DVC
repo (the whole pipeline's `make metrics-diff` runs in test_team)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from mnist_gan.metrics_diff import MetricsDiffError, Verdict, find_metric, judge, report
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
    missing = ("**FAIL** `fid` is missing at workspace: nothing to judge (set `ci.metric` in "
               "conf/config.yaml to a metric the pipeline writes)")
    assert judge(None, FID, "`main`", "workspace") == Verdict(False, missing)  # in neither revision
    assert verdict(FID, 20.0, None) == Verdict(False, missing)                # dropped by the new one
    # the baseline predates the metric
    assert verdict(FID, None, 20.0) == Verdict(True, "**PASS** `fid` = 20 at workspace; `main` has no "
                                                     "baseline value")


def test_the_verdicts_in_full():
    assert verdict(FID, 20.0, 21.0) == Verdict(
        True, "**PASS** `fid`: 20 -> 21 (+5.0% worse; lower is better), within the 10% allowed")
    assert verdict(PRECISION, 0.8, 0.7) == Verdict(
        False, "**FAIL** `precision` regressed: 0.8 -> 0.7 (+12.5% worse; higher is better), more than "
               "the 5% allowed by `ci.max_regression`")


def test_find_metric_prefers_eval_json_and_refuses_ambiguity():
    entry = {"old": 1, "new": 2, "diff": 1}
    diff = {"metrics/train.json": {"p_real": {"old": 0, "new": 0}}, "metrics/eval.json": {"p_real": entry}}
    assert find_metric(diff, "p_real") == entry
    assert find_metric(diff, "fid") is None
    assert find_metric({"metrics/train.json": {"p_real": entry}}, "p_real") == entry  # in one other file
    with pytest.raises(MetricsDiffError, match=r"^metric 'x' is in several files \(a.json, b.json\); move it "
                                               r"to metrics/eval.json or rename it$"):
        find_metric({"b.json": {"x": entry}, "a.json": {"x": entry}}, "x")


@pytest.mark.parametrize("lower_is_better, at, past, short", [(True, 20.0, 20.001, 19.999),
                                                               (False, 12.0, 11.999, 12.001)])
def test_gate_passes_at_its_exact_threshold_and_fails_just_past_it(lower_is_better, at, past, short):
    """A quarter worse than 16 (exact in binary floating point): allowed; any more is not."""
    ci = CiParams(metric="fid", lower_is_better=lower_is_better, max_regression=0.25)
    exact = verdict(ci, 16.0, at)
    assert exact.ok and "(+25.0% worse" in exact.message and "within the 25% allowed" in exact.message
    assert not verdict(ci, 16.0, past).ok
    assert verdict(ci, 16.0, short).ok


# ---------------------------------------------------------------- report, on a real DVC repo

def _git(repo, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    """A git + DVC repo whose two commits differ in fid and lr; its workspace has fid worse again."""
    repo = tmp_path_factory.mktemp("diff")
    _git(repo, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    (repo / "dvc.yaml").write_text("metrics:\n  - metrics/eval.json\nparams:\n  - params.yaml\n")
    (repo / "metrics").mkdir()
    for fid, lr in ((20.0, 0.0002), (21.0, 0.0001)):
        (repo / "metrics/eval.json").write_text(json.dumps({"fid": fid, "precision": 0.8}))
        (repo / "params.yaml").write_text(f"lr: {lr}\n")
        _git(repo, "add", ".")
        _git(repo, "commit", "-q", "-m", f"fid {fid}")
    (repo / "metrics/eval.json").write_text(json.dumps({"fid": 30.0, "precision": 0.8}))
    return repo


def test_report_between_two_revisions_has_dvcs_tables_and_the_verdict(dvc_repo, monkeypatch):
    monkeypatch.chdir(dvc_repo)
    markdown, result = report("HEAD~1", "HEAD", FID)
    assert result.ok and result.message.startswith("**PASS** `fid`: 20 -> 21 (+5.0% worse")
    sections = markdown.split("\n\n")
    assert sections[:2] == ["## Metrics: `HEAD~1` -> `HEAD`", dvc_table("metrics", "HEAD~1", "HEAD")]
    assert "| metrics/eval.json | fid      | 20.0     | 21.0   | 1.0      |" in sections[1]
    assert "precision" not in sections[1]  # unchanged: DVC leaves it out of the table
    assert sections[2:4] == ["## Params: `HEAD~1` -> `HEAD`", dvc_table("params", "HEAD~1", "HEAD")]
    assert "| params.yaml | lr      | 0.0002   | 0.0001 |" in sections[3]
    assert sections[4:] == ["## Quality gate", result.message + "\n"]


def test_report_against_the_workspace_fails_on_the_regression(dvc_repo, monkeypatch):
    monkeypatch.chdir(dvc_repo)
    markdown, result = report("HEAD", None, FID)
    assert not result.ok and "21 -> 30 (+42.9% worse" in result.message
    assert markdown.startswith("## Metrics: `HEAD` -> workspace\n\n|")
    assert "## Params: `HEAD` -> workspace\n\nNo parameter changed.\n" in markdown


def test_report_of_identical_revisions_says_nothing_changed(dvc_repo, monkeypatch):
    monkeypatch.chdir(dvc_repo)
    markdown, result = report("HEAD", "HEAD", FID)
    assert markdown.split("\n\n")[:4] == ["## Metrics: `HEAD` -> `HEAD`", "No metric changed.",
                                          "## Params: `HEAD` -> `HEAD`", "No parameter changed."]
    assert result.ok and "21 -> 21 (+0.0% worse" in result.message


def test_report_on_a_metric_the_baseline_lacks_passes_naming_both_revisions(dvc_repo, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    shutil.copytree(dvc_repo, repo)  # a copy: the module's repo keeps its workspace
    (repo / "metrics/eval.json").write_text(json.dumps({"fid": 30.0, "precision": 0.8, "recall": 0.5}))
    monkeypatch.chdir(repo)
    markdown, result = report("HEAD", None, CiParams(metric="recall", lower_is_better=False,
                                                     max_regression=0.05))
    assert result == Verdict(True, "**PASS** `recall` = 0.5 at workspace; `HEAD` has no baseline value")
    assert markdown.endswith("## Quality gate\n\n" + result.message + "\n")


def test_an_unknown_revision_is_an_error_naming_the_dvc_command(dvc_repo, monkeypatch):
    monkeypatch.chdir(dvc_repo)
    with pytest.raises(MetricsDiffError, match=r"^`dvc metrics diff no-such-rev --all --json` failed: \S"):
        report("no-such-rev", None, FID)


def dvc_table(kind: str, *revs: str) -> str:
    out = subprocess.run([sys.executable, "-m", "dvc", kind, "diff", *revs, "--md"], capture_output=True,
                         text=True, check=True).stdout
    return "\n".join(line for line in out.strip().splitlines() if line.strip())
