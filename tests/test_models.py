import copy
import io
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from mnist_gan import cpu_dropout, models
from mnist_gan.cpu_dropout import Activation
from mnist_gan.models import (
    FUSED_DTYPES,
    MLP,
    ConvDiscriminator,
    ConvGenerator,
    Discriminator,
    Generator,
    _post_op,
    load_model,
    save_model,
)


def test_shapes_and_output_range():
    generator, discriminator = Generator(), Discriminator()
    images = generator(torch.randn(5, 100))
    assert images.shape == (5, 784)
    assert images.min() >= -1 and images.max() <= 1
    assert discriminator(images).shape == (5,)


def test_layers_are_the_tutorials():
    generator, discriminator = Generator(), Discriminator()
    shapes = [tuple(m.weight.shape) for m in generator.net if isinstance(m, torch.nn.Linear)]
    assert shapes == [(256, 100), (256, 256), (784, 256)]
    shapes = [tuple(m.weight.shape) for m in discriminator.net if isinstance(m, torch.nn.Linear)]
    assert shapes == [(256, 784), (256, 256), (1, 256)]
    assert [m.p for m in generator.net if isinstance(m, torch.nn.Dropout)] == [0.1, 0.1]
    assert all(m.negative_slope == 0.01 for m in discriminator.net if isinstance(m, torch.nn.LeakyReLU))


def test_init_ranges():
    torch.manual_seed(0)
    for model in (Generator(), Discriminator()):
        for name, p in model.named_parameters():
            if p.dim() == 1:
                assert p.min() >= 0.1 and p.max() <= 0.2, name
            else:
                fan_out, fan_in = p.shape
                expected_std = (2 / (fan_in + fan_out)) ** 0.5  # xavier_normal_
                assert abs(p.std().item() - expected_std) < 0.2 * expected_std, name
                assert abs(p.mean().item()) < 0.1 * expected_std + 0.01, name


def test_save_and_load_rebuild_the_same_model(tmp_path):
    generator = Generator(d_noise=8, width=16, dropout=0.2).eval()
    save_model(generator, tmp_path / "g.pt")
    loaded = load_model(tmp_path / "g.pt", torch.device("cpu"))
    z = torch.randn(3, 8)
    assert isinstance(loaded, Generator) and not loaded.training
    assert torch.equal(loaded(z), generator(z))


@pytest.fixture(params=[True, False], ids=["mkl", "onednn"])
def fp32_library(request, monkeypatch):
    """Each fp32 test of the fused layers with its products in MKL (Intel CPUs) and in oneDNN (others)."""
    monkeypatch.setattr(models, "MKL_FP32", request.param)
    return request.param


def _forward_backward(forward, model: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    model.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    out = forward(x)
    out.backward(grad)
    return out, x.grad, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("net", ["generator", "discriminator"])
def test_fused_path_equals_nn_sequential_in_value_and_gradients(net, fp32_library):
    # eval mode: no dropout, so the fused oneDNN layers must compute exactly nn.Sequential's function
    torch.manual_seed(0)
    model = (Generator(d_noise=100) if net == "generator" else Discriminator()).net.eval()
    x = torch.randn(64, model[0].in_features)
    grad = torch.randn(64, model[-2 if net == "generator" else -1].out_features)
    fused = _forward_backward(model, model, x, grad)
    plain = _forward_backward(lambda x: nn.Sequential.forward(model, x), model, x, grad)
    for got, expected in zip([fused[0], fused[1], *fused[2]], [plain[0], plain[1], *plain[2]], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


NO_FUSED_BF16 = pytest.mark.skipif(torch.bfloat16 not in FUSED_DTYPES,
                                   reason="no oneDNN bf16 inner product on this CPU (needs AVX-512 or AMX)")


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=NO_FUSED_BF16)])
@pytest.mark.parametrize("activation", [nn.ReLU(), nn.LeakyReLU(0.01), nn.Tanh()])
def test_fused_dropout_layer_applies_its_mask_forward_and_backward(dropout_kernels, activation, dtype,
                                                                  fp32_library):
    torch.manual_seed(0)
    linear = nn.Linear(20, 30)
    block = MLP(linear, activation, nn.Dropout(0.25)).train()
    x, grad = torch.randn(50, 20), torch.randn(50, 30)
    # the mask, read off the block itself: the same seed draws the same mask, and with the linear
    # layer's output set to 1 every kept unit is activation(1) / 0.75 != 0, every dropped one 0
    probe = MLP(nn.Linear(20, 30), activation, nn.Dropout(0.25)).train()
    with torch.no_grad():
        probe[0].weight.zero_()
        probe[0].bias.fill_(1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        torch.manual_seed(1)
        kept = probe(x).float()
        torch.manual_seed(1)
        fused = _forward_backward(block, block, x, grad)
        keep = (kept != 0).float() / 0.75
        plain = _forward_backward(lambda x: activation(linear(x)) * keep, block, x, grad)
    assert fused[0].dtype == dtype
    scale = activation(torch.tensor(1.0)).item() / 0.75
    assert kept[kept != 0].tolist() == pytest.approx([scale] * int((kept != 0).sum()), rel=1e-2)
    assert (kept != 0).float().mean().item() == pytest.approx(0.75, abs=0.05)  # 1500 draws: sd 0.011
    for got, expected in zip([fused[0], fused[1], *fused[2]], [plain[0], plain[1], *plain[2]], strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        else:  # bf16 keeps ~3 digits, and its sums of products add up their rounding errors
            assert (got.float() - expected.float()).norm() < 0.02 * expected.float().norm()


def test_without_the_dropout_kernel_the_mlp_trains_as_nn_sequential(monkeypatch):
    monkeypatch.setattr(cpu_dropout, "kernels", lambda: None)  # no C++ compiler
    model = Generator(d_noise=8, width=16, dropout=0.5).net.train()
    z = torch.randn(10, 8)
    torch.manual_seed(2)
    out = model(z)
    torch.manual_seed(2)
    assert torch.equal(out, nn.Sequential.forward(model, z))
    model.eval()  # no dropout: the fused path needs no kernel
    torch.testing.assert_close(model(z), nn.Sequential.forward(model, z), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_discriminator_fuses_leaky_relu_and_dropout_on_its_feature_maps(dropout_kernels, dtype):
    """Each LeakyReLU + Dropout pair of D's features runs as one in-place kernel on the conv's
    (channels_last) output: the same forward and gradients as the modules with the kernel's masks,
    which are drawn from torch's RNG in the modules' order."""
    torch.manual_seed(0)
    d = ConvDiscriminator(width=8, dropout=0.3).train().to(memory_format=torch.channels_last)
    x = torch.randn(16, 784, requires_grad=True)

    def masks_then_modules(x):  # the pair as the modules compute it, with the kernel's mask
        h = x
        for module in d.features:
            if isinstance(module, nn.Dropout):
                keep = torch.ones_like(h)  # channels_last like h: the mask follows memory order
                dropout_kernels.dropout_(keep, cpu_dropout.draw_seed(), module.p)
                h = h * keep
            else:
                h = module(h)
        return d.logit(h).squeeze(-1)

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        torch.manual_seed(5)
        fused = _forward_backward(d, d, x, torch.ones(16))
        torch.manual_seed(5)
        plain = _forward_backward(masks_then_modules, d, x, torch.ones(16))
    assert d.features(x.detach()).is_contiguous()  # Flatten's output, from NHWC maps
    for got, expected in zip([fused[0], fused[1], *fused[2]], [plain[0], plain[1], *plain[2]], strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        else:  # the modules round act(h) and its product with the mask to bf16, the kernel once
            assert (got.float() - expected.float()).norm() < 0.02 * expected.float().norm()


def test_without_the_dropout_kernel_the_conv_discriminator_runs_its_modules(monkeypatch):
    monkeypatch.setattr(cpu_dropout, "kernels", lambda: None)
    d = ConvDiscriminator(width=8, dropout=0.5).train()
    x = torch.randn(10, 784)
    torch.manual_seed(2)
    out = d.features(x)
    torch.manual_seed(2)
    assert torch.equal(out, nn.Sequential.forward(d.features, x))


def test_mlp_rejects_what_it_cannot_fuse_and_runs_a_linear_without_bias(fp32_library):
    with pytest.raises(TypeError, match="module 1 is Sigmoid"):
        MLP(nn.Linear(4, 3), nn.Sigmoid())
    with pytest.raises(TypeError, match="module 0 is ReLU"):
        MLP(nn.ReLU(), nn.Linear(4, 3))

    class Shifted(nn.ReLU):  # a subclass computes otherwise: not fused as its base class
        def forward(self, x):
            return super().forward(x) + 1

    with pytest.raises(TypeError, match=r"^MLP takes Linear \[ReLU\|LeakyReLU\|Tanh\] \[Dropout\] blocks; "
                                        r"module 1 is Shifted\(\)$"):
        MLP(nn.Linear(4, 3), Shifted())
    with pytest.raises(TypeError, match=r"^a fused MLP block has no post-op for Sigmoid\(\); "
                                        r"it takes ReLU, LeakyReLU or Tanh$"):
        _post_op(nn.Sigmoid())
    # every activation of the kernel's table, and only those, has a module
    assert {_post_op(cls()).activation for cls in (nn.ReLU, nn.LeakyReLU, nn.Tanh)} == set(Activation) - {
        Activation.none}
    assert _post_op(None).activation == Activation.none
    torch.manual_seed(0)
    block = MLP(nn.Linear(4, 3, bias=False), nn.Tanh()).eval()
    x, grad = torch.randn(5, 4), torch.randn(5, 3)
    fused = _forward_backward(block, block, x, grad)
    plain = _forward_backward(lambda x: nn.Sequential.forward(block, x), block, x, grad)
    for got, expected in zip([fused[0], fused[1], *fused[2]], [plain[0], plain[1], *plain[2]], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [pytest.param(True, marks=NO_FUSED_BF16), False])
def test_bf16_autocast_runs_in_bf16_fused_where_onednn_has_it_else_as_the_plain_modules(monkeypatch, fused):
    if not fused:  # an AVX2-only CPU: any use of the fused layer would fail
        monkeypatch.setattr(models, "FUSED_DTYPES", (torch.float32,))
        monkeypatch.setattr(models, "_DenseFn", None)
    torch.manual_seed(0)
    model = Discriminator().net.eval()
    x = torch.randn(64, 784)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x)
        plain = nn.Sequential.forward(model, x)
    assert got.dtype == torch.bfloat16
    if fused:  # other kernels, other roundings
        torch.testing.assert_close(got.float(), plain.float(), rtol=0.05, atol=0.05)
    else:
        assert torch.equal(got, plain)


def test_the_mlp_runs_fused_exactly_where_it_can(dropout_kernels, monkeypatch):
    """Each case's values are nn.Sequential's either way (the tests above): only the calls tell
    whether the fused layers ran. One call per block, with the block's dropout p when training."""
    calls = []
    fused_apply = models._DenseFn.apply

    def recording(x, weight, bias, post_op, p):
        calls.append((x.dtype, weight.dtype, p))
        return fused_apply(x, weight, bias, post_op, p)

    monkeypatch.setattr(models._DenseFn, "apply", recording)
    model = Generator(d_noise=8, width=16, dropout=0.5).net

    def ran(x: torch.Tensor, *, training: bool = False, net: nn.Module = model) -> list[tuple]:
        calls.clear()
        net.train(training)(x)
        return list(calls)

    z, f32 = torch.randn(4, 8), torch.float32
    assert ran(z) == [(f32, f32, 0.0)] * 3
    assert ran(z, training=True) == [(f32, f32, 0.5), (f32, f32, 0.5), (f32, f32, 0.0)]
    assert ran(z.unsqueeze(0)) == []  # a batch of batches: nn.Linear's broadcasting
    assert ran(z.double(), net=copy.deepcopy(model).double()) == []  # oneDNN's are fp32 and bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = torch.bfloat16
        assert ran(z) == ([(bf16, bf16, 0.0)] * 3 if bf16 in FUSED_DTYPES else [])
    with monkeypatch.context() as patched:
        patched.setattr(cpu_dropout, "kernels", lambda: None)  # no C++ compiler
        assert ran(z) == [(f32, f32, 0.0)] * 3  # without dropout the kernel is not needed
        assert ran(z, training=True) == []
    with monkeypatch.context() as patched:
        patched.setattr(torch.compiler, "is_compiling", lambda: True)  # torch.compile traces the modules
        assert ran(z) == []
    with monkeypatch.context() as patched:
        patched.setattr(models, "_onednn_linear", None)  # a torch built without oneDNN
        assert ran(z) == []


@pytest.mark.parametrize("mkl", [True, False])
def test_fp32_products_run_in_mkl_where_it_is_the_faster_library_and_bf16_ones_in_onednn(dropout_kernels,
                                                                                        monkeypatch, mkl):
    monkeypatch.setattr(models, "MKL_FP32", mkl)
    onednn_calls = []
    onednn = models._onednn_linear

    def recording(*args):
        onednn_calls.append(args[0].dtype)
        return onednn(*args)

    monkeypatch.setattr(models, "_onednn_linear", recording)
    model = Discriminator(width=16, dropout=0.5).net.train()
    x = torch.randn(8, 784, requires_grad=True)
    model(x).sum().backward()  # 3 forward products, 3 weight gradients, 3 input gradients
    assert onednn_calls == ([] if mkl else [torch.float32] * 9)
    if torch.bfloat16 in FUSED_DTYPES:
        onednn_calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).float().sum().backward()
        assert onednn_calls == [torch.bfloat16] * 9


def test_generator_exports_with_torch_export(tmp_path):
    # torch.export traces the plain modules: the oneDNN path must not end up in the graph
    generator = Generator().eval()
    exported = torch.export.export(generator, (torch.zeros(2, 100),))
    torch.export.save(exported, tmp_path / "generator.pt2")
    z = torch.randn(2, 100)
    torch.testing.assert_close(torch.export.load(tmp_path / "generator.pt2").module()(z), generator(z))


def test_load_model_refuses_a_file_that_would_run_code(tmp_path):
    """torch.load with weights_only: a model file from elsewhere cannot execute anything on load."""
    path = tmp_path / "generator.pt"
    save_model(Generator(d_noise=4, width=8), path)
    state = torch.load(path, weights_only=True)
    torch.save(state | {"payload": os.system}, path)  # a reference to a function, called by a crafted file
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_model(path, torch.device("cpu"))


BN_DEFAULTS = "eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)"


def _layers(module: nn.Module) -> list[str]:
    """Each leaf module as torch prints it, with its place: the architecture, exactly."""
    return [f"{name}: {leaf!r}" for name, leaf in module.named_modules() if not list(leaf.children())]


def test_conv_nets_are_their_docstrings():
    """selfcond/cgan as documented in models.py: z -> 2w x 7 x 7 -> w x 14 x 14 -> 1 x 28 x 28, and back."""
    assert _layers(ConvGenerator()) == [
        "project.0: Linear(in_features=100, out_features=3136, bias=False)",
        "project.1: BatchNorm1d(3136, " + BN_DEFAULTS,
        "project.2: ReLU()",
        "project.3: Unflatten(dim=1, unflattened_size=(64, 7, 7))",
        "upsample.0: ConvTranspose2d(64, 32, kernel_size=(4, 4), stride=(2, 2), padding=(1, 1), bias=False)",
        "upsample.1: BatchNorm2d(32, " + BN_DEFAULTS,
        "upsample.2: ReLU()",
        "upsample.3: ConvTranspose2d(32, 1, kernel_size=(4, 4), stride=(2, 2), padding=(1, 1))",
        "upsample.4: Tanh()",
        "upsample.5: Flatten(start_dim=1, end_dim=-1)",
    ]
    conditional = ConvGenerator(d_noise=20, width=8, n_classes=10)
    assert _layers(conditional)[:2] == ["embed: Embedding(10, 10)",
                                        "project.0: Linear(in_features=30, out_features=784, bias=False)"]
    assert conditional.label_prior.tolist() == pytest.approx([0.1] * 10)  # uniform until training sets it
    assert _layers(ConvDiscriminator(dropout=0.3)) == [
        "features.0: Unflatten(dim=1, unflattened_size=(1, 28, 28))",
        "features.1: Conv2d(1, 32, kernel_size=(4, 4), stride=(2, 2), padding=(1, 1))",
        "features.2: LeakyReLU(negative_slope=0.2)",
        "features.3: Dropout(p=0.3, inplace=False)",
        "features.4: Conv2d(32, 64, kernel_size=(4, 4), stride=(2, 2), padding=(1, 1))",
        "features.5: LeakyReLU(negative_slope=0.2)",
        "features.6: Dropout(p=0.3, inplace=False)",
        "features.7: Flatten(start_dim=1, end_dim=-1)",
        "logit: Linear(in_features=3136, out_features=1, bias=True)",
    ]
    assert _layers(ConvDiscriminator(width=8, n_classes=10))[-1] == "embed: Embedding(10, 784)"
    # no dropout unless asked for
    assert [m.p for m in ConvDiscriminator().modules() if isinstance(m, nn.Dropout)] == [0.0, 0.0]


def test_projection_discriminator_adds_the_labels_embedding_times_the_features():
    torch.manual_seed(0)
    discriminator = ConvDiscriminator(width=4, n_classes=10).eval()
    x, labels = torch.rand(3, 784) * 2 - 1, torch.tensor([3, 3, 7])
    torch.testing.assert_close(discriminator(x, labels), discriminator.logit(discriminator.features(x))[:, 0])
    with torch.no_grad():
        discriminator.embed.weight[3] = 1.0  # class 3's logit gains the sum of the features
    h = discriminator.features(x)
    expected = discriminator.logit(h)[:, 0] + torch.tensor([1.0, 1.0, 0.0]) * h.sum(1)
    torch.testing.assert_close(discriminator(x, labels), expected)
    assert discriminator(x, labels).shape == (3,)


def test_conditional_nets_need_labels():
    for net, inputs in ((ConvGenerator(d_noise=4, width=4, n_classes=10), torch.zeros(2, 4)),
                        (ConvDiscriminator(width=4, n_classes=10), torch.zeros(2, 784))):
        with pytest.raises(ValueError, match=r"^this model is conditional: pass the digits' labels$"):
            net.eval()(inputs)


def test_the_cpu_vendor_is_proc_cpuinfos_and_empty_where_it_cannot_be_read(monkeypatch):
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    expected = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.MULTILINE)
    assert models._cpu_vendor() == (expected.group(1) if expected else "")

    def unreadable(*args, **kwargs):
        raise PermissionError("/proc/cpuinfo")

    with monkeypatch.context() as patched:
        patched.setattr("builtins.open", unreadable)
        assert models._cpu_vendor() == ""
    arm = "processor\t: 0\nmodel name\t: ARM\n"
    monkeypatch.setattr("builtins.open", lambda *args, **kwargs: io.StringIO(arm))
    assert models._cpu_vendor() == ""  # no vendor_id line: no vendor


def test_a_conv_net_takes_digit_labels_or_codes_not_both():
    with pytest.raises(ValueError, match=r"^a generator takes digit labels or a learnt code, not both$"):
        ConvGenerator(n_classes=10, n_codes=5)
    with pytest.raises(ValueError, match=r"^a discriminator takes digit labels or codes, not both$"):
        ConvDiscriminator(n_classes=10, n_codes=5)


@pytest.mark.parametrize("model", ["mlp", "cgan", "selfcond"])
def test_build_models_gives_each_net_the_params_dropout(model):
    codes = 5 if model == "selfcond" else 0
    generator, discriminator = models.build_models(model, 16, 8, 0.37, torch.device("cpu"), codes=codes)
    drop_g = [m.p for m in generator.modules() if isinstance(m, nn.Dropout)]
    drop_d = [m.p for m in discriminator.modules() if isinstance(m, nn.Dropout)]
    assert drop_d == [0.37, 0.37]
    assert drop_g == ([0.37, 0.37] if model == "mlp" else [])  # the conv G has no dropout
