"""The real-data benchmark in one command: BraTS 2018 patients prepared at 2 mm with the committed split
(experiments/realmri-split.json: 20 train, 4 validation, 6 test), train.py run for each seed, and one markdown
table of the test patients' scores (or, --score val, the validation patients', where choices are made), brain
first, reference rows first, with 95% t-intervals over patients, to OUT/realmri.md.

    python experiments/realmri.py /path/to/BraTS2018/training           # the CPU preset (or the GPU's
                                                                         # defaults), seeds 0 and 1
    python experiments/realmri.py SRC --name lr1e-4 -- --lr 1e-4         # another variant: flags after --
                                                                         # go to train.py; the table holds
                                                                         # every variant of OUT

SRC is a BraTS 2018 training folder (<case>/<case>_t1.nii.gz, <case>_t2.nii.gz) holding the 30 cases of
the split; data/prepare.py writes them once to OUT/data (--spacing 2 --size 112x96 --slices all). Each
run lives in OUT/<name>-seed<k>/ and is a plain `python train.py --data OUT/data --seed k --out ...
[flags]`; calling the benchmark again skips finished runs, resumes interrupted ones (train.py --resume)
and re-scores everything: one evaluate.py call over the last checkpoint of every run in OUT, so all are
scored on the same slices. A variant's flags are kept in OUT/<name>.json: a later call that gives the
same name other flags is refused, so no run is taken for another variant's.

Scores are means over test patients (each patient pools the pixels of all its slices), "T1" = T2w->T1w
against the real T1w and "T2" = T1w->T2w against the real T2w; brain = the patient's nonzero (skull-
stripped) voxels. The identity row (each direction's input as its output) and the real targets'
checkerboard score give the scale. Wall time is each run's training time as train.py recorded it.
"""
import argparse
import json
import os
import sys
import time

import torch

from study import ROOT, UserError, dry_run, evaluate_all, load_checkpoint, run, train_all
from unit.evaluation import BRAIN_METRICS, t_interval
from unit.hardware import machine
from unit.io import make_folder, write_text

SPLIT = os.path.join(ROOT, "experiments", "realmri-split.json")
PREPARE = ["--spacing", "2", "--size", "112x96", "--slices", "all"]
# the table's columns: (evaluate.py's key, header, format)
COLUMNS_ALL = [("ssim_mask", "SSIM brain", "{:.3f}"), ("ssim_core", "SSIM core", "{:.3f}"),
               ("ssim3d_mask", "SSIM 3-D brain", "{:.3f}"), ("psnr_mask", "PSNR brain dB", "{:.2f}"),
               ("mae_mask", "MAE brain", "{:.3f}"), ("ssim", "SSIM", "{:.3f}"), ("ms_ssim", "MS-SSIM", "{:.3f}"),
               ("checker", "Checkerboard", "{:.4f}")]
# the reference rows (unit.evaluation.REFERENCES), first in the table: the rows a translator has to beat
REFERENCE_ROWS = [("identity", "identity (input as output)"), ("inverted", "inverted input (1 - x inside the brain)"),
                  ("lut", "intensity LUT (fit on the training split)"),
                  ("inverted_level", "inverted input, level matched"), ("lut_level", "intensity LUT, level matched")]


def prepare(src, data, split_file):
    """OUT/data from SRC, once; a folder prepared with other settings or another split is refused."""
    meta_path = os.path.join(data, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        with open(split_file) as f:
            split = json.load(f)
        given = meta.get("split_file") or {}
        lists = lambda d: [d.get(k) or [] for k in ("train", "val", "test")]
        if meta.get("spacing") != 2 or meta["shape"] != [112, 96] or lists(given) != lists(split):
            raise UserError(f"{data} was prepared with other settings or another split than {split_file}; remove it "
                            f"(or pass another --out) and run the benchmark again")
        print(f"data: {data} (prepared before)", flush=True)
        return
    run([sys.executable, "data/prepare.py", "brats", src, "--out", data, *PREPARE, "--split", split_file, "--strict",
         "--quiet"])


def variant_flags(out, name, flags, data):
    """The train.py flags of variant `name`, bound to it in OUT/<name>.json by its first call together with the
    config train.py resolves from them (its --dry-run: the CPU preset included), so that a later call with other
    flags, or after a change of the preset, is refused instead of mixing two variants' runs. Returns (the flags,
    that config)."""
    path = os.path.join(out, f"{name}.json")
    cfg = dry_run(["--data", data, *flags])
    cfg = {k: v for k, v in cfg.items() if k not in ("out", "seed", "data", "device")}
    if os.path.isfile(path):
        with open(path) as f:
            kept = json.load(f)
        differ = sorted(k for k in set(cfg) | set(kept.get("config", {})) if cfg.get(k) != kept.get("config", {}).get(k))
        if kept["flags"] != flags or differ:
            raise UserError(f"variant {name} of {out} was trained with the train.py flags {kept['flags'] or '(none)'}"
                            + (f" and other settings ({', '.join(differ)})" if differ else "") + f", not {flags or '(none)'}"
                            f"; give this one another --name")
        return kept["flags"], cfg
    make_folder(out)
    write_text(path, json.dumps({"name": name, "flags": flags, "config": cfg}, indent=1))
    return flags, cfg


def runs_of(out):
    """Every run of OUT with a checkpoint: {variant: [(seed, ckpt path)]}, variants in the order they were
    first trained, seeds in order."""
    variants = sorted((f[:-5] for f in os.listdir(out) if f.endswith(".json") and not f.startswith("table")),
                      key=lambda v: os.path.getmtime(os.path.join(out, v + ".json")))
    found = {}
    for v in variants:
        seeds = sorted(int(d.rsplit("-seed", 1)[1]) for d in os.listdir(out)
                       if d.startswith(v + "-seed") and d.rsplit("-seed", 1)[1].isdigit()
                       and os.path.isfile(os.path.join(out, d, "ckpt.pt")))
        if seeds:
            found[v] = [(s, os.path.join(out, f"{v}-seed{s}", "ckpt.pt")) for s in seeds]
    return found


def ci(value, lo_hi, fmt):
    return f"{fmt.format(value)} [{fmt.format(lo_hi[0])}, {fmt.format(lo_hi[1])}]"


def sd(values, fmt):
    m = sum(values) / len(values)
    return fmt.format((sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5).lstrip("+")


def write_table(out, found, res, text, figure, split_file, split="test", suffix=""):
    """OUT/realmri<suffix>.md (suffix "-val" for the validation split, "-level" for --match-level): the reference rows
    first (identity, inverted input, intensity LUT; with --match-level those two level matched as well), one row per
    run (means over patients, the brain SSIM with its 95% t-interval), per variant with several seeds its mean and,
    on a line of its own, the sd over seeds; then each run against the strongest reference row of every brain metric
    (paired over patients), and how it was made."""
    refs = next(iter(res.values()))["res"]
    columns = [col for col in COLUMNS_ALL if col[0] in refs["T1"]]     # 3-D SSIM: for subjects with whole volumes
    head = " | ".join(f"{n} T1 | {n} T2" for _, n, _ in columns)
    what = "Test split" if split == "test" else "Validation split (where variants are chosen; the test split reports)"
    lines = [f"# Real-data benchmark (`python experiments/realmri.py`){'' if split == 'test' else ', validation split'}",
             "", f"{what}: {refs['subjects']} patients ({refs['n']} slices of 112x96 at 2 mm; "
             f"{os.path.relpath(split_file, ROOT)}), scores = means over patients; [95% t-interval over patients]. "
             f"T1 = T2w->T1w vs the real T1w, T2 = T1w->T2w vs the real T2w; brain = the skull-stripped patient's "
             f"nonzero voxels; core = the brain eroded by 5 px (SSIM without the brain's outline)."
             + ("" if "levels" not in refs else
                f" **Level matched** (--match-level): every translated volume, and the rows 'level matched', shifted so "
                f"that its brain mean is the training split's mean brain level of the target contrast (T1w "
                f"{refs['levels']['T1']:.3f}, T2w {refs['levels']['T2']:.3f}; no pair used).")
             + f" Machine: {machine()}; torch {torch.__version__}.", "",
             f"| run | steps | wall time | {head} |", "|---" * (3 + 2 * len(columns)) + "|"]
    for name, label in REFERENCE_ROWS:
        if name in refs:
            lines.append(f"| {label} | | | " + " | ".join(fmt.format(refs[name][c][k]) for k, _, fmt in columns
                                                         for c in ("T1", "T2")) + " |")
    for v, runs in found.items():
        rows = [res[p] for _, p in runs]
        for (seed, path), r in zip(runs, rows):
            ck = load_checkpoint(path)
            sec = ck.get("seconds")
            minutes = "?" if sec is None else f"{sec:.0f} s" if sec < 60 else f"{sec / 60:.1f} min"
            cells = []
            for k, _, fmt in columns:
                for c in ("T1", "T2"):
                    cells.append(ci(r["res"][c][k], r["ci"][c][k], fmt) if k == "ssim_mask" else fmt.format(r["res"][c][k]))
            lines.append(f"| {v} seed {seed} | {r['step']} | {minutes} | " + " | ".join(cells) + " |")
        if len(rows) > 1:
            lines.append(f"| **{v}: mean over {len(rows)} seeds** | | | " + " | ".join(
                fmt.format(sum(r["res"][c][k] for r in rows) / len(rows)) for k, _, fmt in columns
                for c in ("T1", "T2")) + " |")
            lines.append(f"| {v}: sd over seeds | | | " + " | ".join(
                sd([r["res"][c][k] for r in rows], fmt) for k, _, fmt in columns for c in ("T1", "T2")) + " |")
    lines.append("| real targets | | | " + " | ".join(
        (fmt.format(refs["target"][c]) if k == "checker" else "") for k, _, fmt in columns for c in ("T1", "T2")) + " |")
    lines += ["", "Reference rows: no network. inverted input: 1 - input where it is nonzero (uses neither training "
                  "nor target); intensity LUT: E[target | input intensity] in 64 bins over the training split's brain "
                  "voxels. Checkerboard: the share of an image's spectral energy at the Nyquist frequency (period-2 "
                  "artefacts); the identity row's is each direction's input's. Wall time: training as train.py "
                  "recorded it (evaluation during training included)."]
    keys = [k for k in BRAIN_METRICS if k in refs["T1"]]
    names = [n for k, n, _ in columns if k in keys]
    lines += ["", "Each run against the strongest reference row of each brain metric: the paired difference over "
                  "patients as 'better' (for MAE reference minus run), [95% t-interval]; a run beats the baselines "
                  "where every interval lies above 0.", "", "| run | | " + " | ".join(names) + " |",
              "|---" * (2 + len(names)) + "|"]
    fmts = {k: f for k, _, f in columns}
    for v, runs in found.items():
        for seed, path in runs:
            vs = res[path]["versus"]
            for c in ("T1", "T2"):
                lines.append(f"| {v} seed {seed} | {c} | " + " | ".join(
                    f"{ci(vs[c][k][1], vs[c][k][2:], fmts[k])} vs {vs[c][k][0]}" for k in keys) + " |")
    if figure:
        lines += ["", f"![translations of {split} patients]({os.path.basename(figure)})", "",
                  "Figure: input | translation of each variant's seed-0 run (SSIM on it) | real target, and the "
                  "absolute error under each translation (0-0.25). BraTS 2018 data: Menze et al., IEEE TMI 2015; "
                  "Bakas et al., Nature Scientific Data 2017."]
    lines += ["", "## evaluate.py's output", "", "```", text.strip(), "```", ""]
    path = os.path.join(out, f"realmri{suffix}.md")
    write_text(path, "\n".join(lines))
    return path


def intervals(rows):
    """For each checkpoint row of evaluate.py's JSON: "ci", the 95% t-interval of each metric's mean over
    patients, from the per-patient scores evaluate.py --json keeps."""
    import numpy as np
    for r in rows:
        r["ci"] = {c: {k: t_interval(np.array([np.nan if x is None else x for x in v], dtype=float))[1:]
                       for k, v in r["per_subject"][c].items()} for c in ("T1", "T2")}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                usage="%(prog)s SRC [options] [-- train.py flags of this variant]")
    p.add_argument("src", metavar="SRC", help="BraTS 2018 training folder with the cases of experiments/realmri-split.json")
    p.add_argument("--out", default="runs/realmri", help="folder of the prepared data, the runs and realmri.md")
    p.add_argument("--name", default="default", help="this variant's name (its runs: OUT/NAME-seedK)")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0 .. N-1 (default 2)")
    p.add_argument("--score", default="test", choices=("test", "val"), help="the split the table scores: test (the "
                   "report) or val (the validation patients, where variants and settings are chosen)")
    p.add_argument("--match-level", action="store_true", help="score with evaluate.py --match-level (each translated "
                   "volume's brain level moved to the training targets' mean; the reference rows also so) into "
                   "OUT/realmri-level.md (realmri-val-level.md with --score val)")
    p.add_argument("--split", default=SPLIT, help="the subjects of each split (default: the committed "
                                                  "experiments/realmri-split.json)")
    p.add_argument("--figure-subjects", help="test patients shown in OUT/realmri.png, comma-separated (default: 3 "
                                              "drawn with seed 0; the slice with the most brain of each)")
    args = p.parse_args(argv)
    if any(a in ("--data", "--out", "--seed", "--resume") for a in extra):
        raise UserError("--data, --out, --seed and --resume are the benchmark's to set; pass --out and --seeds "
                        "before `--`")
    if args.seeds < 1 or not args.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UserError(f"--seeds must be at least 1 and --name letters, digits, '-', '_' or '.' (got {args.seeds}, "
                        f"{args.name!r})")
    data = os.path.join(args.out, "data")
    prepare(args.src, data, args.split)
    flags, planned = variant_flags(args.out, args.name, extra, data)
    t0 = time.time()
    runs = [(f"{args.name} seed {s}", os.path.join(args.out, f"{args.name}-seed{s}"),
             ["--data", data, "--seed", str(s), "--out", os.path.join(args.out, f"{args.name}-seed{s}"), *flags])
            for s in range(args.seeds)]
    train_all(runs, lambda folder: None, planned={folder: planned for _, folder, _ in runs})
    print(f"training: {(time.time() - t0) / 60:.1f} min in this call", flush=True)

    found = runs_of(args.out)
    ckpts = [pth for runs_ in found.values() for _, pth in runs_]
    seed0 = [runs_[0][1] for runs_ in found.values()]
    suffix = ("" if args.score == "test" else "-val") + ("-level" if args.match_level else "")
    level = ["--match-level"] if args.match_level else []
    figure = os.path.join(args.out, f"realmri{suffix}.png")
    res, _, text = evaluate_all(ckpts, os.path.join(args.out, f"table{suffix}.json"), ["--split", args.score, *level])
    intervals(res.values())
    run([sys.executable, "evaluate.py", *seed0, "--figure", figure, "--overwrite", "--split", args.score, *level] +
        (["--subjects", args.figure_subjects] if args.figure_subjects else []), log=True)
    path = write_table(args.out, found, res, text, figure, args.split, args.score, suffix)
    print(f"wrote {path} and {figure}")
    return path


if __name__ == "__main__":
    try:
        main()
    except UserError as e:   # unit.io.WriteError (a failed write) exits with 1
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.status)
