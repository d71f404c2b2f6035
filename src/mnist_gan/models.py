"""The generator and discriminator of each preset (params `model`).

- mlp: the tutorial's vanilla GAN, two MLPs over flattened 28x28 images;
- cgan: small convolutional nets for 28x28 (Radford et al. 2015) conditioned on the digit's label;
- selfcond: the same nets without labels, conditioned instead on a code: the cluster of an image
  among k-means clusters of the unlabelled training images (mnist_gan.clusters), which D holds.

Every net takes and returns flat images [B, 784] in [-1, 1], and `labels` [B] (int64), the
categorical input of G and D: the digits of a conditional net, or the codes (clusters) of a
selfcond one; nets without one ignore them, so callers need not know which kind they hold.
Discriminators return *logits*;
D(x) = sigmoid(logit): the tutorial's last Sigmoid is moved into the losses so
they can be computed in a numerically stable form.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from mnist_gan import clusters, cpu_dropout
from mnist_gan.cpu_dropout import Activation
from mnist_gan.files import atomic_path

IMAGE_SIZE = 28 * 28
N_CLASSES = 10
CONDITIONAL = ("cgan",)  # the presets whose nets take the digit's label

# The MLPs' fast CPU path. Measured with benchmarks/bench.py:
# - PyTorch sends CPU fp32 matmuls to MKL, which on AMD CPUs takes a slower non-AVX-512 path;
#   oneDNN (bundled with PyTorch) computes the same products about 2x faster there (2-core AMD EPYC).
#   On Intel CPUs MKL is the faster one (a 2-core Xeon, family 6 model 167: 282 against oneDNN's
#   232 GFLOP/s at the MLP's shapes), so there fp32 products stay with torch.mm (MKL_FP32).
# - oneDNN applies the activation to the product's output in registers (a "post-op"); a separate
#   torch.tanh over G's [200, 784] output costs more than the product itself. After an MKL product,
#   the activation runs in the dropout kernel's pass over the output, or in place.
# - dropout runs in place on that output, in a kernel of our own (mnist_gan.cpu_dropout).
# No public API does these for training (torch.compile did not beat eager on CPU), hence this
# small autograd Function, used for eager CPU batches in fp32 or under bf16 autocast. Elsewhere
# (CUDA, torch.compile and torch.export, or no C++ compiler for the dropout kernel) the
# same modules run as a plain nn.Sequential.
_onednn_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
# oneDNN has bf16 inner products only on CPUs with AVX-512 (BF16 or not) or AMX; elsewhere, such as
# AVX2-only CPUs, it refuses to create them, and bf16 autocast runs the plain modules instead
FUSED_DTYPES = (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (
    torch.float32,)


def _cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD"); empty where there is none."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            vendors = (line.partition(":")[2].strip() for line in cpuinfo if line.startswith("vendor_id"))
            return next(vendors, "")
    except OSError:
        return ""


# fp32 products in MKL (torch.mm) rather than oneDNN: MKL's AVX-512 code runs on Intel CPUs only.
# Decided by the CPU, not timed at start-up, so that a machine always computes the same bits.
MKL_FP32 = torch.backends.mkl.is_available() and _cpu_vendor() == "GenuineIntel"

_aten = torch.ops.aten


class PostOp(NamedTuple):
    """oneDNN's post-op for an activation, and the activation's backward from its output."""

    activation: Activation  # its name is oneDNN's post-op; the dropout kernel's backward takes it too
    scalars: list[float]
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    apply_: Callable[[torch.Tensor], object] | None  # the activation in place, after an MKL product


# The activation modules a fused block takes, each with its post-op (the activations themselves are
# listed once, in cpu_dropout.Activation, which the dropout kernel's C++ is built from)
_FUSED_ACTIVATIONS: dict[type[nn.Module], Callable[[nn.Module], PostOp]] = {
    nn.ReLU: lambda _: PostOp(Activation.relu, [], lambda grad, y: _aten.threshold_backward(grad, y, 0),
                              torch.relu_),
    nn.LeakyReLU: lambda leaky: PostOp(
        Activation.leaky_relu, [leaky.negative_slope],
        lambda grad, y: _aten.leaky_relu_backward(grad, y, leaky.negative_slope, True),
        lambda y: nn.functional.leaky_relu_(y, leaky.negative_slope)),
    nn.Tanh: lambda _: PostOp(Activation.tanh, [], _aten.tanh_backward, torch.tanh_),
}


def _post_op(activation: nn.Module | None) -> PostOp:
    if activation is None:
        return PostOp(Activation.none, [], None, None)
    if type(activation) not in _FUSED_ACTIVATIONS:  # the exact class: a subclass may compute otherwise
        *others, last = (cls.__name__ for cls in _FUSED_ACTIVATIONS)
        raise TypeError(f"a fused MLP block has no post-op for {activation!r}; "
                        f"it takes {', '.join(others)} or {last}")
    return _FUSED_ACTIVATIONS[type(activation)](activation)


def _slope(post_op: PostOp) -> float:
    """The activation's one scalar (LeakyReLU's slope), 0 for those without one."""
    return post_op.scalars[0] if post_op.scalars else 0.0


def _dropout_backward(ctx, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """d loss / d h of out = dropout(act(h)): the kernel recomputes the forward's mask (ctx.seed,
    ctx.p), fused with the derivative of ctx.post_op's activation."""
    return cpu_dropout.kernels().dropout_backward(grad, out, ctx.seed, ctx.p, ctx.post_op.activation,
                                                  _slope(ctx.post_op))


def _fused_dropout(x: torch.Tensor, p: float) -> bool:
    """Whether dropout(p) of `x` runs in the kernel: eager CPU training with p > 0, in a dtype it
    takes, where it could be built; elsewhere (CUDA, torch.compile and torch.export) the modules."""
    return (p > 0 and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.compiler.is_compiling() and cpu_dropout.kernels() is not None)


class _ActivationDropoutFn(torch.autograd.Function):
    """dropout(act(h), p) in place on h, a convolution's output (which its backward does not need),
    in the dropout kernel: nn.Dropout's mask costs a single-threaded bernoulli_ per element, which
    took 38 % of a cgan training step on CPU (measured, 22 of 58 ms), plus a mask and a product."""

    @staticmethod
    def forward(ctx, h, post_op: PostOp, p: float):
        ctx.post_op, ctx.p, ctx.seed = post_op, p, cpu_dropout.draw_seed()
        cpu_dropout.kernels().dropout_(h, ctx.seed, p, post_op.activation, _slope(post_op))
        ctx.mark_dirty(h)
        ctx.save_for_backward(h)
        return h

    @staticmethod
    def backward(ctx, grad):
        out, = ctx.saved_tensors
        return _dropout_backward(ctx, grad, out), None, None


def _onednn_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in oneDNN, as its inner product a @ (b^T)^T."""
    return _onednn_linear(a, b.t(), None, "none", [], "")


class _DenseFn(torch.autograd.Function):
    """dropout(act(x @ w.T + b), p) with every product in MKL (fp32 where MKL_FP32) or else oneDNN,
    the activation fused into oneDNN's forward product or into the dropout kernel's pass, which runs
    in place on the product's output (p = 0: no dropout; after MKL, the activation in place)."""

    @staticmethod
    def forward(ctx, x, weight, bias, post_op: PostOp, p: float):
        ctx.mkl = MKL_FP32 and x.dtype == torch.float32
        if ctx.mkl:
            y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
            activation = post_op.activation
        else:
            y = _onednn_linear(x, weight, bias, post_op.activation.name, post_op.scalars, "")
            activation = Activation.none  # applied by the post-op
        ctx.post_op, ctx.p = post_op, p
        if p:
            ctx.seed = cpu_dropout.draw_seed()
            cpu_dropout.kernels().dropout_(y, ctx.seed, p, activation, _slope(post_op))
        elif activation != Activation.none:
            post_op.apply_(y)
        ctx.save_for_backward(x, weight, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, y = ctx.saved_tensors
        post_op = ctx.post_op
        if ctx.p:
            grad = _dropout_backward(ctx, grad, y)
        elif post_op.backward is not None:
            grad = post_op.backward(grad, y)
        mm = torch.mm if ctx.mkl else _onednn_mm
        grad_x = mm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_w = mm(grad.t(), x) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


class MLP(nn.Sequential):
    """nn.Sequential of Linear [activation] [Dropout] blocks (the modules and state_dict of
    nn.Sequential); on CPU each block runs as one _DenseFn, in bf16 under bf16 autocast."""

    def __init__(self, *modules: nn.Module):
        super().__init__(*modules)
        # (linear, its activation's post-op, its dropout or None) of each block, parsed once
        self._blocks: list[tuple[nn.Linear, PostOp, nn.Dropout | None]] = []
        i = 0
        while i < len(modules):
            linear = modules[i]
            if not isinstance(linear, nn.Linear):
                activations = "|".join(cls.__name__ for cls in _FUSED_ACTIVATIONS)
                raise TypeError(f"MLP takes Linear [{activations}] [Dropout] blocks; "
                                f"module {i} is {linear!r}")
            i += 1
            activation = dropout = None
            if i < len(modules) and type(modules[i]) in _FUSED_ACTIVATIONS:
                activation, i = modules[i], i + 1
            if i < len(modules) and isinstance(modules[i], nn.Dropout):
                dropout, i = modules[i], i + 1
            self._blocks.append((linear, _post_op(activation), dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
        else:
            dtype = x.dtype
        ps = [dropout.p if self.training and dropout is not None else 0.0 for _, _, dropout in self._blocks]
        if not (_onednn_linear is not None and x.device.type == "cpu" and x.dim() == 2
                and dtype in FUSED_DTYPES and not torch.compiler.is_compiling()
                and (not any(ps) or cpu_dropout.kernels() is not None)):
            return super().forward(x)
        x = x.to(dtype)
        for (linear, post_op, _), p in zip(self._blocks, ps, strict=True):
            bias = None if linear.bias is None else linear.bias.to(dtype)
            x = _DenseFn.apply(x, linear.weight.to(dtype), bias, post_op, p)
        return x


class ConvStack(nn.Sequential):
    """nn.Sequential (its modules and state_dict) whose activation + Dropout pairs run as one
    in-place kernel (_ActivationDropoutFn) where _fused_dropout allows, else as the modules."""

    def __init__(self, *modules: nn.Module):
        super().__init__(*modules)
        # index of each activation followed by a Dropout -> (its post-op, the Dropout), parsed once
        self._pairs = {i: (_post_op(activation), dropout)
                       for i, (activation, dropout) in enumerate(itertools.pairwise(modules))
                       if type(activation) in _FUSED_ACTIVATIONS and isinstance(dropout, nn.Dropout)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = enumerate(self)
        for i, module in modules:
            post_op, dropout = self._pairs.get(i, (None, None))
            if dropout is not None and self.training and _fused_dropout(x, dropout.p):
                x = _ActivationDropoutFn.apply(x, post_op, dropout.p)
                next(modules)  # the Dropout: applied
            else:
                x = module(x)
        return x


class Generator(nn.Module):
    """mlp: z [B, d_noise] -> image [B, 784] in [-1, 1]."""

    n_classes = n_codes = 0  # unconditional, no code

    def __init__(self, d_noise: int = 100, width: int = 256, dropout: float = 0.1):
        super().__init__()
        self.d_noise = d_noise
        self.config = {"d_noise": d_noise, "width": width, "dropout": dropout}
        self.net = MLP(
            nn.Linear(d_noise, width), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(width, IMAGE_SIZE), nn.Tanh(),
        )
        init_weights(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    """mlp: image [B, 784] -> logit [B] of the probability that the image is real."""

    n_classes = n_codes = 0

    def __init__(self, width: int = 256, dropout: float = 0.1):
        super().__init__()
        self.config = {"width": width, "dropout": dropout}
        self.net = MLP(
            nn.Linear(IMAGE_SIZE, width), nn.LeakyReLU(0.01), nn.Dropout(dropout),
            nn.Linear(width, width), nn.LeakyReLU(0.01), nn.Dropout(dropout),
            nn.Linear(width, 1),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class ConvGenerator(nn.Module):
    """cgan/selfcond: z [B, d_noise] (and labels [B]: digits if n_classes, codes if n_codes) ->
    image [B, 784] in [-1, 1].

    z is projected to 2w x 7 x 7, then two stride-2 transposed convs upsample to 14x14
    (w channels) and 28x28 (1 channel); batch norm and ReLU in between, Tanh out. The label's
    (or code's) learnt embedding is appended to z (Mirza & Osindero 2014). Appended, not
    multiplied: a product let training shrink z's scale per digit (measured: most embedding
    entries fell below 0.3), which cost sample diversity.
    """

    def __init__(self, d_noise: int = 100, width: int = 32, n_classes: int = 0, n_codes: int = 0):
        super().__init__()
        if n_classes and n_codes:
            raise ValueError("a generator takes digit labels or a learnt code, not both")
        self.d_noise, self.n_classes, self.n_codes = d_noise, n_classes, n_codes
        self.config = {"d_noise": d_noise, "width": width, "n_classes": n_classes, "n_codes": n_codes}
        categories = n_classes or n_codes
        self.embed = nn.Embedding(categories, categories) if categories else None
        if categories:
            # p(label) for sampling, saved with the weights: the training set's digit frequencies
            # (cgan), or its clusters' (selfcond), each set by training; what "a random digit" (or
            # code) means when sampling (training.random_labels)
            self.register_buffer("label_prior", torch.full((categories,), 1 / categories))
        self.project = nn.Sequential(
            nn.Linear(d_noise + categories, 2 * width * 7 * 7, bias=False), nn.BatchNorm1d(2 * width * 7 * 7),
            nn.ReLU(), nn.Unflatten(1, (2 * width, 7, 7)))
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(),
            nn.ConvTranspose2d(width, 1, 4, stride=2, padding=1), nn.Tanh(), nn.Flatten())

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(_required(labels))], dim=1)
        return self.upsample(self.project(z))


class ConvDiscriminator(nn.Module):
    """cgan/selfcond: image [B, 784] (and labels [B]: digits if n_classes, codes if n_codes) -> logit [B].

    Two stride-2 convs (w, 2w channels) with LeakyReLU(0.2) and dropout, then a linear
    logit. When conditional, the logit gains the inner product of the features with
    the label's embedding: the projection discriminator (Miyato & Koyama 2018). With n_codes, D
    also holds the `centroids` of the training images' clusters (set by training), so that it can
    code an image itself (`code`): a selfcond D is a function of the image alone.
    """

    def __init__(self, width: int = 32, n_classes: int = 0, dropout: float = 0.0, n_codes: int = 0):
        super().__init__()
        if n_classes and n_codes:
            raise ValueError("a discriminator takes digit labels or codes, not both")
        self.n_classes, self.n_codes = n_classes, n_codes
        self.config = {"width": width, "n_classes": n_classes, "dropout": dropout, "n_codes": n_codes}
        features = 2 * width * 7 * 7
        self.features = ConvStack(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2), nn.Dropout(dropout),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.LeakyReLU(0.2), nn.Dropout(dropout),
            nn.Flatten())
        self.logit = nn.Linear(features, 1)
        categories = n_classes or n_codes
        self.embed = nn.Embedding(categories, features) if categories else None
        if self.embed is not None:
            nn.init.zeros_(self.embed.weight)  # start as the unconditional D
        if n_codes:  # in clusters.features' space, saved with the weights
            self.register_buffer("centroids", torch.zeros(n_codes, IMAGE_SIZE))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """`labels` may be left out for a selfcond D, which then codes `x` itself."""
        if self.n_codes and labels is None:
            labels = self.code(x)
        h = self.features(x)
        logit = self.logit(h).squeeze(-1)
        if self.embed is not None:
            logit = logit + (self.embed(_required(labels)) * h).sum(-1)
        return logit

    @torch.no_grad()
    def code(self, x: torch.Tensor) -> torch.Tensor:
        """The code [B] of each image: its nearest cluster centroid, in clusters.features' space."""
        if not self.n_codes:
            raise ValueError("this discriminator holds no clusters: only model selfcond codes images")
        with torch.autocast(x.device.type, enabled=False):  # the codes training gave, under bf16 too
            return clusters.assign(clusters.features(x.float()), self.centroids)


def _required(labels: torch.Tensor | None) -> torch.Tensor:
    if labels is None:
        raise ValueError("this model is conditional: pass the digits' labels")
    return labels


def init_weights(model: nn.Module) -> None:
    """The tutorial's init: xavier_normal_ for weight matrices, U(0.1, 0.2) for biases."""
    for p in model.parameters():
        if p.dim() > 1:
            nn.init.xavier_normal_(p)
        else:
            nn.init.uniform_(p, 0.1, 0.2)


GeneratorModel = Generator | ConvGenerator
DiscriminatorModel = Discriminator | ConvDiscriminator
_CLASSES = {cls.__name__: cls for cls in (Generator, Discriminator, ConvGenerator, ConvDiscriminator)}


def build_models(model: str, d_noise: int, width: int, dropout: float, device: torch.device,
                 codes: int = 0) -> tuple[GeneratorModel, DiscriminatorModel]:
    """The preset's generator and discriminator (params `model` and `codes`, validated)."""
    if model == "mlp":
        pair = Generator(d_noise, width, dropout), Discriminator(width, dropout)
    else:
        n_classes = N_CLASSES if model in CONDITIONAL else 0
        pair = (ConvGenerator(d_noise, width, n_classes, codes),
                ConvDiscriminator(width, n_classes, dropout, codes))
        # conv weights channels_last, so the convs run on NHWC feature maps: oneDNN's input-gradient
        # convolution at these shapes takes 3x as long in NCHW, and a cgan training step on CPU went
        # from 42 to 35 ms (measured on an AMD EPYC Zen 4); cuDNN prefers NHWC too
        return tuple(net.to(device, memory_format=torch.channels_last) for net in pair)
    return pair[0].to(device), pair[1].to(device)


def save_model(model: GeneratorModel | DiscriminatorModel, path: Path,
               trained: nn.Module | None = None) -> None:
    """The class, constructor arguments and weights, so the file alone rebuilds the model.

    `trained`: when `model` is an average of weights (EMA), the trained model it
    averages, kept alongside so evaluate can show what the average buys.
    """
    state = {"class": type(model).__name__, "config": model.config, "state_dict": model.state_dict()}
    if trained is not None:
        state["trained_state_dict"] = trained.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_model(path: Path, device: torch.device, *,
               trained: bool = False) -> GeneratorModel | DiscriminatorModel | None:
    """A model saved by save_model, in eval mode on `device`. `trained=True`: the trained
    weights behind an EMA average instead, or None when the file holds no average."""
    state = torch.load(path, map_location=device, weights_only=True)
    key = "trained_state_dict" if trained else "state_dict"
    if key not in state:
        return None
    model = _CLASSES[state["class"]](**state["config"]).to(device)
    model.load_state_dict(state[key])
    return model.eval()
