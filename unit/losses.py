"""UNIT's loss terms as plain functions; train.py combines them with the paper's weights.
Each computes in float32, also on the bfloat16 outputs of an autocast forward (--amp bf16).

The GAN terms come in three kinds (--gan-loss), on discriminator logits (no sigmoid in the nets):
  bce    the poster's: binary cross-entropy, D pushes real -> 1 and fake -> 0, G pushes fake -> 1
         (the "non-saturating" generator loss of Goodfellow et al. 2014)
  lsgan  least squares (Mao et al. 2017), as in UNIT's released code: (real - 1)^2 + fake^2 for D,
         (fake - 1)^2 for G
  hinge  SAGAN's (Zhang et al. 2018): relu(1 - real) + relu(1 + fake) for D, -fake for G

structure_loss is not UNIT's: an opt-in term (--w-struct) that compares a translation with its own input.
"""
import torch
import torch.nn.functional as F

from unit.metrics import K2, local_stats

GAN_LOSSES = ("bce", "lsgan", "hinge")


def gan_loss(logits, real: bool):
    """Binary cross-entropy on discriminator logits against an all-real or all-fake target."""
    logits = logits.float()
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def d_loss(real, fake, kind="bce"):
    """The discriminator's loss on its logits for real images and for translated (fake) ones. Lists of logit maps
    (a discriminator with several heads, --d-patch) give the sum of each map's loss."""
    if isinstance(real, (list, tuple)):
        return sum(d_loss(r, f, kind) for r, f in zip(real, fake, strict=True))
    real, fake = real.float(), fake.float()
    if kind == "bce":
        return gan_loss(real, True) + gan_loss(fake, False)
    if kind == "lsgan":
        return (real - 1).pow(2).mean() + fake.pow(2).mean()
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    raise ValueError(f"gan loss must be one of {GAN_LOSSES}, got {kind!r}")


def g_loss(fake, kind="bce"):
    """The generator's GAN loss on the discriminator's logits for its translations (a list of logit maps: the sum)."""
    if isinstance(fake, (list, tuple)):
        return sum(g_loss(f, kind) for f in fake)
    fake = fake.float()
    if kind == "bce":
        return gan_loss(fake, True)
    if kind == "lsgan":
        return (fake - 1).pow(2).mean()
    if kind == "hinge":
        return -fake.mean()
    raise ValueError(f"gan loss must be one of {GAN_LOSSES}, got {kind!r}")


def kl_loss(mu):
    """KL(q(z|x) || N(0, I)) for q = N(mu, I), up to a constant: UNIT uses mean(mu^2)."""
    return mu.float().pow(2).mean()


def l1_loss(x, y):
    """Mean absolute error (the poster's 'MAE loss for the reconstruction stream')."""
    return (x.float() - y.float()).abs().mean()


def charbonnier_loss(x, y, eps=1e-3):
    """Charbonnier penalty rho(r) = sqrt(r^2 + eps^2), averaged: a smooth L1."""
    return torch.sqrt((x.float() - y.float()).pow(2) + eps * eps).mean()


# the floor of the local variances' product in structure_loss: SSIM's C3 = (K2 * range)^2 / 2 for a range of 1,
# squared, as the product is of two variances
STRUCT_EPS = (K2 ** 2 / 2) ** 2


def structure_loss(x, y, stack=False):
    """1 - the mean squared local correlation of x and y (B, ch, H, W) in [-1, 1] (channels averaged, or with
    stack=True each channel an image of its own: the neighbouring slices of --context): within
    SSIM's 11x11 Gaussian window at each pixel, rho^2 = cov(x, y)^2 / (var(x) var(y) + eps), on [0, 1] intensities.
    rho^2 is 1 where y is any affine function of x in the window, inverted contrast included (T1w and T2w), and 0
    where they are unrelated or x is flat (there it has no gradient: the zero background costs a constant). A
    term that asks a translation to keep its input's edges, whatever their contrast (as the squared NCC of
    registration does), with no target."""
    one = (lambda v: v.float().flatten(0, 1).unsqueeze(1)) if stack else (lambda v: v.float().mean(1, keepdim=True))
    x, y = (one(x) + 1) / 2, (one(y) + 1) / 2
    _, _, vx, vy, cxy = local_stats(x, y)
    rho2 = cxy * cxy / (vx.clamp_min(0) * vy.clamp_min(0) + STRUCT_EPS)
    return 1 - rho2.mean()
