"""SSIM, PSNR and MAE on batched images in [0, 1], in torch (CPU or GPU).

SSIM is Wang et al. 2004 with the usual settings: 11-tap Gaussian window (sigma 1.5), K1 = 0.01,
K2 = 0.03, data range 1, population (not sample) covariance, averaged over the 'valid' region
(pixels whose whole window lies inside the image). This is what
skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1) computes; tests/test_metrics.py checks the match.
"""
import torch
import torch.nn.functional as F

WIN, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03


def _gaussian_window(device, dtype):
    x = torch.arange(WIN, device=device, dtype=torch.float64) - (WIN - 1) / 2
    g = torch.exp(-x * x / (2 * SIGMA * SIGMA))
    return (g / g.sum()).to(dtype)


def _blur(x, g):
    """Separable 'valid' Gaussian filter. x: (B, 1, H, W) -> (B, 1, H-10, W-10)."""
    x = F.conv2d(x, g.view(1, 1, WIN, 1))
    return F.conv2d(x, g.view(1, 1, 1, WIN))


def ssim_map(x, y):
    """Per-pixel SSIM over the valid region. x, y: (B, H, W) in [0, 1] -> (B, H-10, W-10)."""
    x, y = x.unsqueeze(1).double(), y.unsqueeze(1).double()   # float64: no cancellation issues
    g = _gaussian_window(x.device, x.dtype)
    mx, my = _blur(x, g), _blur(y, g)
    vx = _blur(x * x, g) - mx * mx
    vy = _blur(y * y, g) - my * my
    cxy = _blur(x * y, g) - mx * my
    c1, c2 = K1 ** 2, K2 ** 2                                   # data range 1
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.squeeze(1)


def ssim_volume(x, y, mask=None):
    """3-D SSIM of two volumes (D, H, W) in [0, 1]: the same constants with an 11x11x11 Gaussian
    window, mean over the valid region (inside `mask` if given). Needs D, H, W >= 11."""
    if min(x.shape) < WIN:
        raise ValueError(f"3-D SSIM needs at least {WIN} voxels along every axis, got {tuple(x.shape)}")
    x, y = x[None, None].double(), y[None, None].double()       # (1, 1, D, H, W)
    g = _gaussian_window(x.device, x.dtype)

    def blur(v):                                               # separable 'valid' filter, 3 axes
        for shape in ((1, 1, WIN, 1, 1), (1, 1, 1, WIN, 1), (1, 1, 1, 1, WIN)):
            v = F.conv3d(v, g.view(shape))
        return v

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = K1 ** 2, K2 ** 2
    s = (((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))[0, 0]
    if mask is None:
        return s.mean().item()
    p = (WIN - 1) // 2
    m = mask[p:-p, p:-p, p:-p].to(s.dtype)
    return ((s * m).sum() / m.sum()).item()


def ssim(x, y, mask=None):
    """Mean SSIM per image: (B,). With mask (B, H, W), the mean is over valid pixels inside it
    (images whose mask leaves no valid pixel get NaN)."""
    s = ssim_map(x, y)
    if mask is None:
        return s.mean(dim=(1, 2)).float()
    p = (WIN - 1) // 2
    m = mask[:, p:-p, p:-p].to(s.dtype)
    return ((s * m).sum(dim=(1, 2)) / m.sum(dim=(1, 2))).float()


def _mean_per_item(e, mask):
    """Mean over all but the first dim (per image (B, H, W) or per volume (B, D, H, W))."""
    dims = tuple(range(1, e.dim()))
    if mask is None:
        return e.mean(dim=dims)
    m = mask.to(e.dtype)
    return (e * m).sum(dim=dims) / m.sum(dim=dims)


def mae(x, y, mask=None):
    """Mean absolute error per image or volume (B,), optionally inside a mask."""
    return _mean_per_item((x.double() - y.double()).abs(), mask).float()


def psnr(x, y, mask=None):
    """Peak signal-to-noise ratio in dB per image or volume (B,), data range 1, optionally in a mask."""
    mse = _mean_per_item((x.double() - y.double()).pow(2), mask)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-20))).float()
