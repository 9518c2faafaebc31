"""UNIT's loss terms as plain functions; train.py combines them with the paper's weights.
Each computes in float32, also on the bfloat16 outputs of an autocast forward (--amp bf16)."""
import torch
import torch.nn.functional as F


def gan_loss(logits, real: bool):
    """Binary cross-entropy on discriminator logits against an all-real or all-fake target."""
    logits = logits.float()
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def kl_loss(mu):
    """KL(q(z|x) || N(0, I)) for q = N(mu, I), up to a constant: UNIT uses mean(mu^2)."""
    return mu.float().pow(2).mean()


def l1_loss(x, y):
    """Mean absolute error (the poster's 'MAE loss for the reconstruction stream')."""
    return (x.float() - y.float()).abs().mean()


def charbonnier_loss(x, y, eps=1e-3):
    """Charbonnier penalty rho(r) = sqrt(r^2 + eps^2), averaged: a smooth L1."""
    return torch.sqrt((x.float() - y.float()).pow(2) + eps * eps).mean()
