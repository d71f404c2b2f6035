import torch

from mnist_gan.models import Discriminator, Generator, Linear, load_model, save_model


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


def test_onednn_linear_equals_nn_linear_in_value_and_gradients():
    torch.manual_seed(0)
    fast, reference = Linear(50, 30), torch.nn.Linear(50, 30)
    reference.load_state_dict(fast.state_dict())
    x1 = torch.randn(64, 50, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    grad = torch.randn(64, 30)
    fast(x1).backward(grad)
    reference(x2).backward(grad)
    torch.testing.assert_close(fast(x1), reference(x2))
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(fast.weight.grad, reference.weight.grad)
    torch.testing.assert_close(fast.bias.grad, reference.bias.grad)


def test_generator_exports_for_mlflow_pt2_format(tmp_path):
    # MLflow 3 logs PyTorch models with torch.export; the oneDNN path must not end up in the graph
    generator = Generator().eval()
    exported = torch.export.export(generator, (torch.zeros(2, 100),))
    torch.export.save(exported, tmp_path / "generator.pt2")
    z = torch.randn(2, 100)
    torch.testing.assert_close(torch.export.load(tmp_path / "generator.pt2").module()(z), generator(z))
