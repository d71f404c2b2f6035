"""Dropout inside the MLPs' fused CPU layers: a small C++ kernel (dropout.cpp), built on first use.

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
returns None and the MLPs run as a plain nn.Sequential instead: the same model, slower.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("dropout.cpp")


def _machine_tag() -> str:
    """The CPU's instruction-set flags: the build uses -march=native, so a build cache shared
    between different CPUs (a network home) must not hand one CPU another's binary."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


@functools.cache
def kernels() -> ModuleType | None:
    """The compiled kernels, or None (logged once) where they cannot be built."""
    try:
        # imported here, as only CPU training needs it; on import it warns that no CUDA runtime
        # is found, which does not concern a CPU kernel
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils import cpp_extension
        if shutil.which("ninja") is None:  # the build runs ninja from PATH: add the pip package's
            import ninja
            os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
        log.info("loading the CPU dropout kernel (the first time on a machine, it is built: ~20 s)")
        # from the source's text, not its path: the build is then the same for every checkout
        # of the project (a path of its own would rebuild it each time another one loads it)
        return cpp_extension.load_inline(f"mnist_gan_dropout_{_machine_tag()}", _SOURCE.read_text(),
                                         extra_cflags=["-O3", "-march=native"])
    except Exception as error:  # noqa: BLE001 - any failure to build means: no fused dropout
        log.warning("could not build the fused CPU dropout kernel, so the MLPs train as a plain "
                    "nn.Sequential on CPU (same results, slower): %s", error)
        return None


def draw_seed() -> int:
    """A mask's seed: one draw from torch's global RNG."""
    return int(torch.empty((), dtype=torch.int64).random_().item())
