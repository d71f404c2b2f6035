"""Shared fixtures: the real params.yaml shrunk to test size, tiny synthetic MNIST, a judge trained on
it. The plain helpers they build on, which test modules import, are in tests/helpers.py."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import mlflow
import pytest

from mnist_gan.classifier import Classifier, train_classifier
from mnist_gan.params import Params, load_params
from tests.helpers import CPU, REPO, SYNTHETIC_PARAMS, synthetic_inputs, write_synthetic_mnist
from tests.team import running_team_server


@pytest.fixture(autouse=True)
def no_tracking_uri_left_behind():
    """MLflow keeps a URI given to mlflow.set_tracking_uri (as the tests and the stages' code do)
    for the whole process, ahead of MLFLOW_TRACKING_URI: unset after each test, so that no test
    talks to a store or server another test set up."""
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def trained_judge() -> tuple[Classifier, float]:
    """The classifier trained on 1000 synthetic digits (seed 1), and its accuracy on 500 more (seed 2),
    as train_classifier returns them: test_classifier checks them, test_quality judges with it."""
    train_x, train_y = synthetic_inputs(1000, seed=1)
    test_x, test_y = synthetic_inputs(500, seed=2)
    return train_classifier(train_x, train_y, test_x, test_y, SYNTHETIC_PARAMS, CPU)


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


@pytest.fixture
def dropout_kernels():
    """The compiled CPU dropout kernel (mnist_gan.cpu_dropout); the test is skipped where it cannot
    be built, as on a machine without a C++ compiler, where the MLPs train without it."""
    import shutil

    from mnist_gan import cpu_dropout

    kernels = cpu_dropout.kernels()
    if kernels is None:
        compiler = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension builds with
        why = (f"no C++ compiler ({compiler} is not on PATH)" if shutil.which(compiler) is None
               else "its build failed: see the warning of mnist_gan.cpu_dropout")
        pytest.skip(f"the CPU dropout kernel cannot be built here, {why}")
    return kernels


@pytest.fixture(scope="module")
def team_server():
    """A throwaway team server (tests/team.py) for each module that uses it."""
    with running_team_server() as server:
        yield server
