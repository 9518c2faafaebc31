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

A run folder has one owner: the run holds a lock on it (RUN/.lock) for its lifetime, and a new run
into a folder that holds another run's checkpoints (or the log of one that saved none) is refused
unless --overwrite. A write that fails (disk full, read-only) stops the run with one sentence; the
last good checkpoint stays.

A crash costs at most the steps since the last save: ckpt.pt is written at every epoch end (before
that epoch's evaluation and sample grid, whose exceptions are reported and survived) and every
--save-minutes; a signal or an unexpected exception saves the last finished step (emergency_save), a
NaN/Inf loss stops the run without saving (Diverged). docs/training.md#what-a-crash-costs.
"""
import argparse
import dataclasses
import glob
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from unit import UserError, checkpoint, variants
from unit.checkpoint import build_model
from unit.data import load_prepared, prepare_phantom
from unit.evaluation import evaluate, figure_slices, from_model, has_brain_mask, reference_scores, to_model
from unit.io import Appender, WriteError, copy_file, failure, lock_folder, release, write_png, write_text
from unit.losses import GAN_LOSSES, charbonnier_loss, d_loss, g_loss, kl_loss, l1_loss, structure_loss
from unit.model import DOWN_CHOICES, UPSAMPLE_CHOICES, attn_arg
from unit.nifti import LAYOUT_MASK_RULE
from unit.progress import Progress


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


# Without CUDA the poster's configuration is far too slow (2 cores: ~4 s per iteration already at
# 128x112 with width 16, and the poster's width 64 at 304x256 is ~100x more work), so a CPU run picks a
# reduced preset for every field not given on the command line, prints it, and --full turns it off. There
# are two, as the data asks for different things (measured on 2 cores; docs/realmri.md):
# - the built-in phantom: 1.3-2.7 it/s (the machine varies), 6 epochs of 225 iterations in 9-18 min;
# - real scans (--data prepared from NIfTI, e.g. BraTS at 2 mm, 112x96): resize upsampling (no checkerboard),
#   batch 2 and a learning rate of 6e-4 for G and 4x that for D (the discriminators barely learned at the
#   phantom's settings), both rates falling linearly to 0 over the second half (CycleGAN's schedule: the last
#   checkpoint varied less between seeds), a latent at H/2 (--down 1: translations keep more detail, at 2.3x
#   the time of a step), the structure term (--w-struct 30: translations keep their input's edges), 1800 steps
#   (~25 min at ~1.25 it/s, its evaluation included), and a time guard that ends a slower machine's run at
#   28 minutes, so a run takes at most ~30. Chosen on the benchmark's validation patients (issue 24; docs/realmri.md).
CPU_PRESET = dict(size="96x80", width=8, batch_size=4, epochs=6, save_epochs="2,4,6", eval_every=2, save_minutes=10.0)
CPU_PRESET_SCANS = dict(width=8, batch_size=2, lr=6e-4, lr_d=2.4e-3, lr_decay=0.5, upsample="resize", down=1,
                        w_struct=30.0, max_steps=1800, max_minutes=28.0, eval_every=1, save_minutes=10.0)

def data_meta(path):
    """meta.json of a prepared dataset ({"source": "brats", "paired": true, ...}), or {} when it cannot be read
    (loading the data later says why)."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


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
        scans = bool(given.get("data")) and data_meta(given["data"]).get("source") not in (None, "phantom")
        preset = {k: v for k, v in (CPU_PRESET_SCANS if scans else CPU_PRESET).items() if k not in given}
        cfg.update(preset)
        shown = {k: v for k, v in preset.items() if k != "size" or not given.get("data")}  # data sets the size
        note = (f"no CUDA: reduced CPU preset for {'real scans' if scans else 'the phantom'} " +
                ", ".join(f"{k}={v}" for k, v in shown.items()) + " (pass --full for the poster configuration)")
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
    if cfg["w_paired"] and cfg["data"] and data_meta(cfg["data"]).get("paired") is False:
        raise UserError(f"--w-paired {cfg['w_paired']:g} compares translations with the real images of the other "
                        f"contrast, and {cfg['data']} is not paired (meta.json: paired=false); drop the flag")
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
    # how the training slices were made, for translate.py on new scans (the checkpoint needs no data folder)
    m = data.meta
    cfg["prep"] = {"layout": m["layout"], "percentiles": (m.get("normalization") or {}).get("percentiles"),
                   "mask_rule": LAYOUT_MASK_RULE.get(m["layout"]), "spacing": m.get("spacing")}
    if not size_ok(*cfg["size"]):
        raise UserError(f"{cfg['data']} has {cfg['size'][0]}x{cfg['size'][1]} slices; the model needs both sides "
                        f"multiples of 4 and at least 64: prepare it again with data/prepare.py --size")
    return data


# what a run writes in its folder: what --overwrite deletes of an earlier run
RUN_FILES = ("ckpt.pt", "ckpt_e*.pt", "metrics.jsonl", "samples_e*.png", "config.json", "*.tmp")


def claim_run_folder(out, resume=None, overwrite=False):
    """Make the run folder, lock it for this process's lifetime (unit.io.lock_folder; a second writer is
    refused) and check that this run may write there: a new run into a folder that holds another run's
    checkpoints, or the log of a run that saved none, is refused unless overwrite, and so is a resumed one
    into a folder that holds checkpoints other than its own or a later ckpt.pt. overwrite deletes the
    earlier run's RUN_FILES (never the checkpoint resumed from). Returns the lock (unit.io.release)."""
    try:
        os.makedirs(out, exist_ok=True)
        lock = lock_folder(out)
    except OSError as e:
        raise UserError(f"cannot write to the run folder {out} ({e.strerror}); pass a writable --out") from None
    try:
        same = lambda a, b: os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
        ckpts = sorted(glob.glob(os.path.join(out, "ckpt_e*.pt")))
        latest = os.path.join(out, "ckpt.pt")
        ckpts = ([latest] if os.path.isfile(latest) else []) + ckpts
        others = [c for c in ckpts if not (resume and same(c, resume))]
        own = resume and same(os.path.dirname(os.path.abspath(resume)), out)
        step = lambda path: checkpoint.load(path)["step"]
        if not others:
            # no checkpoint, but the log or sample grids of a run that stopped before its first save: this run's
            # lines would be appended to that run's, so it is refused like a checkpoint (nothing replaced unasked)
            left = [] if own else sorted(f for pat in ("metrics.jsonl", "samples_e*.png")
                                         for f in glob.glob(os.path.join(out, pat)) if os.path.getsize(f) > 0)
            if not left:
                return lock
            why = (f"it holds {', '.join(os.path.basename(f) for f in left)} of a run that saved no checkpoint; "
                   f"pass another --out")
        elif own:
            # continuing in its own folder: fine unless that would replace a later ckpt.pt
            if not os.path.isfile(latest) or same(latest, resume) or step(latest) <= step(resume):
                return lock
            why = (f"its {latest} is at step {step(latest)}, later than {resume} (step {step(resume)}), and "
                   f"continuing there would replace it; resume {latest}, pass --out for a branch")
        else:
            try:
                held = f"{others[0]}, step {step(others[0])}"
            except UserError:
                held = others[0]
            why = (f"it holds {'a trained run' if not resume else 'another run'} ({held}); "
                   + (f"continue it with --resume {others[0]}, pass another --out" if not resume else
                      "pass another --out"))
        if not overwrite:
            raise UserError(f"run folder {out} is taken: {why}, or pass --overwrite to delete its checkpoints, "
                            f"metrics.jsonl and sample grids")
        gone = sorted({f for pat in RUN_FILES for f in glob.glob(os.path.join(out, pat))
                       if not (resume and same(f, resume))})
        for f in gone:
            try:
                os.remove(f)
            except OSError as e:
                raise failure(f, e, "it could not be deleted (--overwrite)") from None
        print(f"--overwrite: deleted the earlier run's files in {out}: {', '.join(os.path.basename(f) for f in gone)}")
        return lock
    except BaseException:
        release(lock)
        raise


def batch_indices(n, steps, batch_size, seed, epoch, domain):
    """(steps, batch_size) indices into one domain's n training slices for an epoch: a fixed
    function of (seed, epoch, domain), so a resumed run sees exactly the batches it would have
    seen. Domains are shuffled independently: UNIT never sees a pair."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 2 + (domain == "b"))
    perm = torch.randperm(n, generator=g)[: steps * batch_size]
    return perm.view(steps, batch_size).sort(dim=1).values.numpy()  # sorted rows: kinder to the memmap


def train_slices(data, min_brain, q):
    """Indices of the training slices of contrast q ('t1', 't2') a run draws from: all of them, or with
    min_brain > 0 those whose brain mask covers at least that fraction of the slice (the edge slices of a
    volume hold a few pixels of brain: steps spent on them teach little)."""
    n = len(data.train_t1 if q == "t1" else data.train_t2)
    if not min_brain:
        return np.arange(n)
    if data.train_mask is None or not data.paired:
        raise UserError(f"--min-brain {min_brain} needs the brain masks of paired data, and {data.path} has "
                        f"{'no masks' if data.train_mask is None else 'unpaired slices'}; pass --min-brain 0")
    area = np.concatenate([np.asarray(data.train_mask[i:i + 512]).reshape(-1, data.shape[0] * data.shape[1]).mean(1)
                           for i in range(0, n, 512)])
    return np.flatnonzero(area >= min_brain)


def latent_noise(gen, seed, step, draw, shape, rank):
    """N(0, I) noise shaped like this rank's latent codes `shape` = (B, C, h, w), for draw `draw` of
    step `step`. Sample j of the global batch has a stream of its own, seeded by (seed, step, draw,
    j): one process with batch 2b and two with batch b draw the same numbers, and a resumed run
    draws what it would have drawn. gen: a torch.Generator on the device (no host sync)."""
    B = shape[0]
    z = []
    for j in range(rank * B, (rank + 1) * B):
        gen.manual_seed((((seed * 1_000_003 + step) * 8 + draw) * 1_000_003 + j) % 2 ** 63)
        z.append(torch.randn(shape[1:], generator=gen, device=gen.device))
    return torch.stack(z)


def sample_grid(model, data, cfg, path, n=4, split="test"):
    """PNG: rows x_a, x_ab, x_aba, x_b, x_ba, x_bab for n slices of split (model in eval mode): the slice with
    the most brain of n of its subjects drawn with seed 0, the same at every epoch so grids compare. A dataset
    without slices there shows training slices, chosen the same way."""
    from PIL import Image
    split = split if data.has(split) else "train"
    t1, t2 = getattr(data, f"{split}_t1"), getattr(data, f"{split}_t2")
    idx = figure_slices(data, len(t1), k=n, seed=0, split=split)
    idx_b = [i % len(t2) for i in idx]                      # unpaired data may have fewer T2 slices
    was = model.training
    model.eval()
    with torch.no_grad():
        dev, ch = next(model.parameters()).device, cfg["channels"]
        x_a, x_b = to_model(t1[idx], ch, dev), to_model(t2[idx_b], ch, dev)
        x_ab, x_ba = model.translate(x_a, "a"), model.translate(x_b, "b")
        rows = [x_a, x_ab, model.translate(x_ab, "b"), x_b, x_ba, model.translate(x_ba, "a")]
        grid = torch.cat([torch.cat(list(from_model(r)), dim=1) for r in rows], dim=0)
    model.train(was)
    write_png(path, Image.fromarray((grid.cpu().numpy() * 255).round().astype(np.uint8)))


def peak_mem_mb(dev):
    """Peak memory so far: on CUDA what tensors took on this GPU, on the CPU the process's resident set."""
    if dev.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated(dev) / 2 ** 20)
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)   # Linux reports KiB


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
        d_a, d_b = d_side(torch.cat([x_a, x_ba]), torch.cat([x_b, x_ab]))     # (2B, 1, h, w) each
    loss_d = d_loss(d_a[:B], d_a[B:], cfg["gan_loss"]) + d_loss(d_b[:B], d_b[B:], cfg["gan_loss"])
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
    loss_struct = (structure_loss(o["x_ab"], x_a) + structure_loss(o["x_ba"], x_b) if cfg["w_struct"] else
                   torch.zeros((), device=x_a.device))
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


def train(cfg, data, ckpt=None, device=None, rank=0, world=1):
    """Train (or continue) a run; returns (model, exit status). device: this process's device
    (cfg["device"], or cuda:LOCAL_RANK under torchrun); rank, world: torchrun's RANK, WORLD_SIZE."""
    dev = device or cfg["device"]
    lead = rank == 0                                     # the one process that writes
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
    g_side, d_side = model.generator_side(), model.discriminator_side()
    if world > 1:
        # broadcast_buffers (default): each DDP forward sends rank 0's buffers, spectral norm's u and v,
        # to all ranks; they are equal anyway (the power iteration sees only weights, which DDP keeps
        # equal), so this only guards against drift. One forward per backward for each wrapper.
        ids = [torch.device(dev)] if dev.startswith("cuda") else None
        g_side, d_side = DDP(g_side, device_ids=ids), DDP(d_side, device_ids=ids)

    out, ch, bs = cfg["out"], cfg["channels"], cfg["batch_size"]
    gbs = bs * world                                      # the global batch
    pool = {"a": train_slices(data, cfg["min_brain"], "t1"), "b": train_slices(data, cfg["min_brain"], "t2")}
    n_a, n_b = len(pool["a"]), len(pool["b"])           # differ only in unpaired PNG datasets
    n_train = min(n_a, n_b)
    if n_train < gbs:
        raise UserError(f"{cfg['data']} has {n_train} training slices, fewer than the global batch {gbs} "
                        f"(--batch-size {bs} x {world} processes)")
    steps_per_epoch = n_train // gbs
    total = cfg["epochs"] * steps_per_epoch
    if cfg["max_steps"]:
        total = min(total, cfg["max_steps"])
    save_epochs = {int(e) for e in str(cfg["save_epochs"]).split(",") if e.strip()}
    say = print if lead else (lambda *a, **k: None)
    n_params = [sum(p.numel() for p in ps) / 1e6 for ps in (model.generator_params(), model.discriminator_params())]
    say(f"model: {n_params[0]:.2f}M generator-side params, {n_params[1]:.2f}M discriminator params; "
        f"{n_train} training slices, {steps_per_epoch} steps/epoch, {total} steps in total; batch {bs} per domain"
        + (f" x {world} processes = {gbs}" if world > 1 else "") + (", autocast bf16" if cfg["amp"] == "bf16" else ""))
    if cfg["attn"] != "none":
        from unit.backends import describe
        say(f"self-attention ({cfg['attn']}): {describe()}")
    # the per-epoch evaluation: on the validation split when there is one (choices are made there, and the test
    # split is left for the report), else on the test split; it needs paired slices there
    split = "val" if data.has("val") else "test"
    scored = data.paired and data.has(split)
    if cfg["eval_every"] and not data.paired:
        say(f"note: {cfg['data']} is not paired (meta.json: paired=false), so the per-epoch evaluation is skipped "
            f"(translated slices have no pixel-aligned ground truth, as evaluate.py says); sample grids are still "
            f"written and show unpaired test slices")
    elif cfg["eval_every"] and not scored:
        say(f"note: {cfg['data']} has no test slices (its split lists no test subject), so the per-epoch evaluation "
            f"is skipped; sample grids show training slices, and evaluate.py --data DIR scores the checkpoints on a "
            f"dataset with a test split")
    elif cfg["eval_every"] and split == "val":
        say(f"note: {cfg['data']} has a validation split: the per-epoch evaluation and the sample grids use its "
            f"{len(data.val_t1)} slices, not the test split's")

    orders = {}
    def fetch(step):
        """This rank's share of the step's batch, copied to the device without waiting (pinned memory on CUDA)."""
        epoch, i = divmod(step, steps_per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = [pool[d][batch_indices(len(pool[d]), steps_per_epoch, gbs, cfg["seed"], epoch, d)
                                     [:, rank * bs:(rank + 1) * bs]] for d in ("a", "b")]   # pools are sorted
        ia, ib = orders[epoch][0][i], orders[epoch][1][i]
        if cfg["w_paired"]:                             # --w-paired: domain b takes a's batch, so they are pairs
            ib = ia
        return (to_model(data.train_t1[ia], ch, dev, non_blocking=True),   # (B, ch, H, W) in [-1, 1]
                to_model(data.train_t2[ib], ch, dev, non_blocking=True))

    gen = torch.Generator(device=dev)
    noise_shape = None
    # a control group for the stop flag: gloo on the CPU, so checking it never waits for a GPU
    ctl = dist.new_group(backend="gloo") if world > 1 and dist.get_backend() != "gloo" else None
    stop = {"signal": None}
    def on_signal(signum, frame):
        stop["signal"] = signum
    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    log = Appender(os.path.join(out, "metrics.jsonl")) if lead else None
    latest = os.path.join(out, "ckpt.pt")
    saved = ckpt["step"] if ckpt else None               # step of the last checkpoint written (or resumed from)
    progress = Progress(total, "step", start=step, enabled=lead, every_s=30)
    last_metrics, t_start = (ckpt or {}).get("metrics"), time.time()
    seconds0 = (ckpt or {}).get("seconds") or 0.0         # training time of the run before this process
    last_save = t_start
    bad = torch.zeros((), dtype=torch.long, device=dev)   # first step with a non-finite loss, 0 = none yet
    bad_losses = torch.zeros(len(LOSS_NAMES), device=dev) # the losses of that step
    adam0 = (adam_steps(opt_g) - step, adam_steps(opt_d) - step)   # so that adam_steps() - adam0 == step between steps
    refs = None

    def last_good():
        return (f"the last checkpoint is {latest} at step {saved}" if saved is not None and os.path.isfile(latest)
                else "this run saved no checkpoint")

    def save(why, epoch=None, finished=False):
        """ckpt.pt of the state after `step` (unit/checkpoint.py's atomic write); never one of NaN/Inf weights."""
        nonlocal saved, last_save
        if not finite_weights(model):
            raise Diverged(f"the weights hold NaN/Inf after step {step} although no logged loss did; stopped without "
                           f"saving them, so {last_good()}; try a lower --lr or --sn")
        checkpoint.save(latest, model, opt_g, opt_d, cfg, step // steps_per_epoch if epoch is None else epoch, step,
                        last_metrics, seconds=seconds0 + time.time() - t_start, finished=finished, saved_by=why)
        saved, last_save = step, time.time()

    def end_of_epoch(e):
        """After the epoch's checkpoint is written: the evaluation (if due) and the sample grid. Either may fail
        (a bug, bad data, out of memory) without costing a step: one line, a line in metrics.jsonl, and on."""
        nonlocal last_metrics
        due = cfg["eval_every"] and (e % cfg["eval_every"] == 0 or step == total)
        if not due:
            return
        if scored:
            def score():
                nonlocal refs
                refs = refs or reference_scores(data, cfg["eval_limit"] or None, split)   # the data's: once
                return evaluate(model, data, dev, ch, limit=cfg["eval_limit"] or None, refs=refs, split=split)[0]
            res = survive("the evaluation", score, step, log, progress)
            if res is not None:
                last_metrics = {"kind": "eval", "split": split, "step": step, "epoch": e, "n": res["n"],
                                **{f"{k}_{c}": v for c in ("T1", "T2") for k, v in res[c].items()},
                                **{f"identity_{k}": res["identity"]["T1"][k] for k in ("ssim", "ssim_mask")
                                   if k in res["identity"]["T1"]}}
                log.write(json.dumps(last_metrics) + "\n")
                progress.close()
                scores = lambda k: f"T1 {res['T1'][k]:.4f} T2 {res['T2'][k]:.4f} (identity {res['identity']['T1'][k]:.4f})"
                brain = f"brain SSIM {scores('ssim_mask')}, whole-slice " if has_brain_mask(data) else ""
                print(f"epoch {e} step {step}: {brain}SSIM {scores('ssim')}, {res['n']} {split} slices", flush=True)
        survive("the sample grid", lambda: sample_grid(model, data, cfg, os.path.join(out, f"samples_e{e:03d}.png"),
                                                       split=split), step, log, progress)

    model.train()
    status, stopped, note = 0, False, None
    try:
        batch = fetch(step) if step < total else None
        while step < total:
            x_a, x_b = batch
            if noise_shape is None:
                noise_shape = model.code_shape(x_a)
            noise = lambda k, s=step: latent_noise(gen, cfg["seed"], s, k, noise_shape, rank)
            set_lr(opt_g, opt_d, cfg, lr_factor(step, total, cfg["lr_decay"]))
            losses = train_step(model, g_side, d_side, opt_g, opt_d, x_a, x_b, noise, cfg)
            step += 1
            first = (bad == 0) & ~torch.isfinite(losses).all()
            bad, bad_losses = torch.where(first, step, bad), torch.where(first, losses, bad_losses)
            if step < total:
                batch = fetch(step)                     # read and copy the next batch while the GPU works

            stopping = stop["signal"] is not None
            late = bool(cfg["max_minutes"]) and seconds0 + time.time() - t_start >= 60 * cfg["max_minutes"]
            timely = bool(cfg["save_minutes"]) and time.time() - last_save >= 60 * cfg["save_minutes"]
            if world > 1:                               # a signal on any rank stops all of them, at the same step
                flag = torch.tensor([int(stopping), int(late), int(timely)])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctl)
                stopping, late, timely = (bool(f) for f in flag.tolist())
            if late and step < total:                   # the time is up: this step is the run's last
                if lead:
                    progress.write(f"--max-minutes {cfg['max_minutes']:g}: the time is up at step {step} of {total}; "
                                   f"ending the run here")
                total = progress.total = step
            epoch_end = step % steps_per_epoch == 0 or step == total
            if step % cfg["log_every"] == 0 or epoch_end or stopping or timely:   # the only host syncs of the loop
                if world > 1:
                    dist.all_reduce(losses)             # the mean over all ranks' batches
                    losses /= world
                    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
                if bad.item():                          # before any save: a NaN state never replaces a good one
                    raise Diverged(non_finite(bad.item(), bad_losses, last_good()))
                vals = dict(zip(LOSS_NAMES, losses.tolist()))
                note = f"epoch {math.ceil(step / steps_per_epoch)}/{cfg['epochs']} " + \
                    " ".join(f"{k} {v:.3f}" for k, v in vals.items())
                if lead and step % cfg["log_every"] == 0:
                    log.write(json.dumps({"kind": "train", "step": step, "epoch": step / steps_per_epoch,
                                          "time": round(time.time() - t_start, 3), **vals,
                                          "peak_mem_mb": peak_mem_mb(dev)}) + "\n")
            progress.set(step, note)                    # the losses shown are those last read
            if stopping and step < total:
                stopped = True
                break
            if lead and epoch_end:                      # end of an epoch (or of the run): save first, then the rest
                e = math.ceil(step / steps_per_epoch)
                save("end of run" if step == total else "end of epoch", epoch=e, finished=step == total)
                if e in save_epochs and step % steps_per_epoch == 0:      # keep a copy, serialised once
                    copy_file(latest, os.path.join(out, f"ckpt_e{e:03d}.pt"))
                end_of_epoch(e)
            elif lead and timely:                       # --save-minutes: a crash costs at most that much
                save(f"--save-minutes {cfg['save_minutes']:g}")
        if stopped:                                     # by a signal, here or on another rank
            how = signal.Signals(stop["signal"]).name if stop["signal"] else "a signal on another rank"
            if lead:
                save(f"signal ({how})")
                progress.close()
                print(f"interrupted ({how}) at step {step}: saved {latest}; continue with: {resume_command(latest, world)}")
            # 130 (interrupted) for a plain run; under torchrun 0, as torchrun takes any other status for a
            # crash of that rank and kills the others, possibly before they have left the barrier below
            status = 130 if world == 1 else 0
        if world > 1:
            dist.barrier(group=ctl)                     # no rank leaves before rank 0 has written
    except WriteError as e:                             # disk full, read-only: stop now, not train on unsaved
        raise WriteError(f"{e}; training stopped at step {step} and {last_good()}") from None
    except Diverged:
        raise
    except Exception as e:                              # a bug, bad data, out of memory: keep what was trained
        if lead:
            progress.close()
            clean = (adam_steps(opt_g) - adam0[0], adam_steps(opt_d) - adam0[1]) == (step, step)
            try:
                clean = clean and not bad.item()        # a NaN loss not yet read: that state is not saved either
            except Exception:                           # the device itself failed (a CUDA error)
                clean = False
            print("error: " + emergency_save(e, step, saved, clean, lambda: save(f"error ({type(e).__name__})"),
                                            latest, last_good, world), file=sys.stderr, flush=True)
        raise
    finally:
        progress.close()
        if log:
            log.close()
        for sig, h in old.items():
            signal.signal(sig, h)
    if not stopped:
        say(f"done: {step} steps in {time.time() - t_start:.0f} s; checkpoint {latest}; "
            f"evaluate with: python evaluate.py {latest}" +
            ("" if scored else " --data DIR (a prepared dataset with a test split)"))
    return model, status


class Diverged(UserError):
    """A loss (or the weights) became NaN or Inf: the run stops with one sentence and saves nothing, so the last
    good checkpoint stays."""
    status = 1


def adam_steps(opt):
    """How many updates an Adam optimiser has made (0 before its first): every parameter's counter agrees."""
    state = next(iter(opt.state.values()), None)
    return 0 if state is None else int(state["step"])


def finite_weights(model):
    """Whether every floating-point weight and buffer of the model is finite (one host sync)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in model.state_dict().values()
                             if t.is_floating_point()]).all())


def non_finite(step, losses, last_good):
    """The sentence of a NaN/Inf loss: which loss(es), at which step, the last good checkpoint."""
    which = ", ".join(f"{k} = {v}" for k, v in zip(LOSS_NAMES, losses.tolist()) if not math.isfinite(v))
    return (f"non-finite loss at step {step} ({which}); stopped without saving, so {last_good}; try a lower --lr "
            f"or --sn")


def resume_command(latest, world):
    return f"{'torchrun --nproc_per_node=' + str(world) if world > 1 else 'python'} train.py --resume {latest}"


def survive(what, fn, step, log, progress):
    """fn() at an epoch's end, after its checkpoint is written: an exception in it (other than a failed write,
    which stops the run) is reported in one line and in metrics.jsonl, and the run goes on. fn's value, or None."""
    try:
        return fn()
    except WriteError:
        raise
    except Exception as e:
        why = f"{type(e).__name__}: {e}"
        progress.write(f"warning: {what} failed at step {step} ({why}); the checkpoint of this step is saved and "
                       f"training goes on")
        log.write(json.dumps({"kind": "error", "step": step, "in": what, "error": why}) + "\n")
        return None


def emergency_save(e, step, saved, clean, save, latest, last_good, world):
    """After an unexpected exception in the training loop: save the state of the last finished step when it is one
    (clean: no optimiser of the unfinished step has updated yet) and return the sentence to print."""
    why = f"{type(e).__name__}: {e}"
    if saved == step:
        return f"{why} after step {step}; {latest} holds that step already; continue with: " \
               f"{resume_command(latest, world)}"
    if not clean:
        return (f"{why} in the middle of step {step + 1}, after an optimiser's update, so that state is not a "
                f"finished step and is not saved; {last_good()}")
    if step == 0:
        return f"{why} before the first step; nothing to save"
    try:
        save()
    except Exception as e2:
        return f"{why} after step {step}; the emergency checkpoint could not be written ({type(e2).__name__}: " \
               f"{e2}), so {last_good()}"
    return f"{why} after step {step}; saved that step to {latest}; continue with: {resume_command(latest, world)}"


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
    device = cfg["device"]
    if world > 1:                                       # torchrun: one process per GPU (or CPU share)
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)               # device_id: NCCL knows this rank's GPU from the start
            dist.init_process_group("nccl", device_id=torch.device(device))
        else:
            dist.init_process_group("gloo")
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
