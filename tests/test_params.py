import dataclasses
import re

import pytest
import torch
import yaml

from mnist_gan.params import ParamsError, load_params, parse_params
from tests.conftest import REPO, raw_params


def test_repo_params_match_the_tutorial():
    params = load_params(REPO / "params.yaml")
    assert (params.lr, params.batch_size, params.epochs, params.d_noise, params.width) == (
        2e-4, 200, 200, 100, 256)
    assert params.loss == "paper" and params.dropout == 0.1


@pytest.mark.parametrize("key, value, message", [
    ("lr", -0.1, "'lr' = -0.1 is invalid"),
    ("lr", 0, "'lr' = 0.0 is invalid"),
    ("epochs", 0, "'epochs' = 0 is invalid"),
    ("batch_size", -5, "'batch_size' = -5"),
    ("loss", "wasserstein", "must be one of paper, bce"),
    ("device", "tpu", "must be one of auto, cpu, cuda"),
    ("precision", "fp8", "must be one of fp32, bf16"),
    ("dropout", 1.0, "'dropout' = 1.0 is invalid"),
    ("epochs", 2.5, "'epochs' must be int"),
    ("lr", "fast", "'lr' must be float"),
])
def test_bad_values_name_the_key(key, value, message):
    raw = raw_params() | {key: value}
    with pytest.raises(ParamsError, match=message):
        parse_params(raw)


@pytest.mark.parametrize("missing, message", [
    (["epochs"], r"^missing key epochs; params.yaml is composed from conf/: run `make repro`"),
    (["lr", "beta1"], r"^missing keys lr, beta1;"),
])
def test_a_missing_key_is_named(missing, message):
    raw = {key: value for key, value in raw_params().items() if key not in missing}
    with pytest.raises(ParamsError, match=message):
        parse_params(raw)


def test_a_missing_group_key_is_named_with_its_group():
    raw = raw_params()
    raw["eval"] = {"seed": 1}
    with pytest.raises(ParamsError, match=r"^missing key eval.n_samples;"):
        parse_params(raw)


def test_typo_key_is_rejected_with_a_suggestion():
    with pytest.raises(ParamsError, match=r"unknown key 'lrr' \(did you mean 'lr'\?\)"):
        parse_params(raw_params() | {"lrr": 0.1})


def test_nested_typo_names_the_group():
    raw = raw_params()
    raw["eval"] = raw["eval"] | {"n_sample": 5}
    with pytest.raises(ParamsError, match=r"unknown key 'eval.n_sample' \(did you mean 'eval.n_samples'\?\)"):
        parse_params(raw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_an_error():
    with pytest.raises(ParamsError, match="no CUDA GPU"):
        parse_params(raw_params() | {"device": "cuda"})


def test_load_params_prefixes_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw_params() | {"lr": -1}))
    with pytest.raises(ParamsError, match=f"^{path}: 'lr'"):
        load_params(path)


def test_int_is_accepted_for_float_and_flat_keys_are_dotted():
    params = parse_params(raw_params() | {"dropout": 0})
    assert isinstance(params.dropout, float) and params.dropout == 0.0
    flat = params.flat()
    assert flat["data.source"] == "auto" and flat["eval.n_samples"] == 10_000 and flat["lr"] == 2e-4


def test_training_key_ignores_params_that_do_not_change_the_weights():
    params = load_params(REPO / "params.yaml")
    assert params.training_key() == dataclasses.replace(params, sample_every=7).training_key()
    assert params.training_key() != dataclasses.replace(params, lr=1e-3).training_key()


# every bound of the validator: the last value accepted and the first refused, on each side
BOUNDS = [
    ("epochs", [1], [0]), ("batch_size", [1], [0]), ("d_noise", [1], [0]), ("width", [1], [0]),
    ("sample_every", [1], [0]), ("checkpoint_every", [0], [-1]),
    ("lr", [1e-12, 0.999999], [0.0, 1.0]), ("beta1", [0.0, 0.999999], [-1e-9, 1.0]),
    ("ema", [0.0, 0.5, 0.999999], [0.499999, 1.0, -0.1]), ("dropout", [0.0, 0.999999], [-1e-9, 1.0]),
    ("eval.n_samples", [2], [1]), ("classifier.epochs", [1], [0]), ("classifier.batch_size", [1], [0]),
    ("classifier.lr", [1e-12, 0.999999], [0.0, 1.0]), ("ci.max_regression", [0.0], [-1e-9]),
]


@pytest.mark.parametrize("key, accepted, refused", BOUNDS, ids=[b[0] for b in BOUNDS])
def test_every_bound_on_both_sides(key, accepted, refused):
    for value in accepted:
        parse_params(raw_params(**{key: value}))
    for value in refused:
        with pytest.raises(ParamsError, match=rf"^'{re.escape(key)}' = {re.escape(repr(value))} is invalid"):
            parse_params(raw_params(**{key: value}))
