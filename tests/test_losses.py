import pytest
import torch

from mnist_gan.losses import loss_d, loss_g


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(64) * 3, torch.randn(64) * 3


def test_paper_and_bce_forms_are_equal(logits):
    real, fake = logits
    torch.testing.assert_close(loss_d(real, fake, "paper"), loss_d(real, fake, "bce"))
    torch.testing.assert_close(loss_g(fake, "paper"), loss_g(fake, "bce"))


def test_paper_form_equals_the_tutorials_formula(logits):
    real, fake = logits
    p_real, p_fake = torch.sigmoid(real), torch.sigmoid(fake)
    tutorial_d = (-torch.log(p_real) - torch.log(1 - p_fake)).mean()
    tutorial_g = -torch.log(p_fake).mean()
    torch.testing.assert_close(loss_d(real, fake), tutorial_d)
    torch.testing.assert_close(loss_g(fake), tutorial_g)


@pytest.mark.parametrize("form", ["paper", "bce"])
def test_finite_when_the_discriminator_saturates(form):
    saturated = torch.tensor([-200.0, 200.0], requires_grad=True)
    # the tutorial's log(sigmoid(-200)) is log(0) = -inf; on logits it is -200
    assert torch.isinf(torch.log(torch.sigmoid(saturated.detach()))).any()
    ld, lg = loss_d(saturated, saturated, form), loss_g(saturated, form)
    assert torch.isfinite(ld) and torch.isfinite(lg)
    torch.testing.assert_close(lg, torch.tensor(100.0))  # mean of -logsigmoid([-200, 200]) = (200 + 0) / 2
    lg.backward()
    assert torch.isfinite(saturated.grad).all()
