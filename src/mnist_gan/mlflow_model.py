"""The generator as an MLflow model: what the train stage logs, and what `generate`, `promote` and
`mlflow models serve` find in a run under the name GENERATOR_MODEL (runs:/<run id>/generator).

One format for all three: the pyfunc model of served_model.py (models from code, not a pickled
class), whose artifact is the train stage's generator file. The pytorch flavor cannot serve a
conditional generator, which takes two inputs (z and the digits).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

from mnist_gan import served_model

GENERATOR_MODEL = "generator"  # the logged model's name: runs:/<run id>/generator

# one row per batch of images; digit only for a conditional generator (served_model.requests)
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("long", "n"), ColSpec("long", "seed"), ColSpec("long", "digit", required=False)]),
    outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 28))]))


def log_generator(generator: torch.nn.Module, path: Path) -> None:
    """Log `path`, the train stage's file of `generator`, to the active run as the MLflow model
    "generator": requests (n, seed[, digit]) -> uint8 images [N, 28, 28] (served_model.py)."""
    example = {"n": [2], "seed": [0]} | ({"digit": [7]} if generator.n_classes else {})
    # MLflow's own requirements for a PyTorch model (torch, cloudpickle; MLflow adds itself): inferring
    # them instead re-imports the model in a subprocess, seconds at the end of every training run
    # the model is the file itself, which MLflow copies into the model and executes to load it
    mlflow.pyfunc.log_model(name=GENERATOR_MODEL, python_model=Path(served_model.__file__),
                            artifacts={served_model.ARTIFACT: str(path)}, signature=SIGNATURE,
                            input_example=pd.DataFrame(example),
                            pip_requirements=mlflow.pytorch.get_default_pip_requirements())
