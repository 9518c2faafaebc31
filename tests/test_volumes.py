"""evaluate.py --volumes: whole NIfTI volumes translated slice by slice and written back on the
source grid (affine, shape, header), intensities on the source scale, 3-D scores per subject."""
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (40, 48, 24)                     # canonical voxels (x: L->R, y: P->A, z: I->S)
AFFINE = np.array([[-0.7, 0, 0, 13.0], [0, 0.7, 0, -20.0], [0, 0, 0.7, -8.0], [0, 0, 0, 1]])  # stored LAS


def hcp_tree(root, n=3):
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*(np.arange(s) for s in SHAPE), indexing="ij")
    brain = ((x - 20) / 14) ** 2 + ((y - 24) / 18) ** 2 + ((z - 12) / 9) ** 2 < 1   # 17 axial slices
    for i in range(n):
        t1 = np.where(brain, 300 + 4 * x + 2 * y + rng.random(SHAPE) * 20, 0).astype(np.float32)
        t2 = np.where(brain, 900 - 6 * x + 3 * z + rng.random(SHAPE) * 20, 0).astype(np.float32)
        d = os.path.join(root, f"1000{i}", "T1w")
        os.makedirs(d)
        for name, vol in (("T1w_acpc_dc_restore_brain", t1), ("T2w_acpc_dc_restore_brain", t2)):
            nib.save(nib.Nifti1Image(vol[::-1].copy(), AFFINE), os.path.join(d, name + ".nii.gz"))
    return brain


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-subject HCP tree, prepared at 64x64, and a 1-step checkpoint trained on it."""
    root = tmp_path_factory.mktemp("vol")
    src, data, run_dir = root / "HCP", root / "prepared", root / "run"
    brain = hcp_tree(src)
    env = {**os.environ, "UNIT_ATTN": "naive"}
    r = subprocess.run([sys.executable, "data/prepare.py", "hcp", str(src), "--out", str(data), "--size", "64x64",
                        "--slices", "4", "--n-test", "1", "--quiet"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "train.py", "--data", str(data), "--out", str(run_dir), "--full", "--width", "4",
                        "--batch-size", "2", "--max-steps", "1", "--eval-every", "0"], cwd=ROOT, capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    return src, data, run_dir / "ckpt.pt", brain


def test_volumes_written_on_the_source_grid(trained, tmp_path):
    src, data, ckpt, brain = trained
    out = tmp_path / "nii"
    r = subprocess.run([sys.executable, "evaluate.py", str(ckpt), "--volumes", str(src), "--layout", "hcp",
                        "--out", str(out), "--json", str(tmp_path / "v.json")], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "UNIT_ATTN": "naive"})
    assert r.returncode == 0, r.stderr
    test_id = json.load(open(data / "meta.json"))["test_subjects"][0]
    assert sorted(os.listdir(out)) == [f"{test_id}_t1_to_t2.nii.gz", f"{test_id}_t2_to_t1.nii.gz"]
    for name, source in (("t1_to_t2", "T2w"), ("t2_to_t1", "T1w")):
        img = nib.load(out / f"{test_id}_{name}.nii.gz")
        ref = nib.load(src / test_id / "T1w" / f"{source}_acpc_dc_restore_brain.nii.gz")
        assert img.shape == ref.shape
        np.testing.assert_allclose(img.affine, ref.affine, atol=1e-6)
        assert np.all(np.isfinite(img.get_fdata()))
    res = json.load(open(tmp_path / "v.json"))
    row = res["volumes"][0]
    assert row["subject"] == test_id and row["slices"] == brain.any(axis=(0, 1)).sum() > 11   # all brain slices, not the 4 prepared
    for c in ("T1", "T2"):
        assert -1 <= row[c]["ssim3d"] <= 1 and row[c]["mae"] >= 0
    assert "mean over 1 subjects" in r.stdout


def test_volumes_intensities_map_back_to_the_source_scale(trained, tmp_path, monkeypatch):
    """With translation replaced by the identity, the T1->T2 volume must be the T1 normalised with the T1's
    percentiles and mapped back with the same ones (the input's normalisation: a user has no target), so the T1
    clipped to them, and 0 outside the T1's brain (skull-stripped source): an exact, independent expectation."""
    src, data, ckpt, brain = trained
    monkeypatch.setattr(evaluate, "translate", lambda model, images, *a, **k: torch.as_tensor(images).float())
    out = tmp_path / "nii"
    evaluate.main([str(ckpt), "--volumes", str(src), "--layout", "hcp", "--out", str(out), "--device", "cpu"])
    test_id = json.load(open(data / "meta.json"))["test_subjects"][0]
    t1 = nib.load(src / test_id / "T1w" / "T1w_acpc_dc_restore_brain.nii.gz").get_fdata()[::-1]  # canonical
    lo1, hi1 = np.percentile(t1[brain], (0.5, 99.5))
    got = nib.load(out / f"{test_id}_t1_to_t2.nii.gz").get_fdata()[::-1]
    np.testing.assert_allclose(got[brain], np.clip(t1, lo1, hi1)[brain], rtol=1e-4, atol=1e-3 * hi1)
    assert (got[~brain] == 0).all()                       # the input's background, inside the crop window and out


def test_volumes_bad_flags(trained, tmp_path):
    src, _, ckpt, _ = trained
    r = subprocess.run([sys.executable, "evaluate.py", str(ckpt), "--volumes", str(src)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--layout" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "evaluate.py", str(ckpt), "--volumes", str(src), "--layout", "hcp", "--out",
                        str(tmp_path / "o"), "--spectra", str(tmp_path / "s.png")], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "--spectra: these are for the prepared test slices" in r.stderr   # was silently ignored
    assert not (tmp_path / "o").exists()
