"""A preset's own nets in a plain eager loop: what a user of PyTorch would write for them.

Not project code: the baseline of each preset's "vs plain" ratio in benchmarks/bench.py, so that
the ratio measures what the project's loop does to the same nets, on the same data. Like the
DCGAN example of PyTorch: the nets' nn modules run as nn.Sequential does (BatchNorm, nn.Dropout,
separate activations, NCHW weights), one fake batch per step serves both updates (D on it
detached, then G through it, with D's weight gradients computed again), BCEWithLogitsLoss,
torch.optim.Adam's default implementation, the preset's EMA of G's weights, and the losses read
with `.item()` every step. The data is already decoded into tensors, as in the project's loop: the
tutorial's DataLoader is benchmarks/reference_loop.py's baseline. The per-epoch evaluation is the
project's own (mnist_gan.training.d_scores), so both loops do the same work outside training.

Its FLOPs per step are benchmarks/flops.plain_step.
"""

from __future__ import annotations

import time

import torch
from timing import timed_epoch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mnist_gan import clusters, models
from mnist_gan.params import Params
from mnist_gan.training import d_scores


def plain_nets(params: Params, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The preset's G and D from params.seed, with their fused containers (models.MLP, ConvStack)
    turned back into the nn.Sequential they subclass, and NCHW weights: the same modules, weights
    and state_dict, run as PyTorch runs them."""
    torch.manual_seed(params.seed)
    nets = models.build_models(params.model, params.d_noise, params.width, params.dropout, device,
                               params.codes)
    for net in nets:
        net.to(memory_format=torch.contiguous_format)
        for module in net.modules():
            if isinstance(module, models.MLP | models.ConvStack):
                module.__class__ = nn.Sequential  # nn.Sequential's forward over the same modules
    return nets


class PlainLoop:
    """The plain loop of `params`' preset on `train_images` [N, 784] (and its `labels`), one epoch
    (training + evaluation on the test split) at a time."""

    def __init__(self, params: Params, train_images: torch.Tensor, test_images: torch.Tensor,
                 labels: dict[str, torch.Tensor], device: torch.device):
        started = time.perf_counter()
        self.params, self.device = params, device
        self.train_images, self.test_images = train_images, test_images
        self.train_labels, self.test_labels = labels["train_labels"], labels["test_labels"]
        self.generator, self.discriminator = plain_nets(params, device)
        if self.generator.n_codes:  # the project's clusters stand for the labels, as its loop does it
            centroids, self.train_labels = clusters.fit(train_images, params.codes, params.seed)
            self.discriminator.centroids.copy_(centroids)
        self.labelled = bool(self.generator.n_classes or self.generator.n_codes)
        if self.labelled:
            categories = self.generator.n_classes or self.generator.n_codes
            self.generator.label_prior.copy_(torch.bincount(self.train_labels, minlength=categories)
                                             / len(self.train_labels))
        betas = (params.beta1, 0.999)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=params.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=params.lr, betas=betas)
        self.ema = (AveragedModel(self.generator, multi_avg_fn=get_ema_multi_avg_fn(params.ema),
                                  use_buffers=True) if params.ema else None)
        self.criterion = nn.BCEWithLogitsLoss()
        self.setup_seconds = time.perf_counter() - started
        self.records: list[dict[str, float]] = []

    def step(self, real: torch.Tensor, labels: torch.Tensor | None) -> tuple[float, float]:
        """One D update and one G update on a real batch; both losses, read with .item()."""
        generator, discriminator, m = self.generator, self.discriminator, len(real)
        ones, zeros = torch.ones(m, device=self.device), torch.zeros(m, device=self.device)
        fake_labels = torch.multinomial(generator.label_prior, m, replacement=True) if self.labelled else None
        fake = generator(torch.randn(m, self.params.d_noise, device=self.device), fake_labels)

        self.opt_d.zero_grad()
        loss_d = (self.criterion(discriminator(real, labels), ones)
                  + self.criterion(discriminator(fake.detach(), fake_labels), zeros))
        loss_d.backward()
        self.opt_d.step()

        self.opt_g.zero_grad()
        loss_g = self.criterion(discriminator(fake, fake_labels), ones)
        loss_g.backward()
        self.opt_g.step()
        if self.ema is not None:
            self.ema.update_parameters(generator)
        return loss_d.item(), loss_g.item()

    def train_epoch(self) -> None:
        self.generator.train()
        self.discriminator.train()
        for idx in torch.randperm(len(self.train_images), device=self.device).split(self.params.batch_size):
            self.step(self.train_images[idx], self.train_labels[idx] if self.labelled else None)

    def epoch(self) -> dict[str, float]:
        self.records.append(timed_epoch(
            self.train_epoch,
            lambda: d_scores(self.generator, self.discriminator, self.test_images, len(self.test_images),
                             real_labels=self.test_labels),
            self.device))
        return self.records[-1]
