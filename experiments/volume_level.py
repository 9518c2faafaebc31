"""How much of a translator's error is the level of a whole volume: each patient's mean intensity inside the brain.

    python experiments/volume_level.py runs/realmri/default-seed0/ckpt.pt [CKPT ...] [--split test]

The prepared scans are normalised per volume (the brain's 0.5 and 99.5 percentiles to 0 and 1, data/prepare.py),
so a patient's brain level in one contrast depends on its own brightest tissue (tumour, oedema, CSF), and how a
T2w volume's level relates to the same patient's T1w level can only be learnt from pairs, which UNIT never sees.
This prints, per patient, the brain level of the target and of each prediction and how correlated the patient's
real T1w and T2w voxels are inside the brain (about -0.5 where T2w is close to an inverted T1w), then the brain
scores as translated and after "level matching": each predicted volume shifted so that its brain mean (over the input's
nonzero voxels) is the mean brain level of the training split's target volumes, then clipped to [0, 1]
(unit.evaluation.match_level, as evaluate.py --match-level scores). That uses no pair and no target of the scored
patient, only the target contrast's training volumes (as a user could), and it is applied to the reference rows
(inverted input, intensity LUT) too. Two more scorings are measurements, not translators:
- "spread x0.8": level matched, then every brain voxel 0.8 times as far from that level. A GAN draws with the
  target's own spread; the least-squares guess from a prediction correlated rho with the target has rho times
  that spread (regression to the mean), which PSNR and MAE reward and SSIM's contrast factor does not.
- "target's own level": each volume shifted to its target's level (uses the target: what a translator of slices
  without pairs cannot know).
T1 = T2w->T1w, T2 = T1w->T2w; on the validation patients by default (where choices are made). docs/realmri.md.
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unit.evaluation import (diagnostic_args, match_level, means, per_slice, split_predictions,  # noqa: E402
                             subject_scores, training_levels, volume_levels)

SPREAD = 0.8
SCORES = (("ssim_mask", "brain SSIM", "{:.3f}"), ("ssim_core", "core SSIM", "{:.3f}"),
          ("psnr_mask", "PSNR brain dB", "{:.2f}"), ("mae_mask", "MAE brain", "{:.3f}"))


def main(argv=None):
    args, models, data, (t1, t2, mask, ids) = diagnostic_args(__doc__.split("\n")[0], argv)
    if mask is None:
        sys.exit(f"{data.path}: no brain masks, so no brain scores")
    level = training_levels(data)
    real = {"T1": torch.as_tensor(np.asarray(t1, np.float32)), "T2": torch.as_tensor(np.asarray(t2, np.float32))}
    support = {"T1": real["T2"] > 0, "T2": real["T1"] > 0}               # the input's nonzero voxels
    mask = torch.as_tensor(np.asarray(mask) > 0)
    rows = split_predictions(data, args.split, t1, t2, zip(args.ckpts, models))
    ids = np.asarray(ids)
    subjects = list(dict.fromkeys(ids))
    own = {c: volume_levels(real[c], support[c], ids) for c in ("T1", "T2")}     # each target volume's level
    print(f"{args.split}: {len(subjects)} subjects; training split's mean brain level: T1w {level['T1']:.3f}, "
          f"T2w {level['T2']:.3f}\n")
    print("brain level per patient (" + ", ".join(subjects) + "), T1 then T2:\n")
    print("| prediction | T1 | T2 |\n|---|---|---|")
    for name, pred in [("real target", real)] + list(rows.items()):
        lv = own if name == "real target" else {c: volume_levels(pred[c], support[c], ids) for c in ("T1", "T2")}
        print(f"| {name} | " + " | ".join(" ".join(f"{lv[c][s]:.3f}" for s in subjects) for c in ("T1", "T2")) + " |")
    # how far T2w is the inverse of T1w in each patient: the premise of the inverted input, and of a shared mapping
    both = support["T1"] & support["T2"]
    corr = [np.corrcoef(real["T1"][k].numpy(), real["T2"][k].numpy())[0, 1]
            for k in (both & torch.as_tensor(ids == s)[:, None, None] for s in subjects)]
    print("\ncorrelation of the real T1w and T2w voxels inside the brain, per patient: " +
          " ".join(f"{r:+.2f}" for r in corr))

    def scorings(p, c):
        """One direction's prediction p (N, H, W) as each row scores it: {how: prediction}."""
        matched = match_level(p, support[c], ids, level[c])
        oracle = p.clone()
        for s in subjects:
            one = ids == s
            oracle[one] = match_level(p[one], support[c][one], ids[one], own[c][s])
        spread = torch.where(support[c], (level[c] + SPREAD * (matched - level[c])).clamp(0, 1), matched)
        return {"as translated": p, "level matched": matched, f"level matched, spread x{SPREAD}": spread,
                "target's own level": oracle}

    print("\n| prediction | " + " | ".join(h for _, h, _ in SCORES) + " |\n|---|" + "---|" * len(SCORES))
    for name, pred in rows.items():
        by = {c: scorings(torch.as_tensor(np.asarray(pred[c], np.float32)), c) for c in ("T1", "T2")}
        for how in by["T1"]:
            r = {c: means(subject_scores(per_slice(by[c][how], real[c], mask), ids)) for c in ("T1", "T2")}
            print(f"| {name}, {how} | " + " | ".join(f"{fmt.format(r['T1'][k])} / {fmt.format(r['T2'][k])}"
                                                       for k, _, fmt in SCORES) + " |", flush=True)


if __name__ == "__main__":
    main()
