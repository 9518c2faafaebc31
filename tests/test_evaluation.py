"""The paired bootstrap over test subjects against cases with known answers, and evaluate.py with
several checkpoints."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from unit.data import prepare_phantom
from unit.evaluation import paired_bootstrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bootstrap_two_subjects_has_the_known_interval():
    # subjects with differences 0 and 1: a resample holds {0, 0}, {0, 1} or {1, 1}, means 0, 0.5, 1 with
    # probabilities 1/4, 1/2, 1/4; the 2.5% and 97.5% percentiles are therefore 0 and 1
    assert paired_bootstrap([0.0, 1.0], ["a", "b"]) == (0.5, 0.0, 1.0)


def test_bootstrap_resamples_subjects_not_slices():
    r = np.random.default_rng(0)
    d = r.standard_normal(100)
    # one subject: every resample is that subject, so the interval is a point, however its slices vary
    mean, lo, hi = paired_bootstrap(d, ["s"] * 100)
    assert mean == pytest.approx(d.mean()) and lo == pytest.approx(mean) and hi == pytest.approx(mean)
    # 20 subjects of 10 identical slices each give the interval of 20 subjects of one slice each
    per_subject = r.standard_normal(20)
    ten = paired_bootstrap(np.repeat(per_subject, 10), np.repeat(np.arange(20), 10))
    one = paired_bootstrap(per_subject, np.arange(20))
    assert ten == pytest.approx(one)
    # unequal slice counts weigh subjects by their slices: A (3 slices of 0) and B (1 slice of 1)
    assert paired_bootstrap([0, 0, 0, 1.0], ["A", "A", "A", "B"])[0] == pytest.approx(0.25)


def test_bootstrap_interval_matches_the_normal_approximation():
    # many independent subjects: the 95% interval of a mean is mean +- 1.96 sd / sqrt(n), within a few %
    d = np.random.default_rng(1).standard_normal(400) + 0.3
    mean, lo, hi = paired_bootstrap(d, np.arange(400), n_boot=4000)
    half = 1.96 * d.std() / np.sqrt(400)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.08) and lo < mean < hi
    assert paired_bootstrap(np.r_[d, np.nan], np.arange(401), n_boot=4000) == (mean, lo, hi)   # NaN slices left out


def test_evaluate_several_checkpoints(tmp_path):
    data = str(tmp_path / "phantom")
    prepare_phantom(data, n_train=4, n_test=3, slices=1, size=(64, 64), seed=0, progress=False)
    env = {**os.environ, "UNIT_ATTN": "naive"}
    r = subprocess.run([sys.executable, "train.py", "--data", data, "--out", str(tmp_path / "run"), "--full", "--width",
                        "4", "--batch-size", "2", "--device", "cpu", "--eval-every", "0", "--max-steps", "3",
                        "--save-epochs", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    first, last = str(tmp_path / "run" / "ckpt_e001.pt"), str(tmp_path / "run" / "ckpt.pt")
    r = subprocess.run([sys.executable, "evaluate.py", first, last, first, "--csv", str(tmp_path / "t.csv"),
                        "--json", str(tmp_path / "t.json")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Paired differences to the first row" in r.stdout and "3 test subjects" in r.stdout
    res = json.load(open(tmp_path / "t.json"))["checkpoints"]
    assert [c["epoch"] for c in res] == [1, 2, 1]
    assert all(v == [0.0, 0.0, 0.0] for c in ("T1", "T2") for v in res[2]["diff"][c].values())   # itself: 0
    d, lo, hi = res[1]["diff"]["T1"]["ssim"]
    assert d == pytest.approx(res[1]["res"]["T1"]["ssim"] - res[0]["res"]["T1"]["ssim"]) and lo <= d <= hi
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert len(rows) == 3 and rows[0]["d_ssim_T1"] == "" and float(rows[1]["ssim_T1"]) == pytest.approx(
        res[1]["res"]["T1"]["ssim"])
