"""The model presets (params `model`), the generator EMA, and conditional label plumbing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from mnist_gan import clusters
from mnist_gan.classifier import train_classifier
from mnist_gan.composition import CompositionError, compose
from mnist_gan.data import to_model_input
from mnist_gan.losses import loss_d as loss_d_paper
from mnist_gan.losses import loss_g as loss_g_paper
from mnist_gan.models import ConvDiscriminator, ConvGenerator, build_models, load_model, save_model
from mnist_gan.params import MODELS, ParamsError, parse_params
from mnist_gan.quality import quality_metrics
from mnist_gan.training import TrainState, d_step, g_step, latents, sample, train
from tests.helpers import REPO, TRAINED, raw_params, synthetic_digits

CPU = torch.device("cpu")


def preset(model: str) -> dict[str, object]:
    """The keys conf/model/<model>.yaml sets that shape the nets and their losses."""
    values = yaml.safe_load((REPO / f"conf/model/{model}.yaml").read_text())
    return {key: values[key] for key in ("model", "dropout", "codes")}


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = synthetic_digits(n, seed)
    return to_model_input(torch.from_numpy(images)), torch.from_numpy(labels.astype("int64"))


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    (x, y), (tx, ty) = _data(400, 0), _data(100, 1)
    return {"train_images": x, "train_labels": y, "test_images": tx, "test_labels": ty}


def test_every_model_file_sets_the_same_keys_and_params_knows_each_model():
    files = sorted((REPO / "conf/model").glob("*.yaml"))
    assert sorted(MODELS) == [f.stem for f in files]
    for file in files:
        assert file.read_text().startswith("# @package _global_\n")  # its keys are top-level params
        assert list(yaml.safe_load(file.read_text())) == list(TRAINED), file.name
        assert yaml.safe_load(file.read_text())["model"] == file.stem


def test_a_model_brings_its_values_and_set_params_override_them():
    """What `dvc exp run -S model=cgan -S epochs=5` and `-S lr=0.0001` write to params.yaml."""
    cgan = yaml.safe_load((REPO / "conf/model/cgan.yaml").read_text())
    composed = parse_params(yaml.safe_load(compose(REPO, ["model=cgan", "epochs=5"])))
    assert {key: getattr(composed, key) for key in TRAINED} == cgan | {"epochs": 5}
    mlp = parse_params(yaml.safe_load(compose(REPO, ["lr=0.0001"])))
    assert dataclasses.replace(mlp, lr=2e-4) == parse_params(raw_params())
    with pytest.raises(CompositionError, match=r"Could not find 'model/gan2' Available options in 'model': "
                                               r"cgan mlp selfcond$"):
        compose(REPO, ["model=gan2"])


@pytest.mark.parametrize("change, message", [
    ({"model": "gpt"}, r"'model' = 'gpt' is invalid: must be one of mlp, selfcond, cgan \(the files of"),
    ({"ema": 1.0}, r"'ema' = 1.0 is invalid"),
    ({"beta1": -0.5}, r"'beta1' = -0.5 is invalid"),
])
def test_bad_model_params_are_clear_errors(change, message):
    with pytest.raises(ParamsError, match=message):
        parse_params(raw_params() | change)


@pytest.mark.parametrize("model", ["mlp", "selfcond", "cgan"])
def test_each_preset_trains_and_evaluates(model, data, tiny_params):
    params = dataclasses.replace(tiny_params, **preset(model), epochs=2, batch_size=50, width=8, ema=0.9)
    if model == "selfcond":
        params = dataclasses.replace(params, codes=10)  # the preset's 30 clusters of 400 images: 13 each
    result = train(params, device=CPU, **data)
    assert [r["epoch"] for r in result.history] == [1, 2]
    with torch.no_grad():  # the last record scores the trained D on the test images (a cgan's with labels)
        conditional = (data["test_labels"],) if model == "cgan" else ()
        logits = result.discriminator.eval()(data["test_images"], *conditional)
    assert result.history[-1]["p_real"] == pytest.approx(torch.sigmoid(logits).mean().item(), rel=1e-6)
    assert result.sampler is result.ema and result.samples[2].shape == (16, 784)
    assert isinstance(result.sampler, ConvGenerator) == (model != "mlp")
    classifier, _ = train_classifier(data["train_images"], data["train_labels"], data["test_images"],
                                     data["test_labels"], tiny_params.classifier, CPU)
    fake = sample(result.sampler, *latents(result.sampler, 200, CPU, torch.Generator().manual_seed(0)))
    metrics = quality_metrics(classifier, fake, data["test_images"], floor_real=data["train_images"])
    histogram = [metrics[f"class_{k}"] for k in range(10)]
    assert sum(histogram) == pytest.approx(1)
    assert metrics["fid"] > 2 * metrics["fid_floor"]  # two epochs of training are not real data


def test_ema_is_the_average_of_the_trained_weights(data, tiny_params):
    params = dataclasses.replace(tiny_params, **preset("selfcond"), epochs=1, batch_size=50, width=8, ema=0.5)
    result = train(params, device=CPU, **data)
    averaged, trained = result.ema.state_dict(), result.generator.state_dict()
    assert set(averaged) == set(trained)  # batch-norm statistics are averaged too
    for name in ("project.1.running_mean", "upsample.1.running_var"):
        untrained = ConvGenerator(params.d_noise, params.width).state_dict()[name]
        assert not torch.equal(averaged[name], untrained) and not torch.equal(averaged[name], trained[name])
    assert not torch.equal(averaged["project.0.weight"], trained["project.0.weight"])
    off = train(dataclasses.replace(params, ema=0.0), device=CPU, **data)
    assert off.ema is None and off.sampler is off.generator
    # the trained weights do not depend on whether an average is kept
    assert torch.equal(off.generator.state_dict()["project.0.weight"], trained["project.0.weight"])


def test_saved_ema_generator_keeps_the_trained_weights(tmp_path):
    averaged, _ = build_models("cgan", 100, 8, 0.0, CPU)
    trained, _ = build_models("cgan", 100, 8, 0.0, CPU)
    save_model(averaged, tmp_path / "g.pt", trained=trained)
    z, labels = torch.randn(4, 100), torch.tensor([0, 3, 7, 9])
    loaded = load_model(tmp_path / "g.pt", CPU)
    torch.testing.assert_close(loaded(z, labels), averaged.eval()(z, labels))
    torch.testing.assert_close(load_model(tmp_path / "g.pt", CPU, trained=True)(z, labels),
                               trained.eval()(z, labels))
    save_model(averaged, tmp_path / "plain.pt")
    assert load_model(tmp_path / "plain.pt", CPU, trained=True) is None


def test_cgan_discriminator_sees_each_image_with_its_label(data, tiny_params, monkeypatch):
    """Label plumbing: real images go to D with their own labels, fakes with the labels G drew them for."""
    params = dataclasses.replace(tiny_params, model="cgan", epochs=1, batch_size=50, width=8, ema=0.0)
    seen = []
    forward = ConvGenerator.forward

    def generator_forward(self, z, labels=None):
        seen.append(("g", labels.clone()))
        return forward(self, z, labels)

    monkeypatch.setattr(ConvGenerator, "forward", generator_forward)
    d_forward = ConvDiscriminator.forward

    def discriminator_forward(self, x, labels=None):
        seen.append(("d", x.detach().clone(), labels.clone()))
        return d_forward(self, x, labels)

    monkeypatch.setattr(ConvDiscriminator, "forward", discriminator_forward)
    train(params, device=CPU, **data)
    g_labels, d_call = seen[0][1], seen[1]  # the first D step: G draws fakes, D judges real + fake
    _, images, labels = d_call
    m = len(g_labels)
    for image, label in zip(images[:m], labels[:m], strict=True):  # real half: the dataset's own label
        row = (data["train_images"] == image).all(1).nonzero()[0, 0]
        assert label == data["train_labels"][row]
    assert torch.equal(labels[m:], g_labels)  # fake half: the labels G was given
    assert len(set(g_labels.tolist())) > 1  # uniform random digits, not one class


def test_conditional_generator_depends_on_the_label_and_requires_it():
    generator, discriminator = build_models("cgan", 100, 8, 0.0, CPU)
    torch.nn.init.normal_(generator.embed.weight)
    generator.eval()
    z = torch.randn(1, 100).expand(2, 100)
    images = generator(z, torch.tensor([1, 7]))
    assert not torch.allclose(images[0], images[1])
    with pytest.raises(ValueError, match="conditional: pass the digits' labels"):
        generator(z)
    with pytest.raises(ValueError, match="conditional: pass the digits' labels"):
        discriminator(images)
    z, labels = latents(generator, 5, CPU, torch.Generator().manual_seed(0), digit=7)
    assert labels.tolist() == [7] * 5


def test_asking_an_unconditional_generator_for_a_digit_is_a_clear_error():
    generator, _ = build_models("selfcond", 100, 8, 0.0, CPU, codes=10)
    with pytest.raises(ValueError, match="unconditional .* train model=cgan"):
        latents(generator, 5, CPU, digit=3)


def test_cgan_samples_digits_with_the_training_sets_class_frequencies(data, tiny_params):
    params = dataclasses.replace(tiny_params, model="cgan", epochs=1, batch_size=50, width=8, ema=0.9)
    skewed = data | {"train_labels": torch.where(data["train_labels"] < 5, 0, data["train_labels"])}
    result = train(params, device=CPU, **skewed)
    expected = torch.bincount(skewed["train_labels"], minlength=10) / len(skewed["train_labels"])
    for generator in (result.generator, result.sampler):
        assert torch.equal(generator.label_prior, expected)
    _, labels = latents(result.sampler, 20_000, CPU, torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.bincount(labels, minlength=10) / 20_000, expected, atol=0.01, rtol=0)


# --- selfcond: clusters of the training images, its codes ------------------------------------------------
def test_kmeans_finds_separated_clusters_the_same_way_for_the_same_seed():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    noise = torch.randn(150, 2, generator=torch.Generator().manual_seed(0))
    points = centres.repeat_interleave(50, 0) + noise
    centroids = clusters.kmeans(points, 3, seed=0)
    codes = clusters.assign(points, centroids)
    assert sorted(torch.bincount(codes).tolist()) == [50, 50, 50]  # each blob, one cluster
    for blob in codes.view(3, 50):
        assert len(set(blob.tolist())) == 1
    torch.testing.assert_close(centroids[codes.view(3, 50)[:, 0]], points.view(3, 50, 2).mean(1))
    assert torch.equal(clusters.kmeans(points, 3, seed=0), centroids)
    with pytest.raises(ValueError, match="150 points into 151 clusters: k must be 1 to 150"):
        clusters.kmeans(points, 151, seed=0)


def test_features_see_the_same_shape_through_slant_and_ink():
    """A stroke leaning right and the same stroke upright, or drawn fainter, are neighbours in the
    feature space though far apart in pixels; a stroke elsewhere is not."""
    upright, leaning, elsewhere = (torch.zeros(28, 28) for _ in range(3))
    for row in range(4, 24):
        upright[row, 13:15] = 1
        leaning[row, 13 + (14 - row) // 3: 15 + (14 - row) // 3] = 1
        elsewhere[row, 3:5] = 1
    faint = 0.5 * upright
    images = torch.stack([upright, leaning, faint, elsewhere]).view(4, 784) * 2 - 1
    f = clusters.features(images)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(4))
    cosine = f @ f[0]
    assert cosine[1] > 0.9 and cosine[2] == pytest.approx(1) and cosine[3] < 0.1
    pixels = torch.nn.functional.normalize((images + 1) / 2, dim=1)
    assert (pixels @ pixels[0])[1] < 0.5  # the raw pixels of the leaning stroke are far from upright


@pytest.fixture
def selfcond_params(tiny_params):
    # no dropout: the steps' only random draws are then the codes and z, which the tests replay
    return dataclasses.replace(tiny_params, **preset("selfcond") | {"dropout": 0.0, "codes": 5}, width=8,
                               batch_size=50, ema=0.0)


def test_selfcond_d_judges_reals_with_their_cluster_and_fakes_with_their_code(selfcond_params, data):
    """The design's known case: D's logit of a real image projects onto its own cluster's embedding,
    a fake's onto the code G drew it with; both losses are the paper's of those logits."""
    real = data["train_images"][:50]
    state = TrainState.start(selfcond_params, CPU, None)
    state.cluster(data["train_images"])
    with torch.no_grad():
        torch.nn.init.normal_(state.discriminator.embed.weight)  # a trained projection: codes matter
    discriminator = state.discriminator
    real_codes = discriminator.code(real)
    assert torch.equal(real_codes, clusters.assign(clusters.features(real), discriminator.centroids))
    assert len(set(real_codes.tolist())) > 1
    with torch.no_grad():  # D without codes reads them itself; other codes give other logits
        torch.testing.assert_close(discriminator(real), discriminator(real, real_codes))
        assert not torch.allclose(discriminator(real), discriminator(real, (real_codes + 1) % 5))

    def replay(first: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The draws of a step from seed 7, on copies of the nets: (D's logits of real and
        G(z, codes), as the design says they are computed); d_step draws the codes `first`, g_step z."""
        torch.manual_seed(7)
        prior = state.generator.label_prior
        if first == "codes":
            codes, z = torch.multinomial(prior, 50, replacement=True), torch.randn(50, 100)
        else:
            z, codes = torch.randn(50, 100), torch.multinomial(prior, 50, replacement=True)
        fake = state.generator(z, codes)
        return discriminator(torch.cat([real, fake]), torch.cat([real_codes, codes])), codes

    generator_weights = {k: v.clone() for k, v in state.generator.state_dict().items()}
    discriminator_weights = {k: v.clone() for k, v in discriminator.state_dict().items()}
    logits, _ = replay("codes")
    torch.manual_seed(7)
    loss_d = d_step(state, real, real_codes)
    assert loss_d.item() == pytest.approx(loss_d_paper(logits[:50], logits[50:]).item(), rel=1e-5)

    state.generator.load_state_dict(generator_weights)
    discriminator.load_state_dict(discriminator_weights)
    logits, _ = replay("z")
    torch.manual_seed(7)
    loss_g = g_step(state, 50, CPU)
    assert loss_g.item() == pytest.approx(loss_g_paper(logits[50:]).item(), rel=1e-5)


def test_selfcond_prior_is_the_share_of_training_images_in_each_cluster(selfcond_params, data):
    result = train(dataclasses.replace(selfcond_params, epochs=1, ema=0.9), device=CPU, **data)
    codes = result.discriminator.code(data["train_images"])
    expected = torch.bincount(codes, minlength=5) / len(codes)
    assert (expected > 0).all()
    for generator in (result.generator, result.sampler):  # the average samples with the same prior
        assert torch.equal(generator.label_prior, expected)
    # the clusters are those of the training images' features, seeded by `seed`
    points = clusters.features(data["train_images"])
    expected = clusters.kmeans(points, 5, selfcond_params.seed)
    torch.testing.assert_close(result.discriminator.centroids, expected)


def test_selfcond_never_reads_a_label(selfcond_params, data):
    params = dataclasses.replace(selfcond_params, epochs=1)
    with_labels = train(params, device=CPU, **data)
    scrambled = data | {"train_labels": data["train_labels"].flip(0), "test_labels": data["test_labels"] * 0}
    without = train(params, device=CPU, **scrambled)
    for x, y in zip(with_labels.generator.state_dict().values(), without.generator.state_dict().values(),
                    strict=True):
        assert torch.equal(x, y)
    assert with_labels.history[-1]["p_real"] == without.history[-1]["p_real"]


def test_more_clusters_than_training_images_is_a_clear_error(selfcond_params, data):
    with pytest.raises(ParamsError, match=r"'codes' = 401 is more clusters than the training set has images "
                                          r"\(400\); lower codes"):
        train(dataclasses.replace(selfcond_params, codes=401), device=CPU, **data)
    with pytest.raises(ValueError, match="holds no clusters: only model selfcond codes images"):
        ConvDiscriminator(8).code(data["test_images"])
