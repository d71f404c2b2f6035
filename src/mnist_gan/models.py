"""The tutorial's vanilla GAN: two MLPs over flattened 28x28 images.

The discriminator returns *logits*; D(x) = sigmoid(logit). The model is the
tutorial's (its last layer is Linear(256, 1) -> Sigmoid), with the sigmoid moved
into the losses so they can be computed in a numerically stable form.
"""

from __future__ import annotations

import torch
from torch import nn

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
