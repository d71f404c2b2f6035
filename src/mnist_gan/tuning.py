"""`python -m mnist_gan tune`: Optuna's search over a preset's params, every trial an MLflow run.

The search of preset P is declared in conf/search/P.yaml, beside its params (conf/model/P.yaml):
the space of each key, and how the pruner is fed. The study lives in an Optuna RDB storage (the
team server's PostgreSQL, or a SQLite file on one machine), so any process on any machine that
opens the same storage and study joins the search; `--workers N` starts N of them here.

A trial is the train stage's training in-process, on params composed as `dvc exp run -S` composes
them (conf/ with `model=P` and the trial's values), logged as one MLflow run nested under the
study's run and tagged with the study and trial. Every `prune.every` epochs the frozen judge scores
a cheap FID of `prune.samples` digits, which Optuna's median pruner compares across trials; a
finished trial's value is the FID of the evaluate stage's sample count. `--apply-best` re-runs the
best trial as a DVC experiment, which `dvc exp show` lists and CI can diff.

Faults: each worker beats a heartbeat into the storage, so a worker killed mid-trial leaves its
trial RUNNING only until another worker (or the next `tune`) sees the beat stale and marks it FAIL;
the study counts COMPLETE and PRUNED trials only, so it still reaches its size.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shlex
import socket
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import optuna
import torch
import yaml
from mlflow.tracking import MlflowClient
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from mnist_gan import paths, store, tracking
from mnist_gan.classifier import Classifier, load_classifier, predict
from mnist_gan.composition import compose
from mnist_gan.data import load_labelled
from mnist_gan.errors import UserError
from mnist_gan.models import GeneratorModel
from mnist_gan.params import Params, ParamsError, parse_params, resolve_device
from mnist_gan.quality import frechet_distances, quality_metrics
from mnist_gan.training import TrainingDiverged, latents, sample, train

log = logging.getLogger(__name__)
# the heartbeat (stale trials marked FAIL) is "experimental" in Optuna 5.0: a warning per worker
# that a user can do nothing about
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

SEARCH_DIR = Path("conf/search")
# the keys a search may vary: those that shape training (model is the preset, fixed per study)
TUNABLE = ("epochs", "batch_size", "lr", "beta1", "ema", "width", "dropout", "codes", "d_noise", "loss",
           "precision")
STUDY_TAG, TRIAL_TAG, STATE_TAG = "optuna_study", "optuna_trial", "optuna_state"
PARENT_ATTR, PRESET_ATTR = "mlflow_parent_run_id", "preset"  # of the study
RUN_ATTR, WORKER_ATTR = "mlflow_run_id", "worker"  # of a trial: its run, and host:pid of its process
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # what makes up a study's size
CHEAP_FID_METRIC = "tune/cheap_fid"


class TuneError(UserError):
    """A search that cannot start: a bad search file, storage or study."""


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One key's space: `kind` float or int over [low, high] (log-scaled, or in steps), or choice."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        suggest = trial.suggest_float if self.kind == "float" else trial.suggest_int
        step = {"step": self.step} if self.step else {}
        return suggest(self.key, self.low, self.high, log=self.log, **step)

    def extremes(self) -> tuple[Any, ...]:
        return self.choices if self.kind == "choice" else (self.low, self.high)


@dataclasses.dataclass(frozen=True)
class Search:
    """conf/search/<preset>.yaml, parsed and checked."""

    preset: str
    space: tuple[Dimension, ...]
    prune_every: int     # epochs between the cheap FIDs the pruner compares
    prune_samples: int   # digits generated (and test digits) per cheap FID
    startup_trials: int  # trials the sampler draws at random, and the pruner lets run, before either learns
    warmup: int          # epochs of every trial the pruner lets run: an EMA generator's early FIDs lag


def _dimension(file: Path, key: str, spec: Any) -> Dimension:
    where = f"{file}: space.{key}"
    if key not in TUNABLE:
        raise TuneError(f"{where}: not a key a search can vary; pick from {', '.join(TUNABLE)}")
    kinds = [kind for kind in ("float", "int", "choice") if isinstance(spec, dict) and kind in spec]
    if len(kinds) != 1 or set(spec) - {kinds[0], "log", "step"}:
        raise TuneError(f"{where}: expected one of {{float: [low, high]}}, {{int: [low, high]}} or "
                        "{choice: [a, b, ...]}, optionally with log: true or step: s")
    kind, values = kinds[0], spec[kinds[0]]
    if kind == "choice":
        if not isinstance(values, list) or len(values) < 2:
            raise TuneError(f"{where}: choice needs a list of at least two values")
        return Dimension(key, kind, choices=tuple(values))
    number = float if kind == "float" else int
    if (not isinstance(values, list) or len(values) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            or (kind == "int" and not all(isinstance(v, int) for v in values)) or values[0] >= values[1]):
        raise TuneError(f"{where}: {kind} needs [low, high] with low < high, both {number.__name__}s")
    log_scale, step = spec.get("log", False), spec.get("step")
    if log_scale not in (True, False) or (log_scale and (step is not None or values[0] <= 0)):
        raise TuneError(f"{where}: log: true needs low > 0 and no step")
    if step is not None and (not isinstance(step, (int, float)) or step <= 0):
        raise TuneError(f"{where}: step must be a positive number")
    return Dimension(key, kind, number(values[0]), number(values[1]), log_scale,
                     None if step is None else number(step))


PRUNE_KEYS = {"every": 1, "samples": 1, "startup_trials": 1, "warmup": 0}  # each setting's least value


def _prune_setting(file: Path, section: dict, key: str) -> int:
    value, least = section.get(key), PRUNE_KEYS[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise TuneError(f"{file}: prune.{key} must be an integer >= {least}, got {value!r}")
    return value


def load_search(preset: str, base: dict[str, Any], root: Path = Path()) -> Search:
    """conf/search/`preset`.yaml, each key's extremes checked against params.py's bounds by
    composing them into `base` (the preset's composed params): a bad bound fails before any trial."""
    file = root / SEARCH_DIR / f"{preset}.yaml"
    if not file.is_file():
        found = sorted(p.stem for p in (root / SEARCH_DIR).glob("*.yaml"))
        raise TuneError(f"{file} not found: preset {preset!r} has no search; presets with one: "
                        f"{', '.join(found)}")
    raw = yaml.safe_load(file.read_text()) or {}
    if not isinstance(raw, dict) or set(raw) != {"space", "prune"} or not isinstance(raw["space"], dict) \
            or not raw["space"] or not isinstance(raw["prune"], dict):
        raise TuneError(f"{file}: expected the mappings space (key: its range) and prune "
                        f"({', '.join(PRUNE_KEYS)}), and nothing else")
    space = tuple(_dimension(file, key, spec) for key, spec in raw["space"].items())
    for dim in space:
        for value in dim.extremes():
            try:
                parse_params(base | {dim.key: value})
            except ParamsError as err:
                raise TuneError(f"{file}: space.{dim.key} reaches a value params.yaml refuses: "
                                f"{err}") from None
    unknown = set(raw["prune"]) - set(PRUNE_KEYS)
    if unknown:
        raise TuneError(f"{file}: prune.{sorted(unknown)[0]} is not a setting ({', '.join(PRUNE_KEYS)})")
    return Search(preset, space, *(_prune_setting(file, raw["prune"], key) for key in PRUNE_KEYS))


def base_params(preset: str, root: Path = Path()) -> dict[str, Any]:
    """params.yaml as `dvc exp run -S model=<preset>` composes it: every trial's starting point."""
    return yaml.safe_load(compose(root, [f"model={preset}"]))


def _redacted(url: str) -> str:
    """`url` without a password (a PostgreSQL URL may carry one)."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{credentials.split(':')[0]}{at}{host}" if at else url


def open_storage(url: str, heartbeat: int) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at `url`, with a heartbeat every `heartbeat` s (stale after two missed)."""
    import sqlalchemy.exc

    if url.startswith("sqlite:"):
        # workers on one file wait for each other's writes instead of failing after SQLite's 5 s
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
    elif url.startswith("postgresql"):
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    else:
        raise TuneError(f"--storage {_redacted(url)}: expected postgresql+psycopg2://USER@HOST:PORT/DB "
                        "(the team server's, docs/team.md) or sqlite:///FILE")
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                                          grace_period=2 * heartbeat)
    except sqlalchemy.exc.SQLAlchemyError as err:
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        raise TuneError(f"Optuna storage {_redacted(url)} cannot be reached ({reason}): start it "
                        "(make team-server) or pass another --storage") from None


def _sampler(search: Search) -> optuna.samplers.TPESampler:
    # constant_liar: workers that ask at the same time get different points, not the same one twice
    return optuna.samplers.TPESampler(n_startup_trials=search.startup_trials, constant_liar=True)


def _pruner(search: Search) -> optuna.pruners.MedianPruner:
    return optuna.pruners.MedianPruner(n_startup_trials=search.startup_trials, n_warmup_steps=search.warmup)


class Judge:
    """The frozen classifier's FIDs of a generator against the test set: the pruner's cheap one, on
    `samples` digits, and the evaluate stage's metrics at the end (same seed, same sample count)."""

    def __init__(self, classifier: Classifier, test_images: torch.Tensor, samples: int, params: Params):
        self.classifier, self.test_images, self.samples = classifier, test_images, samples
        self.eval = params.eval
        self.cheap_real = predict(classifier, test_images[:samples])[0]

    def _fake(self, generator: GeneratorModel, n: int) -> torch.Tensor:
        # a generator of its own: the trial's training draws the same numbers as `dvc exp run` would
        rng = torch.Generator(self.test_images.device).manual_seed(self.eval.seed)
        return sample(generator, *latents(generator, n, self.test_images.device, rng))

    def cheap_fid(self, generator: GeneratorModel) -> float:
        fake = predict(self.classifier, self._fake(generator, self.samples))[0]
        return frechet_distances(self.cheap_real, [fake])[0]

    def final(self, generator: GeneratorModel) -> dict[str, float]:
        return quality_metrics(self.classifier, self._fake(generator, self.eval.n_samples), self.test_images)


@dataclasses.dataclass
class Objective:
    """One worker's trial runner: the data, the judge and the preset's params, loaded once."""

    search: Search
    base: dict[str, Any]
    study_name: str
    parent_run_id: str

    def __post_init__(self) -> None:
        params = parse_params(self.base)
        self.device = resolve_device(params.device)
        self.train_data = load_labelled(paths.RAW_DIR, train=True, device=self.device)
        self.test_data = load_labelled(paths.RAW_DIR, train=False, device=self.device)
        self.judge = Judge(load_classifier(paths.CLASSIFIER, self.device), self.test_data[0],
                           self.search.prune_samples, params)

    def _pruning(self, trial: optuna.Trial, params: Params) -> Callable[[int, GeneratorModel], None]:
        def on_epoch(epoch: int, sampler: GeneratorModel) -> None:
            if epoch % self.search.prune_every and epoch != params.epochs:
                return
            fid = self.judge.cheap_fid(sampler)
            mlflow.log_metric(CHEAP_FID_METRIC, fid, step=epoch)
            trial.report(fid, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"cheap FID {fid:.3f} at epoch {epoch}")
        return on_epoch

    def __call__(self, trial: optuna.Trial) -> float:
        values = {dim.key: dim.suggest(trial) for dim in self.search.space}
        # no checkpoints: a trial that dies is FAIL, and the search goes on with others
        params = parse_params(self.base | values | {"checkpoint_every": 0})
        tags = {STUDY_TAG: self.study_name, TRIAL_TAG: str(trial.number)}
        pruned: optuna.TrialPruned | None = None
        with tracking.open_run(params=params, device=str(self.device), tags=tags,
                               parent_run_id=self.parent_run_id,
                               run_name=f"{self.study_name}-trial-{trial.number}") as tracker:
            trial.set_user_attr(RUN_ATTR, tracker.run_id)
            trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
            tracker.log_datasets(paths.RAW_DIR)
            (train_images, train_labels), (test_images, test_labels) = self.train_data, self.test_data
            try:
                result = train(params, train_images, test_images, self.device,
                               train_labels=train_labels, test_labels=test_labels, tracker=tracker,
                               on_epoch=self._pruning(trial, params))
            except optuna.TrialPruned as err:
                # raised again after the run's block: raised inside it, it would end the run FAILED
                pruned = err
                mlflow.set_tag(STATE_TAG, TrialState.PRUNED.name)
            else:
                metrics = self.judge.final(result.sampler)
                tracker.log_metrics(metrics, prefix="eval")
                mlflow.set_tag(STATE_TAG, TrialState.COMPLETE.name)
        if pruned is not None:
            raise pruned
        return metrics["fid"]


@dataclasses.dataclass(frozen=True)
class Job:
    """What a worker process needs: plain values, so that it pickles to a spawned process."""

    preset: str
    study_name: str
    storage: str
    trials: int
    heartbeat: int
    threads: int


def work(job: Job) -> None:
    """One worker: trials of the study until it holds `job.trials` COMPLETE or PRUNED ones."""
    torch.set_num_threads(job.threads)
    base = base_params(job.preset)
    search = load_search(job.preset, base)
    study = optuna.load_study(study_name=job.study_name, storage=open_storage(job.storage, job.heartbeat),
                              sampler=_sampler(search), pruner=_pruner(search))
    if _counted(study) < job.trials:
        objective = Objective(search, base, job.study_name, study.user_attrs[PARENT_ATTR])
        # a diverged trial is FAIL and the search goes on; anything else stops this worker
        study.optimize(objective, callbacks=[MaxTrialsCallback(job.trials, states=COUNTED)],
                       catch=(TrainingDiverged,))


def _worker_main(job: Job) -> None:
    """A spawned worker's entry point: logging, and a UserError in one line (exit status 2)."""
    from mnist_gan.errors import run_stage

    run_stage(lambda: work(job))


def _counted(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


def _check_inputs() -> None:
    for path, stage in ((paths.RAW_DIR, "download"), (paths.CLASSIFIER, "train_classifier")):
        if not path.exists():
            raise TuneError(f"{path} not found: trials train on MNIST and are judged by the frozen "
                            f"classifier; run `dvc repro {stage}` first")


def _parent_run(study: optuna.Study, base: dict[str, Any], storage: str) -> str:
    """The study's MLflow run, which its trials' runs nest under: created by the first `tune`."""
    run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id is not None and tracking.run_exists(run_id):
        return run_id
    params = parse_params(base)
    tags = {STUDY_TAG: study.study_name, "optuna_storage": _redacted(storage)}
    with tracking.open_run(params=params, device=params.device, run_name=study.study_name,
                           tags=tags) as tracker:
        study.set_user_attr(PARENT_ATTR, tracker.run_id)
    return tracker.run_id


def _end_orphaned_runs(study: optuna.Study) -> None:
    """End FAILED the MLflow runs of trials whose worker died (FAIL by a stale heartbeat): no
    process is left to end them, and they would show as RUNNING for ever."""
    client = MlflowClient()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = trial.user_attrs.get(RUN_ATTR)
        if run_id is not None and client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "failure_reason", "its worker stopped: no heartbeat (killed?)")
            client.set_terminated(run_id, "FAILED")


def table(study: optuna.Study) -> str:
    """The study's trials, one line each: number, state, FID and params; a pruned trial's FID is
    the cheap one it was pruned at (Optuna's value of a pruned trial: its last report)."""
    keys = sorted({key for t in study.trials for key in t.params})
    lines = ["| trial | state | fid | " + " | ".join(keys) + " |", "|" + "---|" * (3 + len(keys))]
    for t in study.trials:
        value = "" if t.value is None else f"{t.value:.3f}"
        if t.state == TrialState.PRUNED and t.intermediate_values:
            value += f" (cheap, epoch {max(t.intermediate_values)})"
        cells = [f"{t.params[k]:.4g}" if isinstance(t.params.get(k), float) else str(t.params.get(k, ""))
                 for k in keys]
        lines.append(f"| {t.number} | {t.state.name} | {value} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tune(preset: str, study_name: str, storage: str, trials: int, workers: int,
         heartbeat: int) -> tuple[str, bool]:
    """Run (or resume, or join) the study until it holds `trials` COMPLETE or PRUNED trials, with
    `workers` processes here; its table, and whether it got there."""
    base = base_params(preset)
    load_search(preset, base)  # every check before the first trial (each worker parses it again)
    _check_inputs()
    store.check_reachable(store.tracking_uri())
    study = optuna.create_study(study_name=study_name, storage=open_storage(storage, heartbeat),
                                direction="minimize", load_if_exists=True)
    if study.user_attrs.get(PRESET_ATTR, preset) != preset:
        raise TuneError(f"study {study_name!r} searches preset {study.user_attrs[PRESET_ATTR]!r}, not "
                        f"{preset!r}: pass --preset {study.user_attrs[PRESET_ATTR]} or another --study")
    study.set_user_attr(PRESET_ATTR, preset)
    parent = _parent_run(study, base, storage)
    job = Job(preset, study_name, storage, trials, heartbeat, max(1, (os.cpu_count() or 1) // workers))
    # spawn, not fork: each worker gets fresh torch threads, MLflow client and database connections
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker_main, args=(job,), name=f"tune-worker-{i}")
                 for i in range(workers if _counted(study) < trials else 0)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
        if process.exitcode:
            log.warning("%s ended with exit status %s; its running trial, if any, is FAIL once its "
                        "heartbeat is stale", process.name, process.exitcode)
    optuna.storages.fail_stale_trials(study)
    _end_orphaned_runs(study)
    summary = table(study)
    with tracking.open_run(parent) as tracker:
        done = [t for t in study.trials if t.state == TrialState.COMPLETE]
        if done:
            tracker.log_metrics({"best_fid": study.best_value, "best_trial": study.best_trial.number}, "tune")
        mlflow.log_text(summary + "\n", "trials.md")
    return summary, _counted(study) >= trials


def apply_best(study_name: str, storage: str, heartbeat: int) -> int:
    """`dvc exp run` of the study's best trial's params; its exit status."""
    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage, heartbeat))
    except KeyError:
        raise TuneError(f"no study {study_name!r} in {_redacted(storage)}: run `tune` first, or pass "
                        "--study and --storage") from None
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise TuneError(f"study {study_name!r} has no COMPLETE trial yet: run `tune` until one finishes")
    best = study.best_trial
    overrides = [f"model={study.user_attrs[PRESET_ATTR]}"] + [f"{k}={v!r}" for k, v in best.params.items()]
    command = ["dvc", "exp", "run", "-n", f"{study_name}-trial-{best.number}",
               *[arg for override in overrides for arg in ("-S", override)]]
    print(f"best: trial {best.number}, fid {best.value:.3f}; $ {shlex.join(command)}", flush=True)
    return subprocess.run(command, check=False).returncode
