"""The team's server, end to end with real processes: `make team-server` starts a PostgreSQL
cluster of its own and `mlflow server --app-name basic-auth` on it; queued experiments and
concurrent writers log to it with logins; wrong logins and missing permissions fail in one line.

One throwaway server for the module (tests/team.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient

from mnist_gan import store
from mnist_gan.data import RAW_FILES
from mnist_gan.store import EXPERIMENT
from tests.helpers import REPO, free_port, make_repo, pipeline_env, run
from tests.team import (
    EDITOR,
    READER,
    log_in,
    login_env,
    make,
    psql,
    psql_command,
    running_pids,
)

pytestmark = pytest.mark.slow

EPOCH_METRICS = ("p_real", "p_fake", "loss_d", "loss_g")  # logged once per epoch by the train stage


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The project on tiny params and synthetic MNIST, reproduced once into its local store and
    committed, so that queued experiments re-run only train -> evaluate -> plot."""
    repo = make_repo(tmp_path_factory.mktemp("team-server-repo"))
    run(["dvc", "repro"], repo, pipeline_env())
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], repo)
    return repo


def test_server_runs_on_postgresql_with_its_secrets_private(team_server):
    again = make("team-server", *team_server.make_vars).stdout
    assert f"team server already running: {team_server.url}" in again
    # the tracking server's experiment and the auth app's users are rows of the cluster's databases
    location = psql(team_server, "mlflow", f"SELECT artifact_location FROM experiments "
                                           f"WHERE name = '{EXPERIMENT}'")
    assert location == f"mlflow-artifacts:/{team_server.experiment_id}"  # artifacts go through the server
    assert psql(team_server, "mlflow_auth", "SELECT username, is_admin FROM users ORDER BY id").split() == \
        ["admin|t", "alice|f", "bob|f"]
    for secret in ("pgpass", "secret_key", "admin_password"):
        assert getattr(team_server.folder, secret).stat().st_mode & 0o777 == 0o600, secret
    # no password on a command line: the server logs in to PostgreSQL through PGPASSFILE
    command = Path(f"/proc/{running_pids(team_server.folder)[0]}/cmdline").read_bytes().split(b"\0")
    assert f"postgresql+psycopg2://mlflow@127.0.0.1:{team_server.pg_port}/mlflow".encode() in command


def test_a_port_in_use_or_a_closed_folder_is_one_line(team_server, tmp_path):
    fresh = tempfile.mkdtemp(prefix="team-server-")  # removed below: nothing may be started in it
    try:
        busy = make("team-server", f"TEAM_DIR={fresh}/team", f"TEAM_PORT={team_server.url.rsplit(':', 1)[1]}",
                    check=False)
        assert busy.returncode != 0 and not Path(fresh, "team").exists()
        (line,) = [ln for ln in busy.stderr.splitlines() if ln.startswith("mnist-gan")]
        assert "cannot listen on 127.0.0.1:" in line and "TEAM_PORT=" in line
    finally:
        shutil.rmtree(fresh)
    if os.geteuid() == 0:  # tmp_path is 0700: the postgres user cannot reach a folder in it
        closed = make("team-server", f"TEAM_DIR={tmp_path / 'team'}", f"TEAM_PORT={free_port()}",
                      f"TEAM_PG_PORT={free_port()}", check=False)
        assert closed.returncode != 0 and "Traceback" not in closed.stderr
        assert "the postgres user" in closed.stderr and "set TEAM_DIR" in closed.stderr


def test_four_queued_experiments_log_every_epoch_once_with_artifacts_and_model(team_server, repo,
                                                                                 monkeypatch):
    env = login_env(team_server.url, EDITOR) | {"OMP_NUM_THREADS": "1"}  # four workers on few cores
    run(["dvc", "exp", "run", "--queue", "-S", "seed=11,12,13,14"], repo, env)
    run(["dvc", "queue", "start", "-j", "4"], repo, env)
    deadline = time.monotonic() + 600
    while True:
        status = run(["dvc", "queue", "status"], repo, env)
        if not any(word in status for word in ("Queued", "Running")):
            break
        assert time.monotonic() < deadline, f"queue not done in 600 s:\n{status}"
        time.sleep(5)
    failed = [line.split()[1] for line in status.splitlines() if line.endswith("Failed")]
    assert status.count("Success") == 4, status + "".join(run(["dvc", "queue", "logs", name], repo, env)
                                                          for name in failed)

    client = log_in(monkeypatch, team_server.url, EDITOR)
    runs = client.search_runs([team_server.experiment_id], filter_string="tags.dvc_exp_name != ''")
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.params["seed"] for r in runs) == ["11", "12", "13", "14"]
    for served in runs:
        run_id = served.info.run_id
        for key in EPOCH_METRICS:
            assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2], (run_id, key)
        assert "eval/fid" in served.data.metrics  # evaluate logged into the same run
        assert {a.path for a in client.list_artifacts(run_id, "plots")} >= {"plots/d_scores.png",
                                                                            "plots/samples.png"}
        samples = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
        # the grid of each epoch: images/samples+step+<epoch>+timestamp+...png
        assert sorted(p.split("+step+")[1].split("+")[0] for p in samples) == ["1", "2"], samples
        (model,) = client.search_logged_models([team_server.experiment_id],
                                               filter_string=f"source_run_id = '{run_id}'")
        assert model.name == "generator"
    # through the server into TEAM_DIR/artifacts: the clients never saw the storage
    assert len(list(team_server.folder.artifacts.rglob("d_scores.png"))) == 4


WRITER = """
import sys, time
from mlflow.tracking import MlflowClient
writer, start_at, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
client = MlflowClient()
run_id = client.create_run(sys.argv[4], run_name=f"stress-{writer}").info.run_id
ready = time.time() < start_at
time.sleep(max(0.0, start_at - time.time()))
step = 0
while time.time() < start_at + seconds:
    client.log_metric(run_id, "value", writer * 1000 + step * 0.5, step=step)
    step += 1
client.set_terminated(run_id)
print("logged", run_id, step, ready)  # MLflow's client prints lines of its own
"""


def test_eight_concurrent_writers_lose_no_point(team_server, monkeypatch):
    writers, seconds = 8, 15
    start_at = time.time() + 20  # after all have imported MLflow and opened their runs: all log at once
    env = login_env(team_server.url, EDITOR)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(w), str(start_at), str(seconds),
                               team_server.experiment_id], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for w in range(writers)]
    results = [proc.communicate(timeout=180) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * writers, "\n".join(err for _, err in results)
    client = log_in(monkeypatch, team_server.url, EDITOR)
    for writer, (out, _) in enumerate(results):
        ((run_id, logged, ready),) = [line.split()[1:] for line in out.splitlines()
                                      if line.startswith("logged ")]
        count = int(logged)
        assert ready == "True", f"writer {writer} started late: the writers did not overlap"
        history = sorted(client.get_metric_history(run_id, "value"), key=lambda m: m.step)
        assert count >= 5  # on a loaded CI machine too
        assert [(m.step, m.value) for m in history] == [(s, writer * 1000 + s * 0.5) for s in range(count)]


def until(condition, failure: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.2)


DATASET_WRITER = """
import sys
import mlflow
from mnist_gan.tracking import MlflowTracker
with mlflow.start_run(experiment_id=sys.argv[1]) as run:
    MlflowTracker(run.info.run_id).log_datasets(sys.argv[2])
print("logged", run.info.run_id)
"""


def test_runs_logging_a_new_dataset_at_once_all_record_it(team_server, synthetic_raw, monkeypatch):
    """MLflow's store looks a dataset up, then inserts it. A lock on its table, held until every
    writer has looked and waits to insert, makes the race of a queue's first experiments certain."""
    writers = 4
    for name in RAW_FILES:  # files whose MD5s no run has logged yet: a dataset new to the store
        (synthetic_raw / name).write_bytes(os.urandom(64))
    command, psql_env = psql_command(team_server, "mlflow")
    lock = subprocess.Popen([*command, "-qo", os.devnull], stdin=subprocess.PIPE, env=psql_env, text=True)
    # EXCLUSIVE lets the writers' SELECTs through and stops their INSERTs
    lock.stdin.write("BEGIN; LOCK TABLE datasets IN EXCLUSIVE MODE;\n")
    lock.stdin.flush()
    held = ("SELECT count(*) FROM pg_locks JOIN pg_class ON relation = pg_class.oid "
            "WHERE relname = 'datasets' AND mode = 'ExclusiveLock' AND granted")
    until(lambda: psql(team_server, "mlflow", held) == "1", "the lock on datasets was never taken")
    env = login_env(team_server.url, EDITOR)
    procs = [subprocess.Popen([sys.executable, "-c", DATASET_WRITER, team_server.experiment_id,
                               str(synthetic_raw)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(writers)]
    try:
        waiting = ("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                   "AND query LIKE 'INSERT INTO datasets%'")
        until(lambda: psql(team_server, "mlflow", waiting) == str(writers),
              "the writers never all waited to insert the dataset")
    finally:
        lock.communicate("COMMIT;\n", timeout=30)
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * writers, "\n".join(err for _, err in results)
    client = log_in(monkeypatch, team_server.url, EDITOR)
    run_ids = [line.split()[1] for out, _ in results for line in out.splitlines()
               if line.startswith("logged ")]
    inputs = [{(i.dataset.name, i.dataset.digest) for i in client.get_run(run_id).inputs.dataset_inputs}
              for run_id in run_ids]
    assert len(run_ids) == writers and len(inputs[0]) == 2 and all(each == inputs[0] for each in inputs)


def train_stage(repo: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    began = time.monotonic()
    result = subprocess.run([sys.executable, "stages/train.py"], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=120, check=False)
    return result, time.monotonic() - began


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("ERROR")]
    return line


def test_a_wrong_password_or_a_reader_fails_in_one_line_before_training(team_server, repo, monkeypatch):
    client = log_in(monkeypatch, team_server.url, EDITOR)
    before = len(client.search_runs([team_server.experiment_id]))

    wrong, seconds = train_stage(repo, login_env(team_server.url, (EDITOR[0], "not-the-password")))
    line = one_error_line(wrong)
    assert f"{team_server.url} refused the login of user 'alice'" in line
    assert "MLFLOW_TRACKING_PASSWORD" in line
    assert seconds < 60 and "epoch" not in wrong.stderr.lower()

    reader, _ = train_stage(repo, login_env(team_server.url, READER))
    line = one_error_line(reader)
    assert f"MLflow user 'bob' may not start runs in experiment {EXPERIMENT} on {team_server.url}" in line
    assert len(client.search_runs([team_server.experiment_id])) == before  # neither left a run

    # the reader reads; the editor writes
    log_in(monkeypatch, team_server.url, READER)
    assert MlflowClient().get_experiment(team_server.experiment_id).name == EXPERIMENT
    with pytest.raises(mlflow.exceptions.MlflowException, match="Permission denied"):
        MlflowClient().create_run(team_server.experiment_id)
    log_in(monkeypatch, team_server.url, EDITOR)
    MlflowClient().set_terminated(MlflowClient().create_run(team_server.experiment_id).info.run_id)


def test_the_admin_changes_the_password_and_it_survives_a_restart(team_server, monkeypatch):
    name, first = team_server.admin
    new = "a-new-admin-password"
    log_in(monkeypatch, team_server.url, (name, first))
    get_app_client("basic-auth", tracking_uri=team_server.url).update_user_password(
        name, new, current_password=first)
    log_in(monkeypatch, team_server.url, (name, new))
    store.check_reachable(team_server.url)

    # MLflow reads the first password only to create the admin: a restart keeps the new one (and
    # empties the workers' login caches, which may accept the old one for up to 30 s)
    assert "stopped mlflow server" in make("team-server-stop", *team_server.make_vars).stdout
    assert f"team server: {team_server.url}" in make("team-server", *team_server.make_vars).stdout
    store.check_reachable(team_server.url)
    assert MlflowClient().get_experiment_by_name(EXPERIMENT).experiment_id == team_server.experiment_id
    log_in(monkeypatch, team_server.url, (name, first))
    with pytest.raises(store.TrackingError, match="refused the login of user 'admin'"):
        store.check_reachable(team_server.url)
