"""The command line imports per subcommand: `generate` from a file loads neither MLflow nor, for a
.npy array, matplotlib. Each runs in a fresh interpreter under `-X importtime`, which lists every
module the command imported."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from mnist_gan.models import build_models, save_model
from tests.helpers import CPU, REPO


def imported_modules(*args: str) -> set[str]:
    """The top-level packages that `python -m mnist_gan ARGS` imported; it must succeed.

    Run from the repo root: under `make mutation` the package is mutmut's copy, whose trampolines
    find their configuration in the working directory's pyproject.toml."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "mnist_gan", *args], cwd=REPO,
                          env=env | {"PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    # "import time: self [us] | cumulative | imported package", nested names indented
    return {line.rsplit("|", 1)[1].strip().split(".")[0]
            for line in done.stderr.splitlines() if line.startswith("import time:") and "|" in line}


@pytest.mark.parametrize("out, absent, present", [
    ("samples.npy", {"mlflow", "matplotlib"}, {"torch", "numpy"}),
    ("samples.png", {"mlflow"}, {"torch", "matplotlib"}),  # the grid is drawn by plotting.image_grid
])
def test_generate_from_a_file_imports_no_mlflow(tmp_path, out, absent, present):
    generator, _ = build_models("mlp", 100, 8, 0.0, CPU)
    save_model(generator, tmp_path / "generator.pt")
    modules = imported_modules("generate", "--model", str(tmp_path / "generator.pt"), "-n", "4",
                               "--out", str(tmp_path / out))
    assert modules & absent == set() and present <= modules
    if out.endswith(".npy"):
        assert np.load(tmp_path / out).shape == (4, 28, 28)
