"""Sample-quality metrics: each against a case with a known answer, then the
properties a user relies on, with a judge trained on synthetic digits:
real data scores near the floor, an untrained generator far worse, and a
generator that makes one digit only is caught by the diversity metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from mnist_gan.models import Generator
from mnist_gan.quality import (
    class_metrics,
    frechet_distances,
    precision_recall_density_coverage,
    quality_metrics,
)
from tests.helpers import synthetic_inputs

N = 1_000  # samples per set in the property tests


# ---------------------------------------------------------------- known answers

def _with_moments(mean: torch.Tensor, cov: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n samples [n, d] whose sample mean and (unbiased) covariance are exactly `mean` and `cov`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(mean), generator=g, dtype=torch.float64)
    x -= x.mean(0)
    # whiten to identity sample covariance, then colour with a square root of `cov`
    x = x @ torch.linalg.inv(torch.linalg.cholesky(x.T @ x / (n - 1))).T
    return x @ torch.linalg.cholesky(cov).T + mean


def test_frechet_distance_of_two_gaussians_matches_the_closed_form():
    # shared eigenvectors: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(l1_i) - sqrt(l2_i))^2
    d = 6
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    l1 = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 9.0], dtype=torch.float64)
    l2 = torch.tensor([4.0, 2.0, 1.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.arange(d, dtype=torch.float64) / 2
    x1 = _with_moments(mu1, q @ torch.diag(l1) @ q.T, 500, seed=1)
    x2 = _with_moments(mu2, q @ torch.diag(l2) @ q.T, 700, seed=2)
    expected = (mu1 - mu2).square().sum() + (l1.sqrt() - l2.sqrt()).square().sum()
    assert frechet_distances(x1, [x2]) == pytest.approx([expected.item()], rel=1e-9)


def test_frechet_distance_of_non_commuting_covariances_matches_scipy():
    # general covariances: the formula with scipy's matrix square root as the reference
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(5, 5, generator=g, dtype=torch.float64) for _ in range(2))
    cov1, cov2 = a @ a.T + 0.1 * torch.eye(5), b @ b.T + 0.1 * torch.eye(5)
    mu1, mu2 = torch.ones(5, dtype=torch.float64), -torch.ones(5, dtype=torch.float64)
    x1, x2 = _with_moments(mu1, cov1, 300, seed=1), _with_moments(mu2, cov2, 300, seed=2)
    c1, c2 = cov1.numpy(), cov2.numpy()
    expected = 20.0 + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert frechet_distances(x1, [x2]) == pytest.approx([expected], rel=1e-9)


def test_frechet_distance_of_a_set_to_itself_is_zero():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert frechet_distances(x, [x]) == [pytest.approx(0.0, abs=1e-9)]


def _on_a_line(values: list[float]) -> torch.Tensor:
    """Points [n, 3] on the first axis: distances are the differences of `values`."""
    x = torch.zeros(len(values), 3, dtype=torch.float64)
    x[:, 0] = torch.tensor(values, dtype=torch.float64)
    return x


def test_precision_recall_density_coverage_known_answer():
    # real: 0, 1, ..., 9. Distance to the 3rd neighbour: 3 at the ends, 2 inside;
    # to the 5th: 5, 4, 3, 3, 3, 3, 3, 3, 4, 5.
    # fake: 1.5 among them, four outliers at 20-23 (3rd-neighbour distance of 1.5: 20.5).
    real = _on_a_line(list(range(10)))
    fake = _on_a_line([1.5, 20, 21, 22, 23])
    metrics = precision_recall_density_coverage(real, fake)
    assert metrics == pytest.approx({
        "precision": 1 / 5,  # only 1.5 lies inside a real 3-NN ball
        "recall": 1.0,       # the ball around 1.5 (radius 20.5) swallows every real point
        "density": 5 / (5 * 5),  # 1.5 lies in the 5-NN balls of reals 0-4: 5 balls / (k * n_fake)
        "coverage": 5 / 10,  # reals 0-4 have 1.5 inside their 5-NN ball; 5-9 do not
    })


@pytest.mark.parametrize("real, fake, expected", [
    # -3 lies exactly on the 3-NN sphere of real 0 (radius 3), and inside its 5-NN ball (radius 5)
    (list(range(10)), [-3, 30, 31, 32, 33], {"precision": 0.0, "density": 1 / 25, "coverage": 1 / 10}),
    # -5 lies exactly on the 5-NN sphere of real 0
    (list(range(10)), [-5, 30, 31, 32, 33], {"precision": 0.0, "density": 0.0, "coverage": 0.0}),
    # real 97 lies exactly on the 3-NN sphere of fake 100 (radius 3), and in no other fake ball
    ([*range(9), 97], [100, 101, 102, 103], {"recall": 0.0}),
], ids=["precision", "density-coverage", "recall"])
def test_a_point_on_a_balls_sphere_is_outside(real, fake, expected):
    """Strictly inside, as in the reference code of Naeem et al.: distance < radius."""
    metrics = precision_recall_density_coverage(_on_a_line(real), _on_a_line(fake))
    assert {key: metrics[key] for key in expected} == pytest.approx(expected)


def test_precision_recall_density_coverage_of_identical_and_disjoint_sets():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    same = precision_recall_density_coverage(x, x)
    assert (same["precision"], same["recall"], same["coverage"]) == (1.0, 1.0, 1.0)
    far = precision_recall_density_coverage(x, x + 100)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_precision_recall_density_coverage_do_not_depend_on_the_chunk_size():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(500, 8, generator=g), torch.randn(400, 8, generator=g) + 0.3
    assert precision_recall_density_coverage(real, fake, chunk=37) == \
        precision_recall_density_coverage(real, fake)


def test_precision_recall_density_coverage_need_enough_samples():
    """k-th neighbours other than the point itself: more than k = 5 real and k = 3 fake points."""
    g = torch.Generator().manual_seed(0)
    precision_recall_density_coverage(torch.randn(6, 2, generator=g), torch.randn(4, 2, generator=g))
    for n_real, n_fake in ((5, 10), (10, 3)):
        with pytest.raises(ValueError) as error:
            precision_recall_density_coverage(torch.randn(n_real, 2), torch.randn(n_fake, 2))
        assert str(error.value) == f"need more than 5 real and 3 fake samples, got {n_real} and {n_fake}"


def test_class_metrics_known_answers():
    confident = 20.0 * torch.eye(10)  # one sure sample of each class
    balanced = class_metrics(confident.repeat(5, 1))
    assert balanced["classes_covered"] == 10
    assert balanced["class_kl"] == pytest.approx(0.0, abs=1e-12)
    assert balanced["confident"] == 1.0
    assert balanced["inception_score"] == pytest.approx(10.0, rel=1e-6)
    assert [balanced[f"class_{c}"] for c in range(10)] == [0.1] * 10

    one_digit = class_metrics(confident[[7] * 50])
    assert one_digit["classes_covered"] == 1
    assert one_digit["class_kl"] == pytest.approx(math.log(10))
    assert one_digit["inception_score"] == pytest.approx(1.0)
    assert one_digit["class_7"] == 1.0

    # p(y|x) exactly 0 for the other classes (exp(-1000) underflows): still IS 10, not 0 * log 0 = nan
    certain = class_metrics(1000.0 * torch.eye(10))
    assert certain["inception_score"] == pytest.approx(10.0) and certain["class_kl"] == 0.0

    unsure = class_metrics(torch.zeros(50, 10))  # uniform p(y|x): nothing confident, IS 1
    assert unsure["confident"] == 0.0
    assert unsure["inception_score"] == pytest.approx(1.0)
    # 98 % in one class, 2 % in another: the second still counts as covered (>= 2 %)
    skewed = class_metrics(confident[[0] * 49 + [1]])
    assert skewed["classes_covered"] == 2


# ---------------------------------------------------------------- properties, with a judge

@pytest.fixture(scope="module")
def judge(trained_judge):
    """conftest's classifier, trained on synthetic digits (test_classifier checks its accuracy, >= 0.98)."""
    return trained_judge[0]


@pytest.fixture(scope="module")
def real_sets():
    """The 'test set' to compare against, and two more independent real sets."""
    return tuple(synthetic_inputs(N, seed)[0] for seed in (10, 11, 12))


@pytest.fixture  # per test: mutmut credits a module fixture's calls (the generator's) to its first test only
def untrained_samples():
    torch.manual_seed(0)
    generator = Generator().eval()
    with torch.no_grad():
        return generator(torch.randn(N, generator.d_noise))


@pytest.fixture(scope="module")
def one_digit_samples():
    """Realistic samples, but all of one class: what a mode-collapsed generator makes."""
    images, labels = synthetic_inputs(10 * N, seed=13)
    return images[labels == 3][:N]


def test_same_inputs_give_identical_numbers(judge, real_sets, untrained_samples):
    real, fake, floor = real_sets
    first = quality_metrics(judge, fake, real, floor_real=floor)
    assert quality_metrics(judge, fake, real, floor_real=floor) == first
    assert all(type(v) is float for v in first.values())  # JSON-ready
    expected_keys = {"fid", "fid_floor", "precision", "recall", "density", "coverage", "classes_covered",
                     "class_kl", "confident", "inception_score", *(f"class_{c}" for c in range(10))}
    assert set(first) == expected_keys
    assert "fid_floor" not in quality_metrics(judge, untrained_samples, real)


def test_real_data_scores_near_the_floor(judge, real_sets):
    real, fake, floor = real_sets
    m = quality_metrics(judge, fake, real, floor_real=floor)
    assert m["fid"] < 2 * m["fid_floor"]
    # k-NN balls of 1000 samples miss some of the distribution's tails: ~0.9, not 1
    assert min(m["precision"], m["recall"], m["coverage"]) > 0.85
    assert 0.8 < m["density"] < 1.2  # ~1 for samples from the real distribution
    assert m["classes_covered"] == 10
    assert m["class_kl"] < 0.05
    assert m["confident"] > 0.9
    assert m["inception_score"] > 9


def test_untrained_generator_scores_far_worse(judge, real_sets, untrained_samples):
    real, fake, floor = real_sets
    good = quality_metrics(judge, fake, real, floor_real=floor)
    bad = quality_metrics(judge, untrained_samples, real)
    assert bad["fid"] > 50 * good["fid_floor"]
    assert bad["precision"] < 0.05 and bad["density"] < 0.05
    assert bad["recall"] < 0.05 and bad["coverage"] < 0.05
    assert bad["inception_score"] < good["inception_score"] / 2


def test_one_digit_generator_is_caught_by_the_diversity_metrics(judge, real_sets, one_digit_samples):
    real, fake, floor = real_sets
    good = quality_metrics(judge, fake, real, floor_real=floor)
    one = quality_metrics(judge, one_digit_samples, real)
    # every sample is a fine digit: per-sample quality scores like real data's, and FID is
    # one number that does not say why it is high (on these synthetic digits it is even
    # higher than the untrained generator's, ranking realistic samples below noise)
    assert one["precision"] == pytest.approx(good["precision"], abs=0.05)
    assert one["confident"] > 0.9 and one["density"] > 0.8
    # the diversity metrics name the problem
    assert one["classes_covered"] == 1 and one["class_3"] > 0.99
    assert one["class_kl"] == pytest.approx(math.log(10), abs=0.05)
    assert one["recall"] < 0.2 and one["coverage"] < 0.2
    assert one["inception_score"] < 1.5
    assert one["fid"] > 10 * good["fid"]


def test_each_set_is_scored_alone_against_the_real_one():
    """A shifted copy has the real set's covariance, so its FID is the squared shift exactly; the
    second set's must not be pooled with the first's (how fid_floor is computed beside fid)."""
    real = torch.randn(500, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    near, far = real + torch.tensor([0.5, 0.0, 0.0, 0.0]), real + torch.tensor([0.0, 3.0, 4.0, 0.0])
    assert frechet_distances(real, [near, far]) == pytest.approx([0.25, 25.0], rel=1e-6)
    assert frechet_distances(real, [far, near]) == pytest.approx([25.0, 0.25], rel=1e-6)


def test_inception_score_of_two_certain_classes_is_two_even_where_probabilities_underflow_to_zero():
    """p(y|x) one-hot (the other classes' probabilities are exactly 0 in double): each KL term is
    log(1 / 0.5), so IS = 2; a 0 * log 0 term must count as 0, not NaN."""
    logits = torch.zeros(2, 10)
    logits[0, 0] = logits[1, 1] = 1000.0
    metrics = class_metrics(logits)
    assert metrics["inception_score"] == 2.0
    assert (metrics["class_0"], metrics["class_1"], metrics["confident"]) == (0.5, 0.5, 1.0)
