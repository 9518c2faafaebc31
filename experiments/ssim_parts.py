"""Which of SSIM's three factors a translator loses: luminance, contrast or structure, inside the brain's core.

    python experiments/ssim_parts.py runs/realmri/default-seed0/ckpt.pt [CKPT ...] [--split test]

SSIM (Wang et al. 2004, with C3 = C2 / 2, as unit/metrics.py computes it) is the product of three local factors
in each 11x11 Gaussian window, with means m, standard deviations s and covariance c of the prediction x and
the target y:
- luminance  l = (2 mx my + C1) / (mx^2 + my^2 + C1): the local level;
- contrast   c = (2 sx sy + C2) / (sx^2 + sy^2 + C2): the local amount of detail, whatever its shape
  (a blur lowers it; so does drawing more detail than the target has);
- structure  s = (cxy + C2 / 2) / (sx sy + C2 / 2): the local correlation, where the detail is and its sign.
Each is averaged over the core brain mask (the brain eroded by 5 px, as core SSIM is) per subject, then over
subjects; "sd ratio" is the mean local sx over the mean local sy (below 1: smoother than the target). The
inverted input and the intensity LUT (fit on the training split, as evaluate.py does) come first. T1 = T2w->T1w,
T2 = T1w->T2w. On the validation patients by default (where choices are made). docs/realmri.md.
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unit.evaluation import diagnostic_args, split_predictions  # noqa: E402
from unit.metrics import K1, K2, erode, local_stats, valid_pixels  # noqa: E402

PARTS = ("l", "c", "s", "ssim", "sx", "sy")


def ssim_parts(x, y, mask):
    """SSIM's factors of x, y (N, H, W) in [0, 1], summed over the valid pixels inside mask (N, H, W):
    ({part: (N,) float64 sum}, (N,) pixel count); "ssim" is l * c * s, "sx", "sy" the local standard deviations."""
    x, y = x.unsqueeze(1).double(), y.unsqueeze(1).double()
    mx, my, vx, vy, cxy = local_stats(x, y)
    c1, c2 = K1 ** 2, K2 ** 2
    sx, sy = vx.clamp_min(0).sqrt(), vy.clamp_min(0).sqrt()
    f = {"l": (2 * mx * my + c1) / (mx * mx + my * my + c1), "c": (2 * sx * sy + c2) / (vx + vy + c2),
         "s": (cxy + c2 / 2) / (sx * sy + c2 / 2), "sx": sx, "sy": sy}
    f["ssim"] = f["l"] * f["c"] * f["s"]
    m = valid_pixels(mask).unsqueeze(1).double()
    return {k: (v * m).sum(dim=(1, 2, 3)) for k, v in f.items()}, m.sum(dim=(1, 2, 3))


def subject_parts(pred, real, mask, ids, chunk=32):
    """ssim_parts over each subject's pixels (its slices pooled), then the mean over subjects: {part: float};
    "sd ratio" is mean sx / mean sy."""
    sums, counts = {k: [] for k in PARTS}, []
    for i in range(0, len(pred), chunk):
        s, n = ssim_parts(pred[i:i + chunk], real[i:i + chunk], mask[i:i + chunk])
        for k in PARTS:
            sums[k].append(s[k])
        counts.append(n)
    sums, counts, ids = {k: torch.cat(v).numpy() for k, v in sums.items()}, torch.cat(counts).numpy(), np.asarray(ids)
    per = []
    for sub in dict.fromkeys(ids):
        on = ids == sub
        n = counts[on].sum()
        if n:
            per.append({k: sums[k][on].sum() / n for k in PARTS})
    out = {k: float(np.mean([p[k] for p in per])) for k in PARTS}
    out["sd ratio"] = out["sx"] / out["sy"]
    return out


def main(argv=None):
    args, models, data, (t1, t2, mask, ids) = diagnostic_args(__doc__.split("\n")[0], argv)
    if mask is None:
        sys.exit(f"{data.path}: no brain masks, so no core to score")
    core = erode(mask)
    rows = split_predictions(data, args.split, t1, t2, zip(args.ckpts, models))
    print(f"{args.split}: {len(set(ids))} subjects, core brain mask; T1 / T2 in each cell\n")
    print("| prediction | luminance l | contrast c | structure s | SSIM = l c s | sd ratio |")
    print("|---|---|---|---|---|---|")
    for name, pred in rows.items():
        r = {c: subject_parts(pred[c], t1 if c == "T1" else t2, core, ids) for c in ("T1", "T2")}
        print(f"| {name} | " + " | ".join(f"{r['T1'][k]:.3f} / {r['T2'][k]:.3f}"
                                           for k in ("l", "c", "s", "ssim", "sd ratio")) + " |", flush=True)


if __name__ == "__main__":
    main()
