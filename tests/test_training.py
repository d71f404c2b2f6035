import dataclasses
import time

import pytest
import torch

from mnist_gan import checkpoint
from mnist_gan.models import ConvGenerator
from mnist_gan.training import N_FIXED_NOISE, TrainingDiverged, d_scores, latents, train

CPU = torch.device("cpu")


@pytest.fixture
def images():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(600, 784, generator=gen) * 2 - 1, torch.rand(100, 784, generator=gen) * 2 - 1


@pytest.fixture
def params(tiny_params):
    return dataclasses.replace(tiny_params, epochs=3, batch_size=200, sample_every=2)


def test_history_and_samples(params, images):
    result = train(params, *images, CPU)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert all(record["seconds"] > 0 for record in result.history)
    # the last record scores the trained D: mean D(x) over the test images, D in eval mode
    test_images = images[1]
    with torch.no_grad():
        p_real = torch.sigmoid(result.discriminator.eval()(test_images)).mean().item()
    assert result.history[-1]["p_real"] == pytest.approx(p_real, rel=1e-6)
    # every sample_every epochs, and the last one
    assert sorted(result.samples) == [2, 3]
    assert result.samples[3].shape == (N_FIXED_NOISE, 784)


def test_same_seed_same_weights(params, images):
    a, b = train(params, *images, CPU), train(params, *images, CPU)
    assert all(torch.equal(x, y) for x, y in zip(a.generator.state_dict().values(),
                                                 b.generator.state_dict().values(), strict=True))


def test_batch_size_larger_than_the_dataset_is_an_error(params, images):
    with pytest.raises(ValueError) as error:
        train(dataclasses.replace(params, batch_size=601), *images, CPU)
    assert str(error.value) == ("'batch_size' = 601 is larger than the training set (600 images); "
                                "lower batch_size")
    one_batch = train(dataclasses.replace(params, batch_size=600, epochs=1), *images, CPU)  # the whole set
    assert [r["epoch"] for r in one_batch.history] == [1]


def test_epoch_seconds_are_measured_inside_the_call(params, images):
    started = time.perf_counter()
    result = train(params, *images, CPU)
    elapsed = time.perf_counter() - started
    assert 0 < result.train_seconds == sum(r["seconds"] for r in result.history) <= elapsed


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("preset", [
    {}, {"model": "cgan", "width": 8, "ema": 0.9, "batch_size": 100},
    {"model": "selfcond", "width": 8, "ema": 0.9, "batch_size": 100, "dropout": 0.3, "codes": 10},
], ids=["mlp", "cgan-ema", "selfcond-ema"])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(params, images, tmp_path, preset):
    path = tmp_path / "ckpt.pt"
    params = dataclasses.replace(params, **preset)
    gen = torch.Generator().manual_seed(1)
    labels = {"train_labels": torch.randint(10, (600,), generator=gen),
              "test_labels": torch.randint(10, (100,), generator=gen)}
    uninterrupted = train(params, *images, CPU, **labels)

    def crash_in_epoch_3(epoch, step):
        if epoch == 3 and step == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(params, *images, CPU, checkpoint_path=path, on_step=crash_in_epoch_3, **labels)
    state = checkpoint.load(path, params)
    assert state["epoch"] == 2
    resumed = train(params, *images, CPU, checkpoint_path=path, resume=state, **labels)

    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for key in ("p_real", "p_fake", "loss_d", "loss_g"):
        assert [r[key] for r in resumed.history] == [r[key] for r in uninterrupted.history]
    for model in ("generator", "discriminator", "sampler"):
        for x, y in zip(getattr(resumed, model).state_dict().values(),
                        getattr(uninterrupted, model).state_dict().values(), strict=True):
            assert torch.equal(x, y)
    assert torch.equal(resumed.samples[3], uninterrupted.samples[3])
    if params.codes:  # the clusters (D's centroids, G's prior) come back from the checkpoint
        assert torch.equal(resumed.sampler.label_prior, uninterrupted.sampler.label_prior)
        assert resumed.discriminator.centroids.abs().sum() > 0


def test_checkpoint_of_other_params_is_ignored(params, images, tmp_path):
    path = tmp_path / "ckpt.pt"
    train(dataclasses.replace(params, epochs=2, checkpoint_every=1), *images, CPU, checkpoint_path=path)
    # every epoch but the last: a finished run needs no checkpoint
    assert checkpoint.load(path, dataclasses.replace(params, epochs=2))["epoch"] == 1
    assert checkpoint.load(path, dataclasses.replace(params, epochs=2, lr=1e-3)) is None


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(params, images, tmp_path):
    path = tmp_path / "ckpt.pt"
    train_images = images[0].clone()
    good = {}

    def poison_data_in_epoch_2(epoch, step):
        if epoch == 2 and step == 0:
            good["checkpoint"] = path.read_bytes()
            train_images.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="epoch 2: loss_d=nan"):
        train(params, train_images, images[1], CPU, checkpoint_path=path, on_step=poison_data_in_epoch_2)
    assert path.read_bytes() == good["checkpoint"]
    assert checkpoint.load(path, params)["epoch"] == 1


def test_d_scores_are_reproducible_with_a_seeded_rng_and_restore_train_mode(params, images):
    result = train(dataclasses.replace(params, epochs=1), *images, CPU)
    result.generator.train()
    scores = [d_scores(result.generator, result.discriminator, images[1], 300,
                       rng=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert scores[0] == scores[1]
    assert result.generator.training


def test_latents_for_a_digit_accept_0_to_9_only():
    generator = ConvGenerator(d_noise=4, width=8, n_classes=10)
    for digit in (0, 9):
        z, labels = latents(generator, 3, CPU, digit=digit)
        assert z.shape == (3, 4) and labels.tolist() == [digit] * 3
    for digit in (-1, 10):
        with pytest.raises(ValueError, match=rf"^digit {digit} is out of range: 0 to 9$"):
            latents(generator, 3, CPU, digit=digit)


@pytest.mark.parametrize("train_labels, test_labels", [(True, False), (False, True), (False, False)])
def test_a_conditional_model_needs_both_label_sets(tiny_params, train_labels, test_labels):
    labels = torch.arange(20) % 10
    with pytest.raises(ValueError, match=r"^model 'cgan' is conditional: pass train_labels and test_labels$"):
        train(dataclasses.replace(tiny_params, model="cgan", batch_size=10), torch.zeros(20, 784),
              torch.zeros(20, 784),
              torch.device("cpu"), train_labels=labels if train_labels else None,
              test_labels=labels if test_labels else None)
