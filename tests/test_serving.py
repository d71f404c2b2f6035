"""`mlflow models serve` of the logged generator, as a team serves its champion: the real server
process on a loopback port, one per preset (the cgan one the registry's champion, the others
their runs), asked over HTTP. Untrained generators of each preset are enough: the mechanics of
serving do not depend on the weights."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
import yaml

from mnist_gan.__main__ import main
from mnist_gan.composition import compose
from mnist_gan.mlflow_model import log_generator
from mnist_gan.models import build_models, save_model
from mnist_gan.params import parse_params
from mnist_gan.registry import ALIAS, METRIC, REGISTERED_MODEL, promote
from tests.helpers import (
    CPU,
    REPO,
    free_port,
    pipeline_env,
    start_server,
    stop_server,
    use_mlflow_store,
    wait_until_up,
)

pytestmark = pytest.mark.slow

PRESETS = sorted(path.stem for path in (REPO / "conf/model").glob("*.yaml"))
CHAMPION = "cgan"  # served as models:/mnist-gan@champion; the other presets as runs:/<id>/generator


@dataclass(frozen=True)
class Served:
    uri: str  # the model URI the server was started on
    url: str  # the server's base URL


def _log_untrained(preset: str, folder: Path) -> str:
    """The preset's generator built as training builds it, saved as the train stage saves it and
    logged as it logs it, to a run of its own; the run's id."""
    params = parse_params(yaml.safe_load(compose(REPO, [f"model={preset}"])))
    torch.manual_seed(params.seed)
    generator, _ = build_models(params.model, params.d_noise, params.width, params.dropout, CPU)
    path = folder / preset / "generator.pt"
    path.parent.mkdir()
    save_model(generator, path)
    with mlflow.start_run() as run:
        log_generator(generator, path)
        mlflow.log_metric(METRIC, 10.0)  # what promote judges by
    return run.info.run_id


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[dict[str, Served]]:
    """Each preset's generator behind `mlflow models serve --env-manager local` on a free loopback
    port, all started at once (each takes seconds to start); stopped (process group) afterwards."""
    folder = tmp_path_factory.mktemp("serving")
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_mlflow_store(folder, monkeypatch)
        runs = {preset: _log_untrained(preset, folder) for preset in PRESETS}
        assert promote(runs[CHAMPION]).promoted
        uris = {preset: f"runs:/{run_id}/generator" for preset, run_id in runs.items()}
        uris[CHAMPION] = f"models:/{REGISTERED_MODEL}@{ALIAS}"
        env = pipeline_env() | {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
                                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
        servers = {}
        try:
            for preset, uri in uris.items():
                port = free_port()
                cmd = ["mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
                       "--host", "127.0.0.1", "--port", str(port)]
                servers[preset] = (Served(uri, f"http://127.0.0.1:{port}"), folder / f"{preset}.log",
                                   start_server(cmd, folder / f"{preset}.log", cwd=folder, env=env))
            for server, log, process in servers.values():
                wait_until_up(f"{server.url}/ping", process, log)
            yield {preset: server for preset, (server, _, _) in servers.items()}
        finally:
            for _, _, process in servers.values():
                stop_server(process)
    assert all(_stopped(server.url) for server, _, _ in servers.values())


def _stopped(url: str, timeout: float = 30) -> bool:
    """Whether the server at `url` stops answering within `timeout` s: stop_server waits for
    `mlflow models serve`, and its uvicorn child shuts down a moment later."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/ping", timeout=2).close()
        except OSError:
            return True
        time.sleep(0.2)
    return False


def invoke(server: Served, records: list[dict[str, int]]) -> tuple[int, dict[str, Any]]:
    """POST /invocations with `records` as the README's curl does: the HTTP status and the JSON."""
    request = urllib.request.Request(f"{server.url}/invocations", method="POST",
                                     data=json.dumps({"dataframe_records": records}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def generated(uri: str, out: Path, *args: str) -> np.ndarray:
    """What `python -m mnist_gan generate --model URI ARGS --out x.npy` writes."""
    assert main(["generate", "--model", uri, *args, "--out", str(out)]) == 0
    return np.load(out)


@pytest.mark.parametrize("preset", PRESETS)
def test_served_images_are_generates_for_the_same_seed(served, tmp_path, preset):
    server = served[preset]
    status, body = invoke(server, [{"n": 3, "seed": 5}, {"n": 2, "seed": 6}])
    assert status == 200, body
    images = np.array(body["predictions"])
    # JSON has no uint8: MNIST's pixel values as integers, each row's images in turn
    assert images.shape == (5, 28, 28) and images.dtype == np.int64
    expected = np.concatenate([generated(server.uri, tmp_path / "a.npy", "-n", "3", "--seed", "5"),
                               generated(server.uri, tmp_path / "b.npy", "-n", "2", "--seed", "6")])
    assert expected.dtype == np.uint8 and np.array_equal(images, expected)
    assert len(np.unique(images)) > 10  # images, not a constant that any model would give
    assert invoke(server, [{"n": 3, "seed": 5}]) == (200, {"predictions": body["predictions"][:3]})


def test_a_conditional_generator_serves_the_digit_asked_for(served, tmp_path):
    server = served[CHAMPION]
    status, body = invoke(server, [{"n": 2, "seed": 1, "digit": 7}, {"n": 2, "seed": 1, "digit": 1}])
    assert status == 200, body
    sevens, ones = np.split(np.array(body["predictions"]), 2)
    assert np.array_equal(sevens, generated(server.uri, tmp_path / "7.npy", "-n", "2", "--seed", "1",
                                            "--digit", "7"))
    assert np.array_equal(ones, generated(server.uri, tmp_path / "1.npy", "-n", "2", "--seed", "1",
                                          "--digit", "1"))
    assert not np.array_equal(sevens, ones)  # the same z, other labels


@pytest.mark.parametrize("preset, records, message", [
    ("mlp", [{"n": 2, "seed": 0, "digit": 7}], "this generator is unconditional (model mlp or selfcond)"),
    ("cgan", [{"n": 2, "seed": 0, "digit": 10}], "digit 10 is out of range: 0 to 9"),
    ("selfcond", [{"n": 0, "seed": 0}], "n, the number of images, must be >= 1; got 0"),
    ("selfcond", [{"n": 6000, "seed": 0}, {"n": 6000, "seed": 1}],
     "the request asks for 12000 images; at most 10000 per request"),
    # MLflow's own checks of the signature, before the model sees the request
    ("mlp", [{"n": 2}], "Model is missing inputs ['seed']"),
    ("cgan", [{"n": 1, "seed": 0, "digit": 7}, {"n": 1, "seed": 0}], "Failed to convert column digit"),
])
def test_a_bad_request_is_a_400_that_says_why(served, preset, records, message):
    status, body = invoke(served[preset], records)
    assert status == 400 and message in body["message"], body
