"""Scoring a model on the test split of a prepared dataset: what evaluate.py prints and what
train.py logs after every --eval-every epochs. Images live in [0, 1] on disk and in the metrics,
in [-1, 1] inside the model; to_model / from_model are the only places that convert."""
import numpy as np
import torch

from unit import UserError
from unit.metrics import checkerboard, erode, gmsd, mae, masked_mean, ms_ssim, psnr, ssim_map, ssim_volume, valid_pixels


def to_model(x01, channels, device, non_blocking=False):
    """float16/32 array (B, H, W) in [0, 1] -> model input (B, channels, H, W) in [-1, 1]; a stack of
    neighbouring slices (B, 2k+1, H, W) (--context k) goes in as it is.
    non_blocking (CUDA): copy from pinned memory without waiting for the GPU."""
    x = torch.from_numpy(np.asarray(x01, dtype=np.float32))
    if non_blocking and torch.device(device).type == "cuda":
        x = x.pin_memory()
    x = x.to(device, non_blocking=non_blocking)
    return x * 2 - 1 if x.dim() == 4 else (x * 2 - 1).unsqueeze(1).expand(-1, channels, -1, -1)


def from_model(y, context=0):
    """model output (B, channels, H, W) in [-1, 1] -> (B, H, W) in [0, 1]: the channel mean for RGB, the middle
    slice of a stack of 2 context + 1 (--context)."""
    y = y.float()[:, context] if context else y.float().mean(dim=1)
    return ((y + 1) / 2).clamp(0, 1)


def stack_rows(first, last, k):
    """(last - first, 2k + 1) row indices: for each slice first..last-1 of one volume (consecutive axial
    positions, bottom to top) its neighbours z-k..z+k; past the volume's ends the end slice repeats."""
    return np.clip(np.arange(first, last)[:, None] + np.arange(-k, k + 1)[None], first, last - 1)


def take(images, idx, rows=None):
    """images[idx] of a stack (N, H, W) (idx: an index array or a slice), as (B, H, W); with rows (stack_rows,
    context_rows: each slice's neighbours, --context) the stacks of those slices, (B, 2k+1, H, W)."""
    return images[idx] if rows is None else np.asarray(images)[rows[idx]]


@torch.no_grad()
def translate(model, images, src, device, channels, batch_size=16, rows=None):
    """Translate a stack (N, H, W) in [0, 1] from domain src ('a' = T1w, 'b' = T2w); (N, H, W) on CPU.
    rows (--context k models): (N, 2k+1) indices into images of each slice's neighbours (stack_rows,
    context_rows), the middle column the slice itself; the translation of the middle slice is kept."""
    out, n = [], len(images) if rows is None else len(rows)
    k = 0 if rows is None else rows.shape[1] // 2
    for i in range(0, n, batch_size):
        x = to_model(take(images, slice(i, i + batch_size), rows), channels, device)
        out.append(from_model(model.translate(x, src), k).cpu())
    return torch.cat(out)


# a masked metric of a subject pools the brain pixels of all its slices: its per-slice values are weighted by
# these per-slice counts (SSIM by the brain pixels whose whole window lies inside the slice)
WEIGHT = {"ssim_mask": "n_valid", "ssim_core": "n_core", "psnr_mask": "n_mask", "mae_mask": "n_mask"}


def per_slice(pred, real, mask, chunk=16):
    """Every metric per slice, {name: (n,) float64 array}: SSIM / PSNR / MAE over the whole slice and
    inside the mask (if any; NaN where a slice's mask is empty, with the mask's pixel counts n_mask and
    n_valid, which subject_scores() weighs them by), SSIM on the mask eroded by 5 px (ssim_core, weighed by
    n_core: the brain without its outline, metrics.erode), MS-SSIM and GMSD (whole slice, lower GMSD is better),
    and the checkerboard score of pred itself (lower is better). In chunks of slices: the float64
    temporaries of a whole test split (hundreds of MB) cost more in page faults than in arithmetic."""
    out = []
    for i in range(0, len(pred), chunk):
        x, y = pred[i:i + chunk], real[i:i + chunk]
        smap = ssim_map(x, y)                                # computed once for the whole and the brain SSIM
        r = {"ssim": smap.mean(dim=(1, 2)), "psnr": psnr(x, y), "mae": mae(x, y), "ms_ssim": ms_ssim(x, y),
             "gmsd": gmsd(x, y), "checker": checkerboard(x)}
        if mask is not None:
            m = mask[i:i + chunk]
            core = erode(m)                                  # SSIM windows that never reach the background
            r.update(ssim_mask=masked_mean(smap, m), ssim_core=masked_mean(smap, core), psnr_mask=psnr(x, y, m),
                     mae_mask=mae(x, y, m), n_mask=m.sum(dim=(1, 2)), n_valid=valid_pixels(m).sum(dim=(1, 2)),
                     n_core=valid_pixels(core).sum(dim=(1, 2)))
        out.append({k: v.double().cpu().numpy() for k, v in r.items()})
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def subject_scores(slices, subjects):
    """Per-subject scores from per-slice ones: {name: (S,) float64} in the order of np.unique(subjects). A
    subject's score pools its slices: masked metrics weighted by their brain pixels (WEIGHT), so a slice with
    a few pixels of brain counts for a few pixels; PSNR from the mean squared error of the pooled pixels
    (a volume's PSNR, not a mean of dB); the rest a plain mean over its slices. NaN where a subject has no
    brain pixels."""
    ids, inv = np.unique(np.asarray(subjects), return_inverse=True)
    out = {}
    for k, v in slices.items():
        if k.startswith("n_"):
            continue
        w = slices[WEIGHT[k]] if k in WEIGHT else np.ones_like(v)
        w = np.where(np.isnan(v), 0.0, w)
        x = 10.0 ** (-v / 10) if k.startswith("psnr") else v           # PSNR -> MSE
        sw = np.bincount(inv, weights=w, minlength=len(ids))
        with np.errstate(invalid="ignore", divide="ignore"):
            pooled = np.bincount(inv, weights=np.where(w > 0, x * w, 0.0), minlength=len(ids)) / sw
            out[k] = -10 * np.log10(pooled) if k.startswith("psnr") else pooled
    return out


def volume_runs(data, ids, min_len=11):
    """{subject: (first, last + 1)} for the subjects of a split (ids: the subject of every slice) whose slices are
    one run of consecutive axial positions of their source volume (meta.json "volumes"; --slices all writes
    every slice with brain, bottom to top), at least min_len of them (11: the subjects 3-D SSIM can be computed
    for). The phantom, PNG folders and --slices central have none."""
    vols, out = data.meta.get("volumes") or {}, {}
    ids = np.asarray(ids)
    for sid in dict.fromkeys(ids.tolist()):
        z = (vols.get(sid) or {}).get("slices")
        idx = np.flatnonzero(ids == sid)
        if z and len(z) == len(idx) >= min_len and np.all(np.diff(z) == 1) and np.all(np.diff(idx) == 1):
            out[sid] = (int(idx[0]), int(idx[-1]) + 1)
    return out


def context_rows(data, split, k, n=None):
    """stack_rows() of the first n (default all) slices of a split, each subject's slices one volume: (n, 2k+1).
    Needs every subject's slices to be one run of consecutive positions (volume_runs: datasets prepared with
    --slices all from NIfTI volumes); UserError otherwise."""
    ids = list(data.meta["slice_subject"][split])
    if not data.paired:
        raise UserError(f"--context needs paired data (one list of volumes for both contrasts), and {data.path} is "
                        f"unpaired; train with --context 0")
    runs = volume_runs(data, ids, min_len=1)
    missing = [s for s in dict.fromkeys(ids) if s not in runs]
    if missing:
        raise UserError(f"--context needs each subject's slices as one run of consecutive positions (a dataset "
                        f"prepared from NIfTI volumes with --slices all), and {data.path}'s {split} subjects "
                        f"{', '.join(missing[:3])} are not; train with --context 0")
    rows = np.concatenate([stack_rows(a, b, k) for a, b in sorted(runs.values())])
    return rows[:len(ids) if n is None else n]


def volume_scores(pred, real, mask, ids, runs):
    """{"ssim3d_mask": (S,) float64}: per subject (np.unique order, like subject_scores) the 3-D SSIM of its stacked
    slices inside its brain (unit.metrics.ssim_volume, an 11x11x11 window: slice-to-slice streaks of a 2-D
    translator count), NaN for subjects not in runs (volume_runs). {} when no subject has a volume."""
    if not runs or mask is None:
        return {}
    out = []
    for sid in np.unique(np.asarray(ids)):
        a, b = runs.get(sid, (0, 0))
        out.append(ssim_volume(pred[a:b], real[a:b], mask[a:b]) if b else np.nan)
    return {"ssim3d_mask": np.array(out)}


def means(scores):
    """Mean over subjects of every metric of a subject_scores() dict (NaN subjects left out)."""
    return {k: float(np.nanmean(v)) for k, v in scores.items()}


def t_quantile(p, df):
    """The p-quantile of Student's t distribution with df degrees of freedom (p >= 0.5): its CDF integrated
    numerically (Simpson's rule, 4000 panels: ~1e-10 for the quantiles of intervals) and inverted by bisection.
    numpy alone; tests check it against scipy.stats.t.ppf."""
    from math import gamma, pi, sqrt
    c = gamma((df + 1) / 2) / (sqrt(df * pi) * gamma(df / 2))
    def cdf(x):
        t = np.linspace(0.0, x, 4001)
        f = c * (1 + t * t / df) ** (-(df + 1) / 2)
        return 0.5 + (x / 12000) * (f[0] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum() + f[-1])
    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def t_interval(values, level=0.95):
    """(mean, low, high): the mean over subjects of per-subject values (one per test subject, e.g. a paired
    difference of subject_scores()) and its t-interval, mean +- t_{df=n-1} * sd / sqrt(n). Subjects are the
    independent units (their slices are not); NaN subjects are left out; one subject gives a point. (The
    percentile bootstrap used before gave intervals ~0.7x as wide over 6 subjects: too narrow.)"""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    m = float(v.mean())
    if len(v) < 2:
        return m, m, m
    half = t_quantile(0.5 + level / 2, len(v) - 1) * float(v.std(ddof=1)) / np.sqrt(len(v))
    return m, m - half, m + half


def has_brain_mask(data):
    """Whether the data's test masks outline the brain (meta.json says so; the phantom's do, IXI's head
    masks do not): then brain-masked scores lead the reports."""
    m = data.meta.get("mask")
    return data.test_mask is not None and isinstance(m, dict) and bool(m.get("brain_mask", m.get("source") == "phantom"))


def test_split(data, limit=None, split="test"):
    """The first `limit` (default all) slices of a prepared dataset's test split (or split="val", its
    validation split) as float32 tensors: (t1, t2, mask or None, subject id of every slice)."""
    a1, a2, am = (getattr(data, f"{split}_{q}") for q in ("t1", "t2", "mask"))
    n = len(a1) if limit is None else min(limit, len(a1))
    t1 = torch.from_numpy(np.asarray(a1[:n], dtype=np.float32))
    t2 = torch.from_numpy(np.asarray(a2[:n], dtype=np.float32))
    mask = None if am is None else torch.from_numpy(np.asarray(am[:n]) > 0)
    return t1, t2, mask, list(data.meta["slice_subject"][split][:n])


# the reference rows a translator has to beat: no network, and neither target nor training (inverted) or only
# the training split (lut); identity is there for scale (T1w and T2w have inverted contrast: a strawman). With
# level=True (evaluate.py --match-level) the inverted input and the LUT also come level matched (match_level)
REFERENCES = ("identity", "inverted", "lut", "inverted_level", "lut_level")
LUT_BINS = 64


def inverted(x):
    """1 - x inside the input's support (x > 0; skull-stripped data is 0 outside the brain), 0 outside: the
    cheapest T1w <-> T2w 'translation', which keeps every edge of its input."""
    return torch.where(x > 0, 1 - x, torch.zeros_like(x))


def fit_lut(src, dst, mask, bins=LUT_BINS, chunk=256):
    """E[dst | src in bin] over the brain voxels (mask, else src > 0) of paired stacks (N, H, W) in [0, 1]: a
    (bins,) float64 table (a bin no training voxel falls in predicts the mean of all of them). What a user with
    paired training scans could fit in a minute, and a strong reference: it keeps its input's every edge."""
    total, count = np.zeros(bins), np.zeros(bins)
    for i in range(0, len(src), chunk):
        x, y = np.asarray(src[i:i + chunk], np.float32), np.asarray(dst[i:i + chunk], np.float32)
        m = np.asarray(mask[i:i + chunk]) > 0 if mask is not None else x > 0
        b = np.clip((x[m] * bins).astype(np.int64), 0, bins - 1)
        total += np.bincount(b, weights=y[m], minlength=bins)
        count += np.bincount(b, minlength=bins)
    return np.where(count > 0, total / np.maximum(count, 1), total.sum() / max(count.sum(), 1))


def apply_lut(lut, x):
    """The table of fit_lut() applied to x (N, H, W) in [0, 1] inside its support (x > 0), 0 outside."""
    b = (x * len(lut)).long().clamp(0, len(lut) - 1)
    return torch.where(x > 0, torch.from_numpy(lut).to(x.dtype)[b], torch.zeros_like(x))


def volume_levels(images, support, ids):
    """{subject: mean of images (N, H, W) over its slices' support (N, H, W) bool}: each volume's brain level, in
    the order its subject first appears in ids (one per slice)."""
    ids, out = np.asarray(ids), {}
    for s in dict.fromkeys(ids):                       # one subject at a time: a training split may not fit as float64
        on = np.flatnonzero(ids == s)
        v = np.asarray(images[on], np.float64)[np.asarray(support[on], bool)]
        out[s] = float(v.mean()) if v.size else float("nan")          # no support voxel: no level
    return out


def match_level(pred, support, ids, level):
    """pred (N, H, W) in [0, 1] with each subject's voxels inside support shifted by one constant so that their mean
    is `level`, then clipped to [0, 1]; voxels outside support unchanged: a float32 tensor. Each prepared volume is
    normalised on its own (its brain's percentiles to 0 and 1), so a patient's level in one contrast depends on its
    own brightest tissue, and how it relates to the same patient's level in the other contrast is a matter of pairs,
    which UNIT never sees: without them the least-squares guess is the target contrast's mean level
    (training_levels). Needs whole volumes (slices of a subject together), not single slices."""
    out = torch.as_tensor(np.asarray(pred, np.float32)).clone()
    support, ids = torch.as_tensor(np.asarray(support, bool)), np.asarray(ids)
    for s, now in volume_levels(out, support, ids).items():
        if np.isnan(now):
            continue
        on = torch.as_tensor(ids == s)[:, None, None] & support
        out[on] = (out[on] + (level - now)).clamp(0, 1)
    return out


def training_levels(data):
    """{"T1": level, "T2": level}: the mean over the training split's subjects of their brain levels
    (volume_levels inside the training masks, else the nonzero voxels), per contrast: what match_level() moves a
    translated volume to. Statistics of each target contrast alone: no pair is used."""
    ids = data.meta["slice_subject"]["train"]
    if not len(ids):
        raise UserError(f"{data.path} has no training slices: level matching needs their mean brain level")
    out = {}
    for c, images in (("T1", data.train_t1), ("T2", data.train_t2)):
        m = data.train_mask if data.train_mask is not None else images
        out[c] = float(np.nanmean(list(volume_levels(images, m, ids).values())))
    return out


def reference_predictions(data, t1, t2):
    """The reference rows' predictions for the slices t1, t2 (N, H, W) of a split, {row: {"T1": ..., "T2": ...}} in
    [0, 1], T1 = T2w->T1w: "inverted" (inverted() of each direction's input) and, on paired data with a training
    split, "lut" (apply_lut() of a fit_lut() on the training split's brain voxels, per direction)."""
    rows = {"inverted": {"T1": inverted(t2), "T2": inverted(t1)}}
    if data.paired and len(data.train_t1):
        m = data.train_mask
        lut = {"T1": fit_lut(data.train_t2, data.train_t1, m), "T2": fit_lut(data.train_t1, data.train_t2, m)}
        rows["lut"] = {"T1": apply_lut(lut["T1"], t2), "T2": apply_lut(lut["T2"], t1)}
    return rows


def reference_scores(data, limit=None, split="test", level=False):
    """What evaluate() reports beside a model, which depends on the data alone (evaluate.py computes it once
    for several checkpoints), each as {"T1": means, "T2": means} like a model's:
    - "identity": each direction's input scored as its output (every metric but the checkerboard is symmetric,
      so one computation serves both; the checkerboard is that of each direction's input, T2w for T2w->T1w);
    - "inverted": inverted() of each direction's input (uses neither training nor target);
    - "lut": apply_lut() of a fit_lut() on the training split's brain voxels, per direction (paired data with
      a training split only);
    - "target": the real targets' checkerboard;
    - "oracle", on data with noiseless test targets (the phantom): those targets scored against the noisy ones,
      the best a translator can expect on this data (a model can beat it only by reproducing noise);
    - with level=True, "inverted_level" and "lut_level": those two with each volume's brain level moved to the
      training targets' (match_level, training_levels, kept as "levels"), as evaluate(level=True) does to a model;
    - "reference_per_subject": {row: {"T1"/"T2": {metric: [value or None per subject]}}} of the rows above but the
      target and the oracle, in subject_scores() order, for paired differences (reference_subjects() reads it back)."""
    t1, t2, mask, ids = test_split(data, limit, split)
    runs = volume_runs(data, ids)
    score = lambda pred, real: {**subject_scores(per_slice(pred, real, mask), ids),
                                **volume_scores(pred, real, mask, ids, runs)}
    target = {"T1": per_slice_checker(t1), "T2": per_slice_checker(t2)}
    ident = {**subject_scores(per_slice(t2, t1, mask), ids), **volume_scores(t2, t1, mask, ids, runs)}
    ident_checker = {c: subject_scores({"checker": target["T2" if c == "T1" else "T1"]}, ids) for c in ("T1", "T2")}
    subj = {"identity": {c: {**ident, **ident_checker[c]} for c in ("T1", "T2")}}
    preds, real, src = reference_predictions(data, t1, t2), {"T1": t1, "T2": t2}, {"T1": t2, "T2": t1}
    for row, pred in preds.items():
        subj[row] = {c: score(pred[c], real[c]) for c in ("T1", "T2")}
    levels = training_levels(data) if level else None
    for row, pred in (preds.items() if level else ()):
        subj[row + "_level"] = {c: score(match_level(pred[c], src[c] > 0, ids, levels[c]), real[c]) for c in ("T1", "T2")}
    refs = {row: {c: means(v) for c, v in by.items()} for row, by in subj.items()}
    if level:
        refs["levels"] = levels
    refs["target"] = {c: means(subject_scores({"checker": v}, ids))["checker"] for c, v in target.items()}
    if data.test_t1_clean is not None and split == "test":
        clean = {q: torch.from_numpy(np.asarray(a[:len(ids)], dtype=np.float32))
                 for q, a in (("T1", data.test_t1_clean), ("T2", data.test_t2_clean))}
        refs["oracle"] = {c: means(subject_scores(per_slice(clean[c], real, mask), ids))
                          for c, real in (("T1", t1), ("T2", t2))}
    refs["reference_per_subject"] = {row: {c: {k: [None if np.isnan(x) else float(x) for x in v] for k, v in by[c].items()}
                                 for c in by} for row, by in subj.items()}
    return refs


def diagnostic_args(description, argv=None):
    """The command line that diagnostics in experiments/ share, `CKPT [CKPT ...] [--data DIR] [--split val|test]`,
    parsed and loaded: (args, [(model, checkpoint) per CKPT], the prepared data (--data, or the first checkpoint's),
    test_split() of the split: (t1, t2, mask, ids)). On the validation patients by default: choices are made there."""
    import argparse
    from unit.checkpoint import load_model
    from unit.data import load_prepared
    p = argparse.ArgumentParser(description=description)
    p.add_argument("ckpts", nargs="+")
    p.add_argument("--data", help="prepared dataset (default: the first checkpoint's)")
    p.add_argument("--split", default="val", choices=("val", "test"))
    args = p.parse_args(argv)
    models = [load_model(c) for c in args.ckpts]
    data = load_prepared(args.data or models[0][1]["config"]["data"])
    return args, models, data, test_split(data, None, args.split)


def split_predictions(data, split, t1, t2, models):
    """What the diagnostics in experiments/ score on a split's slices t1, t2 (test_split()): {row: {"T1": (N, H, W),
    "T2": ...}} in [0, 1], T1 = T2w->T1w. First the inverted input and the intensity LUT (reference_predictions(),
    as reference_scores() scores them), then, for each (name, (model, checkpoint)) of `models` (load_model()'s),
    its translations on the CPU (with --context, each slice's stack built over its whole volume)."""
    refs = reference_predictions(data, t1, t2)
    rows = {label: refs[row] for row, label in (("inverted", "inverted input"), ("lut", "intensity LUT")) if row in refs}
    for name, (model, ckpt) in models:
        ch, k = ckpt["config"]["channels"], ckpt["config"]["context"]
        near = context_rows(data, split, k, len(t1)) if k else None
        rows[name] = {"T1": translate(model, t2, "b", "cpu", ch, rows=near),
                      "T2": translate(model, t1, "a", "cpu", ch, rows=near)}
    return rows


def reference_subjects(refs, row, c):
    """A reference row's per-subject scores of direction c as float64 arrays (NaN where None), like
    subject_scores() gives for a model."""
    return {k: np.array([np.nan if x is None else x for x in v]) for k, v in refs["reference_per_subject"][row][c].items()}


# the brain metrics a translator must win on (issue 24), and whether higher is better
BRAIN_METRICS = {"ssim_mask": True, "ssim_core": True, "psnr_mask": True, "mae_mask": False}


def strongest_reference(refs, c, k):
    """The reference row (REFERENCES) with the best mean of metric k in direction c: the one to beat."""
    rows = [r for r in REFERENCES if r in refs and k in refs[r][c]]
    higher = BRAIN_METRICS.get(k, not k.startswith(("mae", "gmsd", "checker")))
    return max(rows, key=lambda r: refs[r][c][k] if higher else -refs[r][c][k])


def eval_split(cfg, data, say):
    """The split train.py's per-epoch evaluation scores, and whether it can: the validation split when there is one
    (choices are made there, and the test split is left for the report), else the test split; it needs paired
    slices there. Says so when it cannot, or when it is the validation split."""
    split = "val" if data.has("val") else "test"
    scored = data.paired and data.has(split)
    if cfg["eval_every"] and not data.paired:
        say(f"note: {cfg['data']} is not paired (meta.json: paired=false), so the per-epoch evaluation is skipped "
            f"(translated slices have no pixel-aligned ground truth, as evaluate.py says); sample grids are still "
            f"written and show unpaired test slices")
    elif cfg["eval_every"] and not scored:
        say(f"note: {cfg['data']} has no test slices (its split lists no test subject), so the per-epoch evaluation "
            f"is skipped; sample grids show training slices, and evaluate.py --data DIR scores the checkpoints on a "
            f"dataset with a test split")
    elif cfg["eval_every"] and split == "val":
        say(f"note: {cfg['data']} has a validation split: the per-epoch evaluation and the sample grids use its "
            f"{len(data.val_t1)} slices, not the test split's")
    return split, scored


def evaluate(model, data, device, channels, batch_size=16, limit=None, refs=None, split="test", context=0, level=False):
    """Scores for 'T1' (b->a vs real a) and 'T2' (a->b vs real b) on the test split (or split="val"), in
    float32 (no autocast: the number a paper reports), as means over its subjects (subject_scores: a subject
    pools its slices), with the
    reference_scores() of the data (pass refs to reuse them). Returns (results dict, stacks): stacks holds
    t1, t2 (real) and fake_t1, fake_t2, (n, H, W) on CPU, "slices": per_slice() of T1 and T2, and
    "subjects": their subject_scores() (for paired differences). context: the model's --context. level: each
    translated volume's brain level moved to the training targets' (match_level; refs, if given, must have been
    made with level=True too)."""
    t1, t2, mask, ids = test_split(data, limit, split)
    was_training = model.training
    model.eval()
    rows = context_rows(data, split, context, len(ids)) if context else None
    whole = lambda x, q: x if rows is None else getattr(data, f"{split}_{q}")   # rows index the whole split
    fake_t2 = translate(model, whole(t1, "t1"), "a", device, channels, batch_size, rows)
    fake_t1 = translate(model, whole(t2, "t2"), "b", device, channels, batch_size, rows)
    model.train(was_training)
    refs = refs or reference_scores(data, limit, split, level)
    if level:
        if "levels" not in refs:
            raise ValueError("evaluate(level=True) was given refs made without level=True (reference_scores)")
        fake_t1 = match_level(fake_t1, t2 > 0, ids, refs["levels"]["T1"])
        fake_t2 = match_level(fake_t2, t1 > 0, ids, refs["levels"]["T2"])
    slices = {"T1": per_slice(fake_t1, t1, mask), "T2": per_slice(fake_t2, t2, mask)}
    runs = volume_runs(data, ids)
    subjects = {c: {**subject_scores(slices[c], ids), **volume_scores(fake, real, mask, ids, runs)}
                for c, fake, real in (("T1", fake_t1, t1), ("T2", fake_t2, t2))}
    res = {"n": len(ids), "subjects": len(set(ids)), "T1": means(subjects["T1"]), "T2": means(subjects["T2"]), **refs}
    return res, {"t1": t1, "t2": t2, "fake_t1": fake_t1, "fake_t2": fake_t2, "slices": slices, "subjects": subjects}


def per_slice_checker(x, chunk=256):
    """checkerboard() of a stack (n, H, W), in chunks, as a float64 array."""
    return np.concatenate([checkerboard(x[i:i + chunk]).double().numpy() for i in range(0, len(x), chunk)])


def figure_slices(data, n, subjects=None, k=3, seed=0, split="test"):
    """Slice indices of a split (among its first n) for figures, one per subject: the slice with the most
    brain (mask area; the middle slice of the subject without masks). subjects: subject ids of that split;
    default k of them drawn with `seed`, so every figure of a data set shows the same ones."""
    ss = list(data.meta["slice_subject"][split][:n])
    masks = getattr(data, f"{split}_mask")
    ids = list(dict.fromkeys(ss))
    if subjects:
        unknown = [s for s in subjects if s not in ids]
        if unknown:
            raise UserError(f"--subjects: {unknown} are not {split} subjects of {data.path} (e.g. {', '.join(ids[:3])})")
        chosen = list(subjects)
    else:
        chosen = [ids[i] for i in sorted(np.random.default_rng(seed).choice(len(ids), min(k, len(ids)), replace=False))]
    out = []
    for sid in chosen:
        idx = [i for i, s in enumerate(ss) if s == sid]
        if masks is not None:
            out.append(idx[int(np.argmax(np.asarray(masks[idx]).reshape(len(idx), -1).sum(1)))])
        else:
            out.append(idx[len(idx) // 2])
    return out
