"""The MLflow store the pipeline logs to: where it is, whether it can be reached, its SQLite
schema built under a lock, and the project's experiment in it.

Everything before a run is opened; the runs themselves are tracking.py's.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from unittest import mock

import mlflow
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
)
from mlflow.tracking import MlflowClient
from urllib3.util import Retry

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

    Plain requests with a 5 s timeout: MLflow's own client would retry with backoff
    for minutes before giving up.
    """
    if uri.startswith(("http://", "https://")):
        try:
            # /health needs no login: one authenticated read too, so a wrong password fails here,
            # not at the run's first write after training
            for request in (uri.rstrip("/") + "/health", _login_probe(uri)):
                with urllib.request.urlopen(request, timeout=5) as response:
                    response.read()
        except (urllib.error.URLError, OSError) as err:
            if getattr(err, "code", None) == 401:
                user = os.environ.get("MLFLOW_TRACKING_USERNAME")
                login = f"the login of user {user!r}" if user else "requests without a login"
                raise TrackingError(
                    f"MLflow tracking server {uri} refused {login} (HTTP 401): set "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your account on it") from None
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({err}); start it (`make mlflow-server`), "
                "or unset MLFLOW_TRACKING_URI to use the local store (mlflow.db)") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow store {uri}: folder {folder} does not exist or is not writable")


def _login_probe(uri: str) -> urllib.request.Request:
    """A search of one experiment, with the Basic login that MLflow's client sends when
    MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD are set."""
    request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user:
        login = f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(login).decode())
    return request


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


def server_answers(uri: str) -> bool:
    """Whether the tracking server at `uri` answers its /health now (within 5 s); True for a database."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
            response.read()
    except (urllib.error.URLError, OSError):
        return False
    return True


def wait_for_server(uri: str, seconds: float) -> bool:
    """Whether the tracking server at `uri` answers within `seconds`, asked every second."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server_answers(uri):
            return True
        time.sleep(1)
    return False


def retry_budget_s() -> float:
    """How long MLflow's client keeps retrying one request to a server that is down, in seconds.

    Each request goes through urllib3's Retry with MLFLOW_HTTP_REQUEST_MAX_RETRIES tries after the
    first (default 7), sleeping BACKOFF_FACTOR * 2**(k-1) s (default factor 2, at most 120 s) after
    the k-th failure for k >= 2: 4 + 8 + 16 + 32 + 64 + 120 = 244 s by default, plus up to
    BACKOFF_JITTER (1 s) per sleep. An outage shorter than that costs a run nothing but the wait.
    """
    factor, retries = MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get(), MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()
    return sum(min(Retry.DEFAULT_BACKOFF_MAX, factor * 2 ** (k - 1)) for k in range(2, retries + 1))


def without_retries():
    """Inside the block MLflow's client tries each request once, for at most 5 s: for the last
    words to a server known to be down, which would otherwise take another retry budget."""
    return mock.patch.dict(os.environ, {MLFLOW_HTTP_REQUEST_MAX_RETRIES.name: "0",
                                        MLFLOW_HTTP_REQUEST_TIMEOUT.name: "5"})
