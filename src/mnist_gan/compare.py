"""`python -m mnist_gan compare`: the experiment's MLflow runs side by side.

A pandas table of the params that differ between the selected runs and their final
metrics, best first by one metric, and one PNG overlaying their per-epoch D-score
traces and FID where logged. The Compare view of `mlflow ui` shows the same (docs/team.md).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI or servers

import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import LogFormatter, MaxNLocator  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from mnist_gan.errors import UserError  # noqa: E402
from mnist_gan.files import atomic_path  # noqa: E402
from mnist_gan.store import EXPERIMENT  # noqa: E402

FID = "fid"
D_SCORES = ("p_real", "p_fake")
NAME, RUN = "run", "run_id"


class CompareError(UserError):
    """No store, no runs, or no run with the requested metric."""


def load_runs(uri: str) -> pd.DataFrame:
    """The FINISHED runs of the experiment: one row each, `params.*`/`metrics.*` columns (final values)."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise CompareError(f"no MLflow store at {uri}: run the pipeline first (make repro)")
    if MlflowClient(uri).get_experiment_by_name(EXPERIMENT) is None:
        raise CompareError(f"no experiment '{EXPERIMENT}' in {uri}: run the pipeline first (make repro)")
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    if runs.empty:
        raise CompareError(f"no finished run in experiment '{EXPERIMENT}' of {uri}")
    return runs


def metric_column(runs: pd.DataFrame, metric: str) -> str:
    """The column of `metric`: evaluate's fixed-seed `eval/<metric>` if any run has it, else `<metric>`."""
    for column in (f"metrics.eval/{metric}", f"metrics.{metric}"):
        if column in runs and runs[column].notna().any():
            return column
    logged = sorted(c.removeprefix("metrics.") for c in runs if c.startswith("metrics."))
    raise CompareError(f"no run logged a metric '{metric}'; logged: {', '.join(logged)}")


def select(runs: pd.DataFrame, column: str, ascending: bool, n: int) -> pd.DataFrame:
    """The n best runs by `column` (runs without it last), best first."""
    return runs.sort_values(column, ascending=ascending, na_position="last", kind="stable").head(n)


def table(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """One row per run: its name and id, the params that differ between the runs, then final metrics.

    The sort metric comes first, then evaluate's `eval/*` metrics, then the training ones.
    """
    params = _differing_params(runs)
    metrics = sorted((c for c in runs if c.startswith("metrics.") and c != column and runs[c].notna().any()),
                     key=lambda c: (not c.startswith("metrics.eval/"), c))
    out = runs[["tags.mlflow.runName", "run_id", *params, column, *metrics]].copy()
    out["run_id"] = out["run_id"].str[:8]
    out.columns = [NAME, RUN, *(c.split(".", 1)[1] for c in out.columns[2:])]
    return out.reset_index(drop=True)


def _differing_params(runs: pd.DataFrame) -> list[str]:
    """The `params.*` columns whose values are not all the same, by name (MLflow's order varies)."""
    return sorted(c for c in runs if c.startswith("params.") and runs[c].nunique(dropna=False) > 1)


def runs_figure(client: MlflowClient, runs: pd.DataFrame) -> plt.Figure:
    """Per-epoch p_real (solid) and p_fake (dashed) of each run; FID beside them where logged.

    FID per epoch is drawn as a line where training logged `fid`, the final evaluation
    (`eval/fid`) as a star at the run's last epoch, on a log axis: good runs end near 2,
    runs of a few epochs near 2000. One legend below both panels names each run's colour.
    """
    traces = {run_id: {key: client.get_metric_history(run_id, key) for key in (*D_SCORES, FID)}
              for run_id in runs["run_id"]}
    final_fid = runs.get(f"metrics.eval/{FID}", pd.Series(index=runs.index, dtype=float))
    has_fid = final_fid.notna().any() or any(trace[FID] for trace in traces.values())
    # each run's legend entry: its name and the params that set it apart, e.g. "mined-sign lr=0.0004"
    params = _differing_params(runs)
    names = [" ".join([str(row["tags.mlflow.runName"]),
                       *(f"{c.removeprefix('params.')}={row[c]}" for c in params)])
             for _, row in runs.iterrows()]
    # as many legend columns as the longest name fits across the figure (~15 characters an inch)
    width = 13 if has_fid else 8
    columns = max(1, min(len(names), width * 15 // (max(map(len, names), default=0) + 8)))
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(1, 2 if has_fid else 1, figsize=(width, 4.5 + 0.25 * rows), squeeze=False,
                             layout="constrained")  # makes room for the legend outside the panels
    scores, fid_ax = axes[0][0], axes[0][1] if has_fid else None
    colours = plt.get_cmap("tab10")
    handles = []
    for i, (run_id, fid) in enumerate(zip(runs["run_id"], final_fid, strict=True)):
        colour, trace = colours(i % 10), traces[run_id]
        for key, style in zip(D_SCORES, ("-", "--"), strict=True):
            line, = scores.plot(*_steps_values(trace[key]), style, color=colour)
            if key == D_SCORES[0]:
                handles.append(line)
        if fid_ax is not None:
            if trace[FID]:
                fid_ax.plot(*_steps_values(trace[FID]), color=colour)
            if pd.notna(fid):
                last_epoch = max((m.step for m in trace[D_SCORES[0]]), default=0)
                fid_ax.plot([last_epoch], [fid], "*", color=colour, markersize=12)
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
        ax.grid(alpha=0.3)
    scores.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    scores.set(xlabel="epoch", ylabel="mean discriminator score", ylim=(0, 1),
               title="p_real = D(x) (solid), p_fake = D(G(z)) (dashed)")
    if fid_ax is not None:
        fid_ax.set_yscale("log")
        # plain 10, 40, 100 rather than 10^1, 4x10^1, 10^2; in-between values labelled on short ranges
        fid_ax.yaxis.set_major_formatter(LogFormatter())
        fid_ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
        fid_ax.set(xlabel="epoch", ylabel="FID (lower is better)",
                   title="FID per epoch (line), final evaluation (star)")
    fig.legend(handles, names, loc="outside lower center", ncols=columns, fontsize="small")
    return fig


def plot_runs(client: MlflowClient, runs: pd.DataFrame, path: str | Path) -> None:
    """`runs_figure` saved as a PNG at `path`."""
    fig = runs_figure(client, runs)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def _steps_values(history: list) -> tuple[list[int], list[float]]:
    points = sorted((m.step, m.value) for m in history)
    return [step for step, _ in points], [value for _, value in points]


def compare(uri: str, metric: str, ascending: bool, n_runs: int, plot: str | Path | None) -> str:
    """The printable comparison of the n best runs by `metric`; also draws `plot` if given."""
    runs = load_runs(uri)
    column = metric_column(runs, metric)
    selected = select(runs, column, ascending, n_runs)
    if plot is not None:
        plot_runs(MlflowClient(uri), selected, plot)
    order = "ascending" if ascending else "descending"
    header = (f"{len(selected)} of {len(runs)} finished runs of '{EXPERIMENT}' in {uri}, "
              f"sorted by {column.removeprefix('metrics.')} ({order})")
    with pd.option_context("display.width", 250, "display.max_columns", None):
        body = table(selected, column).to_string(index=False, float_format=lambda v: f"{v:.4g}")
    return f"{header}\n{body}" + (f"\nplot: {plot}" if plot is not None else "")
