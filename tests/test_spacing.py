"""In-plane spacing (prepare.py --spacing): the same analytic anatomy sampled at 0.7 mm and at 1.0 mm lands
on the same prepared grid with the same values; the geometry maps the slices back onto the 0.7 mm source
grid; translate.py resamples to the model's spacing and back; meta.json records it all."""
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import translate as T
from unit.geometry import inplane_grid, slices_to_volume, zooms
from unit.nifti import Subject, prepare_subject

ROOT = Path(__file__).resolve().parents[1]
FOV = (120.0, 140.0)          # mm along R and A; 20 axial slices of 2 mm
NZ, DZ = 20, 2.0


def anatomy(x, y, z, contrast):
    """World mm -> intensity: a 'brain' with a flat top (so the 99th percentile is 1000 on any grid),
    smooth edges (smoothstep over 8 mm) whose 10% level lies at |x| = 40, |y| = 50, halfway between
    1 mm voxel centres (so the threshold mask is the same from either grid), and smooth inner structures."""
    step = lambda d: (lambda t: t * t * (3 - 2 * t))(np.clip(d / 8, 0, 1))
    edge = 8 * 0.1958                                     # smoothstep(0.1958) = 0.1
    ramp = step(40 + edge - np.abs(x)) * step(50 + edge - np.abs(y))
    blob = np.exp(-((x - 10) ** 2 + (y + 5) ** 2) / (2 * 10 ** 2)) * (0.6 + 0.1 * np.cos(z / 6))
    ring = np.exp(-((np.hypot(x + 12, y - 15) - 12) ** 2) / (2 * 4 ** 2))
    inner = 0.5 * blob + 0.3 * ring if contrast == "t1" else 0.6 * ring - 0.3 * blob
    return (1000 * ramp * (1 - np.clip(inner, -0.5, 0.9))).astype(np.float32)


def volume(mm, contrast):
    """The anatomy on an mm x mm x 2 mm grid covering FOV, stored LPS (flipped R and A) to make it real."""
    nx, ny = int(round(FOV[0] / mm)), int(round(FOV[1] / mm))
    # voxel centres; the outer voxel edges sit at -FOV/2 .. +FOV/2 on both grids
    xs = -FOV[0] / 2 + mm * (np.arange(nx) + 0.5)
    ys = -FOV[1] / 2 + mm * (np.arange(ny) + 0.5)
    zs = DZ * (np.arange(NZ) - NZ / 2)
    X, Y, Z = np.meshgrid(xs, ys, zs, indexing="ij")
    ras = np.array([[mm, 0, 0, xs[0]], [0, mm, 0, ys[0]], [0, 0, DZ, zs[0]], [0, 0, 0, 1]])
    flip = np.array([[-1, 0, 0, nx - 1], [0, -1, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    return np.ascontiguousarray(anatomy(X, Y, Z, contrast)[::-1, ::-1]), ras @ flip


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name, mm in (("a07", 0.7), ("b10", 1.0)):
        for q in ("t1", "t2"):
            (src / q).mkdir(exist_ok=True)
            v, a = volume(mm, q)
            nib.Nifti1Image(v, a).to_filename(str(src / q / f"{name}.nii.gz"))
    return src


def subject(src, name):
    return Subject(name, str(src / "t1" / f"{name}.nii.gz"), str(src / "t2" / f"{name}.nii.gz"))


def test_same_anatomy_at_two_spacings_lands_on_the_same_grid(tree):
    kw = dict(size=(112, 96), slices=5, mask_rule="threshold")
    a = prepare_subject(subject(tree, "a07"), spacing=1.0, **kw)
    b = prepare_subject(subject(tree, "b10"), spacing=1.0, **kw)
    assert a.geometry.grid_shape == [120, 140, NZ] == list(b.geometry.grid_shape)
    np.testing.assert_allclose(a.geometry.grid_affine, b.geometry.grid_affine, atol=1e-9)
    assert a.geometry.window == b.geometry.window and a.geometry.slices == b.geometry.slices
    np.testing.assert_array_equal(a.mask, b.mask)
    for q in ("t1", "t2"):      # bilinear from 0.7 mm vs sampled at 1.0 mm: the interpolation error only
        assert np.abs(getattr(a, q) - getattr(b, q)).max() < 0.015
    # without --spacing the 0.7 mm volume keeps its own scale: the brain spans 1/0.7 times more pixels
    a0 = prepare_subject(subject(tree, "a07"), **{**kw, "size": (224, 192)})
    width = lambda m: np.flatnonzero(m.any(axis=(0, 1))).size   # columns (R-L) with brain
    assert width(a.mask) == 80 and width(a0.mask) == pytest.approx(80 / 0.7, abs=2)


def test_slices_go_back_onto_the_finer_source_grid(tree):
    r = prepare_subject(subject(tree, "a07"), size=(112, 96), slices="all", mask_rule="threshold", spacing=1.0)
    back = slices_to_volume(r.t1, r.geometry, r.t1_range)
    src = nib.load(str(tree / "t1" / "a07.nii.gz"))
    assert back.shape == src.shape
    v = src.get_fdata()
    inner = v >= 999.0                                            # the flat top, away from the edges
    assert inner.sum() > 10000
    np.testing.assert_allclose(back[inner], v[inner], rtol=0.005)  # resampled there and back, bilinear


def test_translate_resamples_to_the_models_spacing_and_back(tree):
    src = nib.load(str(tree / "t1" / "a07.nii.gz"))
    v, aff = src.get_fdata(dtype=np.float32), src.affine
    seen = []
    def identity(s):
        seen.append(s.shape)
        return s
    out = T.translate_volume(identity, v, aff, spacing=1.0, mask_rule="threshold")
    assert out.shape == v.shape and seen[0][1:] == (140, 120)      # the model saw 1 mm pixels (A x R)
    mask = v > 100.0
    lo, hi = np.percentile(v[mask], [0.5, 99.5])
    want = np.clip((v - lo) / (hi - lo), 0, 1)
    inner = v >= 999.0
    assert np.abs(out[inner] - want[inner]).max() < 0.02


def test_inplane_grid_keeps_the_field_of_view():
    shape, A = inplane_grid((171, 200, 20), np.diag([0.7, 0.7, 2.0, 1.0]), 1.0)
    assert shape == (120, 140, 20) and zooms(A) == (1.0, 1.0, 2.0)
    # the outer edge of voxel 0 (-0.5) stays at -0.35 mm; the last edge moves from 199.5 * 0.7 to 139.5
    np.testing.assert_allclose((A @ [-0.5, -0.5, 0, 1])[:3], [-0.35, -0.35, 0])


def test_prepare_cli_records_the_spacing(tree, tmp_path):
    r = subprocess.run([sys.executable, "data/prepare.py", "folders", str(tree), "--out", str(tmp_path / "d"),
                        "--spacing", "1", "--size", "112x96", "--slices", "3", "--n-test", "1", "--quiet"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "in-plane spacing: resampled to 1 x 1 mm (sources: 0.7 x 0.7, 1 x 1 mm)" in r.stderr
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["spacing"] == 1.0
    assert meta["volumes"]["a07"]["source_spacing"] == [0.7, 0.7, 2.0] and meta["volumes"]["a07"]["grid_shape"] == \
        [120, 140, NZ]
    r = subprocess.run([sys.executable, "data/prepare.py", "folders", str(tree), "--out", str(tmp_path / "e"),
                        "--size", "112x96", "--slices", "3", "--n-test", "1", "--quiet"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "in-plane spacing: kept as in the sources (0.7 x 0.7, 1 x 1 mm; --spacing MM resamples)" in r.stderr
    assert json.loads((tmp_path / "e" / "meta.json").read_text())["spacing"] is None
