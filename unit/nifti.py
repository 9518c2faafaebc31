"""
NIfTI source trees: finding a layout's subjects (hcp, brats, ixi, folders), reading a T1w/T2w pair
into canonical (RAS+) orientation, brain masks, per-volume normalisation, and prepare_subject(): all
that data/prepare.py does to one subject before the slices go into a prepared dataset (unit/data.py);
and read_png() for the PNG slices of the folders layout. Where the slices sit in the volume is
unit/geometry.py.
"""
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from unit.data import DataError
from unit.geometry import (SliceGeometry, _overlap, brain_window, central_slices, crop_or_pad_slices,
                           resample_inplane, resample_to_grid, to_canonical, zooms)


# ----------------------------------------------------------------------------------------
# finding subjects in a source tree


@dataclass
class Subject:
    id: str
    t1_path: str
    t2_path: str
    mask_path: str | None = None


def _nii_stem(name):
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


def _first_existing(*paths):
    for p in paths:
        if p.is_file():
            return p
    return paths[0]


EXPECTED_TREE = {
    "hcp": "SRC/<subject>/T1w/T1w_acpc_dc_restore_brain.nii.gz and T2w_acpc_dc_restore_brain.nii.gz "
           "(--hcp-space mni: SRC/<subject>/MNINonLinear/T1w_restore_brain.nii.gz and T2w_restore_brain.nii.gz)",
    "brats": "SRC/<case>/<case>_t1.nii.gz and <case>_t2.nii.gz (BraTS 2020/2021) or "
             "SRC/<case>/<case>-t1n.nii.gz and <case>-t2w.nii.gz (BraTS 2023)",
    "ixi": "SRC/IXI-T1/IXI###-Site-####-T1.nii.gz and SRC/IXI-T2/IXI###-Site-####-T2.nii.gz",
    "folders": "SRC/t1/NAME.nii[.gz] and SRC/t2/NAME.nii[.gz] (optional SRC/mask/NAME.nii[.gz]), or "
               "PNG slices in SRC/trainA, SRC/trainB, SRC/testA, SRC/testB",
}
_IXI = re.compile(r"^(IXI\d+-[A-Za-z]+-\d+)-(T1|T2)\.nii(\.gz)?$")


def guess_layout(src):
    """Best guess of which layout a tree follows (for error messages), or None."""
    src = Path(src)
    if not src.is_dir():
        return None
    names = {p.name for p in src.iterdir()}
    if "IXI-T1" in names or "IXI-T2" in names:
        return "ixi"
    if {"t1", "t2"} <= names or {"trainA", "trainB"} <= names:
        return "folders"
    for d in sorted(p for p in src.iterdir() if p.is_dir())[:20]:
        sub = {p.name for p in d.iterdir()}
        if "T1w" in sub or "MNINonLinear" in sub:
            return "hcp"
        if any(n.startswith(d.name + "_") or n.startswith(d.name + "-") for n in sub):
            return "brats"
    return None


def find_subjects(layout, src, hcp_space="acpc") -> list:
    """The subjects of a source tree, sorted by id. A subject with a missing file is still listed
    (its missing path is the one expected), so that loading it gives a clear, per-subject error.
    Raises DataError when SRC is missing or no subject of `layout` is found."""
    src = Path(src)
    if layout not in EXPECTED_TREE:
        raise DataError(f"unknown layout {layout!r}; use one of {', '.join(EXPECTED_TREE)} "
                        f"(see data/README.md).")
    if not src.is_dir():
        raise DataError(f"source folder {src} does not exist or is not a folder; pass the folder that "
                        f"holds your {layout} download.")
    subjects = []
    if layout == "hcp":
        if hcp_space not in ("acpc", "mni"):
            raise DataError(f"--hcp-space must be acpc or mni, got {hcp_space!r}.")
        sub, t1n, t2n = (("T1w", "T1w_acpc_dc_restore_brain", "T2w_acpc_dc_restore_brain")
                         if hcp_space == "acpc" else
                         ("MNINonLinear", "T1w_restore_brain", "T2w_restore_brain"))
        for d in sorted(p for p in src.iterdir() if p.is_dir()):
            if not (d / sub).is_dir():
                continue
            t1 = _first_existing(d / sub / f"{t1n}.nii.gz", d / sub / f"{t1n}.nii")
            t2 = _first_existing(d / sub / f"{t2n}.nii.gz", d / sub / f"{t2n}.nii")
            m = _first_existing(d / sub / "brainmask_fs.nii.gz", d / sub / "brainmask_fs.nii")
            subjects.append(Subject(d.name, str(t1), str(t2), str(m) if m.is_file() else None))
    elif layout == "brats":
        for d in sorted(p for p in src.iterdir() if p.is_dir()):
            c = d.name
            files = {p.name for p in d.iterdir() if _nii_stem(p.name) is not None}
            if not any(n.startswith(c + "_") or n.startswith(c + "-") for n in files):
                continue
            new = any(n.startswith(c + "-") for n in files)     # BraTS 2023 names
            t1s, t2s = (("-t1n", "-t2w") if new else ("_t1", "_t2"))
            t1 = _first_existing(d / f"{c}{t1s}.nii.gz", d / f"{c}{t1s}.nii")
            t2 = _first_existing(d / f"{c}{t2s}.nii.gz", d / f"{c}{t2s}.nii")
            subjects.append(Subject(c, str(t1), str(t2), None))
    elif layout == "ixi":
        found = {}
        for q in ("T1", "T2"):
            folder = src / f"IXI-{q}"
            if folder.is_dir():
                for p in folder.iterdir():
                    m = _IXI.match(p.name)
                    if m and m.group(2) == q:
                        found.setdefault(m.group(1), {})[q] = p
        for sid in sorted(found):
            f = found[sid]
            t1 = f.get("T1", src / "IXI-T1" / f"{sid}-T1.nii.gz")
            t2 = f.get("T2", src / "IXI-T2" / f"{sid}-T2.nii.gz")
            subjects.append(Subject(sid, str(t1), str(t2), None))
    elif layout == "folders":
        if (src / "t1").is_dir() or (src / "t2").is_dir():
            stems = {}
            for q in ("t1", "t2", "mask"):
                if (src / q).is_dir():
                    for p in (src / q).iterdir():
                        s = _nii_stem(p.name)
                        if s is not None:
                            stems.setdefault(s, {})[q] = p
            for s in sorted(stems):
                f = stems[s]
                if "t1" not in f and "t2" not in f:
                    continue
                subjects.append(Subject(s, str(f.get("t1", src / "t1" / f"{s}.nii.gz")),
                                        str(f.get("t2", src / "t2" / f"{s}.nii.gz")),
                                        str(f["mask"]) if "mask" in f else None))
    if not subjects:
        g = guess_layout(src)
        hint = f" it looks like the {g} layout" if g and g != layout else ""
        raise DataError(f"no {layout} subjects found in {src} (expected {EXPECTED_TREE[layout]});"
                        + (hint + ", so pass that layout instead" if hint else
                           " check the path and see data/README.md") + ".")
    return subjects


# ----------------------------------------------------------------------------------------
# reading NIfTI volumes


def load_nifti(path, what="image", allow_zero=False):
    """(data float32 3-D in stored voxel order, affine float64 (4, 4), header). Trailing
    singleton dimensions are dropped. DataError for a missing, unreadable, truncated, non-3-D,
    non-finite or (unless allow_zero) all-zero image."""
    import nibabel as nib
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} {p} is missing; add it or remove the subject's folder.")
    try:
        img = nib.load(str(p))
    except MemoryError:
        raise
    except Exception as e:
        raise DataError(f"{p} is not a readable NIfTI file ({type(e).__name__}: {e}); re-download or "
                        f"re-export it.") from None
    shape = tuple(img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise DataError(f"{p} is a {len(shape)}-D image of shape {tuple(img.shape)}, expected one 3-D "
                        f"volume; split or re-export it as 3-D.")
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32).reshape(shape)
    except MemoryError:
        raise
    except Exception as e:
        raise DataError(f"{p} could not be read ({type(e).__name__}: {e}); the file is truncated or "
                        f"corrupt, re-download or re-export it.") from None
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{p} has an invalid affine (singular or non-finite); fix its header (sform/qform).")
    bad = data.size - int(np.count_nonzero(np.isfinite(data)))
    if bad:
        raise DataError(f"{p} contains {bad} NaN/inf voxels; fix or re-export the image.")
    if not allow_zero and not data.any():
        raise DataError(f"{p} is all zero; re-export it or remove the subject.")
    return data, affine, img.header


class SourceInfo(NamedTuple):
    """What is needed to write a result back in a subject's source space."""
    t1_path: str
    t2_path: str
    source_shape: tuple        # stored voxel shape of the T1 (the grid both live on)
    source_affine: np.ndarray  # (4, 4) of the T1
    ornt: np.ndarray           # nibabel orientation source -> canonical
    zooms: tuple               # T1 voxel sizes (mm), stored order
    t1_header: object          # nibabel headers, for writing NIfTI with the source header
    t2_header: object
    t2_resampled: bool         # True when T2 was resampled onto the T1 grid (ixi)


class VolumePair(NamedTuple):
    t1: np.ndarray             # (X, Y, Z) float32, canonical RAS
    t2: np.ndarray             # (X, Y, Z) float32, canonical RAS, same grid as t1
    mask: np.ndarray | None    # (X, Y, Z) bool from the source's mask file, or None
    affine: np.ndarray         # canonical voxel -> world
    info: SourceInfo
    registration: dict | None = None   # register=True: what register_affine found


# ----------------------------------------------------------------------------------------
# registration (IXI: T1w and T2w are separate acquisitions), with SimpleITK, an optional dependency

REGISTRATION = ("SimpleITK: rigid (Euler 3-D, initialised by the images' centres of mass) then affine (12 "
                "parameters), Mattes mutual information (50 bins, 20% of the voxels sampled, seed 1), regular-step "
                "gradient descent, 3 resolutions (shrink 4, 2, 1; Gaussian smoothing 2, 1, 0 mm); the T2w is then "
                "resampled onto the T1w grid (linear)")


def _sitk_image(sitk, vol, affine):
    """A SimpleITK image of a (X, Y, Z) array whose voxel -> world map is `affine`. The world here is the
    NIfTI's RAS+ (not ITK's LPS): both images use it, and the transform found is then in RAS mm."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(vol, np.float32).transpose(2, 1, 0)))
    a = np.asarray(affine, dtype=np.float64)
    spacing = np.array(zooms(a))
    img.SetSpacing([float(v) for v in spacing])
    img.SetOrigin([float(v) for v in a[:3, 3]])
    img.SetDirection([float(v) for v in (a[:3, :3] / spacing).flatten()])
    return img


def register_affine(fixed, fixed_affine, moving, moving_affine):
    """Register `moving` (e.g. a T2w) to `fixed` (its subject's T1w): (moving resampled onto the fixed
    grid, float32; info). info["fixed_to_moving"] is the 4x4 map of world (RAS mm) points of the fixed
    image to the moving image's; also its rotation angle (degrees), translation (mm) and the final
    metric. See REGISTRATION for the method."""
    try:
        import SimpleITK as sitk
    except ImportError:
        raise DataError("--register needs SimpleITK: pip install SimpleITK") from None
    f, m = _sitk_image(sitk, fixed, fixed_affine), _sitk_image(sitk, moving, moving_affine)

    def run(initial):
        r = sitk.ImageRegistrationMethod()
        r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
        r.SetMetricSamplingStrategy(r.RANDOM)
        r.SetMetricSamplingPercentage(0.2, 1)              # seed 1: 0 would mean "the wall clock"
        r.SetInterpolator(sitk.sitkLinear)
        r.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=300,
                                                   relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
        r.SetOptimizerScalesFromPhysicalShift()
        r.SetShrinkFactorsPerLevel([4, 2, 1])
        r.SetSmoothingSigmasPerLevel([2, 1, 0])
        r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        r.SetInitialTransform(initial, inPlace=True)
        r.Execute(f, m)
        return r.GetMetricValue()

    rigid = sitk.CenteredTransformInitializer(f, m, sitk.Euler3DTransform(),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    run(rigid)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    metric = run(affine)
    out = sitk.GetArrayFromImage(sitk.Resample(m, f, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    M = np.array(affine.GetMatrix()).reshape(3, 3)
    c, t = np.array(affine.GetCenter()), np.array(affine.GetTranslation())
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = M, t + c - M @ c                       # p_moving = M (p - c) + c + t
    u, _, vt = np.linalg.svd(M)                                  # the rotation closest to M
    angle = np.degrees(np.arccos(np.clip((np.trace(u @ vt) - 1) / 2, -1, 1)))
    info = {"fixed_to_moving": [[round(float(v), 6) for v in row] for row in T],
            "rotation_deg": round(float(angle), 3), "translation_mm": [round(float(v), 3) for v in T[:3, 3]],
            "mattes_mi": round(float(metric), 5)}
    return np.ascontiguousarray(out.transpose(2, 1, 0)), info


def _same_grid(a1, a2, tol=1e-3):
    return np.allclose(a1, a2, atol=tol, rtol=0)


def load_volume_pair(subject, resample_t2=False, register=False) -> VolumePair:
    """Load a subject's T1, T2 (and mask file if any) in canonical (RAS) orientation.
    resample_t2=False (hcp, brats, folders): T1 and T2 must share shape and affine (co-registered);
    True (ixi): T2 is resampled (trilinear, world coordinates) onto the T1's grid; with register=True
    (ixi --register) it is first registered to the T1 (register_affine) and resampled with the result.
    DataError for any problem with the subject's files."""
    t1, a1, h1 = load_nifti(subject.t1_path, "T1 image")
    t2, a2, h2 = load_nifti(subject.t2_path, "T2 image")
    if not resample_t2:
        if t1.shape != t2.shape:
            raise DataError(f"T1 {subject.t1_path} and T2 {subject.t2_path} have different shapes "
                            f"{t1.shape} and {t2.shape}; this layout needs co-registered images on one "
                            f"grid, so resample one onto the other (or use the ixi layout).")
        if not _same_grid(a1, a2):
            raise DataError(f"T1 {subject.t1_path} and T2 {subject.t2_path} have different affines "
                            f"(max difference {np.abs(a1 - a2).max():.3g}); this layout needs "
                            f"co-registered images on one grid, so resample one onto the other.")
    source_shape = tuple(int(v) for v in t1.shape)
    t1c, ac, ornt = to_canonical(t1, a1)
    registration = None
    if register:
        t2c, registration = register_affine(t1c, ac, t2, a2)
    elif resample_t2:
        t2c = resample_to_grid(t2, a2, t1c.shape, ac, order=1)
    else:
        t2c, _, _ = to_canonical(t2, a2)
    del t1, t2
    maskc = None
    if subject.mask_path:
        m, am, _ = load_nifti(subject.mask_path, "mask")
        if m.shape != source_shape or not _same_grid(am, a1):
            raise DataError(f"mask {subject.mask_path} does not lie on the grid of T1 {subject.t1_path} "
                            f"(shape {m.shape}); use the mask that belongs to this T1, or remove it.")
        maskc = to_canonical(m > 0, a1)[0]
    info = SourceInfo(str(subject.t1_path), str(subject.t2_path), source_shape, a1, ornt, zooms(a1),
                      h1, h2, bool(resample_t2 or register))
    return VolumePair(t1c, t2c, maskc, ac, info, registration)


def read_png(path):
    """A PNG slice as float32 (H, W) in [0, 1]: 8-bit / 255, 16-bit / 65535; colour -> luma."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L"):
                return np.asarray(im, dtype=np.float32) / 65535.0
            if im.mode == "I":
                a = np.asarray(im, dtype=np.float64)
                if a.min() < 0 or a.max() > 65535:
                    raise DataError(f"{path} holds 32-bit values outside 0..65535; save it as 8- or 16-bit.")
                return (a / 65535.0).astype(np.float32)
            if im.mode == "F":
                raise DataError(f"{path} is a floating-point PNG/TIFF; save it as 8- or 16-bit grayscale.")
            if im.mode != "L":
                im = im.convert("L")
            return np.asarray(im, dtype=np.float32) / 255.0
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path} is not a readable image ({type(e).__name__}: {e}); re-export it.") from None


# ----------------------------------------------------------------------------------------
# masks and normalisation


MASK_RULES = {
    "nonzero": "voxels where T1 or T2 is nonzero (the source images are skull-stripped, so this is "
               "their own brain extraction)",
    "threshold": "voxels where T1 > 10% of the 99th percentile of its nonzero voxels (a foreground / "
                 "head mask, NOT a brain segmentation)",
}


# the intensity percentiles mapped to 0 and 1 (of the masked voxels), unless prepare.py --percentiles says otherwise
PERCENTILES = (0.5, 99.5)


# how each layout's mask is made when the source has none (data/prepare.py, evaluate.py --volumes)
LAYOUT_MASK_RULE = {"hcp": "nonzero", "brats": "nonzero", "ixi": "threshold", "folders": "threshold"}


def derive_mask(t1, t2, rule):
    """A mask for sources without one; see MASK_RULES for what each rule means."""
    if rule == "nonzero":
        return (t1 != 0) | (t2 != 0)
    if rule == "threshold":
        nz = t1[t1 > 0]
        if nz.size == 0:
            return np.zeros(t1.shape, bool)
        return t1 > 0.1 * float(np.percentile(nz, 99))
    raise ValueError(f"derive_mask: unknown rule {rule!r}")


def robust_range(vol, mask=None, percentiles=PERCENTILES, what="volume"):
    """(lo, hi): the given percentiles of the voxels inside mask (nonzero voxels if mask is None)."""
    vals = vol[mask] if mask is not None else vol[vol != 0]
    if vals.size == 0:
        raise DataError(f"{what} has no voxels inside its mask; check the image and its mask.")
    lo, hi = (float(v) for v in np.percentile(vals, percentiles))
    if not hi > lo:
        raise DataError(f"{what} is constant ({lo:g}) inside its mask, so it cannot be normalised; "
                        f"check the image or remove the subject.")
    return lo, hi


def apply_range(vol, lo_hi):
    """clip((vol - lo) / (hi - lo), 0, 1) as float32."""
    lo, hi = lo_hi
    out = np.asarray(vol, dtype=np.float32) - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def normalize_volume(vol, mask=None, percentiles=PERCENTILES, what="volume"):
    """Robust per-volume normalisation to [0, 1]: (vol01 float32, (lo, hi)) with lo, hi the
    percentiles of the brain (mask) voxels; values are clipped to [lo, hi] then scaled.
    Inverse (for unclipped values): vol = vol01 * (hi - lo) + lo."""
    lo_hi = robust_range(vol, mask, percentiles, what)
    return apply_range(vol, lo_hi), lo_hi


# ----------------------------------------------------------------------------------------
# one subject, as data/prepare.py prepares it


class SubjectSlices(NamedTuple):
    t1: np.ndarray        # (K, H, W) float32 in [0, 1]
    t2: np.ndarray
    mask: np.ndarray      # (K, H, W) bool
    geometry: SliceGeometry
    t1_range: tuple       # (lo, hi) of the T1 normalisation
    t2_range: tuple
    mask_source: str      # "source" (the subject's mask file) or "derived:<rule>"
    registration: dict | None = None   # register=True: what register_affine found


def prepare_subject(subject, size=(304, 256), slices=1, percentiles=PERCENTILES,
                    resample_t2=False, mask_rule="nonzero", spacing=None, register=False) -> SubjectSlices:
    """Everything data/prepare.py does to one NIfTI subject: load + reorient (load_volume_pair),
    with register=True register the T2 to the T1 first (register_affine, ixi --register),
    with spacing=MM resample in-plane to MM x MM (resample_inplane: bilinear, the mask nearest),
    mask (the source's, else derive_mask(rule)), normalise each contrast (percentiles of mask
    voxels), pick the central slices, crop/pad around the brain. DataError on any problem."""
    v = load_volume_pair(subject, resample_t2=resample_t2, register=register)
    t1v, t2v, grid = v.t1, v.t2, {}
    if spacing:
        t1v, a = resample_inplane(v.t1, v.affine, spacing)
        t2v, _ = resample_inplane(v.t2, v.affine, spacing)
        grid = {"grid_shape": list(t1v.shape), "grid_affine": a.tolist()}
    if v.mask is not None:
        mask, mask_source = v.mask, "source"
        if spacing:
            mask = resample_inplane(mask, v.affine, spacing, order=0)[0] > 0.5
        if not mask.any():
            raise DataError(f"mask {subject.mask_path} is empty; fix or remove it.")
    else:
        mask, mask_source = derive_mask(t1v, t2v, mask_rule), f"derived:{mask_rule}"
        if not mask.any():
            raise DataError(f"T1 {subject.t1_path} gives an empty {mask_rule} mask; check the image.")
    r1 = robust_range(t1v, mask, percentiles, f"T1 {subject.t1_path}")
    r2 = robust_range(t2v, mask, percentiles, f"T2 {subject.t2_path}")
    try:
        zs = central_slices(mask, slices)
    except DataError as e:
        raise DataError(f"T1 {subject.t1_path}: {e}; use a smaller --slices.") from None
    window = brain_window(mask, size)
    t1 = apply_range(crop_or_pad_slices(t1v, zs, window, size), r1)
    t2 = apply_range(crop_or_pad_slices(t2v, zs, window, size), r2)
    m = crop_or_pad_slices(mask, zs, window, size, fill=False)
    # padding is 0 in the source intensity, which normalises to clip(-lo/(hi-lo)); force 0 there
    geo = SliceGeometry(list(v.info.source_shape), v.info.source_affine.tolist(), zs, list(window),
                        list(size), **grid)
    X, Y, _ = t1v.shape
    H, W = size
    r0, c0 = window
    rs, re_, cs, ce = _overlap(r0, c0, H, W, Y, X)
    inside = np.zeros((H, W), bool)
    inside[rs - r0:re_ - r0, cs - c0:ce - c0] = True
    t1[:, ~inside] = 0.0
    t2[:, ~inside] = 0.0
    return SubjectSlices(t1, t2, m, geo, r1, r2, mask_source, v.registration)
