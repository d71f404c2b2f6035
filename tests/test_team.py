"""Experiments at team scale, end to end with real processes on tiny params: a queued sweep
run two at a time, a shared `mlflow server`, the CI metrics diff, and a DVC remote.

The make targets run as users run them, with this interpreter's environment standing in
for .venv (`make -o .venv/bin/.installed` skips creating one in the temporary repo).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mnist_gan.store import EXPERIMENT
from tests.helpers import (
    REPO,
    free_port,
    make_repo,
    pipeline_env,
    run,
    start_server,
    stop_server,
    wait_until_up,
)

pytestmark = pytest.mark.slow

GIT_USER = ["-c", "user.name=t", "-c", "user.email=t@t"]
MAKE = ["make", "-o", ".venv/bin/.installed"]
CLI = [sys.executable, "-m", "mnist_gan"]


def make(repo: Path, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([*MAKE, *args], cwd=repo, env=pipeline_env(),
                            capture_output=True, text=True, timeout=timeout, check=False)
    if check:
        assert result.returncode == 0, f"make {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", *GIT_USER, "commit", "-qm", message], repo)


def finished_runs(uri: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The project on tiny params and synthetic MNIST, run once by `make repro` (which composes
    params.yaml from conf/ first: here, a no-op) and committed (metrics included)."""
    repo = make_repo(tmp_path_factory.mktemp("team"))
    assert "params.yaml is the composition of conf/" in make(repo, "repro").stdout
    commit(repo, "baseline run")
    return repo


def test_concurrent_runs_on_a_fresh_store(tmp_path):
    """Three processes open their first runs on a new mlflow.db at once: none may fail or be lost
    (MLflow creates the schema without a lock; store.prepare_store serialises it). They run
    as queued DVC experiments do: in a copy of the repo, with DVC_ROOT naming the repo."""
    script = ("from mnist_gan import tracking\n"
              "from mnist_gan.params import load_params\n"
              f"with tracking.open_run(params=load_params({str(REPO / 'params.yaml')!r})) as tracker:\n"
              "    for epoch in range(1, 21):\n"
              "        tracker.log_epoch({'epoch': epoch, 'p_real': 0.9, 'p_fake': 0.1})\n")
    copy = tmp_path / ".dvc/tmp/exps/copy"
    copy.mkdir(parents=True)
    env = pipeline_env() | {"DVC_ROOT": str(tmp_path)}
    writers = [subprocess.Popen([sys.executable, "-c", script], cwd=copy, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(3)]
    outputs = [writer.communicate(timeout=300)[0] for writer in writers]
    assert [w.returncode for w in writers] == [0, 0, 0], "\n".join(outputs)
    runs = finished_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    # artifacts beside the database, not in the copy (which DVC deletes)
    assert all(r.info.artifact_uri.startswith((tmp_path / "mlruns").as_uri()) for r in runs)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert all(len(client.get_metric_history(r.info.run_id, "p_fake")) == 20 for r in runs)


def test_sweep_runs_queued_experiments_in_parallel_into_the_repo_store(repo):
    # a fresh store: the two workers also race to create its schema
    (repo / "mlflow.db").unlink()
    shutil.rmtree(repo / "mlruns")
    # a Hydra sweep over the model group, each experiment composed with its own model file's values
    # and the lr given (an lr no other test here uses: an experiment whose params DVC has run before
    # is restored from its run cache, not trained)
    out = make(repo, "sweep", "SWEEP=model=mlp,cgan lr=0.00025", "JOBS=2").stdout

    runs = finished_runs(f"sqlite:///{repo / 'mlflow.db'}")
    assert len(runs) == 2, out
    names = [r.info.run_name for r in runs]
    assert len(set(names)) == 2 and all(names)
    for mlflow_run in runs:
        assert mlflow_run.info.status == "FINISHED"
        assert mlflow_run.data.tags["dvc_exp_name"] == mlflow_run.info.run_name
        assert "eval/p_real" in mlflow_run.data.metrics  # evaluate logged into the same run
        # artifacts under the repo's mlruns/, not the deleted temporary copy of the queue
        assert mlflow_run.info.artifact_uri.startswith((repo / "mlruns").as_uri())
    trained = {r.data.params["model"]: (r.data.params["batch_size"], r.data.params["beta1"],
                                        r.data.params["lr"]) for r in runs}
    assert trained == {"mlp": ("200", "0.9", "0.00025"), "cgan": ("64", "0.5", "0.00025")}

    status = run(["dvc", "queue", "status"], repo, pipeline_env())
    shown = run(["dvc", "exp", "show", "--json"], repo, pipeline_env())
    for name in names:
        assert f"{name}" in shown
        assert any(name in line and "Success" in line for line in status.splitlines()), status

    compared = run([*CLI, "compare", "--metric", "p_fake"], repo, pipeline_env())
    assert all(name in compared for name in names) and "batch_size" in compared.splitlines()[1]
    assert (repo / "plots/compare.png").stat().st_size > 0


@pytest.fixture
def mlflow_server(repo, tmp_path):
    """`make mlflow-server` on a free loopback port; its URL. Stopped (process group) afterwards."""
    port = free_port()
    log = tmp_path / "server.log"
    server = start_server([*MAKE, "mlflow-server", f"MLFLOW_PORT={port}"], log, cwd=repo)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", server, log)
        yield url
    finally:
        stop_server(server)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=2)


def test_pipeline_logs_to_a_tracking_server(repo, mlflow_server):
    env = pipeline_env() | {"MLFLOW_TRACKING_URI": mlflow_server}
    run(["dvc", "exp", "run", "--temp", "-S", "lr=0.0003", "-n", "served"], repo, env)

    client = MlflowClient(mlflow_server)
    (served,) = finished_runs(mlflow_server)
    run_id = served.info.run_id
    assert served.info.run_name == "served" and served.info.status == "FINISHED"
    assert served.data.params["lr"] == "0.0003" and served.data.tags["dvc_exp_name"] == "served"
    assert [m.step for m in client.get_metric_history(run_id, "p_real")] == [1, 2]
    assert "eval/p_fake" in served.data.metrics
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/d_scores.png", "plots/samples.png", "plots/real_vs_fake.png",
                     "plots/class_histogram.png"}
    # artifacts went through the server into its store, runs into its database
    assert served.info.artifact_uri.startswith("mlflow-artifacts:")
    assert any((repo / "mlflow-server/mlartifacts").rglob("d_scores.png"))
    mlflow.set_tracking_uri(mlflow_server)
    images = mlflow.pyfunc.load_model(f"runs:/{run_id}/generator").predict({"n": 3, "seed": 0})
    assert images.shape == (3, 28, 28) and images.dtype == "uint8"
    # and nothing of it in the local store
    assert "served" not in {r.info.run_name for r in finished_runs(f"sqlite:///{repo / 'mlflow.db'}")}


def _set_fid(repo: Path, fid: float) -> None:
    path = repo / "metrics/eval.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"fid": fid}, indent=2) + "\n")


def test_metrics_diff_fails_on_a_regression_and_names_the_metric(repo, tmp_path):
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    _set_fid(clone, 20.0)  # the metrics of the real short run, plus a quality metric
    commit(clone, "baseline with fid")
    _set_fid(clone, 30.0)
    commit(clone, "fid 50 % worse")

    failed = make(clone, "metrics-diff", "REV=HEAD~1", check=False)
    assert failed.returncode != 0
    assert "| metrics/eval.json | fid" in failed.stdout and "**FAIL** `fid` regressed" in failed.stdout
    assert "fid regressed: 20 -> 30" in failed.stderr

    _set_fid(clone, 21.0)  # the workspace: 5 % worse, within ci.max_regression
    passed = run([*CLI, "metrics-diff", "--rev", "HEAD~1"], clone, pipeline_env())
    assert "**PASS** `fid`" in passed
    between = subprocess.run([*CLI, "metrics-diff", "--rev", "HEAD~1", "--new", "HEAD"],
                             cwd=clone, env=pipeline_env(), capture_output=True, text=True, check=False)
    assert between.returncode == 1 and "## Params: `HEAD~1` -> `HEAD`" in between.stdout


def test_push_then_pull_into_a_fresh_clone_is_up_to_date(repo, tmp_path):
    # the committed default remote, ../mnist-gan-dvc-remote, resolves beside the repo: in the temp dir
    remote = repo.parent / "mnist-gan-dvc-remote"
    name, url, default = run(["dvc", "remote", "list"], repo, pipeline_env()).split()
    assert (name, Path(url), default) == ("local", remote, "(default)")
    run(["dvc", "push"], repo, pipeline_env())
    assert any(remote.rglob("*"))

    # a clone beside it: no cache, no outputs; the same relative remote
    clone = repo.parent / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], repo.parent)
    assert not (clone / "models").exists() and not (clone / ".dvc/cache").exists()
    run(["dvc", "pull"], clone, pipeline_env())
    for name in ("models/generator.pt", "data/MNIST/raw/train-images-idx3-ubyte", "plots/d_scores.png"):
        assert (clone / name).read_bytes() == (repo / name).read_bytes(), name
    out = run(["dvc", "repro"], clone, pipeline_env())
    assert "Running stage" not in out and "up to date" in out
