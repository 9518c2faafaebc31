"""Scoring a model on the test split of a prepared dataset: what evaluate.py prints and what
train.py logs after every --eval-every epochs. Images live in [0, 1] on disk and in the metrics,
in [-1, 1] inside the model; to_model / from_model are the only places that convert."""
import numpy as np
import torch

from unit import UserError
from unit.metrics import checkerboard, gmsd, mae, ms_ssim, psnr, ssim


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


def per_slice(pred, real, mask):
    """Every metric per slice, {name: (n,) float64 array}: SSIM / PSNR / MAE over the whole slice and
    inside the mask (if any; NaN where a slice's mask is empty), MS-SSIM and GMSD (whole slice,
    lower GMSD is better), and the checkerboard score of pred itself (lower is better)."""
    r = {"ssim": ssim(pred, real), "psnr": psnr(pred, real), "mae": mae(pred, real),
         "ms_ssim": ms_ssim(pred, real), "gmsd": gmsd(pred, real), "checker": checkerboard(pred)}
    if mask is not None:
        r.update(ssim_mask=ssim(pred, real, mask), psnr_mask=psnr(pred, real, mask), mae_mask=mae(pred, real, mask))
    return {k: v.double().cpu().numpy() for k, v in r.items()}


def means(slices):
    """Mean of every metric of a per_slice() dict (masked ones over the slices that have a mask)."""
    return {k: float(np.nanmean(v) if k.endswith("_mask") else np.mean(v)) for k, v in slices.items()}


def paired_bootstrap(diff, subjects, n_boot=2000, seed=0, level=0.95):
    """(mean, low, high): the mean over slices of a paired per-slice difference and its percentile
    bootstrap interval, resampling *subjects* with replacement (their slices are not independent),
    each resample's statistic the mean over all slices of the drawn subjects. NaN slices are left
    out. diff: (n,) array; subjects: n subject ids."""
    diff, subjects = np.asarray(diff, dtype=np.float64), np.asarray(subjects)
    keep = ~np.isnan(diff)
    ids, inv = np.unique(subjects[keep], return_inverse=True)
    sums = np.bincount(inv, weights=diff[keep], minlength=len(ids))   # per subject: sum and count of slices
    counts = np.bincount(inv, minlength=len(ids)).astype(np.float64)
    draw = np.random.default_rng(seed).integers(0, len(ids), size=(n_boot, len(ids)))
    stats = sums[draw].sum(axis=1) / counts[draw].sum(axis=1)
    tail = (1 - level) / 2 * 100
    return float(diff[keep].mean()), float(np.percentile(stats, tail)), float(np.percentile(stats, 100 - tail))


def has_brain_mask(data):
    """Whether the data's test masks outline the brain (meta.json says so; the phantom's do, IXI's head
    masks do not): then brain-masked scores lead the reports."""
    m = data.meta.get("mask")
    return data.test_mask is not None and isinstance(m, dict) and bool(m.get("brain_mask", m.get("source") == "phantom"))


def evaluate(model, data, device, channels, batch_size=16, limit=None):
    """Scores for 'T1' (b->a vs real a), 'T2' (a->b vs real b) and the identity baseline, in float32
    (no autocast: the number a paper reports), and, on data with noiseless test targets (the phantom),
    "oracle": those targets scored against the noisy ones, the best a translator can expect on this
    data (a model can beat it only by reproducing noise). Returns (results dict, stacks): stacks holds t1, t2
    (real) and fake_t1, fake_t2, (n, H, W) on CPU, and "slices": per_slice() of T1 and T2."""
    n = len(data.test_t1) if limit is None else min(limit, len(data.test_t1))
    t1 = torch.from_numpy(np.asarray(data.test_t1[:n], dtype=np.float32))
    t2 = torch.from_numpy(np.asarray(data.test_t2[:n], dtype=np.float32))
    mask = None if data.test_mask is None else torch.from_numpy(np.asarray(data.test_mask[:n]) > 0)
    was_training = model.training
    model.eval()
    fake_t2 = translate(model, t1, "a", device, channels, batch_size)
    fake_t1 = translate(model, t2, "b", device, channels, batch_size)
    model.train(was_training)
    slices = {"T1": per_slice(fake_t1, t1, mask), "T2": per_slice(fake_t2, t2, mask)}
    res = {"n": n, "T1": means(slices["T1"]), "T2": means(slices["T2"]),
           "identity": means(per_slice(t2, t1, mask)),  # symmetric metrics: one row serves both columns
           "target": {"T1": float(checkerboard(t1).mean()), "T2": float(checkerboard(t2).mean())}}
    if data.test_t1_clean is not None:   # the phantom: its noiseless targets scored as the translation
        clean = {q: torch.from_numpy(np.asarray(a[:n], dtype=np.float32))
                 for q, a in (("T1", data.test_t1_clean), ("T2", data.test_t2_clean))}
        res["oracle"] = {"T1": means(per_slice(clean["T1"], t1, mask)), "T2": means(per_slice(clean["T2"], t2, mask))}
    return res, {"t1": t1, "t2": t2, "fake_t1": fake_t1, "fake_t2": fake_t2, "slices": slices}


def figure_slices(data, n, subjects=None, k=3, seed=0):
    """Test-slice indices (among the first n) for figures, one per subject: the slice with the most
    brain (mask area; the middle slice of the subject without masks). subjects: test subject ids;
    default k of them drawn with `seed`, so every figure of a data set shows the same ones."""
    ss = list(data.meta["slice_subject"]["test"][:n])
    ids = list(dict.fromkeys(ss))
    if subjects:
        unknown = [s for s in subjects if s not in ids]
        if unknown:
            raise UserError(f"--subjects: {unknown} are not test subjects of {data.path} (e.g. {', '.join(ids[:3])})")
        chosen = list(subjects)
    else:
        chosen = [ids[i] for i in sorted(np.random.default_rng(seed).choice(len(ids), min(k, len(ids)), replace=False))]
    out = []
    for sid in chosen:
        idx = [i for i, s in enumerate(ss) if s == sid]
        if data.test_mask is not None:
            out.append(idx[int(np.argmax(np.asarray(data.test_mask[idx]).reshape(len(idx), -1).sum(1)))])
        else:
            out.append(idx[len(idx) // 2])
    return out
