"""SSIM against scikit-image; PSNR and MAE against numpy."""
import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from unit.metrics import mae, psnr, ssim


def pairs(seed, shape=(3, 48, 41)):
    r = np.random.default_rng(seed)
    a = r.random(shape)
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    a[0] = 0.5 + 0.4 * np.sin(xx / 5.0) * np.cos(yy / 7.0)        # smooth structure
    b = np.clip(a + 0.15 * r.standard_normal(shape), 0, 1)
    b[1] = 1 - a[1]                                                 # anticorrelated
    b[2] = a[2] * 0.5 + 0.25                                        # contrast change
    return a, b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ssim_matches_skimage(seed):
    a, b = pairs(seed)
    mine = ssim(torch.from_numpy(a).float(), torch.from_numpy(b).float()).numpy()
    ref = [structural_similarity(a[i].astype(np.float32), b[i].astype(np.float32), gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False, data_range=1) for i in range(len(a))]
    np.testing.assert_allclose(mine, ref, atol=1e-4)


def test_ssim_masked_is_mean_of_skimage_map_inside_mask():
    a, b = pairs(3, (3, 40, 40))
    mask = np.zeros(a.shape, bool)
    mask[:, 10:30, 8:25] = True
    mine = ssim(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(mask)).numpy()
    for i in range(3):
        _, smap = structural_similarity(a[i], b[i], gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, data_range=1, full=True)
        assert mine[i] == pytest.approx(smap[mask[i]].mean(), abs=1e-4)  # mask lies inside the valid region


def test_ssim_identity_is_one():
    a, _ = pairs(4)
    assert np.allclose(ssim(torch.from_numpy(a), torch.from_numpy(a)).numpy(), 1.0)


def test_psnr_and_mae_match_numpy():
    a, b = pairs(5)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    np.testing.assert_allclose(mae(ta, tb).numpy(), np.abs(a - b).mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(psnr(ta, tb).numpy(), 10 * np.log10(1 / ((a - b) ** 2).mean(axis=(1, 2))), rtol=1e-6)
    mask = np.zeros(a.shape, bool)
    mask[:, 5:20, 5:30] = True
    want = [np.abs(a[i] - b[i])[mask[i]].mean() for i in range(len(a))]
    np.testing.assert_allclose(mae(ta, tb, torch.from_numpy(mask)).numpy(), want, rtol=1e-6)


def test_ssim_volume_matches_skimage_3d():
    from unit.metrics import ssim_volume
    r = np.random.default_rng(7)
    a = r.random((14, 20, 17))
    b = np.clip(0.7 * a + 0.2 + 0.1 * r.standard_normal(a.shape), 0, 1)
    ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)
    assert ssim_volume(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref, abs=1e-4)


def test_psnr_and_mae_per_volume():
    r = np.random.default_rng(6)
    a = r.random((2, 5, 12, 13))
    b = np.clip(a + 0.1 * r.standard_normal(a.shape), 0, 1)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    np.testing.assert_allclose(mae(ta, tb).numpy(), np.abs(a - b).mean(axis=(1, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(psnr(ta, tb).numpy(), 10 * np.log10(1 / ((a - b) ** 2).mean(axis=(1, 2, 3))), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# MS-SSIM and GMSD against float64 NumPy transcriptions of the papers' definitions

from scipy.signal import convolve2d  # noqa: E402  (scikit-image's dependency)

from unit.metrics import gmsd, ms_ssim  # noqa: E402


def np_ssim_terms(a, b):
    """Wang et al. 2004 maps on the valid region: (l * cs, cs), 11-tap Gaussian, sigma 1.5."""
    t = np.arange(11) - 5.0
    g = np.exp(-t ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    f = lambda v: convolve2d(v, w, mode="valid")
    ma, mb = f(a), f(b)
    va, vb, cab = f(a * a) - ma ** 2, f(b * b) - mb ** 2, f(a * b) - ma * mb
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    cs = (2 * cab + c2) / (va + vb + c2)
    return (2 * ma * mb + c1) / (ma ** 2 + mb ** 2 + c1) * cs, cs


def np_ms_ssim(a, b):
    """Wang, Simoncelli, Bovik 2003: prod_j mean(cs_j)^w_j * mean(ssim_M)^w_M over the scales whose
    image still holds the 11x11 window, weights renormalised when fewer than 5; 2x2 mean to halve."""
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    n = sum(1 for j in range(5) if min(a.shape) // 2 ** j >= 11)
    weights = np.array(weights[:n]) / sum(weights[:n])
    out = 1.0
    for j in range(n):
        full, cs = np_ssim_terms(a, b)
        out *= max((full if j == n - 1 else cs).mean(), 0) ** weights[j]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        a = a[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        b = b[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    return out


def matlab_same(a, k):
    """MATLAB's conv2(a, k, 'same'): the full convolution from row/col floor(size(k)/2) on."""
    r, c = k.shape[0] // 2, k.shape[1] // 2
    return convolve2d(a, k, mode="full")[r:r + a.shape[0], c:c + a.shape[1]]


def np_gmsd(dist, ref):
    """Xue et al. 2014's reference code (GMSD.m) for images in [0, 1] (T = 170 / 255^2)."""
    ave = np.ones((2, 2)) / 4
    y1, y2 = matlab_same(ref, ave)[::2, ::2], matlab_same(dist, ave)[::2, ::2]
    dx = np.array([[1, 0, -1]] * 3) / 3
    gm = lambda v: np.sqrt(matlab_same(v, dx) ** 2 + matlab_same(v, dx.T) ** 2)
    g1, g2 = gm(y1), gm(y2)
    t = 170 / 255 ** 2
    return np.std((2 * g1 * g2 + t) / (g1 ** 2 + g2 ** 2 + t), ddof=1)


@pytest.mark.parametrize("shape", [(3, 48, 41), (3, 96, 80), (3, 176, 181), (3, 33, 200)])
def test_ms_ssim_matches_numpy_transcription(shape):
    a, b = pairs(sum(shape), shape)
    mine = ms_ssim(torch.from_numpy(a).float(), torch.from_numpy(b).float()).numpy()
    ref = [np_ms_ssim(a[i].astype(np.float32).astype(np.float64), b[i].astype(np.float32).astype(np.float64))
           for i in range(len(a))]
    np.testing.assert_allclose(mine, ref, atol=1e-5)


def test_ms_ssim_known_values():
    a, b = pairs(7, (3, 96, 80))
    x = torch.from_numpy(a).float()
    assert torch.allclose(ms_ssim(x, x), torch.ones(3))                     # identical images
    assert ms_ssim(x, torch.from_numpy(b).float()).max() < 1
    # a 20x20 image has one scale (20 // 2 = 10 < 11), where MS-SSIM is SSIM clipped at 0 (the second
    # pair is anticorrelated: SSIM -0.96)
    small_a, small_b = x[:, :20, :20], torch.from_numpy(b[:, :20, :20]).float()
    assert torch.allclose(ms_ssim(small_a, small_b), ssim(small_a, small_b).clamp_min(0), atol=1e-6)
    with pytest.raises(ValueError, match="at least 11x11"):
        ms_ssim(x[:, :10, :30], x[:, :10, :30])


@pytest.mark.parametrize("shape", [(3, 48, 41), (3, 96, 80), (3, 33, 64)])
def test_gmsd_matches_numpy_transcription(shape):
    a, b = pairs(sum(shape) + 1, shape)
    mine = gmsd(torch.from_numpy(b), torch.from_numpy(a)).numpy()
    ref = [np_gmsd(b[i], a[i]) for i in range(len(a))]
    np.testing.assert_allclose(mine, ref, rtol=1e-5, atol=1e-7)


def test_gmsd_known_values():
    a, b = pairs(11, (3, 40, 40))
    x = torch.from_numpy(a)
    assert torch.equal(gmsd(x, x), torch.zeros(3, dtype=torch.float32))      # identical images: 0
    assert gmsd(torch.from_numpy(b), x).min() > 0
    # a constant offset leaves every gradient unchanged away from the zero-padded border
    flat = torch.full((1, 40, 40), 0.3, dtype=torch.float64)
    assert gmsd(flat + 0.1, flat).item() > 0                                 # the border sees the offset


def test_energy_spectrum_is_the_normalised_numpy_periodogram():
    from unit.metrics import energy_spectrum
    rng = np.random.default_rng(1)
    for shape in ((20, 16), (21, 17)):
        x = rng.random((3,) + shape)
        got = energy_spectrum(torch.from_numpy(x)).numpy()
        y = x[:, : shape[0] // 2 * 2, : shape[1] // 2 * 2]
        y = y - y.mean(axis=(1, 2), keepdims=True)
        e = np.abs(np.fft.fft2(y)) ** 2
        np.testing.assert_allclose(got, e / e.sum(axis=(1, 2), keepdims=True), rtol=1e-10, atol=1e-15)
        # Parseval: the energies sum to H W times the sum of squares, so the shares sum to 1
        np.testing.assert_allclose(e.sum(axis=(1, 2)), y[0].size * (y ** 2).sum(axis=(1, 2)), rtol=1e-10)
        np.testing.assert_allclose(got.sum(axis=(1, 2)), 1, rtol=1e-12)
    assert energy_spectrum(torch.full((1, 8, 8), 0.4)).abs().max() == 0          # a constant image: no energy


def test_checkerboard_score_known_cases_and_numpy():
    from unit.metrics import checkerboard
    r, c = np.arange(64)[:, None], np.arange(48)[None]
    cases = np.stack([((r + c) % 2) * np.ones((64, 48)),                 # a checkerboard
                      (c % 2) * np.ones((64, 48)),                       # stripes: period 2 along one axis
                      np.exp(-((r - 30.0) ** 2 + (c - 20.0) ** 2) / 200),  # smooth
                      np.full((64, 48), 0.3)])                           # constant
    got = checkerboard(torch.from_numpy(cases)).numpy()
    assert got[0] == pytest.approx(1, abs=1e-6) and got[1] == pytest.approx(1, abs=1e-6)
    assert got[2] < 1e-4 and got[3] == 0
    # a period-2 artefact on a smooth image: the score is the artefact's share of the energy, which
    # Parseval gives from sums of squares (the two are orthogonal up to the blob's ~0 Nyquist energy)
    art, blob = 0.05 * (cases[0] - 0.5), cases[2] - cases[2].mean()
    share = (art ** 2).sum() / ((art ** 2).sum() + (blob ** 2).sum())
    assert checkerboard(torch.from_numpy((cases[2] + art)[None])).item() == pytest.approx(share, rel=1e-3)
    # random images, odd sizes too, against the definition written out with a DFT matrix in float64
    rng = np.random.default_rng(0)
    for shape in ((20, 16), (21, 17)):
        x = rng.random((3,) + shape)
        H, W = shape[0] // 2 * 2, shape[1] // 2 * 2
        y = x[:, :H, :W] - x[:, :H, :W].mean(axis=(1, 2), keepdims=True)
        Fh = np.exp(-2j * np.pi * np.outer(np.arange(H), np.arange(H)) / H)
        Fw = np.exp(-2j * np.pi * np.outer(np.arange(W), np.arange(W)) / W)
        e = np.abs(Fh @ y @ Fw.T) ** 2
        nyq = np.zeros((H, W), bool)
        nyq[H // 2, :] = nyq[:, W // 2] = True
        want = e[:, nyq].sum(1) / e.sum(axis=(1, 2))
        np.testing.assert_allclose(checkerboard(torch.from_numpy(x)).numpy(), want, rtol=1e-5)
