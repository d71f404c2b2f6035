"""TrainState.start and the steps against hand-computed values: the optimisers' settings, G's
exponential average after known steps, the grid's digits, what G's step leaves of D, and bf16
autocast actually taking effect when asked for."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mnist_gan import checkpoint, training
from mnist_gan.params import load_params
from tests.helpers import CPU, REPO


def params_for(**values):
    return dataclasses.replace(load_params(REPO / "params.yaml"), device="cpu", width=16, **values)


@pytest.mark.parametrize("model, beta1", [("mlp", 0.9), ("cgan", 0.5)])
def test_both_optimisers_are_fused_adam_with_the_params_lr_and_betas(model, beta1):
    state = training.TrainState.start(params_for(model=model, beta1=beta1, lr=3e-4), CPU,
                                      torch.arange(20) % 10)
    for optimiser in (state.opt_g, state.opt_d):
        (group,) = optimiser.param_groups
        assert isinstance(optimiser, torch.optim.Adam)
        assert (group["lr"], group["betas"], group["fused"]) == (3e-4, (beta1, 0.999), True)


def test_g_average_is_the_exponential_moving_average_of_its_weights():
    """ema = 0.9: the first update copies G, each later one is 0.9 * average + 0.1 * G (an equal
    running average, AveragedModel's default, would give 1/2, 1/3 ...)."""
    state = training.TrainState.start(params_for(ema=0.9), CPU, None)
    weights = []
    for _ in range(3):
        training.g_step(state, 8, CPU)
        weights.append({k: v.detach().clone() for k, v in state.generator.state_dict().items()})
    w1, w2, w3 = weights
    expected = {k: 0.9 * (0.9 * w1[k] + 0.1 * w2[k]) + 0.1 * w3[k] for k in w1 if w1[k].is_floating_point()}
    average = state.ema.module.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(average[key], value, rtol=1e-6, atol=1e-7, msg=key)
    assert any(not torch.equal(w1[key], w3[key]) for key in expected)  # G moved: the average is no copy


def test_only_a_conditional_model_gets_fixed_digits():
    assert training.TrainState.start(params_for(model="mlp"), CPU, None).fixed_labels is None
    labels = training.TrainState.start(params_for(model="cgan"), CPU, torch.arange(20) % 10).fixed_labels
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5]


def test_the_label_prior_is_the_training_digits_frequencies_with_zeros_for_absent_ones():
    labels = torch.tensor([0, 0, 1, 3, 3, 3, 7, 0])  # no 8 and no 9: bincount alone would give 8 bins
    prior = training.TrainState.start(params_for(model="cgan"), CPU, labels).generator.label_prior
    assert prior.tolist() == [3 / 8, 1 / 8, 0, 3 / 8, 0, 0, 0, 1 / 8, 0, 0]


def test_a_checkpoint_carries_the_run_id_it_was_saved_with(tmp_path):
    params = params_for()
    training.TrainState.start(params, CPU, None).save(tmp_path / "ckpt.pt", 1, "run-1234")
    saved = checkpoint.load(tmp_path / "ckpt.pt", params)
    assert (saved["epoch"], saved["run_id"]) == (1, "run-1234")


def test_g_step_computes_no_gradients_of_d():
    state = training.TrainState.start(params_for(), CPU, None)
    real = torch.rand(8, 784) * 2 - 1
    training.d_step(state, real, None)
    d_grads = [p.grad.clone() for p in state.discriminator.parameters()]
    training.g_step(state, 8, CPU)
    assert all(torch.equal(p.grad, g) for p, g in zip(state.discriminator.parameters(), d_grads, strict=True))
    assert all(p.requires_grad for p in state.discriminator.parameters())  # D trains again next step


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_both_steps_run_d_in_the_precision_asked_for(precision, dtype):
    state = training.TrainState.start(params_for(model="cgan", precision=precision), CPU,
                                      torch.arange(20) % 10)
    seen = []
    first_conv = next(m for m in state.discriminator.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    training.d_step(state, torch.rand(8, 784) * 2 - 1, torch.arange(8) % 10)
    training.g_step(state, 8, CPU)
    assert seen == [dtype, dtype]


class RecordingTracker:
    run_id = "run-42"

    def __init__(self):
        self.epochs, self.grids = [], []

    def log_epoch(self, record):
        self.epochs.append(dict(record))

    def log_samples(self, epoch, images):
        self.grids.append((epoch, images.clone()))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_end_epoch_logs_its_record_and_grid_and_checkpoints_with_the_run_id(tmp_path, precision):
    params = params_for(model="cgan", precision=precision, epochs=3, sample_every=2, checkpoint_every=2)
    state = training.TrainState.start(params, CPU, torch.arange(20) % 10)
    test_images, test_labels = torch.rand(12, 784) * 2 - 1, torch.arange(12) % 10
    tracker = RecordingTracker()
    for epoch in (1, 2):
        rng = torch.get_rng_state()  # d_scores draws its fakes from the global RNG
        record = training.end_epoch(state, epoch, (1.5, 0.5), 0.0, test_images, test_labels, tracker,
                                    tmp_path / "ckpt.pt")
    # the record: the D scores of the test set in the params' precision, the epoch's losses
    torch.set_rng_state(rng)
    p_real, p_fake = training.d_scores(state.generator, state.discriminator, test_images, 12,
                                       real_labels=test_labels, precision=precision)
    assert {k: v for k, v in record.items() if k != "seconds"} == {
        "epoch": 2, "p_real": p_real, "p_fake": p_fake, "loss_d": 1.5, "loss_g": 0.5}
    assert [r["epoch"] for r in tracker.epochs] == [1, 2] and tracker.epochs[-1] == record
    assert state.history == tracker.epochs
    # the grid of epoch 2 only (sample_every=2), drawn from the fixed noise, as logged
    ((epoch, grid),) = tracker.grids
    assert epoch == 2 and torch.equal(grid, state.samples[2])
    assert torch.equal(grid, training.sample(state.sampler, state.fixed_noise, state.fixed_labels))
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["run_id"]) == (2, "run-42")
