"""Shared fixtures: the real params.yaml shrunk to test size, and tiny synthetic MNIST."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from mnist_gan.params import Params, load_params

REPO = Path(__file__).resolve().parents[1]
# the keys every model file of conf/model/ sets, in their order
TRAINED = ("model", "epochs", "batch_size", "lr", "beta1", "ema", "width", "dropout")


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 28x28 images of 10 easy classes (class k: a bright bar at row 2k+4), and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.uint8) % 10
    images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
    for i, k in enumerate(labels):
        row = 2 * int(k) + 4
        images[i, row:row + 3, 4:24] = rng.integers(200, 256, size=(3, 20), dtype=np.uint8)
    return images, labels.astype(np.uint8)


def write_synthetic_mnist(raw_dir: Path, n_train: int = 1000, n_test: int = 200) -> Path:
    """The four IDX files of a tiny synthetic MNIST in `raw_dir`."""
    from mnist_gan.data import write_idx

    raw_dir.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_digits(n, seed)
        write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", labels)
    return raw_dir


def raw_params(**values: Any) -> dict[str, Any]:
    """The repo's params.yaml as a plain mapping, with `values` set; a dotted key sets a group's key
    (pass them as a dict: `raw_params(**{"eval.n_samples": 5})`)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in values.items():
        group, _, name = key.rpartition(".")
        (raw[group] if group else raw)[name] = value
    return raw


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


@pytest.fixture
def synthetic_raw(tmp_path: Path) -> Path:
    return write_synthetic_mnist(tmp_path / "MNIST" / "raw")


@pytest.fixture
def tiny_params() -> Params:
    """The real params.yaml, shrunk: two epochs on CPU, small evaluation."""
    params = load_params(REPO / "params.yaml")
    return dataclasses.replace(
        params, epochs=2, sample_every=1, device="cpu", checkpoint_every=1,
        eval=dataclasses.replace(params.eval, n_samples=200),
        classifier=dataclasses.replace(params.classifier, epochs=1),
    )
