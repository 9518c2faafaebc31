"""
The prepared-slice dataset: the format data/prepare.py writes and train.py / evaluate.py read.

A *prepared dataset* is a folder written by data/prepare.py:

    train_t1.npy  train_t2.npy  test_t1.npy  test_t2.npy   (N, H, W) float16, values in [0, 1]
    train_mask.npy  test_mask.npy                          (N, H, W) uint8, optional
    val_t1.npy  val_t2.npy  val_mask.npy                   optional: a validation split (choices are made
                                                           on it; the test split only reports)
    test_t1_clean.npy  test_t2_clean.npy                   (N, H, W) float16, optional: noiseless
                                                           test targets (the phantom), see below
    meta.json                                              what it is, where every slice came from

Domain A = T1, domain B = T2. When meta["paired"] is true, slice i of *_t1 and slice i of *_t2
are the same anatomy. Splits are by subject; meta["slice_subject"][split][i] names the subject
of slice i.

The phantom's targets carry Rician noise, so no translator can reach SSIM 1 on them. Its prepared
datasets also store the *noiseless* test images on the same intensity scale (meta["clean"]);
evaluate.py scores them against the noisy targets as an "oracle" row: the best a translator could
do on this data, beside each model's score.

Writing streams: one subject in memory at a time, output arrays appended to disk in a temporary
folder that is renamed at the end. NIfTI source trees are read by unit/nifti.py; where a slice
sits in its source volume (and the way back) is unit/geometry.py.
"""
import json
import os
import re
import shlex
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import unit.io
from unit import UserError
from unit.progress import Progress

FILES = ("train_t1.npy", "train_t2.npy", "test_t1.npy", "test_t2.npy", "meta.json")
MASK_FILES = ("train_mask.npy", "test_mask.npy")
VAL_FILES = ("val_t1.npy", "val_t2.npy")                  # with val_mask.npy when the dataset has masks
SPLITS = ("train", "val", "test")
CLEAN_FILES = ("test_t1_clean.npy", "test_t2_clean.npy")
META_KEYS = ("source", "layout", "paired", "shape", "n_train", "n_test", "train_subjects",
             "test_subjects", "slice_subject", "normalization", "seed", "created_by", "version")
VERSION = 1
LAYOUTS = ("phantom", "hcp", "brats", "ixi", "folders")


class DataError(UserError):
    """A user-fixable problem with a dataset: the message is one clear sentence naming the file
    and what to do."""


def _prepare_hint(path):
    return (f"create it with `python data/prepare.py phantom --out {path}` "
            f"(or another layout, see data/README.md)")


# ----------------------------------------------------------------------------------------
# reading a prepared dataset


@dataclass
class Prepared:
    path: str
    meta: dict
    train_t1: np.ndarray          # (N, H, W) float16 in [0, 1], memory-mapped
    train_t2: np.ndarray
    test_t1: np.ndarray
    test_t2: np.ndarray
    train_mask: np.ndarray | None = None   # (N, H, W) uint8/bool, or None
    test_mask: np.ndarray | None = None
    test_t1_clean: np.ndarray | None = None   # (N_test, H, W) float16 noiseless targets, or None
    test_t2_clean: np.ndarray | None = None
    val_t1: np.ndarray | None = None          # the optional validation split, like train and test
    val_t2: np.ndarray | None = None
    val_mask: np.ndarray | None = None

    @property
    def paired(self) -> bool:
        return bool(self.meta["paired"])

    @property
    def shape(self) -> tuple:
        return tuple(int(v) for v in self.meta["shape"])

    def has(self, split) -> bool:
        """Whether the dataset has slices in split ('train', 'val', 'test')."""
        a = getattr(self, f"{split}_t1")
        return a is not None and len(a) > 0


def load_prepared(path) -> Prepared:
    """Memory-map a prepared dataset and check that it is complete and consistent.
    Raises DataError (one sentence: which file, what is wrong, what to do) otherwise."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"prepared dataset folder {p} does not exist; {_prepare_hint(p)}.")
    if not p.is_dir():
        raise DataError(f"{p} is a file, not a prepared dataset folder; point --data at the folder "
                        f"that data/prepare.py wrote.")
    redo = f"re-create it with data/prepare.py ... --out {p} --overwrite"
    for name in FILES:
        if not (p / name).is_file():
            raise DataError(f"{p / name} is missing, so {p} is not a complete prepared dataset; {redo}.")
    meta = _read_meta(p, redo)
    try:
        H, W = (int(v) for v in meta["shape"])
    except (TypeError, ValueError):
        raise DataError(f"{p / 'meta.json'} has shape {meta['shape']!r}, not [H, W]; {redo}.") from None

    def load(name, kinds):
        f = p / name
        try:
            a = np.load(f, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # truncated / not an .npy file
            raise DataError(f"{f} cannot be read as a .npy array ({type(e).__name__}: {e}); {redo}.") from None
        if a.dtype.kind not in kinds or a.ndim != 3 or a.shape[1:] != (H, W):
            raise DataError(f"{f} holds a {a.dtype} array of shape {a.shape}, expected "
                            f"{'float16' if 'f' in kinds else 'uint8/bool'} (N, {H}, {W}) as meta.json "
                            f"says; {redo}.")
        if "f" in kinds and a.dtype not in (np.float16, np.float32):
            raise DataError(f"{f} holds {a.dtype}, expected float16 (or float32); {redo}.")
        return a

    arrays = {n[:-4]: load(n, "f") for n in FILES[:4]}
    splits = ("train", "test")
    if any((p / n).is_file() for n in VAL_FILES) or meta.get("n_val"):
        for n in VAL_FILES:
            if not (p / n).is_file():
                raise DataError(f"{p / n} is missing, but {p} has a validation split; {redo}.")
        arrays.update({n[:-4]: load(n, "f") for n in VAL_FILES})
        splits = ("train", "val", "test")
    masks = {}
    for n in MASK_FILES + (("val_mask.npy",) if "val" in splits else ()):
        masks[n[:-4]] = load(n, "ub") if (p / n).is_file() else None
    clean = {n[:-4]: load(n, "f") if (p / n).is_file() else None for n in CLEAN_FILES}
    if (clean["test_t1_clean"] is None) != (clean["test_t2_clean"] is None):
        raise DataError(f"{p} has only one of {' and '.join(CLEAN_FILES)}; {redo}.")
    _check_counts(p, meta, splits, arrays, masks, clean, redo)
    return Prepared(str(p), meta, **arrays, **masks, **clean)


def _read_meta(p, redo):
    """meta.json of the prepared dataset in folder p, checked: a JSON object of this VERSION with every META_KEYS."""
    try:
        meta = json.loads((p / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{p / 'meta.json'} cannot be parsed ({e}); {redo}.") from None
    if not isinstance(meta, dict):
        raise DataError(f"{p / 'meta.json'} does not hold a JSON object; {redo}.")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise DataError(f"{p / 'meta.json'} lacks the keys {missing} (another program or version "
                        f"wrote it); {redo}.")
    if meta["version"] != VERSION:
        raise DataError(f"{p / 'meta.json'} has format version {meta['version']!r}, this code reads "
                        f"version {VERSION}; {redo}.")
    return meta


def _check_counts(p, meta, splits, arrays, masks, clean, redo):
    """Each split's arrays agree with each other and with meta.json: slice counts, one subject per slice, masks for
    all splits or none, the noiseless test targets beside the test split."""
    for split in splits:
        t1, t2 = arrays[f"{split}_t1"], arrays[f"{split}_t2"]
        n = meta.get(f"n_{split}")
        if t1.shape[0] != n:
            raise DataError(f"{p / f'{split}_t1.npy'} has {t1.shape[0]} slices but meta.json says "
                            f"n_{split} = {n}; {redo}.")
        if meta["paired"] and t2.shape[0] != t1.shape[0]:
            raise DataError(f"{p / f'{split}_t2.npy'} has {t2.shape[0]} slices but the paired "
                            f"{split}_t1.npy has {t1.shape[0]}; {redo}.")
        ss = meta["slice_subject"].get(split) if isinstance(meta["slice_subject"], dict) else None
        if not isinstance(ss, list) or len(ss) != t1.shape[0]:
            raise DataError(f"{p / 'meta.json'} slice_subject[{split!r}] does not list one subject per "
                            f"slice of {split}_t1.npy ({t1.shape[0]}); {redo}.")
        n2 = meta.get(f"n_{split}_t2", n)
        if not meta["paired"] and t2.shape[0] != n2:
            raise DataError(f"{p / f'{split}_t2.npy'} has {t2.shape[0]} slices but meta.json says "
                            f"{n2}; {redo}.")
        m = masks[f"{split}_mask"]
        if m is not None and m.shape[0] != t1.shape[0]:
            raise DataError(f"{p / f'{split}_mask.npy'} has {m.shape[0]} slices but {split}_t1.npy has "
                            f"{t1.shape[0]}; {redo}.")
    if "val" in splits and (masks["val_mask"] is None) != (masks["train_mask"] is None):
        raise DataError(f"{p} has masks for {'train' if masks['val_mask'] is None else 'val'} but not for "
                        f"{'val' if masks['val_mask'] is None else 'train'}; {redo}.")
    for n, c in clean.items():
        if c is not None and c.shape[0] != arrays["test_t1"].shape[0]:
            raise DataError(f"{p / (n + '.npy')} has {c.shape[0]} slices but test_t1.npy has "
                            f"{arrays['test_t1'].shape[0]}; {redo}.")


# ----------------------------------------------------------------------------------------
# writing a prepared dataset: append to .npy files in a temporary folder, rename at the end


class _NpyAppender:
    """An .npy file we append (k, *tail) blocks to. The header is written with a fixed length
    up front and rewritten with the final N at close, so nothing is ever held in memory."""

    def __init__(self, path, dtype, tail):
        self.path, self.dtype, self.tail, self.n = Path(path), np.dtype(dtype), tuple(tail), 0
        longest = len(self._dict(10 ** 15))
        self.total = -(-(10 + longest + 1) // 64) * 64      # magic+len+dict+'\n', 64-aligned
        self.f = unit.io.open_for_writing(self.path)
        self.f.write(self._header())

    def _dict(self, n):
        return "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (self.dtype.str, (n,) + self.tail)

    def _header(self):
        d = self._dict(self.n)
        body = d + " " * (self.total - 10 - len(d) - 1) + "\n"
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")

    def append(self, block):
        block = np.ascontiguousarray(block, dtype=self.dtype)
        assert block.shape[1:] == self.tail, (block.shape, self.tail)
        self.f.write(block.data)
        self.n += block.shape[0]

    def close(self):
        if self.f.closed:
            return
        self.f.seek(0)
        self.f.write(self._header())
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _meta_dumps(meta):
    """JSON with one key per line but short lists of numbers/strings kept on one line."""
    text = json.dumps(meta, indent=1)

    def one_line(m):   # raw newlines only occur between JSON tokens, never inside strings
        t = re.sub(r"\[\n\s*", "[", m.group(0))
        t = re.sub(r"\n\s*\]", "]", t)
        return re.sub(r",\n\s*", ", ", t)
    return re.sub(r"\[\n[^\[\]{}]*?\]", one_line, text) + "\n"


class PreparedWriter:
    """Streaming writer of a prepared dataset.

        with PreparedWriter("data/x", shape=(304, 256), masks=True) as w:
            w.add("train", "sub-01", t1, t2, mask)     # (S, H, W) each, values in [0, 1]; "val", "test"
            ...
            w.finish(meta)                             # writes meta.json, renames into place

    Writes go to a hidden temporary folder next to `out` (".NAME.partial-PID") that is renamed
    to `out` by finish(); on an exception or KeyboardInterrupt (also leaving the `with` block
    without finish()) the temporary folder is removed, so an interrupted run leaves nothing.
    An existing `out` is refused unless overwrite=True, and even then only if it looks like a
    prepared dataset (has meta.json) or is empty. A failed write (disk full, read-only) removes the
    temporary folder too and raises unit.io.WriteError; an existing `out` is then unchanged.
    paired=False allows different slice counts for T1 and T2 (e.g. unpaired PNG folders);
    add(t1=...) and add(t2=...) separately then.
    clean=True also stores noiseless test targets: add("test", ..., clean=(t1_clean, t2_clean))."""

    def __init__(self, out, shape, paired=True, masks=False, overwrite=False, clean=False):
        self.out = Path(out)
        self.shape = tuple(int(v) for v in shape)
        self.paired, self.masks, self.overwrite = bool(paired), bool(masks), bool(overwrite)
        self.clean = bool(clean)
        if self.clean and not self.paired:
            raise ValueError("PreparedWriter: noiseless targets (clean=True) need a paired dataset")
        _check_out(self.out, overwrite)
        parent = self.out.parent
        self.tmp = parent / f".{self.out.name}.partial-{os.getpid()}"
        self.finished, self.files = False, {}
        try:
            parent.mkdir(parents=True, exist_ok=True)
            for stale in parent.glob(f".{self.out.name}.partial-*"):   # left by a killed (-9) run
                pid = stale.name.rsplit("-", 1)[-1]
                if pid.isdigit() and not _pid_alive(int(pid)):
                    shutil.rmtree(stale, ignore_errors=True)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        except OSError as e:
            raise unit.io.failure(self.out, e, "nothing was written there") from None
        names = [n[:-4] for n in FILES[:4] + (MASK_FILES if self.masks else ()) +
                 (CLEAN_FILES if self.clean else ())]
        try:
            for n in names:
                dt = np.uint8 if n.endswith("mask") else np.float16
                self.files[n] = _NpyAppender(self.tmp / f"{n}.npy", dt, self.shape)
        except OSError as e:
            raise self._failed(e) from None
        except BaseException:
            self.abort()
            raise
        self.subjects = {"t1": {"train": [], "test": []}, "t2": {"train": [], "test": []}}   # "val": when added

    def __enter__(self):
        return self

    def _failed(self, e):
        """Remove the partial output; the WriteError for the OSError e, naming the output folder."""
        self.abort()
        before = "the dataset there before is unchanged" if self.out.exists() else "nothing was written there"
        return unit.io.failure(self.out, e, f"the partial output was removed and {before}")

    def __exit__(self, *exc):
        if not self.finished:
            self.abort()
        return False

    def _check(self, name, a, S=None):
        a = np.asarray(a)
        if a.ndim == 2:
            a = a[None]
        if a.ndim != 3 or a.shape[1:] != self.shape or (S is not None and a.shape[0] != S):
            raise ValueError(f"PreparedWriter: {name} has shape {a.shape}, expected (S, {self.shape[0]}, "
                             f"{self.shape[1]})" + (f" with S = {S}" if S is not None else ""))
        if not name.endswith("mask") and a.size:
            lo, hi = float(a.min()), float(a.max())
            if not (lo >= -1e-6 and hi <= 1 + 1e-6):     # also catches NaN
                raise ValueError(f"PreparedWriter: {name} has values in [{lo}, {hi}], expected [0, 1]")
        return a

    def add(self, split, subject, t1=None, t2=None, mask=None, clean=None):
        """Append the slices of one subject (S, H, W) (or one slice (H, W)) to `split`; clean =
        (t1, t2) noiseless targets, for the test split of a writer with clean=True."""
        if split not in SPLITS:
            raise ValueError(f"PreparedWriter.add: split must be 'train', 'val' or 'test', got {split!r}")
        if self.paired and (t1 is None or t2 is None):
            raise ValueError("PreparedWriter.add: a paired dataset needs t1 and t2 together")
        if self.masks and t1 is not None and mask is None:
            raise ValueError("PreparedWriter.add: this writer stores masks; pass mask with t1")
        if not self.masks and mask is not None:
            raise ValueError("PreparedWriter.add: created with masks=False but a mask was given")
        if (clean is not None) != (self.clean and split == "test"):
            raise ValueError("PreparedWriter.add: noiseless targets go with every test subject of a writer "
                             "created with clean=True, and nowhere else")
        if t1 is not None:
            t1 = self._check("t1", t1)
            if t2 is not None and self.paired:
                t2 = self._check("t2", t2, t1.shape[0])
            if mask is not None:
                mask = self._check("mask", mask, t1.shape[0])
            if clean is not None:
                clean = [self._check(f"{q}_clean", c, t1.shape[0]) for q, c in zip(("t1", "t2"), clean)]
        if t2 is not None:
            t2 = self._check("t2", t2)
        if mask is not None and t1 is None:
            raise ValueError("PreparedWriter.add: a mask belongs to t1 slices; pass t1 too")
        subject = str(subject)
        try:
            if split == "val" and "val_t1" not in self.files:      # the files of an optional split, on first use
                for n in ("val_t1", "val_t2") + (("val_mask",) if self.masks else ()):
                    dt = np.uint8 if n.endswith("mask") else np.float16
                    self.files[n] = _NpyAppender(self.tmp / f"{n}.npy", dt, self.shape)
                for q in ("t1", "t2"):
                    self.subjects[q]["val"] = []
            for q, a in (("t1", t1), ("t2", t2)):
                if a is None:
                    continue
                self.files[f"{split}_{q}"].append(a.astype(np.float16))
                self.subjects[q][split] += [subject] * a.shape[0]
            if mask is not None:
                self.files[f"{split}_mask"].append(np.asarray(mask).astype(np.uint8) != 0)
            for q, c in zip(("t1", "t2"), clean or ()):
                self.files[f"test_{q}_clean"].append(c.astype(np.float16))
        except OSError as e:
            raise self._failed(e) from None

    def counts(self):
        return {f"{s}_{q}": len(self.subjects[q][s]) for s in self.subjects["t1"] for q in ("t1", "t2")}

    def finish(self, meta) -> str:
        """Close the arrays, write meta.json (the caller's keys plus shape, paired, n_train,
        n_test, *_subjects, slice_subject, version; n_val and val_subjects with a validation split),
        move the folder into place; returns out."""
        c = self.counts()
        if self.paired and any(c[f"{s}_t1"] != c[f"{s}_t2"] for s in self.subjects["t1"]):
            raise ValueError(f"PreparedWriter.finish: paired dataset with unequal counts {c}")
        try:
            for f in self.files.values():
                f.close()
        except OSError as e:
            raise self._failed(e) from None
        m = {"source": None, "layout": None, "normalization": None, "seed": None,
             "created_by": shlex.join([os.path.basename(sys.executable)] + sys.argv)}
        m.update(meta)
        st, s1, s2 = self.subjects, self.subjects["t1"], self.subjects["t2"]
        m.update({
            "paired": self.paired,
            "shape": list(self.shape),
            "n_train": c["train_t1"],
            "n_test": c["test_t1"],
            "train_subjects": list(dict.fromkeys(st["t1"]["train"] + st["t2"]["train"])),
            "test_subjects": list(dict.fromkeys(st["t1"]["test"] + st["t2"]["test"])),
            "slice_subject": dict(s1),
            "masks": self.masks,
            "version": VERSION,
        })
        if self.clean:
            m.setdefault("clean", {"description": "noiseless test targets"})
            m["clean"]["files"] = list(CLEAN_FILES)
        if "val" in s1:
            m["n_val"], m["val_subjects"] = c["val_t1"], list(dict.fromkeys(st["t1"]["val"] + st["t2"]["val"]))
        if s2 != s1:
            m["slice_subject_t2"] = dict(s2)
            for s in s2:
                m[f"n_{s}_t2"] = c[f"{s}_t2"]
        else:
            m.pop("slice_subject_t2", None)
        # move into place; an existing dataset is moved aside first and removed after
        _check_out(self.out, self.overwrite)
        old = None
        try:
            with unit.io.open_for_writing(self.tmp / "meta.json") as f:
                f.write(_meta_dumps(m).encode())
            if self.out.exists():
                old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
                os.rename(self.out, old)
            os.rename(self.tmp, self.out)
        except OSError as e:
            if old is not None and not self.out.exists():
                os.rename(old, self.out)                  # the dataset there before goes back
            raise self._failed(e) from None
        self.finished = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return str(self.out)

    def abort(self):
        for f in self.files.values() if hasattr(self, "files") else ():
            try:
                f.f.close()
            except Exception:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def _check_out(out, overwrite):
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise DataError(f"output folder {out} already exists; pass --overwrite to replace it, or "
                        f"choose another --out.")
    if not out.is_dir() or out.is_symlink():
        raise DataError(f"{out} exists and is not a folder; remove it yourself or choose another --out.")
    if any(out.iterdir()) and not (out / "meta.json").is_file():
        raise DataError(f"{out} exists and is not a prepared dataset (no meta.json), so --overwrite "
                        f"will not delete it; remove it yourself or choose another --out.")


def write_prepared(out, train_t1, train_t2, test_t1, test_t2, meta, train_mask=None,
                   test_mask=None, overwrite=False) -> str:
    """Write small in-memory arrays as a prepared dataset (atomic, like PreparedWriter).
    meta needs at least "source"; if it has no "slice_subject" every slice is its own subject
    ("train-00000", ...). Masks: both or neither."""
    if (train_mask is None) != (test_mask is None):
        raise ValueError("write_prepared: pass both train_mask and test_mask, or neither")
    t = [np.asarray(a) for a in (train_t1, train_t2, test_t1, test_t2)]
    paired = meta.get("paired", t[0].shape[0] == t[1].shape[0] and t[2].shape[0] == t[3].shape[0])
    meta = dict(meta)
    ss = meta.pop("slice_subject", None) or {s: [f"{s}-{i:05d}" for i in range(a.shape[0])]
                                             for s, a in (("train", t[0]), ("test", t[2]))}
    ss2 = meta.pop("slice_subject_t2", None) or (ss if paired else
                                                 {s: [f"{s}-{i:05d}" for i in range(a.shape[0])]
                                                  for s, a in (("train", t[1]), ("test", t[3]))})
    for k in ("paired", "shape", "n_train", "n_test", "train_subjects", "test_subjects", "version"):
        meta.pop(k, None)
    masks = {"train": train_mask, "test": test_mask}
    with PreparedWriter(out, t[0].shape[1:], paired=paired, masks=train_mask is not None,
                        overwrite=overwrite) as w:
        for split, a1, a2 in (("train", t[0], t[1]), ("test", t[2], t[3])):
            m = None if masks[split] is None else np.asarray(masks[split])
            if len(ss[split]) != a1.shape[0]:
                raise ValueError(f"write_prepared: slice_subject[{split!r}] has {len(ss[split])} ids "
                                 f"for {a1.shape[0]} slices")
            for i in range(a1.shape[0]):   # one call per slice keeps any subject order
                w.add(split, ss[split][i], a1[i], a2[i] if paired else None,
                      None if m is None else m[i])
            if not paired:
                for i in range(a2.shape[0]):
                    w.add(split, ss2[split][i], t2=a2[i])
        return w.finish(meta)


def folder_mb(path):
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file()) / 2 ** 20


# ----------------------------------------------------------------------------------------
# the built-in phantom


def prepare_phantom(out, n_train=900, n_test=213, slices=1, size=(304, 256), seed=0,
                    overwrite=False, progress=True, created_by=None) -> str:
    """Write the synthetic phantom (unit/phantom.py) as a prepared dataset; returns the folder.
    Subject i (id "phantom-%04d") uses unit.phantom.subject_seed(seed, i); subjects 0..n_train-1
    are train, the next n_test are test. Masks (intracranial) are stored for both splits, and the
    noiseless test targets (test_t1_clean.npy, test_t2_clean.npy: evaluate.py's oracle row)."""
    from unit.phantom import phantom_subject, subject_seed
    H, W = (int(v) for v in size)
    n_train, n_test, slices = int(n_train), int(n_test), int(slices)
    if n_train < 1 or n_test < 1 or slices < 1:
        raise DataError(f"phantom needs n_train, n_test and slices >= 1, got {n_train}, {n_test}, {slices}.")
    n = n_train + n_test
    meta = {
        "source": "phantom", "layout": "phantom", "seed": int(seed),
        "created_by": created_by or (f"unit.data.prepare_phantom(n_train={n_train}, n_test={n_test}, "
                                     f"slices={slices}, size=({H}, {W}), seed={seed})"),
        "normalization": {"method": "none: unit/phantom.py generates each subject's slices already "
                                    "in [0, 1] (divided by the 99.5th percentile of brain pixels, clipped)"},
        "mask": {"source": "phantom", "description": "intracranial mask (CSF, GM, WM, deep GM) from "
                                                     "the phantom's tissue labels"},
        "clean": {"description": "the test targets before their Rician noise, divided by the same reference "
                                 "(99.5th percentile of the noisy brain pixels) and clipped like them"},
        "subject_seed": "unit.phantom.subject_seed(seed, i)",
        "slices_per_subject": slices,
    }
    t0 = time.time()
    bar = Progress(n, "phantom subjects", enabled=progress)
    with PreparedWriter(out, (H, W), paired=True, masks=True, overwrite=overwrite, clean=True) as w:
        for i in range(n):
            s = phantom_subject(subject_seed(seed, i), size=(H, W), slices=slices)
            test = i >= n_train
            w.add("test" if test else "train", f"phantom-{i:04d}", s["t1"], s["t2"], s["mask"],
                  clean=(s["t1_clean"], s["t2_clean"]) if test else None)
            bar.update()
        bar.close()
        path = w.finish(meta)
    if progress:
        print(f"wrote {path}: {n_train} train + {n_test} test phantom subjects, "
              f"{n_train * slices} + {n_test * slices} slices of {H}x{W}, "
              f"{folder_mb(path):.1f} MB in {time.time() - t0:.1f} s", file=sys.stderr)
    return path
