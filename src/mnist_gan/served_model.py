"""The generator as MLflow serves it: a pyfunc model from code, this file, which
mlflow_model.log_generator logs with the train stage's generator file as its artifact.

A request is a table, one row per batch of images: `n` images from noise seed `seed`, of the digit
`digit` (optional; conditional generators only, random digits without it). The answer is their
uint8 images [N, 28, 28], the rows' batches one after another, sampled by generate.generate and
converted by generate.to_pixels, as `python -m mnist_gan generate` does: the same seed gives the
same images over HTTP and from the command line.

MLflow executes this file, as a module of its own, when it logs the model and when it loads it;
it imports the installed mnist_gan package, hence `mlflow models serve --env-manager local` in
the project's environment (the package is not on PyPI for MLflow to install).
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel
from mlflow.pyfunc.model import PythonModelContext

from mnist_gan.generate import GenerateError, generate, resolve_generator, sampling_device, to_pixels

ARTIFACT = "generator"  # the model's artifact: the train stage's generator file
MAX_IMAGES = 10_000  # per request: the evaluate stage's sample count; more would only stall the server


def requests(model_input: pd.DataFrame) -> list[tuple[int, int, int | None]]:
    """(n, seed, digit or None) of each row, which MLflow has checked against the signature (columns
    n and seed in every row; digit in every row or in none, as int64 columns hold no missing value)."""
    rows = [(int(row["n"]), int(row["seed"]), None if row.get("digit") is None else int(row["digit"]))
            for row in model_input.to_dict("records")]
    total = sum(n for n, _, _ in rows)
    if total > MAX_IMAGES:
        raise GenerateError(f"the request asks for {total} images; at most {MAX_IMAGES} per request")
    return rows


class ServedGenerator(PythonModel):
    """The logged generator, in eval mode on generate's device, answering `requests` with images."""

    def load_context(self, context: PythonModelContext) -> None:
        self.generator = resolve_generator(context.artifacts[ARTIFACT], sampling_device())

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame, params=None) -> np.ndarray:
        try:
            batches = [to_pixels(generate(self.generator, n, seed, digit))
                       for n, seed, digit in requests(model_input)]
        except GenerateError as err:
            # the scoring server answers an MlflowException with 400 and its message; any other
            # exception with a generic "unexpected error"
            raise MlflowException.invalid_parameter_value(str(err)) from None
        return torch.cat(batches).numpy()


mlflow.models.set_model(ServedGenerator())
