"""t-intervals over test subjects against scipy, the reference rows (inverted input, intensity LUT, core SSIM)
against an independent recomputation, evaluate.py with several checkpoints, and the phantom's oracle row."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import train_tiny
from skimage.metrics import structural_similarity

from unit.data import load_prepared, prepare_phantom
import torch

from unit.evaluation import (BRAIN_METRICS, evaluate, means, per_slice, reference_scores, reference_subjects,
                             strongest_reference, subject_scores, t_interval, t_quantile)
from unit.model import UNIT
from unit.phantom import phantom_subject, subject_seed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("df", [1, 2, 3, 5, 9, 30])
def test_t_quantile_matches_scipy(df):
    from scipy import stats
    for p in (0.975, 0.95, 0.995):
        assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-7)


def test_t_interval_known_values_and_scipy():
    # two subjects, differences 0 and 1: mean 0.5, sd 0.7071, half-width 12.706 * 0.7071 / sqrt(2) = 6.353
    m, lo, hi = t_interval([0.0, 1.0])
    assert m == 0.5 and hi - m == pytest.approx(12.7062047 * 0.5, rel=1e-6) and m - lo == pytest.approx(hi - m)
    assert t_interval([0.3]) == (0.3, 0.3, 0.3)                       # one subject: a point
    from scipy import stats
    d = np.random.default_rng(1).standard_normal(6) + 0.3               # six test patients
    ref = stats.t.interval(0.95, 5, loc=d.mean(), scale=stats.sem(d))
    assert t_interval(d)[1:] == pytest.approx(ref, rel=1e-7)
    assert t_interval(np.r_[d, np.nan]) == t_interval(d)               # NaN subjects left out


def test_reference_rows_against_an_independent_recomputation(tmp_path):
    """inverted: 1 - x where x > 0; intensity LUT: the mean target of each of 64 input bins over the training
    split's brain voxels, recomputed here in float64 with np.digitize, scored with scikit-image's SSIM; SSIM core
    is SSIM on the mask eroded by 5 px (scipy), and the strongest reference row is the best mean."""
    from scipy import ndimage
    data = str(tmp_path / "phantom")
    prepare_phantom(data, n_train=5, n_test=3, slices=1, size=(64, 64), seed=2, progress=False)
    d = load_prepared(data)
    refs = reference_scores(d)
    f = lambda a: np.asarray(a, np.float64)
    src, dst, m = f(d.train_t2), f(d.train_t1), np.asarray(d.train_mask) > 0
    b = np.clip(np.digitize(src[m], np.arange(1, 64) / 64), 0, 63)
    table = np.array([dst[m][b == i].mean() if (b == i).any() else dst[m].mean() for i in range(64)])
    for i in range(3):                                                  # one slice per test subject
        x, y, mask = f(d.test_t2[i]), f(d.test_t1[i]), np.asarray(d.test_mask[i]) > 0
        lut = np.where(x > 0, table[np.clip(np.digitize(x, np.arange(1, 64) / 64), 0, 63)], 0)
        core = ndimage.binary_erosion(mask, np.ones((11, 11)), border_value=1)
        for row, pred in (("inverted", np.where(x > 0, 1 - x, 0)), ("lut", lut)):
            smap = structural_similarity(pred.astype(np.float32).astype(np.float64), y, gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False, data_range=1, full=True)[1]
            got = reference_subjects(refs, row, "T1")
            assert got["ssim_mask"][i] == pytest.approx(smap[5:-5, 5:-5][mask[5:-5, 5:-5]].mean(), abs=1e-5), row
            assert got["ssim_core"][i] == pytest.approx(smap[5:-5, 5:-5][core[5:-5, 5:-5]].mean(), abs=1e-5), row
            assert got["mae_mask"][i] == pytest.approx(np.abs(pred - y)[mask].mean(), abs=1e-5), row
    for c in ("T1", "T2"):
        for k, higher in BRAIN_METRICS.items():
            best = strongest_reference(refs, c, k)
            vals = {r: refs[r][c][k] for r in ("identity", "inverted", "lut")}
            assert vals[best] == (max if higher else min)(vals.values())


def test_subject_scores_pool_the_pixels_of_each_subject():
    """A subject's masked score is its SSIM map (scikit-image, float64) averaged over the brain pixels of all its
    slices, MAE over its brain pixels, PSNR from the mean squared error of its pixels; whole-slice SSIM a plain
    mean over its slices; the table's mean is over subjects, not slices."""
    r = np.random.default_rng(0)
    n, H, W = 7, 24, 20
    subjects = ["b", "a", "b", "b", "a", "c", "b"]
    real = r.random((n, H, W))
    pred = np.clip(real + 0.2 * r.standard_normal((n, H, W)), 0, 1)
    mask = np.zeros((n, H, W), bool)
    for i in range(n):                                   # brains of very different sizes, one slice without
        if i != 3:
            k = 6 + 2 * i
            mask[i, 2:2 + k, 3:3 + k // 2 + 4] = True
    sl = per_slice(torch.from_numpy(pred).float(), torch.from_numpy(real).float(), torch.from_numpy(mask))
    got = subject_scores(sl, subjects)
    for j, sid in enumerate(sorted(set(subjects))):      # np.unique's order
        idx = [i for i in range(n) if subjects[i] == sid]
        p, y, m = (pred[idx].astype(np.float32).astype(np.float64), real[idx].astype(np.float32).astype(np.float64),
                   mask[idx])
        maps = [structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                      data_range=1, full=True)[1][5:-5, 5:-5] for a, b in zip(p, y)]
        inner = m[:, 5:-5, 5:-5]
        assert got["ssim_mask"][j] == pytest.approx(np.concatenate([s[i] for s, i in zip(maps, inner)]).mean(), abs=1e-5)
        assert got["ssim"][j] == pytest.approx(np.mean([s.mean() for s in maps]), abs=1e-5)
        assert got["mae_mask"][j] == pytest.approx(np.abs(p - y)[m].mean(), rel=1e-5)
        assert got["psnr_mask"][j] == pytest.approx(10 * np.log10(1 / ((p - y)[m] ** 2).mean()), rel=1e-5)
        assert got["psnr"][j] == pytest.approx(10 * np.log10(1 / ((p - y) ** 2).mean()), rel=1e-5)
    assert means(got)["ssim_mask"] == pytest.approx(got["ssim_mask"].mean())


def test_evaluate_several_checkpoints(tmp_path):
    data = str(tmp_path / "phantom")
    prepare_phantom(data, n_train=4, n_test=3, slices=1, size=(64, 64), seed=0, progress=False)
    env = {**os.environ, "UNIT_ATTN": "naive"}
    last = train_tiny(data, tmp_path / "run", 3, "--save-epochs", "1")
    first = str(tmp_path / "run" / "ckpt_e001.pt")
    r = subprocess.run([sys.executable, "evaluate.py", first, last, first, "--csv", str(tmp_path / "t.csv"),
                        "--json", str(tmp_path / "t.json")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Paired differences to the first row" in r.stdout and "[95% t-interval] over 3 subjects" in r.stdout
    assert "| oracle (noiseless target) |" in r.stdout
    lines = r.stdout.splitlines()                         # the reference rows come first, then the checkpoints
    at = lambda text: next(i for i, line in enumerate(lines) if line.startswith(text))
    assert at("| identity (input as output) |") < at("| inverted input") < at("| intensity LUT") < at(f"| {first} |")
    assert sum(line.startswith(f"| {last} | T") for line in lines) == 2   # against the strongest reference rows
    assert "Checkerboard T1 | Checkerboard T2" in r.stdout and "the real targets score T1 0.0" in r.stdout
    res = json.load(open(tmp_path / "t.json"))["checkpoints"]
    o = res[1]["res"]
    assert f"- {last}: SSIM T1 {o['T1']['ssim'] / o['oracle']['T1']['ssim']:.2f} T2" in r.stdout
    assert [c["epoch"] for c in res] == [1, 2, 1]
    assert all(v == [0.0, 0.0, 0.0] for c in ("T1", "T2") for v in res[2]["diff"][c].values())   # itself: 0
    ref, m, lo, hi = res[1]["versus"]["T2"]["mae_mask"]            # 'better' = the reference's MAE minus its own
    assert m == pytest.approx(res[1]["res"][ref]["T2"]["mae_mask"] - res[1]["res"]["T2"]["mae_mask"]) and lo <= m <= hi
    d, lo, hi = res[1]["diff"]["T1"]["ssim"]
    assert d == pytest.approx(res[1]["res"]["T1"]["ssim"] - res[0]["res"]["T1"]["ssim"]) and lo <= d <= hi
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert len(rows) == 3 and rows[0]["d_ssim_T1"] == "" and float(rows[1]["ssim_T1"]) == pytest.approx(
        res[1]["res"]["T1"]["ssim"])


def test_oracle_row_equals_an_independent_recomputation(tmp_path):
    """The oracle row (noiseless test targets scored against the noisy ones) against the phantom's subjects
    generated afresh, rounded to float16 as stored, and scored with scikit-image's SSIM (whole slice, and
    its SSIM map averaged inside the brain) and PSNR written out in float64."""
    data = str(tmp_path / "phantom")
    n_train, n_test = 2, 8
    prepare_phantom(data, n_train=n_train, n_test=n_test, slices=1, size=(64, 64), seed=3, progress=False)
    model = UNIT(width=4)
    res, _ = evaluate(model, load_prepared(data), "cpu", 1)
    ref = {c: {"ssim": [], "ssim_mask": [], "psnr": []} for c in ("T1", "T2")}
    for i in range(n_train, n_train + n_test):
        s = phantom_subject(subject_seed(3, i), (64, 64))
        m = s["mask"][0]
        for c, q in (("T1", "t1"), ("T2", "t2")):
            clean, noisy = (s[k][0].astype(np.float16).astype(np.float64) for k in (f"{q}_clean", q))
            whole, smap = structural_similarity(clean, noisy, gaussian_weights=True, sigma=1.5,
                                                use_sample_covariance=False, data_range=1, full=True)
            ref[c]["ssim"].append(whole)
            ref[c]["ssim_mask"].append(smap[m].mean())
            ref[c]["psnr"].append(10 * np.log10(1 / np.mean((clean - noisy) ** 2)))
    for c in ("T1", "T2"):
        for k, v in ref[c].items():
            assert res["oracle"][c][k] == pytest.approx(np.mean(v), abs=1e-4), (c, k)
        # a ceiling, not perfection: the noise keeps it below 1 (the 0.70 / 0.66 at 96x80 over 100
        # subjects), far above the identity; and the brain alone is cleaner than the mostly dark slice
        assert res["identity"][c]["ssim"] < res["oracle"][c]["ssim"] < 0.95 < 1
        assert res["oracle"][c]["ssim_mask"] > res["oracle"][c]["ssim"]


def test_figure_slices_pick_the_most_brain_of_distinct_subjects(tmp_path):
    from unit.data import write_prepared
    from unit.evaluation import figure_slices
    r = np.random.default_rng(0)
    n = 30
    subjects = [f"s{i // 5}" for i in range(n)]                        # 6 subjects x 5 slices
    area = r.permutation(n) + 1                                         # brain pixels per slice, all different
    mask = np.zeros((n, 8, 8), bool)
    for i, a in enumerate(area):
        mask[i].flat[:a] = True
    a = [r.random((k, 8, 8)).astype(np.float32) for k in (4, 4, n, n)]
    d = write_prepared(str(tmp_path / "d"), *a, {"source": "t", "slice_subject": {"train": ["t"] * 4, "test": subjects}},
                       np.zeros((4, 8, 8), bool), mask)
    from unit.data import load_prepared
    data = load_prepared(d)
    idx = figure_slices(data, n, k=4, seed=0)
    assert len({subjects[i] for i in idx}) == 4                         # spread over subjects
    for i in idx:
        same = [j for j in range(n) if subjects[j] == subjects[i]]
        assert area[i] == max(area[j] for j in same)                    # that subject's slice with most brain
    assert figure_slices(data, n, k=4, seed=0) == idx                   # fixed: grids of all epochs compare
    assert [subjects[i] for i in figure_slices(data, n, subjects=["s5", "s1"])] == ["s5", "s1"]


def test_brain_first_columns_and_the_background_note(tmp_path):
    import evaluate as E
    from unit.data import load_prepared
    d = str(tmp_path / "phantom")
    prepare_phantom(d, n_train=2, n_test=2, slices=1, size=(64, 64), progress=False)
    data = load_prepared(d)
    assert E.columns(data)[0] == ("ssim_mask", "SSIM brain")             # the phantom's mask is intracranial
    data.meta["mask"] = {"brain_mask": False}                              # e.g. IXI's head (foreground) mask
    assert E.columns(data) == E.COLUMNS
    data.test_mask = None
    data.meta["mask"] = {"brain_mask": True}
    assert E.columns(data) == E.COLUMNS                                   # no mask stored: nothing to lead with
    # the skull-stripped BraTS case: identity whole 0.69, brain 0.075 -> one line saying why
    note = E.background_note({"identity": {"T1": {"ssim": 0.69, "ssim_mask": 0.075}}})
    assert "SSIM 0.69" in note and "(inside the brain: 0.07)" in note and "\n" not in note
    assert E.background_note({"identity": {"T1": {"ssim": 0.0994, "ssim_mask": -0.32}}}) == ""   # the phantom: none


def test_scoring_on_another_dataset(tmp_path):
    """evaluate.py --data OTHER scores a checkpoint on another prepared dataset of the same size and spacing (here a
    phantom drawn with another seed), and refuses one of another size or spacing with one sentence saying what
    differs; a dataset with no test split is refused too."""
    import evaluate as E
    from types import SimpleNamespace
    cfg = {"size": [112, 96], "prep": {"spacing": 2.0}}
    same = SimpleNamespace(shape=(112, 96), meta={"spacing": 2.0})
    assert E.data_mismatch(cfg, same) == ""
    assert E.data_mismatch(cfg, SimpleNamespace(shape=(112, 96), meta={"spacing": None})) == \
        "in-plane spacing the sources' own, not 2 mm"
    assert E.data_mismatch({"size": [112, 96], "prep": None}, SimpleNamespace(shape=(64, 96), meta={"spacing": 1.5})) \
        == "slices of 64x96, not 112x96 and in-plane spacing 1.5 mm, not the sources' own"
    a, b, c = (str(tmp_path / n) for n in ("a", "b", "c"))
    prepare_phantom(a, n_train=2, n_test=1, slices=1, size=(64, 64), seed=0, progress=False)
    prepare_phantom(b, n_train=1, n_test=2, slices=1, size=(64, 64), seed=5, progress=False)
    prepare_phantom(c, n_train=1, n_test=1, slices=1, size=(64, 80), seed=5, progress=False)
    ckpt = train_tiny(a, tmp_path / "run", 1)
    env = {**os.environ, "UNIT_ATTN": "naive"}
    ev = lambda d: subprocess.run([sys.executable, "evaluate.py", ckpt, "--data", d], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=300)
    r = ev(b)
    assert r.returncode == 0 and f"scoring on {b}, not on the training data {a}" in r.stdout
    assert "from 2 subjects" in r.stdout
    r = ev(c)
    assert r.returncode == 2 and "slices of 64x80, not 64x64" in r.stderr and r.stderr.count("\n") == 1


def test_3d_ssim_is_per_subject_volume_of_consecutive_slices():
    """A subject's 3-D SSIM is ssim_volume() of its stacked slices inside its brain, for subjects whose slices are
    one run of consecutive positions (at least 11); the others get NaN."""
    from types import SimpleNamespace
    from unit.evaluation import volume_runs, volume_scores
    from unit.metrics import ssim_volume
    r = np.random.default_rng(0)
    ids = ["a"] * 12 + ["b"] * 12 + ["c"] * 5
    meta = {"volumes": {"a": {"slices": list(range(3, 15))}, "b": {"slices": list(range(12))[:6] + list(range(7, 13))},
                        "c": {"slices": list(range(5))}}}
    runs = volume_runs(SimpleNamespace(meta=meta), ids)
    assert runs == {"a": (0, 12)}                        # b skips a position, c is too short
    real = torch.from_numpy(r.random((29, 16, 16))).float()
    pred = (real + 0.1 * torch.from_numpy(r.standard_normal((29, 16, 16))).float()).clamp(0, 1)
    mask = torch.ones(29, 16, 16, dtype=torch.bool)
    got = volume_scores(pred, real, mask, ids, runs)["ssim3d_mask"]
    assert got[0] == ssim_volume(pred[:12], real[:12], mask[:12]) and np.isnan(got[1:]).all()


def test_through_plane_sees_streaks_that_slice_by_slice_noise_draws():
    """experiments/through_plane.py's measure on a known case: an error smooth within each slice but drawn anew for
    every slice (what a 2-D translator can add) is uncorrelated between neighbouring slices and correlated in-plane,
    and makes the prediction rougher through the plane than in it (against the target); an error smooth in 3-D
    is correlated along every axis and leaves the prediction as rough through the plane as in it; the target
    itself has neighbour ratio 1."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("through_plane", os.path.join(ROOT, "experiments", "through_plane.py"))
    tp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tp)
    g = torch.Generator().manual_seed(0)
    blur3 = lambda v: torch.nn.functional.avg_pool3d(v[None, None], 5, 1, 2, count_include_pad=False)[0, 0]
    blur2 = lambda v: torch.nn.functional.avg_pool2d(v[:, None], 5, 1, 2, count_include_pad=False)[:, 0]
    real = blur3(torch.rand(24, 40, 40, generator=g, dtype=torch.float64)).numpy()
    mask = np.ones(real.shape, bool)
    streaks = real + 0.05 * blur2(torch.randn(24, 40, 40, generator=g, dtype=torch.float64)).numpy()
    smooth = real + 0.05 * blur3(torch.randn(24, 40, 40, generator=g, dtype=torch.float64)).numpy()
    s, t = tp.neighbours(streaks, real, mask), tp.neighbours(smooth, real, mask)
    with np.errstate(invalid="ignore"):                 # a zero error has no correlation: NaN, not a warning
        r = tp.neighbours(real, real, mask)
    assert np.isnan(r["corr_z"])
    assert abs(s["corr_z"]) < 0.1 and s["corr_xy"] > 0.6
    assert s["ratio_z"] / s["ratio_xy"] > 1.2
    assert t["corr_z"] > 0.6 and t["corr_xy"] > 0.6 and abs(t["ratio_z"] / t["ratio_xy"] - 1) < 0.05
    assert r["ratio_z"] == pytest.approx(1) and r["ratio_xy"] == pytest.approx(1)


def test_ssim_parts_multiply_to_the_core_ssim_evaluate_reports():
    """experiments/ssim_parts.py: luminance x contrast x structure, pooled per subject like evaluate.py's core SSIM,
    is that core SSIM (the SSIM with C3 = C2 / 2 is exactly their product); a perfect prediction scores 1 in each
    factor; a blurred target keeps its structure better than its contrast and is smoother (sd ratio below 1)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("ssim_parts", os.path.join(ROOT, "experiments", "ssim_parts.py"))
    sp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sp)
    from unit.metrics import erode
    g = torch.Generator().manual_seed(0)
    smooth = lambda v, k: torch.nn.functional.avg_pool2d(v[:, None], k, 1, k // 2, count_include_pad=False)[:, 0]
    real = smooth(torch.rand(6, 40, 40, generator=g), 3)
    pred = (real + 0.1 * torch.randn(6, 40, 40, generator=g)).clamp(0, 1)
    yy, xx = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    mask = torch.stack([(yy - 20) ** 2 + (xx - 20) ** 2 < r * r for r in (17, 18, 16, 19, 15, 18)])
    ids = ["a", "a", "a", "b", "b", "c"]
    got = sp.subject_parts(pred, real, erode(mask), ids, chunk=4)
    core = means(subject_scores(per_slice(pred, real, mask), ids))["ssim_core"]     # float32 per slice there
    assert got["ssim"] == pytest.approx(core, abs=1e-6)
    same = sp.subject_parts(real, real, erode(mask), ids)
    assert all(same[k] == pytest.approx(1) for k in ("l", "c", "s", "ssim", "sd ratio"))
    blur = sp.subject_parts(smooth(real, 5), real, erode(mask), ids)
    assert blur["s"] > blur["c"] and blur["sd ratio"] < 0.8


def test_volume_level_matching_removes_a_per_patient_offset_and_nothing_else():
    """match_level (evaluate.py --match-level): a prediction that is the target plus one offset per patient (inside
    the brain) becomes the target again when each patient's brain mean is moved to the targets' common level; the
    voxels outside the support stay as they were; training_levels is the mean of the training patients' levels (not
    of their pooled voxels, which would weigh a large brain more)."""
    from types import SimpleNamespace
    from unit.evaluation import match_level, training_levels, volume_levels
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    support = torch.stack([(yy - 16) ** 2 + (xx - 16) ** 2 < r * r for r in (12, 14, 9, 13, 11)])
    ids = np.array(["p", "p", "q", "q", "q"])
    real = torch.where(support, 0.3 + 0.4 * torch.rand(5, 32, 32, generator=g), torch.zeros(()))
    for s in ("p", "q"):                                        # both patients' brains at the level 0.5
        on = torch.as_tensor(ids == s)[:, None, None] & support
        real[on] += 0.5 - real[on].double().mean().float()
    pred = real + torch.where(support, torch.tensor([0.12, 0.12, -0.08, -0.08, -0.08])[:, None, None], torch.zeros(()))
    pred[~support] = 0.25                                       # outside the brain: left alone
    got = match_level(pred, support, ids, 0.5)
    torch.testing.assert_close(got[support], real[support], atol=1e-5, rtol=0)
    assert torch.equal(got[~support], pred[~support])
    assert volume_levels(got, support, ids) == pytest.approx({"p": 0.5, "q": 0.5}, abs=1e-6)
    none = support.clone()
    none[2:] = False                                            # q without a brain voxel: no level, left as it is
    assert torch.equal(match_level(pred, none, ids, 0.5)[2:], pred[2:])
    # patient p at 0.2 on 2 small slices, q at 0.8 on 3 large ones: the level of the split is 0.5, not 0.8-ish
    flat = torch.where(torch.as_tensor(ids == "p")[:, None, None], 0.2, 0.8) * support
    data = SimpleNamespace(meta={"slice_subject": {"train": list(ids)}}, train_t1=flat, train_t2=flat / 2,
                           train_mask=support, path="x")
    assert training_levels(data) == pytest.approx({"T1": 0.5, "T2": 0.25}, abs=1e-6)


def test_context_stacks_stay_inside_each_volume_and_the_middle_translation_is_kept():
    """--context k: a slice's stack is its volume's slices z-k..z+k (the end slice repeated past either end, never
    another subject's); translate() with those rows returns, for every slice, the middle channel of the model's
    translation of its stack, whatever the batch size; data without one run of positions per subject is refused."""
    from types import SimpleNamespace
    from unit import UserError
    from unit.evaluation import context_rows, stack_rows, translate
    assert stack_rows(2, 6, 1).tolist() == [[2, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 5]]
    assert stack_rows(0, 2, 2).tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]
    ids = ["a"] * 4 + ["b"] * 3
    meta = {"slice_subject": {"test": ids}, "volumes": {"a": {"slices": [0, 1, 2, 3]}, "b": {"slices": [5, 6, 7]}}}
    data = SimpleNamespace(meta=meta, paired=True, path="d")
    rows = context_rows(data, "test", 1)
    assert rows.tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3], [4, 4, 5], [4, 5, 6], [5, 6, 6]]
    assert context_rows(data, "test", 1, n=3).tolist() == rows[:3].tolist()
    gap = SimpleNamespace(meta={**meta, "volumes": {**meta["volumes"], "b": {"slices": [5, 7, 8]}}}, paired=True, path="d")
    with pytest.raises(UserError, match="consecutive positions"):
        context_rows(gap, "test", 1)
    with pytest.raises(UserError, match="unpaired"):
        context_rows(SimpleNamespace(meta=meta, paired=False, path="d"), "test", 1)
    torch.manual_seed(0)
    model = UNIT(channels=3, width=4).eval()
    images = np.random.default_rng(0).random((7, 64, 64)).astype(np.float32)
    want = torch.stack([(model.translate(torch.from_numpy(images[r])[None] * 2 - 1, "a")[0, 1] + 1) / 2
                        for r in rows]).clamp(0, 1)
    for bs in (1, 3, 16):
        torch.testing.assert_close(translate(model, images, "a", "cpu", 1, batch_size=bs, rows=rows), want)
