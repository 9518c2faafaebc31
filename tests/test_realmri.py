"""Real MRI in CI: the two BraTS/TCGA cases of ../shared/realmri (never copied into this repository)
prepared, trained for two steps and written back by evaluate.py --volumes: the output lies on the
source grid (shape, affine) in the right orientation, located by the brain's bounding box in the
source's own voxel order (stored LPS): the translated region (the crop window, on every slice with
brain) is centred on the brain in L-R and A-P, holds all of it, and spans exactly its inferior-superior
extent. A flip of an axis would mirror the region about the volume's centre, and both brains are
off-centre by 1-12 voxels along each axis (the test case, BraTS-GLI-00001-000: 1, 3 and 1), so a
flip moves the region by 2-24 voxels: more than the 1 voxel of rounding allowed here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "realmri"

pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} is absent (the two real cases live beside the "
                                                          f"repository, in ../shared/realmri)")


def test_real_cases_round_trip_onto_the_source_grid(tmp_path):
    env = {**os.environ, "UNIT_ATTN": "naive"}
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, env=env, capture_output=True, text=True,
                                    timeout=900)
    r = run("data/prepare.py", "brats", str(REAL), "--out", str(tmp_path / "d"), "--slices", "all", "--size",
            "208x160", "--n-test", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["paired"] and meta["mask"]["brain_mask"] and len(meta["test_subjects"]) == 1
    r = run("train.py", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "run"), "--full", "--width", "4",
            "--batch-size", "2", "--device", "cpu", "--eval-every", "0", "--max-steps", "2")
    assert r.returncode == 0, r.stderr
    r = run("evaluate.py", str(tmp_path / "run" / "ckpt.pt"), "--volumes", str(REAL), "--layout", "brats", "--out",
            str(tmp_path / "vol"))
    assert r.returncode == 0, r.stderr
    case = meta["test_subjects"][0]
    for q, direction in (("t2w", "t1_to_t2"), ("t1n", "t2_to_t1")):
        src = nib.load(str(REAL / case / f"{case}-{q}.nii.gz"))
        out = nib.load(str(tmp_path / "vol" / f"{case}_{direction}.nii.gz"))
        assert out.shape == src.shape and np.allclose(out.affine, src.affine)
        assert nib.aff2axcodes(out.affine) == ("L", "P", "S")
        brain = np.argwhere(src.get_fdata() != 0)
        support = np.argwhere(out.get_fdata() != 0)                 # the translated slices' crop windows
        b_lo, b_hi, s_lo, s_hi = brain.min(0), brain.max(0), support.min(0), support.max(0)
        for ax in (0, 1):                                           # L-R, A-P: centred, the whole brain inside
            assert abs((s_lo[ax] + s_hi[ax]) / 2 - (b_lo[ax] + b_hi[ax]) / 2) <= 1, (ax, s_lo, s_hi, b_lo, b_hi)
            assert s_lo[ax] <= b_lo[ax] and s_hi[ax] >= b_hi[ax] and s_lo[ax] > 0 and s_hi[ax] < src.shape[ax] - 1
        assert s_lo[2] == b_lo[2] and s_hi[2] == b_hi[2]            # I-S: every slice with brain, no other
    assert "SSIM3d T1" in r.stdout
