"""experiments/realmri.py, the real-data benchmark in one command, on a small synthetic BraTS tree (three skull-
stripped heads, 1 mm, stored LPS) with a split of its own: prepared at 2 mm into 112x96 slices, two seeds
trained, one table with the reference rows first, a row per run and per variant, t-intervals over patients that
contain each mean, each run against the strongest reference row; a second call skips the finished runs, and a variant name is bound to its flags."""
import json
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])                      # LPS, 1 mm


def brats_tree(root, cases):
    rng = np.random.default_rng(0)
    shape = (90, 110, 16)
    x, y, z = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    for i, case in enumerate(cases):
        brain = ((x - 45) / (30 + i)) ** 2 + ((y - 55) / 40) ** 2 + ((z - 8) / 7) ** 2 < 1
        t1 = np.where(brain, 300 + 3 * x + rng.random(shape) * 30, 0)
        t2 = np.where(brain, 900 - 5 * x + 4 * z + rng.random(shape) * 30, 0)
        d = os.path.join(root, case)
        os.makedirs(d)
        for q, v in (("t1", t1), ("t2", t2)):
            nib.save(nib.Nifti1Image(v.astype(np.int16), AFFINE), os.path.join(d, f"{case}_{q}.nii.gz"))


def test_benchmark_table_skip_and_variant_names(tmp_path):
    cases = ["Brats18_X_1", "Brats18_Y_1", "Brats18_Z_1"]
    src, out = str(tmp_path / "src"), str(tmp_path / "bench")
    brats_tree(src, cases)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": cases[:1], "test": cases[1:]}))
    env = {**os.environ, "UNIT_ATTN": "naive"}
    cmd = [sys.executable, "experiments/realmri.py", src, "--out", out, "--split", str(split),
           "--", "--full", "--width", "4", "--batch-size", "2", "--max-steps", "2", "--eval-every", "0"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.load(open(os.path.join(out, "data", "meta.json")))
    assert meta["shape"] == [112, 96] and meta["spacing"] == 2 and meta["test_subjects"] == cases[1:]
    md = open(os.path.join(out, "realmri.md")).read()
    table = json.load(open(os.path.join(out, "table.json")))["checkpoints"]
    assert [os.path.basename(os.path.dirname(t["ckpt"])) for t in table] == ["default-seed0", "default-seed1"]
    for seed, t in enumerate(table):
        row = next(line for line in md.splitlines() if line.startswith(f"| default seed {seed} |"))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[1] == "2" and cells[2].endswith((" s", " min"))                     # steps, wall time
        m, lo, hi = (float(v) for v in re.match(r"([-\d.]+) \[([-\d.]+), ([-\d.]+)\]", cells[3]).groups())
        assert m == round(t["res"]["T1"]["ssim_mask"], 3) and lo <= m <= hi       # brain SSIM T1 [interval]
        per = t["per_subject"]["T1"]["ssim_mask"]
        assert len(per) == 2 and abs(np.mean(per) - t["res"]["T1"]["ssim_mask"]) < 1e-9   # a mean over patients
    assert "| **default: mean over 2 seeds** |" in md and "| default: sd over seeds |" in md
    lines = md.splitlines()
    at = lambda text: next(i for i, line in enumerate(lines) if line.startswith(text))
    assert at("| identity (input as output) |") < at("| inverted input") < at("| intensity LUT") < at("| default seed 0")
    assert "SSIM core T1" in md and "SSIM 3-D brain T1" in md                       # 13 slices a patient: volumes
    for seed, t in enumerate(table):                      # each run against the strongest reference row
        row = lines[at(f"| default seed {seed} | T2 |")]
        ref, d, lo, hi = t["versus"]["T2"]["ssim_mask"]
        assert f"{d:.3f} [{lo:.3f}, {hi:.3f}] vs {ref}" in row
    assert "| real targets |" in md and "Menze" in md and os.path.isfile(os.path.join(out, "realmri.png"))
    # again, --match-level: nothing to train; the level-matched table beside the first, whose translations and extra
    # reference rows have each patient's brain mean at the training targets' mean level
    again = cmd[:cmd.index("--")] + ["--match-level"] + cmd[cmd.index("--"):]
    r = subprocess.run(again, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and r.stdout.count("skipped") == 2, r.stdout[-2000:]
    md = open(os.path.join(out, "realmri-level.md")).read()
    js = json.load(open(os.path.join(out, "table-level.json")))["checkpoints"][0]["res"]
    assert "| intensity LUT, level matched |" in md and "| inverted input, level matched |" in md and "Level matched" in md
    assert f"T1w {js['levels']['T1']:.3f}" in md and 0 < js["levels"]["T1"] < 1
    assert os.path.getmtime(os.path.join(out, "realmri.md")) < os.path.getmtime(os.path.join(out, "realmri-level.md"))
    r = subprocess.run(cmd[:-2] + ["--max-steps", "3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 2 and "variant default of" in r.stderr and "another --name" in r.stderr
