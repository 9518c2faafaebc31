"""Slice-to-slice streaks of a 2-D translator: does its output vary more from slice to slice than its input explains?

    python experiments/through_plane.py runs/realmri/default-seed0/ckpt.pt [CKPT ...] [--split test]

A 2-D translator sees each axial slice alone, so what it draws differently in neighbouring slices shows up as
streaks in sagittal and coronal views. For every subject of the split whose slices form a volume
(unit.evaluation.volume_runs), inside the brain, per direction (T1 = T2w->T1w, T2 = T1w->T2w):
- error correlation: the correlation of the error (prediction - target) between neighbouring voxels, through
  the plane (z) and in it (the mean of y and x): streaks lower it along z;
- neighbour ratio: the mean |difference| between neighbouring voxels of the prediction over that of the target,
  along z and in-plane, and their quotient z / in-plane (above 1: rougher through the plane than in it,
  measured against the target's own roughness).
The inverted input and the intensity LUT (fit on the training split, as evaluate.py does) come first: both map
each voxel on its own, so they draw nothing slice by slice; what they show along z is their input's. Means over
subjects. On the validation patients by default (where choices are made). docs/realmri.md, "Through the plane".
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unit.evaluation import diagnostic_args, split_predictions, volume_runs  # noqa: E402


def neighbours(pred, real, mask):
    """For one volume (Z, H, W) inside mask: {"corr_z", "corr_xy", "ratio_z", "ratio_xy"} (see the docstring)."""
    err, out = pred - real, {}
    for name, axes in (("z", (0,)), ("xy", (1, 2))):
        corr, ratio = [], []
        for ax in axes:
            lo, hi = [slice(None)] * 3, [slice(None)] * 3
            lo[ax], hi[ax] = slice(0, -1), slice(1, None)
            lo, hi = tuple(lo), tuple(hi)
            both = mask[lo] & mask[hi]
            corr.append(np.corrcoef(err[lo][both], err[hi][both])[0, 1])
            ratio.append(np.abs(pred[hi] - pred[lo])[both].mean() / np.abs(real[hi] - real[lo])[both].mean())
        out[f"corr_{name}"], out[f"ratio_{name}"] = np.mean(corr), np.mean(ratio)
    return out


def main(argv=None):
    args, models, data, (t1, t2, mask, ids) = diagnostic_args(__doc__.split("\n")[0], argv)
    runs = volume_runs(data, ids)
    if not runs or mask is None:
        sys.exit(f"{data.path}: no subject of the {args.split} split has whole volumes with brain masks")
    rows = split_predictions(data, args.split, t1, t2, zip(args.ckpts, models))
    real, m = {"T1": t1.double().numpy(), "T2": t2.double().numpy()}, mask.numpy()
    print(f"{args.split}: {len(runs)} subjects with volumes; T1 | T2: error correlation z, in-plane; "
          f"neighbour ratio z, in-plane, z / in-plane")
    for name, pred in rows.items():
        cells = []
        for c in ("T1", "T2"):
            x = pred[c].double().numpy()
            s = [neighbours(x[a:b], real[c][a:b], m[a:b]) for a, b in runs.values()]
            s = {k: np.mean([d[k] for d in s]) for k in s[0]}
            cells.append(f"{s['corr_z']:.3f} {s['corr_xy']:.3f}  {s['ratio_z']:.3f} {s['ratio_xy']:.3f} "
                         f"{s['ratio_z'] / s['ratio_xy']:.3f}")
        print(f"{name:40s} " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
