"""Sampling probes of a trained generator: what its bad samples come from, on the frozen judge.

    python benchmarks/probes.py [--generator models/generator.pt] [--discriminator models/discriminator.pt]
                                [--n 10000] [--out benchmarks/results/probes.json]

Each probe changes how the same weights are sampled, and scores 10k samples as the evaluate stage
does (fid, precision, recall, confident, class_kl); each result tells a different cause apart:
- `eval BN` (what evaluate does) against `train BN` (batch norm normalises with each batch's own
  statistics, batches of 64 as in training) and `recomputed BN` (running statistics re-estimated
  from 200 batches of fresh z, then eval mode): stale or averaged BN statistics;
- `truncated z` (|z_i| <= t, resampled; Brock et al. 2019): samples from the prior's tails, which G
  saw rarely;
- `top 80 % by D`: the 10k best of 12.5k samples by D's logit: whether D can tell G's bad samples,
  i.e. whether more training signal from this D could fix them.

Needs the test set in data/MNIST/raw and the judge in models/classifier.pt (`dvc repro evaluate`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from machine import describe

from mnist_gan import paths
from mnist_gan.classifier import load_classifier
from mnist_gan.data import load_images
from mnist_gan.models import load_model
from mnist_gan.quality import quality_metrics
from mnist_gan.training import latents, sample

KEYS = ("fid", "precision", "recall", "confident", "class_kl")
BN_BATCH = 64


def truncated_normal(n: int, d: int, t: float, rng: torch.Generator) -> torch.Tensor:
    """z ~ N(0, 1) with every entry resampled until |z_i| <= t."""
    z = torch.randn(n, d, generator=rng)
    while (out := z.abs() > t).any():
        z[out] = torch.randn(int(out.sum()), generator=rng)
    return z


@torch.no_grad()
def train_mode_samples(generator, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Samples with batch norm in training mode, batch by batch; running statistics restored."""
    state = {k: v.clone() for k, v in generator.state_dict().items()}
    generator.train()
    out = torch.cat([generator(zb, None if labels is None else labels[i:i + BN_BATCH])
                     for i, zb in zip(range(0, len(z), BN_BATCH), z.split(BN_BATCH), strict=True)])
    generator.load_state_dict(state)
    return out.float()


@torch.no_grad()
def recompute_bn(generator, rng: torch.Generator, batches: int = 200) -> None:
    """BN running statistics re-estimated as a plain average over `batches` batches of fresh z."""
    for module in generator.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    generator.train()
    for _ in range(batches):
        z, labels = latents(generator, BN_BATCH, torch.device("cpu"), rng)
        generator(z, labels)
    generator.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generator", type=Path, default=paths.GENERATOR)
    parser.add_argument("--discriminator", type=Path, default=paths.DISCRIMINATOR)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cpu = torch.device("cpu")
    classifier = load_classifier(paths.CLASSIFIER, cpu)
    real = load_images(paths.RAW_DIR, train=False, device=cpu)
    discriminator = load_model(args.discriminator, cpu)

    def rng() -> torch.Generator:
        return torch.Generator().manual_seed(args.seed)

    def generator():
        return load_model(args.generator, cpu)

    g = generator()
    z, labels = latents(g, args.n, cpu, rng())
    probes = {"eval BN (evaluate's)": lambda: sample(g, z, labels),
              "train BN, batches of 64": lambda: train_mode_samples(generator(), z, labels)}

    def recomputed() -> torch.Tensor:
        g2 = generator()
        recompute_bn(g2, torch.Generator().manual_seed(args.seed + 1))
        return sample(g2, z, labels)

    probes["recomputed BN"] = recomputed
    for t in (1.5, 1.0, 0.5):
        probes[f"truncated z, t={t}"] = (
            lambda t=t: sample(g, truncated_normal(args.n, g.d_noise, t, rng()), labels))

    def top_by_d() -> torch.Tensor:
        n_more = args.n * 5 // 4
        zz, ll = latents(g, n_more, cpu, rng())
        fake = sample(g, zz, ll)
        with torch.no_grad():
            logit = discriminator(fake, ll)
        return fake[logit.argsort(descending=True)[:args.n]]

    probes["top 80 % by D"] = top_by_d
    print(f"{describe(cpu)['device']}; generator {args.generator}, {args.n} samples")
    print(f"| probe | {' | '.join(KEYS)} |\n|---|{'---|' * len(KEYS)}")
    results = {}
    for name, draw in probes.items():
        metrics = quality_metrics(classifier, draw(), real)
        results[name] = {k: round(metrics[k], 4) for k in KEYS}
        print(f"| {name} | {' | '.join(str(results[name][k]) for k in KEYS)} |", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
