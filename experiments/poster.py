"""The poster's study in one command: train its eight model variants (for each seed), then write its
two SSIM tables, with the fine-detail metrics and the spread over seeds, to OUT/poster.md.

    python experiments/poster.py                        # the poster: 1 seed (100 epochs on a GPU)
    python experiments/poster.py --seeds 3              # recommended: mean and spread over 3 seeds
    python experiments/poster.py --variants none,encoder-sn-cl --epochs 4 -- --data data/small --eval-every 0

It drives train.py and evaluate.py (as a user would, one run after another on one GPU); everything
after `--` goes to every train.py run. Without CUDA, train.py picks its CPU preset, so the study does too.
Each run lives in OUT/<variant>-seed<k>/ (OUT default runs/poster). Run it again after an interruption:
a run whose last checkpoint (ckpt_eNNN.pt of the final epoch) exists is skipped, one with only a
ckpt.pt is resumed from it (train.py --resume), any other is started.

The tables, at the poster's epochs scaled to the run length E (round(E * p) for p = 1%, 25%, 50%,
75%, 100%, at least 1: E = 100 gives the poster's 1, 25, 50, 75, 100):
  1. the eight variants at the 75% epoch (the poster's "after 75th epoch");
  2. the gray baseline and the poster's best model (attention in encoder + CL + SN) at every table epoch.
Each table is one `evaluate.py CKPT ... --json` call (all checkpoints on the same test slices), so the
paired differences to the gray baseline come with 95% t-intervals over test subjects; the
printed evaluate.py output is kept at the end of poster.md.
"""
import argparse
import json
import os
import sys
import time

from study import UserError, cell, dry_run, evaluate_all, train_all
from unit import variants as unit_variants
from unit.io import make_folder, write_text

# (the variant's key for --variants, the poster's label, train.py flags, the poster's SSIM T1, T2 at epoch 75
# on HCP at 304x256: a reference for the poster's configuration, not for other data). A run's folder is named
# by unit.variants.name of the config train.py resolves for it, the flags after `--` included (so
# `-- --gan-loss lsgan` gets folders of its own); with no such flags it is the key.
VARIANTS = [
    ("none-rgb", "Baseline (RGB)", ["--channels", "3"], 0.7563, 0.716),
    ("none", "Baseline (gray scale)", [], 0.7617, 0.7217),
    ("none-cl", "Baseline with Charbonnier loss (CL)", ["--charbonnier"], 0.7584, 0.7181),
    ("none-sn", "Baseline with Spectral Normalization (SN)", ["--sn"], 0.7108, 0.7402),
    ("generator", "Attention in generator", ["--attn", "generator"], 0.7166, 0.5743),
    ("generator-cl", "Attention in generator with CL", ["--attn", "generator", "--charbonnier"], 0.7134, 0.5256),
    ("generator-sn-cl", "Attention in generator with CL and SN", ["--attn", "generator", "--charbonnier", "--sn"],
     0.6722, 0.6678),
    ("encoder-sn-cl", "Attention in encoder with CL and SN", ["--attn", "encoder", "--charbonnier", "--sn"],
     0.7443, 0.6834),
]
BASELINE, BEST = "none", "encoder-sn-cl"
POSTER_EPOCHS = (1, 25, 50, 75, 100)
METRICS = [("ssim", "SSIM"), ("ssim_mask", "SSIM brain"), ("ms_ssim", "MS-SSIM"), ("gmsd", "GMSD")]


def table_epochs(epochs):
    """The poster's epochs (of 100) scaled to a run of `epochs`: (all table epochs, the 75% one)."""
    scale = lambda p: max(1, int(epochs * p / 100 + 0.5))
    return sorted({scale(p) for p in POSTER_EPOCHS}), scale(75)


def diff_cell(rows, base, c):
    """A variant's SSIM minus the gray baseline's, seed by seed (rows and base: their evaluate.py rows in
    seed order, the baseline's first in the evaluate.py call): for one seed evaluate.py's paired difference
    with its 95% t-interval over test subjects, for several the mean ± sd over seeds."""
    if rows is base:
        return "0 (reference)"
    if len(rows) == 1:
        d, lo, hi = rows[0]["diff"][c]["ssim"]
        return f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
    return cell([r["res"][c]["ssim"] - b["res"][c]["ssim"] for r, b in zip(rows, base)], "{:+.4f}")


def metric_cells(rows):
    return " | ".join(cell([r["res"][c][k] for r in rows]) for k, _ in METRICS for c in ("T1", "T2"))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                usage="%(prog)s [options] [-- train.py flags for every run]")
    p.add_argument("--seeds", type=int, default=1, help="seeds per variant (the poster: 1; 3 recommended)")
    p.add_argument("--epochs", type=int, help="epochs per run (default: train.py's, 100, or its CPU preset's)")
    p.add_argument("--out", default="runs/poster", help="folder of the runs and of poster.md")
    p.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                   help="comma-separated subset of: " + ", ".join(v[0] for v in VARIANTS))
    args = p.parse_args(argv)
    known = {v[0]: v for v in VARIANTS}
    chosen = [s.strip() for s in args.variants.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in known]
    if unknown or not chosen:
        raise UserError(f"--variants {args.variants}: unknown {unknown}; choose from {', '.join(known)}")
    if args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {args.seeds}")
    if any(a in ("--out", "--seed", "--epochs", "--save-epochs", "--resume") for a in extra):
        raise UserError("--out, --seed, --epochs, --save-epochs and --resume are the study's to set; pass "
                        "--out, --seeds and --epochs before `--`")
    variants = [v for v in VARIANTS if v[0] in chosen]

    # each variant's config, and so the run length, asked of train.py itself, so its defaults (and CPU preset)
    # stay in one place; length, data and device are the same for every variant
    length = ["--epochs", str(args.epochs)] if args.epochs else []
    planned = {name: dry_run([*flags, *extra, *length]) for name, _, flags, _, _ in variants}
    cfg = next(iter(planned.values()))
    epochs = cfg["epochs"]
    t_epochs, t1_epoch = table_epochs(epochs)
    save = ",".join(str(e) for e in t_epochs)
    runs = [(name, seed, flags, os.path.join(args.out, f"{unit_variants.name(planned[name])}-seed{seed}"))
            for name, _, flags, _, _ in variants for seed in range(args.seeds)]
    ck = lambda folder, e: os.path.join(folder, f"ckpt_e{e:03d}.pt")
    print(f"study: {len(variants)} variants x {args.seeds} seed(s), {epochs} epochs each (checkpoints at epochs "
          f"{save}), data {cfg['data'] or 'the built-in phantom ' + str(cfg['size'])}, device {cfg['device']}; "
          f"runs in {args.out}/", flush=True)
    make_folder(args.out)
    t0 = time.time()
    train_all([(f"{name} seed {seed}", folder, [*flags, "--seed", str(seed), "--out", folder, "--epochs", str(epochs),
                                                 "--save-epochs", save, *extra])
               for name, seed, flags, folder in runs], lambda folder: ck(folder, epochs),
              planned={folder: planned[name] for name, _, _, folder in runs})
    minutes = (time.time() - t0) / 60

    # table 1: the gray baseline first (the reference of the paired differences), then the poster's order
    ordered = sorted(runs, key=lambda r: r[0] != BASELINE)
    res1, _, text1 = evaluate_all([ck(f, t1_epoch) for _, _, _, f in ordered],
                               os.path.join(args.out, "table1.json"))
    any_row = next(iter(res1.values()))
    oracle = any_row["res"].get("oracle")
    head = " | ".join(f"{n} T1 | {n} T2" for _, n in METRICS)
    lines = [f"# The poster's tables, reproduced by `python experiments/poster.py {' '.join(sys.argv[1:])}`", "",
             f"{len(variants)} variants x {args.seeds} seed(s), {epochs} epochs each; train.py settings of the "
             f"first run: `{json.dumps({k: v for k, v in any_row['config'].items() if k != 'out'})}`; "
             f"{any_row['res']['n']} test slices. Training took {minutes:.1f} min in this call (0 when every run was "
             f"already done). Cells are means{' ± sample sd over seeds' if args.seeds > 1 else ''}; "
             f"the 'poster' columns are the poster's epoch-75 numbers on HCP at 304x256, width 64, 100 epochs: a "
             f"reference for that configuration only. GMSD: lower is better.", "",
             f"## Table 1: the variants at epoch {t1_epoch} of {epochs} (the poster's epoch 75 of 100)", "",
             f"| model | poster SSIM T1 | poster SSIM T2 | {head} | SSIM T1 - gray baseline | SSIM T2 - gray baseline |",
             "|---" * (5 + 2 * len(METRICS)) + "|"]
    by_variant = {name: [res1[ck(f, t1_epoch)] for n, _, _, f in runs if n == name] for name, *_ in variants}
    base = by_variant.get(BASELINE)
    for name, label, _, p1, p2 in variants:
        rows = by_variant[name]
        diffs = [diff_cell(rows, base, c) if base else "" for c in ("T1", "T2")]
        lines.append(f"| {label} | {p1} | {p2} | {metric_cells(rows)} | {diffs[0]} | {diffs[1]} |")
    if oracle:
        lines.append("| oracle (noiseless target) | | | " + " | ".join(
            f"{oracle[c][k]:.4f}" for k, _ in METRICS for c in ("T1", "T2")) + " | | |")
    lines += ["", "Differences to the gray baseline: paired over the same test slices, " +
              ("[95% t-interval over test subjects]." if args.seeds == 1 else
               "mean ± sd over seeds of each seed's difference to the baseline of the same seed.")]

    # table 2: the baseline and the best model at every table epoch
    texts = [text1]
    pair = [v for v in variants if v[0] in (BASELINE, BEST)]
    if pair:
        ckpts = [ck(f, e) for name, _, _, _, _ in pair for n, _, _, f in runs if n == name for e in t_epochs]
        res2, _, text2 = evaluate_all(ckpts, os.path.join(args.out, "table2.json"))
        texts.append(text2)
        lines += ["", f"## Table 2: {' and '.join(v[1] for v in pair)} over epochs {save} of {epochs} (the poster's "
                      f"1, 25, 50, 75, 100)", "", f"| model | epoch | {head} |", "|---" * (2 + 2 * len(METRICS)) + "|"]
        for name, label, _, _, _ in pair:
            for e in t_epochs:
                rows = [res2[ck(f, e)] for n, _, _, f in runs if n == name]
                lines.append(f"| {label} | {e} | {metric_cells(rows)} |")
    lines += ["", "## evaluate.py's output (every checkpoint; paired differences to the first row)", ""]
    lines += ["```", *(t.strip() for t in texts), "```", ""]
    path = os.path.join(args.out, "poster.md")
    write_text(path, "\n".join(lines))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    try:
        main()
    except UserError as e:   # unit.io.WriteError (a failed write) exits with 1
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.status)
