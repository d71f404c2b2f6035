import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnist_gan import cpu_dropout
from mnist_gan.cpu_dropout import Activation

REPO = Path(__file__).resolve().parents[1]


def _keep(kernels, shape, p, seed, dtype=torch.float32):
    """The kernel's mask times 1 / (1 - p): dropout of ones."""
    keep = torch.ones(shape, dtype=dtype)
    kernels.dropout_(keep, seed, p)
    return keep


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_keeps_one_minus_p_and_scales_like_nn_dropout(dropout_kernels, p):
    keep = _keep(dropout_kernels, (1000, 1000), p, seed=12345)
    assert sorted(keep.unique().tolist()) == [0.0, pytest.approx(1 / (1 - p))]
    dropped = (keep == 0).flatten().float()
    assert dropped.mean().item() == pytest.approx(p, abs=0.002)
    assert keep.mean().item() == pytest.approx(1.0, abs=0.005)  # E[dropout(x)] = x, as nn.Dropout
    # 4 neighbours share a 64-bit draw, and draws follow each other: all must be independent
    for lag in (1, 2, 3, 4, 5):
        both = (dropped[:-lag] * dropped[lag:]).mean().item()
        assert both == pytest.approx(p * p, abs=0.003), lag


def test_masks_differ_by_seed_and_repeat_for_the_same_seed(dropout_kernels):
    a, b = _keep(dropout_kernels, (300, 300), 0.5, seed=1), _keep(dropout_kernels, (300, 300), 0.5, seed=2)
    assert torch.equal(a, _keep(dropout_kernels, (300, 300), 0.5, seed=1))
    assert ((a == 0) == (b == 0)).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_the_mask_does_not_depend_on_the_number_of_threads(dropout_kernels):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _keep(dropout_kernels, (513, 301), 0.1, seed=7)  # odd sizes: a partial block at the end
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, _keep(dropout_kernels, (513, 301), 0.1, seed=7))


def test_seeds_come_from_torchs_global_rng():
    torch.manual_seed(3)
    first = cpu_dropout.draw_seed(), cpu_dropout.draw_seed()
    torch.manual_seed(3)
    assert (cpu_dropout.draw_seed(), cpu_dropout.draw_seed()) == first
    assert first[0] != first[1]


def test_bf16_output_is_rounded_to_nearest_even_and_keeps_nan_and_inf(dropout_kernels):
    # float32: 0 or 4/3, which bf16 values times it must round
    keep = _keep(dropout_kernels, (64, 64), 0.25, seed=5)
    y = (torch.randn(64, 64) * 100).bfloat16()
    kept = keep.flatten().nonzero().flatten()[:3]
    y.view(-1)[kept] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.bfloat16)
    out = y.clone()
    dropout_kernels.dropout_(out, 5, 0.25)
    expected = (y.float() * keep).bfloat16()  # torch's rounding: to nearest, ties to even
    on = keep > 0
    torch.testing.assert_close(out.float()[on], expected.float()[on], rtol=0, atol=0, equal_nan=True)
    assert (out[keep == 0] == 0).all()
    assert out.view(-1)[kept[0]].isnan() and out.view(-1)[kept[1:]].isinf().all()


def test_backward_is_the_gradient_of_dropout_of_the_activation(dropout_kernels):
    # out = act(h) * keep; d out / d h from out alone, for every activation of the table
    torch.manual_seed(0)
    h = torch.randn(40, 30, requires_grad=True)
    grad = torch.randn(40, 30)
    keep = _keep(dropout_kernels, (40, 30), 0.3, seed=9)
    activations = {Activation.none: lambda v: v, Activation.relu: torch.relu, Activation.tanh: torch.tanh,
                   Activation.leaky_relu: lambda v: torch.nn.functional.leaky_relu(v, 0.2)}
    assert set(activations) == set(Activation)
    for activation, act in activations.items():
        expected, = torch.autograd.grad(act(h) * keep, h, grad)
        out = act(h.detach()).contiguous()
        dropout_kernels.dropout_(out, 9, 0.3)
        got = dropout_kernels.dropout_backward(grad, out, 9, 0.3, activation, 0.2)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=activation.name)


def test_the_forward_applies_the_activation_before_the_mask(dropout_kernels):
    # a convolution's output gets its activation from the kernel: act(h) * keep, in place
    h = torch.randn(40, 30)
    keep = _keep(dropout_kernels, (40, 30), 0.3, seed=9)
    for activation, act in {Activation.leaky_relu: lambda v: torch.nn.functional.leaky_relu(v, 0.2),
                            Activation.relu: torch.relu, Activation.tanh: torch.tanh}.items():
        out = h.clone()
        dropout_kernels.dropout_(out, 9, 0.3, activation, 0.2)
        torch.testing.assert_close(out, act(h) * keep, rtol=1e-6, atol=1e-6, msg=activation.name)


def test_a_channels_last_map_is_masked_in_memory_order_and_its_gradient_in_the_same(dropout_kernels):
    """A conv's channels_last output: element i of memory gets draw i, and the backward takes a
    gradient of any layout (a Flatten's backward gives a contiguous one) to the output's."""
    h = torch.randn(8, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    out = h.clone(memory_format=torch.preserve_format)
    dropout_kernels.dropout_(out, 3, 0.4, Activation.leaky_relu, 0.2)
    keep = _keep(dropout_kernels, (8, 5, 5, 6), 0.4, seed=3).permute(0, 3, 1, 2)  # memory order
    torch.testing.assert_close(out, torch.nn.functional.leaky_relu(h, 0.2) * keep)
    grad = torch.randn(8, 6, 5, 5)  # contiguous: another layout than out's
    got = dropout_kernels.dropout_backward(grad, out, 3, 0.4, Activation.leaky_relu, 0.2)
    same_layout = dropout_kernels.dropout_backward(grad.contiguous(memory_format=torch.channels_last),
                                                   out, 3, 0.4, Activation.leaky_relu, 0.2)
    expected = grad * keep * torch.where(h > 0, 1.0, 0.2)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(same_layout, expected)


def test_the_kernels_activations_are_the_python_tables():
    assert cpu_dropout._cflags()[-1] == "-DMNIST_GAN_ACTIVATIONS=none=0,relu=1,leaky_relu=2,tanh=3"


def test_an_activation_not_in_the_table_is_an_error(dropout_kernels):
    out = torch.ones(4, 6)
    with pytest.raises(RuntimeError, match=r"no activation numbered 4 \(mnist_gan.cpu_dropout.Activation"):
        dropout_kernels.dropout_backward(torch.ones(4, 6), out, 1, 0.1, len(Activation), 0.0)


def test_a_failed_build_means_no_kernel_and_a_warning(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpp_extension, "load_inline", no_compiler)
    cpu_dropout.kernels.cache_clear()
    try:
        assert cpu_dropout.kernels() is None
    finally:
        cpu_dropout.kernels.cache_clear()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "could not build the fused CPU dropout kernel, so on CPU the nets train with their plain modules: "
        "the same model and weights, but with nn.Dropout's masks instead of the kernel's, so results "
        "are not bit-identical to the fused path's, and slower: no C++ compiler"]


def test_building_leaves_path_and_logging_as_they_were():
    """A fresh process, as a user's, with the environment's ninja not on PATH (not activated):
    importing changes nothing, and the build runs the pip package's ninja, not a system-wide one
    of another version that would take this process's build for stale and rebuild it; then PATH
    and torch's cpp_extension logger, whose import-time CUDA warning it mutes, are as they were."""
    script = (
        "import logging, os\n"
        "path = os.environ['PATH']\n"
        "from mnist_gan import cpu_dropout, models\n"
        "imported = os.environ['PATH'] == path\n"
        "built = cpu_dropout.kernels() is not None\n"
        "level = logging.getLogger('torch.utils.cpp_extension').level\n"
        "print(imported, built, os.environ['PATH'] == path, level)\n"
    )
    built = cpu_dropout.kernels()  # by this process: the build the fresh one must find up to date
    log = Path(built.__file__).with_name(".ninja_log") if built is not None else None
    before = log.read_text() if log else None
    # the environment's bin/ (pip's ninja) off PATH; a system-wide ninja (/usr/bin, beside the
    # compiler) may stay
    venv_bin = Path(sys.executable).parent
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if Path(d) != venv_bin)
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PATH": path}, cwd=REPO,
                            capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", str(built is not None), "True", "0"]
    assert "No CUDA runtime" not in result.stderr
    if log:
        assert log.read_text() == before  # nothing rebuilt


def test_bad_tensors_get_a_clear_error(dropout_kernels):
    with pytest.raises(RuntimeError, match=r"dense CPU tensor \(contiguous in some memory format\)"):
        dropout_kernels.dropout_(torch.ones(4, 12)[:, ::2], 1, 0.1)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        dropout_kernels.dropout_(torch.ones(4, 6, dtype=torch.float64), 1, 0.1)


def test_each_torch_installation_gets_a_build_of_its_own(monkeypatch):
    """Two environments (two .venv) compile against different torch headers: with one build folder
    they would rebuild it in turn, each load waiting on the other's compiler."""
    name = cpu_dropout._build_name("source", ["-O3"])
    assert cpu_dropout._build_name("source", ["-O3"]) == name  # the same everything: the same build
    monkeypatch.setattr(torch, "__file__", "/another/venv/torch/__init__.py")
    assert cpu_dropout._build_name("source", ["-O3"]) != name
