"""The tutorial's vanilla GAN: two MLPs over flattened 28x28 images.

The discriminator returns *logits*; D(x) = sigmoid(logit). The model is the
tutorial's (its last layer is Linear(256, 1) -> Sigmoid), with the sigmoid moved
into the losses so they can be computed in a numerically stable form.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mnist_gan.files import atomic_path

IMAGE_SIZE = 28 * 28

# PyTorch sends CPU fp32 matmuls to MKL, which on AMD CPUs takes a slower non-AVX-512 path;
# oneDNN (bundled with PyTorch) computes the same products about 2x faster there. No public
# API routes nn.Linear's training matmuls to oneDNN, hence the small autograd Function below.
_onednn_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)


class _OneDnnLinearFn(torch.autograd.Function):
    """y = x @ w.T + b with every product (forward and backward) computed by oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _onednn_linear(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = _onednn_linear(grad, weight.t(), None, "none", [], "") if ctx.needs_input_grad[0] else None
        grad_w = _onednn_linear(grad.t(), x.t(), None, "none", [], "") if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """nn.Linear (same parameters and state_dict) that uses oneDNN for CPU fp32 batches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # eager CPU fp32 only: torch.export/compile (e.g. MLflow's pt2 model format) trace F.linear
        if (_onednn_linear is not None and x.device.type == "cpu" and x.dtype == torch.float32
                and x.dim() == 2 and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling()):
            return _OneDnnLinearFn.apply(x, self.weight, self.bias)
        return super().forward(x)


class Generator(nn.Module):
    """z [B, d_noise] -> image [B, 784] in [-1, 1]."""

    def __init__(self, d_noise: int = 100, d_hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.d_noise = d_noise
        self.net = nn.Sequential(
            Linear(d_noise, d_hidden), nn.ReLU(), nn.Dropout(dropout),
            Linear(d_hidden, d_hidden), nn.ReLU(), nn.Dropout(dropout),
            Linear(d_hidden, IMAGE_SIZE), nn.Tanh(),
        )
        init_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    """image [B, 784] -> logit [B] of the probability that the image is real."""

    def __init__(self, d_hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            Linear(IMAGE_SIZE, d_hidden), nn.LeakyReLU(0.01), nn.Dropout(dropout),
            Linear(d_hidden, d_hidden), nn.LeakyReLU(0.01), nn.Dropout(dropout),
            Linear(d_hidden, 1),
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


def save_model(model: Generator | Discriminator, path: Path) -> None:
    """Weights plus the constructor arguments, so the file alone rebuilds the model."""
    if isinstance(model, Generator):
        config = {"kind": "generator", "d_noise": model.d_noise, "d_hidden": model.net[0].out_features,
                  "dropout": model.net[2].p}
    else:
        config = {"kind": "discriminator", "d_hidden": model.net[0].out_features, "dropout": model.net[2].p}
    with atomic_path(path) as tmp:
        torch.save({"config": config, "state_dict": model.state_dict()}, tmp)


def load_model(path: Path, device: torch.device) -> Generator | Discriminator:
    """A model saved by save_model, in eval mode on `device`."""
    state = torch.load(path, map_location=device, weights_only=True)
    config = dict(state["config"])
    cls = {"generator": Generator, "discriminator": Discriminator}[config.pop("kind")]
    model = cls(**config).to(device)
    model.load_state_dict(state["state_dict"])
    return model.eval()
