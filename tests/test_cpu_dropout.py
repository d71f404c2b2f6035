import pytest
import torch

from mnist_gan import cpu_dropout


def _keep(shape, p, seed, dtype=torch.float32):
    """The kernel's mask times 1 / (1 - p): dropout of ones."""
    keep = torch.ones(shape, dtype=dtype)
    cpu_dropout.kernels().dropout_(keep, seed, p)
    return keep


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_keeps_one_minus_p_and_scales_like_nn_dropout(p):
    keep = _keep((1000, 1000), p, seed=12345)
    assert sorted(keep.unique().tolist()) == [0.0, pytest.approx(1 / (1 - p))]
    dropped = (keep == 0).flatten().float()
    assert dropped.mean().item() == pytest.approx(p, abs=0.002)
    assert keep.mean().item() == pytest.approx(1.0, abs=0.005)  # E[dropout(x)] = x, as nn.Dropout
    # 4 neighbours share a 64-bit draw, and draws follow each other: all must be independent
    for lag in (1, 2, 3, 4, 5):
        both = (dropped[:-lag] * dropped[lag:]).mean().item()
        assert both == pytest.approx(p * p, abs=0.003), lag


def test_masks_differ_by_seed_and_repeat_for_the_same_seed():
    a, b = _keep((300, 300), 0.5, seed=1), _keep((300, 300), 0.5, seed=2)
    assert torch.equal(a, _keep((300, 300), 0.5, seed=1))
    assert ((a == 0) == (b == 0)).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_the_mask_does_not_depend_on_the_number_of_threads():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _keep((513, 301), 0.1, seed=7)  # odd sizes: a partial block at the end
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, _keep((513, 301), 0.1, seed=7))


def test_seeds_come_from_torchs_global_rng():
    torch.manual_seed(3)
    first = cpu_dropout.draw_seed(), cpu_dropout.draw_seed()
    torch.manual_seed(3)
    assert (cpu_dropout.draw_seed(), cpu_dropout.draw_seed()) == first
    assert first[0] != first[1]


def test_bf16_output_is_rounded_to_nearest_even_and_keeps_nan_and_inf():
    keep = _keep((64, 64), 0.25, seed=5)  # float32: 0 or 4/3, which bf16 values times it must round
    y = (torch.randn(64, 64) * 100).bfloat16()
    kept = keep.flatten().nonzero().flatten()[:3]
    y.view(-1)[kept] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.bfloat16)
    out = y.clone()
    cpu_dropout.kernels().dropout_(out, 5, 0.25)
    expected = (y.float() * keep).bfloat16()  # torch's rounding: to nearest, ties to even
    on = keep > 0
    torch.testing.assert_close(out.float()[on], expected.float()[on], rtol=0, atol=0, equal_nan=True)
    assert (out[keep == 0] == 0).all()
    assert out.view(-1)[kept[0]].isnan() and out.view(-1)[kept[1:]].isinf().all()


def test_backward_is_the_gradient_of_dropout_of_the_activation():
    # out = act(h) * keep; d out / d h from out alone, for every activation
    torch.manual_seed(0)
    h = torch.randn(40, 30, requires_grad=True)
    grad = torch.randn(40, 30)
    keep = _keep((40, 30), 0.3, seed=9)
    activations = {"none": lambda v: v, "relu": torch.relu, "tanh": torch.tanh,
                   "leaky_relu": lambda v: torch.nn.functional.leaky_relu(v, 0.2)}
    for name, act in activations.items():
        expected, = torch.autograd.grad(act(h) * keep, h, grad)
        out = act(h.detach()).contiguous()
        cpu_dropout.kernels().dropout_(out, 9, 0.3)
        got = cpu_dropout.kernels().dropout_backward(grad, out, 9, 0.3, name, 0.2)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)


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
    assert "no C++ compiler" in caplog.text and "plain nn.Sequential" in caplog.text


def test_bad_tensors_get_a_clear_error():
    with pytest.raises(RuntimeError, match="contiguous CPU tensor"):
        cpu_dropout.kernels().dropout_(torch.ones(4, 6).t(), 1, 0.1)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpu_dropout.kernels().dropout_(torch.ones(4, 6, dtype=torch.float64), 1, 0.1)
