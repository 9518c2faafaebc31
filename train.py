"""Train UNIT to translate brain MRI between T1w (domain a) and T2w (domain b).

    python train.py                                   # built-in phantom; poster settings on a GPU,
                                                      # a ~10-minute reduced run on a CPU
    python train.py --attn encoder --sn --charbonnier # the poster's best model
    python train.py --full                            # poster settings even on a CPU (slow)
    python train.py --resume runs/NAME/ckpt.pt        # continue exactly where it stopped

Defaults are the poster's (UNIT's) settings and live in one place, the Config dataclass below.
Every checkpoint is one file holding all nets, both optimizers, the resolved config, the step
and the RNG states; evaluate.py needs nothing else.
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from evaluate import CKPT_FORMAT, UserError, build_model, evaluate, from_model, load_checkpoint, to_model
from unit.data import DataError, load_prepared, prepare_phantom
from unit.losses import charbonnier_loss, gan_loss, kl_loss, l1_loss
from unit.model import ATTN_CHOICES


def opt(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class Config:
    # data and output
    data: str = opt("", "prepared dataset folder (data/prepare.py); empty = the built-in phantom, "
                        "prepared on first use under data/")
    size: str = opt("304x256", "HxW of the built-in phantom (not with --data: the data sets the size)")
    out: str = opt("", "run folder (default runs/<attn>[-sn][-cl][-rgb])")
    # model (the poster's table)
    attn: str = opt("none", "where to put SAGAN self-attention", choices=ATTN_CHOICES)
    sn: bool = opt(False, "spectral norm on every conv of encoders, generators and discriminators")
    charbonnier: bool = opt(False, "Charbonnier penalty instead of L1 for reconstruction and cycle")
    charbonnier_eps: float = opt(1e-3, "epsilon of the Charbonnier penalty sqrt(x^2 + eps^2)")
    channels: int = opt(1, "1 = grayscale, 3 = the slice repeated to RGB (the poster's RGB baseline)",
                        choices=(1, 3))
    width: int = opt(64, "channels of the first conv; all widths scale with it (poster: 64)")
    # objective (UNIT's weights) and optimiser (the poster's Adam)
    w_gan: float = opt(10.0, "weight of the GAN terms")
    w_kl: float = opt(0.1, "weight of the KL terms (codes of x_a, x_b)")
    w_rec: float = opt(100.0, "weight of image reconstruction x_aa ~ x_a, x_bb ~ x_b")
    w_kl_cyc: float = opt(0.1, "weight of the KL terms of the cycle codes")
    w_cyc: float = opt(100.0, "weight of cycle reconstruction x_aba ~ x_a, x_bab ~ x_b")
    lr: float = opt(1e-4, "Adam learning rate (both G and D)")
    beta1: float = opt(0.5, "Adam beta1")
    beta2: float = opt(0.999, "Adam beta2")
    batch_size: int = opt(8, "images per domain per step (not in the poster)")
    epochs: int = opt(100, "passes over the training slices")
    max_steps: int = opt(0, "stop (and save) after this many steps in total; 0 = no limit")
    seed: int = opt(0, "seed of weights, data order and latent noise")
    # bookkeeping
    save_epochs: str = opt("1,25,50,75,100", "epochs after which to keep a checkpoint ckpt_eNNN.pt "
                                             "(ckpt.pt, the latest, is rewritten at every save)")
    eval_every: int = opt(1, "epochs between SSIM evaluations on the test split (0 = never)")
    eval_limit: int = opt(0, "evaluate on the first N test slices only during training (0 = all)")
    log_every: int = opt(50, "steps between loss lines in metrics.jsonl")
    device: str = opt("", "cuda or cpu (default: cuda when available)")


# Without CUDA the poster's configuration is far too slow (2 cores: ~4 s per iteration already at
# 128x112 with width 16, and the poster's width 64 at 304x256 is ~100x more work), so a CPU run picks
# this reduced preset for every field not given on the command line, prints it, and --full turns it
# off. On a 2-core machine it runs ~2.7 it/s: 6 epochs of 225 iterations in about 9 minutes (README).
CPU_PRESET = dict(size="96x80", width=8, batch_size=4, epochs=6, save_epochs="2,4,6", eval_every=2)

RESUMABLE = {"epochs", "max_steps", "save_epochs", "eval_every", "eval_limit", "log_every", "device", "out"}


def parse_args(argv=None):
    """Config from the command line: given flags > CPU preset (CPU only) > Config defaults.
    Returns (config, names of the flags given, resume path or None)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        flag, kw = "--" + f.name.replace("_", "-"), dict(f.metadata)
        if f.type is bool or f.type == "bool":
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=kw["help"])
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            shown = f" (default {f.default})" if f.default != "" else ""
            p.add_argument(flag, type=typ, default=argparse.SUPPRESS, help=kw.pop("help") + shown, **kw)
    p.add_argument("--full", action="store_true", help="poster settings even without CUDA (no CPU preset)")
    p.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint (its config is used)")
    args = vars(p.parse_args(argv))
    full, resume = args.pop("full"), args.pop("resume")
    return args, full, resume


def resolve_config(given, full, resume):
    """Turn the given flags into the full Config (plain dict), plus a note on where it came from."""
    if resume:
        ckpt = load_checkpoint(resume)
        cfg = dict(ckpt["config"])
        for k, v in given.items():
            if k not in RESUMABLE and v != cfg.get(k):
                raise UserError(f"--{k.replace('_', '-')} {v} contradicts the checkpoint {resume}, which was "
                                f"trained with {cfg.get(k)!r}; drop the flag or start a new run")
        cfg.update(given)
        return cfg, ckpt, f"resumed from {resume}"
    cfg = dataclasses.asdict(Config())
    device = given.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    note = "poster settings"
    if device == "cpu" and not full:
        preset = {k: v for k, v in CPU_PRESET.items() if k not in given}
        cfg.update(preset)
        note = ("no CUDA: reduced CPU preset " + ", ".join(f"{k}={v}" for k, v in preset.items()) +
                " (pass --full for the poster configuration)")
    cfg.update(given)
    cfg["device"] = device
    return cfg, None, note


def size_ok(h, w):
    """The model halves the image twice and its discriminator five times: sides must be multiples
    of 4 (so the generator gives the input size back) and at least 64."""
    return h % 4 == 0 and w % 4 == 0 and min(h, w) >= 64


def check_config(cfg, given):
    if cfg["data"] and "size" in given:
        raise UserError("--size sets the size of the built-in phantom and cannot be combined with --data; "
                        "the prepared data decides the image size")
    try:
        h, w = (int(s) for s in str(cfg["size"]).lower().split("x"))
    except ValueError:
        raise UserError(f"--size {cfg['size']} is not HxW (e.g. 304x256)") from None
    if not size_ok(h, w):
        raise UserError(f"--size {h}x{w}: height and width must be multiples of 4 and at least 64")
    for k in ("batch_size", "epochs", "width"):
        if cfg[k] < 1:
            raise UserError(f"--{k.replace('_', '-')} must be at least 1, got {cfg[k]}")
    if not (cfg["device"] == "cpu" or cfg["device"].startswith("cuda")):
        raise UserError(f"--device {cfg['device']} is not cpu, cuda or cuda:N")
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg['device']} was given but torch sees no CUDA device; drop the flag to "
                        f"use the CPU")
    if not cfg["out"]:
        cfg["out"] = "runs/" + "-".join([cfg["attn"]] + ["sn"] * cfg["sn"] + ["cl"] * cfg["charbonnier"] +
                                        ["rgb"] * (cfg["channels"] == 3))
    return h, w


def get_data(cfg, hw):
    """The prepared dataset; the built-in phantom is prepared on first use."""
    if cfg["data"]:
        data = load_prepared(cfg["data"])
    else:
        h, w = hw
        cfg["data"] = "data/phantom" if (h, w) == (304, 256) else f"data/phantom-{h}x{w}"
        if not os.path.isdir(cfg["data"]):
            print(f"preparing the built-in phantom in {cfg['data']} (first use only; "
                  f"python data/prepare.py phantom --size {h}x{w} --out {cfg['data']} does the same)")
            prepare_phantom(cfg["data"], size=(h, w))
        data = load_prepared(cfg["data"])
    cfg["size"] = list(data.shape)
    if not size_ok(*cfg["size"]):
        raise UserError(f"{cfg['data']} has {cfg['size'][0]}x{cfg['size'][1]} slices; the model needs both sides "
                        f"multiples of 4 and at least 64: prepare it again with data/prepare.py --size")
    return data


def make_writable(out):
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to the run folder {out} ({e.strerror}); pass a writable --out") from None


def batch_indices(n, steps, batch_size, seed, epoch, domain):
    """(steps, batch_size) indices into one domain's n training slices for an epoch: a fixed
    function of (seed, epoch, domain), so a resumed run sees exactly the batches it would have
    seen. Domains are shuffled independently: UNIT never sees a pair."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 2 + (domain == "b"))
    perm = torch.randperm(n, generator=g)[: steps * batch_size]
    return perm.view(steps, batch_size).sort(dim=1).values.numpy()  # sorted rows: kinder to the memmap


def save_checkpoint(path, model, opt_g, opt_d, cfg, epoch, step, metrics):
    """Write atomically: a temp file next to the target, then rename."""
    ckpt = {"format": CKPT_FORMAT, "version": 1, "config": cfg, "epoch": epoch, "step": step,
            "model": model.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "metrics": metrics}
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def sample_grid(model, data, cfg, path, n=4):
    """PNG: rows x_a, x_ab, x_aba, x_b, x_ba, x_bab for the first n test pairs (model in eval mode)."""
    from PIL import Image
    was = model.training
    model.eval()
    with torch.no_grad():
        dev, ch = cfg["device"], cfg["channels"]
        x_a, x_b = to_model(data.test_t1[:n], ch, dev), to_model(data.test_t2[:n], ch, dev)
        x_ab, x_ba = model.translate(x_a, "a"), model.translate(x_b, "b")
        rows = [x_a, x_ab, model.translate(x_ab, "b"), x_b, x_ba, model.translate(x_ba, "a")]
        grid = torch.cat([torch.cat(list(from_model(r)), dim=1) for r in rows], dim=0)
    model.train(was)
    Image.fromarray((grid.cpu().numpy() * 255).round().astype(np.uint8)).save(path)


class Progress:
    """One status line on stderr: epoch, step, losses, it/s, ETA (a line every 30 s when not a tty)."""

    def __init__(self, total, start):
        self.total, self.start_step, self.t0, self.last = total, start, time.time(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, step, epoch, epochs, losses):
        now = time.time()
        if now - self.last < (0.5 if self.tty else 30) and step < self.total:
            return
        self.last = now
        rate = (step - self.start_step) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        msg = (f"epoch {epoch + 1}/{epochs} step {step}/{self.total} " +
               " ".join(f"{k} {v:.3f}" for k, v in losses.items()) + f" | {rate:.2f} it/s ETA {eta_s}")
        print(("\r" + msg + "\033[K") if self.tty else msg, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def done(self):
        if self.tty:
            print(file=sys.stderr)


def set_requires_grad(params, flag):
    for p in params:
        p.requires_grad_(flag)


def train_step(model, opt_g, opt_d, x_a, x_b, cfg):
    """One UNIT iteration: a discriminator step, then a generator step (encoders + generators).
    x_a: T1w batch, x_b: T2w batch, (B, ch, H, W) in [-1, 1], not paired. Returns the losses."""
    rec = (lambda x, y: charbonnier_loss(x, y, cfg["charbonnier_eps"])) if cfg["charbonnier"] else l1_loss
    d_params = model.discriminator_params()

    # D step: real vs translated, both domains.
    with torch.no_grad():
        x_ab = model.decode(model.sample_z(model.encode(x_a, "a")), "b")
        x_ba = model.decode(model.sample_z(model.encode(x_b, "b")), "a")
    loss_d = (gan_loss(model.dis_a(x_a), True) + gan_loss(model.dis_a(x_ba), False) +
              gan_loss(model.dis_b(x_b), True) + gan_loss(model.dis_b(x_ab), False))
    opt_d.zero_grad(set_to_none=True)
    (cfg["w_gan"] * loss_d).backward()
    opt_d.step()

    # G step: VAE (reconstruction + KL), GAN (fool D), cycle (reconstruction + KL).
    set_requires_grad(d_params, False)
    mu_a, mu_b = model.encode(x_a, "a"), model.encode(x_b, "b")                # (B, 8w, H/4, W/4)
    z_a, z_b = model.sample_z(mu_a), model.sample_z(mu_b)
    x_aa, x_ba = model.decode(z_a, "a"), model.decode(z_b, "a")
    x_bb, x_ab = model.decode(z_b, "b"), model.decode(z_a, "b")
    mu_ab, mu_ba = model.encode(x_ab, "b"), model.encode(x_ba, "a")
    x_aba, x_bab = model.decode(model.sample_z(mu_ab), "a"), model.decode(model.sample_z(mu_ba), "b")
    loss_gan = gan_loss(model.dis_a(x_ba), True) + gan_loss(model.dis_b(x_ab), True)
    loss_kl = kl_loss(mu_a) + kl_loss(mu_b)
    loss_rec = rec(x_aa, x_a) + rec(x_bb, x_b)
    loss_kl_cyc = kl_loss(mu_ab) + kl_loss(mu_ba)
    loss_cyc = rec(x_aba, x_a) + rec(x_bab, x_b)
    loss_g = (cfg["w_gan"] * loss_gan + cfg["w_kl"] * loss_kl + cfg["w_rec"] * loss_rec +
              cfg["w_kl_cyc"] * loss_kl_cyc + cfg["w_cyc"] * loss_cyc)
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    set_requires_grad(d_params, True)
    return {"D": loss_d.item(), "G": loss_g.item(), "gan": loss_gan.item(), "rec": loss_rec.item(),
            "cyc": loss_cyc.item(), "kl": loss_kl.item()}


def make_optimizers(model, cfg):
    betas = (cfg["beta1"], cfg["beta2"])
    return (torch.optim.Adam(model.generator_params(), lr=cfg["lr"], betas=betas),
            torch.optim.Adam(model.discriminator_params(), lr=cfg["lr"], betas=betas))


def train(cfg, data, ckpt=None):
    dev = cfg["device"]
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg).to(dev)
    opt_g, opt_d = make_optimizers(model, cfg)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if dev.startswith("cuda") and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])

    out, ch, bs = cfg["out"], cfg["channels"], cfg["batch_size"]
    n_a, n_b = len(data.train_t1), len(data.train_t2)   # differ only in unpaired PNG datasets
    n_train = min(n_a, n_b)
    if n_train < bs:
        raise UserError(f"{cfg['data']} has {n_train} training slices, fewer than --batch-size {bs}")
    steps_per_epoch = n_train // bs
    total = cfg["epochs"] * steps_per_epoch
    if cfg["max_steps"]:
        total = min(total, cfg["max_steps"])
    save_epochs = {int(e) for e in str(cfg["save_epochs"]).split(",") if e.strip()}
    n_params = [sum(p.numel() for p in ps) / 1e6 for ps in (model.generator_params(), model.discriminator_params())]
    print(f"model: {n_params[0]:.2f}M generator-side params, {n_params[1]:.2f}M discriminator params; "
          f"{n_train} training slices, {steps_per_epoch} steps/epoch, {total} steps in total")
    if cfg["attn"] != "none":
        from unit.attention import describe
        print(f"self-attention ({cfg['attn']}): {describe()}")

    stop = {"signal": None}
    def on_signal(signum, frame):
        stop["signal"] = signum
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    log = open(os.path.join(out, "metrics.jsonl"), "a")
    progress = Progress(total, step)
    last_metrics, t_start = (ckpt or {}).get("metrics"), time.time()
    model.train()
    order_epoch = None
    try:
        while step < total and stop["signal"] is None:
            epoch, i = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order_epoch = epoch
                order_a = batch_indices(n_a, steps_per_epoch, bs, cfg["seed"], epoch, "a")
                order_b = batch_indices(n_b, steps_per_epoch, bs, cfg["seed"], epoch, "b")
            x_a = to_model(data.train_t1[order_a[i]], ch, dev)          # (B, ch, H, W) in [-1, 1]
            x_b = to_model(data.train_t2[order_b[i]], ch, dev)

            losses = train_step(model, opt_g, opt_d, x_a, x_b, cfg)
            step += 1

            if not all(math.isfinite(v) for v in losses.values()):
                raise RuntimeError(f"non-finite loss at step {step}: {losses}; try a lower --lr or --sn")
            progress.update(step, epoch, cfg["epochs"], losses)
            if step % cfg["log_every"] == 0:
                log.write(json.dumps({"kind": "train", "step": step, "epoch": step / steps_per_epoch,
                                      "time": round(time.time() - t_start, 1), **losses}) + "\n")
                log.flush()

            if step % steps_per_epoch == 0 or step == total:            # end of an epoch (or of the run)
                e = math.ceil(step / steps_per_epoch)
                if cfg["eval_every"] and (e % cfg["eval_every"] == 0 or step == total):
                    res, _ = evaluate(model, data, dev, ch, limit=cfg["eval_limit"] or None)
                    last_metrics = {"kind": "eval", "step": step, "epoch": e, "n": res["n"],
                                    **{f"{k}_{c}": v for c in ("T1", "T2") for k, v in res[c].items()},
                                    "identity_ssim": res["identity"]["ssim"]}
                    log.write(json.dumps(last_metrics) + "\n")
                    log.flush()
                    progress.done()
                    print(f"epoch {e} step {step}: SSIM T1 {res['T1']['ssim']:.4f} T2 {res['T2']['ssim']:.4f} "
                          f"(identity {res['identity']['ssim']:.4f}, {res['n']} test slices)")
                    sample_grid(model, data, cfg, os.path.join(out, f"samples_e{e:03d}.png"))
                latest = os.path.join(out, "ckpt.pt")
                save_checkpoint(latest, model, opt_g, opt_d, cfg, e, step, last_metrics)
                if e in save_epochs and step % steps_per_epoch == 0:      # keep a copy, serialised once
                    kept = os.path.join(out, f"ckpt_e{e:03d}.pt")
                    shutil.copyfile(latest, kept + ".tmp")
                    os.replace(kept + ".tmp", kept)
    finally:
        progress.done()
        log.close()
        for s, h in old.items():
            signal.signal(s, h)
    if stop["signal"] is not None:
        save_checkpoint(os.path.join(out, "ckpt.pt"), model, opt_g, opt_d, cfg, step // steps_per_epoch, step,
                        last_metrics)
        print(f"interrupted ({signal.Signals(stop['signal']).name}) at step {step}: saved {out}/ckpt.pt; "
              f"continue with: python train.py --resume {out}/ckpt.pt")
        return model, 130
    print(f"done: {step} steps in {time.time() - t_start:.0f} s; checkpoint {out}/ckpt.pt; "
          f"evaluate with: python evaluate.py {out}/ckpt.pt")
    return model, 0


def main(argv=None):
    given, full, resume = parse_args(argv)
    cfg, ckpt, note = resolve_config(given, full, resume)
    hw = check_config(cfg, given) if not resume else None
    make_writable(cfg["out"])
    data = get_data(cfg, hw) if not resume else load_prepared(cfg["data"])
    print(f"config ({note}):")
    print("  " + json.dumps(cfg))
    with open(os.path.join(cfg["out"], "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    _, code = train(cfg, data, ckpt)
    return code


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
