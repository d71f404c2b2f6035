"""compare: runs logged into a temporary SQLite store, read back as a table and a plot."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
from mlflow.tracking import MlflowClient

from mnist_gan.__main__ import main
from mnist_gan.compare import CompareError, compare, load_runs, plot_runs, runs_figure
from mnist_gan.store import EXPERIMENT

# name: (lr, final eval/fid or None, status); per-epoch p_real/p_fake for 3 epochs
RUNS = {"slow-lr": (0.0001, 30.0, "FINISHED"), "paper-lr": (0.0002, 10.0, "FINISHED"),
        "fast-lr": (0.0004, 20.0, "FINISHED"), "no-fid": (0.0008, None, "FINISHED"),
        "crashed": (0.0016, 1.0, "FAILED")}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT)
    for name, (lr, fid, status) in RUNS.items():
        run = client.create_run(experiment_id, run_name=name)
        run_id = run.info.run_id
        client.log_param(run_id, "lr", lr)
        client.log_param(run_id, "seed", 0)  # the same in every run: not a column of the table
        for epoch in (1, 2, 3):
            client.log_metric(run_id, "p_real", 0.9 - 0.1 * epoch * lr / 0.0001 / 10, step=epoch)
            client.log_metric(run_id, "p_fake", 0.1 + 0.1 * epoch, step=epoch)
            if name == "paper-lr":  # one run also logged FID per epoch
                client.log_metric(run_id, "fid", 40.0 / epoch, step=epoch)
        if fid is not None:
            client.log_metric(run_id, "eval/fid", fid)
        client.log_metric(run_id, "eval/p_real", 0.7)
        client.set_terminated(run_id, status)
    return uri


def test_table_sorted_by_final_fid_with_params_that_differ(store, tmp_path):
    out = compare(store, "fid", ascending=True, n_runs=10, plot=tmp_path / "compare.png")
    lines = out.splitlines()
    assert "4 of 4 finished runs" in lines[0] and "sorted by eval/fid (ascending)" in lines[0]
    header = lines[1].split()
    assert header[:4] == ["run", "run_id", "lr", "eval/fid"]  # the sort metric leads the metrics
    assert "seed" not in header and "eval/p_real" in header and "p_fake" in header
    names = [line.split()[0] for line in lines[2:6]]
    assert names == ["paper-lr", "fast-lr", "slow-lr", "no-fid"]  # a run without the metric comes last
    assert "crashed" not in out  # FAILED runs are not compared
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_descending_and_run_limit(store):
    out = compare(store, "fid", ascending=False, n_runs=2, plot=None)
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["slow-lr", "fast-lr"]
    assert "2 of 4 finished runs" in out and "plot:" not in out


def test_metric_without_eval_prefix(store):
    out = compare(store, "p_fake", ascending=True, n_runs=10, plot=None)
    assert "sorted by p_fake" in out


def test_unknown_metric_lists_the_logged_ones(store):
    with pytest.raises(CompareError, match=r"no run logged a metric 'precision'.*eval/fid.*p_real"):
        compare(store, "precision", ascending=True, n_runs=10, plot=None)


def test_missing_store_is_an_error_not_a_new_database(tmp_path):
    with pytest.raises(CompareError, match="no MLflow store"):
        compare(f"sqlite:///{tmp_path / 'mlflow.db'}", "fid", ascending=True, n_runs=10, plot=None)
    assert not (tmp_path / "mlflow.db").exists()


def test_cli(store, tmp_path, capsys):
    plot = tmp_path / "cli.png"
    assert main(["compare", "--tracking-uri", store, "--runs", "3", "--plot", str(plot)]) == 0
    assert "paper-lr" in capsys.readouterr().out and plot.is_file()
    assert main(["compare", "--tracking-uri", store, "--metric", "nope", "--plot", ""]) == 2
    assert "mnist-gan compare: no run logged a metric 'nope'" in capsys.readouterr().err


def test_plot_has_a_fid_panel_only_where_fid_was_logged(store, tmp_path):
    runs = load_runs(store)
    by_name = {name: runs[runs["tags.mlflow.runName"] == name] for name in ("no-fid", "paper-lr")}
    for name, selected in by_name.items():
        plot_runs(MlflowClient(store), selected, tmp_path / f"{name}.png")
    width = {name: plt.imread(tmp_path / f"{name}.png").shape[1] for name in by_name}
    assert width["paper-lr"] > 1.4 * width["no-fid"]  # D scores beside FID vs D scores alone


def _figure_of(store: str, names: list[str]) -> plt.Figure:
    runs = load_runs(store)
    selected = runs.set_index("tags.mlflow.runName", drop=False).loc[names].reset_index(drop=True)
    return runs_figure(MlflowClient(store), selected)


def test_legend_names_each_run_by_the_params_that_differ_between_the_runs_shown(store):
    fig = _figure_of(store, ["paper-lr", "fast-lr", "no-fid"])
    (legend,) = fig.legends  # one legend for both panels
    assert [t.get_text() for t in legend.get_texts()] == [
        "paper-lr lr=0.0002", "fast-lr lr=0.0004", "no-fid lr=0.0008"]  # seed is 0 in all: not named
    plt.close(fig)
    fig = _figure_of(store, ["paper-lr"])  # one run: nothing differs
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["paper-lr"]
    plt.close(fig)


def test_fid_panel_is_on_a_log_axis(store):
    fig = _figure_of(store, ["paper-lr", "slow-lr"])
    (fid_ax,) = [ax for ax in fig.axes if ax.get_ylabel() == "FID (lower is better)"]
    assert fid_ax.get_yscale() == "log"
    plt.close(fig)


def test_legend_is_outside_both_panels_and_their_titles(store):
    fig = _figure_of(store, ["paper-lr", "fast-lr", "slow-lr", "no-fid"])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert [ax.get_legend() for ax in fig.axes] == [None, None]  # no legend inside a panel
    legend = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:  # the panel with its title, axis labels and ticks
        assert not legend.overlaps(ax.get_tightbbox(renderer)), ax.get_title()
    assert legend.y1 < min(ax.get_tightbbox(renderer).y0 for ax in fig.axes)  # below them
    assert legend.x0 >= 0 and legend.y0 >= 0 and legend.x1 <= fig.bbox.x1  # and inside the figure
    plt.close(fig)
