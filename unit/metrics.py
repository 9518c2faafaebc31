"""SSIM, MS-SSIM, GMSD, PSNR, MAE and a checkerboard score on batched images in [0, 1], in torch
(CPU or GPU).

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


def local_stats(x, y):
    """The Gaussian-window (SSIM's) local means, variances and covariance of x, y (B, 1, H, W) over the valid
    region: (mx, my, vx, vy, cxy), each (B, 1, H-10, W-10), in x's dtype."""
    g = _gaussian_window(x.device, x.dtype)
    mx, my = _blur(x, g), _blur(y, g)
    return mx, my, _blur(x * x, g) - mx * mx, _blur(y * y, g) - my * my, _blur(x * y, g) - mx * my


def ssim_map(x, y):
    """Per-pixel SSIM over the valid region. x, y: (B, H, W) in [0, 1] -> (B, H-10, W-10)."""
    x, y = x.unsqueeze(1).double(), y.unsqueeze(1).double()   # float64: no cancellation issues
    mx, my, vx, vy, cxy = local_stats(x, y)
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


def valid_pixels(mask):
    """The part of masks (B, H, W) that lies in SSIM's valid region: (B, H-10, W-10), like ssim_map()."""
    p = (WIN - 1) // 2
    return mask[:, p:-p, p:-p]


CORE_ERODE = (WIN - 1) // 2     # 5 px: how far SSIM's window reaches from its centre


def erode(mask, r=CORE_ERODE):
    """A mask (B, H, W) eroded by a (2r+1) x (2r+1) square: the pixels whose every pixel within r (in x and y)
    lies in the mask. With r = 5, SSIM's 11x11 window at such a pixel never reaches the background, so SSIM on it
    (core brain SSIM) leaves out the brain's outline, which any brain-shaped output gets right."""
    m = mask.to(torch.float32).unsqueeze(1)
    return (-F.max_pool2d(-m, 2 * r + 1, 1, r)).squeeze(1) > 0.5      # pixels past the slice's edge do not count


def masked_mean(smap, mask):
    """Mean of an ssim_map() (B, h, w) over the valid pixels inside mask (B, H, W): (B,) float32, NaN
    where the mask leaves no valid pixel."""
    m = valid_pixels(mask).to(smap.dtype)
    return ((smap * m).sum(dim=(1, 2)) / m.sum(dim=(1, 2))).float()


def ssim(x, y, mask=None):
    """Mean SSIM per image: (B,). With mask (B, H, W), the mean is over valid pixels inside it
    (images whose mask leaves no valid pixel get NaN)."""
    s = ssim_map(x, y)
    return s.mean(dim=(1, 2)).float() if mask is None else masked_mean(s, mask)


def _ssim_terms(x, y):
    """(luminance * contrast-structure, contrast-structure) maps over the valid region, (B, h, w) each,
    float64. x, y: (B, 1, H, W)."""
    g = _gaussian_window(x.device, x.dtype)
    mx, my = _blur(x, g), _blur(y, g)
    vx, vy, cxy = _blur(x * x, g) - mx * mx, _blur(y * y, g) - my * my, _blur(x * y, g) - mx * my
    c1, c2 = K1 ** 2, K2 ** 2
    cs = (2 * cxy + c2) / (vx + vy + c2)
    return ((2 * mx * my + c1) / (mx * mx + my * my + c1) * cs).squeeze(1), cs.squeeze(1)


MS_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)   # Wang, Simoncelli, Bovik 2003, finest first


def ms_ssim_scales(h, w):
    """How many of MS-SSIM's 5 scales an h x w image has: the coarsest must still hold the 11-tap
    window (5 scales need both sides >= 11 * 16 = 176)."""
    n = 1
    while n < len(MS_WEIGHTS) and min(h, w) // 2 ** n >= WIN:
        n += 1
    return n


def ms_ssim(x, y):
    """Multi-scale SSIM per image (B,) of x, y (B, H, W) in [0, 1] (Wang, Simoncelli, Bovik 2003):
    mean contrast-structure at each scale and full SSIM at the coarsest, each raised to the
    published weight, halving the image between scales (2x2 average). An image too small for five
    scales (e.g. 96x80: 3) uses the first ms_ssim_scales() weights, renormalised to sum to 1.
    Negative terms are clipped to 0 before the power (as TensorFlow and pytorch_msssim do)."""
    x, y = x.unsqueeze(1).double(), y.unsqueeze(1).double()
    n = ms_ssim_scales(x.shape[-2], x.shape[-1])
    if min(x.shape[-2:]) < WIN:
        raise ValueError(f"MS-SSIM needs images of at least {WIN}x{WIN}, got {tuple(x.shape[-2:])}")
    w = torch.tensor(MS_WEIGHTS[:n], dtype=torch.float64, device=x.device)
    w = w / w.sum()
    out = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    for j in range(n):
        full, cs = _ssim_terms(x, y)
        term = (full if j == n - 1 else cs).mean(dim=(1, 2)).clamp_min(0)
        out = out * term ** w[j]
        if j < n - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return out.float()


GMSD_C = 170 / 255 ** 2   # Xue et al. 2014: T = 170 for images in [0, 255]; these are in [0, 1]


def gmsd(x, y):
    """Gradient magnitude similarity deviation per image (B,) of x (distorted), y (reference),
    (B, H, W) in [0, 1] (Xue, Zhang, Mou, Bovik 2014, as their reference code): 2x2 average and
    subsampling by 2 (zero beyond an odd edge), Prewitt gradients (3x3, /3, zero padding), the
    similarity map (2 m_x m_y + c) / (m_x^2 + m_y^2 + c), and its standard deviation (N - 1).
    0 for identical images; larger is worse."""
    x, y = x.unsqueeze(1).double(), y.unsqueeze(1).double()
    pad = (0, x.shape[-1] % 2, 0, x.shape[-2] % 2)              # MATLAB's conv2 'same' + 1:2:end
    x, y = F.avg_pool2d(F.pad(x, pad), 2), F.avg_pool2d(F.pad(y, pad), 2)
    px = torch.tensor([[1.0, 0, -1]] * 3, dtype=x.dtype, device=x.device).view(1, 1, 3, 3) / 3
    grad = lambda v: torch.sqrt(F.conv2d(v, px, padding=1) ** 2 + F.conv2d(v, px.transpose(2, 3), padding=1) ** 2)
    mx, my = grad(x), grad(y)
    gms = (2 * mx * my + GMSD_C) / (mx * mx + my * my + GMSD_C)
    return gms.flatten(1).std(dim=1).float()


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


def energy_spectrum(x):
    """Where the energy of images x (B, H, W) lies in frequency: (B, H', W') float64, each image's
    |FFT2(x - mean)|^2 divided by its sum (so it sums to 1; all zeros for a constant image), over the
    integer bins ky in [0, H'), kx in [0, W') (unshifted: DC at [0, 0], Nyquist at row H'/2 and column
    W'/2). Odd sides have no Nyquist bin: their last row/column is dropped first (H' = H // 2 * 2)."""
    x = x.double()
    x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
    e = torch.fft.fft2(x - x.mean(dim=(-2, -1), keepdim=True)).abs() ** 2
    total = e.sum(dim=(-2, -1), keepdim=True)
    return torch.where(total > 0, e / total.clamp_min(1e-300), torch.zeros_like(e))


def checkerboard(x):
    """The checkerboard score of images x (B, H, W): the share of their spectral energy at the Nyquist
    frequency along either axis, (B,) in [0, 1]. Exactly: the mean of each image is removed, E(ky, kx)
    = |FFT2|^2 over the integer frequency bins ky in [0, H), kx in [0, W), and the score is the sum of E
    over the bins with ky = H/2 or kx = W/2 (the Nyquist row and column, counted once where they
    cross) divided by the sum of E over all bins (energy_spectrum gives E / sum). A period-2 pattern
    along either axis lives entirely there (score 1); smooth anatomy has almost none (real MRI
    ~0.001). Odd sides have no Nyquist bin: their last row/column is dropped first. A constant image
    scores 0."""
    e = energy_spectrum(x)
    H, W = e.shape[-2:]
    return (e[..., H // 2, :].sum(-1) + e[..., :, W // 2].sum(-1) - e[..., H // 2, W // 2]).float()
