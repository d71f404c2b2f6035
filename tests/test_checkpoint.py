"""Checkpoints that cannot be resumed from: a clear error, never a silent fresh start."""

import pytest

from mnist_gan import checkpoint
from mnist_gan.checkpoint import CheckpointError


def test_damaged_checkpoint_is_an_error_naming_it_and_the_way_out(tmp_path, tiny_params):
    path = tmp_path / "train.pt"
    path.write_bytes(b"PK\x03\x04 not a whole zip archive")
    with pytest.raises(CheckpointError, match=rf"{path}: cannot resume from this checkpoint .*Delete it"):
        checkpoint.load(path, tiny_params)
    assert path.exists()  # left for the user to inspect or delete


def test_no_checkpoint_means_a_fresh_start(tmp_path, tiny_params):
    assert checkpoint.load(tmp_path / "train.pt", tiny_params) is None
