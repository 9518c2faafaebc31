"""Evaluate a UNIT checkpoint on the test split of its prepared dataset.

    python evaluate.py runs/NAME/ckpt.pt [--data DIR] [--json FILE] [--save-images DIR]
    python evaluate.py runs/*/ckpt_e075.pt [--csv FILE]     # one row per checkpoint, differences with CIs
    python evaluate.py runs/none/ckpt.pt runs/encoder-sn-cl/ckpt.pt --figure cmp.png   # qualitative figure
    python evaluate.py runs/encoder-sn-cl/ckpt.pt --attention-maps runs/encoder-sn-cl/attention
    python evaluate.py runs/none/ckpt.pt runs/none-resize/ckpt.pt --spectra spectra.png   # checkerboards
    python evaluate.py runs/NAME/ckpt.pt --volumes SRC --layout hcp --out DIR   # whole NIfTI volumes

Reports, as in the poster's table, "T1" = T2w->T1w translation scored against the real T1w and
"T2" = T1w->T2w scored against the real T2w: SSIM, PSNR (dB) and MAE on [0, 1] images, over the
whole slice and inside the brain mask, MS-SSIM and GMSD (fine detail; whole slice), plus the
identity baseline (the input slice itself scored as the output) for scale, and on the phantom the
oracle row (its noiseless targets scored against the noisy ones: the ceiling of this data) with each
model's SSIM as a fraction of it. Everything the model needs comes from the checkpoint.

With several checkpoints, all are scored on the same test slices, one row each, and every row after
the first also gets its paired difference to the first per metric, with a 95% t-interval over test
*subjects* (their slices are not independent); every model is also given against the strongest
reference row (identity, inverted input, intensity LUT) per brain metric.

--figure draws, for a few test subjects (--subjects, or 3 drawn with seed 0), the input, each
checkpoint's translation with its SSIM and the real target in both directions, with the absolute
error under each translation on a fixed colour scale. --attention-maps draws, for one test slice and
a few query points, the attention weights of every self-attention layer the translation runs through
(and the target discriminator's, judging the translation), and lists each layer's learned gamma.
--spectra draws, per direction, where the real targets and each checkpoint's translations put their
energy in frequency (mean over the test slices), the picture of the Checkerboard column
(unit/figures.py draws all three, with Pillow).

With --volumes, every test subject of a NIfTI source tree (data/README.md) is translated whole,
slice by slice, and written back as DIR/<subject>_t1_to_t2.nii.gz and _t2_to_t1.nii.gz on the
source grid, with the source affine and header and intensities mapped back to the source scale;
3-D SSIM, PSNR and MAE per subject are computed on the prepared [0, 1] scale.
"""
import argparse
import glob
import json
import os
import sys

import numpy as np
import torch

from unit import UserError, variants
from unit.checkpoint import load_model
from unit.data import load_prepared
from unit.evaluation import (BRAIN_METRICS, LUT_BINS, REFERENCES, context_rows, evaluate, figure_slices,
                             has_brain_mask, reference_scores, reference_subjects, stack_rows, strongest_reference,
                             t_interval, take, to_model, translate, volume_runs)
from unit.io import make_folder, refuse_existing, write_nifti, write_png, write_text
from unit.metrics import energy_spectrum, mae, psnr, ssim_volume


# the table's columns: the poster's SSIM, then PSNR, MAE, masked SSIM and the fine-detail metrics
COLUMNS = [("ssim", "SSIM"), ("psnr", "PSNR dB"), ("mae", "MAE"), ("ssim_mask", "SSIM brain"),
           ("ms_ssim", "MS-SSIM"), ("gmsd", "GMSD"), ("checker", "Checkerboard")]
# with a brain mask, the brain comes first: on skull-stripped data the zero background that input and
# target share makes whole-slice scores high for any output, the identity included
BRAIN_FIRST = [("ssim_mask", "SSIM brain"), ("ssim_core", "SSIM core"), ("ssim3d_mask", "SSIM 3-D brain"),
               ("psnr_mask", "PSNR brain dB"),
               ("mae_mask", "MAE brain"), ("ssim", "SSIM"), ("psnr", "PSNR dB"), ("mae", "MAE"), ("ms_ssim", "MS-SSIM"),
               ("gmsd", "GMSD"), ("checker", "Checkerboard")]
# the reference rows (unit.evaluation.REFERENCES), first in every table
REF_LABEL = {"identity": "identity (input as output)", "inverted": "inverted input (1 - x inside its support)",
             "lut": f"intensity LUT ({LUT_BINS} bins, fit on the training split)",
             "inverted_level": "inverted input, level matched", "lut_level": "intensity LUT, level matched"}
REF_NOTE = ("Reference rows: no network. inverted: 1 - input where the input is nonzero (uses neither training nor "
            "target); intensity LUT: E[target | input intensity] over the training split's brain voxels, applied where "
            "the input is nonzero; SSIM core: SSIM on the brain mask eroded by 5 px, windows that never reach the "
            "background (the brain's outline, which any brain-shaped output gets right, left out)")
CHECKER_NOTE = ("Checkerboard: share of the output's spectral energy at the Nyquist frequency (period-2 artefacts; "
                "identity row: the input's)")


# similarity scores with 1 = perfect, for which "a model's score / the oracle's" means something
OF_ORACLE = [("ssim", "SSIM"), ("ssim_mask", "SSIM brain"), ("ms_ssim", "MS-SSIM")]
ORACLE_ROW = "oracle (noiseless target)"
ORACLE_NOTE = ("oracle: the phantom's noiseless test targets scored against the noisy ones (same normalisation): "
               "the best a translator can expect here, as no model can predict the targets' Rician noise")


def fmt(k, x):
    return f"{x:.2f}" if k.startswith("psnr") else f"{x:.4f}"


def of_oracle(res):
    """'SSIM T1 0.83, T2 0.79, ...': a result's similarity scores as fractions of the oracle's."""
    return ", ".join(f"{n} T1 {res['T1'][k] / res['oracle']['T1'][k]:.2f} T2 {res['T2'][k] / res['oracle']['T2'][k]:.2f}"
                     for k, n in OF_ORACLE if k in res["T1"])


def columns(data):
    """BRAIN_FIRST when the data has a brain mask (meta.json says so: not IXI's head mask), else COLUMNS."""
    return BRAIN_FIRST if has_brain_mask(data) else COLUMNS


def background_note(res):
    """One line when the identity's whole-slice SSIM is high: then the background, not the brain, sets it."""
    i = res["identity"]["T1"]
    if i["ssim"] < 0.3:
        return ""
    brain = f" (inside the brain: {i['ssim_mask']:.2f})" if "ssim_mask" in i else ""
    return (f"note: the input itself scores whole-slice SSIM {i['ssim']:.2f} against the target{brain}: on skull-stripped "
            f"data the zero background shared by input and target dominates whole-slice scores, so read the brain-masked "
            f"ones")


def ref_rows(res, keys):
    """Markdown rows of the reference rows (REFERENCES, then the oracle): '| label | T1 | T2 | ...'."""
    rows = [(REF_LABEL[r], res[r]) for r in REFERENCES if r in res]
    if "oracle" in res:
        rows.append((ORACLE_ROW, res["oracle"]))
    return [f"| {name} | " + " | ".join(f"{fmt(k, v['T1'][k])} | {fmt(k, v['T2'][k])}" for k, _ in keys) + " |"
            for name, v in rows]


def versus_references(subjects, res):
    """{c: {k: (reference row, mean, low, high)}} for the brain metrics: a model's paired per-subject difference to
    the strongest reference row of that metric and direction (strongest_reference), with its 95% t-interval over
    subjects; sign as 'better' (for MAE, reference minus model), so > 0 everywhere means the model wins."""
    out = {}
    for c in ("T1", "T2"):
        out[c] = {}
        for k, higher in BRAIN_METRICS.items():
            if k not in subjects[c] or "reference_per_subject" not in res:
                continue
            r = strongest_reference(res, c, k)
            d = subjects[c][k] - reference_subjects(res, r, c)[k]
            out[c][k] = (r, *t_interval(d if higher else -d))
    return out


def versus_lines(label, vs):
    """Markdown lines of versus_references(): one row per direction."""
    keys = [k for k in BRAIN_METRICS if k in vs["T1"]]
    lines = []
    for c in ("T1", "T2"):
        cells = [f"{fmt(k, vs[c][k][1])} [{fmt(k, vs[c][k][2])}, {fmt(k, vs[c][k][3])}] vs {vs[c][k][0]}" for k in keys]
        lines.append(f"| {label} | {c} | " + " | ".join(cells) + " |")
    return lines


VERSUS_HEAD = ("Each model against the strongest reference row of each brain metric (paired difference over test "
               "subjects, as 'better': MAE reference minus model; [95% t-interval]; > 0 = the model wins):")


def table(res, cols=COLUMNS, subjects=None):
    """One checkpoint's results as a markdown table: the reference rows (identity, inverted input, intensity LUT;
    the oracle on the phantom), then the translation; the translation as a fraction of the oracle; with subjects
    (its subject_scores()), its paired differences to the strongest reference row of each brain metric."""
    keys = [k for k in cols if k[0] in res["T1"]]
    head = "| | " + " | ".join(f"{n} T1 | {n} T2" for _, n in keys) + " |"
    lines = [head, "|---" * (1 + 2 * len(keys)) + "|", *ref_rows(res, keys)]
    lines.append("| **translation** | " + " | ".join(f"{fmt(k, res['T1'][k])} | {fmt(k, res['T2'][k])}" for k, _ in keys)
                 + " |")
    lines += ["", REF_NOTE + "."]
    if "target" in res:
        lines += ["", f"{CHECKER_NOTE}; the real targets score T1 {res['target']['T1']:.4f} T2 {res['target']['T2']:.4f}."]
    if "oracle" in res:
        lines += ["", ORACLE_NOTE + ".", f"translation / oracle: {of_oracle(res)}"]
    vs = versus_references(subjects, res) if subjects else None
    if vs and vs["T1"]:
        names = [n for k, n in BRAIN_FIRST if k in vs["T1"]]
        lines += ["", VERSUS_HEAD, "", "| | | " + " | ".join(names) + " |", "|---" * (2 + len(names)) + "|",
                  *versus_lines("translation", vs)]
    return "\n".join(lines)


def save_images(out_dir, idx, t1, t2, fake_t1, fake_t2):
    """PNG per test slice i in idx: real T1 | T1->T2 | real T2 | T2->T1."""
    from PIL import Image
    make_folder(out_dir)
    for i in idx:
        row = torch.cat([t1[i], fake_t2[i], t2[i], fake_t1[i]], dim=1)
        write_png(os.path.join(out_dir, f"test_{i:04d}.png"),
                  Image.fromarray((row.numpy() * 255).round().astype(np.uint8)))


def evaluate_volumes(model, cfg, data, args):
    """Translate whole test volumes of a NIfTI tree; write NIfTIs; 3-D scores per subject."""
    import nibabel as nib

    from unit.data import DataError
    from unit.geometry import slices_to_nifti
    from unit.nifti import LAYOUT_MASK_RULE, PERCENTILES, find_subjects, prepare_subject
    if not args.layout or not args.out:
        raise UserError("--volumes needs --layout (hcp, brats, ixi, folders) and --out DIR for the NIfTI files")
    if args.layout not in LAYOUT_MASK_RULE:
        raise UserError(f"--layout {args.layout} is not a NIfTI layout; use one of {', '.join(LAYOUT_MASK_RULE)}")
    subjects = find_subjects(args.layout, args.volumes, hcp_space=args.hcp_space)
    test_ids = set(data.meta.get("test_subjects", []))
    chosen = [s for s in subjects if s.id in test_ids]
    if not chosen:
        print(f"note: none of the {len(subjects)} subjects in {args.volumes} is a test subject of {data.path}; "
              f"translating all of them (some may have been seen in training)")
        chosen = subjects
    registered = bool(data.meta.get("registration"))    # ixi --register: register again, as prepared
    paired = args.layout != "ixi" or registered
    pct = tuple(data.meta.get("normalization", {}).get("percentiles", PERCENTILES))
    make_folder(args.out)
    rows = []
    for n, s in enumerate(chosen):
        try:
            r = prepare_subject(s, size=tuple(cfg["size"]), slices="all", percentiles=pct,
                                resample_t2=args.layout == "ixi", register=registered,
                                mask_rule=LAYOUT_MASK_RULE[args.layout],
                                spacing=train_spacing(cfg) or data.meta.get("spacing"))
        except DataError as e:
            print(f"warning: skipping subject {s.id}: {e}", file=sys.stderr)
            continue
        near = stack_rows(0, len(r.t1), cfg["context"]) if cfg["context"] else None   # --context: one volume
        fake_t2 = translate(model, r.t1, "a", args.device, cfg["channels"], args.batch_size, near)   # (K, H, W)
        fake_t1 = translate(model, r.t2, "b", args.device, cfg["channels"], args.batch_size, near)
        # ixi: everything lives on the T1 grid (the T2 was resampled onto it), so the T1 header fits both.
        # Intensities go back with the *input's* normalisation (a user has no target), so the network's 0 is
        # the input's low percentile: also the value outside the crop window. Skull-stripped sources: 0
        # outside the input's brain (its nonzero voxels), inside and outside the window, as translate.py.
        img1, img2 = nib.load(s.t1_path), nib.load(s.t2_path)
        h2 = img1.header if args.layout == "ixi" else img2.header
        for fake, src_img, lo_hi, hdr, name in ((fake_t2, img1, r.t1_range, h2, "t1_to_t2"),
                                                (fake_t1, img2, r.t2_range, img1.header, "t2_to_t1")):
            out = slices_to_nifti(fake.numpy(), r.geometry, lo_hi, header=hdr, fill=lo_hi[0])
            if LAYOUT_MASK_RULE[args.layout] == "nonzero" and not args.keep_background:
                vol = np.asarray(out.dataobj)
                vol[np.asarray(src_img.dataobj).reshape(vol.shape) == 0] = 0
            write_nifti(os.path.join(args.out, f"{s.id}_{name}.nii.gz"), out)
        row = {"subject": s.id, "slices": len(r.t1)}
        if paired and len(r.t1) >= 11:
            t1, t2, m = torch.from_numpy(r.t1), torch.from_numpy(r.t2), torch.from_numpy(r.mask)
            for name, pred, real in (("T1", fake_t1, t1), ("T2", fake_t2, t2)):
                row[name] = {"ssim3d": ssim_volume(pred, real), "ssim3d_mask": ssim_volume(pred, real, m),
                             "psnr": psnr(pred[None], real[None]).item(), "mae": mae(pred[None], real[None]).item()}
            print(f"[{n + 1}/{len(chosen)}] {s.id}: SSIM3d T1 {row['T1']['ssim3d']:.4f} T2 {row['T2']['ssim3d']:.4f}"
                  f"  PSNR T1 {row['T1']['psnr']:.2f} T2 {row['T2']['psnr']:.2f}  MAE T1 {row['T1']['mae']:.4f} "
                  f"T2 {row['T2']['mae']:.4f}", flush=True)
        else:
            print(f"[{n + 1}/{len(chosen)}] {s.id}: written (no paired scores: "
                  f"{'unpaired source' if not paired else 'fewer than 11 slices'})", flush=True)
        rows.append(row)
    scored = [r for r in rows if "T1" in r]
    res = {"volumes": rows, "n": len(rows)}
    if scored:
        res["mean"] = {c: {k: float(np.mean([r[c][k] for r in scored])) for k in scored[0][c]} for c in ("T1", "T2")}
        print(f"mean over {len(scored)} subjects: " + "  ".join(
            f"{c}: SSIM3d {res['mean'][c]['ssim3d']:.4f} (brain {res['mean'][c]['ssim3d_mask']:.4f}) "
            f"PSNR {res['mean'][c]['psnr']:.2f} MAE {res['mean'][c]['mae']:.4f}" for c in ("T1", "T2")))
    elif not paired:
        print("no paired scores: IXI's T1w and T2w are not co-registered (see data/README.md)")
    print(f"wrote {2 * len(rows)} NIfTI files to {args.out}")
    return res


def train_spacing(cfg):
    """The in-plane spacing (mm) a checkpoint's training slices were resampled to, or None (the sources' own)."""
    return (cfg["prep"] or {}).get("spacing")


def data_mismatch(cfg, data):
    """'' when a prepared dataset can be scored with a checkpoint (the same slice size and in-plane spacing as its
    training data), else what differs, in words."""
    differ = []
    if list(data.shape) != list(cfg["size"]):
        differ.append(f"slices of {data.shape[0]}x{data.shape[1]}, not {cfg['size'][0]}x{cfg['size'][1]}")
    have, want = data.meta.get("spacing"), train_spacing(cfg)
    if have != want:
        say = lambda v: f"{v:g} mm" if v else "the sources' own"
        differ.append(f"in-plane spacing {say(have)}, not {say(want)}")
    return " and ".join(differ)


def run_label(path, epoch):
    """A checkpoint's short name in figures: its run folder and epoch ("encoder-sn-cl e75")."""
    return f"{os.path.basename(os.path.dirname(os.path.abspath(path)))} e{epoch}"


def sagittal(stack, run, mask, aspect, size):
    """The sagittal plane through the brain's centre of a subject's stacked axial slices stack[a:b] (run = (a, b):
    unit.evaluation.volume_runs), superior up, resampled to square pixels (aspect: through-plane over in-plane
    spacing) and fitted into an (H, W) = size cell, black around: (H, W) float32 in [0, 1]. Where a 2-D
    translator's slices disagree, this view shows it as horizontal streaks."""
    from PIL import Image
    a, b = run
    vol, m = np.asarray(stack[a:b], np.float32), np.asarray(mask[a:b])
    col = int(round(np.nonzero(m)[2].mean())) if m.any() else vol.shape[2] // 2
    plane = np.ascontiguousarray(vol[::-1, :, col])            # (D, H): the top row is the highest slice
    H, W = size
    f = min(H / (plane.shape[0] * aspect), W / plane.shape[1])
    img = Image.fromarray(plane).resize((max(1, round(plane.shape[1] * f)), max(1, round(plane.shape[0] * aspect * f))),
                                        Image.BILINEAR)
    out = np.zeros((H, W), np.float32)
    y0, x0 = (H - img.height) // 2, (W - img.width) // 2
    out[y0:y0 + img.height, x0:x0 + img.width] = np.clip(np.asarray(img), 0, 1)
    return out


def sagittal_planes(data, split, n, idx):
    """plane(stack) -> {subject: sagittal()} for the subjects of the slices idx (among the first n of split) that
    have a whole volume (unit.evaluation.volume_runs), from a stack of that split's n slices."""
    ids = data.meta["slice_subject"][split][:n]
    runs, masks = volume_runs(data, ids), getattr(data, f"{split}_mask")
    mask = np.asarray(masks[:n]) > 0 if masks is not None else np.ones((n, *data.shape), bool)
    def aspect(sid):                                          # through-plane (the source's) over in-plane spacing
        v = data.meta["volumes"][sid]["source_spacing"]
        return v[2] / (data.meta.get("spacing") or v[0])
    chosen = [s for s in dict.fromkeys(ids[i] for i in idx) if s in runs]
    return lambda stack: {s: sagittal(stack, runs[s], mask, aspect(s), data.shape) for s in chosen}


def draw_figure(path, rows, stacks, idx, subjects, sagittals=None):
    """The qualitative comparison (unit.figures.translation_figure) of the test slices idx, and for each of their
    subjects with a whole volume a sagittal row per direction (sagittals: {subject: {"t1", "t2": planes}}, each
    row's {"fake_t1", "fake_t2": {subject: plane}} in r["sagittal"]), with the subject's 3-D brain SSIM on it."""
    from unit.figures import translation_figure
    cases, order = [], sorted(set(subjects))                     # np.unique's order, as subject_scores()
    for i in idx:
        for c, src, dst, fake in (("T2", "t1", "t2", "fake_t2"), ("T1", "t2", "t1", "fake_t1")):
            cases.append({"label": f"{subjects[i]}\n{src.upper()}w -> {dst.upper()}w",
                          "input": stacks[src][i].numpy(), "target": stacks[dst][i].numpy(),
                          "outputs": [r["figure"][fake][i].numpy() for r in rows],
                          "ssim": [r["slices"][c]["ssim"][i] for r in rows]})
        sid = subjects[i]
        for c, src, dst, fake in (("T2", "t1", "t2", "fake_t2"), ("T1", "t2", "t1", "fake_t1")):
            if sagittals and sid in sagittals:
                cases.append({"label": f"{sid}\n{src.upper()}w -> {dst.upper()}w\nsagittal, SSIM 3-D brain",
                              "input": sagittals[sid][src], "target": sagittals[sid][dst],
                              "outputs": [r["sagittal"][fake][sid] for r in rows],
                              "ssim": [r["subjects"][c]["ssim3d_mask"][order.index(sid)] for r in rows]})
    translation_figure(path, cases, [run_label(r["ckpt"], r["epoch"]) for r in rows])
    print(f"figure: {path} ({len(idx)} test subject{'s' * (len(idx) != 1)} x 2 directions"
          + (", axial and sagittal" if sagittals else "") + "; error maps from 0 to 0.25)")


def mean_spectrum(x, chunk=256):
    """unit.metrics.energy_spectrum averaged over the slices x (n, H, W), in chunks (float64 FFTs)."""
    return sum(energy_spectrum(x[i:i + chunk]).sum(0) for i in range(0, len(x), chunk)).numpy() / len(x)


def draw_spectra(path, rows, stacks):
    """The spectra figure (unit.figures.spectrum_figure): real targets and each checkpoint's translations."""
    from unit.figures import spectrum_figure
    spec = [{"label": f"{src}w -> {dst}w", "target": mean_spectrum(stacks[dst.lower()]),
             "target_score": rows[0]["res"]["target"][c], "outputs": [r["spectra"][c] for r in rows],
             "scores": [r["res"][c]["checker"] for r in rows]} for c, src, dst in (("T2", "T1", "T2"), ("T1", "T2", "T1"))]
    n = rows[0]["res"]["n"]
    spectrum_figure(path, spec, [run_label(r["ckpt"], r["epoch"]) for r in rows], n)
    print(f"spectra: {path} (mean share of the energy per frequency bin over {n} test slices, log scale)")


def default_queries(mask, image):
    """Four query points inside the brain's bounding box (the mask's, else the image's bright part):
    its centre and three points towards its front-left, front-right and back."""
    m = mask if mask is not None and mask.any() else image > 0.05
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    r0, r1, c0, c1 = rows[0], rows[-1], cols[0], cols[-1]
    return [(int(r0 + fr * (r1 - r0)), int(c0 + fc * (c1 - c0))) for fr, fc in
            ((0.5, 0.5), (0.3, 0.3), (0.3, 0.7), (0.75, 0.5))]


def draw_attention_maps(out_dir, model, cfg, data, idx, queries, device, split="test"):
    """Attention maps of both translations of test slice idx (one PNG each) and attention.json with
    the query points and every attention layer's gamma. Each direction runs the translation and then
    the target domain's discriminator on it (the judgement the generator is trained against), so every
    placement of --attn is drawn: the source encoder, the target generator, the target discriminator.
    Layers are found by type (SelfAttention) and named by their place (unit.model.place_of)."""
    from unit.attention import SelfAttention, attention_weights
    from unit.evaluation import from_model
    from unit.figures import attention_figure
    from unit.model import place_of
    layers = {n: m.gamma.item() for n, m in model.named_modules() if isinstance(m, SelfAttention)}
    if not layers:
        raise UserError(f"--attention-maps: this checkpoint has no self-attention (attn={cfg['attn']}); train "
                        f"with --attn PLACE[+PLACE...] from encoder, generator, discriminator")
    H, W = data.shape
    masks = getattr(data, f"{split}_mask")
    mask = None if masks is None else np.asarray(masks[idx]) > 0
    img = {q: np.asarray(getattr(data, f"{split}_t{i}")[idx], np.float32) for q, i in (("a", 1), ("b", 2))}
    k = cfg["context"]
    near = context_rows(data, split, k) if k else None                 # --context: the slice's stack goes in
    put = {q: take(getattr(data, f"{split}_t{i}"), [idx], near) for q, i in (("a", 1), ("b", 2))}   # (1, [ch,] H, W)
    points = queries or default_queries(mask, img["a"])
    bad = [p for p in points if not (0 <= p[0] < H and 0 <= p[1] < W)]
    if bad:
        raise UserError(f"--queries {bad}: outside the {H}x{W} image (row, col from 0)")
    make_folder(out_dir)
    subject = data.meta["slice_subject"][split][idx]
    record = {"slice": idx, "subject": subject, "queries": points, "gamma": layers, "layers": {}}
    drawn = set()
    model.eval()
    for src, name in (("a", "t1_to_t2"), ("b", "t2_to_t1")):
        judge = model.dis_b if src == "a" else model.dis_a
        with torch.no_grad(), attention_weights(model, points, (H, W)) as maps:
            y = model.translate(to_model(put[src], cfg["channels"], device), src)
            judge.judge(y)                              # every scale's logits (--d-scales): only attention is kept
        out = from_model(y, k)[0].cpu().numpy()
        for m in maps:
            m["beta"] = m["beta"][0]                    # the one image of the batch: (Q, h, w)
            place = place_of(m["layer"])
            record["layers"].setdefault(name, []).append({"layer": m["layer"], "place": place, "grid": list(m["grid"]),
                                                          "queries": [list(q) for q in m["queries"]]})
            drawn.add(m["layer"])
            if place.startswith("discriminator"):
                m["image"] = out                        # what that discriminator looked at
            m["layer"] = f"{place}\n({m['layer']})"
        png = os.path.join(out_dir, f"attention_{name}.png")
        attention_figure(png, img[src], maps, points, f"{subject}, test slice {idx}: {name.replace('_', ' ')} "
                                                      f"(--attn {cfg['attn']}); where each query attends")
        print(f"attention maps: {png} ({len(maps)} layer(s) x {len(points)} queries)")
    missed = sorted(set(layers) - drawn)
    if missed:      # a placement no translation or discriminator runs: a model change this function does not know
        raise UserError(f"--attention-maps: attention layer(s) {', '.join(missed)} did not run in a translation or "
                        f"its discriminator; draw_attention_maps() needs to run the part that holds them")
    write_text(os.path.join(out_dir, "attention.json"), json.dumps(record, indent=2))
    print("learned gamma (y = gamma * attention + x; 0 = attention unused): " +
          ", ".join(f"{place_of(n)} {g:+.4f}" for n, g in layers.items()))


def compare_table(rows, subjects, cols=COLUMNS):
    """Markdown: the reference rows, one row per checkpoint (means), then each row after the first as a paired
    difference to the first with its 95% t-interval over test subjects, and every checkpoint against the strongest
    reference row of each brain metric."""
    keys = [(k, n) for k, n in cols if k in rows[0]["res"]["T1"]]
    res0 = rows[0]["res"]
    head = "| checkpoint | model | epoch | " + " | ".join(f"{n} T1 | {n} T2" for _, n in keys) + " |"
    out = [head, "|---" * (3 + 2 * len(keys)) + "|"]
    out += [line.replace(" |", " | | |", 1) for line in ref_rows(res0, keys)]      # two empty cells: model, epoch
    for r in rows:
        out.append(f"| {r['ckpt']} | {variants.label(r['config'])} | {r['epoch']} | " +
                   " | ".join(f"{fmt(k, r['res']['T1'][k])} | {fmt(k, r['res']['T2'][k])}" for k, _ in keys) + " |")
    out += ["", REF_NOTE + "."]
    if res0.get("target"):
        out += ["", f"{CHECKER_NOTE}; the real targets score T1 {res0['target']['T1']:.4f} T2 {res0['target']['T2']:.4f}."]
    if res0.get("oracle"):
        out += ["", ORACLE_NOTE + "; each checkpoint as a fraction of it:", ""]
        out += [f"- {r['ckpt']}: {of_oracle(r['res'])}" for r in rows]
    if len(rows) > 1:
        out += ["", f"Paired differences to the first row (mean over subjects, [95% t-interval] over "
                    f"{len(set(subjects))} subjects):", "", head, out[1]]
        for r in rows[1:]:
            cells = []
            for k, _ in keys:
                for c in ("T1", "T2"):
                    d, lo, hi = r["diff"][c][k]
                    cells.append(f"{fmt(k, d)} [{fmt(k, lo)}, {fmt(k, hi)}]")
            out.append(f"| {r['ckpt']} | {variants.label(r['config'])} | {r['epoch']} | " + " | ".join(cells) + " |")
    vs = [(r, versus_references(r["subjects"], r["res"])) for r in rows]
    if vs[0][1] and vs[0][1]["T1"]:
        names = [n for k, n in BRAIN_FIRST if k in vs[0][1]["T1"]]
        out += ["", VERSUS_HEAD, "", "| checkpoint | | " + " | ".join(names) + " |", "|---" * (2 + len(names)) + "|"]
        for r, v in vs:
            out += versus_lines(r["ckpt"], v)
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt", nargs="+", help="checkpoint(s) written by train.py (runs/NAME/ckpt.pt); several are "
                                           "scored on the same test split, one row each")
    p.add_argument("--data", help="prepared dataset to evaluate on (default: the one the (first) checkpoint was "
                                  "trained on)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--csv", help="also write one row per checkpoint (means, and differences to the first) here")
    p.add_argument("--save-images", metavar="DIR", help="write real/translated PNGs of test slices here (one "
                                                        "checkpoint)")
    f = p.add_argument_group("figures (unit/figures.py, Pillow)")
    f.add_argument("--figure", metavar="FILE.png", help="input, each checkpoint's translation (SSIM on it), real "
                                                        "target and error maps, both directions")
    f.add_argument("--subjects", help="comma-separated test subject ids for --figure / --attention-maps (default: "
                                      "3 drawn with seed 0; the slice with the most brain of each)")
    f.add_argument("--attention-maps", metavar="DIR", help="attention weights of chosen query points of one test "
                                                           "slice, per attention layer, and each layer's gamma "
                                                           "(one checkpoint with --attn)")
    f.add_argument("--spectra", metavar="FILE.png", help="per direction, the mean energy spectrum of the real "
                   "targets and of each checkpoint's translations (log scale): where a checkerboard shows")
    f.add_argument("--queries", help="query pixels for --attention-maps as 'row,col row,col ...' (default: 4 "
                                     "points inside the brain)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, help="evaluate only the first N test slices")
    p.add_argument("--split", default="test", choices=("test", "val"), help="score the test split (the report) or the "
                   "validation split (where variants and settings are chosen; data/prepare.py --split with \"val\")")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--match-level", action="store_true", help="score every translated volume with its brain level "
                   "(mean) moved to the training split's mean level of the target contrast, and add the inverted input "
                   "and the LUT treated alike as reference rows (uses no pair; unit.evaluation.match_level)")
    v = p.add_argument_group("whole volumes (NIfTI source trees, see data/README.md)")
    v.add_argument("--volumes", metavar="SRC", help="translate the test subjects of this source tree (one checkpoint)")
    v.add_argument("--layout", help="layout of SRC: hcp, brats, ixi or folders")
    v.add_argument("--hcp-space", default="acpc", choices=("acpc", "mni"), help="for --layout hcp")
    v.add_argument("--out", help="folder for the translated NIfTI volumes")
    v.add_argument("--keep-background", action="store_true", help="keep the network's output outside the input's "
                   "brain (default for skull-stripped sources: 0 there, like the input)")
    p.add_argument("--overwrite", action="store_true", help="replace output files that exist (--json, --csv, "
                   "--figure, --spectra, and the images, maps or volumes in --save-images, --attention-maps, --out)")
    args = p.parse_args(argv)
    if len(args.ckpt) > 1 and (args.volumes or args.save_images or args.attention_maps):
        raise UserError("--volumes, --save-images and --attention-maps take one checkpoint; run evaluate.py once "
                        "per checkpoint")
    slice_only = [f for f, v in (("--figure", args.figure), ("--spectra", args.spectra), ("--csv", args.csv),
                                 ("--match-level", args.match_level),
                                 ("--save-images", args.save_images), ("--attention-maps", args.attention_maps)) if v]
    if args.volumes and slice_only:
        raise UserError(f"{', '.join(slice_only)}: these are for the prepared test slices, not for --volumes; run "
                        f"evaluate.py without --volumes for them")
    for flag, png in (("--figure", args.figure), ("--spectra", args.spectra)):   # fail now, not after scoring
        if png and (not png.lower().endswith(".png") or not os.path.isdir(os.path.dirname(os.path.abspath(png)))):
            raise UserError(f"{flag} {png}: give a .png file in an existing folder")
    try:
        queries = [tuple(int(v) for v in q.split(",")) for q in args.queries.split()] if args.queries else None
    except ValueError:
        raise UserError(f"--queries {args.queries!r}: give pixels as 'row,col row,col ...'") from None
    if queries and any(len(q) != 2 for q in queries):
        raise UserError(f"--queries {args.queries!r}: each point is row,col")
    if not args.overwrite:                              # fail now, not after scoring
        refuse_existing(existing_outputs(args))

    rows, data, data_path, idx, refs, sagittals = [], None, None, None, None, None
    subjects = args.subjects.split(",") if args.subjects else None
    for path in args.ckpt:
        model, ckpt = load_model(path, args.device)
        cfg = ckpt["config"]
        if data is None:
            data_path = args.data or cfg["data"]
            data = load_prepared(data_path)
            if args.split == "val" and not data.has("val"):
                raise UserError(f"{data_path} has no validation split (data/prepare.py --split FILE with a \"val\" "
                                f"list makes one); drop --split val to score its test split")
            if not data.has(args.split) and not args.volumes:
                raise UserError(f"{data_path} has no test slices (its split lists no test subject); pass --data "
                                f"with a prepared dataset that has one (the same slice size and spacing)")
            if args.data and os.path.abspath(args.data) != os.path.abspath(cfg["data"]):
                print(f"scoring on {args.data}, not on the training data {cfg['data']}: its {args.split} split "
                      f"({len(data.meta[args.split + '_subjects'])} subjects)", flush=True)
        if args.volumes:
            res = evaluate_volumes(model, cfg, data, args)
            if args.json:
                write_text(args.json, json.dumps({"ckpt": path, "step": ckpt["step"], "src": args.volumes, **res},
                                                 indent=2))
            return res
        if not data.paired:
            raise UserError(f"{data_path} is not paired (meta.json: paired=false; e.g. IXI, whose T1w and T2w "
                            f"are not co-registered), so translated slices have no pixel-aligned ground truth "
                            f"and SSIM/PSNR/MAE would be meaningless; evaluate on a paired dataset")
        differ = data_mismatch(cfg, data)
        if differ:
            raise UserError(f"{data_path} differs from the data the checkpoint {path} was trained on: {differ}; "
                            f"prepare it again with data/prepare.py --size {cfg['size'][0]}x{cfg['size'][1]}"
                            + (f" --spacing {train_spacing(cfg):g}" if train_spacing(cfg) else "") + " to score it")
        print(f"checkpoint {path}: epoch {ckpt['epoch']}, step {ckpt['step']}, attn={cfg['attn']} "
              f"sn={cfg['sn']} charbonnier={cfg['charbonnier']} width={cfg['width']} channels={cfg['channels']}"
              + (f" context={cfg['context']}" if cfg["context"] else ""),
              flush=True)
        refs = refs or reference_scores(data, args.limit, args.split, args.match_level)   # the same for every checkpoint
        res, stacks = evaluate(model, data, args.device, cfg["channels"], args.batch_size, args.limit, refs,
                               args.split, cfg["context"], args.match_level)
        rows.append({"ckpt": path, "epoch": ckpt["epoch"], "step": ckpt["step"], "config": cfg, "res": res,
                     "slices": stacks.pop("slices"), "subjects": stacks.pop("subjects")})
        if idx is None and (args.figure or args.attention_maps):
            idx = figure_slices(data, res["n"], subjects, split=args.split)
        if args.figure:   # keep only the figure's slices of each checkpoint's translations, and sagittal planes
            rows[-1]["figure"] = {k: {i: stacks[k][i] for i in idx} for k in ("fake_t1", "fake_t2")}
            plane = sagittal_planes(data, args.split, res["n"], idx)
            rows[-1]["sagittal"] = {k: plane(stacks[k]) for k in ("fake_t1", "fake_t2")}
            real = {q: plane(stacks[q]) for q in ("t1", "t2")}
            sagittals = {sid: {q: real[q][sid] for q in real} for sid in real["t1"]}
        if args.spectra:
            rows[-1]["spectra"] = {"T1": mean_spectrum(stacks["fake_t1"]), "T2": mean_spectrum(stacks["fake_t2"])}
        if args.attention_maps:
            draw_attention_maps(args.attention_maps, model, cfg, data, idx[0], queries, args.device, args.split)
        del model
    n = rows[0]["res"]["n"]
    subjects = list(data.meta["slice_subject"][args.split][:n])
    for r in rows[1:]:   # paired: the same test slices, each checkpoint's score minus the first's
        r["diff"] = {c: {k: t_interval(r["subjects"][c][k] - rows[0]["subjects"][c][k]) for k in r["subjects"][c]}
                     for c in ("T1", "T2")}
    print(f"{args.split} split of {data_path}: {n} slices of {data.shape[0]}x{data.shape[1]} from {len(set(subjects))} "
          f"subjects; T1 = T2w->T1w vs real T1w, T2 = T1w->T2w vs real T2w")
    if data.meta["source"] == "phantom" and "oracle" not in rows[0]["res"]:
        print(f"note: {data_path} was prepared before the phantom stored its noiseless test targets, so there is "
              f"no oracle row; prepare it again (data/prepare.py phantom ... --overwrite) to see it")
    if args.match_level:
        lv = rows[0]["res"]["levels"]
        print(f"--match-level: every translation (and the rows 'level matched') has each volume's brain level moved to "
              f"the training split's mean, T1w {lv['T1']:.3f}, T2w {lv['T2']:.3f}")
    cols = columns(data)
    for r in rows:                    # each against the strongest reference row of every brain metric
        r["versus"] = versus_references(r["subjects"], r["res"])
    print(table(rows[0]["res"], cols, rows[0]["subjects"]) if len(rows) == 1 else compare_table(rows, subjects, cols))
    if background_note(rows[0]["res"]):
        print(background_note(rows[0]["res"]))
    if args.figure:
        draw_figure(args.figure, rows, stacks, idx, data.meta["slice_subject"][args.split][:n], sagittals)
    if args.spectra:
        draw_spectra(args.spectra, rows, stacks)
    if args.json:
        # per test subject (in the order of "subject_ids"): every metric of each checkpoint, for analyses of one's own
        per_subject = lambda r: {c: {k: [None if np.isnan(x) else float(x) for x in v] for k, v in r["subjects"][c].items()}
                                 for c in ("T1", "T2")}
        plain = lambda r: {**{k: v for k, v in r.items() if k not in ("slices", "subjects", "figure", "spectra")},
                           "per_subject": per_subject(r)}
        ids = sorted(set(subjects))                          # np.unique's order, as subject_scores()
        if len(rows) == 1:   # one checkpoint: the flat format of earlier versions
            r = rows[0]
            write_text(args.json, json.dumps({"ckpt": r["ckpt"], "epoch": r["epoch"], "step": r["step"],
                                              "data": data_path, "config": r["config"], **r["res"],
                                              "subject_ids": ids, "per_subject": per_subject(r),
                                              "versus": r["versus"]}, indent=2))
        else:
            write_text(args.json, json.dumps({"data": data_path, "subjects": len(set(subjects)), "subject_ids": ids,
                                              "checkpoints": [plain(r) for r in rows]},
                                             indent=2))
    if args.csv:
        write_csv(args.csv, rows, cols)
    if args.save_images:
        shown = figure_slices(data, rows[0]["res"]["n"], subjects, k=16, split=args.split)   # most brain, 16 subjects
        save_images(args.save_images, shown, **stacks)
        print(f"images: {args.save_images}/test_*.png (real T1 | T1->T2 | real T2 | T2->T1; the slice with the most "
              f"brain of {len(shown)} test subjects, drawn with seed 0)")
    return rows[0]["res"] if len(rows) == 1 else rows


def existing_outputs(args):
    """The files that this evaluation would write and that exist already."""
    there = [f for f in (args.json, args.csv, args.figure, args.spectra) if f and os.path.lexists(f)]
    if args.save_images:
        there += sorted(glob.glob(os.path.join(args.save_images, "test_*.png")))
    if args.attention_maps:
        there += [f for f in (os.path.join(args.attention_maps, n) for n in
                              ("attention_t1_to_t2.png", "attention_t2_to_t1.png", "attention.json"))
                  if os.path.lexists(f)]
    if args.volumes and args.out:
        there += sorted(glob.glob(os.path.join(args.out, "*_t[12]_to_t[12].nii.gz")))
    return there


def write_csv(path, rows, cols=COLUMNS):
    """One line per checkpoint: variant, epoch, every mean, and for rows after the first the paired
    difference to the first with its interval (columns d_<metric>_<T1|T2>, _lo, _hi)."""
    import csv
    import io
    keys = [k for k, _ in cols if k in rows[0]["res"]["T1"]]
    head = ["ckpt", "model", "epoch"] + [f"{k}_{c}" for k in keys for c in ("T1", "T2")] + \
        [f"d_{k}_{c}{e}" for k in keys for c in ("T1", "T2") for e in ("", "_lo", "_hi")]
    with io.StringIO(newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for r in rows:
            means = [r["res"][c][k] for k in keys for c in ("T1", "T2")]
            diffs = [x for k in keys for c in ("T1", "T2") for x in r["diff"][c][k]] if "diff" in r else \
                [""] * (6 * len(keys))
            w.writerow([r["ckpt"], variants.label(r["config"]), r["epoch"]] + means + diffs)
        write_text(path, f.getvalue())


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # unit.data.DataError is one too; unit.io.WriteError (a failed write) exits with 1
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.status)
