"""The GAN training loop: the tutorial's model, losses, optimiser and per-epoch
evaluation, run as tensor operations on data decoded once onto the device.

Importable without MLflow or DVC: tracking is a `Tracker` passed in from outside.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from mnist_gan import checkpoint as ckpt
from mnist_gan.losses import loss_d as compute_loss_d
from mnist_gan.losses import loss_g as compute_loss_g
from mnist_gan.models import Discriminator, Generator, build_models
from mnist_gan.params import Params

log = logging.getLogger(__name__)

N_FIXED_NOISE = 16  # one 4x4 sample grid


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class Tracker(Protocol):
    """Receives what training produces; mnist_gan.tracking implements it for MLflow."""

    run_id: str | None

    def log_epoch(self, record: dict[str, float]) -> None: ...

    def log_samples(self, epoch: int, images: torch.Tensor) -> None: ...


class NullTracker:
    run_id = None

    def log_epoch(self, record: dict[str, float]) -> None:
        pass

    def log_samples(self, epoch: int, images: torch.Tensor) -> None:
        pass


@dataclass
class TrainResult:
    generator: Generator
    discriminator: Discriminator
    history: list[dict[str, float]]
    # epoch -> the generator's images of fixed_noise at that epoch, [16, 784] in [-1, 1]
    samples: dict[int, torch.Tensor] = field(default_factory=dict)
    train_seconds: float = 0.0


def autocast(device: torch.device, precision: str):
    """bf16 autocast of the matmuls when asked for; fp32 master weights either way."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def d_scores(generator: Generator, discriminator: Discriminator, real: torch.Tensor,
             n_fake: int, *, rng: torch.Generator | None = None, precision: str = "fp32",
             chunk: int = 10_000) -> tuple[float, float]:
    """The tutorial's evaluation: mean D(x) over `real` and mean D(G(z)) over
    `n_fake` fresh samples, both nets in eval mode. `rng` fixes z (evaluate stage)."""
    was_training = generator.training, discriminator.training
    generator.eval()
    discriminator.eval()
    device = real.device
    with autocast(device, precision):
        p_real = sum(torch.sigmoid(discriminator(x).float()).sum() for x in real.split(chunk))
        p_fake = torch.zeros((), device=device)
        for n in torch.arange(n_fake).split(chunk):
            z = torch.randn(len(n), generator.d_noise, device=device, generator=rng)
            p_fake += torch.sigmoid(discriminator(generator(z)).float()).sum()
    generator.train(was_training[0])
    discriminator.train(was_training[1])
    return (p_real / len(real)).item(), (p_fake / n_fake).item()


@torch.no_grad()
def sample(generator: Generator, z: torch.Tensor) -> torch.Tensor:
    was_training = generator.training
    generator.eval()
    images = generator(z).float()
    generator.train(was_training)
    return images


def train(params: Params, train_images: torch.Tensor, test_images: torch.Tensor,
          device: torch.device, *, tracker: Tracker | None = None,
          checkpoint_path: Path | None = None, resume: dict[str, Any] | None = None,
          on_step: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train the GAN; `train_images`/`test_images` are [N, 784] in [-1, 1] on `device`.

    `resume` is a checkpoint from `checkpoint.load`: training continues after its
    epoch with its weights, optimiser moments and RNG state, so an interrupted and
    resumed run ends where an uninterrupted one would. `on_step(epoch, batch)` is
    a test hook for injecting faults mid-epoch.
    """
    tracker = tracker or NullTracker()
    if params.batch_size > len(train_images):
        raise ValueError(f"'batch_size' = {params.batch_size} is larger than the training set "
                         f"({len(train_images)} images); lower batch_size")
    torch.manual_seed(params.seed)  # dropout draws from the global RNG, so seed it
    generator, discriminator = build_models(params.d_noise, params.d_hidden, params.dropout, device)
    fixed_noise = torch.randn(N_FIXED_NOISE, params.d_noise, device=device)
    # fused Adam: one kernel for all parameters instead of a Python loop over them
    opt_g = torch.optim.Adam(generator.parameters(), lr=params.lr, fused=True)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=params.lr, fused=True)
    history: list[dict[str, float]] = []
    samples: dict[int, torch.Tensor] = {}
    start_epoch = 0
    if resume is not None:
        start_epoch = ckpt.restore(resume, generator, discriminator, opt_g, opt_d, device)
        history, samples, fixed_noise = resume["history"], resume["samples"], resume["fixed_noise"].to(device)
        log.info("resuming after epoch %d from %s", start_epoch, checkpoint_path)

    n, b = len(train_images), params.batch_size
    cast = autocast(device, params.precision)
    bar = tqdm(range(start_epoch + 1, params.epochs + 1), desc="train", unit="epoch",
               initial=start_epoch, total=params.epochs, disable=None)
    for epoch in bar:
        started = time.perf_counter()
        generator.train()
        discriminator.train()
        # loss sums stay on the device: no host sync inside the epoch
        loss_sums = torch.zeros(2, device=device)
        batches = torch.randperm(n, device=device).split(b)
        for step, idx in enumerate(batches):
            if on_step is not None:
                on_step(epoch, step)
            real = train_images[idx]
            m = len(idx)

            # (1) Update D: maximize log D(x) + log(1 - D(G(z)))
            z = torch.randn(m, params.d_noise, device=device)
            with cast:
                with torch.no_grad():
                    fake = generator(z)
                # one pass over real and fake together: one matmul per layer instead of two
                logits = discriminator(torch.cat([real, fake.to(real.dtype)])).float()
            loss_d = compute_loss_d(logits[:m], logits[m:], params.loss)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()

            # (2) Update G: maximize log D(G(z)) with fresh z (non-saturating loss)
            discriminator.requires_grad_(False)  # G's step needs no D weight gradients
            z = torch.randn(m, params.d_noise, device=device)
            with cast:
                logit_fake = discriminator(generator(z)).float()
            loss_g = compute_loss_g(logit_fake, params.loss)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            discriminator.requires_grad_(True)

            loss_sums += torch.stack([loss_d.detach(), loss_g.detach()])

        # Evaluate: the tutorial's D scores on the test set and fresh samples
        mean_d, mean_g = (loss_sums / len(batches)).tolist()
        if not (torch.isfinite(torch.tensor([mean_d, mean_g])).all()):
            raise TrainingDiverged(f"epoch {epoch}: loss_d={mean_d}, loss_g={mean_g} is not finite; "
                                   "lower lr or try precision=fp32. The last good checkpoint is kept.")
        p_real, p_fake = d_scores(generator, discriminator, test_images, len(test_images),
                                  precision=params.precision)
        record = {"epoch": epoch, "p_real": p_real, "p_fake": p_fake, "loss_d": mean_d,
                  "loss_g": mean_g, "seconds": time.perf_counter() - started}
        history.append(record)
        tracker.log_epoch(record)
        bar.set_postfix(p_real=f"{p_real:.3f}", p_fake=f"{p_fake:.3f}")

        if epoch % params.sample_every == 0 or epoch == params.epochs:
            samples[epoch] = sample(generator, fixed_noise).cpu()
            tracker.log_samples(epoch, samples[epoch])
            log.info("epoch %d/%d  p_real %.3f  p_fake %.3f  loss_d %.3f  loss_g %.3f",
                     epoch, params.epochs, p_real, p_fake, mean_d, mean_g)

        if checkpoint_path is not None and params.checkpoint_every and (
                epoch % params.checkpoint_every == 0 and epoch < params.epochs):
            ckpt.save(checkpoint_path, params=params, epoch=epoch, generator=generator,
                      discriminator=discriminator, opt_g=opt_g, opt_d=opt_d, history=history,
                      samples=samples, fixed_noise=fixed_noise, run_id=tracker.run_id)
    bar.close()
    return TrainResult(generator, discriminator, history, samples,
                       train_seconds=sum(r["seconds"] for r in history))
