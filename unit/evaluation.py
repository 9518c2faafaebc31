"""Scoring a model on the test split of a prepared dataset: what evaluate.py prints and what
train.py logs after every --eval-every epochs. Images live in [0, 1] on disk and in the metrics,
in [-1, 1] inside the model; to_model / from_model are the only places that convert."""
import numpy as np
import torch

from unit import UserError
from unit.metrics import checkerboard, gmsd, mae, masked_mean, ms_ssim, psnr, ssim_map, valid_pixels


def to_model(x01, channels, device, non_blocking=False):
    """float16/32 array (B, H, W) in [0, 1] -> model input (B, channels, H, W) in [-1, 1].
    non_blocking (CUDA): copy from pinned memory without waiting for the GPU."""
    x = torch.from_numpy(np.asarray(x01, dtype=np.float32))
    if non_blocking and torch.device(device).type == "cuda":
        x = x.pin_memory()
    x = x.to(device, non_blocking=non_blocking)
    return (x * 2 - 1).unsqueeze(1).expand(-1, channels, -1, -1)


def from_model(y):
    """model output (B, channels, H, W) in [-1, 1] -> (B, H, W) in [0, 1] (channel mean for RGB)."""
    return ((y.float().mean(dim=1) + 1) / 2).clamp(0, 1)


@torch.no_grad()
def translate(model, images, src, device, channels, batch_size=16):
    """Translate a stack (N, H, W) in [0, 1] from domain src ('a' = T1w, 'b' = T2w); (N, H, W) on CPU."""
    out = []
    for i in range(0, len(images), batch_size):
        out.append(from_model(model.translate(to_model(images[i:i + batch_size], channels, device), src)).cpu())
    return torch.cat(out)


# a masked metric of a subject pools the brain pixels of all its slices: its per-slice values are weighted by
# these per-slice counts (SSIM by the brain pixels whose whole window lies inside the slice)
WEIGHT = {"ssim_mask": "n_valid", "psnr_mask": "n_mask", "mae_mask": "n_mask"}


def per_slice(pred, real, mask, chunk=16):
    """Every metric per slice, {name: (n,) float64 array}: SSIM / PSNR / MAE over the whole slice and
    inside the mask (if any; NaN where a slice's mask is empty, with the mask's pixel counts n_mask and
    n_valid, which subject_scores() weighs them by), MS-SSIM and GMSD (whole slice, lower GMSD is better),
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
            r.update(ssim_mask=masked_mean(smap, m), psnr_mask=psnr(x, y, m), mae_mask=mae(x, y, m),
                     n_mask=m.sum(dim=(1, 2)), n_valid=valid_pixels(m).sum(dim=(1, 2)))
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


def means(scores):
    """Mean over subjects of every metric of a subject_scores() dict (NaN subjects left out)."""
    return {k: float(np.nanmean(v)) for k, v in scores.items()}


def paired_bootstrap(diff, n_boot=2000, seed=0, level=0.95):
    """(mean, low, high): the mean over subjects of a paired per-subject difference (one value per test
    subject, e.g. of subject_scores()) and its percentile bootstrap interval, resampling subjects with
    replacement. NaN subjects are left out."""
    diff = np.asarray(diff, dtype=np.float64)
    diff = diff[~np.isnan(diff)]
    draw = np.random.default_rng(seed).integers(0, len(diff), size=(n_boot, len(diff)))
    stats = diff[draw].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(diff.mean()), float(np.percentile(stats, tail)), float(np.percentile(stats, 100 - tail))


def has_brain_mask(data):
    """Whether the data's test masks outline the brain (meta.json says so; the phantom's do, IXI's head
    masks do not): then brain-masked scores lead the reports."""
    m = data.meta.get("mask")
    return data.test_mask is not None and isinstance(m, dict) and bool(m.get("brain_mask", m.get("source") == "phantom"))


def test_split(data, limit=None):
    """The first `limit` (default all) test slices of a prepared dataset as float32 tensors: (t1, t2, mask or
    None, subject id of every slice)."""
    n = len(data.test_t1) if limit is None else min(limit, len(data.test_t1))
    t1 = torch.from_numpy(np.asarray(data.test_t1[:n], dtype=np.float32))
    t2 = torch.from_numpy(np.asarray(data.test_t2[:n], dtype=np.float32))
    mask = None if data.test_mask is None else torch.from_numpy(np.asarray(data.test_mask[:n]) > 0)
    return t1, t2, mask, list(data.meta["slice_subject"]["test"][:n])


def reference_scores(data, limit=None):
    """What evaluate() reports beside a model, which depends on the data alone (evaluate.py computes it once
    for several checkpoints): "identity", each direction's input scored as its output (every metric but the
    checkerboard is symmetric, so one computation serves both; the checkerboard is that of each direction's
    input, T2w for T2w->T1w); "target", the real targets' checkerboard; and, on data with noiseless test
    targets (the phantom), "oracle": those targets scored against the noisy ones, the best a translator can
    expect on this data (a model can beat it only by reproducing noise)."""
    t1, t2, mask, ids = test_split(data, limit)
    ident = per_slice(t2, t1, mask)
    target = {"T1": per_slice_checker(t1), "T2": per_slice_checker(t2)}
    refs = {"identity": {c: means(subject_scores({**ident, "checker": target["T2" if c == "T1" else "T1"]}, ids))
                         for c in ("T1", "T2")},
            "target": {c: means(subject_scores({"checker": v}, ids))["checker"] for c, v in target.items()}}
    if data.test_t1_clean is not None:
        clean = {q: torch.from_numpy(np.asarray(a[:len(ids)], dtype=np.float32))
                 for q, a in (("T1", data.test_t1_clean), ("T2", data.test_t2_clean))}
        refs["oracle"] = {c: means(subject_scores(per_slice(clean[c], real, mask), ids))
                          for c, real in (("T1", t1), ("T2", t2))}
    return refs


def evaluate(model, data, device, channels, batch_size=16, limit=None, refs=None):
    """Scores for 'T1' (b->a vs real a) and 'T2' (a->b vs real b), in float32 (no autocast: the number a
    paper reports), as means over test subjects (subject_scores: a subject pools its slices), with the
    reference_scores() of the data (pass refs to reuse them). Returns (results dict, stacks): stacks holds
    t1, t2 (real) and fake_t1, fake_t2, (n, H, W) on CPU, "slices": per_slice() of T1 and T2, and
    "subjects": their subject_scores() (for paired differences)."""
    t1, t2, mask, ids = test_split(data, limit)
    was_training = model.training
    model.eval()
    fake_t2 = translate(model, t1, "a", device, channels, batch_size)
    fake_t1 = translate(model, t2, "b", device, channels, batch_size)
    model.train(was_training)
    slices = {"T1": per_slice(fake_t1, t1, mask), "T2": per_slice(fake_t2, t2, mask)}
    subjects = {c: subject_scores(slices[c], ids) for c in ("T1", "T2")}
    res = {"n": len(ids), "subjects": len(set(ids)), "T1": means(subjects["T1"]), "T2": means(subjects["T2"]),
           **(refs or reference_scores(data, limit))}
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
