"""MLflow tracking around the pipeline: one MLflow run per pipeline run.

The train stage opens the run and records its id in metrics/train.json; the
evaluate and plot stages reopen the same run to add their metrics and pictures,
or, in a store without it, log to a run tagged with its id (open_stage_run).
Training itself never imports this module (see training.Tracker); the store the
runs live in is store.py's.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from mnist_gan import store
from mnist_gan.data import OFFICIAL_MD5, RAW_FILES, file_md5s
from mnist_gan.params import Params

log = logging.getLogger(__name__)

TRAINING_RUN_TAG = "training_run_id"  # on a run that evaluate/plot logged for a training run it lacks
GRID_KEY = "samples"  # mlflow.log_image's key of the fixed-noise grids
# MLflow lists logged images only as files, named by log_image "<key>+step+<step>+timestamp+...png"
# (the UI parses the same names; older versions wrote % for +)
GRID_FILE = re.compile(rf"{GRID_KEY}[+%]step[+%](\d+)[+%].*\.png")
MNIST_HOME = "https://yann.lecun.com/exdb/mnist/"  # the source named for files with the official MD5s


def run_exists(run_id: str) -> bool:
    """Whether the store holds run `run_id`, not deleted."""
    try:
        run = MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return run.info.lifecycle_stage != "deleted"


def _git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return result.stdout.strip() or "unknown"


@contextmanager
def open_run(run_id: str | None = None, *, params: Params | None = None, device: str | None = None,
             tags: dict[str, str] | None = None, system_metrics: bool = False,
             parent_run_id: str | None = None, run_name: str | None = None) -> Iterator[MlflowTracker]:
    """Start a new run (logging params, `tags` and the project's own; named `run_name`, else by
    the DVC experiment; nested under `parent_run_id`) or reopen `run_id`; `system_metrics` samples
    CPU, memory (and GPU) into it while it is open.

    The run ends FINISHED on success and FAILED, with the reason as a tag, when the block
    raises, so no run is left RUNNING by an error (nor, in a stage, by SIGTERM: see signals.py).
    A tracking server that stopped answering, beyond MLflow's own retries, is a TrackingError
    instead, and the run is left open for the rerun to resume.
    """
    uri = store.connect()
    if run_id is None:
        tags = {"git_commit": _git_commit(), "device": device or "unknown", **(tags or {})}
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
        try:
            run = mlflow.start_run(experiment_id=store.experiment_id(),
                                   run_name=run_name or os.environ.get("DVC_EXP_NAME"), tags=tags,
                                   parent_run_id=parent_run_id, log_system_metrics=system_metrics)
        except mlflow.exceptions.MlflowException as err:
            if err.error_code != "PERMISSION_DENIED":  # a server with logins: the user lacks EDIT
                raise
            raise store.TrackingError(
                f"MLflow user {os.environ.get('MLFLOW_TRACKING_USERNAME')!r} may not start runs in "
                f"experiment {store.EXPERIMENT} on {uri}: ask its admin for EDIT on it (docs/team.md)"
            ) from None
        if params is not None:
            mlflow.log_params(params.flat())
    else:
        if not run_exists(run_id):
            raise store.TrackingError(f"MLflow run {run_id} is not in {uri}")
        run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
    try:
        yield MlflowTracker(run.info.run_id, reopened=run_id is not None)
    except Exception as err:
        if store.server_answers(uri):
            _end_failed(run.info.run_id, err)
            raise
        _let_go()
        raise store.TrackingError(
            f"MLflow tracking server {uri} stopped answering during run {run.info.run_id} and was not "
            f"back within MLflow's retries (about {store.retry_budget_s():.0f} s: "
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR); once it is back, "
            "`dvc repro` resumes this run, the train stage from its last checkpoint") from err
    except BaseException as err:
        _end_failed(run.info.run_id, err)
        raise
    else:
        if "failure_reason" in run.data.tags:  # from an attempt that this one resumed and completed
            mlflow.delete_tag("failure_reason")
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


@contextmanager
def open_stage_run(training_run_id: str, params: Params, device: str) -> Iterator[MlflowTracker]:
    """The run evaluate and plot log to: the training run, `training_run_id` from metrics/train.json.

    A store without it (a clone that got the models by `dvc pull`, another MLFLOW_TRACKING_URI)
    gets a new run tagged with that id and the DVC experiment's name, created once (with a
    warning) and found by the tag afterwards, so that evaluate and plot share it. The metrics
    files are the product and the MLflow record their mirror: a missing record is no reason to
    refuse the work. Only a store that cannot be reached is an error.
    """
    uri = store.connect()
    run_id: str | None = training_run_id
    if not run_exists(training_run_id):
        found = MlflowClient().search_runs(
            [store.experiment_id()], filter_string=f"tags.{TRAINING_RUN_TAG} = '{training_run_id}'",
            order_by=["attributes.start_time DESC"], max_results=1)
        run_id = found[0].info.run_id if found else None
        if run_id is None:
            log.warning("MLflow run %s (the training run of metrics/train.json) is not in %s: logging to a "
                        "new run tagged %s=%s", training_run_id, uri, TRAINING_RUN_TAG, training_run_id)
    with open_run(run_id, params=params, device=device, tags={TRAINING_RUN_TAG: training_run_id}) as tracker:
        yield tracker


def _let_go() -> None:
    """End the active run here without waiting on a server that is down: one quick try to mark it
    FAILED (a resume finishes it either way). Left active, MLflow's exit handler would end it with
    the full retry budget."""
    with store.without_retries(), contextlib.suppress(Exception):
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))


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
        uri = store.connect()
        if not run_exists(run_id):
            log.warning("MLflow run %s of the checkpoint is not in %s: logging the resumed training, "
                        "epochs 1-%d included, to a new run", run_id, uri, resume["epoch"])
            run_id = None
    with open_run(run_id, params=params, device=device, system_metrics=True) as tracker:
        if resume:
            mlflow.set_tag("resumed_after_epoch", resume["epoch"])
            if resume["run_id"] != tracker.run_id:
                mlflow.set_tag("resumed_from_missing_run", resume["run_id"])
            for record in resume["history"]:
                tracker.log_epoch(record)
            for epoch, images in resume["samples"].items():
                tracker.log_samples(epoch, images)
        yield tracker


class MlflowTracker:
    """training.Tracker for the active MLflow run, plus what the stages log.

    MLflow keeps every point it is sent, so a resumed run that re-trains the epochs after its
    checkpoint would show them twice: the tracker skips the steps the run already holds, read
    from the store on first use when the run is reopened.
    """

    def __init__(self, run_id: str, *, reopened: bool = False):
        self.run_id = run_id
        self._reopened = reopened
        self._metric_steps: dict[str, set[int]] = {}  # per metric, the steps logged
        self._grid_steps: set[int] = set()  # the epochs whose grid the run holds

    def _read_logged(self) -> None:
        """What the reopened run already holds, once."""
        if self._reopened:
            self._reopened = False
            client = MlflowClient()
            run = client.get_run(self.run_id)
            self._metric_steps = {key: {m.step for m in client.get_metric_history(self.run_id, key)}
                                  for key in run.data.metrics}
            # read from the files themselves, not from a tag set after each upload: a server that
            # dies between the upload and the tag would have the resumed run log that grid again
            self._grid_steps = {int(match[1]) for artifact in client.list_artifacts(self.run_id, "images")
                                if (match := GRID_FILE.fullmatch(posixpath.basename(artifact.path)))}

    def _outlasting_outages(self, log_call: Callable[[], None]) -> None:
        """`log_call`, once more if it failed faster than MLflow's retries while the server was down
        and the server comes back within what is left of them.

        A connection refused or reset is retried by urllib3, but a response cut off by a server
        killed while answering fails at once (requests reads the body after urllib3's retries are
        over). What the first try may have stored is read from the run before the second.
        """
        started = time.monotonic()
        try:
            log_call()
        except Exception:
            uri = mlflow.get_tracking_uri()
            left = store.retry_budget_s() - (time.monotonic() - started)
            if store.server_answers(uri) or not store.wait_for_server(uri, left):
                raise
            log.warning("MLflow tracking server %s is back: logging again what it missed", uri)
            self._reopened = True
            log_call()

    def log_epoch(self, record: dict[str, float]) -> None:
        self._outlasting_outages(lambda: self._log_epoch(record))

    def log_samples(self, epoch: int, images: torch.Tensor) -> None:
        self._outlasting_outages(lambda: self._log_samples(epoch, images))

    def _log_epoch(self, record: dict[str, float]) -> None:
        self._read_logged()
        epoch = int(record["epoch"])
        new = {k: v for k, v in record.items() if k != "epoch" and epoch not in self._metric_steps.get(k, ())}
        if new:
            mlflow.log_metrics(new, step=epoch)
        for key in new:
            self._metric_steps.setdefault(key, set()).add(epoch)

    def _log_samples(self, epoch: int, images: torch.Tensor) -> None:
        self._read_logged()
        if epoch not in self._grid_steps:
            # imported here: matplotlib and torchvision take seconds, and a stage that fails fast
            # (unreachable store) or never logs images (evaluate) should not wait for them
            from mnist_gan.plotting import image_grid

            # time-stepped images: the MLflow UI shows them with a slider over epochs
            mlflow.log_image(image_grid(images), key=GRID_KEY, step=epoch)
            self._grid_steps.add(epoch)

    def log_datasets(self, raw_dir: Path) -> None:
        """The MNIST train and test sets as the run's inputs (the UI's Dataset column): named, with
        their source, and as digest the MD5 of their two files' MD5s (each file's MD5 in the tags).

        Official files are named by MNIST's home whichever mirror or package they came from (their
        MD5s say they are those files); other data (data.verify: false) by the folder it was read
        from. MLflow records a dataset once per run: a resumed run logging them again adds nothing.
        """
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        md5s = file_md5s(raw_dir)
        origin = MNIST_HOME if md5s == OFFICIAL_MD5 else Path(raw_dir).resolve().as_uri()
        with warnings.catch_warnings():
            # MLflow registers its local-file source for two schemes ("" and "file"), then warns
            # that a file URI is ambiguous between the two: the same class either way
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
            dataset_source = resolve_dataset_source(origin)
        datasets, contexts, tags = [], [], []
        splits = (("train", "training", RAW_FILES[:2]), ("test", "evaluation", RAW_FILES[2:]))
        for split, context, names in splits:
            digest = hashlib.md5(" ".join(md5s[name] for name in names).encode(), usedforsecurity=False)
            datasets.append(MetaDataset(dataset_source, name=f"mnist-{split}",
                                        digest=digest.hexdigest()))
            contexts.append(context)
            tags.append({name: md5s[name] for name in names})
        try:
            mlflow.log_inputs(datasets, contexts, tags)
        except mlflow.exceptions.MlflowException as error:
            # MLflow's SQL store looks a dataset up, then inserts it: runs that log a new dataset
            # at the same moment (a queue's first experiments) race on its key, and all but one
            # get BAD_REQUEST. The winner's row is there now, so once more finds it; a bad request
            # of another cause fails again, and that error is raised.
            if error.error_code != "BAD_REQUEST":
                raise
            mlflow.log_inputs(datasets, contexts, tags)

    def log_metrics(self, metrics: dict[str, float], prefix: str) -> None:
        mlflow.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()
                            if isinstance(v, (int, float))})

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path=folder)
