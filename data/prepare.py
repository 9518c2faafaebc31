#!/usr/bin/env python
"""
Turn a dataset into a *prepared dataset* (see unit/data.py, data/README.md; NIfTI sources: unit/nifti.py):

    python data/prepare.py phantom --out data/phantom                 # built-in synthetic data
    python data/prepare.py hcp  /path/to/HCP  --out data/hcp --n-test 213
    python data/prepare.py brats /path/to/BraTS --out data/brats
    python data/prepare.py ixi  /path/to/IXI  --out data/ixi          # unpaired (not co-registered)
    python data/prepare.py ixi  /path/to/IXI  --out data/ixi --register   # paired: T2w registered to T1w
    python data/prepare.py folders /path/to/mine --out data/mine      # t1/ + t2/ NIfTI, or trainA/... PNG

NIfTI subjects are streamed one at a time (one subject in memory, output appended to disk), a
subject with a problem is skipped with a warning (--strict: stop instead), and the output folder
appears only when everything is written (an interrupted run leaves nothing behind).
"""

import argparse
import json
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # so `import unit` works

from unit import UserError  # noqa: E402
from unit.data import DataError, PreparedWriter, folder_mb, prepare_phantom  # noqa: E402
from unit.geometry import zooms  # noqa: E402
from unit.nifti import (EXPECTED_TREE, LAYOUT_MASK_RULE, MASK_RULES, PERCENTILES, REGISTRATION, find_subjects,  # noqa: E402
                        prepare_subject, read_png)
from unit.progress import Progress  # noqa: E402

ORIENTATION = ("volumes reoriented to canonical RAS+ (nibabel); axial slices; image rows run "
               "anterior (top) -> posterior, columns patient's left -> right (neurological "
               "convention); a subject's slices are stored inferior -> superior")


def parse_size(s):
    try:
        h, w = (int(v) for v in s.lower().split("x"))
        assert h > 0 and w > 0
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"--size must look like 304x256, got {s!r}") from None
    return (h, w)


def parse_slices(s):
    if s == "all":
        return "all"
    try:
        k = int(s)
        assert k > 0
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"--slices must be a positive integer or 'all', got {s!r}") from None
    return k


def build_parser():
    p = argparse.ArgumentParser(
        description="Prepare T1w/T2w data as train/test slice arrays (see data/README.md).")
    p.add_argument("layout", choices=("phantom",) + tuple(EXPECTED_TREE),
                   help="source layout: phantom (built in, no SRC), hcp, brats, ixi, folders")
    p.add_argument("src", nargs="?", help="source folder (not for phantom)")
    p.add_argument("--out", required=True, help="output folder, e.g. data/hcp")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset at --out")
    p.add_argument("--strict", action="store_true", help="stop at the first bad subject instead of skipping it")
    p.add_argument("--seed", type=int, default=0, help="seed of the subject split (phantom: of the subjects); default 0")
    p.add_argument("--size", type=parse_size, default=(304, 256), help="slice size HxW after crop/pad; default 304x256")
    p.add_argument("--slices", type=parse_slices, default=1,
                   help="central slices with brain per subject, or 'all'; default 1")
    p.add_argument("--n-test", type=int, default=None,
                   help="test subjects (phantom default 213; else --test-fraction decides)")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="fraction of subjects for test (default 0.2 when --n-test is not given)")
    p.add_argument("--n-train", type=int, default=None, help="phantom only: train subjects (default 900)")
    p.add_argument("--split", metavar="FILE", help='JSON file {"train": [ids], "val": [ids], "test": [ids]} naming '
                   'the subjects of each split ("val" is optional: a validation split, on which train.py evaluates '
                   'and choices are made; any list may be empty; subjects in none are left out); default: a seeded '
                   'random train/test split by --n-test / --test-fraction')
    p.add_argument("--hcp-space", choices=("acpc", "mni"), default="acpc",
                   help="hcp: T1w/*_acpc_dc_restore_brain (native 0.7 mm, default) or MNINonLinear/*_restore_brain")
    p.add_argument("--percentiles", type=float, nargs=2, default=PERCENTILES, metavar=("LO", "HI"),
                   help="normalisation: brain-voxel percentiles mapped to 0 and 1; default %s %s" % PERCENTILES)
    p.add_argument("--spacing", type=float, metavar="MM", help="resample every volume in-plane to MM x MM before "
                   "cropping (bilinear; through-plane untouched); default: keep each source's spacing")
    p.add_argument("--register", action="store_true", help="ixi: register each T2w to its T1w (affine, Mattes mutual "
                   "information, SimpleITK: pip install SimpleITK) so that the dataset is paired")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def read_split(path, subjects, src):
    """{"train": [ids], "val": [ids], "test": [ids]} from a --split JSON file ("val" optional: [] when absent),
    checked against the subjects of SRC: DataError for an unreadable file, another shape, an id not in SRC, an
    id listed twice or in two lists, or no id at all."""
    try:
        split = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"--split {path} does not exist; give a JSON file {{\"train\": [ids], \"test\": [ids]}}.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"--split {path} cannot be read as JSON ({e}); fix the file.") from None
    if not (isinstance(split, dict) and {"train", "test"} <= set(split) <= {"train", "val", "test"} and
            all(isinstance(v, list) and all(isinstance(i, str) for i in v) for v in split.values())):
        raise DataError(f"--split {path} must hold {{\"train\": [ids], \"test\": [ids]}} and optionally \"val\": "
                        f"[ids], with subject ids as strings (any list may be empty).")
    split = {"train": split["train"], "val": split.get("val", []), "test": split["test"]}
    known = {s.id for s in subjects}
    unknown = [i for k in split for i in split[k] if i not in known]
    if unknown:
        raise DataError(f"--split {path}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a subject "
                        f"of {src} (it has {', '.join(sorted(known)[:3])}, ...); fix the ids.")
    both = sorted({i for a in split for b in split if a < b for i in set(split[a]) & set(split[b])})
    twice = sorted({i for k in split for i in split[k] if split[k].count(i) > 1})
    if both or twice:
        raise DataError(f"--split {path}: {', '.join(both or twice)} "
                        f"{'in two splits' if both else 'listed twice'}; list each subject once.")
    if not any(split.values()):
        raise DataError(f"--split {path} lists no subject; name at least one train, val or test subject.")
    return split


def _rel(path, src):
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(Path(src).resolve()))
    except ValueError:
        return str(path)


def _summary(found, used, skipped):
    val = f" / {used['val']} val" if used.get("val") else ""
    lines = [f"subjects: {found} found, {sum(used.values())} used "
             f"({used['train']} train{val} / {used['test']} test), {len(skipped)} skipped"]
    for sid, why in skipped.items():
        lines.append(f"  skipped {sid}: {why}")
    return lines


def prepare_volumes(args, created_by):
    """hcp, brats, ixi and folders (NIfTI): split subjects, stream them into a PreparedWriter."""
    layout, src = args.layout, Path(args.src)
    subjects = find_subjects(layout, src, hcp_space=args.hcp_space)
    n = len(subjects)
    given = read_split(args.split, subjects, src) if args.split else None
    if given:
        if args.n_test is not None or args.test_fraction is not None:
            raise DataError(f"--split {args.split} names the test subjects; drop --n-test / --test-fraction.")
        by_id = {s.id: s for s in subjects}
        order = [by_id[i] for i in given["test"] + given["val"] + given["train"]]
        n_test = len(given["test"])
    elif args.n_test is not None:
        n_test = args.n_test
    else:
        f = 0.2 if args.test_fraction is None else args.test_fraction
        if not 0 < f < 1:
            raise DataError(f"--test-fraction must be between 0 and 1, got {f}.")
        n_test = max(1, int(round(f * n)))
    if not given and not 1 <= n_test < n:
        raise DataError(f"--n-test {n_test} leaves no train or no test subjects: {src} has {n} "
                        f"{layout} subjects; choose 1 <= --n-test < {n}.")
    if not given:   # subjects in a seeded random order; the first n_test usable ones form the test split
        order = [subjects[i] for i in np.random.default_rng(args.seed).permutation(n)]
    paired = layout != "ixi" or args.register
    pct = tuple(float(v) for v in args.percentiles)
    if not 0 <= pct[0] < pct[1] <= 100:
        raise DataError(f"--percentiles must satisfy 0 <= LO < HI <= 100, got {pct}.")
    used, skipped = {"train": 0, "val": 0, "test": 0}, {}
    volumes, per_volume, mask_sources = {}, {}, {}
    t0 = time.time()
    bar = Progress(n, f"{layout} subjects", enabled=not args.quiet)
    with PreparedWriter(args.out, args.size, paired=paired, masks=True, overwrite=args.overwrite) as w:
        for s in order:
            split = next(k for k in ("test", "val", "train") if k == "train" or s.id in given[k]) if given else \
                ("test" if used["test"] < n_test else "train")
            try:
                r = prepare_subject(s, size=args.size, slices=args.slices, percentiles=pct,
                                    resample_t2=(layout == "ixi"), mask_rule=LAYOUT_MASK_RULE[layout],
                                    spacing=args.spacing, register=args.register)
            except DataError as e:
                if args.strict:
                    raise DataError(f"subject {s.id}: {e} (--strict stops here; without it the "
                                    f"subject is skipped)") from None
                skipped[s.id] = str(e)
                bar.write(f"warning: skipping subject {s.id}: {e}")
                bar.update(note=f"{len(skipped)} skipped")
                continue
            w.add(split, s.id, r.t1, r.t2, r.mask)
            used[split] += 1
            per_volume[s.id] = {"t1": [round(v, 6) for v in r.t1_range],
                                "t2": [round(v, 6) for v in r.t2_range]}
            mask_sources[r.mask_source] = mask_sources.get(r.mask_source, 0) + 1
            spacing = [round(v, 4) for v in zooms(r.geometry.canonical_affine)]   # R, A, S voxel sizes (mm)
            volumes[s.id] = {"split": split, "t1": _rel(s.t1_path, src), "t2": _rel(s.t2_path, src),
                             "mask": _rel(s.mask_path, src), "mask_source": r.mask_source,
                             "source_spacing": spacing, **r.geometry.to_json()}
            if r.registration:
                volumes[s.id]["registration"] = r.registration
            bar.update()
        bar.close()
        wanted = [k for k in ("train", "val", "test") if (given[k] if given else k != "val")]   # may be empty
        if any(used[k] == 0 for k in wanted):
            raise DataError(f"only {used['train']} train, {used['val']} val and {used['test']} test subjects of {src} "
                            f"could be used ({len(skipped)} skipped, see the warnings above); fix them "
                            f"or {'change --split' if given else 'lower --n-test'}.")
        meta = {
            "source": layout, "layout": layout, "src": str(src.resolve()), "seed": args.seed,
            "created_by": created_by,
            "hcp_space": args.hcp_space if layout == "hcp" else None,
            "split": (f"by subject, as listed in {args.split}" if given else
                      f"by subject: {n} subjects shuffled with numpy default_rng(seed).permutation; "
                      f"the first {n_test} usable ones are test, the rest train"),
            "split_file": {"path": args.split, **given} if given else None,
            "slices_per_subject": args.slices,
            "orientation": ORIENTATION,
            "spacing": args.spacing,
            "normalization": {
                "method": "per volume: clip to the [LO, HI] percentiles of the mask voxels, then scale "
                          "to [0, 1]; inverse x * (hi - lo) + lo",
                "percentiles": list(pct),
                "per_volume": per_volume},
            "mask": {"counts": mask_sources,
                     "source": ("brainmask_fs.nii.gz of the subject" if layout == "hcp" else
                                "SRC/mask/NAME" if layout == "folders" else None),
                     "derived_rule": f"{LAYOUT_MASK_RULE[layout]}: {MASK_RULES[LAYOUT_MASK_RULE[layout]]}",
                     "brain_mask": LAYOUT_MASK_RULE[layout] == "nonzero" or set(mask_sources) == {"source"}},
            "volumes": volumes,
            "skipped": skipped,
        }
        if args.register:
            meta["registration"] = {"moving": "T2w", "fixed": "T1w", "method": REGISTRATION,
                                    "result": "volumes[id]['registration']: fixed_to_moving maps T1w world (RAS mm) "
                                              "points to T2w ones"}
        elif layout == "ixi":
            meta["unpaired_reason"] = (
                "IXI T1 and T2 are separate acquisitions and are not co-registered; T2 was only "
                "resampled onto the T1's canonical grid through the two affines (trilinear, no "
                "registration), so a T1 slice and its T2 slice show roughly, not exactly, the same "
                "anatomy and pixel-wise paired metrics would be meaningless; --register pairs them")
        path = w.finish(meta)
    inplane = sorted({tuple(v["source_spacing"][:2]) for v in volumes.values()})
    said = ", ".join(f"{a:g} x {b:g}" for a, b in inplane[:4]) + (" ..." if len(inplane) > 4 else "")
    note = (f"in-plane spacing: resampled to {args.spacing:g} x {args.spacing:g} mm (sources: {said} mm)"
            if args.spacing else f"in-plane spacing: kept as in the sources ({said} mm; --spacing MM resamples)")
    return path, _summary(n, used, skipped) + [note], w.counts(), t0


def center_crop_or_pad(img, size):
    H, W = size
    h, w = img.shape
    r0, c0 = (h - H) // 2, (w - W) // 2
    out = np.zeros((H, W), np.float32)
    rs, re_, cs, ce = max(r0, 0), min(r0 + H, h), max(c0, 0), min(c0 + W, w)
    out[rs - r0:re_ - r0, cs - c0:ce - c0] = img[rs:re_, cs:ce]
    return out


def prepare_png(args, created_by):
    """folders layout with PNG slices in trainA/trainB/testA/testB (A = T1, B = T2)."""
    src = Path(args.src)
    dirs = {d: src / d for d in ("trainA", "trainB", "testA", "testB")}
    for d, p in dirs.items():
        if not p.is_dir():
            raise DataError(f"{p} is missing; the PNG folders layout needs trainA, trainB, testA and "
                            f"testB (A = T1, B = T2), see data/README.md.")
    files = {d: sorted(f for f in p.iterdir() if f.suffix.lower() == ".png") for d, p in dirs.items()}
    for d, fs in files.items():
        if not fs:
            raise DataError(f"{dirs[d]} holds no .png files; add the slices or check the path.")
    stems = {d: [f.stem for f in fs] for d, fs in files.items()}
    paired = all(stems[f"{s}A"] == stems[f"{s}B"] for s in ("train", "test"))
    if args.n_test is not None or args.test_fraction is not None:
        print("note: PNG folders come split already (trainA/testA); --n-test/--test-fraction are ignored",
              file=sys.stderr)
    total = sum(len(v) for v in files.values()) // (2 if paired else 1)
    skipped = {}
    t0 = time.time()
    bar = Progress(total, "png slices", enabled=not args.quiet)
    with PreparedWriter(args.out, args.size, paired=paired, masks=False, overwrite=args.overwrite) as w:
        def bad(sid, e):
            if args.strict:
                raise DataError(f"{e} (--strict stops here; without it the slice is skipped)")
            skipped[sid] = str(e)
            bar.write(f"warning: skipping {sid}: {e}")

        for split in ("train", "test"):
            if paired:
                for fa, fb in zip(files[f"{split}A"], files[f"{split}B"]):
                    try:
                        a, b = read_png(fa), read_png(fb)
                        if a.shape != b.shape:
                            raise DataError(f"{fa} and {fb} have different sizes {a.shape} and {b.shape}; "
                                            f"paired slices must match.")
                    except DataError as e:
                        bad(f"{split}/{fa.stem}", e)
                        bar.update()
                        continue
                    w.add(split, fa.stem, center_crop_or_pad(a, args.size), center_crop_or_pad(b, args.size))
                    bar.update()
            else:
                for q, key in (("t1", "A"), ("t2", "B")):
                    for f in files[f"{split}{key}"]:
                        try:
                            img = center_crop_or_pad(read_png(f), args.size)
                        except DataError as e:
                            bad(f"{split}{key}/{f.stem}", e)
                            continue
                        w.add(split, f.stem, **{q: img})
                    bar.update(len(files[f"{split}{key}"]))
        bar.close()
        c = w.counts()
        if min(c.values()) == 0:
            raise DataError(f"no usable slices in at least one of {', '.join(str(p) for p in dirs.values())} "
                            f"(counts {c}); fix the images.")
        meta = {
            "source": "png", "layout": "folders", "src": str(src.resolve()), "seed": None,
            "created_by": created_by,
            "split": "given by the folders (trainA/trainB = train, testA/testB = test)",
            "orientation": "as stored in the PNG files (not checked); centre-cropped / zero-padded to --size",
            "normalization": {"method": "none per image: 8-bit values / 255, 16-bit / 65535"},
            "mask": None,
            "pairing": ("by file name: trainA/X.png <-> trainB/X.png" if paired else
                        "unpaired: file names in A and B differ"),
            "skipped": skipped,
        }
        if not paired:
            meta["unpaired_reason"] = ("the PNG file names in trainA/trainB (or testA/testB) differ, "
                                       "so there are no known T1/T2 pairs")
        path = w.finish(meta)
    found = sum(len(v) for v in files.values())
    lines = [f"slices: {found} PNG files found, {len(skipped)} skipped"] + \
            [f"  skipped {sid}: {why}" for sid, why in skipped.items()]
    return path, lines, c, t0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    args = build_parser().parse_args(argv)
    created_by = shlex.join(["python", "data/prepare.py"] + list(sys.argv[1:] if argv is None else argv))
    old = None
    try:
        old = signal.signal(signal.SIGTERM, _raise_interrupt)   # kill -> clean up like Ctrl-C
    except ValueError:
        pass   # not the main thread
    try:
        if args.spacing is not None and not args.spacing > 0:
            raise DataError(f"--spacing must be a positive number of mm, got {args.spacing}.")
        if args.split and (args.layout == "phantom" or (args.src and (Path(args.src) / "trainA").is_dir())):
            raise DataError("--split names subjects of a NIfTI source tree; the phantom (--n-train/--n-test) and "
                            "PNG folders (trainA/testA) are split already.")
        if args.register and args.layout != "ixi":
            raise DataError(f"--register is for the ixi layout (T1w and T2w acquired separately); the {args.layout} "
                            f"layout is co-registered already.")
        if args.layout == "phantom":
            if args.spacing is not None:
                raise DataError("--spacing is for NIfTI sources; the phantom is drawn at its --size.")
            if args.src is not None:
                raise DataError("the phantom layout takes no SRC folder; drop it "
                                "(python data/prepare.py phantom --out data/phantom).")
            if args.slices == "all" or args.test_fraction is not None:
                raise DataError("phantom takes --slices K (an integer) and --n-train/--n-test, "
                                "not --slices all or --test-fraction.")
            path = prepare_phantom(args.out, n_train=900 if args.n_train is None else args.n_train,
                                   n_test=213 if args.n_test is None else args.n_test,
                                   slices=args.slices, size=args.size, seed=args.seed,
                                   overwrite=args.overwrite, progress=not args.quiet,
                                   created_by=created_by)
            print(f"done: {path}")
            return 0
        if args.src is None:
            raise DataError(f"the {args.layout} layout needs a SRC folder: python data/prepare.py "
                            f"{args.layout} SRC --out {args.out}.")
        if args.n_train is not None:
            raise DataError("--n-train is for the phantom only; real data is split with --n-test or "
                            "--test-fraction.")
        src = Path(args.src)
        if args.layout == "folders" and not ((src / "t1").is_dir() or (src / "t2").is_dir()) \
                and (src / "trainA").is_dir():
            if args.spacing is not None:
                raise DataError("--spacing needs NIfTI volumes (their headers give the voxel size); PNG slices "
                                "have none.")
            path, lines, c, t0 = prepare_png(args, created_by)
        else:
            path, lines, c, t0 = prepare_volumes(args, created_by)
        H, W = args.size
        print("\n".join(lines), file=sys.stderr)
        val = f"val {c['val_t1']} T1 / {c['val_t2']} T2, " if "val_t1" in c else ""
        print(f"slices: train {c['train_t1']} T1 / {c['train_t2']} T2, {val}test {c['test_t1']} T1 / "
              f"{c['test_t2']} T2, each {H}x{W} float16", file=sys.stderr)
        print(f"wrote {path}: {folder_mb(path):.1f} MB in {time.time() - t0:.1f} s", file=sys.stderr)
        print(f"done: {path}")
        return 0
    except UserError as e:   # DataError; WriteError (disk full, read-only: the partial output is removed) is 1
        print(f"error: {e}", file=sys.stderr)
        return e.status
    except OSError as e:   # disk full, permissions, ...: the partial output is already removed
        print(f"error: {e} (while preparing {args.out}); check the paths, their permissions and the "
              f"free disk space.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: nothing was written to {args.out} (the partial output was removed).",
              file=sys.stderr)
        return 130
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
