"""Plain helpers shared by the test modules (their fixtures are in conftest.py): the repo's params,
tiny synthetic MNIST, a private MLflow store, and the temporary repos of the end-to-end tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from mnist_gan.composition import compose
from mnist_gan.data import to_model_input, write_idx
from mnist_gan.params import ClassifierParams

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
# the keys every model file of conf/model/ sets, in their order
TRAINED = ("model", "epochs", "batch_size", "lr", "beta1", "ema", "width", "dropout", "codes")


# --- params ---------------------------------------------------------------------------------------------
def set_params(raw: dict[str, Any], **values: Any) -> dict[str, Any]:
    """`raw`, a params.yaml mapping, with `values` set in it; a dotted key sets a group's key
    (pass them as a dict: `set_params(raw, **{"eval.n_samples": 5})`)."""
    for key, value in values.items():
        group, _, name = key.rpartition(".")
        (raw[group] if group else raw)[name] = value
    return raw


def raw_params(**values: Any) -> dict[str, Any]:
    """The repo's params.yaml as a plain mapping, with `values` set (as `set_params` sets them)."""
    return set_params(yaml.safe_load((REPO / "params.yaml").read_text()), **values)


# --- synthetic MNIST ------------------------------------------------------------------------------------
def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 28x28 images of 10 easy classes (class k: a bright bar at row 2k+4), and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.uint8) % 10
    images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
    for i, k in enumerate(labels):
        row = 2 * int(k) + 4
        images[i, row:row + 3, 4:24] = rng.integers(200, 256, size=(3, 20), dtype=np.uint8)
    return images, labels.astype(np.uint8)


def synthetic_inputs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n synthetic digits as the classifier takes them: images [n, 784] in [-1, 1], int64 labels [n]."""
    images, labels = synthetic_digits(n, seed)
    return to_model_input(torch.from_numpy(images)), torch.from_numpy(labels).long()


def write_synthetic_mnist(raw_dir: Path, n_train: int = 1000, n_test: int = 200) -> Path:
    """The four IDX files of a tiny synthetic MNIST in `raw_dir` (train: seed 0, test: seed 1)."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_digits(n, seed)
        write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", labels)
    return raw_dir


# the judge's params on the synthetic digits: one short epoch, and a higher lr than the default so
# that the judge is also confident
SYNTHETIC_PARAMS = ClassifierParams(seed=0, epochs=1, batch_size=32, lr=3e-3)


# --- MLflow ---------------------------------------------------------------------------------------------
def use_mlflow_store(folder: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    """Point MLflow (and the project's tracking_uri) at a SQLite store in `folder`, run from there,
    with no MLFLOW_/DVC_ variables of the calling shell leaking in."""
    for name in [k for k in os.environ if k.startswith(("MLFLOW_", "DVC_"))]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(folder)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


# --- temporary repos for the end-to-end tests -----------------------------------------------------------
PACKAGE_GLOBAL = "# @package _global_\n"  # the model files' header: their keys are top-level params

# tiny params: set in conf/ (the model files' keys in every model file), since `dvc exp run`
# recomposes params.yaml from conf/ and would drop them from params.yaml
TINY = {"epochs": 2, "sample_every": 1, "eval": {"n_samples": 200}, "classifier": {"epochs": 1}}


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command that must succeed; its stdout and stderr."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def pipeline_env() -> dict[str, str]:
    """This environment without MLFLOW_/DVC_ variables, with this interpreter's bin/ first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def make_repo(root: Path) -> Path:
    """A fresh git + DVC repo holding this project's files, set to tiny params and synthetic data."""
    repo = root / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    run(["git", "init", "-q", "-b", "main"], repo)
    source = write_synthetic_mnist(root / "source")
    set_conf(repo, **TINY, data={"source": str(source), "verify": False})
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], repo)
    return repo


def set_conf(repo: Path, **values: Any) -> None:
    """Set keys in conf/ as a user edits it: a key of the model files in each of them, any other in
    conf/config.yaml (groups merged); then params.yaml from conf/, as `make repro` writes it."""
    config = yaml.safe_load((repo / "conf/config.yaml").read_text())
    for model_file in sorted((repo / "conf/model").glob("*.yaml")):
        preset = yaml.safe_load(model_file.read_text())
        preset |= {key: value for key, value in values.items() if key in preset}
        model_file.write_text(PACKAGE_GLOBAL + yaml.safe_dump(preset, sort_keys=False))
    for key, value in values.items():
        if key not in preset:
            config[key] = config[key] | value if isinstance(value, dict) else value
    (repo / "conf/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (repo / "params.yaml").write_text(compose(repo))


# --- real server processes (mlflow server, mlflow models serve) ---------------------------------------
def free_port() -> int:
    """A loopback port nothing listens on now (bound, then closed again)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Poll GET `url` until it answers; fail with the server's log if it exits or times out first."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"server exited ({process.returncode}):\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no answer from {url} in {timeout} s:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)


def start_server(cmd: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None
                 ) -> subprocess.Popen:
    """`cmd` in a process group of its own (stop it with stop_server), its output in `log`."""
    with log.open("a") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env or pipeline_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop_server(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the server's whole process group (its workers too) and wait; SIGKILL after 30 s."""
    try:
        os.killpg(process.pid, sig)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        process.wait()
