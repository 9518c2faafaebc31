"""
Slice geometry: how an axial slice is cut from a volume and put back.

    the volume is reoriented to the closest canonical (RAS+) axes with nibabel: array axis 0
    points to the patient's Right, 1 to Anterior, 2 to Superior; an axial slice is vol[:, :, z]
    shown as a 2-D image with
        rows    anterior (row 0) -> posterior
        columns patient's left (col 0) -> patient's right   (neurological convention)
    i.e. img = vol[:, :, z].T[::-1, :]  (img[r, c] = vol[c, Y-1-r, z]), and slices of one subject
    are stored inferior -> superior. The image is then cropped / zero-padded to (H, W) with a
    window centred on the brain's bounding box (one window per subject).

SliceGeometry (stored in meta.json under "volumes") records this per subject; slices_to_volume /
slices_to_nifti undo it. resample_to_grid samples a volume on another grid (world coordinates).
See data/README.md.
"""
from dataclasses import dataclass

import numpy as np

from unit.data import DataError


# ----------------------------------------------------------------------------------------
# orientation and resampling


def _ras_ornt(affine):
    from nibabel.orientations import io_orientation
    return io_orientation(affine)


def to_canonical(data, affine):
    """Reorient to the closest canonical (RAS+) axes: (data, canonical affine, ornt). Exact (only
    flips and transposes), like nibabel.as_closest_canonical."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff
    ornt = _ras_ornt(affine)
    return apply_orientation(data, ornt), affine @ inv_ornt_aff(ornt, data.shape), ornt


def from_canonical(data, source_affine):
    """Inverse of to_canonical: canonical-order array back to the source's stored voxel order."""
    from nibabel.orientations import apply_orientation
    ornt = _ras_ornt(source_affine)
    inv = np.zeros_like(ornt)
    for i, (ax, flip) in enumerate(ornt):
        inv[int(ax)] = (i, flip)
    return apply_orientation(data, inv)


def resample_to_grid(data, affine, shape, target_affine, order=1, fill=0.0):
    """Sample `data` (voxel->world `affine`) on the grid (shape, target_affine): trilinear
    (order=1) or nearest (order=0) in world coordinates, `fill` outside the source (the value
    fades to `fill` over the half voxel past the edge, like scipy's grid-constant mode). One
    output slab at a time, so memory stays ~ the output. Not a registration: it only uses the
    two affines."""
    M = np.linalg.inv(affine) @ np.asarray(target_affine, dtype=np.float64)  # target ijk -> source ijk
    I, J, K = (int(v) for v in shape)
    n = np.array(data.shape)
    ii, jj = np.meshgrid(np.arange(I, dtype=np.float64), np.arange(J, dtype=np.float64), indexing="ij")
    base = (M[:3, 0, None, None] * ii + M[:3, 1, None, None] * jj + M[:3, 3, None, None])  # (3, I, J)
    out = np.empty((I, J, K), dtype=np.float32)
    for k in range(K):
        c = base + M[:3, 2, None, None] * k
        if order == 0:
            idx = np.floor(c + 0.5).astype(np.int64)
            ok = np.all((idx >= 0) & (idx < n[:, None, None]), axis=0)
            idx = np.clip(idx, 0, (n - 1)[:, None, None])
            out[:, :, k] = np.where(ok, data[idx[0], idx[1], idx[2]], fill)
            continue
        c0 = np.floor(c)
        f = c - c0
        c0 = c0.astype(np.int64)
        acc = np.zeros((I, J), dtype=np.float64)
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    idx = c0 + np.array([dx, dy, dz])[:, None, None]
                    w = ((f[0] if dx else 1 - f[0]) * (f[1] if dy else 1 - f[1])
                         * (f[2] if dz else 1 - f[2]))
                    ok = np.all((idx >= 0) & (idx < n[:, None, None]), axis=0)
                    idx = np.clip(idx, 0, (n - 1)[:, None, None])
                    acc += w * np.where(ok, data[idx[0], idx[1], idx[2]], fill)
        out[:, :, k] = acc
    return out


def zooms(affine):
    """Voxel sizes (mm) along the array axes of a 4x4 affine."""
    return tuple(float(v) for v in np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(0)))


def inplane_grid(shape, affine, mm):
    """(shape, affine) of a canonical grid resampled in-plane (array axes 0 and 1, R and A) to mm x mm
    voxels, axis 2 (the axial slices) untouched: the same field of view, n' = round(n * d / mm) voxels
    along an axis of d mm, its outer voxel edge (voxel -0.5) kept where it was."""
    A = np.asarray(affine, dtype=np.float64).copy()
    new = list(int(v) for v in shape)
    for i, d in enumerate(zooms(affine)[:2]):
        new[i] = max(1, int(round(shape[i] * d / mm)))
        col = A[:3, i] * (mm / d)
        A[:3, 3] += 0.5 * (col - A[:3, i])          # edge -0.5 * old = -0.5 * new: shift the origin
        A[:3, i] = col
    return tuple(new), A


def resample_inplane(vol, affine, mm, order=1):
    """A canonical volume resampled in-plane to mm x mm (inplane_grid): (volume, its affine). Bilinear
    (order=1) or nearest (order=0, for masks); no anti-aliasing filter when the voxels grow."""
    shape, A = inplane_grid(vol.shape, affine, mm)
    out = resample_to_grid(np.asarray(vol, dtype=np.float32), affine, shape, A, order=order)
    return out, A


# ----------------------------------------------------------------------------------------
# slice selection, crop/pad, and the way back


def central_slices(mask, k):
    """Canonical axial indices (inferior -> superior) of the k central slices among those that
    contain mask voxels; k='all' (or None) gives every slice from the lowest to the highest one."""
    zs = np.flatnonzero(mask.any(axis=(0, 1)))
    if zs.size == 0:
        raise DataError("the mask is empty")
    z_lo, z_hi = int(zs[0]), int(zs[-1])
    if k in (None, "all"):
        return list(range(z_lo, z_hi + 1))
    k = int(k)
    if k > z_hi - z_lo + 1:
        raise DataError(f"only {z_hi - z_lo + 1} axial slices contain brain, fewer than --slices {k}")
    start = (z_lo + z_hi + 1 - k) // 2
    return list(range(start, start + k))


def brain_window(mask, size):
    """(row0, col0) of the (H, W) window centred on the bounding box of the mask, in display
    coordinates of an axial slice (rows anterior->posterior, cols left->right); may be negative
    or run past the image (that part is zero-padded)."""
    X, Y, _ = mask.shape
    H, W = size
    xs = np.flatnonzero(mask.any(axis=(1, 2)))
    ys = np.flatnonzero(mask.any(axis=(0, 2)))
    if xs.size == 0:
        raise DataError("the mask is empty")
    r_lo, r_hi = Y - 1 - int(ys[-1]), Y - 1 - int(ys[0])
    c_lo, c_hi = int(xs[0]), int(xs[-1])
    return ((r_lo + r_hi + 1 - H) // 2, (c_lo + c_hi + 1 - W) // 2)


def axial_display(vol, slices):
    """(K, Y, X) display images of canonical axial slices: rows anterior->posterior, cols L->R."""
    return np.asarray(vol)[:, :, list(slices)].transpose(2, 1, 0)[:, ::-1, :]


def _overlap(r0, c0, H, W, Y, X):
    rs, re_, cs, ce = max(r0, 0), min(r0 + H, Y), max(c0, 0), min(c0 + W, X)
    return rs, max(re_, rs), cs, max(ce, cs)


def crop_or_pad_slices(vol, slices, window, size, fill=0):
    """(K, H, W) axial display slices of a canonical volume, cut with the (H, W) window whose
    top-left display pixel is `window` = (row0, col0); outside the volume is `fill`."""
    X, Y, _ = vol.shape
    H, W = size
    r0, c0 = window
    out = np.full((len(slices), H, W), fill, dtype=vol.dtype)
    rs, re_, cs, ce = _overlap(r0, c0, H, W, Y, X)
    if re_ > rs and ce > cs:
        out[:, rs - r0:re_ - r0, cs - c0:ce - c0] = axial_display(vol, slices)[:, rs:re_, cs:ce]
    return out


@dataclass
class SliceGeometry:
    """Where a subject's prepared slices came from, in plain JSON types (stored in meta.json
    under "volumes"): enough to put translated slices back into the source grid."""
    source_shape: list        # stored voxel shape of the source T1
    source_affine: list       # its 4x4 affine (voxel -> world, mm)
    slices: list              # canonical axial indices, inferior -> superior
    window: list              # (row0, col0) of the crop window in display coordinates
    size: list                # (H, W)
    grid_shape: list = None   # with --spacing: the canonical grid the slices were cut from, after
    grid_affine: list = None  # the in-plane resampling (None: the source's own canonical grid)

    def to_json(self):
        return {"source_shape": [int(v) for v in self.source_shape],
                "source_affine": [[round(float(v), 6) for v in r] for r in np.asarray(self.source_affine)],
                "slices": [int(v) for v in self.slices], "window": [int(v) for v in self.window],
                "size": [int(v) for v in self.size]} | ({} if self.grid_shape is None else {
                "grid_shape": [int(v) for v in self.grid_shape],
                "grid_affine": [[round(float(v), 6) for v in r] for r in np.asarray(self.grid_affine)]})

    @classmethod
    def from_json(cls, d):
        return cls(d["source_shape"], d["source_affine"], d["slices"], d["window"], d["size"],
                   d.get("grid_shape"), d.get("grid_affine"))

    @property
    def canonical_shape(self):
        """Shape of the source reoriented to RAS+ (before any in-plane resampling)."""
        ornt = _ras_ornt(np.asarray(self.source_affine, dtype=np.float64))
        return tuple(int(self.source_shape[i]) for i in np.argsort(ornt[:, 0]))

    @property
    def canonical_affine(self):
        from nibabel.orientations import inv_ornt_aff
        a = np.asarray(self.source_affine, dtype=np.float64)
        return a @ inv_ornt_aff(_ras_ornt(a), tuple(int(v) for v in self.source_shape))


def slices_to_volume(slices, geometry, lo_hi=None, fill=0.0):
    """Inverse of the preparation: (K, H, W) slices (as prepared: display orientation, [0, 1])
    -> a float32 volume in the source's stored voxel order and shape, so that
    nibabel.Nifti1Image(vol, geometry.source_affine, source_header) lines up with the source.
    Undoes crop/pad (pixels outside the window and slices not prepared get `fill`),
    reorientation, and, when lo_hi = (lo, hi) is given, the normalisation (x * (hi - lo) + lo;
    values the normalisation clipped cannot come back), and an in-plane resampling (--spacing:
    bilinear back onto the source grid). For ixi the T2 was resampled onto the T1 grid, so its
    result lands on the T1 grid (the geometry's source)."""
    g = geometry if isinstance(geometry, SliceGeometry) else SliceGeometry.from_json(geometry)
    slices = np.asarray(slices, dtype=np.float32)
    if slices.ndim == 2:
        slices = slices[None]
    H, W = (int(v) for v in g.size)
    if slices.shape != (len(g.slices), H, W):
        raise ValueError(f"slices_to_volume: got {slices.shape}, expected ({len(g.slices)}, {H}, {W})")
    X, Y, Z = g.canonical_shape if g.grid_shape is None else (int(v) for v in g.grid_shape)
    r0, c0 = (int(v) for v in g.window)
    disp = np.full((len(g.slices), Y, X), fill, dtype=np.float32)
    rs, re_, cs, ce = _overlap(r0, c0, H, W, Y, X)
    part = slices[:, rs - r0:re_ - r0, cs - c0:ce - c0]
    if lo_hi is not None:
        lo, hi = lo_hi
        part = part * np.float32(hi - lo) + np.float32(lo)
    disp[:, rs:re_, cs:ce] = part
    vol = np.full((X, Y, Z), fill, dtype=np.float32)
    vol[:, :, list(g.slices)] = disp[:, ::-1, :].transpose(2, 1, 0)
    if g.grid_shape is not None:    # back from the resampled grid onto the source's canonical grid
        vol = resample_to_grid(vol, np.asarray(g.grid_affine, dtype=np.float64), g.canonical_shape,
                               g.canonical_affine, order=1, fill=fill)
    return np.ascontiguousarray(from_canonical(vol, np.asarray(g.source_affine, dtype=np.float64)))


def slices_to_nifti(slices, geometry, lo_hi=None, header=None, fill=0.0):
    """slices_to_volume wrapped as a float32 nibabel.Nifti1Image with the source affine (and the
    source header, e.g. SourceInfo.t2_header or nibabel.load(path).header, if given)."""
    import nibabel as nib
    g = geometry if isinstance(geometry, SliceGeometry) else SliceGeometry.from_json(geometry)
    vol = slices_to_volume(slices, g, lo_hi, fill)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(vol, np.asarray(g.source_affine, dtype=np.float64), hdr)
    img.set_data_dtype(np.float32)
    img.header.set_slope_inter(1.0, 0.0)
    return img
