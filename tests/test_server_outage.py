"""The tracking server killed under a running train stage, for real: `mlflow server` SIGKILLed
between epochs, then started again on the same store, or left down past MLflow's retries.

The run must come out FINISHED with every epoch exactly once either way: by waiting out a short
outage inside MLflow's own retries, or by stopping in one line, keeping its checkpoint, and
resuming into the same run once the server is back (docs/reliability.md).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from mnist_gan import paths
from mnist_gan.store import EXPERIMENT
from tests.helpers import (
    free_port,
    make_repo,
    pipeline_env,
    set_conf,
    start_server,
    stop_server,
    wait_until_up,
)

pytestmark = pytest.mark.slow

# enough epochs of the tiny data that the kill lands mid-training, well before the last
EPOCHS = 60
KILL_AFTER_EPOCH = 3


class Server:
    """`mlflow server` on a SQLite store in `root`, on a fixed free port, that can die and come back."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = start_server(
            ["mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "mlartifacts")], self.log)
        wait_until_up(f"{self.url}/health", self.process, self.log)

    def kill(self) -> None:
        stop_server(self.process, signal.SIGKILL)


@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def repo(tmp_path) -> Path:
    repo = make_repo(tmp_path)
    set_conf(repo, epochs=EPOCHS, checkpoint_every=1)
    return repo


def start_training(repo: Path, server: Server, **retries: str) -> subprocess.Popen:
    """`dvc repro train` logging to `server`, with MLflow's HTTP retry settings `retries`."""
    env = pipeline_env() | {"MLFLOW_TRACKING_URI": server.url} | retries
    return subprocess.Popen(["dvc", "repro", "train"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def kill_mid_training(server: Server, training: subprocess.Popen) -> str:
    """Wait until the run has logged KILL_AFTER_EPOCH epochs, then SIGKILL the server; the run's id."""
    client = MlflowClient(server.url)
    deadline = time.monotonic() + 300
    while True:
        assert training.poll() is None, training.communicate()[0]
        assert time.monotonic() < deadline, "training logged nothing in 300 s"
        experiment = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if runs and len(client.get_metric_history(runs[0].info.run_id, "p_real")) >= KILL_AFTER_EPOCH:
            server.kill()
            return runs[0].info.run_id
        time.sleep(0.1)


def assert_one_finished_run_with_every_epoch_once(server: Server, run_id: str) -> None:
    client = MlflowClient(server.url)
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    for key in ("p_real", "p_fake", "loss_d", "loss_g"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, EPOCHS + 1)), key
    images = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    assert len(images) == EPOCHS  # sample_every=1: one grid per epoch, none twice
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"mnist-train", "mnist-test"}


def test_a_server_down_for_seconds_costs_the_run_nothing(repo, server):
    # factor 1 instead of MLflow's 2: the same kind of wait, in half the time
    training = start_training(repo, server, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    run_id = kill_mid_training(server, training)
    killed = time.monotonic()
    time.sleep(5)
    server.start()
    outage = time.monotonic() - killed
    out = training.communicate(timeout=600)[0]
    assert training.returncode == 0, out
    assert "Retrying" in out  # urllib3's warnings: the stage waited for the server, it did not give up
    assert outage > 5
    assert_one_finished_run_with_every_epoch_once(server, run_id)


def test_a_server_down_past_the_retries_stops_the_stage_in_one_line_and_the_rerun_resumes(repo, server):
    # a retry budget of 2 s (one sleep of factor * 2 s), so that the outage outlasts it at once
    training = start_training(repo, server, MLFLOW_HTTP_REQUEST_MAX_RETRIES="2",
                              MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    run_id = kill_mid_training(server, training)
    killed = time.monotonic()
    out = training.communicate(timeout=120)[0]
    assert training.returncode != 0 and "Traceback" not in out, out
    assert time.monotonic() - killed < 60  # the budget, one health probe and the exit: not the default 244 s
    (line,) = [line for line in out.splitlines() if line.startswith("ERROR stages/train.py")]
    assert f"MLflow tracking server {server.url} stopped answering during run {run_id}" in line
    checkpoint = torch.load(repo / paths.CHECKPOINT, weights_only=True)
    assert checkpoint["run_id"] == run_id and KILL_AFTER_EPOCH - 1 <= checkpoint["epoch"] < EPOCHS

    server.start()
    rerun = subprocess.run(["dvc", "repro", "train"], cwd=repo, capture_output=True, text=True, check=False,
                           env=pipeline_env() | {"MLFLOW_TRACKING_URI": server.url}, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming after epoch {checkpoint['epoch']}" in rerun.stderr
    assert not (repo / paths.CHECKPOINT).exists()
    assert_one_finished_run_with_every_epoch_once(server, run_id)
