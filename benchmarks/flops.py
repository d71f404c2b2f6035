"""FLOPs of the benchmarked loops' passes, counted from the nets themselves, for any preset.

Each loop's passes are replayed on the nets of `mnist_gan.models.build_models` with tensors on the
meta device (shapes only: nothing is computed or allocated) under torch's `FlopCounterMode`, which
counts every matrix product and convolution that runs, forward and backward, as 2 x its
multiply-adds, split into matrix products and convolutions (each kind has its own floor: the
machine's rate at it, benchmarks/machine.py). Autograd decides which gradients are computed, so
the counts follow what each loop asks for: the weight gradients of the nets that train, the input
gradients only where something upstream needs them. Elementwise work (activations, dropout, batch
norm, losses, Adam) is O(B x width), a few % here, and not counted.

For the MLP preset at the defaults (60k/10k images, batch 200, 100-256-256-784 and 784-256-256-1)
this gives 361 GFLOP per epoch for the project's loop and 484 GFLOP for the tutorial's
(tests/test_bench.py checks both against a hand count). The rule of thumb "backward = 2 x forward,
G forward only in the D step", 2 * 60k * (4 G + 9 D) MACs = 428 GFLOP, matches neither loop.

Imports torch and mnist_gan.models only, so tests can import it without the rest of benchmarks/.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from mnist_gan.models import IMAGE_SIZE, DiscriminatorModel, GeneratorModel, build_models

META = torch.device("meta")
Nets = tuple[GeneratorModel, DiscriminatorModel]
Passes = Callable[[GeneratorModel, DiscriminatorModel, int], None]  # (generator, discriminator, rows)


def nets(model: str, d_noise: int, width: int, codes: int = 0) -> Nets:
    """A preset's generator and discriminator on the meta device (`model`: mlp | selfcond | cgan)."""
    return build_models(model, d_noise, width, 0.0, META, codes)


def _batch(generator: GeneratorModel, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images [rows, 784], z [rows, d_noise] and labels [rows] (digits or codes), on the meta device."""
    return (torch.empty(rows, IMAGE_SIZE, device=META), torch.empty(rows, generator.d_noise, device=META),
            torch.zeros(rows, dtype=torch.long, device=META))


# ---------------------------------------------------------------------------------------------
# The passes of each loop; the losses are replaced by a sum: their backward starts the same chain
# ---------------------------------------------------------------------------------------------

def project_step(generator: GeneratorModel, discriminator: DiscriminatorModel, rows: int) -> None:
    """One training step of mnist_gan.training.train on a batch of `rows` images."""
    real, z, labels = _batch(generator, rows)
    # (1) D step: G forward without grad; one D pass over real and fake together. Neither input
    # needs a gradient, so D's first layer computes none for its input.
    with torch.no_grad():
        fake = generator(z, labels)
    discriminator(torch.cat([real, fake]), torch.cat([labels, labels])).sum().backward()
    # (2) G step: D's weights are frozen (input gradients only); G computes every weight gradient
    # and every input gradient but z's (a conditional G's first layer also feeds its embedding).
    discriminator.requires_grad_(False)
    fake = generator(z, labels)
    discriminator(fake, labels).sum().backward()
    discriminator.requires_grad_(True)


def reference_step(generator: GeneratorModel, discriminator: DiscriminatorModel, rows: int) -> None:
    """One training step of the tutorial's loop (benchmarks/reference_loop.run_epoch)."""
    real, z, labels = _batch(generator, rows)
    # (1) D step: D on the real batch and on G(z). The fake is not detached, so the backward runs
    # through G as well (its gradients are thrown away by the G step's zero_grad).
    (discriminator(real, labels).sum() + discriminator(generator(z, labels), labels).sum()).backward()
    # (2) G step: D's weights still require grad, so D computes its weight gradients again.
    discriminator(generator(z, labels), labels).sum().backward()


def plain_step(generator: GeneratorModel, discriminator: DiscriminatorModel, rows: int) -> None:
    """One training step of the plain eager loop (benchmarks/plain_loop.PlainLoop.step)."""
    real, z, labels = _batch(generator, rows)
    fake = generator(z, labels)
    # (1) D step: D on the real batch and on the detached fake, separately; no gradient into either
    (discriminator(real, labels).sum() + discriminator(fake.detach(), labels).sum()).backward()
    # (2) G step: D on the same fake; D's weights still require grad, so it computes their gradients
    discriminator(fake, labels).sum().backward()


def evaluation(generator: GeneratorModel, discriminator: DiscriminatorModel, rows: int) -> None:
    """The per-epoch evaluation of both loops: D on `rows` test images, G and D on as many samples."""
    real, z, labels = _batch(generator, rows)
    with torch.no_grad():
        discriminator(real, labels)
        discriminator(generator(z, labels), labels)


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Flops:
    """FLOPs of some passes: in matrix products (aten.mm, addmm) and in convolutions."""

    matmul: int
    conv: int

    @property
    def total(self) -> int:
        return self.matmul + self.conv

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.matmul + other.matmul, self.conv + other.conv)

    def __mul__(self, n: int) -> Flops:
        return Flops(self.matmul * n, self.conv * n)


def count(passes: Passes, generator: GeneratorModel, discriminator: DiscriminatorModel, rows: int) -> Flops:
    """FLOPs of running `passes` on `rows` rows."""
    with FlopCounterMode(display=False) as counter:
        passes(generator, discriminator, rows)
    by_op = counter.get_flop_counts()["Global"]  # {aten op: FLOPs}; convolution and its backward
    conv = sum(n for op, n in by_op.items() if "convolution" in str(op))
    return Flops(counter.get_total_flops() - conv, conv)


def epoch_flops(step: Passes, generator: GeneratorModel, discriminator: DiscriminatorModel,
                n_train: int, n_test: int, batch_size: int) -> Flops:
    """FLOPs of one epoch: the training steps over `n_train` images plus the evaluation.

    A last, partial batch counts as a full one: exact where batch_size divides n_train (MNIST's
    60000 at the default 200)."""
    steps = -(-n_train // batch_size)
    return (count(step, generator, discriminator, batch_size) * steps
            + count(evaluation, generator, discriminator, n_test))


@dataclass(frozen=True)
class Gemm:
    """One matrix product [m, k] @ [k, n]; `*_transposed`: the operand is stored column-major
    (a transposed view), as nn.Linear's forward passes its weight and its backward the inputs."""

    m: int
    k: int
    n: int
    a_transposed: bool
    b_transposed: bool

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's shape and strides (its memory format), without its values."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class Conv:
    """One convolution op as it ran (aten.convolution or aten.convolution_backward, transposed or
    not): the op, and its arguments with each tensor replaced by its TensorSpec, to be replayed
    on real tensors of those shapes and layouts (benchmarks/machine.conv_rate)."""

    op: Any
    args: tuple

    def call(self, device: torch.device, dtype: torch.dtype) -> Callable[[], Any]:
        """The op on random tensors of the recorded shapes and strides, in `dtype` on `device`."""
        args = [torch.empty_strided(a.shape, a.stride, device=device, dtype=dtype).normal_()
                if isinstance(a, TensorSpec) else a for a in self.args]
        return lambda: self.op(*args)


_CONVS = (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default)


class _RecordProducts(TorchDispatchMode):
    """Notes every matrix product (aten.mm, and aten.addmm: a Linear with bias) and every
    convolution that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.gemms: list[Gemm] = []
        self.convs: list[Conv] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        operands = {torch.ops.aten.mm.default: args[:2], torch.ops.aten.addmm.default: args[1:3]}.get(func)
        if operands is not None:
            a, b = operands
            self.gemms.append(Gemm(a.shape[0], a.shape[1], b.shape[1],
                                   a.stride(0) < a.stride(1), b.stride(0) < b.stride(1)))
        elif func in _CONVS:
            self.convs.append(Conv(func, tuple(TensorSpec(tuple(a.shape), a.stride())
                                               if isinstance(a, torch.Tensor) else a for a in args)))
        return func(*args, **(kwargs or {}))


def products(passes: Passes, generator: GeneratorModel, discriminator: DiscriminatorModel,
             rows: int) -> tuple[list[Gemm], list[Conv]]:
    """The matrix products and the convolutions of running `passes` on `rows` rows, in order: the
    shapes at which benchmarks/machine.py measures the machine's matmul and conv rates."""
    with _RecordProducts() as recorder:
        passes(generator, discriminator, rows)
    return recorder.gemms, recorder.convs
