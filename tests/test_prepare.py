"""
data/prepare.py, unit/data.py, unit/nifti.py and unit/geometry.py: small NIfTI / PNG trees for every layout, built here with
nibabel, run through the real CLI entry point, and checked exactly against expectations computed
independently from the canonical arrays the trees were made from (orientation, crop/pad,
normalisation, split, meta.json), plus every kind of bad input the issue lists.

Test volumes are built in canonical RAS order first, then *stored* in another voxel order
(transpose + flips, with the matching affine) by `store()` below, so the pipeline has to undo a
real reorientation to get the expected images back.
"""

import gzip
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unit import data as D  # noqa: E402
from unit import geometry as G  # noqa: E402
from unit import nifti as N  # noqa: E402
from unit.progress import Progress  # noqa: E402

_spec = importlib.util.spec_from_file_location("prepare_cli", ROOT / "data" / "prepare.py")
prepare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare)

# ----------------------------------------------------------------------------------------
# helpers: a small "brain" in canonical RAS voxel order, and ways to store it

SHAPE = (20, 26, 14)                       # canonical (X: L->R, Y: P->A, Z: I->S)
BOX = ((3, 14), (4, 21), (2, 10))          # brain box, inclusive voxel ranges
MARK_T1 = (12, 18, 6)                      # right, anterior, at the central slice
MARK_T2 = (5, 7, 6)                        # left, posterior
SIZE = (22, 28)                            # crops rows (26 -> 22), pads columns (20 -> 28)
HCP_AFFINE = np.array([[0.7, 0, 0, -90.0], [0, 0.7, 0, -126.0], [0, 0, 0.7, -72.0], [0, 0, 0, 1]])


def canon_pair(scale=1.0, shape=SHAPE, box=BOX):
    """Canonical T1, T2 (float32) and box mask: linear ramps inside the box, one bright marker each."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    m = np.ones(shape, bool)
    for a, (lo, hi) in zip((x, y, z), box):
        m &= (a >= lo) & (a <= hi)
    t1 = np.where(m, 100 + 3 * x + 2 * y + z, 0).astype(np.float32) * scale
    t2 = np.where(m, 400 - 5 * x + 3 * y + 2 * z, 0).astype(np.float32) * scale
    t1[MARK_T1] = 1000 * scale
    t2[MARK_T2] = 2000 * scale
    return t1, t2, m


def store(canon, canon_affine, perm=(0, 1, 2), flips=()):
    """The same physical image in another voxel order: src = flip(canon.transpose(perm), flips),
    with src_affine = canon_affine @ T where T maps src voxel indices to canonical ones."""
    src = canon.transpose(perm)
    for a in flips:
        src = np.flip(src, a)
    T = np.eye(4)
    T[:3, :3] = 0
    for a in range(3):
        c = perm[a]
        T[c, a] = -1.0 if a in flips else 1.0
        T[c, 3] = src.shape[a] - 1 if a in flips else 0.0
    return np.ascontiguousarray(src), canon_affine @ T


def write_nii(path, arr, affine, dtype=np.float32):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr, dtype=dtype), affine), str(path))
    return path


def window(box, size, Y):
    """The documented centring rule, from the box bounds: (row0, col0)."""
    (x_lo, x_hi), (y_lo, y_hi), _ = box
    H, W = size
    r_lo, r_hi = Y - 1 - y_hi, Y - 1 - y_lo
    return (r_lo + r_hi + 1 - H) // 2, (x_lo + x_hi + 1 - W) // 2


def expected(canon, zs, size, lo_hi, box=BOX):
    """Independent expectation of the prepared slices: display = rows anterior->posterior
    (Y-1-y), columns left->right (x); zero-pad the display plane, cut the window, normalise."""
    X, Y, _ = canon.shape
    H, W = size
    r0, c0 = window(box, size, Y)
    P = 64
    out = []
    for z in zs:
        disp = np.zeros((Y + 2 * P, X + 2 * P))
        for r in range(Y):
            for c in range(X):
                disp[P + r, P + c] = canon[c, Y - 1 - r, z]
        out.append(disp[P + r0:P + r0 + H, P + c0:P + c0 + W])
    lo, hi = lo_hi
    return np.clip((np.array(out) - lo) / (hi - lo), 0, 1)


def run(*argv):
    """The CLI in-process: (return code)."""
    return prepare.main([str(a) for a in argv])


def hcp_tree(root, n=4, space="acpc", mask=True, perm=(0, 1, 2), flips=(0,)):
    """HCP-like subjects (stored LAS by default, like HCP's *_acpc_dc_restore files)."""
    subjects = {}
    for i in range(n):
        sid = f"1003{i:02d}"
        t1, t2, box = canon_pair(scale=1.0 + 0.5 * i)
        d = root / sid / ("T1w" if space == "acpc" else "MNINonLinear")
        names = (("T1w_acpc_dc_restore_brain", "T2w_acpc_dc_restore_brain") if space == "acpc"
                 else ("T1w_restore_brain", "T2w_restore_brain"))
        for name, arr in zip(names, (t1, t2)):
            write_nii(d / f"{name}.nii.gz", *store(arr, HCP_AFFINE, perm, flips))
        if mask:
            write_nii(d / "brainmask_fs.nii.gz", *store(box.astype(np.uint8), HCP_AFFINE, perm, flips),
                      dtype=np.uint8)
        subjects[sid] = (t1, t2, box)
    return subjects


def check_prepared(out, subjects, zs_of, size=SIZE, paired=True, t2_canon=None):
    """Compare every slice of a prepared folder with `expected`; return the Prepared."""
    p = D.load_prepared(out)
    assert p.shape == size and p.paired == paired
    meta = p.meta
    for split in ("train", "test"):
        t1, t2, mask = getattr(p, f"{split}_t1"), getattr(p, f"{split}_t2"), getattr(p, f"{split}_mask")
        assert t1.dtype == np.float16 and t1.shape[1:] == size and mask.dtype == np.uint8
        for a in (t1, t2):   # normalisation range: exactly [0, 1], both ends reached
            assert float(np.min(a)) == 0.0 and float(np.max(a)) == 1.0
        ids = meta["slice_subject"][split]
        assert len(ids) == t1.shape[0] == t2.shape[0] == mask.shape[0] == meta[f"n_{split}"]
        for sid in dict.fromkeys(ids):
            idx = [i for i, s in enumerate(ids) if s == sid]
            c1, c2, box = subjects[sid]
            if t2_canon is not None:
                c2 = t2_canon[sid]
            zs = zs_of(box)
            assert meta["volumes"][sid]["slices"] == zs
            assert meta["volumes"][sid]["window"] == list(window(BOX, size, c1.shape[1]))
            assert meta["volumes"][sid]["split"] == split
            r1 = np.percentile(c1[box], [0.5, 99.5])
            r2 = np.percentile(c2[box], [0.5, 99.5])
            nv = meta["normalization"]["per_volume"][sid]
            np.testing.assert_allclose(nv["t1"], r1, rtol=1e-5)
            np.testing.assert_allclose(nv["t2"], r2, rtol=1e-5)
            np.testing.assert_allclose(np.asarray(t1[idx], np.float64), expected(c1, zs, size, r1), atol=1e-3)
            np.testing.assert_allclose(np.asarray(t2[idx], np.float64), expected(c2, zs, size, r2), atol=1e-3)
            exp_mask = expected(box.astype(np.float32), zs, size, (0.0, 1.0)) > 0.5
            np.testing.assert_array_equal(mask[idx] != 0, exp_mask)
    return p


def central(k):
    def zs(box):
        z = np.flatnonzero(box.any(axis=(0, 1)))
        start = (z[0] + z[-1] + 1 - k) // 2
        return list(range(int(start), int(start) + k))
    return zs


# ----------------------------------------------------------------------------------------
# self-check of the test helpers (so a wrong helper cannot make a wrong pipeline pass)


def test_store_helper_describes_the_same_physical_image():
    t1, _, _ = canon_pair()
    src, aff = store(t1, HCP_AFFINE, (1, 2, 0), (0, 2))
    assert nib.aff2axcodes(aff) == ("P", "S", "L")
    # the marker's world position is the same through either description
    w_canon = HCP_AFFINE @ np.array([*MARK_T1, 1.0])
    idx = np.argwhere(src == src.max())[0]
    np.testing.assert_allclose(aff @ np.array([*idx, 1.0]), w_canon)
    s2, a2 = store(t1, HCP_AFFINE, (0, 1, 2), (0,))
    assert nib.aff2axcodes(a2) == ("L", "A", "S")


# ----------------------------------------------------------------------------------------
# layouts


def test_hcp_orientation_crop_normalisation_split_meta(tmp_path):
    subjects = hcp_tree(tmp_path / "HCP", n=5)
    out = tmp_path / "out" / "hcp"
    assert run("hcp", tmp_path / "HCP", "--out", out, "--size", "22x28", "--n-test", 2, "--seed", 3,
               "--quiet") == 0
    p = check_prepared(out, subjects, central(1))
    m = p.meta
    # the marker: T1 marker (right, anterior) lands right of centre and above it, exactly here
    r0, c0 = window(BOX, SIZE, SHAPE[1])
    test_or_train = "train" if m["slice_subject"]["train"][0] else "test"
    arr = getattr(p, f"{test_or_train}_t1")[0]
    r, c = SHAPE[1] - 1 - MARK_T1[1] - r0, MARK_T1[0] - c0
    assert arr[r, c] == 1.0
    assert arr[r, SIZE[1] - 1 - c] < 0.9           # not mirrored left-right
    assert c > SIZE[1] // 2 and r < SIZE[0] // 2     # patient's right is image right; anterior is up
    # split: by subject, disjoint, seeded permutation, first n_test usable -> test
    ids = sorted(subjects)
    perm = [ids[i] for i in np.random.default_rng(3).permutation(len(ids))]
    assert m["test_subjects"] == perm[:2] and m["train_subjects"] == perm[2:]
    assert not set(m["train_subjects"]) & set(m["test_subjects"])
    assert m["n_train"] == 3 and m["n_test"] == 2 and m["paired"] is True
    assert m["source"] == "hcp" and m["layout"] == "hcp" and m["version"] == 1 and m["seed"] == 3
    assert m["shape"] == [22, 28] and m["mask"]["counts"] == {"source": 5}
    assert m["normalization"]["percentiles"] == [0.5, 99.5]
    assert m["volumes"][ids[0]]["t1"] == f"{ids[0]}/T1w/T1w_acpc_dc_restore_brain.nii.gz"
    assert "data/prepare.py hcp" in m["created_by"]
    assert sorted(os.listdir(out)) == sorted(D.FILES + D.MASK_FILES)
    assert not [f for f in os.listdir(out.parent) if f.startswith(".")]   # no temp folder left


def test_hcp_mni_space_all_slices_and_test_fraction(tmp_path):
    subjects = hcp_tree(tmp_path / "HCP", n=5, space="mni", mask=False)
    out = tmp_path / "mni"
    assert run("hcp", tmp_path / "HCP", "--out", out, "--hcp-space", "mni", "--slices", "all",
               "--size", "22x28", "--test-fraction", 0.4, "--quiet") == 0
    p = check_prepared(out, subjects, lambda box: list(range(BOX[2][0], BOX[2][1] + 1)))
    assert p.meta["n_test"] == 2 * 9 and len(p.meta["test_subjects"]) == 2
    assert p.meta["mask"]["counts"] == {"derived:nonzero": 5} and p.meta["hcp_space"] == "mni"


def test_brats_both_naming_conventions_lps_and_transposed(tmp_path):
    src = tmp_path / "BraTS"
    aff = np.array([[1.0, 0, 0, -120], [0, 1, 0, -140], [0, 0, 1, 0], [0, 0, 0, 1]])
    subjects = {}
    for i, case in enumerate(["BraTS2021_00001", "BraTS20_Training_002", "BraTS-GLI-00003-000",
                              "BraTS-GLI-00004-000"]):
        t1, t2, box = canon_pair(scale=2.0 + i)
        new = case.startswith("BraTS-GLI")
        n1, n2 = (f"{case}-t1n", f"{case}-t2w") if new else (f"{case}_t1", f"{case}_t2")
        perm, flips = ((1, 0, 2), (0, 1)) if i % 2 else ((0, 1, 2), (0, 1))   # LPS, and transposed
        write_nii(src / case / f"{n1}.nii.gz", *store(t1, aff, perm, flips))
        write_nii(src / case / f"{n2}.nii.gz", *store(t2, aff, perm, flips))
        decoy = f"{case}-t1c" if new else f"{case}_t1ce"    # must not be taken for the T1
        write_nii(src / case / f"{decoy}.nii.gz", *store(t1 * 0 + 5 * box, aff, perm, flips))
        subjects[case] = (t1, t2, box)
    out = tmp_path / "brats"
    assert run("brats", src, "--out", out, "--size", "22x28", "--slices", 3, "--n-test", 1,
               "--quiet") == 0
    p = check_prepared(out, subjects, central(3))
    assert p.meta["n_train"] == 9 and p.meta["n_test"] == 3
    assert p.meta["mask"]["brain_mask"] is True


def test_ixi_resamples_t2_onto_t1_grid_and_is_unpaired(tmp_path):
    from scipy.ndimage import map_coordinates
    src = tmp_path / "IXI"
    # T1: 1.2 x 1 x 1 mm, stored sagittal (axes A->P? no: P, S, R order) ; T2: 2.4 x 2 x 2 mm, axial LPS
    a1 = np.array([[1.2, 0, 0, -12.0], [0, 1, 0, -13.0], [0, 0, 1, -7.0], [0, 0, 0, 1]])
    a2 = np.array([[2.4, 0, 0, -12.0], [0, 2, 0, -13.0], [0, 0, 2, -7.0], [0, 0, 0, 1]])
    subjects, t2_on_t1 = {}, {}
    coords = np.stack(np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij"), -1).reshape(-1, 3)
    M = np.linalg.inv(a2) @ a1
    for i, sid in enumerate(["IXI002-Guys-0828", "IXI012-HH-1211", "IXI013-HH-1212"]):
        t1, _, box = canon_pair(scale=1.0 + i)
        # T2 on its own coarse grid: a smooth ramp inside (roughly) the same box, marker at the
        # world point of T1 voxel (12, 18, 6) = T2 voxel (6, 9, 3)
        x, y, z = np.meshgrid(*(np.arange(n) for n in (10, 13, 7)), indexing="ij")
        inside = (x >= 2) & (x <= 7) & (y >= 2) & (y <= 10) & (z >= 1) & (z <= 5)
        t2c = np.where(inside, 300 + 7 * x - 4 * y + 3 * z, 0).astype(np.float32) * (1 + i)
        t2c[6, 9, 3] = 3000
        write_nii(src / "IXI-T1" / f"{sid}-T1.nii.gz", *store(t1, a1, (1, 2, 0), (0, 1)))
        write_nii(src / "IXI-T2" / f"{sid}-T2.nii.gz", *store(t2c, a2, (0, 1, 2), (0, 1)))
        # independent reference: scipy trilinear with zero outside, on the canonical T2
        pts = (M[:3, :3] @ coords.T + M[:3, 3:]).astype(np.float64)
        ref = map_coordinates(t2c.astype(np.float64), pts, order=1, mode="grid-constant", cval=0.0)
        t2_on_t1[sid] = ref.reshape(SHAPE).astype(np.float32)
        subjects[sid] = (t1, None, box)
    # nifti files that are not IXI subjects are ignored
    (src / "IXI-T1" / "notes.txt").write_text("x")
    out = tmp_path / "ixi"
    assert run("ixi", src, "--out", out, "--size", "22x28", "--n-test", 1, "--quiet") == 0
    # IXI has no mask: the threshold rule (T1 > 10% of p99 of nonzero) gives the box here
    p = check_prepared(out, subjects, central(1), paired=False, t2_canon=t2_on_t1)
    assert p.meta["paired"] is False and "not co-registered" in p.meta["unpaired_reason"]
    assert p.meta["mask"]["brain_mask"] is False and "NOT a brain" in p.meta["mask"]["derived_rule"]
    # the T2 marker was on a shared grid point: exactly the marker value before normalisation
    sid = p.meta["slice_subject"]["train"][0]
    assert t2_on_t1[sid][MARK_T1] == 3000
    r0, c0 = window(BOX, SIZE, SHAPE[1])
    assert p.train_t2[0][SHAPE[1] - 1 - MARK_T1[1] - r0, MARK_T1[0] - c0] == 1.0


def test_folders_nifti_matched_by_name(tmp_path):
    src = tmp_path / "mine"
    aff = np.array([[1.0, 0, 0, -10], [0, 1.0, 0, -13], [0, 0, 1.0, -7], [0, 0, 0, 1]])
    how = ((2, 0, 1), (0,))                 # stored as (S->I, L->R, P->A)
    subjects = {}
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        t1, t2, box = canon_pair(scale=1.0 + i)
        ext = ".nii" if name == "beta" else ".nii.gz"
        write_nii(src / "t1" / f"{name}{ext}", *store(t1, aff, *how))
        write_nii(src / "t2" / f"{name}.nii.gz", *store(t2, aff, *how))
        if name == "alpha":
            write_nii(src / "mask" / "alpha.nii.gz", *store(box.astype(np.uint8), aff, *how), dtype=np.uint8)
        subjects[name] = (t1, t2, box)
    write_nii(src / "t1" / "delta.nii.gz", *store(t1, aff, *how))       # no T2: skipped
    out = tmp_path / "f"
    assert run("folders", src, "--out", out, "--size", "22x28", "--n-test", 1, "--quiet") == 0
    p = check_prepared(out, subjects, central(1))
    assert p.meta["n_train"] == 2 and p.meta["mask"]["counts"] == {"source": 1, "derived:threshold": 2}
    assert list(p.meta["skipped"]) == ["delta"] and "t2/delta.nii.gz is missing" in p.meta["skipped"]["delta"]
    for sid in subjects:   # the marker pixel goes back to the marker's own source voxel
        g = p.meta["volumes"][sid]
        ids = p.meta["slice_subject"][g["split"]]
        img = np.asarray(getattr(p, f"{g['split']}_t1")[ids.index(sid)], np.float32)
        vol = G.slices_to_volume(img[None], g)
        src_arr = np.asarray(nib.load(str(src / g["t1"])).dataobj)
        assert vol.shape == src_arr.shape
        assert vol[np.unravel_index(np.argmax(src_arr), src_arr.shape)] == 1.0


def test_png_folders_paired_and_unpaired(tmp_path):
    from PIL import Image
    src = tmp_path / "png"
    rng = np.random.default_rng(0)
    imgs = {}
    for d in ("trainA", "trainB", "testA", "testB"):
        (src / d).mkdir(parents=True)
    for split, names in (("train", ["s1", "s2", "s3"]), ("test", ["s9"])):
        for n in names:
            a = rng.integers(0, 256, (30, 20), dtype=np.uint8)
            b = rng.integers(0, 65536, (30, 20), dtype=np.uint16)
            Image.fromarray(a).save(src / f"{split}A" / f"{n}.png")
            Image.fromarray(b).save(src / f"{split}B" / f"{n}.png")
            imgs[(split, n)] = (a / 255.0, b / 65535.0)
    out = tmp_path / "p"
    assert run("folders", src, "--out", out, "--size", "26x24", "--quiet") == 0
    p = D.load_prepared(out)
    assert p.paired and p.train_mask is None and p.meta["slice_subject"]["train"] == ["s1", "s2", "s3"]
    # centre crop rows 30 -> 26 (drop 2 top), pad cols 20 -> 24 (2 each side)
    a, b = imgs[("train", "s2")]
    np.testing.assert_allclose(np.asarray(p.train_t1[1], np.float64)[:, 2:22], a[2:28], atol=5e-4)
    np.testing.assert_allclose(np.asarray(p.train_t2[1], np.float64)[:, 2:22], b[2:28], atol=5e-4)
    assert not np.asarray(p.train_t1[:, :, :2]).any()
    # unpaired: different names and counts in B
    Image.fromarray(np.full((30, 20), 7, np.uint8)).convert("RGB").save(src / "trainB" / "extra.png")
    out2 = tmp_path / "p2"
    assert run("folders", src, "--out", out2, "--size", "30x20", "--quiet") == 0
    q = D.load_prepared(out2)
    assert not q.paired and q.train_t1.shape[0] == 3 and q.train_t2.shape[0] == 4
    assert q.meta["slice_subject_t2"]["train"] == ["extra", "s1", "s2", "s3"]
    assert q.meta["n_train_t2"] == 4
    np.testing.assert_allclose(np.asarray(q.train_t2[0], np.float64), 7 / 255, atol=2e-4)  # RGB gray -> L


def test_phantom_cli_and_prepare_phantom_match_the_phantom(tmp_path):
    from unit.phantom import phantom_subject, subject_seed
    out = tmp_path / "ph"
    assert run("phantom", "--out", out, "--n-train", 3, "--n-test", 2, "--size", "40x32", "--slices", 2,
               "--seed", 5, "--quiet") == 0
    p = D.load_prepared(out)
    assert p.meta["train_subjects"] == [f"phantom-{i:04d}" for i in range(3)]
    assert p.meta["test_subjects"] == ["phantom-0003", "phantom-0004"]
    s = phantom_subject(subject_seed(5, 4), size=(40, 32), slices=2)
    np.testing.assert_array_equal(p.test_t1[2:4], s["t1"].astype(np.float16))
    np.testing.assert_array_equal(p.test_t2[2:4], s["t2"].astype(np.float16))
    np.testing.assert_array_equal(p.test_mask[2:4] != 0, s["mask"])
    assert p.train_t1.shape == (6, 40, 32) and p.meta["source"] == "phantom" and p.meta["seed"] == 5


# ----------------------------------------------------------------------------------------
# bad input


def _bad_hcp_tree(root):
    good = hcp_tree(root, n=3, mask=False)
    t1, t2, _ = canon_pair()

    def subj(sid, t1a=t1, t2a=t2, a1=HCP_AFFINE, a2=HCP_AFFINE):
        d = root / sid / "T1w"
        p1 = write_nii(d / "T1w_acpc_dc_restore_brain.nii.gz", t1a, a1) if t1a is not None else None
        p2 = write_nii(d / "T2w_acpc_dc_restore_brain.nii.gz", t2a, a2) if t2a is not None else None
        return p1, p2

    subj("bad_missing_t2", t2a=None)
    subj("bad_shape", t2a=t2[:, :, :-1])
    shifted = HCP_AFFINE.copy()
    shifted[0, 3] += 5
    subj("bad_affine", a2=shifted)
    subj("bad_4d", t1a=np.stack([t1] * 3, -1))
    subj("bad_2d", t1a=t1[:, :, 6])
    _, p2 = subj("bad_truncated")
    blob = p2.read_bytes()
    p2.write_bytes(blob[: len(blob) // 2])
    nan = t1.copy()
    nan[3, 4, 5] = np.nan
    nan[4, 4, 5] = np.inf
    subj("bad_nan", t1a=nan)
    subj("bad_zero", t2a=np.zeros_like(t2))
    return good


BAD = {  # subject -> (file it must name, words the sentence must contain)
    "bad_missing_t2": ("T2w_acpc_dc_restore_brain", "missing"),
    "bad_shape": ("T2w_acpc_dc_restore_brain", "different shapes"),
    "bad_affine": ("T2w_acpc_dc_restore_brain", "different affines"),
    "bad_4d": ("T1w_acpc_dc_restore_brain", "4-D"),
    "bad_2d": ("T1w_acpc_dc_restore_brain", "2-D"),
    "bad_truncated": ("T2w_acpc_dc_restore_brain", "truncated or corrupt"),
    "bad_nan": ("T1w_acpc_dc_restore_brain", "2 NaN/inf voxels"),
    "bad_zero": ("T2w_acpc_dc_restore_brain", "all zero"),
}


def test_bad_subjects_are_skipped_with_one_sentence_naming_the_file(tmp_path, capsys):
    good = _bad_hcp_tree(tmp_path / "HCP")
    out = tmp_path / "o"
    assert run("hcp", tmp_path / "HCP", "--out", out, "--size", "22x28", "--n-test", 1) == 0
    err = capsys.readouterr().err
    m = D.load_prepared(out).meta
    assert sorted(m["train_subjects"] + m["test_subjects"]) == sorted(good)
    assert sorted(m["skipped"]) == sorted(BAD)
    for sid, (fname, words) in BAD.items():
        why = m["skipped"][sid]
        assert str(tmp_path / "HCP" / sid / "T1w" / fname) in why and words in why, why
        assert why.endswith(".") and why.count(". ") == 0, why       # one sentence
        assert f"warning: skipping subject {sid}: {why}" in err
    assert "subjects: 11 found, 3 used (2 train / 1 test), 8 skipped" in err
    assert "slices: train 2 T1 / 2 T2, test 1 T1 / 1 T2, each 22x28 float16" in err
    assert "MB in" in err and "Traceback" not in err


@pytest.mark.parametrize("sid", sorted(BAD))
def test_strict_turns_each_bad_subject_into_an_error(tmp_path, capsys, sid):
    hcp_tree(tmp_path / "HCP", n=2, mask=False)
    full = tmp_path / "full"
    _bad_hcp_tree(full)
    (tmp_path / "HCP" / sid).symlink_to(full / sid)
    out = tmp_path / "o"
    assert run("hcp", tmp_path / "HCP", "--out", out, "--n-test", 1, "--size", "22x28", "--strict",
               "--quiet", "--seed", 1) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: subject {sid}: ") and BAD[sid][1] in err[0]
    assert BAD[sid][0] in err[0] and "--strict" in err[0]
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_empty_and_unknown_trees(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run("hcp", tmp_path / "empty", "--out", tmp_path / "o") == 2
    e = capsys.readouterr().err
    assert e.startswith("error: no hcp subjects found in") and "T1w_acpc_dc_restore_brain" in e
    # a BraTS tree given as hcp: the message names the layout it looks like
    t1, t2, _ = canon_pair()
    write_nii(tmp_path / "b" / "C1" / "C1_t1.nii.gz", t1, np.eye(4))
    assert run("hcp", tmp_path / "b", "--out", tmp_path / "o") == 2
    e = capsys.readouterr().err
    assert "no hcp subjects found" in e and "looks like the brats layout" in e
    # unrelated files
    (tmp_path / "u" / "x").mkdir(parents=True)
    (tmp_path / "u" / "x" / "readme.txt").write_text("hi")
    assert run("ixi", tmp_path / "u", "--out", tmp_path / "o") == 2
    assert "no ixi subjects found" in capsys.readouterr().err
    assert run("brats", tmp_path / "nope", "--out", tmp_path / "o") == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_output_folder_exists_refused_unless_overwrite(tmp_path, capsys):
    hcp_tree(tmp_path / "HCP", n=3)
    out = tmp_path / "o"
    assert run("hcp", tmp_path / "HCP", "--out", out, "--n-test", 1, "--size", "22x28", "--quiet") == 0
    first = D.load_prepared(out).meta["test_subjects"]
    assert run("hcp", tmp_path / "HCP", "--out", out, "--n-test", 1, "--size", "22x28", "--quiet") == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    seeds = [s for s in range(10) if
             [sorted((tmp_path / "HCP").iterdir())[i].name for i in np.random.default_rng(s).permutation(3)][0]
             != first[0]]
    assert run("hcp", tmp_path / "HCP", "--out", out, "--n-test", 1, "--size", "22x28", "--quiet",
               "--overwrite", "--seed", seeds[0]) == 0
    assert D.load_prepared(out).meta["test_subjects"] != first
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]
    # --overwrite never deletes a folder that is not a prepared dataset
    other = tmp_path / "mywork"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    assert run("hcp", tmp_path / "HCP", "--out", other, "--n-test", 1, "--overwrite", "--quiet") == 2
    assert "not a prepared dataset" in capsys.readouterr().err and (other / "thesis.tex").exists()


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch, capsys):
    hcp_tree(tmp_path / "HCP", n=4)
    calls = []
    real = prepare.prepare_subject

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(prepare, "prepare_subject", flaky)
    out = tmp_path / "o"
    assert run("hcp", tmp_path / "HCP", "--out", out, "--n-test", 1, "--size", "22x28", "--quiet") == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".")]
    # an unexpected bug propagates (traceback) but still removes the partial output
    monkeypatch.setattr(prepare, "prepare_subject", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run("hcp", tmp_path / "HCP", "--out", out, "--n-test", 1, "--quiet")
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_sigterm_of_the_script_leaves_nothing_and_errors_have_no_traceback(tmp_path):
    out = tmp_path / "big"
    cmd = [sys.executable, str(ROOT / "data" / "prepare.py"), "phantom", "--out", str(out),
           "--n-train", "100000", "--size", "32x32"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not [f for f in os.listdir(tmp_path) if f.startswith(".big.partial")]:
            assert time.time() - t0 < 60 and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []
    # a DataError from the script: one "error:" line on stderr, exit code 2
    r = subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), "hcp", str(tmp_path / "none"),
                        "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: source folder")


# ----------------------------------------------------------------------------------------
# unit/data.py, unit/nifti.py, unit/geometry.py pieces


def test_load_nifti_each_bad_file(tmp_path):
    t1, _, _ = canon_pair()
    ok = write_nii(tmp_path / "ok.nii.gz", t1, HCP_AFFINE)
    d, a, h = N.load_nifti(ok)
    np.testing.assert_array_equal(d, t1)
    np.testing.assert_allclose(a, HCP_AFFINE, atol=1e-5)
    # a singleton 4th dimension is fine (many tools write (X, Y, Z, 1))
    one = write_nii(tmp_path / "one.nii.gz", t1[..., None], HCP_AFFINE)
    assert N.load_nifti(one)[0].shape == SHAPE
    cases = {
        "missing.nii.gz": "is missing",
        "garbage.nii.gz": "is not a readable NIfTI file",
        "four.nii.gz": "is a 4-D image",
        "two.nii.gz": "is a 2-D image",
        "trunc.nii.gz": "truncated or corrupt",
        "nan.nii.gz": "NaN/inf voxels",
        "zero.nii": "is all zero",
    }
    (tmp_path / "garbage.nii.gz").write_bytes(gzip.compress(b"not a nifti" * 100))
    write_nii(tmp_path / "four.nii.gz", np.stack([t1, t1], -1), HCP_AFFINE)
    write_nii(tmp_path / "two.nii.gz", t1[:, :, 0], HCP_AFFINE)
    blob = ok.read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(blob[: len(blob) * 2 // 3])
    nan = t1.copy()
    nan[0, 0, 0] = np.nan
    write_nii(tmp_path / "nan.nii.gz", nan, HCP_AFFINE)
    write_nii(tmp_path / "zero.nii", np.zeros(SHAPE), HCP_AFFINE)
    for name, words in cases.items():
        with pytest.raises(D.DataError) as e:
            N.load_nifti(tmp_path / name)
        msg = str(e.value)
        assert str(tmp_path / name) in msg and words in msg and msg.endswith("."), msg


def test_resample_matches_scipy_trilinear_and_nearest():
    from scipy.ndimage import map_coordinates
    rng = np.random.default_rng(1)
    src = rng.random((9, 11, 7)).astype(np.float32)
    a_src = np.array([[0, -1.3, 0, 10], [0.9, 0, 0, -4], [0, 0.2, 1.7, 2], [0, 0, 0, 1]])
    a_tgt = np.array([[0.8, 0.1, 0, -3], [0, 1.1, 0, -6], [0.05, 0, 0.9, -1], [0, 0, 0, 1]])
    shape = (12, 10, 9)
    got = G.resample_to_grid(src, a_src, shape, a_tgt, order=1)
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1).reshape(-1, 3).T
    M = np.linalg.inv(a_src) @ a_tgt
    pts = M[:3, :3] @ ijk + M[:3, 3:]
    ref = map_coordinates(src.astype(np.float64), pts, order=1, mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(got.ravel(), ref, atol=1e-5)
    assert 0.05 < (ref == 0).mean() < 0.95          # the test covers inside and outside points
    near = G.resample_to_grid(src, a_src, shape, a_tgt, order=0)
    frac = np.abs(pts - np.round(pts))
    ok = (np.abs(frac - 0.5) > 1e-3).all(0)         # away from rounding ties
    refn = map_coordinates(src.astype(np.float64), pts, order=0, mode="grid-constant", cval=0.0)
    np.testing.assert_array_equal(near.ravel()[ok], refn[ok].astype(np.float32))
    # identity grid: exact copy
    np.testing.assert_array_equal(G.resample_to_grid(src, a_src, src.shape, a_src), src)


def test_canonical_roundtrip_and_normalize():
    t1, _, box = canon_pair()
    for perm, flips in [((0, 1, 2), (0,)), ((1, 2, 0), (0, 1)), ((2, 0, 1), (1, 2)), ((1, 0, 2), ())]:
        src, aff = store(t1, HCP_AFFINE, perm, flips)
        c, ac, _ = G.to_canonical(src, aff)
        np.testing.assert_array_equal(c, t1)
        np.testing.assert_allclose(ac, HCP_AFFINE, atol=1e-12)
        np.testing.assert_array_equal(G.from_canonical(c, aff), src)
    v01, (lo, hi) = N.normalize_volume(t1, box, (2.0, 98.0))
    vals = t1[box].astype(np.float64)
    np.testing.assert_allclose((lo, hi), np.percentile(vals, [2, 98]), rtol=1e-6)
    np.testing.assert_allclose(v01, np.clip((t1 - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert v01.min() == 0 and v01.max() == 1
    with pytest.raises(D.DataError, match="constant"):
        N.normalize_volume(np.ones(SHAPE, np.float32), box, what="T1 x.nii.gz")


def test_slices_to_volume_inverts_the_preparation(tmp_path):
    t1, t2, box = canon_pair(scale=3.0)
    perm, flips = (1, 2, 0), (0, 1)
    s1, a1 = store(t1, HCP_AFFINE, perm, flips)
    s2, _ = store(t2, HCP_AFFINE, perm, flips)
    p1 = write_nii(tmp_path / "t1" / "a.nii.gz", s1, a1)
    p2 = write_nii(tmp_path / "t2" / "a.nii.gz", s2, a1)
    r = N.prepare_subject(N.Subject("a", str(p1), str(p2)), size=(20, 16), slices=3,
                          mask_rule="nonzero")
    g = G.SliceGeometry.from_json(json.loads(json.dumps(r.geometry.to_json())))
    back = G.slices_to_volume(r.t2.astype(np.float16), g, r.t2_range, fill=-1.0)
    assert back.shape == s2.shape
    # the prepared voxels (selected slices, inside the window, not clipped) come back to their
    # own source voxels; everything else is `fill`
    canon_back = G.to_canonical(back, a1)[0]
    sel = np.zeros(SHAPE, bool)
    Y = SHAPE[1]
    r0, c0 = g.window
    for z in g.slices:
        for row in range(max(r0, 0), min(r0 + 20, Y)):
            for col in range(max(c0, 0), min(c0 + 16, SHAPE[0])):
                sel[col, Y - 1 - row, z] = True
    assert (canon_back[~sel] == -1.0).all()
    lo, hi = r.t2_range
    unclipped = sel & (t2 > lo) & (t2 < hi)
    assert unclipped.sum() > 100
    np.testing.assert_allclose(canon_back[unclipped], t2[unclipped], atol=(hi - lo) * 6e-4)
    img = G.slices_to_nifti(r.t2.astype(np.float16), g, r.t2_range, header=nib.load(str(p2)).header, fill=-1.0)
    np.testing.assert_allclose(img.affine, a1)
    nib.save(img, str(tmp_path / "back.nii.gz"))
    np.testing.assert_allclose(nib.load(str(tmp_path / "back.nii.gz")).get_fdata(), back, atol=1e-4)


# ----------------------------------------------------------------------------------------
# writer / reader of prepared folders


def test_write_and_load_prepared_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    a = [rng.random((n, 6, 5)).astype(np.float32) for n in (7, 7, 3, 3)]
    masks = [rng.random((n, 6, 5)) > 0.5 for n in (7, 3)]
    meta = {"source": "test", "layout": "x", "slice_subject": {"train": ["a"] * 4 + ["b"] * 3,
                                                               "test": ["c"] * 3}}
    out = D.write_prepared(tmp_path / "d", *a, meta, *masks)
    p = D.load_prepared(out)
    for got, want in zip((p.train_t1, p.train_t2, p.test_t1, p.test_t2), a):
        assert isinstance(got, np.memmap) and got.dtype == np.float16
        np.testing.assert_array_equal(got, want.astype(np.float16))
    np.testing.assert_array_equal(p.train_mask, masks[0].astype(np.uint8))
    assert p.meta["train_subjects"] == ["a", "b"] and p.meta["n_train"] == 7 and p.paired
    assert p.shape == (6, 5)
    # our fixed-size .npy header is what numpy itself reads back
    with open(tmp_path / "d" / "train_t1.npy", "rb") as f:
        assert np.lib.format.read_magic(f) == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        assert shape == (7, 6, 5) and not fortran and dtype == np.float16 and f.tell() % 64 == 0
    with pytest.raises(D.DataError, match="already exists"):
        D.write_prepared(tmp_path / "d", *a, meta, *masks)
    with pytest.raises(ValueError, match=r"values in \["):
        D.write_prepared(tmp_path / "e", a[0] * 2, *a[1:], meta)
    assert not (tmp_path / "e").exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_load_prepared_errors_name_the_file(tmp_path):
    rng = np.random.default_rng(0)
    a = [rng.random((n, 6, 5)).astype(np.float32) for n in (4, 4, 2, 2)]

    def fresh(name):
        return Path(D.write_prepared(tmp_path / name, *a, {"source": "t"}))

    def err(path):
        with pytest.raises(D.DataError) as e:
            D.load_prepared(path)
        return str(e.value)

    e = err(tmp_path / "nothing")
    assert "does not exist" in e and "python data/prepare.py phantom --out" in e
    d = fresh("a")
    (d / "test_t2.npy").unlink()
    assert f"{d / 'test_t2.npy'} is missing" in err(d)
    d = fresh("b")
    (d / "meta.json").write_text("{not json")
    assert f"{d / 'meta.json'} cannot be parsed" in err(d)
    d = fresh("c")
    m = json.loads((d / "meta.json").read_text())
    del m["slice_subject"]
    (d / "meta.json").write_text(json.dumps(m))
    assert "lacks the keys ['slice_subject']" in err(d)
    d = fresh("d")
    np.save(d / "train_t2.npy", a[1][:3].astype(np.float16))
    assert f"{d / 'train_t2.npy'} has 3 slices but the paired" in err(d)
    d = fresh("e")
    np.save(d / "test_t1.npy", np.zeros((2, 6, 4), np.float16))
    assert f"{d / 'test_t1.npy'} holds a float16 array of shape (2, 6, 4)" in err(d)
    d = fresh("f")
    np.save(d / "test_t1.npy", np.zeros((2, 6, 5), np.int32))
    assert "test_t1.npy holds a int32 array" in err(d)
    d = fresh("g")
    blob = (d / "train_t1.npy").read_bytes()
    (d / "train_t1.npy").write_bytes(blob[:200])
    assert f"{d / 'train_t1.npy'} cannot be read as a .npy array" in err(d)
    d = fresh("h")
    m = json.loads((d / "meta.json").read_text())
    m["n_train"] = 5
    (d / "meta.json").write_text(json.dumps(m))
    assert "has 4 slices but meta.json says n_train = 5" in err(d)
    d = fresh("i")                                  # noiseless targets: both or neither, one per test slice
    np.save(d / "test_t1_clean.npy", a[2].astype(np.float16))
    assert "has only one of test_t1_clean.npy and test_t2_clean.npy" in err(d)
    np.save(d / "test_t2_clean.npy", a[3][:1].astype(np.float16))
    assert f"{d / 'test_t2_clean.npy'} has 1 slices but test_t1.npy has 2" in err(d)
    np.save(d / "test_t2_clean.npy", a[3].astype(np.float16))
    np.testing.assert_array_equal(D.load_prepared(d).test_t2_clean, a[3].astype(np.float16))


def test_progress_bar_and_summary_text():
    import io
    s = io.StringIO()
    bar = Progress(20, "subjects", stream=s)
    for _ in range(20):
        bar.update()
    bar.close()
    lines = s.getvalue().splitlines()
    assert lines[0].startswith("subjects 1/20 [") and lines[-1].startswith("subjects 20/20 [")
    assert len(lines) == 11 and "/s elapsed" in lines[-1] and "ETA 0:00" in lines[-1]


def test_padding_stays_zero_for_negative_intensities(tmp_path):
    """Padding is 0 in the output even when the source's 0 normalises above 0 (lo < 0)."""
    t1, t2, box = canon_pair()
    t1 = np.where(box, t1 - 150.0, 0).astype(np.float32)      # brain values partly negative
    p1 = write_nii(tmp_path / "t1.nii.gz", t1, HCP_AFFINE)
    p2 = write_nii(tmp_path / "t2.nii.gz", t2, HCP_AFFINE)
    r = N.prepare_subject(N.Subject("a", str(p1), str(p2)), size=SIZE, slices=1, mask_rule="nonzero")
    lo, hi = r.t1_range
    assert lo < 0 < hi
    c0 = window(BOX, SIZE, SHAPE[1])[1]
    assert c0 < 0 and (r.t1[:, :, : -c0] == 0).all()          # padded columns
    np.testing.assert_allclose(r.t1, expected(t1, central(1)(box), SIZE, (lo, hi)) *
                               (np.arange(SIZE[1]) >= -c0) * (np.arange(SIZE[1]) < SHAPE[0] - c0), atol=1e-6)


def test_unwritable_output_is_one_error_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert run("phantom", "--out", tmp_path / "afile" / "ph", "--n-train", 1, "--n-test", 1,
               "--size", "32x32", "--quiet") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "afile" in err[0]


def test_split_file_names_the_subjects_of_each_split(tmp_path, capsys):
    subjects = hcp_tree(tmp_path / "HCP", n=5)
    ids = sorted(subjects)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [ids[4], ids[0]], "test": [ids[2], ids[1]]}))   # ids[3] in neither
    out = tmp_path / "s"
    assert run("hcp", tmp_path / "HCP", "--out", out, "--size", "22x28", "--split", split, "--quiet") == 0
    p = check_prepared(out, {k: v for k, v in subjects.items() if k != ids[3]}, central(1))
    m = p.meta
    assert set(m["train_subjects"]) == {ids[0], ids[4]} and set(m["test_subjects"]) == {ids[1], ids[2]}
    assert m["split_file"] == {"path": str(split), "train": [ids[4], ids[0]], "val": [], "test": [ids[2], ids[1]]}
    assert ids[3] not in m["volumes"] and m["n_train"] == 2 and m["n_test"] == 2
    assert p.val_t1 is None and not p.has("val") and "n_val" not in m          # no validation split asked for
    # a validation split: its own arrays (slices as prepared, like train and test), meta and subjects
    split.write_text(json.dumps({"train": [ids[4]], "val": [ids[0], ids[3]], "test": [ids[2]]}))
    assert run("hcp", tmp_path / "HCP", "--out", tmp_path / "v", "--size", "22x28", "--split", split, "--quiet") == 0
    v = D.load_prepared(tmp_path / "v")
    assert v.meta["val_subjects"] == [ids[0], ids[3]] and v.meta["n_val"] == 2 == len(v.val_t1) == len(v.val_mask)
    assert v.meta["slice_subject"]["val"] == [ids[0], ids[3]] and v.meta["volumes"][ids[3]]["split"] == "val"
    assert np.array_equal(v.val_t1[0], p.train_t1[list(m["slice_subject"]["train"]).index(ids[0])])
    assert v.meta["test_subjects"] == [ids[2]] and v.meta["train_subjects"] == [ids[4]]
    # either list may be empty: a dataset only for scoring
    split.write_text(json.dumps({"train": [], "test": [ids[3]]}))
    assert run("hcp", tmp_path / "HCP", "--out", tmp_path / "score", "--size", "22x28", "--split", split,
               "--quiet") == 0
    q = D.load_prepared(tmp_path / "score")
    assert q.meta["n_train"] == 0 and q.meta["test_subjects"] == [ids[3]] and len(q.train_t1) == 0
    # bad files: one sentence naming the id, exit 2, nothing written
    capsys.readouterr()
    for content, said in (({"train": [ids[0], "100399"], "test": [ids[1]]}, "100399 is not a subject of"),
                          ({"train": [ids[0]], "test": [ids[0]]}, f"{ids[0]} in two splits"),
                          ({"train": [ids[0]], "val": [ids[1]], "test": [ids[1]]}, f"{ids[1]} in two splits"),
                          ({"train": [ids[0], ids[0]], "test": []}, f"{ids[0]} listed twice"),
                          ({"train": [], "test": []}, "lists no subject"),
                          ({"train": [ids[0]]}, 'must hold {"train": [ids], "test": [ids]} and optionally "val"'),
                          ({"train": [], "test": [], "dev": [ids[0]]}, 'must hold {"train": [ids], "test": [ids]}'),
                          ("not json", "cannot be read as JSON")):
        split.write_text(content if isinstance(content, str) else json.dumps(content))
        assert run("hcp", tmp_path / "HCP", "--out", tmp_path / "bad", "--size", "22x28", "--split", split,
                   "--quiet") == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not (tmp_path / "bad").exists()
    assert run("hcp", tmp_path / "HCP", "--out", tmp_path / "bad", "--split", tmp_path / "none.json", "--quiet") == 2
    split.write_text(json.dumps({"train": [ids[0]], "test": [ids[1]]}))
    assert run("hcp", tmp_path / "HCP", "--out", tmp_path / "bad", "--split", split, "--n-test", 1, "--quiet") == 2
    assert "drop --n-test" in capsys.readouterr().err
