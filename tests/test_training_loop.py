"""What the training loop does in each step, observed from outside: every call of G and D (their
inputs, outputs and weights), the arguments of the losses, D scores, EMA and sample grids. These
fail on a loop that trains reproducibly but wrongly (z reused, halves swapped, D moved by G's step)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from mnist_gan import training
from mnist_gan.models import build_models
from mnist_gan.params import load_params
from tests.conftest import REPO

CPU = torch.device("cpu")
N_TRAIN, N_TEST, BATCH, EPOCHS = 600, 100, 200, 2
STEPS = N_TRAIN // BATCH


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(N_TRAIN, 784, generator=gen) * 2 - 1, torch.rand(N_TEST, 784, generator=gen) * 2 - 1


@pytest.fixture  # per test, not per module: mutmut credits a module fixture's calls to its first test only
def recorded(images):
    """One short training run with every call of the nets and losses recorded, in order."""
    params = dataclasses.replace(load_params(REPO / "params.yaml"), epochs=EPOCHS, batch_size=BATCH,
                                 sample_every=1, ema=0.9, checkpoint_every=0, device="cpu")
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _record(params, images, monkeypatch)


def _record(params, images, monkeypatch: pytest.MonkeyPatch) -> dict:
    events: list[tuple] = []
    nets = {}

    def spy_models(*args, **kwargs):
        generator, discriminator = build_models(*args, **kwargs)
        for name, net in (("g", generator), ("d", discriminator)):
            nets[name] = net
            net.register_forward_pre_hook(
                lambda module, inputs, name=name: events.append((f"{name}-weights", snapshot(module))))
            net.register_forward_hook(
                lambda module, inputs, output, name=name: events.append(
                    (name, inputs[0].detach().clone(), output.detach().clone(), module.training)))
        return generator, discriminator

    def spy(attribute: str, name: str) -> None:
        function = getattr(training, attribute)

        def wrapper(*args, **kwargs):
            events.append((name, *(a.detach().clone() if torch.is_tensor(a) else a for a in args)))
            return function(*args, **kwargs)
        monkeypatch.setattr(training, attribute, wrapper)

    monkeypatch.setattr(training, "build_models", spy_models)
    for attribute, name in (("compute_loss_d", "loss_d"), ("compute_loss_g", "loss_g"),
                            ("d_scores", "d_scores"), ("sample", "sample")):
        spy(attribute, name)
    updates = []
    update = AveragedModel.update_parameters
    monkeypatch.setattr(AveragedModel, "update_parameters",
                        lambda self, model: (updates.append(len(events)), update(self, model))[1])
    train_images, test_images = images
    result = training.train(params, train_images, test_images, CPU)
    return {"events": events, "nets": nets, "updates": updates, "result": result, "images": images}


def training_calls(events: list[tuple], name: str) -> list[tuple]:
    """The calls of net `name` in train mode (the steps), without d_scores' and sample's eval calls."""
    return [e for e in events if e[0] == name and e[3]]


def test_every_call_of_g_in_a_step_draws_fresh_z(recorded):
    calls = training_calls(recorded["events"], "g")
    assert len(calls) == 2 * STEPS * EPOCHS  # D's step and G's step each draw their own fakes
    zs = [call[1] for call in calls]
    assert all(z.shape == (BATCH, 100) for z in zs)
    assert all(not torch.equal(a, b) for i, a in enumerate(zs) for b in zs[i + 1:])


def test_d_judges_real_then_fake_and_its_loss_gets_the_halves_in_that_order(recorded):
    events = recorded["events"]
    train_images = recorded["images"][0]
    steps = [i for i, e in enumerate(events) if e[0] == "loss_d"]
    assert len(steps) == STEPS * EPOCHS
    for i in steps:
        g_call = next(e for e in reversed(events[:i]) if e[0] == "g")
        d_call = next(e for e in reversed(events[:i]) if e[0] == "d")
        x, logits = d_call[1], d_call[2]
        assert x.shape == (2 * BATCH, 784)
        real_rows = (x[:BATCH, None, :] == train_images[None]).all(-1)
        assert real_rows.any(1).all()  # the first half: rows of the training set
        assert torch.equal(x[BATCH:], g_call[2])  # the second half: what G just drew
        _, logits_real, logits_fake, _ = events[i]
        assert torch.equal(logits_real, logits[:BATCH]) and torch.equal(logits_fake, logits[BATCH:])


def test_each_epoch_uses_every_training_image_once_in_a_new_shuffled_order(recorded):
    train_images = recorded["images"][0]
    d_calls = [e for e in training_calls(recorded["events"], "d") if len(e[1]) == 2 * BATCH]
    orders = []
    for epoch in range(EPOCHS):
        reals = torch.cat([call[1][:BATCH] for call in d_calls[epoch * STEPS:(epoch + 1) * STEPS]])
        orders.append(torch.cdist(reals, train_images).argmin(1).tolist())
        assert sorted(orders[-1]) == list(range(N_TRAIN))
    assert orders[0] != list(range(N_TRAIN)) and orders[0] != orders[1]


def test_g_step_moves_g_and_leaves_d_as_the_d_step_left_it(recorded):
    events = recorded["events"]
    d_weights = [e[1] for i, e in enumerate(events) if e[0] == "d-weights" and events[i + 1][3]]
    g_weights = [e[1] for i, e in enumerate(events) if e[0] == "g-weights" and events[i + 1][3]]
    d_weights.append(snapshot(recorded["nets"]["d"]))
    g_weights.append(snapshot(recorded["nets"]["g"]))
    # per step: D's call in D's step, then D's call in G's step
    for step in range(STEPS * EPOCHS):
        before_d_step, in_g_step, after_g_step = d_weights[2 * step:2 * step + 3]
        assert not same(before_d_step, in_g_step)  # D's step moved D
        assert same(in_g_step, after_g_step)  # G's step did not
        # G: unchanged by D's step, moved by its own
        assert same(g_weights[2 * step], g_weights[2 * step + 1])
        assert not same(g_weights[2 * step + 1], g_weights[2 * step + 2])


def test_g_loss_is_computed_on_d_of_the_fresh_fakes(recorded):
    events = recorded["events"]
    for i in (i for i, e in enumerate(events) if e[0] == "loss_g"):
        g_call = next(e for e in reversed(events[:i]) if e[0] == "g")
        d_call = next(e for e in reversed(events[:i]) if e[0] == "d")
        assert torch.equal(d_call[1], g_call[2]) and torch.equal(events[i][1], d_call[2])


def test_d_scores_run_each_epoch_on_the_test_images(recorded):
    test_images = recorded["images"][1]
    calls = [e for e in recorded["events"] if e[0] == "d_scores"]
    assert len(calls) == EPOCHS
    for _, _, _, real, n_fake in calls:
        assert torch.equal(real, test_images) and n_fake == N_TEST
    eval_d_calls = [e for e in recorded["events"] if e[0] == "d" and not e[3]]
    assert eval_d_calls and all(torch.equal(e[1], test_images) or len(e[1]) == N_TEST for e in eval_d_calls)


def test_d_scores_are_the_tutorials_means_in_eval_mode():
    generator, discriminator = build_models("mlp", 100, 16, 0.5, CPU)
    real = torch.rand(50, 784, generator=torch.Generator().manual_seed(1)) * 2 - 1
    p_real, p_fake = training.d_scores(generator, discriminator, real, 30,
                                       rng=torch.Generator().manual_seed(7))
    assert generator.training and discriminator.training  # restored
    generator.eval()
    discriminator.eval()
    with torch.no_grad():
        z = torch.randn(30, 100, generator=torch.Generator().manual_seed(7))
        expected_real = torch.sigmoid(discriminator(real)).mean().item()
        expected_fake = torch.sigmoid(discriminator(generator(z))).mean().item()
    assert p_real == pytest.approx(expected_real, rel=1e-6)
    assert p_fake == pytest.approx(expected_fake, rel=1e-6)


def test_ema_is_updated_once_per_step_after_g_moved(recorded):
    events, updates = recorded["events"], recorded["updates"]
    assert len(updates) == STEPS * EPOCHS
    loss_g_at = [i for i, e in enumerate(events) if e[0] == "loss_g"]
    assert all(g < u for g, u in zip(loss_g_at, updates, strict=True))  # after G's step, each step


def test_sample_grids_are_drawn_from_the_same_fixed_noise(recorded):
    calls = [e for e in recorded["events"] if e[0] == "sample"]
    assert len(calls) == EPOCHS  # sample_every=1
    fixed = calls[0][2]
    assert fixed.shape == (training.N_FIXED_NOISE, 100)
    assert all(torch.equal(call[2], fixed) for call in calls)
    assert calls[-1][1] is not recorded["result"].generator  # the EMA's generator draws the grids
    assert all(not torch.equal(fixed, call[1][:training.N_FIXED_NOISE])
               for call in training_calls(recorded["events"], "g"))


def test_the_epochs_losses_are_the_means_of_their_steps(recorded):
    """history's loss_d and loss_g: the tutorial's formulas on each step's logits, averaged per epoch."""
    d_losses = [(-(torch.log(torch.sigmoid(real)) + torch.log(1 - torch.sigmoid(fake)))).mean().item()
                for _, real, fake, *_ in (e for e in recorded["events"] if e[0] == "loss_d")]
    g_losses = [-torch.log(torch.sigmoid(fake)).mean().item()
                for _, fake, *_ in (e for e in recorded["events"] if e[0] == "loss_g")]
    for epoch, record in enumerate(recorded["result"].history):
        steps = slice(epoch * STEPS, (epoch + 1) * STEPS)
        assert record["loss_d"] == pytest.approx(sum(d_losses[steps]) / STEPS, rel=1e-5)
        assert record["loss_g"] == pytest.approx(sum(g_losses[steps]) / STEPS, rel=1e-5)


def test_on_epoch_sees_each_epoch_after_its_record_with_the_sampler_and_can_stop_training(images):
    """tune's pruning hook: called once per epoch once its record is in the history, with the EMA's
    generator; what it raises ends train() there (a pruned trial trains no further)."""
    params = dataclasses.replace(load_params(REPO / "params.yaml"), epochs=3, batch_size=BATCH, ema=0.9,
                                 checkpoint_every=0, device="cpu")
    seen, history_lengths = [], []

    class Pruned(Exception):
        pass

    def on_epoch(epoch, sampler):
        seen.append((epoch, sampler))
        if epoch == 2:
            raise Pruned

    def log_epoch(record):
        history_lengths.append(record["epoch"])

    built = []

    def recording_build_models(*args, **kwargs):
        built.append(build_models(*args, **kwargs))
        return built[-1]

    tracker = training.NullTracker()
    tracker.log_epoch = log_epoch
    with pytest.MonkeyPatch.context() as monkeypatch, pytest.raises(Pruned):
        monkeypatch.setattr(training, "build_models", recording_build_models)
        training.train(params, *images, CPU, tracker=tracker, on_epoch=on_epoch)
    assert [epoch for epoch, _ in seen] == [1, 2] and history_lengths == [1, 2]
    (generator, _), sampler = built[0], seen[0][1]
    assert sampler is seen[1][1] and type(sampler) is type(generator)
    assert sampler is not generator  # the EMA's copy, as the grids and evaluate use
