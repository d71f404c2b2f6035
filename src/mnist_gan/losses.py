"""GAN losses from discriminator logits (D(x) = sigmoid(logit)).

Both forms equal the tutorial's values: log(sigmoid(l)) = logsigmoid(l) and
log(1 - sigmoid(l)) = logsigmoid(-l). Working on logits keeps them finite where
the tutorial's log(D) of a saturated sigmoid would give -inf.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def loss_d(logit_real: torch.Tensor, logit_fake: torch.Tensor, form: str = "paper") -> torch.Tensor:
    """Discriminator loss, -(log D(x) + log(1 - D(G(z)))).mean() (Goodfellow et al. 2014, eq. 1)."""
    if form == "paper":
        return -(F.logsigmoid(logit_real) + F.logsigmoid(-logit_fake)).mean()
    return (F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))
            + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake)))


def loss_g(logit_fake: torch.Tensor, form: str = "paper") -> torch.Tensor:
    """Non-saturating generator loss, -log D(G(z)).mean() (§3 of the paper)."""
    if form == "paper":
        return -F.logsigmoid(logit_fake).mean()
    return F.binary_cross_entropy_with_logits(logit_fake, torch.ones_like(logit_fake))

