"""The tutorial's vanilla GAN: two MLPs over flattened 28x28 images.

The discriminator returns *logits*; D(x) = sigmoid(logit). The model is the
tutorial's (its last layer is Linear(256, 1) -> Sigmoid), with the sigmoid moved
into the losses so they can be computed in a numerically stable form.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mnist_gan.files import atomic_path

IMAGE_SIZE = 28 * 28


class Generator(nn.Module):
    """z [B, d_noise] -> image [B, 784] in [-1, 1]."""

    def __init__(self, d_noise: int = 100, d_hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.d_noise = d_noise
        self.net = nn.Sequential(
            nn.Linear(d_noise, d_hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(d_hidden, d_hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(d_hidden, IMAGE_SIZE), nn.Tanh(),
        )
        init_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    """image [B, 784] -> logit [B] of the probability that the image is real."""

    def __init__(self, d_hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(IMAGE_SIZE, d_hidden), nn.LeakyReLU(0.01), nn.Dropout(dropout),
            nn.Linear(d_hidden, d_hidden), nn.LeakyReLU(0.01), nn.Dropout(dropout),
            nn.Linear(d_hidden, 1),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def init_weights(model: nn.Module) -> None:
    """The tutorial's init: xavier_normal_ for weight matrices, U(0.1, 0.2) for biases."""
    for p in model.parameters():
        if p.dim() > 1:
            nn.init.xavier_normal_(p)
        else:
            nn.init.uniform_(p, 0.1, 0.2)


def build_models(d_noise: int, d_hidden: int, dropout: float,
                 device: torch.device) -> tuple[Generator, Discriminator]:
    return (Generator(d_noise, d_hidden, dropout).to(device),
            Discriminator(d_hidden, dropout).to(device))


def save_model(model: Generator | Discriminator, path: Path) -> None:
    """Weights plus the constructor arguments, so the file alone rebuilds the model."""
    if isinstance(model, Generator):
        config = {"kind": "generator", "d_noise": model.d_noise, "d_hidden": model.net[0].out_features,
                  "dropout": model.net[2].p}
    else:
        config = {"kind": "discriminator", "d_hidden": model.net[0].out_features, "dropout": model.net[2].p}
    with atomic_path(path) as tmp:
        torch.save({"config": config, "state_dict": model.state_dict()}, tmp)


def load_model(path: Path, device: torch.device) -> Generator | Discriminator:
    """A model saved by save_model, in eval mode on `device`."""
    state = torch.load(path, map_location=device, weights_only=True)
    config = dict(state["config"])
    cls = {"generator": Generator, "discriminator": Discriminator}[config.pop("kind")]
    model = cls(**config).to(device)
    model.load_state_dict(state["state_dict"])
    return model.eval()
