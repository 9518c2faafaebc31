"""UNIT (Liu, Breuel, Kautz 2017) as in the poster's table, with optional SAGAN attention and
spectral norm. Channel counts are the poster's at width=64; --width scales all of them.

Shapes at 304x256 (H x W), width w=64, one image:
  Encoder  x (1, ch, 304, 256) -> conv7 (64) -> conv3/2 (128, 152x128) -> conv3/2 (256, 76x64)
           -> 3 ResBlocks (512, the first projects 256->512) [-> SelfAttention(512), N = 4864]
           -> shared ResBlock -> mu (1, 512, 76, 64)
  Generator z -> shared ResBlock -> 3 ResBlocks (512) -> dconv3/2 (256, 152x128) [-> SelfAttention(256),
           N = 19456] -> dconv3/2 (128, 304x256) -> dconv1 (ch) -> tanh
           (--upsample resize: each dconv3/2 becomes nearest x2 + conv3, same channels)
  Discriminator x -> conv3/2 (64, 152x128) -> conv3/2 (128, 76x64) -> conv3/2 (256, 38x32)
           [-> SelfAttention(256), N = 1216] -> conv3/2 (512, 19x16) -> conv3/2 (1024, 10x8)
           -> conv2 (1) -> logits (1, 1, 9, 7)

Where the attention blocks go is --attn: places joined by '+' (attn_places() reads it). With --down 1 the
encoder's second stride-2 conv has stride 1 and the generator's first upsampling is a conv3 at the same size:
the latent is H/2 x W/2 (152x128 here), four times the positions, and keeps the fine detail a translation
needs (the poster's --down 2 halves it twice).
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

from unit.attention import SelfAttention

PLACES = ("encoder", "generator", "discriminator")      # where a SelfAttention can go (in both domains' copies)
UPSAMPLE_CHOICES = ("deconv", "resize")
DOWN_CHOICES = (1, 2)                                   # stride-2 convs per encoder: the latent is H/2**down
# each submodule of a UNIT that may hold attention: its place and the domain whose images it sees
PLACE_OF = {"enc_a": "encoder T1w", "enc_b": "encoder T2w", "gen_a": "generator T1w", "gen_b": "generator T2w",
            "dis_a": "discriminator T1w", "dis_b": "discriminator T2w"}


def size_ok(h, w, d_scales=1):
    """The model halves the image twice and its discriminator five times: sides must be multiples
    of 4 (so the generator gives the input size back) and at least 64; with d_scales k the coarsest
    discriminator judges the image halved k - 1 times, which must keep more than 32 px a side."""
    return h % 4 == 0 and w % 4 == 0 and min(h, w) >= 64 and min(h, w) > 32 * 2 ** (d_scales - 1)


def place_of(layer):
    """The place of a UNIT layer from its name in named_modules(): 'dis_b.net.6' -> 'discriminator T2w'."""
    return PLACE_OF[layer.split(".")[0]]


def attn_places(attn):
    """The places of an --attn value, in PLACES order: 'discriminator+encoder' -> ('encoder', 'discriminator'),
    'none' -> (), 'both' (the poster's word) -> ('encoder', 'generator'). ValueError on anything else."""
    if attn == "none":
        return ()
    if attn == "both":
        return ("encoder", "generator")
    parts = str(attn).split("+")
    if any(p not in PLACES for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"attn {attn!r}: expected none, both, or places from {', '.join(PLACES)} joined by '+', "
                         f"each once (e.g. encoder+discriminator)")
    return tuple(p for p in PLACES if p in parts)


def attn_name(attn):
    """The one spelling of a placement, as configs, run folders and checkpoints record it: the places in PLACES
    order, 'both' for encoder+generator (the poster's word, and what checkpoints of it have always said)."""
    places = attn_places(attn)
    return "both" if places == ("encoder", "generator") else "+".join(places) or "none"


def attn_arg(text):
    """attn_name() as argparse's type= (train.py --attn, bench.py --attn): its error said as is."""
    try:
        return attn_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def lrelu():
    return nn.LeakyReLU(0.2, inplace=False)


class ResBlock(nn.Module):
    """conv3-IN-LeakyReLU-conv3-IN plus a skip (1x1 conv when the width changes). Instance norm
    follows UNIT's released code; the poster's table only says RESBLK(N512, K3, S1)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, 1, 1), nn.InstanceNorm2d(cout), lrelu(),
            nn.Conv2d(cout, cout, 3, 1, 1), nn.InstanceNorm2d(cout))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.skip(x) + self.body(x)


class Encoder(nn.Module):
    """Domain-specific part of an encoder: image (B, ch, H, W) -> features (B, 8w, H/4, W/4), or (B, 8w, H/2,
    W/2) with down=1 (its third conv keeps the size)."""

    def __init__(self, channels, w, attn, down=2):
        super().__init__()
        layers = [nn.Conv2d(channels, w, 7, 1, 3), lrelu(),
                  nn.Conv2d(w, 2 * w, 3, 2, 1), lrelu(),
                  nn.Conv2d(2 * w, 4 * w, 3, 2 if down == 2 else 1, 1), lrelu(),
                  ResBlock(4 * w, 8 * w), ResBlock(8 * w, 8 * w), ResBlock(8 * w, 8 * w)]
        if attn:
            layers.append(SelfAttention(8 * w))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def upsample2(cin, cout, how):
    """x2 upsampling: 'deconv' is the poster's DCONV(K3, S2), a transposed convolution whose kernel (3) is
    not divisible by its stride (2), so output pixels of even and odd positions get different numbers
    of kernel taps: the checkerboard of Odena et al. 2016. 'resize' is nearest-neighbour x2 then a 3x3
    convolution with the same channel counts, which treats every output pixel alike (as MUNIT does)."""
    if how == "deconv":
        return nn.ConvTranspose2d(cin, cout, 3, 2, 1, output_padding=1)
    if how == "resize":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, 1, 1))
    raise ValueError(f"upsample must be one of {UPSAMPLE_CHOICES}, got {how!r}")


class Generator(nn.Module):
    """Domain-specific part of a generator: features (B, 8w, H/4, W/4) -> image (B, ch, H, W) in [-1, 1]; with
    down=1 from (B, 8w, H/2, W/2), its first upsampling a conv3 that keeps the size."""

    def __init__(self, channels, w, attn, upsample="deconv", down=2):
        super().__init__()
        first = upsample2(8 * w, 4 * w, upsample) if down == 2 else nn.Conv2d(8 * w, 4 * w, 3, 1, 1)
        layers = [ResBlock(8 * w, 8 * w), ResBlock(8 * w, 8 * w), ResBlock(8 * w, 8 * w), first, lrelu()]
        if attn:
            layers.append(SelfAttention(4 * w))
        layers += [upsample2(4 * w, 2 * w, upsample), lrelu(),
                   nn.ConvTranspose2d(2 * w, channels, 1, 1, 0), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, h):
        return self.net(h)


class Discriminator(nn.Module):
    """PatchGAN-style: image -> (B, 1, h, w) logits (the GAN loss turns them into probabilities or
    margins). With attn, a SelfAttention after the third conv (on the H/8 x W/8 grid: N = 1216 positions
    at 304x256), as SAGAN puts attention in its discriminator as well as its generator (--attn discriminator).
    With patch, a second head judges the same H/8 features with a 1x1 conv: a logit per 15x15-pixel
    receptive field (14x12 of them at 112x96), next to the whole-image logits (2x2 px of the last conv's grid).
    With scales k > 1 (MUNIT's multi-scale D), a copy with weights of its own (patch head and attention too)
    judges the image average-pooled to half size, and so on: k discriminators, from full size to 1/2^(k-1)."""

    def __init__(self, channels, w, attn=False, patch=False, scales=1):
        super().__init__()
        layers, cin = [], channels
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w, 16 * w)):
            layers += [nn.Conv2d(cin, cout, 3, 2, 1), lrelu()]
            if attn and i == 2:
                layers.append(SelfAttention(cout))
            if i == 2:
                self.tap = len(layers)          # the H/8 features end here (net[:tap])
            cin = cout
        layers.append(nn.Conv2d(cin, 1, 2, 1, 0))
        self.net = nn.Sequential(*layers)
        self.patch = nn.Conv2d(4 * w, 1, 1) if patch else None
        self.coarse = Discriminator(channels, w, attn, patch, scales - 1) if scales > 1 else None

    def judge(self, x):
        """The logit maps the GAN losses sum over: [whole-image (B, 1, h, w)], with patch [..., (B, 1, H/8, W/8)],
        and with scales > 1 the coarser copies' maps after these (the image pooled 3x3, stride 2: (B, ch, H/2, W/2))."""
        if self.patch is None:
            out = [self.net(x)]
        else:
            f = self.net[:self.tap](x)
            out = [self.net[self.tap:](f), self.patch(f)]
        if self.coarse is not None:
            out += self.coarse.judge(F.avg_pool2d(x, 3, 2, 1, count_include_pad=False))
        return out

    def forward(self, x):
        """The whole-image logits (B, 1, h, w)."""
        return self.net(x)


class SpectralNormFP32(_SpectralNorm):
    """torch's spectral norm (Miyato et al. 2018; one power iteration per training forward) with the
    power iteration and sigma kept in float32 under autocast: on CUDA autocast runs torch.mv in
    bf16, which would round the u, v estimates every step. Same buffers (_u, _v) and state_dict
    keys as torch.nn.utils.parametrizations.spectral_norm, so checkpoints are interchangeable."""

    def forward(self, weight):
        if not torch.amp.is_autocast_available(weight.device.type):   # e.g. the meta device
            return super().forward(weight)
        with torch.autocast(weight.device.type, enabled=False):
            return super().forward(weight.float())


def apply_spectral_norm(module):
    """Spectral norm on every conv / transposed conv inside `module` (including attention's 1x1s)."""
    for name, child in module.named_children():
        if isinstance(child, (nn.Conv2d, nn.ConvTranspose2d)):
            # the output-channel dim: 0 for Conv2d weights (out, in, k, k), 1 for ConvTranspose2d (in, out, k, k)
            dim = 1 if isinstance(child, nn.ConvTranspose2d) else 0
            parametrize.register_parametrization(child, "weight", SpectralNormFP32(child.weight, dim=dim))
        else:
            apply_spectral_norm(child)
    return module


class UNIT(nn.Module):
    """Two VAE-GANs sharing the last encoder block and the first generator block (the shared
    latent space). Domain a = T1w, domain b = T2w. Images in [-1, 1]."""

    def __init__(self, channels=1, width=64, attn="none", sn=False, upsample="deconv", down=2, d_patch=False,
                 d_scales=1):
        super().__init__()
        if down not in DOWN_CHOICES:
            raise ValueError(f"down must be one of {DOWN_CHOICES}, got {down!r}")
        places = attn_places(attn)
        w, ea, ga, da = width, "encoder" in places, "generator" in places, "discriminator" in places
        self.width, self.down = width, down
        self.enc_a, self.enc_b = Encoder(channels, w, ea, down), Encoder(channels, w, ea, down)
        self.enc_shared = ResBlock(8 * w, 8 * w)     # produces mu
        self.gen_shared = ResBlock(8 * w, 8 * w)
        self.gen_a, self.gen_b = (Generator(channels, w, ga, upsample, down), Generator(channels, w, ga, upsample, down))
        self.dis_a, self.dis_b = (Discriminator(channels, w, da, d_patch, d_scales),
                                  Discriminator(channels, w, da, d_patch, d_scales))
        if sn:
            apply_spectral_norm(self)

    def encode(self, x, domain):
        """mu of q(z|x): (B, 8w, H/4, W/4) (H/2, W/2 with down=1)."""
        return self.enc_shared((self.enc_a if domain == "a" else self.enc_b)(x))

    def decode(self, z, domain):
        return (self.gen_a if domain == "a" else self.gen_b)(self.gen_shared(z))

    def sample_z(self, mu, noise=None):
        """z = mu + N(0, I) while training (the VAE with unit variance of UNIT), z = mu in eval.
        noise: the N(0, I) draw, shaped like mu (train.py draws it reproducibly); None = randn_like."""
        if not self.training:
            return mu
        return mu + (torch.randn_like(mu) if noise is None else noise)

    def code_shape(self, x):
        """Shape of the latent code of images x (B, ch, H, W): (B, 8w, H/4, W/4) (H/2, W/2 with down=1)."""
        f = 2 ** self.down
        return (x.shape[0], 8 * self.width, x.shape[2] // f, x.shape[3] // f)

    def cycle(self, x_a, x_b, noise=(None,) * 4):
        """The passes of a generator step: both VAEs (x -> z -> x), both translations and both
        cycles (x_a -> x_ab -> x_aba). noise: 4 draws shaped like the codes, for z_a, z_b, z_ab, z_ba.
        Returns a dict of the codes mu_* and images x_* the losses need."""
        mu_a, mu_b = self.encode(x_a, "a"), self.encode(x_b, "b")                # (B, 8w, H/4, W/4)
        z_a, z_b = self.sample_z(mu_a, noise[0]), self.sample_z(mu_b, noise[1])
        x_aa, x_ba = self.decode(z_a, "a"), self.decode(z_b, "a")
        x_bb, x_ab = self.decode(z_b, "b"), self.decode(z_a, "b")
        mu_ab, mu_ba = self.encode(x_ab, "b"), self.encode(x_ba, "a")
        x_aba = self.decode(self.sample_z(mu_ab, noise[2]), "a")
        x_bab = self.decode(self.sample_z(mu_ba, noise[3]), "b")
        return dict(mu_a=mu_a, mu_b=mu_b, mu_ab=mu_ab, mu_ba=mu_ba, x_aa=x_aa, x_bb=x_bb, x_ab=x_ab,
                    x_ba=x_ba, x_aba=x_aba, x_bab=x_bab)

    def discriminate(self, x_a, x_b):
        """The logit maps of D_a on x_a and of D_b on x_b: two lists (Discriminator.judge), each of (B, 1, h, w)."""
        return self.dis_a.judge(x_a), self.dis_b.judge(x_b)

    @torch.no_grad()
    def translate(self, x, src):
        """Deterministic translation a->b (src='a') or b->a (src='b'), using mu."""
        return self.decode(self.encode(x, src), "b" if src == "a" else "a")

    def generator_side(self):
        """Encoders, generators and shared blocks as one module whose forward is cycle()."""
        return Part(self, ("enc_a", "enc_b", "enc_shared", "gen_shared", "gen_a", "gen_b"), self.cycle)

    def discriminator_side(self):
        """Both discriminators as one module whose forward is discriminate()."""
        return Part(self, ("dis_a", "dis_b"), self.discriminate)

    def generator_params(self):
        return [p for n, p in self.named_parameters() if not n.startswith("dis_")]

    def discriminator_params(self):
        return list(self.dis_a.parameters()) + list(self.dis_b.parameters())


class Part(nn.Module):
    """Some of a UNIT's submodules (the same objects, so the same parameters and buffers) with one of
    the UNIT's methods as forward(). DistributedDataParallel syncs the gradients of one module
    after one forward and one backward; a UNIT has two such modules, stepped by two optimizers:
    the generator side (one cycle() per G step) and the discriminators (one discriminate() per D
    step). The UNIT's own state_dict, and so the checkpoint format, does not change."""

    def __init__(self, unit, names, method):
        super().__init__()
        for name in names:
            self.add_module(name, getattr(unit, name))
        self.method = method

    def forward(self, *args):
        return self.method(*args)
