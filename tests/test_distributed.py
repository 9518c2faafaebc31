"""torchrun train.py on the CPU (gloo, 2 processes) on a tiny phantom: 2 ranks x batch b train the
same model as 1 process x batch 2b, a 2-rank run resumes exactly, and a SIGTERM on one rank stops
both after one save. Each torchrun start costs ~10 s here (two processes importing torch)."""
import os
import subprocess
import sys
import time

import pytest
import torch

from unit.checkpoint import build_model, load_model
from unit.data import load_prepared, prepare_phantom
from unit.evaluation import translate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
FLAGS = ["--full", "--width", "4", "--device", "cpu", "--eval-every", "0", "--sn", "--attn",
         "encoder+generator+discriminator", "--log-every", "1"]
ENV = {**os.environ, "UNIT_ATTN": "naive", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "phantom")
    prepare_phantom(path, n_train=8, n_test=3, slices=1, size=(64, 64), seed=0, progress=False)
    return path


def train(*args, nproc=1, wait=True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = launcher + [os.path.join(ROOT, "train.py"), *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def state(path):
    return torch.load(os.path.join(path, "ckpt.pt"), weights_only=True)


def comparable(sd):
    """The weights and buffers whose values matter. Left out: the conv biases right before an
    InstanceNorm (ResBlock body.0 and body.3), which the norm subtracts again: their gradient is 0
    in exact arithmetic, and Adam turns its rounding noise into steps of +-lr of random sign."""
    return {k: v for k, v in sd.items() if v.is_floating_point() and not k.endswith(("body.0.bias", "body.3.bias"))}


def relative_diff(a, b, start):
    """||a - b|| / ||b - start|| over the comparable tensors: how much of b's training movement a misses."""
    a, b, start = comparable(a), comparable(b), comparable(start)
    flat = lambda sd: torch.cat([sd[k].flatten() for k in sorted(b)])
    return ((flat(a) - flat(b)).norm() / (flat(b) - flat(start)).norm()).item()


def test_two_ranks_match_one_process_and_resume_exactly(data, tmp_path):
    run = lambda name, *a, **k: train("--data", data, "--out", str(tmp_path / name), *FLAGS, *a, **k)
    r = run("ddp", "--batch-size", "2", "--max-steps", str(STEPS), nproc=2)
    assert "batch 2 per domain x 2 processes = 4" in r.stdout
    run("one", "--batch-size", "4", "--max-steps", str(STEPS))
    run("half", "--batch-size", "2", "--max-steps", str(STEPS))         # control: rank 0's share only
    ddp, one, half = (state(tmp_path / n) for n in ("ddp", "one", "half"))
    assert ddp["step"] == one["step"] == STEPS and ddp["config"]["world_size"] == 2

    # The 2-rank run may differ from the 1-process run only by float rounding (gradients summed in
    # another order); training on another batch (rank 0's share alone) must differ far more.
    torch.manual_seed(0)
    start = build_model(one["config"]).state_dict()                     # train.py's initial weights
    diff, control = relative_diff(ddp["model"], one["model"], start), relative_diff(half["model"], one["model"], start)
    print(f"relative difference to 1 process x batch 4: 2 ranks x 2 {diff:.1e}, 1 process x 2 {control:.1e}")
    assert diff < 1e-3 < control / 10, (diff, control)
    # and the two models compute the same translations (the left-out biases included)
    test = load_prepared(data).test_t1[:3]
    outs = {n: translate(load_model(str(tmp_path / n / "ckpt.pt"))[0], test, "a", "cpu", 1) for n in ("ddp", "one", "half")}
    diff, control = ((outs[n] - outs["one"]).abs().max().item() for n in ("ddp", "half"))
    print(f"largest difference of the translations: 2 ranks {diff:.1e}, 1 process x 2 {control:.1e}")
    assert diff < 1e-3 < control / 10, (diff, control)

    # 2 ranks: 2 steps, then --resume to 4 == 4 steps straight, bit for bit
    run("resumed", "--batch-size", "2", "--max-steps", "2", nproc=2)
    r = train("--resume", str(tmp_path / "resumed" / "ckpt.pt"), "--max-steps", str(STEPS), nproc=2)
    resumed = state(tmp_path / "resumed")
    assert resumed["step"] == STEPS
    for k, v in ddp["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    for k in ("opt_g", "opt_d"):
        for i, s in ddp[k]["state"].items():
            assert torch.equal(s["exp_avg_sq"], resumed[k]["state"][i]["exp_avg_sq"])


def test_resume_with_another_number_of_processes_is_refused(data, tmp_path):
    train("--data", data, "--out", str(tmp_path / "one"), *FLAGS, "--batch-size", "2", "--max-steps", "1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "train.py"), "--resume", str(tmp_path / "one" / "ckpt.pt")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "trained by 1 process(es) and this run has 2" in r.stderr, r.stderr[-2000:]


def test_sigterm_on_one_rank_saves_once_and_stops_all(data, tmp_path):
    out = tmp_path / "run"
    p = train("--data", data, "--out", str(out), *FLAGS, "--batch-size", "2", "--epochs", "100000", nproc=2,
              wait=False)
    lines = []
    for line in p.stdout:                          # rank 0 prints the loss line of step 1 after the first step
        lines.append(line)
        if line.startswith("model:"):
            break
    time.sleep(3)
    workers = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    rank = lambda pid: dict(v.split("=", 1) for v in open(f"/proc/{pid}/environ").read().split("\0") if "=" in v)["RANK"]
    os.kill(next(int(w) for w in workers if rank(w) == "1"), 15)     # rank 1 only
    rest, _ = p.communicate(timeout=120)
    text = "".join(lines) + rest
    assert p.returncode == 0, text[-3000:]
    assert text.count("interrupted (") == 1 and "interrupted (a signal on another rank)" in text, text[-3000:]
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert f"at step {step}: saved" in text and step >= 1
