"""Pictures of a run: D-score traces, sample grids, real beside fake.

Every figure is saved atomically so a killed plot stage leaves old PNGs intact.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI or servers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from mnist_gan.files import atomic_path  # noqa: E402


def image_grid(images: torch.Tensor, nrow: int = 4) -> np.ndarray:
    """[N, 784] images in [-1, 1] -> one uint8 grayscale grid image [H, W]."""
    tiles = images.detach().float().cpu().view(-1, 1, 28, 28)
    grid = make_grid((tiles + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)[0]
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _save(fig: plt.Figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_d_scores(history: pd.DataFrame, path: str | Path) -> None:
    """Mean D(x) on test images and mean D(G(z)) per epoch; both approach 0.5 at equilibrium."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["epoch"], history["p_real"], label="p_real = D(x), test images")
    ax.plot(history["epoch"], history["p_fake"], label="p_fake = D(G(z)), fresh samples")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="equilibrium 0.5")
    ax.set(xlabel="epoch", ylabel="mean discriminator score", ylim=(0, 1),
           title="Discriminator scores during training")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_sample_grids(samples: dict[int, torch.Tensor], path: str | Path) -> None:
    """The fixed-noise 4x4 grid at each sampled epoch, side by side."""
    epochs = sorted(samples)
    fig, axes = plt.subplots(1, len(epochs), figsize=(3 * len(epochs), 3.3), squeeze=False)
    for ax, epoch in zip(axes[0], epochs, strict=True):
        ax.imshow(image_grid(samples[epoch]), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"epoch {epoch}")
        ax.axis("off")
    _save(fig, path)


def plot_real_vs_fake(real: torch.Tensor, fake: torch.Tensor, path: str | Path) -> None:
    """16 test images beside 16 generated ones."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(6.5, 3.5))
    for ax, images, title in ((left, real, "real (test set)"), (right, fake, "generated")):
        ax.imshow(image_grid(images), cmap="gray", vmin=0, vmax=255)
        ax.set_title(title)
        ax.axis("off")
    _save(fig, path)


def plot_class_histogram(fractions: list[float], path: str | Path) -> None:
    """Share of generated samples per digit, as judged by the classifier."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(len(fractions)), fractions, color="tab:blue")
    ax.axhline(1 / len(fractions), color="grey", linestyle="--", linewidth=1, label="uniform")
    ax.set(xlabel="digit (classifier's judgement)", ylabel="share of samples",
           xticks=range(len(fractions)), title="Classes of generated samples")
    ax.legend()
    _save(fig, path)
