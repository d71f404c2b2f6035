"""End to end: the real `dvc repro` / `dvc exp run` in a temporary git repo, on tiny
synthetic data and params, then what landed in metrics/, plots/ and MLflow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, write_synthetic_mnist

pytestmark = pytest.mark.slow

TINY = {"epochs": 2, "sample_every": 1, "eval": {"n_samples": 200}, "classifier": {"epochs": 1}}


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def pipeline_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def make_repo(root: Path) -> Path:
    """A fresh git + DVC repo holding this project's files, set to tiny params and synthetic data."""
    repo = root / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    source = write_synthetic_mnist(root / "source")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in TINY.items():
        params[key] = params[key] | value if isinstance(value, dict) else value
    params["data"] = {"source": str(source), "verify": False}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        run(cmd, repo)
    return repo


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
    assert 0 < train["p_real"] < 1 and 0 < train["p_fake"] < 1
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    assert 0 < evaluation["p_real"] < 1 and 0 < evaluation["p_fake"] < 1
    assert evaluation["fid"] > evaluation["fid_floor"] >= 0
    assert 0 <= evaluation["recall"] <= 1 and 0 <= evaluation["classes_covered"] <= 10
    assert abs(sum(evaluation[f"class_{k}"] for k in range(10)) - 1) < 1e-4
    assert 0 <= json.loads((repo / "metrics/classifier.json").read_text())["accuracy"] <= 1
    history = pd.read_csv(repo / "metrics/history.csv")
    assert list(history.columns) == ["epoch", "p_real", "p_fake", "loss_d", "loss_g", "seconds"]
    assert history["epoch"].tolist() == [1, 2]
    assert not (repo / "checkpoints/train.pt").exists()  # removed once training completed


def test_mlflow_run(repo, client):
    run_id = json.loads((repo / "metrics/train.json").read_text())["mlflow_run_id"]
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["lr"] == "0.0002" and mlflow_run.data.params["eval.n_samples"] == "200"
    assert mlflow_run.data.tags["device"] == "cpu" and len(mlflow_run.data.tags["git_commit"]) == 40
    assert [m.step for m in client.get_metric_history(run_id, "p_real")] == [1, 2]
    assert {"eval/p_fake", "eval/fid", "eval/recall", "eval/coverage"} <= set(mlflow_run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert artifacts == {"plots/d_scores.png", "plots/samples.png", "plots/real_vs_fake.png",
                         "plots/class_histogram.png"}
    assert any(a.path.startswith("images") for a in client.list_artifacts(run_id))  # sample grids
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    generator = mlflow.pytorch.load_model(f"runs:/{run_id}/generator")
    assert generator(torch.zeros(3, 100)).shape == (3, 784)


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


@pytest.mark.parametrize("model", ["dcgan", "cgan"])
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
