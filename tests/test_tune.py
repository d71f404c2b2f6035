"""`python -m mnist_gan tune`: the search file's checks, the storage's errors, and end to end on the
team server's real PostgreSQL (the study) and MLflow with logins (the trials): two workers, a worker
SIGKILLed mid-trial, and the best trial applied as a DVC experiment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from mnist_gan import tuning
from mnist_gan.team_server import optuna_storage
from mnist_gan.tuning import Dimension, TuneError, load_search, open_storage
from tests.helpers import REPO, free_port, make_repo, pipeline_env, run
from tests.team import EDITOR, log_in, login_env

BASE = yaml.safe_load((REPO / "params.yaml").read_text())  # the mlp preset, composed
# a search of seconds per trial on the tiny data
TINY_SEARCH = {"space": {"epochs": {"int": [2, 4], "step": 2}, "lr": {"float": [0.0001, 0.001], "log": True},
                         "width": {"choice": [32, 64]}},
               "prune": {"every": 1, "samples": 100, "startup_trials": 1, "warmup": 0}}


def write_search(root: Path, search: dict[str, Any], preset: str = "mlp") -> None:
    (root / "conf/search").mkdir(parents=True, exist_ok=True)
    (root / f"conf/search/{preset}.yaml").write_text(yaml.safe_dump(search))


def search_error(tmp_path: Path, **changes: Any) -> str:
    search = {"space": dict(TINY_SEARCH["space"]), "prune": dict(TINY_SEARCH["prune"])}
    for section, values in changes.items():
        search[section] |= values
    write_search(tmp_path, search)
    with pytest.raises(TuneError) as error:
        load_search("mlp", BASE, tmp_path)
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.parametrize("preset", ["mlp", "selfcond", "cgan"])
def test_every_presets_search_loads_and_stays_inside_its_params_bounds(preset):
    search = load_search(preset, tuning.base_params(preset, REPO), REPO)
    assert search.preset == preset and {d.key for d in search.space} >= {"lr", "beta1", "epochs"}


def test_the_tiny_search_parses_into_optunas_three_kinds(tmp_path):
    write_search(tmp_path, TINY_SEARCH)
    search = load_search("mlp", BASE, tmp_path)
    assert search.space == (Dimension("epochs", "int", 2, 4, step=2),
                            Dimension("lr", "float", 0.0001, 0.001, log=True),
                            Dimension("width", "choice", choices=(32, 64)))
    assert (search.prune_every, search.prune_samples, search.startup_trials, search.warmup) == (1, 100, 1, 0)
    trial = optuna.create_study().ask()
    values = {d.key: d.suggest(trial) for d in search.space}
    assert values["epochs"] in (2, 4) and 0.0001 <= values["lr"] <= 0.001 and values["width"] in (32, 64)
    assert trial.distributions["lr"] == optuna.distributions.FloatDistribution(0.0001, 0.001, log=True)


@pytest.mark.parametrize(("changes", "message"), [
    ({"space": {"model": {"choice": ["mlp", "cgan"]}}}, "space.model: not a key a search can vary"),
    ({"space": {"lr": {"float": [0.001, 0.0001]}}}, "space.lr: float needs [low, high] with low < high"),
    ({"space": {"width": {"int": [32.5, 64]}}}, "space.width: int needs [low, high]"),
    ({"space": {"lr": {"float": [0.0, 0.1], "log": True}}}, "space.lr: log: true needs low > 0"),
    ({"space": {"lr": {"float": [0.1, 0.2], "step": -1}}}, "space.lr: step must be a positive number"),
    ({"space": {"ema": {"choice": [0.999]}}}, "space.ema: choice needs a list of at least two values"),
    ({"space": {"lr": {"uniform": [0.1, 0.2]}}}, "space.lr: expected one of"),
    ({"space": {"beta1": {"float": [0.5, 1.0]}}}, "space.beta1 reaches a value params.yaml refuses: 'beta1'"),
    ({"space": {"dropout": {"choice": [0.0, 1.0]}}}, "space.dropout reaches a value params.yaml refuses"),
    ({"prune": {"every": 0}}, "prune.every must be an integer >= 1, got 0"),
    ({"prune": {"samples": "many"}}, "prune.samples must be an integer >= 1"),
    ({"prune": {"warmup": -1}}, "prune.warmup must be an integer >= 0, got -1"),
    ({"prune": {"patience": 3}}, "prune.patience is not a setting"),
])
def test_a_bad_search_file_is_one_line_naming_the_key(tmp_path, changes, message):
    assert message in search_error(tmp_path, **changes)


def test_a_preset_without_a_search_file_names_those_with_one(tmp_path):
    write_search(tmp_path, TINY_SEARCH)
    with pytest.raises(TuneError, match=r"conf/search/cgan.yaml not found: .* presets with one: mlp$"):
        load_search("cgan", BASE, tmp_path)


def test_unreachable_storage_is_one_line_naming_it_without_its_password():
    url = f"postgresql+psycopg2://mlflow:secret@127.0.0.1:{free_port()}/optuna"
    started = time.monotonic()
    with pytest.raises(TuneError) as error:
        open_storage(url, 60)
    message = str(error.value)
    redacted = url.replace("mlflow:secret@", "mlflow@")
    assert message.startswith(f"Optuna storage {redacted} cannot be reached (")
    assert "secret" not in message and "\n" not in message and "make team-server" in message
    assert time.monotonic() - started < 15  # refused at once, not after a long timeout
    with pytest.raises(TuneError, match="expected postgresql"):
        open_storage("mysql://db/optuna", 60)


# --- end to end on the team server -------------------------------------------------------------------
HEARTBEAT = 3  # seconds: a killed worker's trial is stale 6 s after its last beat


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The project on synthetic MNIST with the tiny search, its judge trained, committed (for dvc exp)."""
    repo = make_repo(tmp_path_factory.mktemp("tune"))
    write_search(repo, TINY_SEARCH)
    run(["dvc", "repro", "train_classifier"], repo, pipeline_env())
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "judge"], repo)
    return repo


def tune_env(team_server) -> dict[str, str]:
    return login_env(team_server.url, EDITOR) | {"PGPASSFILE": str(team_server.folder.pgpass),
                                                 "PYTHONPATH": "src"}


def tune_command(team_server, study: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "mnist_gan", "tune", "--study", study, "--storage",
            optuna_storage(team_server.pg_port), "--heartbeat", str(HEARTBEAT), *args]


def load_study(team_server, study: str) -> optuna.Study:
    os.environ["PGPASSFILE"] = str(team_server.folder.pgpass)
    return optuna.load_study(study_name=study, storage=open_storage(optuna_storage(team_server.pg_port), 60))


@pytest.mark.slow
def test_two_workers_fill_a_study_on_postgresql_each_trial_a_nested_run(team_server, repo, monkeypatch):
    command = tune_command(team_server, "two-workers", "--trials", "3", "--workers", "2")
    done = subprocess.run(command, cwd=repo, env=tune_env(team_server), capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    study = load_study(team_server, "two-workers")
    states = [t.state for t in study.trials]
    assert set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}, states
    assert 3 <= len(states) <= 4  # the second worker may finish the trial it had begun
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2  # both workers ran trials
    assert "| trial | state | fid | epochs | lr | width |" in done.stdout

    client = log_in(monkeypatch, team_server.url, EDITOR)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["optuna_study"] == "two-workers" and "tune/best_fid" in parent.data.metrics
    for trial in study.trials:
        run_ = client.get_run(trial.user_attrs["mlflow_run_id"])
        tags = run_.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert (tags["optuna_study"], tags["optuna_trial"], tags["optuna_state"]) == \
            ("two-workers", str(trial.number), trial.state.name)
        assert run_.info.status == "FINISHED"
        assert {k: run_.data.params[k] for k in trial.params} == {k: str(v) for k, v in trial.params.items()}
        last = max(trial.intermediate_values)
        assert sorted(m.step for m in client.get_metric_history(run_.info.run_id, "p_real")) == \
            list(range(1, last + 1))
        cheap = {m.step: m.value for m in client.get_metric_history(run_.info.run_id, "tune/cheap_fid")}
        assert cheap == pytest.approx(trial.intermediate_values)
        if trial.state == TrialState.COMPLETE:
            assert last == trial.params["epochs"]
            assert run_.data.metrics["eval/fid"] == pytest.approx(trial.value)
            assert run_.data.metrics["eval/fid"] == parent.data.metrics["tune/best_fid"] or \
                trial.value > study.best_value


@pytest.mark.slow
def test_a_worker_killed_mid_trial_leaves_it_failed_and_the_study_still_fills(team_server, repo, monkeypatch):
    env = tune_env(team_server)
    command = tune_command(team_server, "killed", "--trials", "3")
    # its worker in its process group: killed together, as a machine that goes down
    doomed = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    other = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    deadline = time.monotonic() + 300
    victim = None
    while victim is None:
        assert time.monotonic() < deadline, "the doomed worker never got a trial under way"
        try:
            trials = load_study(team_server, "killed").get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the study is not created yet
            trials = []
        for trial in trials:
            pid = int(trial.user_attrs.get("worker", ":0").rsplit(":", 1)[1])
            if pid and os.getpgid(pid) == doomed.pid and trial.intermediate_values:  # one epoch into it
                victim = trial.number
        time.sleep(0.2)
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait()

    out = other.communicate(timeout=900)[0]
    assert other.returncode == 0, out
    study = load_study(team_server, "killed")
    log_in(monkeypatch, team_server.url, EDITOR)
    assert study.trials[victim].state == TrialState.FAIL
    orphan = MlflowClient(team_server.url).get_run(study.trials[victim].user_attrs["mlflow_run_id"])
    assert orphan.info.status == "FAILED" and "no heartbeat" in orphan.data.tags["failure_reason"]
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) >= 3


def experiment_params(repo: Path, name: str) -> dict[str, Any]:
    """params.yaml of the DVC experiment `name`, from `dvc exp show --json`."""
    def find(node: Any) -> dict[str, Any] | None:
        if isinstance(node, dict):
            if node.get("name") == name and node.get("data"):
                return node["data"]["params"]["params.yaml"]["data"]
            nodes = node.values()
        elif isinstance(node, list):
            nodes = node
        else:
            return None
        return next((found for child in nodes if (found := find(child)) is not None), None)

    shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=repo, env=pipeline_env(),
                           capture_output=True, text=True, check=True).stdout
    found = find(json.loads(shown))
    assert found is not None, f"no experiment {name}"
    return found


@pytest.mark.slow
def test_apply_best_runs_the_best_trial_as_a_dvc_experiment(team_server, repo):
    env = tune_env(team_server)
    run(tune_command(team_server, "applied", "--trials", "2"), repo, env)
    best = load_study(team_server, "applied").best_trial
    applied = run(tune_command(team_server, "applied", "--apply-best"), repo, env)
    name = f"applied-trial-{best.number}"
    assert f"best: trial {best.number}" in applied
    params = experiment_params(repo, name)
    assert params["model"] == "mlp" and {k: params[k] for k in best.params} == pytest.approx(best.params)


def test_the_table_gives_each_trial_its_state_fid_and_params():
    study = optuna.create_study()
    lr = optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)
    epochs = optuna.distributions.IntDistribution(10, 40, step=10)
    study.add_trial(optuna.trial.create_trial(params={"lr": 0.00047812, "epochs": 30}, value=95.0789,
                                              distributions={"lr": lr, "epochs": epochs}))
    study.add_trial(optuna.trial.create_trial(params={"lr": 0.00023, "epochs": 40}, state=TrialState.PRUNED,
                                              value=586.42, intermediate_values={15: 588.04, 20: 586.42},
                                              distributions={"lr": lr, "epochs": epochs}))
    assert tuning.table(study).splitlines() == [
        "| trial | state | fid | epochs | lr |", "|---|---|---|---|---|",
        "| 0 | COMPLETE | 95.079 | 30 | 0.0004781 |",
        "| 1 | PRUNED | 586.420 (cheap, epoch 20) | 40 | 0.00023 |"]
