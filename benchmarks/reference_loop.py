"""The tutorial's GAN loop, as the tutorial writes it: the baseline of every speed figure.

Not project code. It is kept faithful to the tutorial (see shared/reference/gan-tutorial-ko.md)
so that the benchmark and the equivalence test measure the project's loop against the real
thing: torchvision's MNIST dataset with per-sample `ToTensor` + `Normalize` transforms, a
`DataLoader` of shuffled batches, `nn.Sequential` models with a `Sigmoid` at the end of D, the
paper's losses on probabilities, two Adam optimisers, and the per-batch evaluation over the
test loader. The only changes are structural: the tutorial's notebook globals (device, loaders,
models) are held in a `Reference` object so that the loop can be called from tests, and the
evaluation divides by the test set's size instead of the hard-coded 10000.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.optim as optim
import torchvision.datasets as dsets
import torchvision.transforms as transforms
from torch import nn
from torch.utils.data import DataLoader

D_NOISE = 100
D_HIDDEN = 256


@dataclass
class Reference:
    """What the tutorial keeps in notebook globals."""

    generator: nn.Sequential
    discriminator: nn.Sequential
    optimizer_g: optim.Adam
    optimizer_d: optim.Adam
    train_loader: DataLoader
    test_loader: DataLoader
    device: torch.device
    batch_size: int


def sample_z(batch_size: int, device: torch.device, d_noise: int = D_NOISE) -> torch.Tensor:
    return torch.randn(batch_size, d_noise, device=device)


def init_params(model: nn.Module) -> None:
    for p in model.parameters():
        if p.dim() > 1:
            nn.init.xavier_normal_(p)
        else:
            nn.init.uniform_(p, 0.1, 0.2)


def build_reference(root: str | Path, device: torch.device, seed: int, batch_size: int = 200,
                    lr: float = 2e-4) -> Reference:
    """Datasets, loaders, models and optimisers in the tutorial's order.

    `root` holds `MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte` (torchvision's layout).
    """
    torch.manual_seed(seed)
    standardizator = transforms.Compose([transforms.ToTensor(),
                                         transforms.Normalize(mean=(0.5,), std=(0.5,))])
    train_data = dsets.MNIST(root=str(root), train=True, transform=standardizator, download=False)
    test_data = dsets.MNIST(root=str(root), train=False, transform=standardizator, download=False)
    train_loader = DataLoader(train_data, batch_size, shuffle=True)
    test_loader = DataLoader(test_data, batch_size, shuffle=True)

    generator = nn.Sequential(
        nn.Linear(D_NOISE, D_HIDDEN), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(D_HIDDEN, D_HIDDEN), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(D_HIDDEN, 28 * 28), nn.Tanh(),
    ).to(device)
    discriminator = nn.Sequential(
        nn.Linear(28 * 28, D_HIDDEN), nn.LeakyReLU(), nn.Dropout(0.1),
        nn.Linear(D_HIDDEN, D_HIDDEN), nn.LeakyReLU(), nn.Dropout(0.1),
        nn.Linear(D_HIDDEN, 1), nn.Sigmoid(),
    ).to(device)
    init_params(generator)
    init_params(discriminator)
    optimizer_g = optim.Adam(generator.parameters(), lr=lr)
    optimizer_d = optim.Adam(discriminator.parameters(), lr=lr)
    return Reference(generator, discriminator, optimizer_g, optimizer_d, train_loader, test_loader,
                     device, batch_size)


def run_epoch(ref: Reference) -> None:
    """One pass over the training loader, the tutorial's `run_epoch`."""
    generator, discriminator, device = ref.generator, ref.discriminator, ref.device
    generator.train()
    discriminator.train()

    for img_batch, label_batch in ref.train_loader:
        img_batch, label_batch = img_batch.to(device), label_batch.to(device)

        # (1) Update D: maximize log D(x) + log(1 - D(G(z))), the paper's value function
        ref.optimizer_d.zero_grad()
        p_real = discriminator(img_batch.view(-1, 28 * 28))
        p_fake = discriminator(generator(sample_z(ref.batch_size, device)))
        loss_real = -1 * torch.log(p_real)
        loss_fake = -1 * torch.log(1. - p_fake)
        loss_d = (loss_real + loss_fake).mean()
        loss_d.backward()
        ref.optimizer_d.step()

        # (2) Update G: maximize log D(G(z)) with fresh z (the paper's §3 non-saturating loss)
        ref.optimizer_g.zero_grad()
        p_fake = discriminator(generator(sample_z(ref.batch_size, device)))
        loss_g = -1 * torch.log(p_fake).mean()
        loss_g.backward()
        ref.optimizer_g.step()


def evaluate(ref: Reference) -> tuple[float, float]:
    """The tutorial's `evaluate_model`: mean D(x) over the test set, mean D(G(z)) over as many
    fresh samples (one batch of z per test batch), both nets in eval mode."""
    generator, discriminator, device = ref.generator, ref.discriminator, ref.device
    n_test = len(ref.test_loader.dataset)
    p_real, p_fake = 0., 0.
    generator.eval()
    discriminator.eval()

    for img_batch, label_batch in ref.test_loader:
        img_batch, label_batch = img_batch.to(device), label_batch.to(device)
        with torch.no_grad():
            p_real += (torch.sum(discriminator(img_batch.view(-1, 28 * 28))).item()) / n_test
            p_fake += (torch.sum(discriminator(generator(sample_z(ref.batch_size, device)))).item()) / n_test

    return p_real, p_fake
