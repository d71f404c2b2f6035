"""MLflow tracking on a local SQLite store: failures end runs FAILED, resumed runs hold each epoch once,
training runs carry their datasets and system metrics."""

import hashlib
import json
import os
import signal
import time

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from mnist_gan import tracking
from mnist_gan.data import OFFICIAL_MD5, RAW_FILES
from mnist_gan.signals import exit_on_stop_signals
from mnist_gan.store import TrackingError, retry_budget_s
from mnist_gan.tracking import open_run, open_stage_run, open_training_run
from tests.helpers import free_port, use_mlflow_store

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


def test_unreachable_server_fails_in_seconds_naming_it(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
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


def test_resumed_run_holds_each_epoch_once(client, tiny_params, grid_steps, monkeypatch):
    """checkpoint_every=2: epoch 3 was logged after the last checkpoint (epoch 2), then the process
    died just after uploading its grid; the resumed run re-trains epoch 3, and MLflow must not show
    it twice."""
    images = torch.zeros(16, 784)
    log_image = mlflow.log_image

    def dying_after_epoch_3(image, *, key, step):
        log_image(image, key=key, step=step)
        if step == 3:
            raise KeyboardInterrupt  # the next call to the server (a server killed here) never returns

    with pytest.raises(KeyboardInterrupt), open_training_run(tiny_params, "cpu", None) as tracker:
        monkeypatch.setattr(mlflow, "log_image", dying_after_epoch_3)
        for epoch in (1, 2, 3):
            tracker.log_epoch(record(epoch))
            tracker.log_samples(epoch, images)
    monkeypatch.setattr(mlflow, "log_image", log_image)
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
    assert run.info.status == "FINISHED"
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


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_a_training_run_records_the_train_and_test_sets_by_the_md5s_of_their_files(client, tiny_params,
                                                                                    synthetic_raw):
    with open_training_run(tiny_params, "cpu", None) as tracker:
        tracker.log_datasets(synthetic_raw)
        tracker.log_datasets(synthetic_raw)  # as a resumed run does: MLflow keeps each once
    inputs = {i.dataset.name: i for i in client.get_run(tracker.run_id).inputs.dataset_inputs}
    assert len(client.get_run(tracker.run_id).inputs.dataset_inputs) == 2
    files = {name: md5((synthetic_raw / name).read_bytes()) for name in RAW_FILES}
    for name, context, (images, labels) in (("mnist-train", "training", RAW_FILES[:2]),
                                            ("mnist-test", "evaluation", RAW_FILES[2:])):
        dataset = inputs[name].dataset
        assert dataset.digest == md5(f"{files[images]} {files[labels]}".encode())
        # synthetic data, not the official files: named by the folder it was read from
        assert json.loads(dataset.source) == {"uri": synthetic_raw.resolve().as_uri()}
        tags = {tag.key: tag.value for tag in inputs[name].tags}
        assert tags == {"mlflow.data.context": context, images: files[images], labels: files[labels]}


def test_the_official_files_are_named_by_mnists_home(client, tiny_params, synthetic_raw, monkeypatch):
    monkeypatch.setattr(tracking, "file_md5s", lambda raw_dir: dict(OFFICIAL_MD5))  # 55 MB not needed
    with open_training_run(tiny_params, "cpu", None) as tracker:
        tracker.log_datasets(synthetic_raw)
    (train,) = [i.dataset for i in client.get_run(tracker.run_id).inputs.dataset_inputs
                if i.dataset.name == "mnist-train"]
    assert json.loads(train.source) == {"url": "https://yann.lecun.com/exdb/mnist/"}
    assert train.digest == md5(b"6bbc9ace898e44ae57da46a324031adb a25bea736e30d166cdddb491f175f624")


def test_a_training_run_samples_cpu_and_memory(client, tiny_params, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    wanted = {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"}
    with open_training_run(tiny_params, "cpu", None) as tracker:
        deadline = time.monotonic() + 30
        while not wanted <= set(client.get_run(tracker.run_id).data.metrics):
            assert time.monotonic() < deadline, client.get_run(tracker.run_id).data.metrics
            time.sleep(0.2)
    metrics = client.get_run(tracker.run_id).data.metrics
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    assert 0 < metrics["system/system_memory_usage_megabytes"] < 1e7
    # the other stages' runs only add to the training run: no second sampler
    with open_stage_run(tracker.run_id, tiny_params, "cpu") as stage:
        assert stage.run_id == tracker.run_id and not mlflow.tracking.fluent.run_id_to_system_metrics_monitor


def test_the_retry_budget_is_urllib3s_backoff_summed(monkeypatch):
    assert retry_budget_s() == 4 + 8 + 16 + 32 + 64 + 120  # MLflow's defaults: 7 retries, factor 2
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    assert retry_budget_s() == 2 + 4


def test_a_response_cut_off_by_a_dying_server_is_logged_once_when_it_is_back(client, tiny_params, grid_steps,
                                                                              monkeypatch, caplog):
    """A server killed while answering: the epoch's metrics and grid reached the store, the reply never
    came, and the call failed at once, outside urllib3's retries. The tracker waits for the server
    (down at the first look, up at the second) and sends what the store lacks: nothing, here."""
    from mnist_gan import store

    images = torch.zeros(16, 784)
    answers = iter([False, True])
    monkeypatch.setattr(store, "server_answers", lambda uri: next(answers))
    log_metrics, log_image = mlflow.log_metrics, mlflow.log_image

    def cut_off(log_call):
        def stored_then_cut_off(*args, **kwargs):
            log_call(*args, **kwargs)
            monkeypatch.setattr(mlflow, log_call.__name__, log_call)  # once
            raise ConnectionError("Connection broken: IncompleteRead(0 bytes read, 2 more expected)")
        return stored_then_cut_off

    with open_training_run(tiny_params, "cpu", None) as tracker:
        tracker.log_epoch(record(1))
        monkeypatch.setattr(mlflow, "log_metrics", cut_off(log_metrics))
        tracker.log_epoch(record(2))
        answers = iter([False, True])
        monkeypatch.setattr(mlflow, "log_image", cut_off(log_image))
        tracker.log_samples(2, images)

    assert logged_steps(client, tracker.run_id) == {**{key: [1, 2] for key in METRICS}, "grid files": 1}
    assert grid_steps == [2]
    assert caplog.text.count("is back: logging again what it missed") == 2
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_a_failure_while_the_server_answers_is_raised_at_once(client, tiny_params, monkeypatch):
    def failing(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("INVALID_PARAMETER_VALUE")

    with (pytest.raises(mlflow.exceptions.MlflowException),
          open_training_run(tiny_params, "cpu", None) as tracker):
        monkeypatch.setattr(mlflow, "log_metrics", failing)
        started = time.monotonic()
        tracker.log_epoch(record(1))
    assert time.monotonic() - started < 10  # no wait for a server that never went away
    assert client.get_run(tracker.run_id).info.status == "FAILED"
