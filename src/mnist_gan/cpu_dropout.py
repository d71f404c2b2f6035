"""Dropout inside the fused CPU layers (the MLPs', and the conv discriminator's activation + dropout
pairs): a small C++ kernel (dropout.cpp), built on first use.

Why by hand: on CPU, the mask of nn.Dropout comes from bernoulli_ on PyTorch's mt19937, which
runs on one thread. Even cut from 16 bits of full-range int64 draws, drawing the masks,
turning them into scaled floats and multiplying took 14 % of a training step (measured by
replaying cached masks), and no library fuses dropout on CPU. The kernel draws each element's
bits from a counter-based generator (SplitMix64 over the element's index), on all threads,
applies the mask to the layer's output in place, and recomputes it in the backward pass, fused
with the activation's derivative, instead of storing it.

Every mask's seed is one draw from torch's global RNG: `torch.manual_seed` and a checkpoint's
saved RNG state replay the masks exactly, as they do nn.Dropout's.

The kernel is compiled once per machine by torch.utils.cpp_extension (about 20 s; the build is
cached under ~/.cache/torch_extensions). Where it cannot be built (no C++ compiler), `kernels()`
returns None and the nets run their modules instead (the MLPs as a plain nn.Sequential): the same
model and weights, but nn.Dropout's masks, so not the fused path's results to the bit, and slower.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("dropout.cpp")


class Activation(enum.IntEnum):
    """The activations of the fused layers, the one list of them: each name is oneDNN's post-op,
    each value the code the kernel's backward takes. dropout.cpp's `enum class Activation` is made
    from this class at build time (`_cflags`), and the kernel does not compile where it lacks the
    derivative of one of them."""

    none = 0
    relu = 1
    leaky_relu = 2
    tanh = 3


def _cflags() -> list[str]:
    # -Werror=switch: a switch over Activation without a case for each member does not compile
    activations = ",".join(f"{activation.name}={activation.value}" for activation in Activation)
    return ["-O3", "-march=native", "-Werror=switch", f"-DMNIST_GAN_ACTIVATIONS={activations}"]


def _build_name(source: str, cflags: list[str]) -> str:
    """The extension's name, from what makes one build differ from another: the source, the flags,
    the CPU's instruction-set flags (-march=native: a build cache shared between different CPUs,
    a network home, must not hand one CPU another's binary), and the torch it compiles against.
    From the source's text, not its path: checkouts of the same code share one build, and
    checkouts of different code, or two environments (whose torch headers are in different
    folders of the build's command line), do not rebuild each other's in turn."""
    try:
        cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("flags"))
    except (OSError, StopIteration):
        cpu = ""
    digest = hashlib.sha1("\n".join([cpu, source, torch.__file__, *cflags]).encode()).hexdigest()[:8]
    return f"mnist_gan_dropout_{digest}"


@contextlib.contextmanager
def _build_environment() -> Iterator[None]:
    """What the build needs, for the build only (then restored):

    - the pip package's ninja first on PATH, where torch looks for it: it is not on PATH where the
      environment is not activated (`.venv/bin/python ...`), and a system-wide ninja of another
      version must not run instead: ninja 1.11 and 1.13 hash commands differently in their build
      logs, so each would take the other's build for stale and rebuild the kernel (a minute);
    - torch.utils.cpp_extension's logger muted below errors: on import, a CUDA build of torch on a
      machine without a GPU warns that no CUDA runtime is found, and without a compiler the build
      warns that "c++" is not a compatible one; neither concerns a CPU kernel, and a failed build is
      logged once, by kernels(), with its error.
    """
    path = os.environ.get("PATH")
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    import ninja

    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{path or ''}"
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path


@functools.cache
def kernels() -> ModuleType | None:
    """The compiled kernels, or None (logged once) where they cannot be built."""
    try:
        source, cflags = _SOURCE.read_text(), _cflags()
        log.info("loading the CPU dropout kernel (the first time on a machine, it is built: ~20 s)")
        with _build_environment():
            from torch.utils import cpp_extension  # imported here, as only CPU training needs it
            return cpp_extension.load_inline(_build_name(source, cflags), source, extra_cflags=cflags)
    except Exception as error:  # noqa: BLE001 - any failure to build means: no fused dropout
        log.warning("could not build the fused CPU dropout kernel, so on CPU the nets train with their "
                    "plain modules: the same model and weights, but with nn.Dropout's masks instead of "
                    "the kernel's, so results are not bit-identical to the fused path's, and slower: %s",
                    error)
        return None


def draw_seed() -> int:
    """A mask's seed: one draw from torch's global RNG."""
    return int(torch.empty((), dtype=torch.int64).random_().item())
