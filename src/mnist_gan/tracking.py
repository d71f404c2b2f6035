"""MLflow tracking around the pipeline: one MLflow run per pipeline run.

The train stage opens the run and records its id in metrics/train.json; the
evaluate and plot stages reopen the same run to add their metrics and pictures,
or, in a store without it, log to a run tagged with its id (open_stage_run).
Training itself never imports this module (see training.Tracker).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import signal
import subprocess
import tempfile
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
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from mnist_gan.errors import UserError
from mnist_gan.params import Params

log = logging.getLogger(__name__)

EXPERIMENT = "mnist-gan"
GENERATOR_MODEL = "generator"  # the logged model's name: runs:/<run id>/generator
TRAINING_RUN_TAG = "training_run_id"  # on a run that evaluate/plot logged for a training run it lacks


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


def _connect() -> str:
    """Check the store and point MLflow at it; returns its URI."""
    uri = tracking_uri()
    check_reachable(uri)
    prepare_store(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def _run_exists(run_id: str) -> bool:
    try:
        run = MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return run.info.lifecycle_stage != "deleted"


def _experiment_id() -> str:
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


def _git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return result.stdout.strip() or "unknown"


# Signals that end a run which can still record why: Ctrl-C raises KeyboardInterrupt by itself;
# SIGKILL cannot be caught, and leaves the run RUNNING until a resume reopens it.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(f"terminated by {signal.Signals(signum).name}")


@contextmanager
def open_run(run_id: str | None = None, *, params: Params | None = None,
             device: str | None = None, tags: dict[str, str] | None = None) -> Iterator[MlflowTracker]:
    """Start a new run (logging params, `tags` and the project's own) or reopen `run_id`.

    The run ends FINISHED on success and FAILED, with the reason as a tag, when the
    block raises or the process is terminated, so no run is left RUNNING by an error.
    """
    uri = _connect()
    if run_id is None:
        tags = {"git_commit": _git_commit(), "device": device or "unknown", **(tags or {})}
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
        run = mlflow.start_run(experiment_id=_experiment_id(), run_name=os.environ.get("DVC_EXP_NAME"),
                               tags=tags)
        if params is not None:
            mlflow.log_params(params.flat())
    else:
        if not _run_exists(run_id):
            raise TrackingError(f"MLflow run {run_id} is not in {uri}")
        run = mlflow.start_run(run_id=run_id)
    # a process started with a signal ignored (nohup) keeps it ignored
    previous = {s: signal.getsignal(s) for s in _STOP_SIGNALS}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, _raise_on_signal)
    try:
        yield MlflowTracker(run.info.run_id, reopened=run_id is not None)
    except BaseException as err:
        _end_failed(run.info.run_id, err)
        raise
    else:
        if "failure_reason" in run.data.tags:  # from an attempt that this one resumed and completed
            mlflow.delete_tag("failure_reason")
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def open_stage_run(training_run_id: str, params: Params, device: str) -> Iterator[MlflowTracker]:
    """The run evaluate and plot log to: the training run, `training_run_id` from metrics/train.json.

    A store without it (a clone that got the models by `dvc pull`, another MLFLOW_TRACKING_URI)
    gets a new run tagged with that id and the DVC experiment's name, created once (with a
    warning) and found by the tag afterwards, so that evaluate and plot share it. The metrics
    files are the product and the MLflow record their mirror: a missing record is no reason to
    refuse the work. Only a store that cannot be reached is an error.
    """
    uri = _connect()
    run_id: str | None = training_run_id
    if not _run_exists(training_run_id):
        found = MlflowClient().search_runs(
            [_experiment_id()], filter_string=f"tags.{TRAINING_RUN_TAG} = '{training_run_id}'",
            order_by=["attributes.start_time DESC"], max_results=1)
        run_id = found[0].info.run_id if found else None
        if run_id is None:
            log.warning("MLflow run %s (the training run of metrics/train.json) is not in %s: logging to a "
                        "new run tagged %s=%s", training_run_id, uri, TRAINING_RUN_TAG, training_run_id)
    with open_run(run_id, params=params, device=device, tags={TRAINING_RUN_TAG: training_run_id}) as tracker:
        yield tracker


def _end_failed(run_id: str, err: BaseException) -> None:
    reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    try:
        mlflow.set_tag("failure_reason", reason[:5000])
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
    except Exception as store_err:  # the store may be what failed: report, but raise the original error
        log.warning("could not mark MLflow run %s FAILED: %s", run_id, store_err)


@contextmanager
def open_training_run(params: Params, device: str, resume: dict[str, Any] | None) -> Iterator[MlflowTracker]:
    """The train stage's run: a new one, or for `resume` (a checkpoint) the run it was logging to.

    The resumed run gets each epoch once: those the checkpoint holds that the run lacks are
    logged, and the epochs re-trained after the checkpoint skip steps the run already has.
    If the checkpoint's run is no longer in the store (mlflow.db deleted, MLFLOW_TRACKING_URI
    changed), a new run is started and given the checkpoint's epochs instead of failing: the
    checkpoint holds all the training state, and refusing to resume would throw away the work
    it exists to save in order to protect a record that is already gone.
    """
    run_id = resume["run_id"] if resume else None
    if run_id is not None:
        uri = _connect()
        if not _run_exists(run_id):
            log.warning("MLflow run %s of the checkpoint is not in %s: logging the resumed training, "
                        "epochs 1-%d included, to a new run", run_id, uri, resume["epoch"])
            run_id = None
    with open_run(run_id, params=params, device=device) as tracker:
        if resume:
            mlflow.set_tag("resumed_after_epoch", resume["epoch"])
            if resume["run_id"] != tracker.run_id:
                mlflow.set_tag("resumed_from_missing_run", resume["run_id"])
            for record in resume["history"]:
                tracker.log_epoch(record)
            for epoch, images in resume["samples"].items():
                tracker.log_samples(epoch, images)
        yield tracker


# the step in the file name MLflow gives a time-stepped image ("images/samples+step+3+timestamp+...")
_SAMPLES_STEP = re.compile(r"^images/samples[+%]step[+%](\d+)[+%]")


class MlflowTracker:
    """training.Tracker for the active MLflow run, plus what the stages log."""

    def __init__(self, run_id: str, *, reopened: bool = False):
        self.run_id = run_id
        # The steps already logged, per metric ("samples" for the images). MLflow keeps every point
        # logged, so a resumed run that re-trains the epochs after its checkpoint would otherwise
        # show them twice. Read from the store on first use when the run is reopened.
        self._logged: dict[str, set[int]] | None = None if reopened else {}

    def _logged_steps(self) -> dict[str, set[int]]:
        if self._logged is None:
            client = MlflowClient()
            self._logged = {key: {m.step for m in client.get_metric_history(self.run_id, key)}
                            for key in client.get_run(self.run_id).data.metrics}
            images = client.list_artifacts(self.run_id, "images")
            self._logged["samples"] = {int(m[1]) for a in images if (m := _SAMPLES_STEP.match(a.path))}
        return self._logged

    def log_epoch(self, record: dict[str, float]) -> None:
        epoch = int(record["epoch"])
        logged = self._logged_steps()
        new = {k: v for k, v in record.items() if k != "epoch" and epoch not in logged.get(k, ())}
        if new:
            mlflow.log_metrics(new, step=epoch)
        for key in new:
            logged.setdefault(key, set()).add(epoch)

    def log_samples(self, epoch: int, images: torch.Tensor) -> None:
        logged = self._logged_steps().setdefault("samples", set())
        if epoch not in logged:
            # imported here: matplotlib and torchvision take seconds, and a stage that fails fast
            # (unreachable store) or never logs images (evaluate) should not wait for them
            from mnist_gan.plotting import image_grid

            # time-stepped images: the MLflow UI shows them with a slider over epochs
            mlflow.log_image(image_grid(images), key="samples", step=epoch)
            logged.add(epoch)

    def log_metrics(self, metrics: dict[str, float], prefix: str) -> None:
        mlflow.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()
                            if isinstance(v, (int, float))})

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path=folder)

    def log_generator(self, generator: torch.nn.Module, path: Path) -> None:
        """The generator as an MLflow model named "generator": z [N, d_noise] (and labels [N] int64
        when conditional) -> images [N, 784] in [-1, 1]; `path`, its save_model file, rides along
        in the model's extra_files, so `mnist_gan generate` rebuilds it from any model URI."""
        generator = generator.cpu().eval()
        inputs = [TensorSpec(np.dtype(np.float32), (-1, generator.d_noise), "z")]
        example = (np.zeros((2, generator.d_noise), dtype=np.float32),)
        if generator.n_classes:
            inputs.append(TensorSpec(np.dtype(np.int64), (-1,), "labels"))
            example += (np.arange(2, dtype=np.int64),)
        # pt2 (torch.export) needs a tensor signature; MLflow infers one only for a single input
        signature = ModelSignature(inputs=Schema(inputs),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28 * 28))]))
        # MLflow's own requirements for a PyTorch model (torch, cloudpickle): inferring them instead
        # re-imports the model in a subprocess, about 7 s at the end of every training run
        mlflow.pytorch.log_model(generator, name=GENERATOR_MODEL, input_example=example,
                                 signature=signature, extra_files=[str(path)],
                                 pip_requirements=mlflow.pytorch.get_default_pip_requirements())
