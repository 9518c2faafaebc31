"""A training run's folder, its checkpoints and log, and what a crash costs (docs/training.md#what-a-crash-costs).

- claim_run_folder(): one owner per run folder (a lock for the run's lifetime); an earlier run's files are never
  replaced unasked (--overwrite).
- Run: ckpt.pt and metrics.jsonl of a run and the policy around its loop (Run.guard): ckpt.pt is written at every
  epoch's end, before that epoch's evaluation and sample grid (whose exceptions are reported and survived,
  Run.survive), and every --save-minutes; a signal stops the loop at the next step, which is saved; an unexpected
  exception saves the last finished step (Run.emergency_save) and is re-raised; a failed write stops the run with
  one sentence; a NaN/Inf loss, or NaN/Inf weights behind a finite one, stop it without saving (Diverged), so
  ckpt.pt stays the last good one.
"""
import glob
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from unit import UserError, backends, checkpoint
from unit.hardware import peak_mem_mb
from unit.io import Appender, WriteError, copy_file, failure, lock_folder, release


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


def non_finite(step, losses, names, last_good):
    """The sentence of a NaN/Inf loss: which loss(es), at which step, the last good checkpoint."""
    which = ", ".join(f"{k} = {v}" for k, v in zip(names, losses.tolist()) if not math.isfinite(v))
    return (f"non-finite loss at step {step} ({which}); stopped without saving, so {last_good}; try a lower --lr "
            f"or --sn")


def resume_command(latest, world):
    return f"{'torchrun --nproc_per_node=' + str(world) if world > 1 else 'python'} train.py --resume {latest}"


def summary(model, batches, total, cfg, world=1):
    """The line a run starts with: parameters, training slices, steps, batch (and the attention backend)."""
    n_params = [sum(p.numel() for p in ps) / 1e6 for ps in (model.generator_params(), model.discriminator_params())]
    line = (f"model: {n_params[0]:.2f}M generator-side params, {n_params[1]:.2f}M discriminator params; "
            f"{batches.n_train} training slices, {batches.steps_per_epoch} steps/epoch, {total} steps in total; "
            f"batch {batches.bs} per domain" + (f" x {world} processes = {batches.gbs}" if world > 1 else "") +
            (", autocast bf16" if cfg["amp"] == "bf16" else ""))
    if cfg["attn"] != "none":
        line += f"\nself-attention ({cfg['attn']}): {backends.describe()}"
    return line


class Run:
    """The writing side of a training run (rank 0; on other ranks it writes nothing): its checkpoint ckpt.pt, its
    log metrics.jsonl, and the failure policy (the module's docstring). The loop reports every finished step with
    finished(), reads the losses at its sync points with read(), and saves with save()."""

    def __init__(self, cfg, model, opt_g, opt_d, ckpt, step, steps_per_epoch, loss_names, lead=True, world=1):
        self.cfg, self.model, self.opt_g, self.opt_d = cfg, model, opt_g, opt_d
        self.steps_per_epoch, self.loss_names, self.lead, self.world = steps_per_epoch, loss_names, lead, world
        self.latest = os.path.join(cfg["out"], "ckpt.pt")
        self.step = step                                       # the last finished step
        self.saved = ckpt["step"] if ckpt else None            # step of the last checkpoint written (or resumed from)
        self.metrics = (ckpt or {}).get("metrics")             # the last evaluation, saved with every checkpoint
        self.seconds0 = (ckpt or {}).get("seconds") or 0.0     # training time of the run before this process
        self.t_start = self.last_save = time.time()
        self.log = Appender(os.path.join(cfg["out"], "metrics.jsonl")) if lead else None
        dev = next(model.parameters()).device
        self.bad = torch.zeros((), dtype=torch.long, device=dev)          # first step with a non-finite loss, 0 = none
        self.bad_losses = torch.zeros(len(loss_names), device=dev)        # the losses of that step
        self.adam0 = (adam_steps(opt_g) - step, adam_steps(opt_d) - step)  # adam_steps() - adam0 == step between steps
        self.signal = None
        self.refs = None                                       # the data's reference scores, at the first evaluation
        # a control group for the stop flags: gloo on the CPU, so checking them never waits for a GPU
        self.ctl = dist.new_group(backend="gloo") if world > 1 and dist.get_backend() != "gloo" else None

    def seconds(self):
        """Training time of the run so far, resumed parts included."""
        return self.seconds0 + time.time() - self.t_start

    def finished(self, step, losses):
        """Step `step` is done: note the first step whose losses are not all finite (no host sync)."""
        self.step = step
        first = (self.bad == 0) & ~torch.isfinite(losses).all()
        self.bad, self.bad_losses = torch.where(first, step, self.bad), torch.where(first, losses, self.bad_losses)

    def flags(self):
        """(stop, late, timely): a signal came, --max-minutes is up, --save-minutes is due; under torchrun the same
        on every rank (a flag on any rank sets it on all), so all stop or save at the same step."""
        cfg = self.cfg
        flags = (self.signal is not None, bool(cfg["max_minutes"]) and self.seconds() >= 60 * cfg["max_minutes"],
                 bool(cfg["save_minutes"]) and time.time() - self.last_save >= 60 * cfg["save_minutes"])
        if self.world > 1:
            flag = torch.tensor([int(f) for f in flags])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ctl)
            flags = tuple(bool(f) for f in flag.tolist())
        return flags

    def read(self, losses, log_line):
        """The losses as {name: float} (the mean over ranks), after checking that no step so far had a NaN/Inf loss
        (Diverged, before any save: a NaN state never replaces a good one); log_line: write them to metrics.jsonl."""
        if self.world > 1:
            dist.all_reduce(losses)                     # the mean over all ranks' batches
            losses /= self.world
            dist.all_reduce(self.bad, op=dist.ReduceOp.MAX)
        if self.bad.item():
            raise Diverged(non_finite(self.bad.item(), self.bad_losses, self.loss_names, self.last_good()))
        vals = dict(zip(self.loss_names, losses.tolist()))
        if self.lead and log_line:
            dev = str(self.bad.device)
            self.write({"kind": "train", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                        "time": round(time.time() - self.t_start, 3), **vals, "peak_mem_mb": peak_mem_mb(dev)})
        return vals

    def write(self, record):
        """One line of metrics.jsonl."""
        self.log.write(json.dumps(record) + "\n")

    def last_good(self):
        return (f"the last checkpoint is {self.latest} at step {self.saved}"
                if self.saved is not None and os.path.isfile(self.latest) else "this run saved no checkpoint")

    def save(self, why, epoch=None, finished=False):
        """ckpt.pt of the state after the last finished step (unit/checkpoint.py's atomic write); never one of
        NaN/Inf weights."""
        if not finite_weights(self.model):
            raise Diverged(f"the weights hold NaN/Inf after step {self.step} although no logged loss did; stopped "
                           f"without saving them, so {self.last_good()}; try a lower --lr or --sn")
        checkpoint.save(self.latest, self.model, self.opt_g, self.opt_d, self.cfg,
                        self.step // self.steps_per_epoch if epoch is None else epoch, self.step, self.metrics,
                        seconds=self.seconds(), finished=finished, saved_by=why)
        self.saved, self.last_save = self.step, time.time()

    def keep(self, epoch):
        """A copy of ckpt.pt as ckpt_eNNN.pt (serialised once)."""
        copy_file(self.latest, os.path.join(self.cfg["out"], f"ckpt_e{epoch:03d}.pt"))

    def survive(self, what, fn, progress):
        """fn() at an epoch's end, after its checkpoint is written: an exception in it (other than a failed write,
        which stops the run) is reported in one line and in metrics.jsonl, and the run goes on. fn's value, or
        None."""
        try:
            return fn()
        except WriteError:
            raise
        except Exception as e:
            why = f"{type(e).__name__}: {e}"
            progress.write(f"warning: {what} failed at step {self.step} ({why}); the checkpoint of this step is saved "
                           f"and training goes on")
            self.write({"kind": "error", "step": self.step, "in": what, "error": why})
            return None

    def interrupted(self, progress):
        """After the loop stopped for a signal (here or on another rank): save that step; the exit status."""
        how = signal.Signals(self.signal).name if self.signal else "a signal on another rank"
        if self.lead:
            self.save(f"signal ({how})")
            progress.close()
            print(f"interrupted ({how}) at step {self.step}: saved {self.latest}; continue with: "
                  f"{resume_command(self.latest, self.world)}")
        # 130 (interrupted) for a plain run; under torchrun 0, as torchrun takes any other status for a crash of
        # that rank and kills the others, possibly before they have left the barrier that follows
        return 130 if self.world == 1 else 0

    @contextmanager
    def guard(self, progress):
        """The failure policy around the training loop: SIGINT and SIGTERM set self.signal (the loop stops after
        its step, interrupted() saves it); a failed write (disk full, read-only) stops the run, not train on
        unsaved; Diverged passes; any other exception (a bug, bad data, out of memory) saves the last finished
        step when it is one (emergency_save) and goes on up for its traceback."""
        def on_signal(signum, frame):
            self.signal = signum
        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        except WriteError as e:
            raise WriteError(f"{e}; training stopped at step {self.step} and {self.last_good()}") from None
        except Diverged:
            raise
        except Exception as e:
            if self.lead:
                progress.close()
                print("error: " + self.emergency_save(e), file=sys.stderr, flush=True)
            raise
        finally:
            progress.close()
            if self.log:
                self.log.close()
            for sig, h in old.items():
                signal.signal(sig, h)

    def emergency_save(self, e):
        """After an unexpected exception in the loop: save the state of the last finished step when it is one (no
        optimiser of the unfinished step has updated yet, and no NaN loss is pending); the sentence to print."""
        why, step = f"{type(e).__name__}: {e}", self.step
        if self.saved == step:
            return f"{why} after step {step}; {self.latest} holds that step already; continue with: " \
                   f"{resume_command(self.latest, self.world)}"
        clean = (adam_steps(self.opt_g) - self.adam0[0], adam_steps(self.opt_d) - self.adam0[1]) == (step, step)
        try:
            clean = clean and not self.bad.item()       # a NaN loss not yet read: that state is not saved either
        except Exception:                               # the device itself failed (a CUDA error)
            clean = False
        if not clean:
            return (f"{why} in the middle of step {step + 1}, after an optimiser's update, so that state is not a "
                    f"finished step and is not saved; {self.last_good()}")
        if step == 0:
            return f"{why} before the first step; nothing to save"
        try:
            self.save(f"error ({type(e).__name__})")
        except Exception as e2:
            return f"{why} after step {step}; the emergency checkpoint could not be written ({type(e2).__name__}: " \
                   f"{e2}), so {self.last_good()}"
        return f"{why} after step {step}; saved that step to {self.latest}; continue with: " \
               f"{resume_command(self.latest, self.world)}"
