"""End to end: the real `dvc repro` / `dvc exp run` in a temporary git repo, on tiny
synthetic data and params, then what landed in metrics/, plots/ and MLflow."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.helpers import TRAINED, free_port, make_repo, pipeline_env, run, set_conf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = make_repo(tmp_path_factory.mktemp("e2e"))
    run(["dvc", "repro"], repo, pipeline_env())
    return repo


@pytest.fixture(scope="module")
def client(repo) -> MlflowClient:
    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def test_outputs_and_metrics(repo):
    for name in ("data/MNIST/raw/train-images-idx3-ubyte", "models/generator.pt", "models/discriminator.pt",
                 "models/classifier.pt", "plots/d_scores.png", "plots/samples.png", "plots/real_vs_fake.png",
                 "plots/class_histogram.png"):
        assert (repo / name).stat().st_size > 0, name
    train = json.loads((repo / "metrics/train.json").read_text())
    assert train["epochs"] == 2 and train["device"] == "cpu"
    history = pd.read_csv(repo / "metrics/history.csv")
    assert list(history.columns) == ["epoch", "p_real", "p_fake", "loss_d", "loss_g", "seconds"]
    assert history["epoch"].tolist() == [1, 2]
    # the summary is the last epoch's record (history.csv keeps 6 significant digits)
    last = history.iloc[-1]
    assert (train["p_real"], train["p_fake"]) == pytest.approx((last["p_real"], last["p_fake"]), rel=1e-5)
    # both rounded (to 0.01 s and 0.001 s): they agree to within those roundings
    assert train["seconds_per_epoch"] == pytest.approx(train["train_seconds"] / 2, abs=0.004)
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    # the values themselves are checked by hand on a known case in test_evaluate; here, that the
    # stage gave every metric, the histogram is one, and classes_covered counts its >= 2 % bins
    histogram = [evaluation[f"class_{k}"] for k in range(10)]
    assert sum(histogram) == pytest.approx(1, abs=1e-5)
    assert evaluation["classes_covered"] == sum(share >= 0.02 for share in histogram)
    assert evaluation["fid"] > evaluation["fid_floor"]  # two epochs of training are not real data
    assert not (repo / "checkpoints/train.pt").exists()  # removed once training completed


def test_mlflow_run(repo, client):
    run_id = json.loads((repo / "metrics/train.json").read_text())["mlflow_run_id"]
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["lr"] == "0.0002" and mlflow_run.data.params["eval.n_samples"] == "200"
    assert mlflow_run.data.tags["device"] == "cpu" and len(mlflow_run.data.tags["git_commit"]) == 40
    assert [m.step for m in client.get_metric_history(run_id, "p_real")] == [1, 2]
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    assert {key: mlflow_run.data.metrics[f"eval/{key}"] for key in evaluation} == evaluation
    history = pd.read_csv(repo / "metrics/history.csv")
    logged = [m.value for m in client.get_metric_history(run_id, "p_fake")]
    assert logged == pytest.approx(history["p_fake"].tolist(), rel=1e-5)
    artifacts = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert artifacts == {"plots/d_scores.png", "plots/samples.png", "plots/real_vs_fake.png",
                         "plots/class_histogram.png"}
    assert any(a.path.startswith("images") for a in client.list_artifacts(run_id))  # sample grids
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    images = mlflow.pyfunc.load_model(f"runs:/{run_id}/generator").predict({"n": 3, "seed": 0})
    assert images.shape == (3, 28, 28) and images.dtype == "uint8"


def test_second_repro_does_nothing(repo):
    out = run(["dvc", "repro"], repo, pipeline_env())
    assert "Running stage" not in out and "up to date" in out


def test_exp_run_reruns_train_evaluate_plot_only(repo, client):
    out = run(["dvc", "exp", "run", "-S", "lr=0.0001", "-n", "slower-lr"], repo, pipeline_env())
    assert "Running stage 'download'" not in out and "Running stage 'train_classifier'" not in out
    for stage in ("train", "evaluate", "plot"):
        assert f"Running stage '{stage}'" in out
    runs = client.search_runs([client.get_experiment_by_name("mnist-gan").experiment_id])
    assert len(runs) == 2
    latest = runs[0]
    assert latest.data.params["lr"] == "0.0001" and latest.data.tags.get("dvc_exp_name") == "slower-lr"
    assert latest.info.run_name == "slower-lr"
    shown = run(["dvc", "exp", "show", "--json"], repo, pipeline_env())
    assert "slower-lr" in shown


@pytest.mark.parametrize("model", ["selfcond", "cgan"])
def test_presets_and_ema_run_end_to_end(repo, client, model):
    out = run(["dvc", "exp", "run", "-S", f"model={model}", "-S", "ema=0.9", "-n", model], repo,
              pipeline_env())
    assert "Running stage 'train_classifier'" not in out  # the judge stays the same
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    assert evaluation["fid"] > 0 and evaluation["fid_without_ema"] > 0  # what the average buys
    run_id = json.loads((repo / "metrics/train.json").read_text())["mlflow_run_id"]
    logged = client.get_run(run_id).data
    assert logged.params["model"] == model and logged.params["ema"] == "0.9"
    assert logged.params["beta1"] == "0.5" and logged.tags["dvc_exp_name"] == model

    if model == "cgan":  # the first promotion in this store: the workspace's run becomes the champion
        out = run([sys.executable, "-m", "mnist_gan", "promote"], repo, pipeline_env())
        assert f"promoted: version 1 (run {run_id}" in out
        out = run([sys.executable, "-m", "mnist_gan", "generate", "--model", "models:/mnist-gan@champion",
                   "-n", "8", "--digit", "7", "--out", "sevens.npy"], repo, pipeline_env())
        assert "wrote sevens.npy: 8 samples (digit 7" in out
        assert np.load(repo / "sevens.npy").shape == (8, 28, 28)


def shown_params(repo: Path) -> dict[str, dict[str, Any]]:
    """`dvc exp show --json`: each experiment's params.yaml, by experiment name."""
    shown = {}
    for commit in json.loads(run(["dvc", "exp", "show", "--json"], repo, pipeline_env())):
        for experiment in commit.get("experiments") or []:
            for rev in experiment["revs"]:
                shown[rev["name"]] = rev["data"]["params"]["params.yaml"]["data"]
    return shown


def test_experiments_record_the_real_params_of_their_model(repo):
    """DVC composes params.yaml from conf/: the chosen model's values are in it, so `dvc exp show`
    and `dvc params diff` tell what each experiment trained with."""
    cgan = yaml.safe_load((repo / "conf/model/cgan.yaml").read_text()) | {"epochs": 1}
    mlp = yaml.safe_load((repo / "conf/model/mlp.yaml").read_text()) | {"lr": 0.0001}
    assert cgan["batch_size"] != mlp["batch_size"] and cgan["beta1"] != mlp["beta1"]

    run(["dvc", "exp", "run", "-S", "model=cgan", "-S", "epochs=1", "-n", "cgan-1"], repo, pipeline_env())
    params = yaml.safe_load((repo / "params.yaml").read_text())  # the experiment, applied to the workspace
    assert {key: params[key] for key in TRAINED} == cgan
    assert json.loads((repo / "metrics/train.json").read_text())["epochs"] == 1
    run(["dvc", "exp", "run", "-S", "lr=0.0001", "-n", "mlp-lr"], repo, pipeline_env())

    shown = shown_params(repo)
    assert {key: shown["cgan-1"][key] for key in TRAINED} == cgan
    assert {key: shown["mlp-lr"][key] for key in TRAINED} == mlp
    assert shown["mlp-lr"]["eval"] == shown["cgan-1"]["eval"] == {"seed": 1234, "n_samples": 200}
    diff = json.loads(run(["dvc", "params", "diff", "cgan-1", "mlp-lr", "--json"], repo, pipeline_env()))
    assert {key: (change["old"], change["new"]) for key, change in diff["params.yaml"].items()} == {
        key: (cgan[key], mlp[key]) for key in TRAINED if cgan[key] != mlp[key]}  # both learn no code


def test_evaluate_and_plot_rerun_in_a_store_without_the_training_run(repo, tmp_path):
    """A clone that got the models by `dvc pull` has no record of their training run: evaluate and
    plot still run, into one new run tagged with the training run's id. Only an unreachable store
    stops them, in one line."""
    for name in ("mlflow.db", "mlruns"):
        shutil.move(repo / name, tmp_path / name)
    set_conf(repo, eval={"n_samples": 300})
    out = run(["dvc", "repro"], repo, pipeline_env())
    assert "Running stage 'train'" not in out and "Running stage 'plot'" in out  # train: from the cache
    training_run = json.loads((repo / "metrics/train.json").read_text())["mlflow_run_id"]
    assert out.count(f"MLflow run {training_run}") == 1  # evaluate warns; plot finds its run
    # the new mlflow.db by another name of the same path: MLflow caches one store per URI, and the
    # `client` fixture's store still holds the file that was moved away
    client = MlflowClient(f"sqlite:///{repo}/./mlflow.db")
    (mirror,) = client.search_runs([client.get_experiment_by_name("mnist-gan").experiment_id])
    assert mirror.info.status == "FINISHED" and mirror.data.tags["training_run_id"] == training_run
    assert mirror.data.params["eval.n_samples"] == "300" and "eval/fid" in mirror.data.metrics
    assert {a.path for a in client.list_artifacts(mirror.info.run_id, "plots")} >= {"plots/d_scores.png"}
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    assert evaluation["fid"] == pytest.approx(mirror.data.metrics["eval/fid"], abs=1e-6)

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    set_conf(repo, eval={"n_samples": 250})
    failed = subprocess.run(["dvc", "repro"], cwd=repo, env=pipeline_env() | {"MLFLOW_TRACKING_URI": closed},
                            capture_output=True, text=True, check=False)
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    (line,) = [line for line in failed.stderr.splitlines() if line.startswith("ERROR stages/evaluate.py")]
    assert f"MLflow tracking server {closed} is unreachable" in line
