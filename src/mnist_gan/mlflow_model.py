"""The generator as an MLflow model: what the train stage logs, and what `generate` and `promote`
find in a run under the name GENERATOR_MODEL (runs:/<run id>/generator)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

GENERATOR_MODEL = "generator"  # the logged model's name: runs:/<run id>/generator


def log_generator(generator: torch.nn.Module, path: Path) -> None:
    """Log `generator` to the active run as the MLflow model "generator": z [N, d_noise] (and
    labels [N] int64 when conditional) -> images [N, 784] in [-1, 1]; `path`, its save_model file,
    rides along in the model's extra_files, so `mnist_gan generate` rebuilds it from any model URI."""
    generator = generator.cpu().eval()
    inputs = [TensorSpec(np.dtype(np.float32), (-1, generator.d_noise), "z")]
    example = (np.zeros((2, generator.d_noise), dtype=np.float32),)
    if generator.n_classes:
        inputs.append(TensorSpec(np.dtype(np.int64), (-1,), "labels"))
        example += (np.arange(2, dtype=np.int64),)
    # pt2 (torch.export) needs a tensor signature; MLflow infers one only for a single input
    signature = ModelSignature(inputs=Schema(inputs),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28 * 28))]))
    # MLflow's own requirements for a PyTorch model (torch, cloudpickle): inferring them instead
    # re-imports the model in a subprocess, about 7 s at the end of every training run
    mlflow.pytorch.log_model(generator, name=GENERATOR_MODEL, input_example=example,
                             signature=signature, extra_files=[str(path)],
                             pip_requirements=mlflow.pytorch.get_default_pip_requirements())
