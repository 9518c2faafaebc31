"""Where a translator's intensity gap to the intensity LUT lies: content, or how the content is rendered.

    python experiments/intensity_gap.py runs/realmri/data runs/realmri/default-seed0/ckpt.pt [CKPT ...]

Scores on the validation patients (--split test for the test ones; choices are made on validation), brain
SSIM, core SSIM, PSNR and MAE, T1 = T2w->T1w and T2 = T1w->T2w, for each checkpoint:
- raw: the translation as evaluate.py scores it;
- calibrated: E[target | output] in 64 bins, fit on --fit training slices with their real targets (pairs: not
  something UNIT may use; it measures how much of the gap is the rendering of the output's intensities);
- 2-D LUT: E[target | input bin, output bin] in 32 x 32 bins, fit the same way: what the output adds to the
  input's intensity, whatever its rendering;
- histogram-matched: the output's brain intensities mapped onto the training targets' quantiles (unpaired:
  only the two marginals);
- posterior mean: the generator's output averaged over --draws codes z = mu + N(0, I) instead of z = mu.
The LUT row (evaluate.py's, fit on the same slices) comes first. docs/realmri.md, "Where the intensity gap is".
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unit.checkpoint import load_model  # noqa: E402
from unit.data import load_prepared  # noqa: E402
from unit.evaluation import (apply_lut, fit_lut, from_model, means, per_slice, subject_scores,  # noqa: E402
                             test_split, to_model)

METRICS = ("ssim_mask", "ssim_core", "psnr_mask", "mae_mask")


def lut2(src, out, dst, mask, bins=32):
    """E[dst | src bin, out bin] over the mask's voxels: a (bins * bins,) table."""
    b = np.clip((src[mask] * bins).astype(int), 0, bins - 1) * bins + \
        np.clip((out[mask] * bins).astype(int), 0, bins - 1)
    total, count = np.bincount(b, weights=dst[mask], minlength=bins * bins), np.bincount(b, minlength=bins * bins)
    return np.where(count > 0, total / np.maximum(count, 1), dst[mask].mean())


def apply_lut2(table, src, out, bins=32):
    b = np.clip((src * bins).astype(int), 0, bins - 1) * bins + np.clip((out * bins).astype(int), 0, bins - 1)
    return torch.from_numpy(np.where(src > 0, table[b], 0).astype(np.float32))


@torch.no_grad()
def outputs(model, x, src, draws, gen, batch=32):
    """(translation with z = mu, its mean over `draws` codes z = mu + N(0, I) or None for 0), (N, H, W) in [0, 1]."""
    dst = "b" if src == "a" else "a"
    mu_out, mean_out = [], []
    for i in range(0, len(x), batch):
        mu = model.encode(to_model(x[i:i + batch], 1, "cpu"), src)
        mu_out.append(from_model(model.decode(mu, dst)))
        if draws:
            mean_out.append(torch.stack([from_model(model.decode(mu + torch.randn(mu.shape, generator=gen), dst))
                                         for _ in range(draws)]).mean(0))
    return torch.cat(mu_out), torch.cat(mean_out) if draws else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", help="prepared dataset with a training split and the scored split")
    p.add_argument("ckpts", nargs="+")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--fit", type=int, default=1200, help="training slices the maps are fit on (seed 0)")
    p.add_argument("--draws", type=int, default=8)
    args = p.parse_args(argv)
    d = load_prepared(args.data)
    t1, t2, mask, ids = test_split(d, None, args.split)
    idx = np.sort(np.random.default_rng(0).choice(len(d.train_t1), min(args.fit, len(d.train_t1)), replace=False))
    f1, f2 = np.asarray(d.train_t1[idx], np.float32), np.asarray(d.train_t2[idx], np.float32)
    fm = np.asarray(d.train_mask[idx]) > 0
    q = np.linspace(0, 1, 1001)
    # direction: (name, source domain, fit source, fit target, scored source, scored target)
    dirs = (("T1", "b", f2, f1, t2, t1), ("T2", "a", f1, f2, t1, t2))
    rows = {"intensity LUT": {c: apply_lut(fit_lut(fs, ft, fm), s) for c, _, fs, ft, s, _ in dirs}}
    for path in args.ckpts:
        model, _ = load_model(path)
        model.eval()
        name, gen = os.path.basename(os.path.dirname(os.path.abspath(path))), torch.Generator().manual_seed(0)
        for c, src, fs, ft, s, _ in dirs:
            raw, post = outputs(model, s, src, args.draws, gen)
            fit_out = outputs(model, torch.from_numpy(fs), src, 0, gen)[0].numpy()
            inside = lambda y: torch.where(s > 0, y, torch.zeros_like(y))
            hist = np.interp(raw.numpy(), np.quantile(fit_out[fm], q), np.quantile(ft[fm], q))
            calibrated = apply_lut(fit_lut(fit_out, ft, fm), inside(raw))
            both = apply_lut2(lut2(fs, fit_out, ft, fm), s.numpy(), raw.numpy())
            for row, y in ((f"{name} raw", raw), (f"{name} calibrated", calibrated),
                           (f"{name} 2-D LUT (input, output)", both),
                           (f"{name} histogram-matched", inside(torch.from_numpy(hist.astype(np.float32)))),
                           (f"{name} posterior mean of {args.draws}", post)):
                rows.setdefault(row, {})[c] = y
    print(f"{args.split} split of {args.data}, {len(set(ids))} subjects; T1 / T2 in each cell")
    print("| prediction | brain SSIM | core SSIM | PSNR brain dB | MAE brain |\n|---|---|---|---|---|")
    for row, by in rows.items():
        s = {c: means(subject_scores(per_slice(y, t1 if c == "T1" else t2, mask), ids)) for c, y in by.items()}
        print(f"| {row} | " + " | ".join(f"{s['T1'][k]:.{2 if k == 'psnr_mask' else 3}f} / "
                                         f"{s['T2'][k]:.{2 if k == 'psnr_mask' else 3}f}" for k in METRICS) + " |")


if __name__ == "__main__":
    main()
