"""Model shapes for every flag combination, one optimisation step per variant, attention placements, loss
functions."""
import itertools
import math

import numpy as np
import pytest
import torch

from train import LOSS_NAMES, Config, make_optimizers, train_step
from unit.attention import SelfAttention
from unit.losses import STRUCT_EPS, charbonnier_loss, d_loss, g_loss, gan_loss, kl_loss, l1_loss, structure_loss
from unit.model import PLACES, UNIT, Discriminator, attn_name, attn_places, size_ok

def one_step(model, opt_g, opt_d, x_a, x_b, cfg):
    """train.py's step outside its loop (no DDP; latent noise from torch's global RNG) -> losses dict."""
    losses = train_step(model, model.generator_side(), model.discriminator_side(), opt_g, opt_d, x_a, x_b,
                        lambda k: None, cfg)
    return dict(zip(LOSS_NAMES, losses.tolist()))


# each place alone, the poster's 'both', and all three at once
ATTNS = ("none", "encoder", "generator", "discriminator", "both", "encoder+generator+discriminator")
COMBOS = list(itertools.product(ATTNS, (False, True), (1, 3)))


@pytest.mark.parametrize("attn,sn,channels", COMBOS)
def test_shapes_at_poster_size(attn, sn, channels):
    """Full poster widths at 304x256 on the meta device (shapes only, no arithmetic)."""
    model = UNIT(channels=channels, width=64, attn=attn, sn=sn).to("meta")
    seen = []  # (module, input shape) of every attention block
    for m in model.modules():
        if isinstance(m, SelfAttention):
            m.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    x = torch.empty(2, channels, 304, 256, device="meta")
    mu = model.encode(x, "a")
    assert mu.shape == (2, 512, 76, 64)
    y = model.decode(mu, "b")
    assert y.shape == (2, channels, 304, 256)
    assert model.dis_a(y).shape == (2, 1, 9, 7)
    places = attn_places(attn)
    expect = ([(2, 512, 76, 64)] if "encoder" in places else []) + \
             ([(2, 256, 152, 128)] if "generator" in places else []) + \
             ([(2, 256, 38, 32)] if "discriminator" in places else [])
    assert seen == expect   # N = 76*64 = 4864 in the encoder, 152*128 = 19456 in the generator, 38*32 = 1216 in D


def test_attention_placements_compose_and_keep_the_old_layer_names():
    """--attn: places joined by '+' in any order, one spelling recorded; 'both' = encoder+generator with the
    same state_dict keys as ever (checkpoints of 'none', 'encoder', 'generator' and 'both' keep loading);
    the discriminator's block sits after its third conv and moves the later layers' indices only when there."""
    assert attn_name("discriminator+encoder") == "encoder+discriminator"
    assert attn_name("generator+encoder") == attn_name("both") == "both"
    assert attn_places("none") == () and attn_places("both") == ("encoder", "generator")
    assert attn_places("+".join(reversed(PLACES))) == PLACES
    for bad in ("", "encoder+", "encoder+encoder", "none+encoder", "decoder", "Encoder", "both+discriminator"):
        with pytest.raises(ValueError, match="joined by"):
            attn_places(bad)
    blocks = lambda attn: [n for n, m in UNIT(width=4, attn=attn).named_modules() if isinstance(m, SelfAttention)]
    assert blocks("both") == blocks("encoder+generator") == ["enc_a.net.9", "enc_b.net.9", "gen_a.net.5", "gen_b.net.5"]
    assert blocks("discriminator") == ["dis_a.net.6", "dis_b.net.6"]
    keys = lambda attn: [k for k in UNIT(width=4, attn=attn).state_dict() if k.startswith("dis_a.")]
    assert keys("both") == keys("none") and "dis_a.net.10.weight" in keys("none")
    assert "dis_a.net.11.weight" in keys("discriminator") and "dis_a.net.6.gamma" in keys("discriminator")


def test_shared_layers_are_shared():
    model = UNIT(width=4)
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("enc_shared.") for n in names) and any(n.startswith("gen_shared.") for n in names)
    # encode a / b go through the same enc_shared object: changing it changes both
    x = torch.randn(1, 1, 64, 64)
    before_a, before_b = model.encode(x, "a").detach(), model.encode(x, "b").detach()
    with torch.no_grad():
        for p in model.enc_shared.parameters():
            p.add_(0.1)
    assert not torch.equal(model.encode(x, "a"), before_a)
    assert not torch.equal(model.encode(x, "b"), before_b)


def test_latent_noise_only_in_training():
    model = UNIT(width=4)
    mu = torch.zeros(2, 32, 4, 4)
    model.eval()
    assert torch.equal(model.sample_z(mu), mu)
    model.train()
    z = model.sample_z(mu)
    assert 0.7 < z.std().item() < 1.3   # N(0, I) noise around mu


def test_spectral_norm_on_every_conv():
    model = UNIT(width=4, attn="encoder+generator+discriminator", sn=True)
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert convs and all(hasattr(m, "parametrizations") for m in convs)
    assert hasattr(model.dis_b.net[6].f, "parametrizations")      # the discriminator's attention 1x1s too
    # after some power iterations the largest singular value of a weight is ~1
    conv = model.dis_a.net[0]
    for _ in range(30):
        conv(torch.randn(1, 1, 8, 8))
    w = conv.weight.reshape(conv.weight.shape[0], -1)
    assert torch.linalg.matrix_norm(w, ord=2).item() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("attn,sn,charbonnier,channels",
                         [(a, s, c, ch) for a in ATTNS for s in (False, True) for c in (False, True)
                          for ch in (1, 3) if (s == c) or a == "none"])
def test_one_step_per_variant(attn, sn, charbonnier, channels):
    torch.manual_seed(0)
    cfg = {**Config().__dict__, "attn": attn, "sn": sn, "charbonnier": charbonnier, "channels": channels}
    model = UNIT(channels=channels, width=4, attn=attn, sn=sn)
    opt_g, opt_d = make_optimizers(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x_a, x_b = torch.rand(2, channels, 64, 64) * 2 - 1, torch.rand(2, channels, 64, 64) * 2 - 1
    losses = one_step(model, opt_g, opt_d, x_a, x_b, cfg)
    assert all(math.isfinite(v) for v in losses.values()), losses
    changed = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"enc_a", "enc_b", "enc_shared", "gen_shared", "gen_a", "gen_b", "dis_a", "dis_b"}


def test_losses_against_hand_computed_values():
    x = torch.tensor([0.0, 1.0, -2.0, 0.5])
    y = torch.tensor([0.0, 0.0, 0.0, 0.0])
    assert l1_loss(x, y).item() == pytest.approx((0 + 1 + 2 + 0.5) / 4)
    eps = 0.1
    want = (math.sqrt(0 + eps**2) + math.sqrt(1 + eps**2) + math.sqrt(4 + eps**2) + math.sqrt(0.25 + eps**2)) / 4
    assert charbonnier_loss(x, y, eps).item() == pytest.approx(want, rel=1e-6)
    assert kl_loss(x).item() == pytest.approx((0 + 1 + 4 + 0.25) / 4)
    logits = torch.tensor([0.0, 2.0, -1.0])
    sig = [1 / (1 + math.exp(-v)) for v in (0.0, 2.0, -1.0)]
    assert gan_loss(logits, True).item() == pytest.approx(-sum(math.log(s) for s in sig) / 3, rel=1e-6)
    assert gan_loss(logits, False).item() == pytest.approx(-sum(math.log(1 - s) for s in sig) / 3, rel=1e-6)
    # the three GAN losses on real logits r and fake logits f
    r, f = [0.5, 3.0, -1.0], [0.0, 2.0, -1.0]
    rt, ft = torch.tensor(r), torch.tensor(f)
    sr, sf = [1 / (1 + math.exp(-v)) for v in r], [1 / (1 + math.exp(-v)) for v in f]
    want = {"bce": (-sum(map(math.log, sr)) / 3 - sum(math.log(1 - v) for v in sf) / 3, -sum(map(math.log, sf)) / 3),
            "lsgan": (sum((v - 1) ** 2 for v in r) / 3 + sum(v * v for v in f) / 3, sum((v - 1) ** 2 for v in f) / 3),
            "hinge": (sum(max(0, 1 - v) for v in r) / 3 + sum(max(0, 1 + v) for v in f) / 3, -sum(f) / 3)}
    for kind, (wd, wg) in want.items():
        assert d_loss(rt, ft, kind).item() == pytest.approx(wd, rel=1e-6), kind
        assert g_loss(ft, kind).item() == pytest.approx(wg, rel=1e-6), kind
    with pytest.raises(ValueError):
        d_loss(rt, ft, "wgan")


def test_patch_discriminator_heads_and_losses():
    """--d-patch: each D gives two logit maps, the whole-image one (unchanged, so old checkpoints load and D's forward
    is what it was) and a 1x1 head on its H/8 features whose logits see a 15x15-pixel patch each (three 3x3 convs of
    stride 2: 1 + 2 + 4 + 8 = 15); the GAN losses of a list are the sums of its maps' losses."""
    torch.manual_seed(0)
    plain, patch = UNIT(width=4, down=1), UNIT(width=4, down=1, d_patch=True)
    assert set(patch.state_dict()) - set(plain.state_dict()) == {f"dis_{d}.patch.{p}" for d in "ab" for p in ("weight", "bias")}
    patch.load_state_dict({**plain.state_dict(), **{k: v for k, v in patch.state_dict().items() if ".patch." in k}})
    x = torch.rand(2, 1, 112, 96, dtype=torch.float64) * 2 - 1
    patch.double(), plain.double()
    whole, local = patch.dis_a.judge(x)
    assert whole.shape == (2, 1, 3, 2) and local.shape == (2, 1, 14, 12)
    torch.testing.assert_close(whole, plain.dis_a(x), rtol=0, atol=0)
    assert [m.shape for m in plain.dis_a.judge(x)] == [(2, 1, 3, 2)]
    # the receptive field of one patch logit, from its gradient: a 15x15 window ending 8 * 5 + 1 px from the corner
    x.requires_grad_(True)
    patch.dis_b.judge(x)[1][0, 0, 5, 4].backward()
    rows, cols = (x.grad[0, 0].abs() > 0).nonzero(as_tuple=True)
    assert (rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()) == (8 * 5 - 7, 8 * 5 + 7, 8 * 4 - 7, 8 * 4 + 7)
    r, f = [torch.randn(2, 1, 3, 2), torch.randn(2, 1, 14, 12)], [torch.randn(2, 1, 3, 2), torch.randn(2, 1, 14, 12)]
    for kind in ("bce", "lsgan", "hinge"):
        torch.testing.assert_close(d_loss(r, f, kind), d_loss(r[0], f[0], kind) + d_loss(r[1], f[1], kind))
        torch.testing.assert_close(g_loss(f, kind), g_loss(f[0], kind) + g_loss(f[1], kind))
    with pytest.raises(ValueError):
        d_loss(r, f[:1])
    # a training step trains the patch heads too (the D step's loss reaches them)
    model, cfg = UNIT(width=4, d_patch=True), {**Config().__dict__, "d_patch": True}
    before = model.dis_a.patch.weight.detach().clone()
    losses = one_step(model, *make_optimizers(model, cfg), torch.rand(2, 1, 64, 64) * 2 - 1, torch.rand(2, 1, 64, 64) * 2 - 1, cfg)
    assert all(math.isfinite(v) for v in losses.values()) and not torch.equal(model.dis_a.patch.weight, before)


def test_multiscale_discriminator():
    """--d-scales k: each D is k discriminators with weights of their own, the i-th judging the image average-pooled
    (3x3 windows, stride 2, the mean over the pixels inside the image) i times; their logit maps are listed after the
    full-size D's, whose maps are unchanged. The size rule (unit.model.size_ok) is the one the convs impose."""
    torch.manual_seed(0)
    plain, two = UNIT(width=4, down=1), UNIT(width=4, down=1, d_scales=2)
    extra = set(two.state_dict()) - set(plain.state_dict())
    assert extra == {f"dis_{d}.coarse.{k}" for d in "ab" for k in plain.dis_a.state_dict()}
    two.load_state_dict({**plain.state_dict(), **{k: v for k, v in two.state_dict().items() if k in extra}})
    two.double(), plain.double()
    x = torch.rand(2, 1, 112, 96, dtype=torch.float64) * 2 - 1
    full, half = two.dis_a.judge(x)
    torch.testing.assert_close(full, plain.dis_a(x), rtol=0, atol=0)
    # the half-size image, pooled here in numpy: NaN outside the image, the mean of each window's numbers
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=np.nan)
    pooled = np.nanmean(np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3)), axis=(-2, -1))
    torch.testing.assert_close(half, two.dis_a.coarse(torch.from_numpy(pooled[:, :, ::2, ::2].copy())))
    assert half.shape == (2, 1, 1, 1)
    both = UNIT(width=4, down=1, d_patch=True, d_scales=2)     # patch heads at both scales: 4 maps
    assert [m.shape[2:] for m in both.dis_b.judge(x.float())] == [(3, 2), (14, 12), (1, 1), (7, 6)]
    for n in (64, 68, 128, 132):
        for k in (1, 2, 3):
            try:
                Discriminator(1, 4, scales=k).judge(torch.zeros(1, 1, n, n))
                runs = True
            except RuntimeError:                                  # "Kernel size can't be greater than actual input"
                runs = False
            assert size_ok(n, n, k) == runs, (n, k)
    # a training step trains the coarse D too
    model, cfg = UNIT(width=4, d_scales=2), {**Config().__dict__, "d_scales": 2}
    before = [p.detach().clone() for p in model.dis_b.coarse.parameters()]
    losses = one_step(model, *make_optimizers(model, cfg), torch.rand(2, 1, 68, 68) * 2 - 1,
                      torch.rand(2, 1, 68, 68) * 2 - 1, cfg)
    assert all(math.isfinite(v) for v in losses.values())
    assert all(not torch.equal(p, b) for p, b in zip(model.dis_b.coarse.parameters(), before))


def test_structure_loss_against_a_float64_recomputation():
    """1 - mean rho^2 with rho^2 = cov^2 / (var var + eps) in SSIM's 11x11 Gaussian window (sigma 1.5) over the valid
    pixels, recomputed here with scipy's Gaussian filter in float64; 0 for any affine map of the input, inverted
    contrast included, and near 1 for unrelated noise."""
    from scipy import ndimage
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 32, 40, generator=g) * 2 - 1
    y = (0.6 * x - 0.5 * torch.rand(2, 1, 32, 40, generator=g)).clamp(-1, 1)     # related, not affine
    def reference(a, b):
        out = []
        for a2, b2 in zip((a.numpy()[:, 0] + 1) / 2, (b.numpy()[:, 0] + 1) / 2):
            f = lambda v: ndimage.gaussian_filter(v.astype(np.float64), 1.5, truncate=5 / 1.5)[5:-5, 5:-5]
            ma, mb = f(a2), f(b2)
            va, vb, cab = f(a2 * a2) - ma * ma, f(b2 * b2) - mb * mb, f(a2 * b2) - ma * mb
            out.append(cab ** 2 / (va * vb + STRUCT_EPS))
        return 1 - np.mean(out)
    assert structure_loss(x, y).item() == pytest.approx(reference(x, y), abs=1e-5)
    assert 0.05 < structure_loss(x, y).item() < 0.9                # partly related: between
    assert structure_loss(x, -x).item() < 1e-3 and structure_loss(x, 0.3 * x + 0.2).item() < 1e-3
    assert structure_loss(x, torch.rand(2, 1, 32, 40, generator=g) * 2 - 1).item() > 0.9
    x3 = x.expand(2, 3, 32, 40)                                    # RGB: the channels' mean
    assert structure_loss(x3, y).item() == pytest.approx(structure_loss(x, y).item(), abs=1e-6)
    xs, ys = torch.cat([x, y, -x], 1), torch.cat([y, x, x], 1)     # --context: each slice of a stack on its own
    want = np.mean([reference(xs[:, c:c + 1], ys[:, c:c + 1]) for c in range(3)])
    assert structure_loss(xs, ys, stack=True).item() == pytest.approx(want, abs=1e-5)


def _with_backend(monkeypatch, name):
    import unit.backends as A
    monkeypatch.setenv("UNIT_ATTN", name)
    assert A.backend() == name


@pytest.mark.parametrize("other", ["fused", "sdpa"])
def test_backends_agree_inside_the_model(monkeypatch, other):
    """Same weights, same input: outputs and every gradient match between UNIT_ATTN=naive and
    UNIT_ATTN=fused / sdpa (gamma set non-zero, else attention would not touch the output), with attention
    in every place: the translation, then the target's discriminator on it."""
    torch.manual_seed(0)
    model = UNIT(width=8, attn="encoder+generator+discriminator").double()
    for m in model.modules():
        if isinstance(m, SelfAttention):
            m.gamma.data.fill_(0.7)
    x = torch.rand(2, 1, 64, 48, dtype=torch.float64) * 2 - 1
    out = {}
    for name in ("naive", other):
        _with_backend(monkeypatch, name)
        model.zero_grad()
        y = model.decode(model.encode(x, "a"), "b")
        logits = model.dis_b(y)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().add(logits.sum()).backward()
        out[name] = (y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(out[other][0], out["naive"][0], rtol=1e-10, atol=1e-12)
    assert out[other][1].keys() == out["naive"][1].keys()
    for n in out["naive"][1]:
        torch.testing.assert_close(out[other][1][n], out["naive"][1][n], rtol=1e-8, atol=1e-10, msg=n)


def test_training_step_with_the_fused_op(monkeypatch):
    _with_backend(monkeypatch, "fused")
    torch.manual_seed(0)
    cfg = {**Config().__dict__, "attn": "encoder+generator+discriminator", "sn": True, "charbonnier": True}
    model = UNIT(width=4, attn=cfg["attn"], sn=True)
    opt_g, opt_d = make_optimizers(model, cfg)
    x_a, x_b = torch.rand(2, 1, 64, 64) * 2 - 1, torch.rand(2, 1, 64, 64) * 2 - 1
    for _ in range(2):   # step 2: gamma is non-zero after step 1, so attention is in the graph
        losses = one_step(model, opt_g, opt_d, x_a, x_b, cfg)
    assert all(math.isfinite(v) for v in losses.values())
    gammas = [m.gamma.item() for m in model.modules() if isinstance(m, SelfAttention)]
    assert len(gammas) == 6 and all(g != 0 for g in gammas)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA is not available to torch"))])
def test_spectral_norm_fp32_is_torchs_outside_autocast_and_fp32_inside(device):
    """unit.model's spectral norm gives torch's spectral_norm bit for bit (same init, buffers, keys),
    and under a bf16 autocast its power iteration and sigma stay float32: the u buffer it leaves is
    the one an fp32 forward leaves. (CUDA is the case that matters: there autocast runs torch.mv,
    the power iteration's product, in bf16; CPU autocast does not.)"""
    import torch.nn as nn
    from torch.nn.utils.parametrizations import spectral_norm
    from unit.model import apply_spectral_norm
    torch.manual_seed(0)
    ours = apply_spectral_norm(nn.Sequential(nn.Conv2d(4, 6, 3), nn.ConvTranspose2d(6, 5, 3)))
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Conv2d(4, 6, 3), nn.ConvTranspose2d(6, 5, 3))
    theirs = nn.Sequential(spectral_norm(theirs[0]), spectral_norm(theirs[1]))
    ours, theirs = ours.to(device), theirs.to(device)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(2, 4, 9, 9, device=device)
    assert torch.equal(ours(x), theirs(x))                          # training mode: one power iteration each
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)
    with torch.autocast(device, torch.bfloat16):
        y = ours(x)
    theirs(x)                                                       # the same iteration in fp32
    assert y.dtype == torch.bfloat16
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_resize_upsampling_draws_no_checkerboard():
    """On a constant input, a stride-2 K3 transposed conv gives even and odd output pixels different
    numbers of kernel taps, so its output alternates with period 2 (Odena et al. 2016); nearest x2 + conv3
    gives a constant. Measured with unit.metrics.checkerboard on the interior (borders see the padding)."""
    from unit.metrics import checkerboard
    from unit.model import upsample2
    torch.manual_seed(0)
    x = torch.ones(1, 8, 16, 16)
    for how, lo, hi in (("deconv", 0.5, 1.0), ("resize", 0.0, 1e-9)):
        y = upsample2(8, 4, how)(x).detach()[0, :, 2:-2, 2:-2]          # (4, 28, 28)
        assert y.shape == (4, 28, 28)
        score = checkerboard(y)
        assert ((score >= lo) & (score <= hi)).all(), (how, score)


@pytest.mark.parametrize("attn", ["generator", "both"])
def test_resize_upsampling_with_sn_and_attention_round_trips(attn, tmp_path):
    from unit import checkpoint
    torch.manual_seed(0)
    m = UNIT(width=4, attn=attn, sn=True, upsample="resize").eval()
    x = torch.rand(2, 1, 64, 48) * 2 - 1
    y = m.translate(x, "a")
    assert y.shape == x.shape
    assert isinstance(m.gen_a.net[5], SelfAttention)                   # after the first upsampling, as deconv
    cfg = {**checkpoint.ADDED_KEYS, "channels": 1, "width": 4, "attn": attn, "sn": True, "upsample": "resize"}
    m2 = checkpoint.build_model(cfg).eval()
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.translate(x, "a"), y)
    with pytest.raises(RuntimeError):                                  # a deconv model cannot take these weights
        checkpoint.build_model({**cfg, "upsample": "deconv"}).load_state_dict(m.state_dict())
    before = {k: v for k, v in cfg.items() if k != "upsample"}          # a config from before --upsample, as
    old = checkpoint.build_model({**checkpoint.ADDED_KEYS, **before})   # checkpoint.load() completes it: deconv
    assert isinstance(old.gen_a.net[3], torch.nn.ConvTranspose2d)
