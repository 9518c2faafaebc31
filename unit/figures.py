"""Figures with Pillow only (no matplotlib): the qualitative comparison of evaluate.py --figure,
the attention maps of evaluate.py --attention-maps and train.py's sample grids (sample_grid). Images
come in as (H, W) arrays in [0, 1].

Colour scale of error maps and attention heat-maps: a five-stop approximation of matplotlib's
"magma" (black -> purple -> red -> orange -> pale yellow), linear between the stops.
"""
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from unit.evaluation import context_rows, figure_slices, from_model, take, to_model
from unit.io import write_png

MAGMA = np.array([[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]], np.float64)
INK, PAPER, MARK = (235, 235, 235), (24, 24, 24), (60, 255, 60)


def font(size):
    try:
        return ImageFont.load_default(size=size)   # Pillow >= 10.1 (TrueType when FreeType is there)
    except TypeError:
        return ImageFont.load_default()


def colormap(x):
    """(H, W) values in [0, 1] (clipped) -> (H, W, 3) uint8 on the MAGMA scale."""
    t = np.clip(np.asarray(x, np.float64), 0, 1) * (len(MAGMA) - 1)
    i = np.minimum(t.astype(int), len(MAGMA) - 2)
    f = (t - i)[..., None]
    return np.round(MAGMA[i] * (1 - f) + MAGMA[i + 1] * f).astype(np.uint8)


def gray(x):
    """(H, W) in [0, 1] -> (H, W, 3) uint8."""
    g = np.round(np.clip(np.asarray(x, np.float64), 0, 1) * 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def overlay(x, heat, alpha=0.65):
    """The gray image x with a heat-map (both (H, W), heat scaled to its own maximum) blended on top,
    more opaque where the heat is high."""
    h = np.asarray(heat, np.float64)
    h = h / h.max() if h.max() > 0 else h
    a = (alpha * h)[..., None]
    return np.round(gray(x) * (1 - a) + colormap(h) * a).astype(np.uint8)


class Sheet:
    """A grid of equal cells on a dark page, with a title row, a label column and a footer."""

    def __init__(self, rows, cols, cell, label_w, title_h=22, footer_h=0, text=12):
        self.cell, self.label_w, self.title_h = cell, label_w, title_h
        h, w = cell
        self.img = Image.new("RGB", (label_w + cols * (w + 2), title_h + rows * (h + 2) + footer_h), PAPER)
        self.draw, self.font = ImageDraw.Draw(self.img), font(text)

    def xy(self, row, col):
        return self.label_w + col * (self.cell[1] + 2), self.title_h + row * (self.cell[0] + 2)

    def put(self, row, col, rgb, caption=None, bottom=False):
        """Place an (h', w', 3) uint8 image, upscaled by nearest neighbour to the cell, with an optional
        caption in its top (or bottom) left corner."""
        x, y = self.xy(row, col)
        im = Image.fromarray(rgb).resize((self.cell[1], self.cell[0]), Image.NEAREST)
        self.img.paste(im, (x, y))
        if caption:
            at = (x + 3, y + self.cell[0] - 16 if bottom else y + 2)
            box = self.draw.textbbox(at, caption, font=self.font)
            self.draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=(0, 0, 0))
            self.draw.text(at, caption, fill=INK, font=self.font)

    def title(self, col, text):
        x, _ = self.xy(0, col)
        self.draw.text((x + 2, 4), text, fill=INK, font=self.font)

    def label(self, row, text):
        _, y = self.xy(row, 0)
        self.draw.multiline_text((4, y + 4), text, fill=INK, font=self.font, spacing=3)

    def colorbar(self, text, lo="0", hi="1"):
        """A MAGMA bar across the footer with its end values and a caption."""
        W = self.img.width - self.label_w - 8
        y = self.img.height - 34
        bar = colormap(np.tile(np.linspace(0, 1, W), (10, 1)))
        self.img.paste(Image.fromarray(bar), (self.label_w, y))
        self.draw.text((self.label_w, y + 12), lo, fill=INK, font=self.font)
        r = self.draw.textbbox((0, 0), hi, font=self.font)[2]
        self.draw.text((self.label_w + W - r, y + 12), hi, fill=INK, font=self.font)
        c = self.draw.textbbox((0, 0), text, font=self.font)[2]
        self.draw.text((self.label_w + (W - c) // 2, y + 12), text, fill=INK, font=self.font)

    def save(self, path):
        # an adaptive 256-colour palette: a fraction of the RGB file, the same to the eye on these images
        write_png(path, self.img.convert("P", palette=Image.ADAPTIVE, colors=256), optimize=True)


def label_width(texts, least=118, size=12):
    """Width of a label column that holds every (multi-line) text: at least `least` pixels."""
    draw, f = ImageDraw.Draw(Image.new("RGB", (1, 1))), font(size)
    return max([least] + [draw.multiline_textbbox((0, 0), t, font=f, spacing=3)[2] + 10 for t in texts])


def scale_for(shape, target=160):
    """Integer upscaling that brings the image width near `target` pixels (small images get room for text)."""
    return max(1, round(target / shape[1]))


def translation_figure(path, cases, names, err_max=0.25):
    """The qualitative comparison. cases: dicts with "label" (e.g. "phantom-0901\\nT1w -> T2w"), "input",
    "target" ((H, W) in [0, 1]), "outputs" (one (H, W) per checkpoint) and "ssim" (one per checkpoint).
    Per case two rows: input | each checkpoint's translation (its SSIM written on it) | real target, then
    under each translation |translation - target| on the MAGMA scale from 0 to err_max (clipped)."""
    H, W = cases[0]["input"].shape
    s = scale_for((H, W))
    k = len(names)
    sheet = Sheet(2 * len(cases), k + 2, (H * s, W * s), label_w=label_width(c["label"] for c in cases), footer_h=40)
    for j, t in enumerate(["input"] + list(names) + ["real target"]):
        sheet.title(j, t)
    for i, c in enumerate(cases):
        sheet.label(2 * i, c["label"])
        sheet.label(2 * i + 1, "|error|")
        sheet.put(2 * i, 0, gray(c["input"]))
        sheet.put(2 * i, k + 1, gray(c["target"]))
        for j, (out, q) in enumerate(zip(c["outputs"], c["ssim"])):
            sheet.put(2 * i, j + 1, gray(out), f"SSIM {q:.3f}")
            sheet.put(2 * i + 1, j + 1, colormap(np.abs(np.asarray(out, np.float64) - c["target"]) / err_max))
    sheet.colorbar(f"|translation - target| on [0, 1] intensities (clipped at {err_max})", "0", f"{err_max}")
    sheet.save(path)


def attention_figure(path, image, maps, points, title):
    """Where each query point attends: one row per attention layer (label: layer, grid, gamma), first
    column the input with every query marked, then per query the input with that query's weights beta
    (nearest-upsampled from the layer's grid, scaled to their maximum) blended on top and the query
    marked. maps: attention_weights() records for one image (beta (Q, h, w)), each drawn over its own
    "image" when it has one (a discriminator's: the translation it judged), else over `image`;
    points: (row, col) pixels."""
    H, W = image.shape
    s = scale_for((H, W))
    sheet = Sheet(len(maps), len(points) + 1, (H * s, W * s), label_w=150, title_h=38, footer_h=40)
    sheet.draw.text((4, 4), title, fill=INK, font=sheet.font)
    sheet.title(0, "\n" + "queries")
    for j, (r, c) in enumerate(points):
        sheet.title(j + 1, f"\nquery {j + 1} ({r}, {c})")

    def mark(row, col, r, c, n):
        x, y = sheet.xy(row, col)
        cx, cy = x + int((c + 0.5) * s), y + int((r + 0.5) * s)
        sheet.draw.line((cx - 5, cy, cx + 5, cy), fill=MARK, width=2)
        sheet.draw.line((cx, cy - 5, cx, cy + 5), fill=MARK, width=2)
        sheet.draw.text((cx + 4, cy - 14), str(n), fill=MARK, font=sheet.font)

    for i, m in enumerate(maps):
        h, w = m["grid"]
        under = np.asarray(m.get("image", image))
        sheet.label(i, f"{m['layer']}\n{h}x{w} grid\ngamma {m['gamma']:+.4f}")
        sheet.put(i, 0, gray(under))
        # pixel (r, c) lies in grid cell (r * h // H, c * w // W), the rule attention_weights() maps queries by
        # (exact blocks of H/h x W/w when they divide; a discriminator's grid is ceil(H/8) x ceil(W/8))
        rows, cols = np.arange(H) * h // H, np.arange(W) * w // W
        for j, (r, c) in enumerate(points):
            up = np.asarray(m["beta"][j], np.float64)[rows][:, cols]
            sheet.put(i, j + 1, overlay(under, up))
            mark(i, j + 1, r, c, j + 1)
            mark(i, 0, r, c, j + 1)
    sheet.colorbar("attention weight beta of the marked query, scaled to its maximum", "0", "max")
    sheet.save(path)


def spectrum_figure(path, rows, names, n, lo=-8.0, hi=-2.0):
    """Where the translations put their energy in frequency (evaluate.py --spectra): one row per
    direction, columns real target | each checkpoint's translation. rows: dicts with "label", "target"
    and "outputs" (mean unit.metrics.energy_spectrum over n test slices, (H, W), unshifted) and the
    checkerboard scores "target_score" / "scores". Each cell shows log10 of the spectrum, centred (DC in
    the middle, so the Nyquist row and column are the cell's top row and left column), on the MAGMA
    scale from 10^lo to 10^hi (clipped). A checkerboard shows as bright edges and corners; the sum over
    those bins is the score written on the cell (the table's Checkerboard column)."""
    H, W = rows[0]["target"].shape
    s = scale_for((H, W))
    k = len(names)
    sheet = Sheet(len(rows), k + 1, (H * s, W * s), label_w=118, footer_h=40)
    for j, t in enumerate(["real target"] + list(names)):
        sheet.title(j, t)

    def cell(spec):
        v = np.log10(np.fft.fftshift(np.asarray(spec, np.float64)) + 10.0 ** (lo - 3))
        return colormap((v - lo) / (hi - lo))

    for i, r in enumerate(rows):
        sheet.label(i, r["label"] + "\n\nDC: centre\nNyquist: top row,\nleft column")
        sheet.put(i, 0, cell(r["target"]), f"checkerboard {r['target_score']:.4f}", bottom=True)
        for j, (spec, q) in enumerate(zip(r["outputs"], r["scores"])):
            sheet.put(i, j + 1, cell(spec), f"checkerboard {q:.4f}", bottom=True)
    sheet.colorbar(f"energy share per frequency bin, mean of {n} test slices", f"1e{lo:g}", f"1e{hi:g}")
    sheet.save(path)


def sample_grid(model, data, cfg, path, n=4, split="test"):
    """PNG: rows x_a, x_ab, x_aba, x_b, x_ba, x_bab for n slices of split (model in eval mode): the slice with
    the most brain of n of its subjects drawn with seed 0, the same at every epoch so grids compare. A dataset
    without slices there shows training slices, chosen the same way."""
    split = split if data.has(split) else "train"
    t1, t2 = getattr(data, f"{split}_t1"), getattr(data, f"{split}_t2")
    idx = figure_slices(data, len(t1), k=n, seed=0, split=split)
    idx_b = [i % len(t2) for i in idx]                      # unpaired data may have fewer T2 slices
    was = model.training
    model.eval()
    with torch.no_grad():
        dev, ch, k = next(model.parameters()).device, cfg["channels"], cfg["context"]
        near = context_rows(data, split, k) if k else None           # --context: stacks, the middle slice shown
        x_a, x_b = to_model(take(t1, idx, near), ch, dev), to_model(take(t2, idx_b, near), ch, dev)
        x_ab, x_ba = model.translate(x_a, "a"), model.translate(x_b, "b")
        rows = [x_a, x_ab, model.translate(x_ab, "b"), x_b, x_ba, model.translate(x_ba, "a")]
        grid = torch.cat([torch.cat(list(from_model(r, k)), dim=1) for r in rows], dim=0)
    model.train(was)
    write_png(path, Image.fromarray((grid.cpu().numpy() * 255).round().astype(np.uint8)))
