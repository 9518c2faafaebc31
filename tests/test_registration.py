"""IXI pairing by registration (prepare.py ixi --register, SimpleITK): a synthetic head whose T2w is a
known rotation + translation of its T1w is recovered within 1 degree and 1 mm (also with different voxel
sizes and a flipped storage order), and the prepared dataset is paired with the registration in meta.json
and slices that line up (brain-mask overlap) where the unregistered ones do not."""
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is an optional dependency (pip install SimpleITK); "
                                               "requirements.txt installs it for the tests")
from conftest import rotation  # noqa: E402
from unit.nifti import register_affine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_r = np.random.default_rng(5)
BLOBS = [(_r.uniform(-35, 35, 3) * [1, 1.2, 0.8], _r.uniform(3, 6), _r.uniform(-1, 1), _r.uniform(-1, 1))
         for _ in range(24)]
CORNERS = np.array([[x, y, z] for x in (-40, 40) for y in (-50, 50) for z in (-35, 35)], float)


def anatomy(q, contrast):
    """World RAS mm (..., 3) -> intensity: scalp shell, brain ellipsoid and 24 small structures whose
    brightness differs between the contrasts (so only mutual information, not correlation, aligns them)."""
    x, y, z = q[..., 0], q[..., 1], q[..., 2]
    d = np.sqrt((x / 60) ** 2 + (y / 72) ** 2 + (z / 55) ** 2)
    brain = 1 / (1 + np.exp((d - 0.85) / 0.02))
    v = (0.6 if contrast == "t1" else 0.3) * brain + (0.9 if contrast == "t1" else 0.2) * np.exp(-((d - 0.95) / 0.03) ** 2)
    for c, r, a1, a2 in BLOBS:
        g = np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * r ** 2))
        v = v + (a1 if contrast == "t1" else a2) * 0.4 * g * brain
    return (1000 * np.clip(v, 0, None)).astype(np.float32)


def grid(shape, zooms, lps=False):
    n, z = np.array(shape), np.array(zooms, float)
    A = np.eye(4)
    A[:3, :3], A[:3, 3] = np.diag(z), -z * (n - 1) / 2
    if lps:                                   # stored with the first two axes flipped
        F = np.eye(4)
        F[0, 0] = F[1, 1] = -1
        F[0, 3], F[1, 3] = n[0] - 1, n[1] - 1
        A = A @ F
    return A


def sample(shape, A, fn):
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    return fn(idx @ A[:3, :3].T + A[:3, 3])


def pair(R, t, t2_shape, t2_zoom, t1_shape=(84, 100, 76), t1_zoom=(1.5, 1.5, 1.5)):
    """T1w on its grid; the T2w of the same head moved by p -> R p + t (so a T1w world point q shows up at
    R q + t in the T2w), sampled on another grid stored LPS."""
    A1, A2 = grid(t1_shape, t1_zoom), grid(t2_shape, t2_zoom, lps=True)
    t1 = sample(t1_shape, A1, lambda p: anatomy(p, "t1"))
    t2 = sample(t2_shape, A2, lambda p: anatomy((p - t) @ R, "t2"))   # q = R^T (p - t)
    return t1, A1, t2, A2


@pytest.mark.parametrize("t2_shape,t2_zoom", [((84, 100, 76), (1.5, 1.5, 1.5)), ((64, 76, 46), (2.0, 2.0, 2.5))],
                         ids=["same-voxels", "different-voxels"])
def test_known_rotation_and_translation_are_recovered(t2_shape, t2_zoom):
    R, t = rotation(2, 7) @ rotation(0, -5), np.array([4.0, -6.0, 3.0])
    t1, A1, t2, A2 = pair(R, t, t2_shape, t2_zoom)
    out, info = register_affine(t1, A1, t2, A2)
    assert out.shape == t1.shape
    T = np.array(info["fixed_to_moving"])
    moved = np.linalg.norm(CORNERS @ T[:3, :3].T + T[:3, 3] - (CORNERS @ R.T + t), axis=1)
    assert moved.max() < 1.0                                      # mm, over a 80 x 100 x 70 mm box
    u, _, vt = np.linalg.svd(T[:3, :3] @ R.T)                     # the rotation left between found and true
    assert np.degrees(np.arccos(np.clip((np.trace(u @ vt) - 1) / 2, -1, 1))) < 1.0
    # and the resampled T2w is the true T2w anatomy on the T1w grid (inside the brain, where it is smooth)
    truth = sample(t1.shape, A1, lambda p: anatomy(p, "t2"))
    inner = sample(t1.shape, A1, lambda p: (np.sqrt((p[..., 0] / 60) ** 2 + (p[..., 1] / 72) ** 2
                                                    + (p[..., 2] / 55) ** 2) < 0.7))
    assert np.abs(out[inner] - truth[inner]).mean() < 0.02 * truth[inner].mean()


def test_prepare_ixi_register_is_paired_and_aligned(tmp_path):
    """Three IXI trees of the same two heads: T2w moved (prepared with and without --register) and T2w not
    moved (prepared without: its slices are what a perfect registration gives)."""
    moves = {"IXI001-Guys-0001": (rotation(2, 6), np.array([5.0, -4.0, 2.0])),
             "IXI002-HH-0002": (rotation(0, -5), np.array([-3.0, 5.0, 4.0]))}
    for tree in ("moved", "still"):
        for q in ("T1", "T2"):
            (tmp_path / tree / f"IXI-{q}").mkdir(parents=True)
        for sid, (R, t) in moves.items():
            R, t = (R, t) if tree == "moved" else (np.eye(3), np.zeros(3))
            t1, A1, t2, A2 = pair(R, t, (42, 50, 38), (3.0, 3.0, 3.0), t1_shape=(56, 66, 50), t1_zoom=(2.25,) * 3)
            nib.Nifti1Image(t1, A1).to_filename(str(tmp_path / tree / "IXI-T1" / f"{sid}-T1.nii.gz"))
            nib.Nifti1Image(t2, A2).to_filename(str(tmp_path / tree / "IXI-T2" / f"{sid}-T2.nii.gz"))
    common = ["--size", "64x56", "--slices", "9", "--n-test", "1", "--quiet"]
    meta = {}
    for name, tree, extra in (("reg", "moved", ["--register"]), ("raw", "moved", []), ("truth", "still", [])):
        r = subprocess.run([sys.executable, "data/prepare.py", "ixi", str(tmp_path / tree), "--out",
                            str(tmp_path / name), *common, *extra], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr
        meta[name] = json.loads((tmp_path / name / "meta.json").read_text())
    assert meta["reg"]["paired"] is True and meta["raw"]["paired"] is False and "unpaired_reason" not in meta["reg"]
    assert "Mattes mutual information" in meta["reg"]["registration"]["method"]
    for sid, (R, t) in moves.items():
        T = np.array(meta["reg"]["volumes"][sid]["registration"]["fixed_to_moving"])
        assert np.linalg.norm(CORNERS @ T[:3, :3].T + T[:3, 3] - (CORNERS @ R.T + t), axis=1).max() < 1.5  # 3 mm voxels
    t2 = {n: np.concatenate([np.load(tmp_path / n / f"{s}_t2.npy").astype(np.float32) for s in ("train", "test")])
          for n in meta}
    err = {n: np.abs(t2[n] - t2["truth"]).mean() for n in ("reg", "raw")}
    assert err["reg"] < 0.01 and err["raw"] > 5 * err["reg"], err


def test_register_only_for_ixi(tmp_path):
    r = subprocess.run([sys.executable, "data/prepare.py", "hcp", str(tmp_path), "--out", str(tmp_path / "o"),
                        "--register"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--register is for the ixi layout" in r.stderr


def test_missing_simpleitk_says_how_to_install(monkeypatch):
    from unit.data import DataError
    monkeypatch.setitem(sys.modules, "SimpleITK", None)          # import SimpleITK now raises ImportError
    with pytest.raises(DataError, match="--register needs SimpleITK: pip install SimpleITK"):
        register_affine(np.ones((4, 4, 4)), np.eye(4), np.ones((4, 4, 4)), np.eye(4))
