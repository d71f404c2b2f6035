"""`python -m mnist_gan generate`: samples of a trained generator as a PNG grid or a .npy array.

The generator comes from a local file written by the train stage, from an MLflow
run (`runs:/<run id>`, its logged model "generator") or from the Model Registry
(`models:/mnist-gan@champion`). Logged models carry the train stage's file as
their artifact, so every source is rebuilt by the same `load_model`, with the
generator's metadata (noise size, whether it is conditional). The served model
(served_model.py) samples through `generate` and `to_pixels` too, so a seed gives
the same images here and over HTTP.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from mnist_gan.errors import UserError
from mnist_gan.files import atomic_path
from mnist_gan.models import GeneratorModel, load_model
from mnist_gan.training import latents, sample

GENERATOR_FILE = "generator.pt"  # the train stage's file, as the logged model keeps it in artifacts/
URI_SCHEMES = ("runs:/", "models:/")


class GenerateError(UserError, ValueError):
    """A model reference or request that cannot work; the message says what to do."""


def resolve_generator(source: str, device: torch.device) -> GeneratorModel:
    """The generator at a local path, a `runs:/` URI or a `models:/` URI, in eval mode."""
    if not source.startswith(URI_SCHEMES):
        path = Path(source)
        if not path.is_file():
            raise GenerateError(f"{path}: no such file; give the train stage's models/generator.pt "
                                "(run `make repro` first), runs:/<run id> or models:/mnist-gan@champion")
        return _load_generator(path, device, source)
    import mlflow  # only for URIs: generating from a file works without MLflow

    from mnist_gan import store
    from mnist_gan.mlflow_model import GENERATOR_MODEL

    uri = source.rstrip("/")
    if uri.startswith("runs:/") and uri.count("/") == 1:
        uri = f"{uri}/{GENERATOR_MODEL}"  # runs:/<id> means the run's generator
    mlflow.set_tracking_uri(store.tracking_uri())
    # a few small files: MLflow's per-download progress bars would only clutter the output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        except Exception as err:  # MLflow raises its own and OSError subclasses for a missing run/model
            raise GenerateError(f"cannot download {uri} from {mlflow.get_tracking_uri()}: {err}") from err
        path = Path(local) / "artifacts" / GENERATOR_FILE
        if not path.is_file():
            raise GenerateError(f"{uri} is not a generator logged by this project's train stage "
                                f"(no artifacts/{GENERATOR_FILE}); a run logged before the served "
                                "model format needs its train stage run again")
        return _load_generator(path, device, source)


def sampling_device() -> torch.device:
    """Where generate and the served model sample: the GPU when there is one. A seed gives the same
    images on the same kind of device only (the CPU and CUDA draw different noise)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_generator(path: Path, device: torch.device, source: str) -> GeneratorModel:
    model = load_model(path, device)
    if not hasattr(model, "d_noise"):
        raise GenerateError(f"{source} holds a discriminator, not a generator")
    return model


def generate(generator: GeneratorModel, n: int, seed: int, digit: int | None = None,
             code: int | None = None) -> torch.Tensor:
    """n images [n, 784] in [-1, 1], of `digit` (conditional generators) or `code` (selfcond ones) if
    given; the same generator and seed give the same images."""
    if n < 1:
        raise GenerateError(f"n, the number of images, must be >= 1; got {n}")
    device = next(generator.parameters()).device
    rng = torch.Generator(device).manual_seed(seed)
    try:
        z, labels = latents(generator, n, device, rng, digit=digit, code=code)
    except ValueError as err:
        raise GenerateError(str(err)) from None
    return sample(generator, z, labels)


def check_output(out: Path) -> None:
    """Fail on an output name write_samples cannot write, before any model is loaded."""
    if out.suffix not in (".png", ".npy"):
        raise GenerateError(f"{out}: the output must end in .png (a grid) or .npy (an array)")


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images [n, 784] in [-1, 1] as MNIST stores them: uint8 [n, 28, 28] on the CPU."""
    return ((images.cpu().view(-1, 28, 28) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def write_samples(images: torch.Tensor, out: Path) -> None:
    """A .png grid (about square) or a .npy uint8 array [n, 28, 28] (to_pixels)."""
    check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.save(f, to_pixels(images).numpy())
    else:
        from PIL import Image  # comes with matplotlib and torchvision

        from mnist_gan.plotting import image_grid

        grid = image_grid(images, nrow=math.ceil(math.sqrt(len(images))))
        with atomic_path(out) as tmp:
            Image.fromarray(grid).save(tmp, format="PNG")
