"""The evaluate stage end to end on a case small enough to work out by hand: nets with weights set
so that every number of metrics/eval.json follows from a formula computed here, independently of
the project's metric code (numpy and scipy on the judge's features)."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import yaml

from mnist_gan import paths
from mnist_gan.classifier import save_classifier, train_classifier
from mnist_gan.data import write_idx
from mnist_gan.files import write_json
from mnist_gan.models import Discriminator, Generator, save_model
from mnist_gan.params import parse_params
from tests.helpers import REPO, raw_params, use_mlflow_store

CPU = torch.device("cpu")
N_SAMPLES = 50
DIGIT = 3  # the EMA generator draws the clean template of this class of the synthetic digits
D_SCALE, D_SHIFT = 10.0, 1.0  # D's logit: D_SCALE * lrelu(lrelu(mean pixel + D_SHIFT))


def constant_generator(image: torch.Tensor) -> Generator:
    """A generator that draws `image` (pixels in {-1, 0, 1}) for every z: last layer all bias.
    tanh(+-20) is exactly +-1 in float32 and tanh(0) = 0, so the output is exact on any path."""
    generator = Generator(d_noise=4, width=8, dropout=0.0)
    last = generator.net[6]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(20 * image)
    return generator


def mean_pixel_discriminator() -> Discriminator:
    discriminator = Discriminator(width=8, dropout=0.0)
    with torch.no_grad():
        for layer in (discriminator.net[0], discriminator.net[3], discriminator.net[6]):
            layer.weight.zero_()
            layer.bias.zero_()
        discriminator.net[0].weight[0] = 1 / 784
        discriminator.net[0].bias[0] = D_SHIFT
        discriminator.net[3].weight[0, 0] = 1.0
        discriminator.net[6].weight[0, 0] = D_SCALE
    return discriminator


def expected_d(images: np.ndarray) -> float:
    """Mean D(x) of images [N, 784] as float64, from the formula the weights encode."""
    h = images.mean(1) + D_SHIFT
    h = np.where(h > 0, h, 0.01 * h)
    h = np.where(h > 0, h, 0.01 * h)
    return float((1 / (1 + np.exp(-D_SCALE * h))).mean())


def expected_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance of Gaussians fitted to two feature sets (unbiased covariances).

    tr sqrt(c1 c2) as tr sqrt(c1^1/2 c2 c1^1/2), a symmetric PSD matrix: exact through eigvalsh even
    where the covariances are singular (the judge's ReLU features have units that never fire)."""
    mu1, mu2 = real.mean(0), fake.mean(0)
    c1, c2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    w, v = np.linalg.eigh(c1)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root1 @ c2 @ root1).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * cross)


def fid_of_one_point(real: np.ndarray, point: np.ndarray) -> float:
    """The Fréchet distance of samples that are all `point` (covariance 0) to `real`."""
    return float(((real.mean(0) - point) ** 2).sum() + np.trace(np.cov(real, rowvar=False)))


def kth_neighbour(x: np.ndarray, k: int) -> np.ndarray:
    dist = np.linalg.norm(x[:, None] - x[None], axis=2)
    return np.sort(dist, axis=1)[:, k]  # index 0 is the point itself


def expected_metrics(real: np.ndarray, floor: np.ndarray, fake: np.ndarray, fake_logits: np.ndarray,
                     real_images: np.ndarray, fake_image: np.ndarray) -> dict[str, float]:
    """eval.json for N_SAMPLES copies of one fake image: features `fake` [F], logits `fake_logits` [10]."""
    to_fake = np.linalg.norm(real - fake, axis=1)
    inside_3, inside_5 = to_fake < kth_neighbour(real, 3), to_fake < kth_neighbour(real, 5)
    p = np.exp(fake_logits - fake_logits.max())
    p /= p.sum()
    label = int(p.argmax())
    metrics = {
        "p_real": expected_d(real_images), "p_fake": expected_d(fake_image[None]),
        "fid": fid_of_one_point(real, fake),
        "fid_floor": expected_fid(real, floor),
        "precision": float(inside_3.any()),  # all fakes in some real 3-NN ball, or none
        "recall": 0.0,  # the fakes' 3-NN ball has radius 0: it holds no real point
        "density": inside_5.sum() * N_SAMPLES / (5 * N_SAMPLES),
        "coverage": inside_5.mean(),
        "classes_covered": 1.0, "class_kl": math.log(10), "confident": float(p.max() >= 0.9),
        "inception_score": 1.0,  # p(y|x) = p(y) for every sample: KL 0
    }
    metrics.update({f"class_{c}": float(c == label) for c in range(10)})
    return metrics


def template(digit: int) -> np.ndarray:
    """The clean uint8 image of a class of these digits: a bar at rows 2k+4..2k+6, columns 4..23."""
    image = np.zeros((28, 28), dtype=np.uint8)
    image[2 * digit + 4:2 * digit + 7, 4:24] = 255
    return image


def noisy_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n templates of classes 0-9 in turn, 3 % of their pixels flipped: none is exactly a template."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.uint8) % 10
    images = np.stack([template(k) for k in labels])
    flip = rng.random(images.shape) < 0.03
    return np.where(flip, 255 - images, images).astype(np.uint8), labels


def run_evaluate() -> None:
    spec = importlib.util.spec_from_file_location("evaluate_stage", REPO / "stages/evaluate.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    stage.main()


def as_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 784] in [-1, 1], 0 and 255 exactly -1 and 1."""
    return torch.from_numpy(images).reshape(len(images), -1).float() / 255 * 2 - 1


def test_evaluate_writes_the_hand_computed_metrics(tmp_path, monkeypatch):
    client = use_mlflow_store(tmp_path, monkeypatch)
    raw = tmp_path / paths.RAW_DIR
    raw.mkdir(parents=True)
    splits = {}
    for prefix, n, seed in (("train", 300, 0), ("t10k", 200, 1)):
        images, labels = splits[prefix] = noisy_digits(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params(device="cpu", **{
        "eval.n_samples": N_SAMPLES})))
    run_id = client.create_run(client.create_experiment("mnist-gan")).info.run_id
    write_json(tmp_path / paths.TRAIN_METRICS, {"mlflow_run_id": run_id})
    clean, other = as_input(np.stack([template(DIGIT), template(7)]))
    (tmp_path / "models").mkdir()
    # the EMA draws the clean DIGIT; the trained weights it averages, a clean 7
    save_model(constant_generator(clean), tmp_path / paths.GENERATOR, trained=constant_generator(other))
    save_model(mean_pixel_discriminator(), tmp_path / paths.DISCRIMINATOR)
    images, labels = noisy_digits(1000, seed=5)
    judge, _ = train_classifier(as_input(images), torch.from_numpy(labels).long(), as_input(images[:100]),
                                torch.from_numpy(labels[:100]).long(),
                                parse_params(raw_params(**{"classifier.epochs": 1})).classifier, CPU)
    save_classifier(judge, tmp_path / paths.CLASSIFIER)

    run_evaluate()

    test_images, train_images = as_input(splits["t10k"][0]), as_input(splits["train"][0])
    with torch.no_grad():
        real, floor, fake, fake_ema_off = (judge.features(x).double().numpy()
                                           for x in (test_images, train_images, clean[None], other[None]))
        fake_logits = judge(clean[None])[0].double().numpy()
    expected = expected_metrics(real, floor, fake[0], fake_logits, test_images.double().numpy(),
                                clean.double().numpy())
    expected["fid_without_ema"] = fid_of_one_point(real, fake_ema_off[0])

    # the scenario is not degenerate: the clean DIGIT lies on the real manifold, and is judged a DIGIT
    assert expected["precision"] == 1.0 and expected[f"class_{DIGIT}"] == 1.0
    assert 0 < expected["coverage"] < 1 and expected["p_real"] != pytest.approx(expected["p_fake"], abs=0.01)
    fids = sorted(expected[key] for key in ("fid", "fid_floor", "fid_without_ema"))
    assert fids[0] < fids[1] / 2 and fids[1] < fids[2] / 1.1

    written = json.loads((tmp_path / paths.EVAL_METRICS).read_text())
    assert written.keys() == expected.keys()
    # D's logit is D_SCALE x an fp32 sum over 784 pixels, added in whatever order the CPU's oneDNN
    # kernel takes (AVX2 and AVX-512 differ): worst case 784 x 2^-24 x D_SCALE x p(1 - p), 7e-5 here
    tolerance = {"p_real": 1e-4, "p_fake": 1e-4}
    for key, value in expected.items():
        assert written[key] == pytest.approx(value, rel=1e-5, abs=tolerance.get(key, 2e-6)), key
        assert written[key] == round(written[key], 6), key  # rounded, so diffs stay readable
    logged = client.get_run(run_id).data.metrics
    assert {key: logged[f"eval/{key}"] for key in written} == written
