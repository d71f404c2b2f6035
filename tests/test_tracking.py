"""MLflow tracking on a local SQLite store: failures end runs FAILED, resumed runs hold each epoch once."""

import os
import signal
import socket
import time

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from mnist_gan.signals import exit_on_stop_signals
from mnist_gan.store import TrackingError
from mnist_gan.tracking import SAMPLES_TAG, open_run, open_stage_run, open_training_run
from tests.helpers import use_mlflow_store

METRICS = ("p_real", "p_fake", "loss_d", "loss_g", "seconds")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def client(store, monkeypatch) -> MlflowClient:
    """One SQLite store for the module (creating one takes seconds); artifacts under it too."""
    return use_mlflow_store(store, monkeypatch)


def record(epoch: int) -> dict[str, float]:
    return {"epoch": epoch, "p_real": 0.5 + epoch / 100, "p_fake": 0.5 - epoch / 100,
            "loss_d": 1.0, "loss_g": 2.0, "seconds": 0.1}


@pytest.fixture
def grid_steps(monkeypatch) -> list[int]:
    """The steps of the sample grids sent to MLflow, in order (MLflow lists them only as files)."""
    steps, log_image = [], mlflow.log_image

    def recording_log_image(image, *, key, step):
        steps.append(step)
        log_image(image, key=key, step=step)

    monkeypatch.setattr(mlflow, "log_image", recording_log_image)
    return steps


def logged_steps(client: MlflowClient, run_id: str) -> dict[str, list[int] | int]:
    """Per metric, its steps; and how many grid images the run holds."""
    steps = {key: sorted(m.step for m in client.get_metric_history(run_id, key)) for key in METRICS}
    steps["grid files"] = len([a for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")])
    return steps


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_in_seconds_naming_it(monkeypatch):
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(TrackingError, match=f"MLflow tracking server {uri} is unreachable"), open_run():
        pytest.fail("the run must not start")
    assert time.monotonic() - started < 5


def test_an_error_ends_the_run_failed_with_the_reason(client, tiny_params):
    with pytest.raises(ValueError), open_run(params=tiny_params, device="cpu") as tracker:
        raise ValueError("lr too high")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "ValueError: lr too high"


def test_sigterm_in_a_stage_ends_the_run_failed(client, tiny_params):
    """As the train, evaluate and plot stages run: their run inside exit_on_stop_signals."""
    with (pytest.raises(SystemExit, match="terminated by SIGTERM"), exit_on_stop_signals(),
          open_run(params=tiny_params) as tracker):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "SystemExit: terminated by SIGTERM"


def test_resumed_run_holds_each_epoch_once(client, tiny_params, grid_steps):
    """checkpoint_every=2: epoch 3 was logged after the last checkpoint (epoch 2), then the process
    died; the resumed run re-trains epoch 3, and MLflow must not show it twice."""
    images = torch.zeros(16, 784)
    with pytest.raises(KeyboardInterrupt), open_training_run(tiny_params, "cpu", None) as tracker:
        for epoch in (1, 2, 3):
            tracker.log_epoch(record(epoch))
            tracker.log_samples(epoch, images)
        raise KeyboardInterrupt
    run_id = tracker.run_id
    assert client.get_run(run_id).data.tags["failure_reason"] == "KeyboardInterrupt"

    checkpoint = {"run_id": run_id, "epoch": 2, "history": [record(1), record(2)],
                  "samples": {1: images, 2: images}}
    with open_training_run(tiny_params, "cpu", checkpoint) as tracker:
        assert tracker.run_id == run_id
        for epoch in (3, 4):
            tracker.log_epoch(record(epoch))
            tracker.log_samples(epoch, images)

    assert logged_steps(client, run_id) == {**{key: [1, 2, 3, 4] for key in METRICS}, "grid files": 4}
    assert grid_steps == [1, 2, 3, 4]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[SAMPLES_TAG] == "4"
    assert "failure_reason" not in run.data.tags  # that attempt's failure is resolved
    assert run.data.tags["resumed_after_epoch"] == "2"


def test_resume_whose_run_is_gone_starts_a_new_run_with_the_checkpoint_epochs(client, tiny_params,
                                                                              grid_steps):
    gone = "0" * 32
    checkpoint = {"run_id": gone, "epoch": 2, "history": [record(1), record(2)],
                  "samples": {2: torch.zeros(16, 784)}}
    with open_training_run(tiny_params, "cpu", checkpoint) as tracker:
        tracker.log_epoch(record(3))
    assert tracker.run_id != gone
    steps = logged_steps(client, tracker.run_id)
    assert steps["p_real"] == [1, 2, 3] and steps["grid files"] == 1 and grid_steps == [2]
    run = client.get_run(tracker.run_id)
    assert run.data.tags["resumed_from_missing_run"] == gone and run.data.params["lr"] == "0.0002"


def test_stage_run_is_the_training_run_when_the_store_has_it(client, tiny_params):
    with open_run(params=tiny_params, device="cpu") as training:
        pass
    with open_stage_run(training.run_id, tiny_params, "cpu") as stage:
        stage.log_metrics({"fid": 3.0}, prefix="eval")
    assert stage.run_id == training.run_id
    assert client.get_run(training.run_id).data.metrics["eval/fid"] == 3.0


def test_stage_run_for_a_training_run_the_store_lacks_is_one_new_tagged_run(client, tiny_params, caplog,
                                                                            monkeypatch):
    """A clone after `dvc pull`: evaluate makes a new run, warning once; plot finds it by its tag."""
    missing = "2" * 32
    monkeypatch.setenv("DVC_EXP_NAME", "pulled-exp")
    with caplog.at_level("WARNING", logger="mnist_gan.tracking"):
        with open_stage_run(missing, tiny_params, "cpu") as evaluate:
            evaluate.log_metrics({"fid": 4.0}, prefix="eval")
        with open_stage_run(missing, tiny_params, "cpu") as plot:
            plot.log_metrics({"classes": 10}, prefix="plot")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"MLflow run {missing}" in warnings[0] and "new run" in warnings[0]
    assert plot.run_id == evaluate.run_id != missing
    run = client.get_run(evaluate.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "pulled-exp"
    assert run.data.tags["training_run_id"] == missing and run.data.tags["dvc_exp_name"] == "pulled-exp"
    assert run.data.metrics == {"eval/fid": 4.0, "plot/classes": 10.0}
    assert run.data.params["lr"] == str(tiny_params.lr)
