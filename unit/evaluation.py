"""Scoring a model on the test split of a prepared dataset: what evaluate.py prints and what
train.py logs after every --eval-every epochs. Images live in [0, 1] on disk and in the metrics,
in [-1, 1] inside the model; to_model / from_model are the only places that convert."""
import numpy as np
import torch

from unit.metrics import gmsd, mae, ms_ssim, psnr, ssim


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


def scores(pred, real, mask):
    """Mean SSIM / PSNR / MAE over a stack, whole slice and inside the mask (if any), and the two
    fine-detail metrics (whole slice): MS-SSIM and GMSD (lower is better)."""
    r = {"ssim": ssim(pred, real).mean().item(), "psnr": psnr(pred, real).mean().item(),
         "mae": mae(pred, real).mean().item(), "ms_ssim": ms_ssim(pred, real).mean().item(),
         "gmsd": gmsd(pred, real).mean().item()}
    if mask is not None:
        r.update(ssim_mask=ssim(pred, real, mask).nanmean().item(),
                 psnr_mask=psnr(pred, real, mask).nanmean().item(),
                 mae_mask=mae(pred, real, mask).nanmean().item())
    return r


def evaluate(model, data, device, channels, batch_size=16, limit=None):
    """Scores for 'T1' (b->a vs real a), 'T2' (a->b vs real b) and the identity baseline, in float32
    (no autocast: the number a paper reports). Returns (results dict, stacks): stacks holds t1, t2
    (real) and fake_t1, fake_t2, (n, H, W) on CPU."""
    n = len(data.test_t1) if limit is None else min(limit, len(data.test_t1))
    t1 = torch.from_numpy(np.asarray(data.test_t1[:n], dtype=np.float32))
    t2 = torch.from_numpy(np.asarray(data.test_t2[:n], dtype=np.float32))
    mask = None if data.test_mask is None else torch.from_numpy(np.asarray(data.test_mask[:n]) > 0)
    was_training = model.training
    model.eval()
    fake_t2 = translate(model, t1, "a", device, channels, batch_size)
    fake_t1 = translate(model, t2, "b", device, channels, batch_size)
    model.train(was_training)
    res = {"n": n, "T1": scores(fake_t1, t1, mask), "T2": scores(fake_t2, t2, mask),
           "identity": scores(t2, t1, mask)}  # symmetric metrics: one row serves both columns
    return res, {"t1": t1, "t2": t2, "fake_t1": fake_t1, "fake_t2": fake_t2}
