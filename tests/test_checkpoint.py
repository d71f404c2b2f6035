"""Checkpoints that cannot be resumed from: a clear error, never a silent fresh start."""

import os

import pytest
import torch

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


def test_damaged_checkpoint_error_names_the_errors_type(tmp_path, tiny_params):
    path = tmp_path / "train.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError) as error:
        checkpoint.load(path, tiny_params)
    assert str(error.value).startswith(f"{path}: cannot resume from this checkpoint (UnpicklingError: ")
    assert str(error.value).endswith("). Delete it to train from the first epoch.")


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, tiny_params):
    path = tmp_path / "train.pt"
    torch.save({"params": tiny_params.training_key(), "payload": os.system}, path)
    with pytest.raises(CheckpointError, match=r"\(UnpicklingError: Weights only load failed"):
        checkpoint.load(path, tiny_params)


def test_a_checkpoint_holds_what_resuming_needs(tmp_path, tiny_params):
    generator, discriminator = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    opt_g, opt_d = (torch.optim.Adam(m.parameters()) for m in (generator, discriminator))
    history, samples, noise = [{"epoch": 1, "p_real": 0.5}], {1: torch.zeros(2, 2)}, torch.ones(3, 4)
    path = tmp_path / "train.pt"
    checkpoint.save(path, params=tiny_params, epoch=1, generator=generator, discriminator=discriminator,
                    opt_g=opt_g, opt_d=opt_d, history=history, samples=samples, fixed_noise=noise,
                    run_id="0123abcd")
    state = checkpoint.load(path, tiny_params)
    assert (state["epoch"], state["run_id"], state["history"], state["ema"]) == (1, "0123abcd", history, None)
    assert torch.equal(state["fixed_noise"], noise) and torch.equal(state["samples"][1], samples[1])
    assert torch.equal(state["rng_cpu"], torch.get_rng_state())
