"""Property tests (hypothesis) where inputs are open-ended: any bytes given to the IDX reader, any
value of a bounded param. Each fails with the project's own one-line error, or works."""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mnist_gan.data import DataError, read_idx, write_idx
from mnist_gan.params import ParamsError, parse_params
from tests.helpers import raw_params


def _read(content: bytes) -> np.ndarray:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "file-idx3-ubyte"
        path.write_bytes(content)
        return read_idx(path)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_give_an_array_or_one_line_data_error(content):
    try:
        array = _read(content)
    except DataError as err:
        assert "\n" not in str(err)
    else:
        assert array.dtype == np.uint8 and array.size == len(content) - 4 - 4 * array.ndim


@settings(max_examples=200, deadline=None)
@given(magic=st.sampled_from([2049, 2051]), dims=st.lists(st.integers(0, 6), min_size=3, max_size=3),
       extra=st.integers(-20, 20))
def test_a_header_and_data_that_disagree_by_any_amount_are_refused(magic, dims, extra):
    """A valid header with too few or too many data bytes (trailing bytes included) is an error."""
    ndim = magic & 0xFF
    size = int(np.prod(dims[:ndim]))
    content = struct.pack(f">I{ndim}I", magic, *dims[:ndim]) + bytes(max(0, size + extra))
    if max(0, size + extra) == size:
        assert _read(content).shape == tuple(dims[:ndim])
    else:
        with pytest.raises(DataError, match="truncated or corrupt"):
            _read(content)


def test_trailing_bytes_after_real_data_are_refused(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    write_idx(path, np.zeros((3, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataError, match=r"header says \(3, 28, 28\), 2353 data bytes follow"):
        read_idx(path)


# the interval of accepted values: the high end excluded, the low end too for OPEN_LOW
BOUNDED = {"lr": (0.0, 1.0), "beta1": (0.0, 1.0), "dropout": (0.0, 1.0), "classifier.lr": (0.0, 1.0)}
OPEN_LOW = {"lr", "classifier.lr"}  # 0 itself refused


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(sorted(BOUNDED)), value=st.floats(-10, 10, allow_nan=False))
def test_a_fraction_param_is_accepted_exactly_inside_its_interval(key, value):
    low, high = BOUNDED[key]
    inside = (low < value if key in OPEN_LOW else low <= value) and value < high
    try:
        parse_params(raw_params(**{key: value}))
    except ParamsError as err:
        assert not inside and str(err).startswith(f"'{key}' = {value!r} is invalid")
    else:
        assert inside


@settings(max_examples=60, deadline=None)
@given(value=st.floats(-2, 2, allow_nan=False))
def test_ema_is_off_or_a_decay_in_half_to_one(value):
    inside = value == 0 or 0.5 <= value < 1
    try:
        parse_params(raw_params(ema=value))
    except ParamsError as err:
        assert not inside and str(err).startswith(f"'ema' = {value!r} is invalid")
    else:
        assert inside


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(["epochs", "batch_size", "d_noise", "width", "sample_every", "checkpoint_every",
                            "eval.n_samples", "classifier.epochs", "classifier.batch_size"]),
       value=st.integers(-5, 5))
def test_a_count_param_is_accepted_from_its_least_value(key, value):
    least = {"checkpoint_every": 0, "eval.n_samples": 2}.get(key, 1)
    try:
        parse_params(raw_params(**{key: value}))
    except ParamsError as err:
        assert value < least and str(err).startswith(f"'{key}' = {value} is invalid")
    else:
        assert value >= least
