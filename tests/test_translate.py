"""translate.py on volumes built here: the output lies on the input's grid (shape, affine, header) for RAS,
LPS and oblique affines; with the translator replaced by the identity it equals the input normalised
independently (NumPy percentiles of the mask voxels) on brain voxels and is 0 on slices without brain;
PNG and folder inputs; and bad inputs give one sentence and exit status 2."""
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import translate as T
from conftest import rotation, train_tiny
from unit import UserError
from unit.data import prepare_phantom

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


AFFINES = {
    "ras": np.diag([1.0, 1.0, 1.2, 1.0]),
    "lps": np.diag([-0.9, -0.9, 2.0, 1.0]),
    # obliquely cut: rotated 20 degrees about x and 10 about z, anisotropic voxels, shifted
    "oblique": np.block([[rotation(2, 10) @ rotation(0, 20) @ np.diag([0.8, 1.1, 1.5]), np.array([[5.0], [-7], [3]])],
                         [np.zeros((1, 3)), np.ones((1, 1))]]),
}


def head(shape=(30, 34, 14), seed=0):
    """A noisy bright ellipsoid with an inner structure in a dark field (stored voxel order)."""
    r = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    d = ((g / np.array([0.7, 0.8, 0.6])[:, None, None, None]) ** 2).sum(0)
    vol = np.where(d < 1, 400 + 300 * np.cos(6 * g[0]) * np.sin(4 * g[1]), 0.0) + r.random(shape) * 5
    return vol.astype(np.float32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    prepare_phantom(str(d / "data"), n_train=2, n_test=1, slices=1, size=(64, 64), progress=False)
    return train_tiny(d / "data", d / "run", 1)


@pytest.mark.parametrize("name", list(AFFINES))
def test_output_lies_on_the_input_grid(tmp_path, ckpt, name):
    img = nib.Nifti1Image(head(), AFFINES[name])
    img.header.set_qform(AFFINES[name], code=1)
    img.header.set_sform(AFFINES[name], code=2)
    src, dst = str(tmp_path / "sub_T1w.nii.gz"), str(tmp_path / "out.nii.gz")
    img.to_filename(src)
    assert T.main([ckpt, src, dst, "--device", "cpu"]) == 0
    out, ref = nib.load(dst), nib.load(src)
    assert out.shape == ref.shape and out.get_data_dtype() == np.float32
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-6)
    for k in ("qform_code", "sform_code", "pixdim", "srow_x", "srow_y", "srow_z", "quatern_b", "quatern_c"):
        np.testing.assert_allclose(out.header[k], ref.header[k], atol=1e-6, err_msg=k)
    v = out.get_fdata()
    assert v.min() >= 0 and v.max() <= 1 and v.any()


def test_four_d_with_one_volume_keeps_its_shape(tmp_path, ckpt):
    src, dst = str(tmp_path / "a_t2w.nii.gz"), str(tmp_path / "b.nii")
    nib.Nifti1Image(head()[..., None], AFFINES["lps"]).to_filename(src)
    assert T.main([ckpt, src, dst, "--device", "cpu"]) == 0
    assert nib.load(dst).shape == (30, 34, 14, 1)


@pytest.mark.parametrize("name", ["lps", "oblique"])
def test_identity_translator_gives_the_independently_normalised_input(name):
    vol, aff = head(seed=1), AFFINES[name]
    out = T.translate_volume(lambda s: s, vol, aff, percentiles=(0.5, 99.5), mask_rule="threshold")
    assert out.shape == vol.shape and out.dtype == np.float32
    # independently: the threshold mask (10% of the 99th percentile of the nonzero voxels), percentiles, clip
    v = vol.astype(np.float64)
    mask = v > 0.1 * np.percentile(v[v > 0], 99)
    lo, hi = np.percentile(v[mask], [0.5, 99.5])
    want = np.clip((v - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(out[mask], want[mask], atol=1e-5)
    # slices without brain stay 0 (the axial axis is the stored third one for these affines)
    zs = np.flatnonzero(mask.any(axis=(0, 1)))
    outside = [k for k in range(vol.shape[2]) if k < zs[0] or k > zs[-1]]
    assert outside and not out[:, :, outside].any()


def test_skull_stripped_input_keeps_its_background():
    """Mask rule "nonzero" (skull-stripped training data): 0 outside the input's nonzero voxels, on every slice;
    --keep-background keeps the network's output there; a threshold (head) mask cuts nothing; --mask cuts
    outside itself. The translator here answers 0.5 everywhere, so what is kept shows."""
    vol, aff = head(seed=2), AFFINES["oblique"]
    vol[vol < 100] = 0                                                 # skull-stripped: exact zeros outside
    brain = vol != 0
    half = lambda s: np.full_like(s, 0.5)
    out = T.translate_volume(half, vol, aff, mask_rule="nonzero")
    assert (out[brain] == 0.5).all() and (out[~brain] == 0).all()
    raw = T.translate_volume(half, vol, aff, mask_rule="nonzero", keep_background=True)
    zs = np.flatnonzero(brain.any(axis=(0, 1)))
    assert (raw[:, :, zs[0]:zs[-1] + 1] == 0.5).all()                  # whole slices, as the network answers
    head_only = T.translate_volume(half, vol, aff, mask_rule="threshold")
    np.testing.assert_array_equal(head_only, raw)
    own = np.zeros(vol.shape, bool)
    own[5:20, 8:25, 3:10] = True
    cut = T.translate_volume(half, vol, aff, mask=own, mask_rule="threshold")
    assert (cut[own] == 0.5).all() and (cut[~own] == 0).all()


def test_match_level_moves_the_brain_mean_to_the_checkpoints_level(tmp_path, ckpt):
    """--match-level: inside the brain the output is the plain translation plus one constant (where neither is
    clipped) and its mean is the training level the checkpoint recorded for the target contrast; outside it the
    same as without the flag; a PNG slice, or a head-threshold input without --mask, is refused in one sentence."""
    import torch
    vol = head()
    src, mpath = str(tmp_path / "sub_T1w.nii.gz"), str(tmp_path / "mask.nii.gz")
    nib.Nifti1Image(vol, AFFINES["ras"]).to_filename(src)
    brain = vol > 100
    nib.Nifti1Image(brain.astype(np.uint8), AFFINES["ras"]).to_filename(mpath)
    level = torch.load(ckpt, weights_only=False)["config"]["prep"]["levels"]["T2"]
    outs = {}
    for flag in ([], ["--match-level"]):
        dst = str(tmp_path / f"out{len(flag)}.nii.gz")
        assert T.main([ckpt, src, dst, "--mask", mpath, "--device", "cpu", *flag]) == 0
        outs[len(flag)] = nib.load(dst).get_fdata()
    plain, matched = outs[0], outs[1]
    assert matched[brain].mean() == pytest.approx(level, abs=2e-3)
    free = brain & (matched > 0) & (matched < 1) & (plain > 0) & (plain < 1)
    shift = matched[free] - plain[free]
    assert free.sum() > 0.9 * brain.sum() and shift.std() < 1e-5
    np.testing.assert_array_equal(matched[~brain], plain[~brain])
    with pytest.raises(UserError, match="--mask"):
        T.main([ckpt, src, str(tmp_path / "x.nii.gz"), "--device", "cpu", "--match-level"])
    png = str(tmp_path / "s_T1w.png")
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(png)
    with pytest.raises(UserError, match="one slice"):
        T.main([ckpt, png, str(tmp_path / "s.png"), "--device", "cpu", "--match-level"])


def test_png_of_any_size_and_a_folder(tmp_path, ckpt):
    png = tmp_path / "slice_t2.png"
    Image.fromarray((np.random.default_rng(0).random((66, 75)) * 255).astype(np.uint8)).save(png)
    assert T.main([ckpt, str(png), str(tmp_path / "o.png"), "--device", "cpu"]) == 0
    assert Image.open(tmp_path / "o.png").size == (75, 66)
    (tmp_path / "in").mkdir()
    for n in ("x_T1.nii.gz", "y_T2.nii"):
        nib.Nifti1Image(head(), AFFINES["ras"]).to_filename(str(tmp_path / "in" / n))
    assert T.main([ckpt, str(tmp_path / "in"), str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["x_T1_to_t2.nii.gz", "y_T2_to_t1.nii.gz"]


def test_contrast_from_the_file_name():
    assert T.contrast_target("BraTS-GLI-00001-000-t1n.nii.gz") == "t2"
    assert T.contrast_target("IXI002-Guys-0828-T2.nii.gz") == "t1"
    assert T.contrast_target("sub-01_T1w.nii.gz") == "t2" and T.contrast_target("T2w_acpc_dc_restore.nii") == "t1"
    assert T.contrast_target("scan.nii.gz") is None and T.contrast_target("t1_and_t2.nii") is None
    assert T.contrast_target("st1x.nii") is None


def test_bad_input_one_sentence(tmp_path, ckpt):
    r = subprocess.run([sys.executable, "translate.py", ckpt, str(tmp_path / "none_T1.nii.gz"), str(tmp_path / "o.nii")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    bad = tmp_path / "text_T1.nii.gz"
    bad.write_text("not an image")
    with pytest.raises(UserError, match="is not a readable NIfTI file"):
        T.main([ckpt, str(bad), str(tmp_path / "o.nii")])
    four = tmp_path / "four_T1.nii.gz"
    nib.Nifti1Image(np.stack([head(), head()], -1), np.eye(4)).to_filename(str(four))
    with pytest.raises(UserError, match=r"is a 4-D image of shape \(30, 34, 14, 2\)"):
        T.main([ckpt, str(four), str(tmp_path / "o.nii")])
    one = tmp_path / "one_T1.nii.gz"
    nib.Nifti1Image(head(), np.eye(4)).to_filename(str(one))
    zeros = tmp_path / "mask.nii.gz"
    nib.Nifti1Image(np.zeros((30, 34, 14), np.uint8), np.eye(4)).to_filename(str(zeros))
    with pytest.raises(UserError, match="the mask given for .* is empty"):
        T.main([ckpt, str(one), str(tmp_path / "o.nii"), "--mask", str(zeros)])
    with pytest.raises(UserError, match="cannot tell from the name scan.nii.gz"):
        nib.Nifti1Image(head(), np.eye(4)).to_filename(str(tmp_path / "scan.nii.gz"))
        T.main([ckpt, str(tmp_path / "scan.nii.gz"), str(tmp_path / "o.nii")])
    import torch
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a checkpoint written by this project"):
        T.main([str(tmp_path / "other.pt"), str(one), str(tmp_path / "o.nii")])
    with pytest.raises(UserError, match="OUT .* must end in .nii.gz or .nii"):
        T.main([ckpt, str(one), str(tmp_path / "o.png")])


def test_a_context_model_sees_each_slice_with_its_neighbours_across_batches():
    """run_model() of a --context 1 model over a volume cut into batches of 2: every slice's translation is the middle
    of the model's translation of that slice with the slices above and below (the end slice repeated), computed
    here one slice at a time; a PNG has no neighbours and is refused."""
    import torch
    from unit.model import UNIT
    torch.manual_seed(0)
    model = UNIT(channels=3, width=4).eval()
    slices = np.random.default_rng(1).random((5, 62, 61)).astype(np.float32)     # padded to 64x64 inside
    cfg = {"channels": 1, "context": 1}
    got = T.run_model(model, cfg, slices, "a", "cpu", 2, "test")
    pad = T.pad4(slices)
    for i in range(5):
        stack = torch.from_numpy(pad[[max(i - 1, 0), i, min(i + 1, 4)]])[None] * 2 - 1
        want = ((model.translate(stack, "a")[0, 1] + 1) / 2).clamp(0, 1).numpy()[:62, :61]
        np.testing.assert_allclose(got[i], want, atol=1e-5)
    with pytest.raises(UserError, match="neighbours"):
        T.translate_file(model, cfg, "in.png", "out.png", "t2", None, None)
