"""Attention maps (SelfAttention.weights and the attention_weights hook) against the reference op and the
module's own forward pass, the figures' pixels against their stated colour scale, and evaluate.py's
--figure / --attention-maps / --spectra end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import train_tiny

from unit.attention import SelfAttention, attention_weights
from unit.backends import attention_reference
from unit.data import prepare_phantom
from unit.figures import (MAGMA, PAPER, attention_figure, colormap, label_width, scale_for, spectrum_figure,
                          translation_figure)
from unit.model import UNIT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_attention_weights_sum_to_one_and_are_the_reference_ops():
    torch.manual_seed(0)
    m = SelfAttention(16).double()
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64)
    queries = [0, 7, 29, 13]
    beta = m.weights(x, queries).double()                         # (B, Q, N)
    assert beta.shape == (2, 4, 30)
    torch.testing.assert_close(beta.sum(-1), torch.ones(2, 4, dtype=torch.float64), rtol=0, atol=1e-6)
    # the reference op with v = identity returns its weights: o[:, :, i] = sum_j p_ij e_j = row i of p
    q, k = m.g(x).flatten(2), m.f(x).flatten(2)
    p = attention_reference(q, k, torch.eye(30, dtype=torch.float64).expand(2, 30, 30))
    torch.testing.assert_close(beta, p[:, :, queries].transpose(1, 2), rtol=0, atol=1e-6)  # softmax in float32


def test_attention_hook_records_each_layer_on_its_grid_and_matches_its_output():
    torch.manual_seed(1)
    model = UNIT(width=4, attn="encoder+generator+discriminator").eval()
    seen = {}
    for name, mod in model.named_modules():
        if isinstance(mod, SelfAttention):
            mod.gamma.data.fill_(0.5)                               # so the output shows the attention
            mod.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (i[0], o)))
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    points = [(10, 20), (33, 40), (63, 0)]
    with attention_weights(model, points, (64, 64)) as maps:
        with torch.no_grad():
            model.dis_b(model.translate(x, "a"))
    # the layers a T1w -> T2w translation runs, then T2w's discriminator judging it
    assert [m["layer"] for m in maps] == ["enc_a.net.9", "gen_b.net.5", "dis_b.net.6"]
    assert [m["grid"] for m in maps] == [(16, 16), (32, 32), (8, 8)]
    assert [m["queries"] for m in maps] == [[(2, 5), (8, 10), (15, 0)], [(5, 10), (16, 20), (31, 0)],
                                            [(1, 2), (4, 5), (7, 0)]]
    for m in maps:
        assert m["gamma"] == 0.5
        xin, y = seen[m["layer"]]
        h, w = m["grid"]
        mod = dict(model.named_modules())[m["layer"]]
        o = ((y - xin) / 0.5).flatten(2)                           # the attention output the block used
        vals = mod.h(xin).flatten(2)                               # (B, C, N)
        beta = m["beta"].flatten(2)                                # (B, Q, N)
        for j, (r, c) in enumerate(m["queries"]):
            torch.testing.assert_close(torch.einsum("bcn,bn->bc", vals, beta[:, j]), o[:, :, r * w + c],
                                       rtol=1e-4, atol=1e-5)
    # the hooks are gone afterwards (only the test's own remain)
    assert all(len(mod._forward_hooks) == 1 for mod in model.modules() if isinstance(mod, SelfAttention))


def test_attention_figure_maps_grid_cells_to_pixels_and_draws_each_map_over_its_own_image(tmp_path):
    """A discriminator's grid need not divide the image (68 rows -> 9 cells, ceil(68 / 8)): pixel row r shows
    cell r * 9 // 68, the rule the queries are mapped by; a map that carries its own image (the translation a
    discriminator judged) is drawn over it, the others over the input."""
    H, W = 68, 64
    beta = np.zeros((1, 9, 8))
    beta[0, 8, 7] = 1.0                                            # one query attending to the last cell only
    maps = [{"layer": "dis", "gamma": 0.1, "grid": (9, 8), "beta": beta, "image": np.ones((H, W))},
            {"layer": "enc", "gamma": 0.2, "grid": (9, 8), "beta": beta}]
    path = str(tmp_path / "a.png")
    attention_figure(path, np.zeros((H, W)), maps, [(5, 5)], "t")
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    s = scale_for((H, W))
    assert img.shape == (38 + 2 * (H * s + 2) + 40, 150 + 2 * (W * s + 2), 3)
    px = lambda row, col, r, c: img[38 + row * (H * s + 2) + r * s + s // 2, 150 + col * (W * s + 2) + c * s + s // 2]
    assert (px(0, 0, 40, 40) == 255).all() and (px(1, 0, 40, 40) == 0).all()     # its own image, else the input
    hot = np.round(MAGMA[-1] * 0.65 + 255 * 0.35)
    for r, c, is_hot in ((61, 58, True), (67, 56, True), (60, 58, False), (62, 55, False)):   # 61 * 9 // 68 = 8
        assert np.abs(px(0, 1, r, c) - (hot if is_hot else 255)).max() <= 1, (r, c)


def test_colormap_stops_and_translation_figure_pixels(tmp_path):
    np.testing.assert_array_equal(colormap(np.array([[0.0, 1.0, 2.0]])), MAGMA[[0, -1, -1]][None].astype(np.uint8))
    np.testing.assert_array_equal(colormap(np.array([[0.125]])), np.round((MAGMA[0] + MAGMA[1]) / 2)[None, None])
    r = np.random.default_rng(0)
    target = r.random((64, 64))
    cases = [{"label": "s\nT1w -> T2w", "input": r.random((64, 64)), "target": target,
              "outputs": [target, np.clip(target + 0.5, 0, 1)], "ssim": [1.0, 0.5]}]
    path = str(tmp_path / "f.png")
    translation_figure(path, cases, ["exact", "off"], err_max=0.25)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    lw, th = 118, 22                                               # cells 128 px (64 x 2), label column, title row
    assert img.shape == (th + 2 * (128 + 2) + 40, lw + 4 * (128 + 2), 3)
    err = lambda col: img[th + 130 + 10: th + 130 + 118, lw + col * 130 + 10: lw + col * 130 + 118]
    assert np.abs(err(1) - MAGMA[0]).max() <= 6                  # exact output: error 0 everywhere
    off = err(2)[(np.clip(target + 0.5, 0, 1) - target).repeat(2, 0).repeat(2, 1)[10:118, 10:118] >= 0.25]
    assert off.size and np.abs(off - MAGMA[-1]).max() <= 6      # |error| >= 0.25: the top of the scale
    # a subject id longer than the default label column widens it instead of being cut
    long = "BraTS-GLI-00001-000-and-more\nT1w -> T2w"
    translation_figure(path, [{**cases[0], "label": long}], ["exact", "off"])
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    w = label_width([long])
    assert w > lw and img.shape[1] == w + 4 * 130
    assert (np.abs(img[th: th + 30, 4:w - 4] - PAPER).sum(-1) > 300).any(axis=0)[-20:].any()   # ink near its end


def test_spectrum_figure_centres_dc_and_puts_nyquist_on_the_top_and_left_edges(tmp_path):
    H, W = 64, 48
    s = scale_for((H, W))
    spec = np.zeros((H, W))
    spec[H // 2, 0] = 1e-2        # (ky, kx) = (Nyquist, 0): a horizontal-stripe pattern -> top row, centre column
    other = np.zeros((H, W))
    other[1, W // 2] = 1e-2       # (1, Nyquist) -> one row below the centre, left column
    rows = [{"label": "x", "target": spec, "target_score": 1.0, "outputs": [other], "scores": [1.0]}]
    path = str(tmp_path / "s.png")
    spectrum_figure(path, rows, ["run"], n=1, lo=-8, hi=-2)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    lw, th, cw = 118, 22, W * s + 2
    assert img.shape == (th + H * s + 2 + 40, lw + 2 * cw, 3)
    px = lambda col, r, c: img[th + r * s + s // 2, lw + col * cw + c * s + s // 2]
    top, bottom = MAGMA[-1], MAGMA[0]
    assert np.abs(px(0, 0, W // 2) - top).max() <= 6 and np.abs(px(0, 0, W // 2 + 1) - bottom).max() <= 6
    assert np.abs(px(0, H // 2, W // 2) - bottom).max() <= 6                   # DC: the mean was removed
    assert np.abs(px(1, H // 2 + 1, 0) - top).max() <= 6 and np.abs(px(1, H // 2, 0) - bottom).max() <= 6


def test_evaluate_figure_and_attention_maps(tmp_path):
    data = str(tmp_path / "phantom")
    prepare_phantom(data, n_train=4, n_test=4, slices=1, size=(64, 64), seed=0, progress=False)
    env = {**os.environ, "UNIT_ATTN": "naive"}
    ckpt = train_tiny(data, tmp_path / "run", 2, "--attn", "encoder+generator+discriminator")
    r = subprocess.run([sys.executable, "evaluate.py", ckpt, ckpt, "--figure", str(tmp_path / "f.png"),
                        "--subjects", "phantom-0005,phantom-0007", "--spectra", str(tmp_path / "s.png")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "f.png").size == (118 + 4 * 130, 22 + 8 * 130 + 40)   # 2 subjects x 2 directions
    assert Image.open(tmp_path / "s.png").size == (118 + 3 * 130, 22 + 2 * 130 + 40)   # target + 2 runs, 2 directions
    r = subprocess.run([sys.executable, "evaluate.py", ckpt, "--spectra", str(tmp_path / "no" / "s.png")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "existing folder" in r.stderr and "SSIM" not in r.stdout   # refused before scoring
    r = subprocess.run([sys.executable, "evaluate.py", ckpt, "--attention-maps", str(tmp_path / "att"), "--queries",
                        "10,20 40,30"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rec = json.load(open(tmp_path / "att" / "attention.json"))
    state = torch.load(ckpt, weights_only=True)["model"]
    assert rec["gamma"] == {n: pytest.approx(state[f"{n}.gamma"].item()) for n in
                            ("enc_a.net.9", "enc_b.net.9", "gen_a.net.5", "gen_b.net.5", "dis_a.net.6", "dis_b.net.6")}
    assert [(m["layer"], m["place"]) for m in rec["layers"]["t2_to_t1"]] == [
        ("enc_b.net.9", "encoder T2w"), ("gen_a.net.5", "generator T1w"), ("dis_a.net.6", "discriminator T1w")]
    assert rec["queries"] == [[10, 20], [40, 30]]
    assert Image.open(tmp_path / "att" / "attention_t1_to_t2.png").size == (150 + 3 * 130, 38 + 3 * 130 + 40)
    r = subprocess.run([sys.executable, "evaluate.py", ckpt, "--attention-maps", str(tmp_path / "a2"), "--queries",
                        "10,99"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "outside the 64x64 image" in r.stderr


def test_attention_maps_of_every_discriminator_scale(tmp_path):
    """--attn discriminator --d-scales 2: each direction's maps include the half-size discriminator's attention
    (it judges the translation too), on its own grid: 72 -> 36 -> 18 -> 9 at full size, 36 -> ... -> 5 at half."""
    data = str(tmp_path / "phantom")
    prepare_phantom(data, n_train=2, n_test=1, slices=1, size=(72, 72), seed=0, progress=False)
    ckpt = train_tiny(data, tmp_path / "run", 1, "--attn", "discriminator", "--d-scales", "2")
    r = subprocess.run([sys.executable, "evaluate.py", ckpt, "--attention-maps", str(tmp_path / "att"), "--queries",
                        "10,20"], cwd=ROOT, env={**os.environ, "UNIT_ATTN": "naive"}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    rec = json.load(open(tmp_path / "att" / "attention.json"))
    assert [(m["layer"], m["place"], m["grid"], m["queries"]) for m in rec["layers"]["t1_to_t2"]] == [
        ("dis_b.net.6", "discriminator T2w", [9, 9], [[1, 2]]),
        ("dis_b.coarse.net.6", "discriminator T2w", [5, 5], [[0, 1]])]
