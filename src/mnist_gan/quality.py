"""Sample-quality metrics, judged by the frozen classifier (classifier.py).

All numbers live in the classifier's penultimate feature space or come from its
class probabilities, so they are internal to this project: comparable across its
runs, not to the Inception-based FIDs in papers.

- `fid`: Fréchet distance between Gaussians fitted to fake and real features
  (torchmetrics' FrechetInceptionDistance, fed the features we computed).
- `precision`, `recall` (Kynkäänniemi et al. 2019, k = 3): the share of fake
  samples inside the real manifold, and of real samples inside the fake one,
  each manifold being the union of balls reaching every point's k-th neighbour.
- `density`, `coverage` (Naeem et al. 2020, k = 5): how many real balls hold a
  fake sample, on average, divided by k; and the share of real balls that hold
  at least one fake sample. Both use the real manifold only, so fake outliers
  cannot inflate them the way they inflate recall.
- the class histogram of fake samples by argmax, `classes_covered` (classes
  with >= 2 % of them), `class_kl` (KL(histogram || uniform), 0 = balanced,
  log 10 = one class), `confident` (share with max prob >= 0.9) and
  `inception_score` (exp E_x KL(p(y|x) || p(y)), 1 to 10, over the whole set).

No maintained package in our environment implements precision/recall/density/
coverage, so they are written here with chunked `torch.cdist`, following the
reference code of Naeem et al. (github.com/clovaai/generative-evaluation-prdc):
strict `<` against the radii, radius = distance to the k-th neighbour other
than the point itself.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from mnist_gan.classifier import N_CLASSES, Classifier, predict

K_PRECISION_RECALL = 3
K_DENSITY_COVERAGE = 5
COVERED_SHARE = 0.02  # a class counts as produced when it gets at least this share of the samples
CONFIDENT_PROB = 0.9
CHUNK = 1_024  # rows of a distance matrix held at once: 1024 x 10k float64 = 80 MB


def quality_metrics(classifier: Classifier, fake: torch.Tensor, real: torch.Tensor, *,
                    floor_real: torch.Tensor | None = None) -> dict[str, float]:
    """All metrics of `fake` [N, 784] against `real` [M, 784], both in [-1, 1].

    `floor_real`, other real images (e.g. training images against the test set),
    adds `fid_floor`: the FID of real data, what a perfect generator would score.
    Deterministic: the same inputs on the same machine give identical numbers.
    """
    fake_features, fake_logits = predict(classifier, fake)
    real_features, _ = predict(classifier, real)
    others = [fake_features]
    if floor_real is not None:
        others.append(predict(classifier, floor_real)[0])
    fids = frechet_distances(real_features, others)

    metrics = {"fid": fids[0]}
    if floor_real is not None:
        metrics["fid_floor"] = fids[1]
    metrics.update(precision_recall_density_coverage(real_features, fake_features))
    metrics.update(class_metrics(fake_logits))
    return metrics


class _Precomputed(nn.Identity):
    """The 'feature extractor' handed to torchmetrics: the features are already computed.

    torchmetrics reads `num_features` to size its state (without it, it would probe
    the module with a dummy 3x299x299 uint8 image) and casts the features to float64
    for its sums; its result takes the features' dtype, so we pass float64 features.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features


def frechet_distances(real: torch.Tensor, others: list[torch.Tensor]) -> list[float]:
    """Fréchet distance of each feature set in `others` [N_i, F] to `real` [M, F]."""
    fid = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), reset_real_features=False)
    fid.update(real.double(), real=True)
    distances = []
    for features in others:
        fid.reset()  # forgets the fake statistics only
        fid.update(features.double(), real=False)
        # a distance of identical sets comes out as ~ -1e-14 in float64: clamp the rounding away
        distances.append(max(0.0, fid.compute().item()))
    return distances


def precision_recall_density_coverage(real: torch.Tensor, fake: torch.Tensor,
                                      chunk: int = CHUNK) -> dict[str, float]:
    """The four manifold metrics of fake features [N, F] against real features [M, F]."""
    k_pr, k_dc = K_PRECISION_RECALL, K_DENSITY_COVERAGE
    if len(real) <= max(k_pr, k_dc) or len(fake) <= k_pr:
        raise ValueError(f"need more than {k_dc} real and {k_pr} fake samples, "
                         f"got {len(real)} and {len(fake)}")
    real, fake = real.double(), fake.double()
    real_radii = _kth_neighbour_distances(real, (k_pr, k_dc), chunk)   # [M] each
    fake_radius = _kth_neighbour_distances(fake, (k_pr,), chunk)[k_pr]  # [N]

    fake_in_real = torch.zeros(len(fake), dtype=torch.bool)      # precision: inside some real ball
    real_balls_hit = torch.zeros(len(fake), dtype=torch.long)    # density: how many real balls
    real_in_fake, real_covered = [], []                          # recall, coverage: per real row
    for start in range(0, len(real), chunk):
        rows = slice(start, start + chunk)
        dist = torch.cdist(real[rows], fake)  # [c, N]
        fake_in_real |= (dist < real_radii[k_pr][rows, None]).any(0)
        real_balls_hit += (dist < real_radii[k_dc][rows, None]).sum(0)
        real_in_fake.append((dist < fake_radius[None, :]).any(1))
        real_covered.append(dist.min(1).values < real_radii[k_dc][rows])
    return {
        "precision": fake_in_real.double().mean().item(),
        "recall": torch.cat(real_in_fake).double().mean().item(),
        "density": real_balls_hit.sum().item() / (k_dc * len(fake)),
        "coverage": torch.cat(real_covered).double().mean().item(),
    }


def _kth_neighbour_distances(x: torch.Tensor, ks: tuple[int, ...], chunk: int) -> dict[int, torch.Tensor]:
    """k -> [N] distance from each row of `x` to its k-th nearest other row, for each k in `ks`."""
    nearest = []
    for rows in x.split(chunk):
        # the k + 1 smallest distances of a row include its distance 0 to itself, at index 0
        nearest.append(torch.cdist(rows, x).topk(max(ks) + 1, dim=1, largest=False).values)
    nearest = torch.cat(nearest)  # [N, max(ks) + 1], ascending
    return {k: nearest[:, k] for k in ks}


def class_metrics(logits: torch.Tensor) -> dict[str, float]:
    """Class histogram, coverage of classes, balance, confidence and Inception score of logits [N, 10]."""
    log_p = logits.double().log_softmax(1)  # log p(y|x), [N, 10]
    p = log_p.exp()
    hist = torch.bincount(p.argmax(1), minlength=N_CLASSES).double() / len(p)
    produced = hist > 0
    class_kl = (hist[produced] * (hist[produced] * N_CLASSES).log()).sum()
    log_p_y = p.mean(0).log()  # log of the marginal p(y)
    # exp E_x KL(p(y|x) || p(y)); a term with p(y|x) = 0 contributes 0 (never 0 * inf)
    kl = torch.where(p > 0, p * (log_p - log_p_y), 0.0).sum(1)
    inception = kl.mean().exp()
    metrics = {
        "classes_covered": float((hist >= COVERED_SHARE).sum().item()),
        "class_kl": max(0.0, class_kl.item()),
        "confident": (p.max(1).values >= CONFIDENT_PROB).double().mean().item(),
        "inception_score": inception.item(),
    }
    metrics.update({f"class_{c}": hist[c].item() for c in range(N_CLASSES)})
    return metrics

