"""experiments/poster.py, the whole study in one command, on a tiny phantom: its tables against evaluate()
run here on the same checkpoints (mean and sample sd over seeds recomputed with NumPy), and a second call
that skips the finished runs and resumes an interrupted one to the same weights."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import train_tiny
from unit.checkpoint import load_model
from unit.data import load_prepared, prepare_phantom
from unit.evaluation import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_poster_study_tables_skip_and_resume(tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "runs")
    prepare_phantom(data, n_train=4, n_test=3, slices=1, size=(64, 64), seed=0, progress=False)
    cmd = [sys.executable, "experiments/poster.py", "--variants", "none,encoder-sn-cl", "--seeds", "2", "--epochs",
           "2", "--out", out, "--", "--data", data, "--width", "4", "--batch-size", "2",
           "--eval-every", "0", "--full", "--device", "cpu"]
    env = {**os.environ, "UNIT_ATTN": "naive"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    md = open(os.path.join(out, "poster.md")).read()

    # table 1 (epoch 2 of 2) and table 2 (epochs 1 and 2): each cell = mean ± sd over the two seeds
    d = load_prepared(data)
    def scores(name, epoch):
        s = []
        for seed in (0, 1):
            model, ck = load_model(os.path.join(out, f"{name}-seed{seed}", f"ckpt_e{epoch:03d}.pt"))
            s.append(evaluate(model, d, "cpu", ck["config"]["channels"])[0])
        return s
    def expect(s, c, k="ssim"):
        v = np.array([x[c][k] for x in s])
        return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}"
    base, best = scores("none", 2), scores("encoder-sn-cl", 2)
    row = next(line for line in md.splitlines() if line.startswith("| Attention in encoder with CL and SN | 0.7443"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[3:5] == [expect(best, "T1"), expect(best, "T2")]
    assert cells[5:7] == [expect(best, "T1", "ssim_mask"), expect(best, "T2", "ssim_mask")]
    diff = np.array([b["T1"]["ssim"] - a["T1"]["ssim"] for a, b in zip(base, best)])   # paired by seed
    assert cells[11] == f"{diff.mean():+.4f} ± {diff.std(ddof=1):.4f}"
    early = scores("none", 1)
    assert f"| Baseline (gray scale) | 1 | {expect(early, 'T1')} | {expect(early, 'T2')} |" in md
    assert re.search(r"\| oracle \(noiseless target\) \| \| \| 0\.\d{4} \|", md)

    # interrupt one run after its first epoch; a second call skips the other three and resumes it exactly
    victim = os.path.join(out, "encoder-sn-cl-seed1")
    want = torch.load(os.path.join(victim, "ckpt_e002.pt"), weights_only=True)
    os.remove(os.path.join(victim, "ckpt_e002.pt"))
    shutil.copyfile(os.path.join(victim, "ckpt_e001.pt"), os.path.join(victim, "ckpt.pt"))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("finished (") == 3 and "encoder-sn-cl seed 1: resuming from" in r.stdout
    got = torch.load(os.path.join(victim, "ckpt_e002.pt"), weights_only=True)
    assert got["step"] == want["step"]
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k
    assert open(os.path.join(out, "poster.md")).read().split("## Table 1")[1] == md.split("## Table 1")[1]


def test_poster_study_refuses_what_it_sets_itself():
    r = subprocess.run([sys.executable, "experiments/poster.py", "--variants", "none,nope"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown ['nope']" in r.stderr
    r = subprocess.run([sys.executable, "experiments/poster.py", "--", "--seed", "3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "are the study's to set" in r.stderr


@pytest.mark.parametrize("epochs,want", [(100, ([1, 25, 50, 75, 100], 75)), (6, ([1, 2, 3, 5, 6], 5)),
                                         (4, ([1, 2, 3, 4], 3)), (1, ([1], 1))])
def test_table_epochs_scale_the_posters(epochs, want):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    try:
        import poster
    finally:
        sys.path.pop(0)
    assert poster.table_epochs(epochs) == want


def test_a_variant_is_named_in_one_place(tmp_path):
    """unit/variants.py names each of the poster's variants as its key (train.py's default --out) and labels it;
    a setting that changes the objective (--gan-loss) or the attention's places gets another folder; a study
    refuses a run folder whose checkpoint has other settings than it plans instead of taking it for its own."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import poster
    import study
    import train
    from unit import variants

    def config(flags):
        given, full, *_ = train.parse_args(flags)
        return train.resolve_config(given, full, resume=None)[0]

    for key, label, flags, *_ in poster.VARIANTS:
        cfg = config(flags)
        train.check_config(cfg, {})
        assert variants.name(cfg) == key and cfg["out"] == f"runs/{key}"
    assert variants.label(config(["--attn", "encoder", "--sn", "--charbonnier"])) == "attention in encoder +SN +CL"
    lsgan = config(["--gan-loss", "lsgan"])
    assert variants.name(lsgan) == "none-lsgan" and variants.label(lsgan) == "baseline lsgan loss"
    placed = config(["--attn", "discriminator+encoder", "--sn"])                # one spelling of a placement
    train.check_config(placed, {})
    assert variants.name(placed) == "encoder+discriminator-sn" and placed["out"] == "runs/encoder+discriminator-sn"
    assert variants.label(placed) == "attention in encoder+discriminator +SN"
    assert variants.name(config(["--attn", "generator+encoder"])) == "both"    # the poster's word, as ever

    data = str(tmp_path / "data")
    prepare_phantom(data, n_train=2, n_test=1, slices=1, size=(64, 64), seed=0, progress=False)
    folder = os.path.dirname(train_tiny(data, tmp_path / "none-seed0", 1))
    tiny = ["--data", data, "--full", "--width", "4", "--batch-size", "2", "--device", "cpu", "--eval-every", "0"]
    study.same_run(folder, study.dry_run(tiny))                              # the run it plans: reused
    with pytest.raises(study.UserError, match=r"gan_loss: 'bce', not 'lsgan'.*move it away or pass another --out"):
        study.same_run(folder, study.dry_run([*tiny, "--gan-loss", "lsgan"]))
    with pytest.raises(study.UserError, match=r"attn: 'none', not 'discriminator'"):
        study.same_run(folder, study.dry_run([*tiny, "--attn", "discriminator"]))
