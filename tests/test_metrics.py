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
