"""What the studies of experiments/ share: running train.py and evaluate.py as a user would (one run after
another, as subprocesses), skipping finished runs and resuming interrupted ones, and the cells of their
tables. poster.py (the poster's eight variants) and realmri.py (the real-data benchmark) import it; it
is not a script.
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)                                   # so `import unit` works from anywhere

from unit import UserError  # noqa: E402
from unit.checkpoint import load as load_checkpoint  # noqa: E402


def run(cmd, log=None):
    """Run a command from the repository root, its output shown live (log=True: captured and returned);
    raise UserError on failure."""
    print("$ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE if log else None, text=True)
    if r.returncode != 0:
        raise UserError(f"`{' '.join(cmd)}` failed with status {r.returncode}; fix that and run the study again "
                        f"(finished runs are kept)")
    return r.stdout


def dry_run(flags):
    """The config train.py would run with these flags (its --dry-run): defaults and presets stay in train.py."""
    return json.loads(run([sys.executable, "train.py", "--dry-run", *flags], log=True).strip().splitlines()[-1])


# settings a study may plan differently from what a run of the same variant recorded: its length, logging, device
RUN_KEYS = {"out", "seed", "epochs", "save_epochs", "save_minutes", "max_steps", "max_minutes", "eval_every",
            "eval_limit", "log_every", "device", "amp", "world_size", "prep"}


def same_run(folder, planned):
    """Refuse to reuse a run folder whose checkpoint was trained with other settings than the study plans."""
    latest = os.path.join(folder, "ckpt.pt")
    if planned is None or not os.path.isfile(latest):
        return
    had = load_checkpoint(latest)["config"]
    planned = dict(planned)
    if isinstance(planned.get("size"), str):              # the built-in phantom's "HxW"; a run records [H, W]
        planned["size"] = [int(s) for s in planned["size"].lower().split("x")]
    if not planned.get("data"):                            # the built-in phantom: the run records where it was made
        planned.pop("data", None)
    differ = sorted(k for k in planned if k not in RUN_KEYS and had.get(k) != planned[k])
    if differ:
        raise UserError(f"{folder} holds a run trained with other settings than this study's ("
                        + ", ".join(f"{k}: {had.get(k)!r}, not {planned[k]!r}" for k in differ)
                        + "); move it away or pass another --out")


def train_all(runs, done, planned=None):
    """Train every run in order: runs = [(label, folder, train.py flags)]; done(folder) -> the path of the file
    whose presence means the run is finished, or None when ckpt.pt alone says so. A finished run is skipped,
    one with only a ckpt.pt resumed (train.py --resume), any other started. planned: {folder: the config train.py
    resolves for it (dry_run)}: a folder whose checkpoint has other settings is refused, never reused."""
    for folder in (planned or {}):
        same_run(folder, planned[folder])
    for n, (label, folder, flags) in enumerate(runs):
        latest, final = os.path.join(folder, "ckpt.pt"), done(folder)
        head = f"[{n + 1}/{len(runs)}] {label}:"
        if finished(latest, final):
            print(f"{head} finished ({final or latest}), skipped", flush=True)
            continue
        t0 = time.time()
        if os.path.isfile(latest):
            print(f"{head} resuming from {latest} (step {load_checkpoint(latest)['step']})", flush=True)
            run([sys.executable, "train.py", "--resume", latest, *resume_flags(flags)])
        else:
            print(f"{head} training", flush=True)
            run([sys.executable, "train.py", *flags])
        if not finished(latest, final):
            raise UserError(f"{folder}: train.py ended before its last step; see its output above")
        print(f"{head} done in {(time.time() - t0) / 60:.1f} min", flush=True)


def finished(latest, final):
    if final:
        return os.path.isfile(final)
    return os.path.isfile(latest) and bool(load_checkpoint(latest).get("finished"))


RESUME_FLAGS = ("--epochs", "--save-epochs", "--max-steps")   # run-length flags a resumed run must be given again


def resume_flags(flags):
    """The run-length flags among a run's train.py flags (the rest is in its checkpoint)."""
    out = []
    for i, f in enumerate(flags):
        if f in RESUME_FLAGS and i + 1 < len(flags):
            out += [f, flags[i + 1]]
    return out


def evaluate_all(ckpts, out_json, extra=()):
    """One evaluate.py call over all checkpoints: ({path: its JSON row}, the JSON, the printed tables)."""
    text = run([sys.executable, "evaluate.py", *ckpts, "--json", out_json, "--overwrite", *extra],
               log=True)                                # the study's own table, rewritten at every call
    print(text, flush=True)
    with open(out_json) as f:
        js = json.load(f)
    if "checkpoints" not in js:                            # one checkpoint: evaluate.py's flat format
        keys = ("n", "subjects", "T1", "T2", "identity", "inverted", "lut", "inverted_level", "lut_level", "levels",
                "target", "oracle", "reference_per_subject")
        js = {"checkpoints": [{"ckpt": js["ckpt"], "epoch": js["epoch"], "step": js["step"], "config": js["config"],
                               "res": {k: js[k] for k in keys if k in js}, "per_subject": js["per_subject"],
                               "versus": js["versus"]}]}
    return {r["ckpt"]: r for r in js["checkpoints"]}, js, text


def cell(values, fmt="{:.4f}"):
    """'mean' for one value, 'mean ± sd' (sample sd over seeds) for several."""
    m = sum(values) / len(values)
    if len(values) == 1:
        return fmt.format(m)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{fmt.format(m)} ± {fmt.format(sd).lstrip('+')}"
