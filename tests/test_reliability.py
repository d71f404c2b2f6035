"""Faults injected for real into the pipeline in temporary repos (docs/reliability.md lists them):
signals sent to the running train stage, a corrupt file on disk, a mistyped param, a closed port,
a NaN. Each test checks what the user is told and that nothing produced before was lost.

Two repos train the same 6 epochs: `baseline` uninterrupted (in the background, while the other
trains), and `interrupted`, stopped twice and resumed. The other faults are injected into the
baseline, which each test gives back as it found it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from mnist_gan import paths, training
from mnist_gan.data import RAW_FILES
from mnist_gan.files import read_json
from tests.helpers import free_port, make_repo, pipeline_env, run, set_params

pytestmark = pytest.mark.slow

EPOCHS = 6
METRICS = ("p_real", "p_fake", "loss_d", "loss_g", "seconds")
# what download and train produced before a fault, and the lock file that records them
OUTPUTS = [*(paths.RAW_DIR / name for name in RAW_FILES), paths.GENERATOR, paths.DISCRIMINATOR,
           paths.SAMPLES, paths.TRAIN_METRICS, paths.HISTORY, Path("dvc.lock")]


# --- helpers --------------------------------------------------------------------------------------------
def train_repo(root: Path) -> Path:
    """make_repo's tiny pipeline, trained for EPOCHS epochs with a checkpoint after each."""
    repo = make_repo(root)
    edit_params(repo, epochs=EPOCHS, checkpoint_every=1)
    run(["git", "commit", "-qam", f"{EPOCHS} epochs"], repo)
    return repo


def edit_params(repo: Path, **values) -> None:
    """Set `values` in the repo's params.yaml, as a user edits it (a dotted key: a group's key)."""
    params = set_params(yaml.safe_load((repo / "params.yaml").read_text()), **values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stage_env(**extra: str) -> dict[str, str]:
    """The environment of a stage run directly, as dvc.yaml runs it (the repo's own src first)."""
    return pipeline_env() | {"PYTHONPATH": "src"} | extra


def run_failing(cmd: list[str], repo: Path, env: dict[str, str]) -> tuple[str, float]:
    """Run a command that must fail; its output and how long it took."""
    started = time.monotonic()
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=False)
    assert result.returncode != 0, f"{' '.join(cmd)} should have failed:\n{result.stdout}{result.stderr}"
    return result.stdout + result.stderr, time.monotonic() - started


def snapshot(repo: Path) -> dict[str, str | None]:
    """md5 of each output (None: absent)."""
    return {str(p): hashlib.md5((repo / p).read_bytes()).hexdigest() if (repo / p).is_file() else None
            for p in OUTPUTS}


def assert_none_half_written(repo: Path, before: dict[str, str | None]) -> None:
    """`dvc repro` deletes a stage's outputs before running it: each may be gone, none may differ."""
    assert all(now in (None, before[p]) for p, now in snapshot(repo).items()), snapshot(repo)


def restore(repo: Path, before: dict[str, str | None]) -> None:
    """What a user runs after a failed `dvc repro` (and an edit of params.yaml to undo): everything
    comes back byte for byte."""
    run(["git", "checkout", "--", "params.yaml", "metrics"], repo)  # metrics are `cache: false`: git's
    run(["dvc", "checkout", "--force", "download", "train"], repo, pipeline_env())
    assert snapshot(repo) == before


def train_pid(repo: Path) -> int | None:
    """The `python stages/train.py` process running in `repo`, if any."""
    for entry in Path("/proc").iterdir():
        try:
            if (b"stages/train.py" in (entry / "cmdline").read_bytes().split(b"\0")
                    and Path(os.readlink(entry / "cwd")) == repo.resolve()):
                return int(entry.name)
        except (OSError, ValueError):  # not a process, or one that just ended
            continue
    return None


def checkpoint_epoch(repo: Path) -> int:
    try:  # mmap: only the pickle is read, not the tensors
        return torch.load(repo / paths.CHECKPOINT, mmap=True, weights_only=True)["epoch"]
    except FileNotFoundError:
        return 0


def signal_after_checkpoint(repo: Path, proc: subprocess.Popen, epoch: int, signum: int) -> str:
    """Once the train stage has checkpointed `epoch`, send it `signum`; the command's output."""
    seen = None
    while True:
        assert proc.poll() is None, f"ended before the checkpoint of epoch {epoch}:\n{proc.stdout.read()}"
        try:  # each checkpoint is a new file: read one only when it appears
            stat = (repo / paths.CHECKPOINT).stat()
        except FileNotFoundError:
            stat = None
        if stat and (stat.st_ino, stat.st_mtime_ns) != seen:
            seen = stat.st_ino, stat.st_mtime_ns
            if checkpoint_epoch(repo) >= epoch:
                break
        time.sleep(0.02)
    os.kill(train_pid(repo), signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    return out


def start(cmd: list[str], repo: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=repo, env=pipeline_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def mlflow_client(repo: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def weights(repo: Path, path: Path) -> dict[str, torch.Tensor]:
    return torch.load(repo / path, weights_only=True)["state_dict"]


# --- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def baseline_started(tmp_path_factory):
    """`dvc repro train` of the uninterrupted run, started in the background."""
    repo = train_repo(tmp_path_factory.mktemp("baseline"))
    proc = start(["dvc", "repro", "train"], repo)
    yield repo, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def baseline(baseline_started) -> Path:
    """The uninterrupted run's repo, its outputs committed as a user would after `dvc repro`."""
    repo, proc = baseline_started
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "trained"], repo)
    return repo


@pytest.fixture(scope="module")
def interrupted(baseline_started, tmp_path_factory) -> dict:
    """The same training as the baseline, SIGTERMed, resumed and killed (-9), then resumed to the end.
    Returns what was observed after each step."""
    repo = train_repo(tmp_path_factory.mktemp("interrupted"))
    client = mlflow_client(repo)
    seen: dict = {"repo": repo}

    # 1. SIGTERM mid-training (what `kill`, a scheduler or a closing terminal sends)
    proc = start(["dvc", "repro", "train"], repo)
    seen["sigterm_output"] = signal_after_checkpoint(repo, proc, 1, signal.SIGTERM)
    state = torch.load(repo / paths.CHECKPOINT, weights_only=True)
    seen["sigterm_checkpoint_epoch"], seen["run_id"] = state["epoch"], state["run_id"]
    seen["sigterm_run"] = client.get_run(state["run_id"])

    # 2. resumed, then kill -9 mid-training, after a checkpoint of epoch >= 2
    proc = start(["dvc", "repro", "train"], repo)
    seen["kill_output"] = signal_after_checkpoint(repo, proc, seen["sigterm_checkpoint_epoch"] + 1,
                                                  signal.SIGKILL)
    seen["kill_checkpoint"] = torch.load(repo / paths.CHECKPOINT, weights_only=True)
    seen["kill_run"] = client.get_run(seen["run_id"])
    seen["kill_generator_exists"] = (repo / paths.GENERATOR).exists()

    # 3. resumed to the end
    seen["final_output"] = run(["dvc", "repro", "train"], repo, pipeline_env())
    return seen


# --- faults ---------------------------------------------------------------------------------------------
def test_sigterm_marks_the_run_failed_with_the_reason_and_keeps_the_checkpoint(interrupted):
    assert "terminated by SIGTERM" in interrupted["sigterm_output"]
    run_ = interrupted["sigterm_run"]
    assert run_.info.status == "FAILED"
    assert run_.data.tags["failure_reason"] == "SystemExit: terminated by SIGTERM"
    assert 1 <= interrupted["sigterm_checkpoint_epoch"] < EPOCHS


def test_kill_9_then_rerun_resumes_into_the_same_run_and_equals_an_uninterrupted_run(interrupted, baseline):
    repo = interrupted["repo"]
    # the kill landed mid-training: a checkpoint of epoch >= 2 was left, and no model yet
    killed_at = interrupted["kill_checkpoint"]["epoch"]
    assert 2 <= killed_at < EPOCHS and not interrupted["kill_generator_exists"]
    assert interrupted["kill_checkpoint"]["run_id"] == interrupted["run_id"]
    assert interrupted["kill_run"].info.status == "RUNNING"  # SIGKILL cannot be caught: left to the resume
    assert f"resuming after epoch {killed_at}" in interrupted["final_output"]
    assert not (repo / paths.CHECKPOINT).exists()  # removed once the outputs were written

    # the history has each epoch once, and equals the uninterrupted run's (CPU, same seed)
    history, reference = pd.read_csv(repo / paths.HISTORY), pd.read_csv(baseline / paths.HISTORY)
    assert history["epoch"].tolist() == list(range(1, EPOCHS + 1))
    pd.testing.assert_frame_equal(history.drop(columns="seconds"), reference.drop(columns="seconds"))
    for model in (paths.GENERATOR, paths.DISCRIMINATOR):
        resumed, uninterrupted = weights(repo, model), weights(baseline, model)
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted), model

    # one MLflow run throughout, FINISHED, its per-epoch metrics those of the uninterrupted run, once each
    run_id = interrupted["run_id"]
    assert read_json(repo / paths.TRAIN_METRICS)["mlflow_run_id"] == run_id
    client, reference_client = mlflow_client(repo), mlflow_client(baseline)
    run_ = client.get_run(run_id)
    assert run_.info.status == "FINISHED" and "failure_reason" not in run_.data.tags
    assert len(client.search_runs([run_.info.experiment_id])) == 1
    reference_id = read_json(baseline / paths.TRAIN_METRICS)["mlflow_run_id"]
    for key in METRICS:
        points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        expected = sorted((m.step, m.value) for m in reference_client.get_metric_history(reference_id, key))
        assert [step for step, _ in points] == list(range(1, EPOCHS + 1)), key
        assert key == "seconds" or points == expected, key
    images = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    assert len(images) == EPOCHS  # sample_every=1: one grid per epoch, none twice


def test_corrupt_source_file_fails_the_download_naming_it(baseline, tmp_path):
    before = snapshot(baseline)
    source = tmp_path / "bad-source"
    source.mkdir()
    for name in RAW_FILES:
        (source / name).write_bytes((baseline.parent / "source" / name).read_bytes())
    damaged = source / "train-images-idx3-ubyte"
    damaged.write_bytes(damaged.read_bytes()[:-1000])
    edit_params(baseline, **{"data.source": str(source)})
    try:
        # the stage alone: data/MNIST/raw is replaced only by verified files, so it stays as it was
        out, _ = run_failing([sys.executable, "stages/download.py"], baseline, stage_env())
        assert f"{damaged}: truncated or corrupt (header says (1000, 28, 28)" in out
        assert "(left as it was)" in out
        assert snapshot(baseline) == before
        assert not list((baseline / paths.RAW_DIR).parent.glob(".raw.*"))  # nor any temporary copy

        # under DVC, which deletes a stage's outputs before running it (unless they are `persist`):
        # the message says what state data/MNIST/raw is in, and how to get it back if it is gone
        out, _ = run_failing(["dvc", "repro", "download"], baseline, pipeline_env())
        assert f"{damaged}: truncated or corrupt" in out
        if (baseline / paths.RAW_DIR).exists():
            assert "(left as it was)" in out
        else:
            assert "`dvc checkout data/MNIST/raw` brings back the last good copy" in out
        assert_none_half_written(baseline, before)
    finally:
        restore(baseline, before)


def test_typo_in_a_param_fails_before_any_work_naming_it(baseline):
    before = snapshot(baseline)
    try:
        # `dvc exp run -S` itself refuses a key that is not in params.yaml, before touching anything
        out, _ = run_failing(["dvc", "exp", "run", "-S", "lrr=0.1"], baseline, pipeline_env())
        assert "Could not override 'lrr'" in out
        assert snapshot(baseline) == before
        # and `dvc repro` one that a stage lists, renamed by the typo (once it has removed the outputs)
        text = (baseline / "params.yaml").read_text()
        (baseline / "params.yaml").write_text(text.replace("\nlr: ", "\nlrr: "))
        out, _ = run_failing(["dvc", "repro", "train"], baseline, pipeline_env())
        assert "Parameters 'lr' are missing from 'params.yaml'" in out
        assert_none_half_written(baseline, before)
        restore(baseline, before)

        # a typo DVC does not see (a key no stage lists) stops the train stage at its first line
        edit_params(baseline, lrr=0.1, epochs=EPOCHS + 1)
        out, seconds = run_failing(["dvc", "repro", "train"], baseline, pipeline_env())
        assert "unknown key 'lrr' (did you mean 'lr'?)" in out
        assert not (baseline / paths.CHECKPOINT).exists() and seconds < 60
        assert_none_half_written(baseline, before)
    finally:
        restore(baseline, before)


def test_unreachable_tracking_server_fails_in_seconds_naming_it(baseline):
    before = snapshot(baseline)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    try:
        # the stage alone: it fails before loading data or training, and touches nothing
        out, seconds = run_failing([sys.executable, "stages/train.py"], baseline,
                                   stage_env(MLFLOW_TRACKING_URI=uri))
        assert f"MLflow tracking server {uri} is unreachable" in out
        assert seconds < 30  # mostly Python importing torch and mlflow on a busy machine
        assert snapshot(baseline) == before and not (baseline / paths.CHECKPOINT).exists()

        # under DVC, forced to re-run train
        out, _ = run_failing(["dvc", "repro", "--force", "--single-item", "train"], baseline,
                             pipeline_env() | {"MLFLOW_TRACKING_URI": uri})
        assert f"MLflow tracking server {uri} is unreachable" in out
        assert_none_half_written(baseline, before)
    finally:
        restore(baseline, before)


def test_nan_stops_training_keeps_the_checkpoint_and_fails_the_run(baseline, monkeypatch):
    """No learning rate NaNs this GAN reliably (its losses are computed stably), so the stage's
    own main() runs in-process with its training set turned to NaN at the start of epoch 2."""
    before = snapshot(baseline)
    for name in [k for k in os.environ if k.startswith(("MLFLOW_", "DVC_"))]:
        monkeypatch.delenv(name)
    # the repo's default store, set here because mlflow.set_tracking_uri() exports this variable:
    # monkeypatch then removes it again afterwards
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{baseline / 'mlflow.db'}")
    monkeypatch.chdir(baseline)
    spec = importlib.util.spec_from_file_location("train_stage", baseline / "stages/train.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    good = {}

    def train_with_nan_in_epoch_2(params, train_images, *args, **kwargs):
        def poison(epoch, step):
            if epoch == 2 and step == 0:
                good["checkpoint"] = paths.CHECKPOINT.read_bytes()
                train_images.fill_(float("nan"))
        return training.train(params, train_images, *args, **kwargs, on_step=poison)

    monkeypatch.setattr(stage, "train", train_with_nan_in_epoch_2)
    try:
        with pytest.raises(training.TrainingDiverged, match=r"epoch 2: loss_d=nan, loss_g=nan is not finite"):
            stage.main()
        assert paths.CHECKPOINT.read_bytes() == good["checkpoint"]  # the last good one, epoch 1
        state = torch.load(paths.CHECKPOINT, weights_only=True)
        assert state["epoch"] == 1
        run_ = mlflow_client(baseline).get_run(state["run_id"])
        assert run_.info.status == "FAILED"
        assert run_.data.tags["failure_reason"].startswith("TrainingDiverged: epoch 2: loss_d=nan")
        assert snapshot(baseline) == before  # the previous run's models and metrics/train.json
    finally:
        paths.CHECKPOINT.unlink(missing_ok=True)


def test_killed_stage_leaves_the_previous_outputs_intact(baseline):
    """kill -9 of the train stage (run alone) while it trains other params: nothing it had written
    before changes; the next run of these params resumes from the checkpoint it left."""
    before = snapshot(baseline)
    edit_params(baseline, lr=0.0003)
    proc = subprocess.Popen([sys.executable, "stages/train.py"], cwd=baseline, env=stage_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        signal_after_checkpoint(baseline, proc, 1, signal.SIGKILL)
        assert snapshot(baseline) == before
    finally:
        (baseline / paths.CHECKPOINT).unlink(missing_ok=True)
        restore(baseline, before)
