"""A run survives its own failures (train.py): a dataset without a test split trains; an epoch's checkpoint is
written before its evaluation and sample grid, whose exceptions cost no step; any other exception in the loop
saves the last finished step (unless the state is mid-step or NaN); --save-minutes bounds what a crash or a
kill -9 costs, and resuming such a mid-epoch checkpoint is exact; a NaN loss stops the run without saving.
Each test checks the files left, that the last checkpoint loads and resumes, and how many steps were lost.

Faults are injected in-process (monkeypatch on the names train.py calls), the kill -9 on a real process."""
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train
import unit.figures
from unit import UserError, checkpoint
from unit.runs import Diverged
from unit.data import load_prepared, prepare_phantom, write_prepared

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--full", "--width", "4", "--batch-size", "2", "--device", "cpu", "--log-every", "1", "--eval-limit", "3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "phantom")
    prepare_phantom(path, n_train=6, n_test=3, slices=1, size=(64, 64), seed=0, progress=False)   # 3 steps/epoch
    return path


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """6 steps (2 epochs) without a fault: the weights every resumed run must reach, bit for bit."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert train.main(["--data", data, "--out", str(out), *TINY, "--eval-every", "0", "--max-steps", "6"]) == 0
    return weights(out / "ckpt.pt")


def weights(path):
    return checkpoint.load(str(path))["model"]


def logged(out, kind="train"):
    return [m for m in map(json.loads, open(out / "metrics.jsonl")) if m["kind"] == kind]


def resume_to_6(ckpt, straight):
    """Resume a checkpoint to step 6 with no fault; its weights equal the uninterrupted run's."""
    assert train.main(["--resume", str(ckpt), "--max-steps", "6"]) == 0
    w = weights(ckpt)
    assert checkpoint.load(str(ckpt))["step"] == 6 and all(torch.equal(w[k], straight[k]) for k in straight)


def nth_call(fn, n, fault):
    """fn, except that its n-th call (1 = the first) returns fault(*args) instead (or raises in it)."""
    seen = [0]
    def wrapped(*a, **k):
        seen[0] += 1
        return fault(*a, **k) if seen[0] == n else fn(*a, **k)
    return wrapped


def boom(*a, **k):
    raise RuntimeError("injected")


def test_a_dataset_without_a_test_split_trains_and_evaluate_says_what_to_pass(data, tmp_path, capsys):
    """The issue's replay in small: the first epoch's evaluation crashed on an empty test split and lost the run."""
    d = load_prepared(data)
    empty = np.zeros((0, 64, 64), np.float16)
    train_only = write_prepared(str(tmp_path / "train-only"), d.train_t1, d.train_t2, empty, empty,
                                {"source": "brats", "layout": "brats", "seed": 0}, d.train_mask, empty.astype(bool))
    out = tmp_path / "run"
    assert train.main(["--data", train_only, "--out", str(out), *TINY, "--eval-every", "1", "--max-steps", "6"]) == 0
    printed = capsys.readouterr().out
    assert f"note: {train_only} has no test slices (its split lists no test subject), so the per-epoch " \
           f"evaluation is skipped" in printed
    assert f"evaluate with: python evaluate.py {out}/ckpt.pt --data DIR" in printed
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt", "ckpt_e001.pt", "config.json", "metrics.jsonl",
                                       "samples_e001.png", "samples_e002.png"]   # grids of training slices
    ck = checkpoint.load(str(out / "ckpt.pt"))
    assert ck["step"] == 6 and ck["finished"] and not logged(out, "eval")
    import evaluate
    with pytest.raises(UserError, match=r"has no test slices .* pass --data with a prepared dataset that has one"):
        evaluate.main([str(out / "ckpt.pt")])
    assert evaluate.main([str(out / "ckpt.pt"), "--data", data])["n"] == 3       # scored on another dataset


@pytest.mark.parametrize("where", ["evaluate", "write_png"])
def test_an_exception_in_evaluation_or_the_sample_grid_costs_no_step(data, tmp_path, monkeypatch, capsys, where):
    monkeypatch.setattr(train if where == "evaluate" else unit.figures, where, boom)
    out = tmp_path / "run"
    assert train.main(["--data", data, "--out", str(out), *TINY, "--eval-every", "1", "--max-steps", "6"]) == 0
    what = "the evaluation" if where == "evaluate" else "the sample grid"
    err = capsys.readouterr().err
    for step in (3, 6):                                 # one line each, in the log too; the run went on
        assert f"warning: {what} failed at step {step} (RuntimeError: injected); the checkpoint of this step is " \
               f"saved and training goes on" in err
    assert [(m["step"], m["in"], m["error"]) for m in logged(out, "error")] == [(3, what, "RuntimeError: injected"),
                                                                                (6, what, "RuntimeError: injected")]
    assert [m["step"] for m in logged(out)] == [1, 2, 3, 4, 5, 6]
    ck = checkpoint.load(str(out / "ckpt.pt"))
    assert ck["step"] == 6 and ck["finished"] and ck["saved_by"] == "end of run"
    assert checkpoint.load(str(out / "ckpt_e001.pt"))["step"] == 3
    grids = sorted(f for f in os.listdir(out) if f.startswith("samples_"))
    evals = [m["step"] for m in logged(out, "eval")]
    assert (grids, evals) == (["samples_e001.png", "samples_e002.png"], []) if where == "evaluate" else \
        (grids, evals) == ([], [3, 6])


class FailingArray:
    """A training array whose n-th read raises OSError(EIO), as a failing disk under a memory map would."""

    def __init__(self, a, n):
        self.a, self.n, self.reads = a, n, 0

    def __len__(self):
        return len(self.a)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.n:
            raise OSError(errno.EIO, os.strerror(errno.EIO), "train_t1.npy")
        return self.a[i]


# (what fails, its n-th call, the step saved, what the one line says); 3 steps an epoch, so step 3 was saved anyway
FAULTS = [
    # the data loader reading the batch of step 5 (read 5: fetch(0) before the loop, then one after each step)
    ("load_prepared", 5, 4, "OSError: [Errno 5] Input/output error: 'train_t1.npy' after step 4; saved that step to"),
    # the discriminators' loss of step 5 (2 calls a step), before any optimiser of that step has updated
    ("d_loss", 9, 4, "RuntimeError: injected after step 4; saved that step to"),
    # the generators' loss of step 5: the discriminators have taken step 5's update already, so no finished step
    ("g_loss", 9, 3, "RuntimeError: injected in the middle of step 5, after an optimiser's update, so that state is "
                     "not a finished step and is not saved; the last checkpoint is"),
]


@pytest.mark.parametrize("name,n,saved,says", FAULTS, ids=[f[0] for f in FAULTS])
def test_an_exception_in_the_loop_saves_the_last_finished_step_and_resumes_exactly(data, straight, tmp_path,
                                                                                    monkeypatch, capsys, name, n,
                                                                                    saved, says):
    if name == "load_prepared":
        def faulty(path):
            d = load_prepared(path)
            # get_data() first reads each training subject once (training_levels, the checkpoint's prep levels)
            d.train_t1 = FailingArray(d.train_t1, n + len(dict.fromkeys(d.meta["slice_subject"]["train"])))
            return d
        monkeypatch.setattr(train, "load_prepared", faulty)
        raised = OSError
    else:
        monkeypatch.setattr(train, name, nth_call(getattr(train, name), n, boom))
        raised = RuntimeError
    out = tmp_path / "run"
    with pytest.raises(raised):                         # re-raised for the traceback (exit status 1)
        train.main(["--data", data, "--out", str(out), *TINY, "--eval-every", "0", "--max-steps", "6"])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("step ")]
    assert len(err) == 1 and err[0].startswith("error: " + says), err
    if saved == 4:
        assert err[0].endswith(f"{out}/ckpt.pt; continue with: python train.py --resume {out}/ckpt.pt")
    else:
        assert err[0].endswith(f"{out}/ckpt.pt at step 3")
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt", "ckpt_e001.pt", "config.json", "metrics.jsonl"]
    ck = checkpoint.load(str(out / "ckpt.pt"))
    assert ck["step"] == saved and not ck["finished"]
    assert ck["saved_by"] == ("end of epoch" if saved == 3 else f"error ({raised.__name__})")
    # lost: no finished step, or for g_loss step 4, the one since the last save (the loader fails before step 4's
    # line is logged: the next batch is read while the device works, before the losses are read)
    assert [m["step"] for m in logged(out)] == ([1, 2, 3] if name == "load_prepared" else [1, 2, 3, 4])
    monkeypatch.undo()
    resume_to_6(out / "ckpt.pt", straight)                       # the run goes on as if never stopped


def test_a_nan_loss_stops_the_run_without_saving_over_the_last_good_checkpoint(data, tmp_path, monkeypatch, capsys):
    """rec of step 5 is NaN (l1_loss: 4 calls a step): the run stops at that step with one sentence and ckpt.pt stays
    the --save-minutes checkpoint of step 4, finite, which resumes."""
    monkeypatch.setattr(train, "l1_loss", nth_call(train.l1_loss, 17, lambda x, y: torch.tensor(float("nan"))))
    out = tmp_path / "run"
    argv = ["--data", data, "--out", str(out), *TINY, "--eval-every", "0", "--max-steps", "6", "--save-minutes", "1e-9"]
    with pytest.raises(Diverged) as e:
        train.main(argv)
    assert e.value.status == 1
    assert str(e.value) == (f"non-finite loss at step 5 (G = nan, rec = nan); stopped without saving, so the last "
                            f"checkpoint is {out}/ckpt.pt at step 4; try a lower --lr or --sn")
    ck = checkpoint.load(str(out / "ckpt.pt"))
    assert ck["step"] == 4 and ck["saved_by"] == "--save-minutes 1e-09"
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert [m["step"] for m in logged(out)] == [1, 2, 3, 4]
    monkeypatch.undo()
    assert train.main(["--resume", str(out / "ckpt.pt"), "--max-steps", "6"]) == 0


def test_nan_weights_behind_a_finite_loss_are_never_saved(data, tmp_path, monkeypatch):
    """The update of step 2 makes a weight NaN (its loss was still finite): the save after it refuses."""
    real = train.train_step
    def poisoned(model, *a, **k):
        losses = real(model, *a, **k)
        if poisoned.calls == 1:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")
        poisoned.calls += 1
        return losses
    poisoned.calls = 0
    monkeypatch.setattr(train, "train_step", poisoned)
    out = tmp_path / "run"
    with pytest.raises(Diverged, match=f"the weights hold NaN/Inf after step 2 although no logged loss did; "
                                             f"stopped without saving them, so the last checkpoint is {out}/ckpt.pt "
                                             f"at step 1"):
        train.main(["--data", data, "--out", str(out), *TINY, "--eval-every", "0", "--max-steps", "6",
                    "--save-minutes", "1e-9"])
    assert checkpoint.load(str(out / "ckpt.pt"))["step"] == 1


def test_a_mid_epoch_checkpoint_by_time_resumes_exactly(data, straight, tmp_path, monkeypatch):
    """--save-minutes writes ckpt.pt between epoch ends; the one of step 4 (mid-epoch 2) + 2 steps == 6 steps."""
    copies, real = {}, checkpoint.save
    def save_and_keep(path, *a, **k):
        real(path, *a, **k)
        step = a[5]
        copies[step] = shutil.copy(path, f"{path}.step{step}")
    monkeypatch.setattr(checkpoint, "save", save_and_keep)
    out = tmp_path / "run"
    assert train.main(["--data", data, "--out", str(out), *TINY, "--eval-every", "0", "--max-steps", "6",
                       "--save-minutes", "1e-9"]) == 0
    monkeypatch.undo()
    by = {s: checkpoint.load(p)["saved_by"] for s, p in copies.items()}
    assert by == {1: "--save-minutes 1e-09", 2: "--save-minutes 1e-09", 3: "end of epoch",
                  4: "--save-minutes 1e-09", 5: "--save-minutes 1e-09", 6: "end of run"}
    ck = checkpoint.load(copies[4])
    assert (ck["epoch"], ck["finished"]) == (1, False)          # one epoch and a step finished
    mid = tmp_path / "mid"
    mid.mkdir()
    shutil.copy(copies[4], mid / "ckpt.pt")
    resume_to_6(mid / "ckpt.pt", straight)


def test_save_minutes_defaults():
    """A crash costs at most ~10 minutes on a CPU run and ~30 on a GPU run (the poster's settings)."""
    cpu = lambda flags: train.resolve_config(flags, full=False, resume=None)[0]["save_minutes"]
    assert cpu({"device": "cpu"}) == 10 and train.resolve_config({"device": "cpu"}, True, None)[0]["save_minutes"] == 30
    assert cpu({"device": "cpu", "save_minutes": 0}) == 0


def test_kill_9_loses_at_most_the_save_interval(tmp_path):
    """kill -9 at a random time (seeded) of a run with --save-minutes 0.02 (1.2 s) and epochs of 120 steps (no epoch
    end before the kill): ckpt.pt loads, and the steps logged after its step took at most 1.2 s (plus a step or two
    and a save); it resumes."""
    seed = 25
    wait = random.Random(seed).uniform(0.5, 4.0)
    data = prepare_phantom(str(tmp_path / "data"), n_train=240, n_test=1, slices=1, size=(64, 64), seed=0,
                           progress=False)
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--data", data, "--out", str(out), *TINY,
                          "--eval-every", "0", "--epochs", "100000", "--save-minutes", "0.02"], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                         env={**os.environ, "UNIT_ATTN": "naive"})
    deadline = time.time() + 300
    while not (out / "ckpt.pt").exists() and time.time() < deadline and p.poll() is None:   # the first time save
        time.sleep(0.05)
    time.sleep(wait)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    ck = checkpoint.load(str(out / "ckpt.pt"))
    steps = logged(out)
    last, at = steps[-1], {m["step"]: m["time"] for m in steps}
    assert ck["saved_by"] == "--save-minutes 0.02" and ck["step"] in at, (seed, wait, ck["step"])
    per_step = (last["time"] - steps[0]["time"]) / max(1, last["step"] - steps[0]["step"])
    lost = last["time"] - at[ck["step"]]
    assert lost <= 1.2 + 2 * per_step + 0.5, (seed, wait, ck["step"], last["step"], lost, per_step)
    assert train.main(["--resume", str(out / "ckpt.pt"), "--max-steps", str(ck["step"] + 1)]) == 0
