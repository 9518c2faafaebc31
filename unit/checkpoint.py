"""The checkpoint format: one file per checkpoint, written by train.py, read by every script.

    {"format": FORMAT, "version": 1, "config": {...plain types...}, "epoch": int, "step": int,
     "model": UNIT state_dict, "opt_g": Adam state, "opt_d": Adam state,
     "rng": {"torch": ByteTensor, "cuda": [ByteTensor per GPU]},
     "metrics": the last evaluation logged before this save, or None (an epoch's checkpoint is written before
                that epoch's evaluation, whose line is in metrics.jsonl),
     "seconds": wall time spent training so far (all processes that resumed it), "finished": bool,
     "saved_by": why it was written: "end of epoch", "end of run", "--save-minutes M", "signal (SIGTERM)",
                 "error (TypeName)" (an emergency checkpoint of the last finished step)}

("seconds", "finished" and "saved_by" came after the first checkpoints: older files lack them; read with .get.)

"config" is the resolved training config (train.py's Config as a dict), so that build_model()
and evaluate.py need nothing else. Files are loaded with torch.load(weights_only=True): no pickled
code runs. A key that later versions of train.py add to the config is missing from older files:
load() fills it in from ADDED_KEYS, the one place that says what those runs did, so every script
(evaluate.py, translate.py, train.py --resume) reads a complete config.
"""
import os

import torch

from unit import UserError
from unit.io import write_file
from unit.model import UNIT

FORMAT = "unit-mri-checkpoint"
VERSION = 1

# Config keys added after the first version-1 checkpoints, each with the value that reproduces what a run
# made before it did (which need not be today's default). A new Config field goes here too.
ADDED_KEYS = {"upsample": "deconv", "amp": "fp32", "world_size": 1, "gan_loss": "bce", "lr_d": 0.0,
              "lr_decay": 0.0, "min_brain": 0.0, "max_minutes": 0.0, "prep": None, "save_minutes": 0.0,
              "down": 2, "w_paired": 0.0, "w_struct": 0.0, "context": 0, "d_patch": False, "d_scales": 1}


def save(path, model, opt_g, opt_d, cfg, epoch, step, metrics, seconds=None, finished=False, saved_by=None):
    """Write atomically (unit.io.write_file: a temp file next to the target, then a rename): a run
    killed while saving, or a full disk, leaves the previous checkpoint intact (the latter raises
    unit.io.WriteError). seconds: training wall time so far; finished: the run has taken its last step;
    saved_by: why it was written ("end of epoch", "--save-minutes 10", "signal (SIGTERM)", "error (...)")."""
    ckpt = {"format": FORMAT, "version": VERSION, "config": cfg, "epoch": epoch, "step": step,
            "model": model.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "metrics": metrics, "seconds": seconds, "finished": bool(finished), "saved_by": saved_by}
    write_file(path, lambda f: torch.save(ckpt, f))


def load(path, map_location="cpu"):
    """Load one of this project's checkpoints (weights_only) or raise UserError saying why not."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; pass the ckpt.pt written by train.py")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, pickle of something else, not a torch file at all
        raise UserError(f"{path} is not a readable checkpoint of this project "
                        f"({type(e).__name__}); pass the ckpt.pt written by train.py") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is a torch file but not a checkpoint written by this project's "
                        f"train.py (no '{FORMAT}' marker)")
    if ckpt.get("version", 1) > VERSION:
        raise UserError(f"{path} is a version {ckpt['version']} checkpoint, newer than this code reads "
                        f"(version {VERSION}); update the repository")
    ckpt["config"] = {**ADDED_KEYS, **ckpt["config"]}
    return ckpt


def restore(ckpt, model, opt_g, opt_d, device):
    """Put a loaded checkpoint's weights, optimiser states and RNG states (torch's; CUDA's on a GPU) back, so that
    training goes on exactly where it stopped; returns its step."""
    model.load_state_dict(ckpt["model"])
    opt_g.load_state_dict(ckpt["opt_g"])
    opt_d.load_state_dict(ckpt["opt_d"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device.startswith("cuda") and ckpt["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["step"]


def in_channels(cfg):
    """The model's image channels: the 2k + 1 neighbouring slices of --context k, else --channels (1, or 3 for
    RGB)."""
    return 2 * cfg["context"] + 1 if cfg["context"] else cfg["channels"]


def build_model(cfg):
    """The UNIT a config describes (config = the plain dict saved in every checkpoint)."""
    return UNIT(channels=in_channels(cfg), width=cfg["width"], attn=cfg["attn"], sn=cfg["sn"], upsample=cfg["upsample"],
                down=cfg["down"], d_patch=cfg["d_patch"], d_scales=cfg["d_scales"])


def load_model(path, device="cpu"):
    """(model in eval mode on `device`, checkpoint dict) from a checkpoint file."""
    ckpt = load(path)
    model = build_model(ckpt["config"]).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt
