"""The MLflow store the pipeline logs to: where it is, whether it can be reached, its SQLite
schema built under a lock, and the project's experiment in it.

Everything before a run is opened; the runs themselves are tracking.py's.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from mnist_gan.errors import UserError

EXPERIMENT = "mnist-gan"


class TrackingError(UserError):
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
    """Fail fast, naming the URI, if the tracking store cannot be reached.

    One plain request with a 5 s timeout: MLflow's own client would retry with backoff
    for minutes before giving up.
    """
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                response.read()
        except (urllib.error.URLError, OSError) as err:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({err}); start it (`make mlflow-server`), "
                "or unset MLFLOW_TRACKING_URI to use the local store (mlflow.db)") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow store {uri}: folder {folder} does not exist or is not writable")


def prepare_store(uri: str) -> None:
    """Create or upgrade a SQLite store's tables under a file lock, before any run uses it.

    MLflow builds the schema of a fresh database without a lock, so queued experiments
    starting together (`dvc queue start -j 2`) on a new mlflow.db break each other's
    migrations ("duplicate column name"). Later concurrent writes are safe: MLflow sets
    `PRAGMA busy_timeout = 20000` on every session, so a writer waits for the lock.
    """
    if not uri.startswith("sqlite:///"):
        return  # a server builds its schema at start-up; `mlflow db upgrade` sets up other databases
    key = hashlib.md5(uri.encode(), usedforsecurity=False).hexdigest()
    # in the temp dir, not beside mlflow.db: nothing new appears in the repo
    with open(Path(tempfile.gettempdir()) / f"mnist-gan-store-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        MlflowClient(uri).search_experiments(max_results=1)  # builds the (cached) store


def connect() -> str:
    """Check the store and point MLflow at it; returns its URI."""
    uri = tracking_uri()
    check_reachable(uri)
    prepare_store(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_id() -> str:
    """The id of the project's experiment in the connected store, created on first use."""
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    # A SQLite store would put artifacts under ./mlruns of the *current* directory, which for
    # a queued DVC experiment is a temporary copy: keep them beside the database instead (for
    # the default store, <repo root>/mlruns). Judged by the URI, not by MLFLOW_TRACKING_URI
    # being set: mlflow.set_tracking_uri() sets that variable itself.
    uri = mlflow.get_tracking_uri()
    location = None  # a server or another database: its own artifact root
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()
    try:
        return mlflow.create_experiment(EXPERIMENT, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # a concurrent run created it first
        return mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
