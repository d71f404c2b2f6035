"""MLflow tracking around the pipeline: one MLflow run per pipeline run.

The train stage opens the run and records its id in metrics/train.json; the
evaluate and plot stages reopen the same run to add their metrics and pictures.
Training itself never imports this module (see training.Tracker).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import RunStatus

from mnist_gan.params import Params
from mnist_gan.plotting import image_grid

log = logging.getLogger(__name__)

EXPERIMENT = "mnist-gan"


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used; raised before any long work starts."""


def repo_root() -> Path:
    """The repository that owns the default MLflow store.

    `dvc exp run --queue/--temp` runs stages in a temporary copy of the repo and sets
    DVC_ROOT to the *parent* repo, so queued runs land in the store `mlflow ui` shows.
    """
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else MLflow's own default (mlflow.db) at the repo root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def check_reachable(uri: str) -> None:
    """Fail fast, naming the URI, if the tracking store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                response.read()
        except (urllib.error.URLError, OSError) as err:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({err}); start it (make mlflow-server) "
                "or unset MLFLOW_TRACKING_URI to use the local mlflow.db") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow store {uri}: folder {folder} does not exist or is not writable")


def _experiment_id() -> str:
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    # With the default SQLite store MLflow would put artifacts under ./mlruns of the
    # *current* directory, which for a queued DVC experiment is a temporary copy.
    location = None if "MLFLOW_TRACKING_URI" in os.environ else (repo_root() / "mlruns").as_uri()
    try:
        return mlflow.create_experiment(EXPERIMENT, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # a concurrent run created it first
        return mlflow.get_experiment_by_name(EXPERIMENT).experiment_id


def _git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return result.stdout.strip() or "unknown"


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(f"terminated by signal {signum}")


@contextmanager
def open_run(run_id: str | None = None, *, params: Params | None = None,
             device: str | None = None) -> Iterator[MlflowTracker]:
    """Start a new run (logging params and tags) or reopen `run_id`.

    The run ends FINISHED on success and FAILED, with the reason as a tag, when the
    block raises or the process is terminated, so no run is left RUNNING by an error.
    """
    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    if run_id is None:
        tags = {"git_commit": _git_commit(), "device": device or "unknown"}
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
        run = mlflow.start_run(experiment_id=_experiment_id(), run_name=os.environ.get("DVC_EXP_NAME"),
                               tags=tags)
        if params is not None:
            mlflow.log_params(params.flat())
    else:
        run = mlflow.start_run(run_id=run_id)
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield MlflowTracker(run.info.run_id)
    except BaseException as err:
        mlflow.set_tag("failure_reason", f"{type(err).__name__}: {err}"[:5000])
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))
    finally:
        signal.signal(signal.SIGTERM, previous)


class MlflowTracker:
    """training.Tracker for the active MLflow run, plus what the stages log."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def log_epoch(self, record: dict[str, float]) -> None:
        epoch = int(record["epoch"])
        mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)

    def log_samples(self, epoch: int, images: torch.Tensor) -> None:
        # time-stepped images: the MLflow UI shows them with a slider over epochs
        mlflow.log_image(image_grid(images), key="samples", step=epoch)

    def log_metrics(self, metrics: dict[str, float], prefix: str) -> None:
        mlflow.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()
                            if isinstance(v, (int, float))})

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path=folder)

    def log_generator(self, generator: torch.nn.Module) -> None:
        """The final generator as an MLflow model: z [N, d_noise] -> images [N, 784] in [-1, 1]."""
        generator = generator.cpu().eval()
        example = np.zeros((2, generator.d_noise), dtype=np.float32)
        mlflow.pytorch.log_model(generator, name="generator", input_example=example)
