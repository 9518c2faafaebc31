"""Train UNIT to translate brain MRI between T1w (domain a) and T2w (domain b).

    python train.py                                   # built-in phantom; poster settings on a GPU,
                                                      # a ~10-minute reduced run on a CPU
    python train.py --attn encoder --sn --charbonnier # the poster's best model
    python train.py --full                            # poster settings even on a CPU (slow)
    python train.py --resume runs/NAME/ckpt.pt        # continue exactly where it stopped (in runs/NAME)
    python train.py --amp bf16                        # forward passes in bfloat16 (autocast)
    torchrun --nproc_per_node=4 train.py --attn encoder --sn --charbonnier   # 4 GPUs, DDP

Defaults are the poster's (UNIT's) settings and live in one place, the Config dataclass below.
Every checkpoint is one file holding all nets, both optimizers, the resolved config, the step
and the RNG states (unit/checkpoint.py); evaluate.py needs nothing else.

Under torchrun each process trains on its own GPU (NCCL; gloo on the CPU) with its own
--batch-size images per domain, a share of the same (seed, epoch) batch order: the global batch
is nproc x --batch-size. Only rank 0 logs, evaluates, writes sample grids and checkpoints.

A run folder has one owner (a lock; another run's files are replaced only with --overwrite), and a crash costs at
most the steps since the last save: ckpt.pt is written at every epoch end and every --save-minutes, a signal or an
exception saves the last finished step, a NaN/Inf loss stops the run without saving (unit/runs.py says how;
docs/training.md#what-a-crash-costs).
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from unit import UserError, checkpoint, variants
from unit.checkpoint import build_model
from unit.data import load_prepared, prepare_phantom
from unit.evaluation import eval_split, evaluate, has_brain_mask, reference_scores, training_levels
from unit.figures import sample_grid
from unit.hardware import join_processes
from unit.io import release, write_text
from unit.losses import GAN_LOSSES, charbonnier_loss, d_loss, g_loss, kl_loss, l1_loss, structure_loss
from unit.model import DOWN_CHOICES, UPSAMPLE_CHOICES, attn_arg, size_ok
from unit.nifti import LAYOUT_MASK_RULE
from unit.presets import CPU_PRESET_SCANS, SN_ON_SCANS, cpu_preset, data_meta
from unit.progress import Progress
from unit.runs import Run, claim_run_folder, summary
from unit.sampling import Batches, latent_noise


def opt(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class Config:
    # data and output
    data: str = opt("", "prepared dataset folder (data/prepare.py); empty = the built-in phantom, "
                        "prepared on first use under data/")
    size: str = opt("304x256", "HxW of the built-in phantom (not with --data: the data sets the size)")
    out: str = opt("", "run folder (default runs/<attn>[-sn][-cl][-rgb][-resize][-<gan loss>])")
    # model (the poster's table)
    attn: str = opt("none", "where to put SAGAN self-attention: none, or places joined by '+' from encoder, generator, "
                            "discriminator (both = encoder+generator, the poster's word)", type=attn_arg)
    sn: bool = opt(False, "spectral norm on every conv of encoders, generators and discriminators")
    charbonnier: bool = opt(False, "Charbonnier penalty instead of L1 for reconstruction and cycle")
    charbonnier_eps: float = opt(1e-3, "epsilon of the Charbonnier penalty sqrt(x^2 + eps^2)")
    channels: int = opt(1, "1 = grayscale, 3 = the slice repeated to RGB (the poster's RGB baseline)",
                        choices=(1, 3))
    context: int = opt(0, "2.5D: each slice enters with its k neighbours on either side as channels, and every "
                          "image of the model (translations, cycles, what D judges) is such a stack of 2k+1 slices; "
                          "the middle one is scored (needs volumes prepared with --slices all; 0 = 2-D, the poster)")
    upsample: str = opt("deconv", "generator upsampling: deconv = the poster's DCONV(K3, S2), which draws a "
                                  "checkerboard; resize = nearest x2 + conv3", choices=UPSAMPLE_CHOICES)
    width: int = opt(64, "channels of the first conv; all widths scale with it (poster: 64)")
    down: int = opt(2, "stride-2 convs per encoder (x2 upsamplings per generator): 2 = the poster's latent at H/4 x W/4; "
                       "1 = a finer latent at H/2 x W/2 that keeps fine detail (4x the latent's positions)",
                    choices=DOWN_CHOICES)
    # objective (UNIT's weights) and optimiser (the poster's Adam)
    gan_loss: str = opt("bce", "GAN loss: bce (the poster's), lsgan (UNIT's released code), hinge (SAGAN's)",
                        choices=GAN_LOSSES)
    w_gan: float = opt(10.0, "weight of the GAN terms")
    d_patch: bool = opt(False, "a second head on each discriminator: a 1x1 conv on its H/8 features, a logit per 15x15-px "
                               "patch, its GAN loss added to the whole-image logits' (False = the poster's D)")
    d_scales: int = opt(1, "discriminators per domain, each on the image halved once more (average-pooled): 2 = one "
                           "at full size and one at half size, MUNIT's multi-scale D (1 = the poster's D)")
    w_kl: float = opt(0.1, "weight of the KL terms (codes of x_a, x_b)")
    w_rec: float = opt(100.0, "weight of image reconstruction x_aa ~ x_a, x_bb ~ x_b")
    w_kl_cyc: float = opt(0.1, "weight of the KL terms of the cycle codes")
    w_cyc: float = opt(100.0, "weight of cycle reconstruction x_aba ~ x_a, x_bab ~ x_b")
    w_struct: float = opt(0.0, "weight of a structure term: 1 - squared local correlation of each translation with its "
                               "own input (x_ab with x_a, x_ba with x_b; sign-free, no target), so edges survive "
                               "translation (0 = UNIT as published)")
    w_paired: float = opt(0.0, "weight of a supervised term, L1 of x_ab against the real x_b and of x_ba against x_a "
                               "(needs paired data; batches are then drawn paired): a ceiling for reference, not "
                               "UNIT, which never sees a pair (0 = UNIT as published)")
    lr: float = opt(1e-4, "Adam learning rate (G, and D unless --lr-d)")
    lr_d: float = opt(0.0, "Adam learning rate of the discriminators (0 = --lr); SAGAN's TTUR uses 4x G's")
    lr_decay: float = opt(0.0, "over this last fraction of the run both learning rates fall linearly towards 0 "
                               "(CycleGAN: 0.5; 0 = constant)")
    beta1: float = opt(0.5, "Adam beta1")
    beta2: float = opt(0.999, "Adam beta2")
    batch_size: int = opt(8, "images per domain per step (not in the poster)")
    min_brain: float = opt(0.0, "train only on slices whose brain mask covers at least this fraction of the slice "
                                "(0 = every slice)")
    epochs: int = opt(100, "passes over the training slices")
    max_steps: int = opt(0, "stop (and save) after this many steps in total; 0 = no limit")
    max_minutes: float = opt(0.0, "end the run (evaluate, save, finished) at the first step after this many minutes of "
                                  "training in total, resumed parts included; 0 = no limit")
    seed: int = opt(0, "seed of weights, data order and latent noise")
    amp: str = opt("fp32", "bf16: the G and D forward passes under torch.autocast in bfloat16 (losses, softmax "
                           "statistics, spectral norm and evaluation stay fp32)", choices=("fp32", "bf16"))
    # bookkeeping
    save_epochs: str = opt("1,25,50,75,100", "epochs after which to keep a checkpoint ckpt_eNNN.pt "
                                             "(ckpt.pt, the latest, is rewritten at every save)")
    save_minutes: float = opt(30.0, "also write ckpt.pt every this many minutes, so a crash costs at most that "
                                    "much training (0 = at epoch ends only)")
    eval_every: int = opt(1, "epochs between SSIM evaluations on the test split (0 = never)")
    eval_limit: int = opt(0, "evaluate on the first N test slices only during training (0 = all)")
    log_every: int = opt(50, "steps between loss lines in metrics.jsonl (the losses are read from the device "
                             "only then)")
    device: str = opt("", "cuda or cpu (default: cuda when available)")


RESUMABLE = {"epochs", "max_steps", "max_minutes", "save_minutes", "save_epochs", "eval_every", "eval_limit", "log_every", "device", "out", "amp"}


def parse_args(argv=None):
    """Config from the command line: given flags > CPU preset (CPU only) > Config defaults.
    Returns (the flags given, --full, the --resume path or None, --dry-run, --overwrite)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        flag, kw = "--" + f.name.replace("_", "-"), dict(f.metadata)
        if f.type is bool or f.type == "bool":
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=kw["help"])
        else:
            typ = kw.pop("type", None) or {"int": int, "float": float, "str": str}.get(f.type, f.type)
            shown = f" (default {f.default})" if f.default != "" else ""
            p.add_argument(flag, type=typ, default=argparse.SUPPRESS, help=kw.pop("help") + shown, **kw)
    p.add_argument("--full", action="store_true", help="poster settings even without CUDA (no CPU preset)")
    p.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint (its config is used), in the "
                                                    "checkpoint's own folder unless --out says otherwise")
    p.add_argument("--overwrite", action="store_true", help="use an --out folder that holds another run: deletes "
                   "that run's checkpoints (ckpt.pt, ckpt_eNNN.pt; never the one resumed from), metrics.jsonl, "
                   "sample grids and config.json first")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config as one JSON line and exit "
                                                          "(nothing is prepared, trained or written)")
    args = vars(p.parse_args(argv))
    full, resume, dry, overwrite = args.pop("full"), args.pop("resume"), args.pop("dry_run"), args.pop("overwrite")
    return args, full, resume, dry, overwrite


def resolve_config(given, full, resume, world=1):
    """Turn the given flags into the full Config (plain dict), plus a note on where it came from.
    world: the number of processes (torchrun); it is part of the config, as the global batch is."""
    if resume:
        ckpt = checkpoint.load(resume)
        cfg = dict(ckpt["config"])          # complete: load() fills keys added since (checkpoint.ADDED_KEYS)
        missing = sorted(set(dataclasses.asdict(Config())) - set(cfg))
        if missing:
            raise UserError(f"{resume} has no {', '.join(missing)} in its config and unit/checkpoint.py's ADDED_KEYS "
                            f"says nothing of what its run did; add the value(s) there")
        for k, v in given.items():
            if k not in RESUMABLE and v != cfg.get(k):
                raise UserError(f"--{k.replace('_', '-')} {v} contradicts the checkpoint {resume}, which was "
                                f"trained with {cfg.get(k)!r}; drop the flag or start a new run")
        if world != cfg["world_size"]:
            raise UserError(f"{resume} was trained by {cfg['world_size']} process(es) and this run has {world}: the "
                            f"global batch and the batch order would change; resume with torchrun "
                            f"--nproc_per_node={cfg['world_size']} (or python train.py for 1)")
        cfg.update(given)
        if "out" not in given:      # where the checkpoint is now (a copy, say), not the folder recorded in it
            cfg["out"] = os.path.dirname(resume) or "."
        return cfg, ckpt, f"resumed from {resume}, continuing in {cfg['out']}"
    cfg = dataclasses.asdict(Config())
    cfg["world_size"] = world
    device = given.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    note = "poster settings"
    if device == "cpu" and not full:
        table, what = cpu_preset(given.get("data"))     # unit/presets.py, with the reasons
        preset = {k: v for k, v in table.items() if k not in given}
        cfg.update(preset)
        shown = {k: v for k, v in preset.items() if k != "size" or not given.get("data")}  # data sets the size
        note = (f"no CUDA: reduced CPU preset for {what} " +
                ", ".join(f"{k}={v}" for k, v in shown.items()) + " (pass --full for the poster configuration)"
                + (f"; {SN_ON_SCANS}" if given.get("sn") and table is CPU_PRESET_SCANS else ""))
    cfg.update(given)
    cfg["device"] = device
    return cfg, None, note


def size_rule(d_scales):
    """unit.model.size_ok's rule in words, for the errors."""
    return "multiples of 4 and at least 64" + (f", and above {32 * 2 ** (d_scales - 1)} with --d-scales {d_scales} "
                                               f"(its coarsest D needs more than 32 px a side; --d-scales 1 takes 64)"
                                               if d_scales > 1 else "")


def check_config(cfg, given):
    if cfg["data"] and "size" in given:
        raise UserError("--size sets the size of the built-in phantom and cannot be combined with --data; "
                        "the prepared data decides the image size")
    try:
        h, w = (int(s) for s in str(cfg["size"]).lower().split("x"))
    except ValueError:
        raise UserError(f"--size {cfg['size']} is not HxW (e.g. 304x256)") from None
    for k in ("batch_size", "epochs", "width", "d_scales"):
        if cfg[k] < 1:
            raise UserError(f"--{k.replace('_', '-')} must be at least 1, got {cfg[k]}")
    if not size_ok(h, w, cfg["d_scales"]):
        raise UserError(f"--size {h}x{w}: height and width must be {size_rule(cfg['d_scales'])}")
    if cfg["w_paired"] and cfg["data"] and data_meta(cfg["data"]).get("paired") is False:
        raise UserError(f"--w-paired {cfg['w_paired']:g} compares translations with the real images of the other "
                        f"contrast, and {cfg['data']} is not paired (meta.json: paired=false); drop the flag")
    if cfg["context"] and (cfg["context"] < 0 or cfg["channels"] != 1 or not cfg["data"]
                           or data_meta(cfg["data"]).get("paired") is False):
        raise UserError(f"--context {cfg['context']} stacks a slice with its neighbours: it needs a k >= 0, "
                        f"--channels 1, and --data prepared from paired volumes (--slices all), not the phantom")
    if not (cfg["device"] == "cpu" or cfg["device"].startswith("cuda")):
        raise UserError(f"--device {cfg['device']} is not cpu, cuda or cuda:N")
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg['device']} was given but torch sees no CUDA device; drop the flag to "
                        f"use the CPU")
    if cfg["world_size"] > 1 and cfg["device"].startswith("cuda:"):
        raise UserError(f"--device {cfg['device']}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                        f"pass --device cuda (or nothing), and CUDA_VISIBLE_DEVICES to choose the GPUs")
    if not cfg["out"]:
        cfg["out"] = "runs/" + variants.name(cfg)          # e.g. runs/encoder-sn-cl
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
    # how the training slices were made, for translate.py on new scans (the checkpoint needs no data folder); levels:
    # each contrast's mean brain level over the training volumes, what translate.py --match-level moves a volume to
    m = data.meta
    cfg["prep"] = {"layout": m["layout"], "percentiles": (m.get("normalization") or {}).get("percentiles"),
                   "mask_rule": LAYOUT_MASK_RULE.get(m["layout"]), "spacing": m.get("spacing"),
                   "levels": training_levels(data) if data.paired and len(data.train_t1) else None}
    if not size_ok(*cfg["size"], cfg["d_scales"]):
        raise UserError(f"{cfg['data']} has {cfg['size'][0]}x{cfg['size'][1]} slices; the model needs both sides "
                        f"{size_rule(cfg['d_scales'])}: prepare it again with data/prepare.py --size")
    return data


def set_requires_grad(params, flag):
    for p in params:
        p.requires_grad_(flag)


LOSS_NAMES = ("D", "G", "gan", "rec", "cyc", "kl", "kl_cyc", "struct", "paired")


def train_step(model, g_side, d_side, opt_g, opt_d, x_a, x_b, noise, cfg):
    """One UNIT iteration: a discriminator step, then a generator step (encoders + generators).
    x_a: T1w batch, x_b: T2w batch, (B, ch, H, W) in [-1, 1], not paired (pairs with --w-paired). noise(k): the k-th
    latent draw of this step, shaped like the codes. model: the UNIT; g_side, d_side: its
    generator side and its discriminators (model.generator_side(), .discriminator_side()), each
    wrapped in DistributedDataParallel under torchrun. With --amp bf16 the forward passes run under
    autocast and the losses in fp32. Returns the losses (LOSS_NAMES) as one detached tensor on the
    device: nothing here waits for the GPU."""
    rec = (lambda x, y: charbonnier_loss(x, y, cfg["charbonnier_eps"])) if cfg["charbonnier"] else l1_loss
    amp = lambda: torch.autocast(x_a.device.type, torch.bfloat16, enabled=cfg["amp"] == "bf16")
    B = x_a.shape[0]

    # D step: real vs translated, both domains. Each D sees real and fake in ONE forward (concatenated),
    # as DDP expects one forward per backward; D has only per-sample layers, so this changes nothing.
    with torch.no_grad(), amp():
        x_ab = model.decode(model.sample_z(model.encode(x_a, "a"), noise(0)), "b")
        x_ba = model.decode(model.sample_z(model.encode(x_b, "b"), noise(1)), "a")
    with amp():
        d_a, d_b = d_side(torch.cat([x_a, x_ba]), torch.cat([x_b, x_ab]))     # lists of (2B, 1, h, w) logit maps
    real, fake = (lambda maps: [m[:B] for m in maps]), (lambda maps: [m[B:] for m in maps])
    loss_d = d_loss(real(d_a), fake(d_a), cfg["gan_loss"]) + d_loss(real(d_b), fake(d_b), cfg["gan_loss"])
    opt_d.zero_grad(set_to_none=True)
    (cfg["w_gan"] * loss_d).backward()
    opt_d.step()

    # G step: VAE (reconstruction + KL), GAN (fool D), cycle (reconstruction + KL). D is frozen and
    # called as the plain module: its gradients are not wanted, so its DDP wrapper stays out of it.
    set_requires_grad(model.discriminator_params(), False)
    with amp():
        o = g_side(x_a, x_b, [noise(k) for k in (2, 3, 4, 5)])                # model.cycle()
        d_ba, d_ab = model.discriminate(o["x_ba"], o["x_ab"])
    loss_gan = g_loss(d_ba, cfg["gan_loss"]) + g_loss(d_ab, cfg["gan_loss"])
    loss_kl = kl_loss(o["mu_a"]) + kl_loss(o["mu_b"])
    loss_rec = rec(o["x_aa"], x_a) + rec(o["x_bb"], x_b)
    loss_kl_cyc = kl_loss(o["mu_ab"]) + kl_loss(o["mu_ba"])
    loss_cyc = rec(o["x_aba"], x_a) + rec(o["x_bab"], x_b)
    # --w-struct only: each translation keeps its input's local structure, whatever the contrast
    stack = bool(cfg["context"])                 # --context: images are stacks of slices, compared slice by slice
    loss_struct = (structure_loss(o["x_ab"], x_a, stack) + structure_loss(o["x_ba"], x_b, stack)
                   if cfg["w_struct"] else torch.zeros((), device=x_a.device))
    # --w-paired only (a supervised reference; x_a, x_b are then pairs): the translations against the real images
    loss_paired = (l1_loss(o["x_ab"], x_b) + l1_loss(o["x_ba"], x_a) if cfg["w_paired"] else
                   torch.zeros((), device=x_a.device))
    loss_g = (cfg["w_gan"] * loss_gan + cfg["w_kl"] * loss_kl + cfg["w_rec"] * loss_rec +
              cfg["w_kl_cyc"] * loss_kl_cyc + cfg["w_cyc"] * loss_cyc + cfg["w_struct"] * loss_struct +
              cfg["w_paired"] * loss_paired)
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    set_requires_grad(model.discriminator_params(), True)
    return torch.stack([loss_d, loss_g, loss_gan, loss_rec, loss_cyc, loss_kl, loss_kl_cyc, loss_struct,
                        loss_paired]).detach()


def lr_factor(step, total, decay):
    """The learning rates' factor at step (0-based) of a run of `total` steps: 1, then over the last `decay` of
    the run a linear fall towards 0 (CycleGAN's schedule with decay = 0.5; 0 = constant). A function of the step,
    so a resumed run follows the same schedule."""
    start = total * (1 - decay)
    return 1.0 if not decay or step < start else max(0.0, (total - step) / (total - start))


def lr_of_d(cfg):
    """The discriminators' learning rate: --lr-d, or --lr when it is 0."""
    return cfg["lr_d"] or cfg["lr"]


def set_lr(opt_g, opt_d, cfg, factor):
    opt_g.param_groups[0]["lr"] = cfg["lr"] * factor
    opt_d.param_groups[0]["lr"] = lr_of_d(cfg) * factor


def make_optimizers(model, cfg):
    betas = (cfg["beta1"], cfg["beta2"])
    return (torch.optim.Adam(model.generator_params(), lr=cfg["lr"], betas=betas),
            torch.optim.Adam(model.discriminator_params(), lr=lr_of_d(cfg), betas=betas))


def build(cfg, dev, ckpt=None, world=1):
    """The model and its optimisers, restored from ckpt if given (weights, Adam states, RNG), and the two sides
    the step calls (each in DistributedDataParallel under torchrun). Returns (model, g_side, d_side, opt_g, opt_d,
    the step to start from)."""
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg).to(dev)
    opt_g, opt_d = make_optimizers(model, cfg)
    step = checkpoint.restore(ckpt, model, opt_g, opt_d, dev) if ckpt is not None else 0
    g_side, d_side = model.generator_side(), model.discriminator_side()
    if world > 1:
        # broadcast_buffers (default): each DDP forward sends rank 0's buffers, spectral norm's u and v,
        # to all ranks; they are equal anyway (the power iteration sees only weights, which DDP keeps
        # equal), so this only guards against drift. One forward per backward for each wrapper.
        ids = [torch.device(dev)] if dev.startswith("cuda") else None
        g_side, d_side = DDP(g_side, device_ids=ids), DDP(d_side, device_ids=ids)
    return model, g_side, d_side, opt_g, opt_d, step


def end_of_epoch(run, model, data, cfg, e, final, split, scored, progress):
    """After epoch e's checkpoint is written (final: the run's last): the evaluation (when due; its scores go with
    every later checkpoint) and the sample grid. Either may fail (a bug, bad data, out of memory) without costing a
    step (run.survive)."""
    if not (cfg["eval_every"] and (e % cfg["eval_every"] == 0 or final)):
        return
    dev, limit = next(model.parameters()).device, cfg["eval_limit"] or None
    if scored:
        def score():
            run.refs = run.refs or reference_scores(data, limit, split)      # the data's: computed once
            return evaluate(model, data, dev, cfg["channels"], limit=limit, refs=run.refs, split=split,
                            context=cfg["context"])[0]
        res = run.survive("the evaluation", score, progress)
        if res is not None:
            run.metrics = {"kind": "eval", "split": split, "step": run.step, "epoch": e, "n": res["n"],
                           **{f"{k}_{c}": v for c in ("T1", "T2") for k, v in res[c].items()},
                           **{f"identity_{k}": res["identity"]["T1"][k] for k in ("ssim", "ssim_mask")
                              if k in res["identity"]["T1"]}}
            run.write(run.metrics)
            progress.close()
            scores = lambda k: f"T1 {res['T1'][k]:.4f} T2 {res['T2'][k]:.4f} (identity {res['identity']['T1'][k]:.4f})"
            brain = f"brain SSIM {scores('ssim_mask')}, whole-slice " if has_brain_mask(data) else ""
            print(f"epoch {e} step {run.step}: {brain}SSIM {scores('ssim')}, {res['n']} {split} slices", flush=True)
    run.survive("the sample grid", lambda: sample_grid(model, data, cfg, os.path.join(cfg["out"], f"samples_e{e:03d}.png"),
                                                       split=split), progress)


def train(cfg, data, ckpt=None, device=None, rank=0, world=1):
    """Train (or continue) a run; returns (model, exit status). device: this process's device
    (cfg["device"], or cuda:LOCAL_RANK under torchrun); rank, world: torchrun's RANK, WORLD_SIZE.
    The loop is UNIT's: a D step and a G step per batch (train_step); around it, unit/runs.py's Run saves,
    logs and decides what a failure costs."""
    dev, lead = device or cfg["device"], rank == 0          # lead: the one process that writes
    say = print if lead else (lambda *a, **k: None)
    model, g_side, d_side, opt_g, opt_d, step = build(cfg, dev, ckpt, world)
    batches = Batches(data, cfg, dev, rank, world)          # this rank's share of each step's batch
    spe = batches.steps_per_epoch
    total = min(cfg["epochs"] * spe, cfg["max_steps"]) if cfg["max_steps"] else cfg["epochs"] * spe
    save_epochs = {int(e) for e in str(cfg["save_epochs"]).split(",") if e.strip()}
    say(summary(model, batches, total, cfg, world))
    split, scored = eval_split(cfg, data, say)
    progress = Progress(total, "step", start=step, enabled=lead, every_s=30)
    run = Run(cfg, model, opt_g, opt_d, ckpt, step, spe, LOSS_NAMES, lead, world)
    gen, noise_shape, note, stopped, status = torch.Generator(device=dev), None, None, False, 0
    model.train()
    with run.guard(progress):                               # signals, exceptions: what a crash costs
        batch = batches(step) if step < total else None
        while step < total:
            x_a, x_b = batch
            noise_shape = noise_shape or model.code_shape(x_a)
            noise = lambda k, s=step: latent_noise(gen, cfg["seed"], s, k, noise_shape, rank)
            set_lr(opt_g, opt_d, cfg, lr_factor(step, total, cfg["lr_decay"]))
            losses = train_step(model, g_side, d_side, opt_g, opt_d, x_a, x_b, noise, cfg)
            step += 1
            run.finished(step, losses)                      # notes a NaN/Inf loss without waiting for the device
            if step < total:
                batch = batches(step)                       # read and copy the next batch while the GPU works
            stopping, late, timely = run.flags()            # a signal, --max-minutes, --save-minutes
            if late and step < total:                       # the time is up: this step is the run's last
                if lead:
                    progress.write(f"--max-minutes {cfg['max_minutes']:g}: the time is up at step {step} of "
                                   f"{total}; ending the run here")
                total = progress.total = step
            epoch_end = step % spe == 0 or step == total
            if step % cfg["log_every"] == 0 or epoch_end or stopping or timely:   # the only host syncs of the loop
                vals = run.read(losses, log_line=step % cfg["log_every"] == 0)    # Diverged on a NaN/Inf loss
                note = f"epoch {math.ceil(step / spe)}/{cfg['epochs']} " + " ".join(f"{k} {v:.3f}" for k, v in vals.items())
            progress.set(step, note)                        # the losses shown are those last read
            if stopping and step < total:
                stopped = True
                break
            if lead and epoch_end:                          # end of an epoch (or of the run): save first, then the rest
                e = math.ceil(step / spe)
                run.save("end of run" if step == total else "end of epoch", epoch=e, finished=step == total)
                if e in save_epochs and step % spe == 0:
                    run.keep(e)
                end_of_epoch(run, model, data, cfg, e, step == total, split, scored, progress)
            elif lead and timely:                           # --save-minutes: a crash costs at most that much
                run.save(f"--save-minutes {cfg['save_minutes']:g}")
        if stopped:                                         # by a signal, here or on another rank
            status = run.interrupted(progress)
        if world > 1:
            dist.barrier(group=run.ctl)                     # no rank leaves before rank 0 has written
    if not stopped:
        say(f"done: {step} steps in {time.time() - run.t_start:.0f} s; checkpoint {run.latest}; "
            f"evaluate with: python evaluate.py {run.latest}" +
            ("" if scored else " --data DIR (a prepared dataset with a test split)"))
    return model, status


def main(argv=None):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    given, full, resume, dry, overwrite = parse_args(argv)
    cfg, ckpt, note = resolve_config(given, full, resume, world)
    hw = check_config(cfg, given) if not resume else None
    if dry:
        if cfg["data"] and not resume:                  # the data decides the size, as in get_data()
            cfg["size"] = list(load_prepared(cfg["data"]).shape)
        print(json.dumps(cfg))
        return 0
    device = join_processes(cfg["device"], world)       # torchrun: one process per GPU (or CPU share)
    lock = None
    try:
        if rank == 0:                                   # rank 0 owns the run folder and prepares the phantom ...
            lock = claim_run_folder(cfg["out"], resume, overwrite)
            data = get_data(cfg, hw) if not resume else load_prepared(cfg["data"])
        if world > 1:
            dist.barrier()
        if rank != 0:                                   # ... the others read it when it is there
            data = get_data(cfg, hw) if not resume else load_prepared(cfg["data"])
        if rank == 0:
            print(f"config ({note}):")
            print("  " + json.dumps(cfg))
            write_text(os.path.join(cfg["out"], "config.json"), json.dumps(cfg, indent=2))
        _, code = train(cfg, data, ckpt, device, rank, world)
    finally:
        release(lock)
        if world > 1:
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:  # unit.data.DataError is one too; unit.io.WriteError (a failed write) exits with 1
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.status)
