"""Real MRI in CI: two BraTS cases from the folder named by UNIT_REAL_DATA (CI: the two cases of ../shared/realmri,
never copied into this repository; any BraTS folder works, its first two cases are used) prepared with an
explicit split, trained for two steps and written back by evaluate.py --volumes.

1. What a user gets (the default): the synthetic scans have the input's background, 0 outside the input's
   brain (its nonzero voxels), and the input's intensity scale (mapped back with the input's normalisation,
   never the target's): values inside the brain lie in the input's [0.5, 99.5] percentile range.
2. Where it lands (--keep-background, the network's raw output): the output lies on the source grid (shape,
   affine) in the right orientation, located by the brain's bounding box in the source's own voxel order
   (stored LPS): the translated region (the crop window, on every slice with brain) is centred on the brain in
   L-R and A-P, holds all of it, and spans exactly its inferior-superior extent. A flip of an axis would mirror
   the region about the volume's centre, and both brains of ../shared/realmri are off-centre by 1-12 voxels
   along each axis (the test case, BraTS-GLI-00001-000: 1, 3 and 1), so a flip moves the region by 2-24 voxels:
   more than the 1 voxel of rounding allowed here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from unit.nifti import find_subjects

ROOT = Path(__file__).resolve().parents[1]
REAL = os.environ.get("UNIT_REAL_DATA")

pytestmark = pytest.mark.skipif(not REAL or not Path(REAL).is_dir(), reason="UNIT_REAL_DATA does not name a folder "
                                "of BraTS cases (CI sets it to ../shared/realmri when that exists)")


def test_real_cases_round_trip_onto_the_source_grid(tmp_path):
    env = {**os.environ, "UNIT_ATTN": "naive"}
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, env=env, capture_output=True, text=True,
                                    timeout=900)
    cases = find_subjects("brats", REAL)[:2]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [cases[0].id], "test": [cases[1].id]}))
    r = run("data/prepare.py", "brats", REAL, "--out", str(tmp_path / "d"), "--slices", "all", "--size",
            "208x160", "--split", str(split), "--quiet")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["paired"] and meta["mask"]["brain_mask"] and meta["test_subjects"] == [cases[1].id]
    r = run("train.py", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "run"), "--full", "--width", "4",
            "--batch-size", "2", "--device", "cpu", "--eval-every", "0", "--max-steps", "2")
    assert r.returncode == 0, r.stderr
    case = cases[1]
    t1_img, t2_img = nib.load(case.t1_path), nib.load(case.t2_path)
    t1, t2 = t1_img.get_fdata(), t2_img.get_fdata()
    union = (t1 != 0) | (t2 != 0)                                   # prepare.py's mask of skull-stripped pairs
    for keep in (False, True):
        out_dir = tmp_path / ("raw" if keep else "vol")
        r = run("evaluate.py", str(tmp_path / "run" / "ckpt.pt"), "--volumes", REAL, "--layout", "brats", "--out",
                str(out_dir), *(["--keep-background"] if keep else []))
        assert r.returncode == 0, r.stderr
        assert "SSIM3d T1" in r.stdout
        for src, src_img, direction in ((t1, t1_img, "t1_to_t2"), (t2, t2_img, "t2_to_t1")):
            out = nib.load(str(out_dir / f"{case.id}_{direction}.nii.gz"))
            vol = out.get_fdata()
            assert out.shape == src.shape and np.allclose(out.affine, src_img.affine)
            assert nib.aff2axcodes(out.affine) == ("L", "P", "S")
            lo, hi = np.percentile(src[union], [0.5, 99.5])         # the input's normalisation
            tol = 1e-3 * (hi - lo)
            if not keep:
                brain = src != 0
                assert (vol[~brain] == 0).all()                     # the input's background, everywhere
                assert vol[brain].min() >= lo - tol and vol[brain].max() <= hi + tol, (lo, hi)
                continue
            # raw output: the network's 0 maps to the input's low percentile, also outside the crop window
            assert abs(vol[0, 0, 0] - lo) <= tol
            b = np.argwhere(union)
            support = np.argwhere(np.abs(vol - vol[0, 0, 0]) > 1e-6 * (hi - lo))   # the crop windows
            b_lo, b_hi, s_lo, s_hi = b.min(0), b.max(0), support.min(0), support.max(0)
            for ax in (0, 1):                                       # L-R, A-P: centred, the whole brain inside
                assert abs((s_lo[ax] + s_hi[ax]) / 2 - (b_lo[ax] + b_hi[ax]) / 2) <= 1, (ax, s_lo, s_hi, b_lo, b_hi)
                assert s_lo[ax] <= b_lo[ax] and s_hi[ax] >= b_hi[ax] and s_lo[ax] > 0 and s_hi[ax] < src.shape[ax] - 1
            assert s_lo[2] == b_lo[2] and s_hi[2] == b_hi[2]        # I-S: every slice with brain, no other
