"""`make metrics-diff`: DVC's metric and param diffs against a git revision, and a CI gate.

The tables are DVC's own (`dvc metrics diff --md`, `dvc params diff --md`); the decision
reads `dvc metrics diff --json` and fails when the metric named by `ci.metric` got worse
than at the baseline revision by more than `ci.max_regression` (a relative change).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from mnist_gan import paths
from mnist_gan.errors import UserError
from mnist_gan.params import CiParams


class MetricsDiffError(UserError):
    """DVC could not diff the revisions, or the gated metric is missing."""


@dataclass(frozen=True)
class Verdict:
    ok: bool
    message: str  # one Markdown line that names the metric


def dvc(*args: str) -> str:
    """stdout of `dvc ARGS`, run by this interpreter so that it is the project's DVC."""
    result = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise MetricsDiffError(f"`dvc {' '.join(args)}` failed: {result.stderr.strip()}")
    return result.stdout


def find_metric(diff: dict[str, dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The {old, new, diff} entry of `metric` in `dvc metrics diff --json`; metrics/eval.json first."""
    found = {path: entries[metric] for path, entries in diff.items() if metric in entries}
    if str(paths.EVAL_METRICS) in found:
        return found[str(paths.EVAL_METRICS)]
    if len(found) > 1:
        raise MetricsDiffError(f"metric '{metric}' is in several files ({', '.join(sorted(found))}); "
                               f"move it to {paths.EVAL_METRICS} or rename it")
    return next(iter(found.values()), None)


def judge(entry: dict[str, Any] | None, ci: CiParams, old_label: str, new_label: str) -> Verdict:
    """Does `ci.metric` at the new revision stay within `ci.max_regression` of the baseline?"""
    name, allowed = f"`{ci.metric}`", f"{ci.max_regression:.0%}"
    old, new = (entry or {}).get("old"), (entry or {}).get("new")
    if not _is_number(new):
        return Verdict(False, f"**FAIL** {name} is missing at {new_label}: nothing to judge "
                              f"(set `ci.metric` in conf/config.yaml to a metric the pipeline writes)")
    if not _is_number(old):
        return Verdict(True, f"**PASS** {name} = {new:.6g} at {new_label}; {old_label} has no baseline value")
    worse = new - old if ci.lower_is_better else old - new
    # relative to the baseline; from a baseline of 0 any worsening is infinitely worse
    regression = worse / abs(old) if old != 0 else (math.inf if worse > 0 else 0.0)
    direction = "lower" if ci.lower_is_better else "higher"
    change = f"{old:.6g} -> {new:.6g} ({regression:+.1%} worse; {direction} is better)"
    if regression > ci.max_regression:
        return Verdict(False, f"**FAIL** {name} regressed: {change}, more than the {allowed} "
                              f"allowed by `ci.max_regression`")
    return Verdict(True, f"**PASS** {name}: {change}, within the {allowed} allowed")


def report(rev: str, new: str | None, ci: CiParams) -> tuple[str, Verdict]:
    """Markdown of the metric and param diffs from `rev` to `new` (None: the workspace); the verdict."""
    revs = [rev] if new is None else [rev, new]
    new_label = "workspace" if new is None else f"`{new}`"
    diff = json.loads(dvc("metrics", "diff", *revs, "--all", "--json"))  # "{}" when there are none
    verdict = judge(find_metric(diff, ci.metric), ci, f"`{rev}`", new_label)
    markdown = "\n".join([
        f"## Metrics: `{rev}` -> {new_label}", "",
        _table_or_note(dvc("metrics", "diff", *revs, "--md"), "No metric changed."), "",
        f"## Params: `{rev}` -> {new_label}", "",
        _table_or_note(dvc("params", "diff", *revs, "--md"), "No parameter changed."), "",
        "## Quality gate", "",
        verdict.message, "",
    ])
    return markdown, verdict


def _table_or_note(markdown: str, note: str) -> str:
    # DVC prints a bare header when nothing changed
    lines = [line for line in markdown.strip().splitlines() if line.strip()]
    return "\n".join(lines) if len(lines) > 2 else note


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
