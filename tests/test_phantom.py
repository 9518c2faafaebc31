"""Tests of the synthetic T1w/T2w phantom (unit/phantom.py). CPU only, a few seconds."""

import math

import numpy as np
import pytest

from unit import phantom as P

BRAIN = [P.LABEL[t] for t in ("csf", "gm", "wm", "deep_gm")]


@pytest.fixture(scope="module")
def subjects():
    # 4 subjects x 2 slices at the default size, shared by the tests below
    return [P.phantom_subject(s, slices=2) for s in range(4)]


# ---------------------------------------------------------------------------- physics

def test_signal_matches_spin_echo_formula():
    # independent float64 evaluation of PD (1 - exp(-TR/T1)) exp(-TE/T2) with the math module
    for tissue, (t1, t2, pd) in P.TISSUE_PARAMS.items():
        for seq, (tr, te) in P.SEQUENCES.items():
            ref = pd * (1.0 - math.exp(-tr / t1)) * math.exp(-te / t2)
            assert P.signal(tissue, seq) == pytest.approx(ref, rel=1e-12, abs=1e-15)
    assert P.signal("background", "t1") == 0.0
    assert P.signal("skull", "t1") < 1e-3 and P.signal("skull", "t2") < 1e-3   # T2 ~0.5 ms


def test_signal_contrast_ordering():
    s = {(t, q): P.signal(t, q) for t in P.TISSUES for q in P.SEQUENCES}
    assert s["wm", "t1"] > s["gm", "t1"] > s["csf", "t1"]
    assert s["csf", "t2"] > s["gm", "t2"] > s["wm", "t2"]
    # T1w: fat brightest of all; short TR gives WM/GM contrast of at least 15 %
    assert s["fat", "t1"] == max(s[t, "t1"] for t in P.TISSUES)
    assert s["wm", "t1"] / s["gm", "t1"] > 1.15
    # relaxation times are plausible 3 T values: T1 of CSF > GM > WM, T2 of CSF >> GM > WM
    T = P.TISSUE_PARAMS
    assert T["csf"][0] > T["gm"][0] > T["wm"][0] and T["csf"][1] > 10 * T["gm"][1] > 10 * T["wm"][1]


def test_signal_rejects_unknown_names():
    with pytest.raises(ValueError, match="unit/phantom.py"):
        P.signal("bone", "t1")
    with pytest.raises(ValueError, match="unit/phantom.py"):
        P.signal("wm", "flair")


def test_image_contrast_ordering_measured(subjects):
    # median intensity over the pixels of each dominant label, per slice
    for d in subjects:
        for i in range(d["labels"].shape[0]):
            lab = d["labels"][i]
            m = {q: {t: np.median(d[q][i][lab == P.LABEL[t]]) for t in ("csf", "gm", "wm")}
                 for q in ("t1", "t2")}
            assert m["t1"]["wm"] > m["t1"]["gm"] + 0.05 > m["t1"]["csf"] + 0.1, m["t1"]
            assert m["t2"]["csf"] > m["t2"]["gm"] + 0.1 > m["t2"]["wm"] + 0.15, m["t2"]


# ---------------------------------------------------------------------------- format

def test_shapes_dtypes_range_nondefault_size():
    d = P.phantom_subject(3, size=(64, 48), slices=3)
    assert set(d) == {"t1", "t2", "mask", "labels", "t1_clean", "t2_clean"}
    for q in ("t1", "t2", "t1_clean", "t2_clean"):
        assert d[q].shape == (3, 64, 48) and d[q].dtype == np.float32
        assert d[q].min() >= 0.0 and d[q].max() <= 1.0
        assert np.isfinite(d[q]).all()
    for q in ("t1", "t2"):
        assert d[q].max() == 1.0                 # normalised: the brightest pixels clip at 1
    assert d["mask"].dtype == np.bool_ and d["labels"].dtype == np.uint8
    assert d["labels"].max() < len(P.TISSUES)
    np.testing.assert_array_equal(d["mask"], np.isin(d["labels"], BRAIN))
    assert d["mask"].any(axis=(1, 2)).all()      # every slice has brain in it
    # slices are different levels, not copies
    assert not np.array_equal(d["labels"][0], d["labels"][1])


def test_fractions_partition_unity():
    # the per-pixel tissue fractions are a partition of 1 (partial volume is conserved)
    rng = np.random.default_rng(0)
    S = P._draw_subject(rng)
    for z in (0.05, 0.4, 0.9):
        F = P._fractions(S, rng, z, (96, 80))
        assert F.shape == (len(P.TISSUES), 96, 80)
        assert F.min() >= -1e-6 and F.max() <= 1 + 1e-6
        np.testing.assert_allclose(F.sum(0), 1.0, atol=1e-5)
        # partial volume exists: a good share of head pixels are mixtures
        mixed = (F.max(0) < 0.9) & (F[P.LABEL["background"]] < 0.5)
        assert mixed.mean() > 0.02


def test_head_fills_frame_and_is_centred(subjects):
    for d in subjects:
        for lab in d["labels"]:
            cols = np.flatnonzero((lab > 0).any(0))
            rows = np.flatnonzero((lab > 0).any(1))
            H, W = lab.shape
            assert 0.55 < (cols[-1] - cols[0] + 1) / W < 0.92
            assert 0.55 < (rows[-1] - rows[0] + 1) / H < 0.92
            assert abs((cols[0] + cols[-1]) / 2 - W / 2) < 0.06 * W
            assert abs((rows[0] + rows[-1]) / 2 - H / 2) < 0.06 * H


def test_bad_arguments_raise_clear_errors():
    for kw in ({"seed": -1}, {"seed": 1.5}, {"seed": 0, "size": (8, 8)}, {"seed": 0, "size": "big"},
               {"seed": 0, "slices": 0}):
        with pytest.raises(ValueError, match="unit/phantom.py"):
            P.phantom_subject(**kw)


# ---------------------------------------------------------------------------- determinism

def test_same_seed_identical_different_seed_different():
    a = P.phantom_subject(11, size=(96, 80), slices=2)
    b = P.phantom_subject(11, size=(96, 80), slices=2)
    c = P.phantom_subject(12, size=(96, 80), slices=2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # a different subject: anatomy differs in a sizeable share of the head
    head = (a["labels"] > 0) | (c["labels"] > 0)
    assert (a["labels"] != c["labels"])[head].mean() > 0.2


def test_dataset_subject_independent_of_count():
    small = dict(P.phantom_dataset(3, size=(48, 40), slices=1, seed=5))
    large = dict(P.phantom_dataset(6, size=(48, 40), slices=1, seed=5))
    assert sorted(small) == [0, 1, 2] and sorted(large) == list(range(6))
    for i in range(3):
        for k in small[i]:
            np.testing.assert_array_equal(small[i][k], large[i][k])
    direct = P.phantom_subject(P.subject_seed(5, 2), size=(48, 40))
    np.testing.assert_array_equal(direct["t2"], large[2]["t2"])
    # different master seeds and indices give different subject seeds
    seeds = {P.subject_seed(s, i) for s in range(3) for i in range(50)}
    assert len(seeds) == 150 and min(seeds) >= 0


def test_anatomy_changes_with_level():
    # levels are stratified over [0, 1]: with 4 slices one is at z < 0.25 (thalami, putamen,
    # caudate present) and one at z >= 0.75 (above the deep nuclei)
    for seed in range(3):
        d = P.phantom_subject(seed, size=(152, 128), slices=4)
        deep = (d["labels"] == P.LABEL["deep_gm"]).sum(axis=(1, 2))
        assert deep.min() == 0 and deep.max() > 50, deep


# ---------------------------------------------------------------------------- noise, bias

def test_background_noise_is_rayleigh(subjects):
    # Far from the head the signal is 0, so the magnitude of complex Gaussian noise is Rayleigh:
    # E[x]^2 / E[x^2] = (sigma^2 pi/2) / (2 sigma^2) = pi/4 ~ 0.785 (a clipped Gaussian gives
    # 1/pi ~ 0.32, a positive offset plus Gaussian gives ~1). Corners: 24 x 24 px each.
    for d in subjects:
        for q in ("t1", "t2"):
            x = np.concatenate([d[q][:, a, b].ravel() for a in (slice(0, 24), slice(-24, None))
                                for b in (slice(0, 24), slice(-24, None))]).astype(np.float64)
            lab = np.concatenate([d["labels"][:, a, b].ravel() for a in (slice(0, 24), slice(-24, None))
                                  for b in (slice(0, 24), slice(-24, None))])
            assert (lab == 0).all()
            assert x.min() >= 0.0 and x.mean() > 0.0
            assert x.mean() ** 2 / (x ** 2).mean() == pytest.approx(math.pi / 4, abs=0.03)
            assert x.mean() < 0.1                # noise floor well below tissue signal


def test_bias_field_smooth_and_nontrivial():
    rng = np.random.default_rng(3)
    for _ in range(5):
        S = P._draw_subject(rng)
        b = P._bias(S["bias"][0], 304, 256).astype(np.float64)
        assert 0.6 < b.min() and b.max() < 1.6
        assert b.max() / b.min() > 1.02          # it does something
        # smooth: second differences between neighbouring pixels are ~1e-5 of the field
        lap = np.abs(b[2:, 1:-1] + b[:-2, 1:-1] + b[1:-1, 2:] + b[1:-1, :-2] - 4 * b[1:-1, 1:-1])
        assert lap.max() < 1e-3


def test_clean_targets_are_the_images_without_their_rician_noise():
    """The noiseless targets (evaluate.py's oracle) on the noisy images' scale: where the clean image is 0
    (air) the noisy one is Rayleigh distributed (mean / std = sqrt(pi/2) / sqrt(2 - pi/2) = 1.913), and
    where it is bright (signal >> noise) noisy - clean is Gaussian with mean ~0 and the same sigma."""
    d = P.phantom_subject(11, size=(160, 128), slices=2)
    for q in ("t1", "t2"):
        noisy, clean = d[q].astype(np.float64), d[f"{q}_clean"].astype(np.float64)
        air = noisy[clean == 0]
        assert air.size > 5000
        assert air.mean() / air.std() == pytest.approx(np.sqrt(np.pi / 2) / np.sqrt(2 - np.pi / 2), rel=0.05)
        sigma = air.mean() / np.sqrt(np.pi / 2)            # the Rayleigh scale = the Gaussian sigma per channel
        bright = (clean > 20 * sigma) & (noisy < 1) & (clean < 1)   # away from the clipping at 1
        r = (noisy - clean)[bright]
        assert r.size > 2000
        assert r.std() == pytest.approx(sigma, rel=0.1) and abs(r.mean()) < 0.1 * sigma
