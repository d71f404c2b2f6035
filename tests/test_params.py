import dataclasses
import re

import pytest
import torch
import yaml

from mnist_gan.params import Params, ParamsError, load_params, parse_params, resolve_device
from tests.helpers import REPO, raw_params


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
    key = params.training_key()
    assert key == dataclasses.replace(params, sample_every=7, checkpoint_every=3).training_key()
    # the groups (data, eval, classifier, ci) are other stages' business
    assert key == parse_params(raw_params(**{"eval.seed": 1, "classifier.lr": 0.01, "ci.metric": "x"})
                               ).training_key()
    assert "lr" in key and "seed" in key and not any("." in name for name in key)
    assert key != dataclasses.replace(params, lr=1e-3).training_key()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda")  # validation has checked that it exists
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


# the whole one-line message of each check, as the user reads it
MESSAGES = [
    ("model", "gan", "must be one of mlp, selfcond, cgan (the files of conf/model/)"),
    ("epochs", 0, "must be an integer >= 1"), ("batch_size", 0, "must be an integer >= 1"),
    ("lr", 0.0, "must be in (0, 1), e.g. 0.0002"), ("d_noise", 0, "must be an integer >= 1"),
    ("beta1", 1.0, "must be in [0, 1), e.g. 0.5 or 0.9"),
    ("ema", 0.4, "must be 0 (off) or in [0.5, 1), e.g. 0.999"), ("width", 0, "must be an integer >= 1"),
    ("dropout", 1.0, "must be in [0, 1)"), ("loss", "hinge", "must be one of paper, bce"),
    ("device", "tpu", "must be one of auto, cpu, cuda"), ("precision", "fp16", "must be one of fp32, bf16"),
    ("sample_every", 0, "must be an integer >= 1"), ("checkpoint_every", -1, "must be >= 0 (0: none)"),
    ("data.source", "", "must be 'auto' or a folder/archive path"),
    ("eval.n_samples", 1, "must be an integer >= 2"), ("classifier.epochs", 0, "must be an integer >= 1"),
    ("classifier.batch_size", 0, "must be >= 1"), ("classifier.lr", 1.0, "must be in (0, 1)"),
    ("ci.metric", "", "must name a metric, e.g. fid"),
    ("ci.max_regression", -0.1, "must be >= 0 (a fraction: 0.10 allows 10 % worse)"),
]


@pytest.mark.parametrize("model, key, value, allowed", [
    ("selfcond", "codes", 1, "model selfcond is conditioned on >= 2 clusters, e.g. 30"),
    ("selfcond", "codes", 0, "model selfcond is conditioned on >= 2 clusters, e.g. 30"),
    ("selfcond", "codes", -3, "model selfcond is conditioned on >= 2 clusters, e.g. 30"),
    ("cgan", "codes", 10, "model cgan takes no codes: set 0 (or model=selfcond)"),
    ("mlp", "codes", 1, "model mlp takes no codes: set 0 (or model=selfcond)"),
])
def test_codes_belong_to_selfcond_which_needs_at_least_two(model, key, value, allowed):
    selfcond = {"model": "selfcond", "codes": 30}
    base = selfcond if model == "selfcond" else {"model": model}
    with pytest.raises(ParamsError) as error:
        parse_params(raw_params(**base | {key: value}))
    assert str(error.value) == f"'{key}' = {value!r} is invalid: {allowed}"
    assert parse_params(raw_params(**selfcond | {"codes": 2})).codes == 2  # accepted


@pytest.mark.parametrize("key, value, allowed", MESSAGES, ids=[m[0] for m in MESSAGES])
def test_each_check_says_what_is_allowed(key, value, allowed):
    with pytest.raises(ParamsError) as error:
        parse_params(raw_params(**{key: value}))
    assert str(error.value) == f"'{key}' = {value!r} is invalid: {allowed}"


@pytest.mark.parametrize("key, value, expected", [
    ("epochs", 2.5, "int"), ("epochs", True, "int"), ("lr", True, "float"), ("lr", "fast", "float"),
    ("loss", 5, "str"), ("data.verify", "yes", "bool"), ("ci.lower_is_better", 1, "bool"),
])
def test_a_wrongly_typed_value_is_named_with_the_type_expected(key, value, expected):
    with pytest.raises(ParamsError) as error:
        parse_params(raw_params(**{key: value}))
    assert str(error.value) == f"'{key}' must be {expected}, got {value!r}"


def test_a_group_that_is_not_a_mapping_and_a_key_with_no_close_match():
    with pytest.raises(ParamsError, match=r"^'eval' must be a mapping of keys, got 5$"):
        parse_params(raw_params() | {"eval": 5})
    known = ", ".join(f.name for f in dataclasses.fields(Params))
    with pytest.raises(ParamsError) as error:
        parse_params(raw_params() | {"zzz": 1})
    assert str(error.value) == f"unknown key 'zzz'; known keys: {known}"


def test_the_missing_keys_message_in_full():
    raw = {key: value for key, value in raw_params().items() if key not in ("lr", "beta1")}
    with pytest.raises(ParamsError) as error:
        parse_params(raw)
    assert str(error.value) == ("missing keys lr, beta1; params.yaml is composed from conf/: run "
                                "`make repro` (or `dvc exp run`) to write it again")


def test_every_group_is_built_with_its_values():
    params = parse_params(raw_params(**{"data.verify": False, "eval.seed": 7, "classifier.seed": 3,
                                        "ci.metric": "precision"}))
    assert (params.data.verify, params.eval.seed, params.classifier.seed, params.ci.metric) == (
        False, 7, 3, "precision")
