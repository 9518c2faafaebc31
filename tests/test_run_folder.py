"""Never lose a run (train.py, as a user runs it): a new run into a folder holding a trained run is refused
(--overwrite says what it deletes), --resume of a copy continues in the copy, a second process on a run folder
is refused by the lock (and a killed one leaves no stale lock), a full disk or a read-only file system stops
training with one sentence and the last checkpoint intact, unpaired data trains without evaluation, and
--dry-run prints the data's size. Each checks the exact files left behind."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

import train
from unit import checkpoint
from unit.data import prepare_phantom, write_prepared

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--full", "--width", "4", "--batch-size", "2", "--device", "cpu", "--eval-every", "0", "--log-every", "1"]
ENV = {**os.environ, "UNIT_ATTN": "naive"}
RUN = [".lock", "ckpt.pt", "ckpt_e001.pt", "config.json", "metrics.jsonl"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "phantom")
    prepare_phantom(path, n_train=6, n_test=3, slices=1, size=(64, 64), seed=0, progress=False)   # 3 steps/epoch
    return path


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished run of 6 steps (2 epochs), kept checkpoint of epoch 1; tests copy it before touching it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    r = train_py("--data", data, "--out", str(out), *TINY, "--max-steps", "6", "--save-epochs", "1")
    assert r.returncode == 0, r.stderr
    return out


def train_py(*args, fault=None):
    """train.py as a user runs it; fault = (errno name, file name, nth opening): run through tests/faults.py."""
    pre = [os.path.join(ROOT, "tests", "faults.py"), *map(str, fault)] if fault else []
    return subprocess.run([sys.executable, *pre, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def snapshot(folder):
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder)) if f != ".lock"}


def steps(folder):
    return [m["step"] for m in map(json.loads, open(folder / "metrics.jsonl")) if m["kind"] == "train"]


def one_sentence(r, status):
    """The one line a failed run prints on stderr (besides its progress lines), without 'error: '."""
    err = [line for line in r.stderr.splitlines() if not line.startswith("step ")]
    assert r.returncode == status, r.stderr
    assert "Traceback" not in r.stderr and len(err) == 1 and err[0].startswith("error: "), r.stderr
    return err[0][len("error: "):]


def test_a_new_run_into_a_trained_folder_is_refused_and_overwrite_says_what_it_deletes(data, trained, tmp_path):
    out = copy_run(trained, tmp_path / "run")
    before = snapshot(out)
    r = train_py("--data", data, "--out", str(out), *TINY, "--max-steps", "3")
    assert one_sentence(r, 2) == (
        f"run folder {out} is taken: it holds a trained run ({out}/ckpt.pt, step 6); continue it with --resume "
        f"{out}/ckpt.pt, pass another --out, or pass --overwrite to delete its checkpoints, metrics.jsonl and sample "
        f"grids")
    assert snapshot(out) == before and checkpoint.load(str(out / "ckpt.pt"))["step"] == 6

    r = train_py("--data", data, "--out", str(out), *TINY, "--max-steps", "3", "--save-epochs", "0", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (f"--overwrite: deleted the earlier run's files in {out}: ckpt.pt, ckpt_e001.pt, config.json, "
            f"metrics.jsonl\n") in r.stdout
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt", "config.json", "metrics.jsonl"]
    assert checkpoint.load(str(out / "ckpt.pt"))["step"] == 3 and steps(out) == [1, 2, 3]   # no line of the old run


def test_resume_of_a_copy_continues_in_the_copy(trained, tmp_path):
    src, copy = copy_run(trained, tmp_path / "run"), tmp_path / "copy"
    copy.mkdir()
    shutil.copyfile(src / "ckpt_e001.pt", copy / "ckpt.pt")      # a branch from epoch 1, at step 3
    before = snapshot(src)
    r = train_py("--resume", str(copy / "ckpt.pt"), "--max-steps", "5")
    assert r.returncode == 0, r.stderr
    assert f"resumed from {copy}/ckpt.pt, continuing in {copy}" in r.stdout
    assert snapshot(src) == before                                # the source run is untouched
    assert sorted(os.listdir(copy)) == [".lock", "ckpt.pt", "config.json", "metrics.jsonl"]
    ck = checkpoint.load(str(copy / "ckpt.pt"))
    assert ck["step"] == 5 and ck["config"]["out"] == str(copy) and steps(copy) == [4, 5]
    assert json.load(open(copy / "config.json"))["out"] == str(copy)

    # resuming the source's kept epoch 1 in its own folder would replace its later ckpt.pt (step 6) ...
    r = train_py("--resume", str(src / "ckpt_e001.pt"), "--max-steps", "5")
    assert one_sentence(r, 2).startswith(f"run folder {src} is taken: its {src}/ckpt.pt is at step 6, later than "
                                         f"{src}/ckpt_e001.pt (step 3)")
    # ... and a resumed run into a folder holding another run's checkpoints is refused as a new one is
    r = train_py("--resume", str(copy / "ckpt.pt"), "--out", str(src), "--max-steps", "6")
    assert "it holds another run" in one_sentence(r, 2)
    assert snapshot(src) == before and checkpoint.load(str(src / "ckpt.pt"))["step"] == 6


def test_the_log_of_a_run_that_saved_no_checkpoint_is_not_appended_to(data, trained, tmp_path):
    """A run killed before its first save leaves config.json and metrics.jsonl but no checkpoint: a new run there
    would add its lines to that log, so it is refused like a trained folder; a folder with only a config.json (a
    run that stopped before its first step) is taken over."""
    out = tmp_path / "run"
    os.makedirs(out)
    for f in ("config.json", "metrics.jsonl"):
        shutil.copyfile(trained / f, out / f)
    before = snapshot(out)
    r = train_py("--data", data, "--out", str(out), *TINY, "--max-steps", "3", "--save-epochs", "0")
    assert one_sentence(r, 2) == (f"run folder {out} is taken: it holds metrics.jsonl of a run that saved no "
                                  f"checkpoint; pass another --out, or pass --overwrite to delete its checkpoints, "
                                  f"metrics.jsonl and sample grids")
    assert snapshot(out) == before
    r = train_py("--data", data, "--out", str(out), *TINY, "--max-steps", "3", "--save-epochs", "0", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert steps(out) == [1, 2, 3]
    os.remove(out / "metrics.jsonl"), os.remove(out / "ckpt.pt")                # only config.json is left
    r = train_py("--data", data, "--out", str(out), *TINY, "--max-steps", "2", "--save-epochs", "0")
    assert r.returncode == 0, r.stderr
    assert steps(out) == [1, 2]


def test_a_second_process_on_a_run_folder_is_refused_and_a_killed_one_leaves_no_lock(data, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--data", data, "--out", str(out), *TINY,
                              "--epochs", "100000"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        for line in first.stdout:                                  # printed after the lock was taken
            if line.startswith("model:"):
                break
        r = train_py("--data", data, "--out", str(out), *TINY, "--max-steps", "3", "--seed", "7")
        assert one_sentence(r, 2) == (f"run folder {out} is in use by PID {first.pid} on {socket.gethostname()} "
                                      f"(its lock {out}/.lock); wait for it, or pass another --out")
    finally:
        first.kill()                                               # kill -9: no clean-up of its own
        first.communicate(timeout=60)
    assert json.load(open(out / "config.json"))["seed"] == 0      # the refused run wrote nothing
    lines = steps(out)
    assert lines == list(range(1, len(lines) + 1))                # one writer's lines, none interleaved
    # the killed run's lock went with it: the folder can be used at once (--overwrite: whether the killed run got
    # to log a step or save its first checkpoint depends on timing)
    r = train_py("--data", data, "--out", str(out), *TINY, "--max-steps", "3", "--save-epochs", "0", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt", "config.json", "metrics.jsonl"]
    assert checkpoint.load(str(out / "ckpt.pt"))["step"] == 3 and steps(out) == [1, 2, 3]


@pytest.mark.parametrize("fault,stopped,last", [
    (("ENOSPC", "ckpt.pt", 2), 6, 3),                 # the second save finds the disk full
    (("EROFS", "ckpt_e001.pt", 1), 3, 3),             # the kept copy of epoch 1: the file system turned read-only
    (("ENOSPC", "metrics.jsonl", 1), 1, None),        # the first loss line: no partial line is left
])
def test_a_failed_write_stops_training_with_one_sentence_and_the_last_checkpoint_intact(data, tmp_path, fault,
                                                                                        stopped, last):
    out = tmp_path / "run"
    r = train_py("--data", data, "--out", str(out), *TINY, "--max-steps", "9", "--save-epochs", "1", fault=fault)
    msg = one_sentence(r, 1)
    reason = {"ENOSPC": "No space left on device", "EROFS": "Read-only file system"}[fault[0]]
    assert msg.startswith(f"cannot write {out}/{fault[1]} ({reason}; ") and " free there); " in msg, msg
    then = (f"the last checkpoint is {out}/ckpt.pt at step {last}" if last else "this run saved no checkpoint")
    assert msg.endswith(f"; training stopped at step {stopped} and {then}"), msg
    left = sorted(os.listdir(out))
    if last:
        assert left == sorted([".lock", "ckpt.pt", "config.json", "metrics.jsonl"] +
                              (["ckpt_e001.pt"] if fault[1] == "ckpt.pt" else []))
        assert checkpoint.load(str(out / "ckpt.pt"))["step"] == last
        assert steps(out) == list(range(1, stopped + 1))
    else:
        assert left == [".lock", "config.json", "metrics.jsonl"] and (out / "metrics.jsonl").stat().st_size == 0


def _can_mount_tmpfs():
    if not shutil.which("unshare"):
        return "no unshare command"
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                        "mount -t tmpfs -o size=64k tmpfs /mnt 2>&1 || mount -t tmpfs -o size=64k tmpfs /tmp"],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else f"cannot mount a tmpfs in a user namespace here: {r.stderr.strip()[:200]}"


def test_a_really_full_file_system_stops_training_cleanly(data, trained, tmp_path):
    """On a tmpfs of 1.5 checkpoints (unshare: a user and mount namespace, where the runner allows it) the
    second save runs out of space: torch.save's real failure, not an injected one."""
    why = _can_mount_tmpfs()
    if why:
        pytest.skip(why)
    mnt, keep = tmp_path / "mnt", tmp_path / "kept"
    mnt.mkdir()
    size = os.path.getsize(trained / "ckpt.pt")                  # the same settings' checkpoint
    script = (f"mount -t tmpfs -o size={size * 3 // 2 // 1024}k tmpfs {mnt} && "
              f"{sys.executable} {ROOT}/train.py --data {data} --out {mnt}/run {' '.join(TINY)} --max-steps 9 "
              f"--save-epochs 0; echo status $?; cp -a {mnt}/run {keep}")
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert "status 1\n" in r.stdout, r.stdout + r.stderr
    err = [line for line in r.stderr.splitlines() if not line.startswith("step ")]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert err[0].startswith(f"error: cannot write {mnt}/run/ckpt.pt (No space left on device; ") and \
        err[0].endswith(f"training stopped at step 6 and the last checkpoint is {mnt}/run/ckpt.pt at step 3"), err[0]
    assert sorted(os.listdir(keep)) == [".lock", "ckpt.pt", "config.json", "metrics.jsonl"]
    assert checkpoint.load(str(keep / "ckpt.pt"))["step"] == 3


def test_unpaired_data_trains_without_evaluation_and_draws_unpaired_grids(tmp_path):
    """5 T1 and 3 T2 test slices (PNG folders): the first epoch's evaluation crashed on them."""
    rng = np.random.default_rng(0)
    s = lambda n: rng.random((n, 64, 64)).astype(np.float16)
    d = tmp_path / "unpaired"
    write_prepared(str(d), s(6), s(4), s(5), s(3), {"source": "folders", "layout": "folders", "paired": False,
                                                    "seed": 0})
    out = tmp_path / "run"
    r = train_py("--data", str(d), "--out", str(out), *TINY, "--eval-every", "1", "--max-steps", "4")
    assert r.returncode == 0, r.stderr
    note = [line for line in r.stdout.splitlines() if line.startswith("note:")]
    assert note == [f"note: {d} is not paired (meta.json: paired=false), so the per-epoch evaluation is skipped "
                    f"(translated slices have no pixel-aligned ground truth, as evaluate.py says); sample grids are "
                    f"still written and show unpaired test slices"]
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt", "ckpt_e001.pt", "config.json", "metrics.jsonl",
                                       "samples_e001.png", "samples_e002.png"]
    assert all(json.loads(line)["kind"] == "train" for line in open(out / "metrics.jsonl"))
    from PIL import Image
    assert Image.open(out / "samples_e002.png").size == (4 * 64, 6 * 64)     # 4 test slices x 6 rows


def test_dry_run_prints_the_size_the_run_will_use(data, capsys):
    assert train.main(["--dry-run", "--data", data, "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["size"] == [64, 64]            # the data's, not the preset's 96x80
    assert train.main(["--dry-run", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["size"] == "96x80"            # the phantom drawn at the preset's
