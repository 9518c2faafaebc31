"""Translate your own scan with a trained checkpoint (like nanoGPT's sample.py).

    python translate.py runs/encoder-sn-cl/ckpt.pt sub-01_T1w.nii.gz sub-01_T2w_synth.nii.gz
    python translate.py CKPT scans/ synth/ --to t2        # every NIfTI in a folder, one output each
    python translate.py CKPT slice_t2.png slice_t1.png    # one 2-D slice (as the PNG folders layout)

A volume goes through the steps of data/prepare.py and back:
  1. read IN (3-D, or 4-D with a single volume) and reorient it to canonical RAS+ (flips and
     transposes only, no interpolation);
  2. the brain mask: --mask M (on IN's grid), or the rule the training data used (the checkpoint's
     "prep": nonzero voxels for skull-stripped sources, else a threshold at 10% of the 99th
     percentile, a head mask);
  3. normalisation to [0, 1]: the training data's percentiles (default 0.5, 99.5) of the masked voxels;
     if the training data was resampled (prepare.py --spacing MM), IN is resampled in-plane to MM x MM
     first and the translation back onto IN's grid at the end (bilinear);
  4. every axial slice from the lowest to the highest one with mask voxels, whole (zero-padded to a
     multiple of 4, as the network halves the image twice, then cropped back), translated in batches on
     the GPU if there is one; the other slices are 0;
  5. 0 outside the brain where the brain is known: --mask, or IN's nonzero voxels when the training data
     was skull-stripped (the checkpoint's mask rule "nonzero"): the synthetic scan has the input's
     background (--keep-background: the network's raw output there);
  6. --match-level only: the translated brain shifted so that its mean is the training volumes' mean brain level
     of the target contrast (the checkpoint's "prep" "levels"; evaluate.py --match-level scores it), then clipped
     to [0, 1]: a volume's own level is set by its normalisation, which the network cannot see from its slices;
  7. written on IN's grid: IN's shape, affine and header, float32 values in [0, 1] (the model's
     normalised scale: a synthetic image has no scanner units).
Direction: --to t2 (IN is T1w) or --to t1 (IN is T2w); without --to it is read from IN's file name
(T1, T1w, t1n -> t2; T2, T2w -> t1), and a name that says neither is refused.
"""
import argparse
import os
import re
import sys

import numpy as np
import torch

from unit import UserError
from unit.checkpoint import load_model
from unit.data import DataError
from unit.evaluation import match_level, stack_rows, translate
from unit.geometry import (SliceGeometry, axial_display, central_slices, resample_inplane, slices_to_volume,
                           to_canonical)
from unit.io import make_folder, refuse_existing, write_nifti, write_png
from unit.nifti import PERCENTILES, apply_range, derive_mask, load_nifti, read_png, robust_range
from unit.progress import Progress

NIFTI = (".nii.gz", ".nii")


def contrast_target(name):
    """'t2' for a T1w file name, 't1' for a T2w one, None when the name says neither or both."""
    found = set(re.findall(r"(?:^|[^a-z0-9])(t[12])(?:w|n|$|[^a-z0-9])", name.lower()))
    return {frozenset({"t1"}): "t2", frozenset({"t2"}): "t1"}.get(frozenset(found))


def pad4(slices):
    """(K, H, W) -> zero-padded at the bottom and right to multiples of 4: the network halves twice."""
    K, H, W = slices.shape
    out = np.zeros((K, -(-H // 4) * 4, -(-W // 4) * 4), np.float32)
    out[:, :H, :W] = slices
    return out


def run_model(model, cfg, slices, src, device, batch_size, desc):
    """Translate (K, H, W) slices in [0, 1] from domain src, any H, W; (K, H, W) float32 in [0, 1]."""
    K, H, W = slices.shape
    x = pad4(slices)
    out = np.empty_like(x)
    bar = Progress(K, desc, every_s=10)
    rows = stack_rows(0, K, cfg["context"]) if cfg["context"] else None   # --context: neighbours of the whole volume
    for i in range(0, K, batch_size):
        part = (x[i:i + batch_size], None) if rows is None else (x, rows[i:i + batch_size])
        out[i:i + batch_size] = translate(model, part[0], src, device, cfg["channels"], batch_size, part[1]).numpy()
        bar.update(min(batch_size, K - i))
    bar.close()
    return out[:, :H, :W]


def translate_volume(fn, vol, affine, mask=None, percentiles=PERCENTILES, mask_rule="threshold",
                     spacing=None, what="IN", keep_background=False):
    """Steps 1-5 of the module docstring with the translator fn ((K, H, W) -> (K, H, W), both in [0, 1]):
    a float32 volume in vol's stored voxel order and shape. mask: bool, on vol's grid, or None.
    spacing: the model's in-plane voxel size (mm), resampled to and back from; None = IN's own.
    keep_background: the network's output everywhere, also outside a brain mask (step 5)."""
    vc, ac, _ = to_canonical(vol, affine)
    grid = {}
    if spacing:
        vc, a = resample_inplane(vc, ac, spacing)
        grid = {"grid_shape": list(vc.shape), "grid_affine": a.tolist()}
    if mask is None:
        mc = derive_mask(vc, vc, mask_rule)
        if not mc.any():
            raise DataError(f"{what} gives an empty {mask_rule} mask; pass --mask")
    else:
        mc, _, _ = to_canonical(mask, affine)
        if spacing:
            mc = resample_inplane(mc, ac, spacing, order=0)[0] > 0.5
        if not mc.any():
            raise DataError(f"the mask given for {what} is empty (all zero); pass a mask with brain voxels")
    v01 = apply_range(vc, robust_range(vc, mc, percentiles, what))
    zs = central_slices(mc, "all")
    X, Y, _ = vc.shape
    out = fn(np.ascontiguousarray(axial_display(v01, zs)))              # (K, Y, X) display slices
    geo = SliceGeometry(list(vol.shape), np.asarray(affine).tolist(), zs, [0, 0], [Y, X], **grid)
    out = slices_to_volume(out, geo)
    brain = brain_outline(vol, mask, mask_rule)
    if brain is not None and not keep_background:
        out[~brain] = 0
    return out


def brain_outline(vol, mask, mask_rule):
    """The voxels of vol (its own grid) a synthetic scan keeps, or None for all of them: --mask, or for
    skull-stripped sources (mask rule "nonzero") the input's nonzero voxels, its own brain extraction. A
    threshold (head) mask is a rough outline, not the brain, so it cuts nothing."""
    if mask is not None:
        return mask
    return vol != 0 if mask_rule == "nonzero" else None


def translate_file(model, cfg, src_path, dst_path, to, mask_path, args):
    """One NIfTI or PNG file IN -> OUT."""
    import nibabel as nib
    src = "a" if to == "t2" else "b"
    direction = "T1w -> T2w" if to == "t2" else "T2w -> T1w"
    if src_path.lower().endswith(".png"):
        from PIL import Image
        if not dst_path.lower().endswith(".png"):
            raise UserError(f"{src_path} is a PNG, so OUT must be a .png file too, not {dst_path}")
        if cfg["context"]:
            raise UserError(f"this checkpoint was trained with --context {cfg['context']}: it translates a slice with "
                            f"its neighbours, which a PNG ({src_path}) does not have; give it the NIfTI volume")
        if args.match_level:
            raise UserError(f"--match-level sets the level of a whole volume, and {src_path} is one slice; drop the flag")
        img = read_png(src_path)                                         # (H, W) in [0, 1], as prepare.py
        out = run_model(model, cfg, img[None], src, args.device, args.batch_size, f"{direction} slice")[0]
        write_png(dst_path, Image.fromarray(np.round(out * 255).astype(np.uint8)))
        print(f"wrote {dst_path} ({direction}, {img.shape[0]}x{img.shape[1]})")
        return
    if not dst_path.endswith(NIFTI):
        raise UserError(f"OUT {dst_path} must end in .nii.gz or .nii (IN is a NIfTI volume)")
    vol, affine, header = load_nifti(src_path, "IN")
    shape = nib.load(src_path).shape                                     # kept as is, trailing 1s too
    mask = None
    if mask_path:
        m, am, _ = load_nifti(mask_path, "mask", allow_zero=True)   # empty: said below, in translate_volume
        if m.shape != vol.shape or not np.allclose(am, affine, atol=1e-3):
            raise DataError(f"mask {mask_path} (shape {m.shape}) is not on the grid of {src_path} (shape "
                            f"{vol.shape}); pass the mask that belongs to this scan")
        mask = m > 0
    prep = cfg["prep"] or {}
    pct = tuple(prep.get("percentiles") or PERCENTILES)
    rule = prep.get("mask_rule") or "threshold"
    spacing = prep.get("spacing")
    fn = lambda s: run_model(model, cfg, s, src, args.device, args.batch_size, f"{direction} slices")
    out = translate_volume(fn, vol, affine, mask, pct, rule, spacing, what=src_path,
                           keep_background=args.keep_background)
    brain = brain_outline(vol, mask, rule)
    if args.match_level:                                # step 6
        level = (prep.get("levels") or {}).get(to.upper())
        if level is None:
            raise UserError(f"--match-level: {args.ckpt} records no training level (trained before they were "
                            f"recorded, or on unpaired data); drop the flag")
        if brain is None:
            raise UserError(f"--match-level needs the brain of {src_path}: pass --mask (the training data's mask rule, "
                            f"{rule}, outlines the head)")
        out = match_level(out, brain, np.zeros(len(out)), level).numpy()
    cut = brain is not None and not args.keep_background
    hdr = header.copy()
    hdr.set_data_dtype(np.float32)
    img = nib.Nifti1Image(out.reshape(shape), affine, hdr)
    img.header.set_slope_inter(1.0, 0.0)
    write_nifti(dst_path, img)
    print(f"wrote {dst_path} ({direction}; shape {tuple(shape)}, {src_path}'s affine and header; mask: "
          f"{'--mask' if mask_path else rule}{', 0 outside it' if cut else ''}; normalisation: percentiles "
          f"{pct[0]:g}, {pct[1]:g} of the mask; "
          + (f"resampled in-plane to the model's {spacing:g} mm and back" if spacing else "IN's own spacing")
          + (f"; brain level matched to {prep['levels'][to.upper()]:.3f})" if args.match_level else ")"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="checkpoint written by train.py")
    p.add_argument("input", metavar="IN", help="a NIfTI volume (.nii, .nii.gz), a PNG slice, or a folder of NIfTIs")
    p.add_argument("output", metavar="OUT", help="the translated file (same kind as IN), or a folder for a folder")
    p.add_argument("--to", choices=("t1", "t2"), help="the contrast to make (default: the other one than IN's "
                                                      "file name says)")
    p.add_argument("--mask", metavar="M", help="brain mask NIfTI on IN's grid (default: the training data's rule)")
    p.add_argument("--keep-background", action="store_true", help="keep the network's output outside the brain "
                   "(default: 0 there, like the input, when the mask is --mask or a skull-stripped input's)")
    p.add_argument("--match-level", action="store_true", help="shift the translated brain so that its mean is the "
                   "training volumes' mean level of the target contrast (as evaluate.py --match-level scores)")
    p.add_argument("--batch-size", type=int, default=16, help="slices per forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (or the files it would write in an OUT "
                                                            "folder) if it exists")
    args = p.parse_args(argv)
    model, ckpt = load_model(args.ckpt, args.device)
    cfg = ckpt["config"]
    if os.path.isdir(args.input):
        if args.mask:
            raise UserError("--mask belongs to one scan; translate the scans of a folder one by one to give masks")
        files = sorted(f for f in os.listdir(args.input) if f.endswith(NIFTI))
        if not files:
            raise UserError(f"{args.input} holds no .nii or .nii.gz files")
        make_folder(args.output)
    else:
        if not os.path.isfile(args.input):
            raise UserError(f"IN {args.input} does not exist")
        if not args.input.lower().endswith(NIFTI + (".png",)):
            raise UserError(f"IN {args.input} is not a NIfTI (.nii, .nii.gz) or PNG file, nor a folder")
        files = [None]
    jobs = []
    for f in files:
        src = args.input if f is None else os.path.join(args.input, f)
        to = args.to or contrast_target(os.path.basename(src))
        if to is None:
            raise UserError(f"cannot tell from the name {os.path.basename(src)} whether it is T1w or T2w; pass "
                            f"--to t2 (it is T1w) or --to t1 (it is T2w)")
        if f is None:
            dst = args.output
        else:
            stem = f[:-len(next(e for e in NIFTI if f.endswith(e)))]
            dst = os.path.join(args.output, f"{stem}_to_{to}.nii.gz")
        jobs.append((src, dst, to))
    if not args.overwrite:                              # before any work: nothing is replaced unasked
        refuse_existing([dst for _, dst, _ in jobs], "OUT")
    for src, dst, to in jobs:
        translate_file(model, cfg, src, dst, to, args.mask, args)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:   # DataError is one too; unit.io.WriteError (a failed write) exits with 1
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.status)
