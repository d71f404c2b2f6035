"""Resumable training checkpoints: one dict with everything needed to continue.

Saved atomically and loaded with `weights_only=True`, so a checkpoint can neither
be half-written nor execute code when read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mnist_gan.errors import UserError
from mnist_gan.files import atomic_path
from mnist_gan.params import Params

log = logging.getLogger(__name__)


def save(path: Path, *, params: Params, epoch: int, generator: torch.nn.Module,
         discriminator: torch.nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
         history: list[dict[str, float]], samples: dict[int, torch.Tensor],
         fixed_noise: torch.Tensor, run_id: str | None, ema: torch.nn.Module | None = None) -> None:
    state = {
        "params": params.training_key(),
        "epoch": epoch,
        "generator": generator.state_dict(),
        "discriminator": discriminator.state_dict(),
        "opt_g": opt_g.state_dict(),
        "opt_d": opt_d.state_dict(),
        "history": history,
        "samples": samples,
        "fixed_noise": fixed_noise.cpu(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "run_id": run_id,
        "ema": None if ema is None else ema.state_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


class CheckpointError(UserError):
    """A checkpoint that exists but cannot be resumed from."""


def load(path: Path, params: Params) -> dict[str, Any] | None:
    """The checkpoint at `path` if it belongs to these params, else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # Not half-written (saves are atomic), so damaged on disk or from another PyTorch version.
        # Fail rather than start over: the user may want it back, e.g. with the old PyTorch.
        raise CheckpointError(f"{path}: cannot resume from this checkpoint ({type(err).__name__}: "
                              f"{err}). Delete it to train from the first epoch.") from err
    if state.get("params") != params.training_key():
        log.warning("ignoring %s: it was written with other training params", path)
        return None
    return state


def restore(state: dict[str, Any], generator: torch.nn.Module, discriminator: torch.nn.Module,
            opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, device: torch.device,
            ema: torch.nn.Module | None = None) -> int:
    """Load weights (and their EMA), optimiser moments and RNG state; returns the epoch to continue after."""
    generator.load_state_dict(state["generator"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    discriminator.load_state_dict(state["discriminator"])
    opt_g.load_state_dict(state["opt_g"])
    opt_d.load_state_dict(state["opt_d"])
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and state["rng_cuda"]:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state["epoch"]
