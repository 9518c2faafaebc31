"""
Prepared-slice datasets, and the NIfTI helpers that build them (data/prepare.py) and undo
them (putting translated slices back into a subject's source grid).

A *prepared dataset* is a folder written by data/prepare.py:

    train_t1.npy  train_t2.npy  test_t1.npy  test_t2.npy   (N, H, W) float16, values in [0, 1]
    train_mask.npy  test_mask.npy                          (N, H, W) uint8, optional
    meta.json                                              what it is, where every slice came from

Domain A = T1, domain B = T2. When meta["paired"] is true, slice i of *_t1 and slice i of *_t2
are the same anatomy. Splits are by subject; meta["slice_subject"][split][i] names the subject
of slice i.

Geometry of a slice cut from a volume (see data/README.md):
    the volume is reoriented to the closest canonical (RAS+) axes with nibabel: array axis 0
    points to the patient's Right, 1 to Anterior, 2 to Superior; an axial slice is vol[:, :, z]
    shown as a 2-D image with
        rows    anterior (row 0) -> posterior
        columns patient's left (col 0) -> patient's right   (neurological convention)
    i.e. img = vol[:, :, z].T[::-1, :]  (img[r, c] = vol[c, Y-1-r, z]), and slices of one subject
    are stored inferior -> superior. The image is then cropped / zero-padded to (H, W) with a
    window centred on the brain's bounding box (one window per subject).

Everything here streams: one subject in memory at a time, output arrays appended to disk.
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
from typing import NamedTuple

import numpy as np

from unit import UserError
from unit.progress import Progress

FILES = ("train_t1.npy", "train_t2.npy", "test_t1.npy", "test_t2.npy", "meta.json")
MASK_FILES = ("train_mask.npy", "test_mask.npy")
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

    @property
    def paired(self) -> bool:
        return bool(self.meta["paired"])

    @property
    def shape(self) -> tuple:
        return tuple(int(v) for v in self.meta["shape"])


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
    masks = {}
    for n in MASK_FILES:
        masks[n[:-4]] = load(n, "ub") if (p / n).is_file() else None
    for split in ("train", "test"):
        t1, t2 = arrays[f"{split}_t1"], arrays[f"{split}_t2"]
        n = meta[f"n_{split}"]
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
    return Prepared(str(p), meta, **arrays, **masks)


# ----------------------------------------------------------------------------------------
# writing a prepared dataset: append to .npy files in a temporary folder, rename at the end


class _NpyAppender:
    """An .npy file we append (k, *tail) blocks to. The header is written with a fixed length
    up front and rewritten with the final N at close, so nothing is ever held in memory."""

    def __init__(self, path, dtype, tail):
        self.path, self.dtype, self.tail, self.n = Path(path), np.dtype(dtype), tuple(tail), 0
        longest = len(self._dict(10 ** 15))
        self.total = -(-(10 + longest + 1) // 64) * 64      # magic+len+dict+'\n', 64-aligned
        self.f = open(self.path, "wb")
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
            w.add("train", "sub-01", t1, t2, mask)     # (S, H, W) each, values in [0, 1]
            ...
            w.finish(meta)                             # writes meta.json, renames into place

    Writes go to a hidden temporary folder next to `out` (".NAME.partial-PID") that is renamed
    to `out` by finish(); on an exception or KeyboardInterrupt (also leaving the `with` block
    without finish()) the temporary folder is removed, so an interrupted run leaves nothing.
    An existing `out` is refused unless overwrite=True, and even then only if it looks like a
    prepared dataset (has meta.json) or is empty. paired=False allows different slice counts
    for T1 and T2 (e.g. unpaired PNG folders); add(t1=...) and add(t2=...) separately then."""

    def __init__(self, out, shape, paired=True, masks=False, overwrite=False):
        self.out = Path(out)
        self.shape = tuple(int(v) for v in shape)
        self.paired, self.masks, self.overwrite = bool(paired), bool(masks), bool(overwrite)
        _check_out(self.out, overwrite)
        parent = self.out.parent
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f".{self.out.name}.partial-*"):   # left by a killed (-9) run
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        self.tmp = parent / f".{self.out.name}.partial-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self.finished = False
        names = [n[:-4] for n in FILES[:4]] + ([n[:-4] for n in MASK_FILES] if self.masks else [])
        self.files = {}
        try:
            for n in names:
                dt = np.uint8 if n.endswith("mask") else np.float16
                self.files[n] = _NpyAppender(self.tmp / f"{n}.npy", dt, self.shape)
        except BaseException:
            self.abort()
            raise
        self.subjects = {"t1": {"train": [], "test": []}, "t2": {"train": [], "test": []}}

    def __enter__(self):
        return self

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

    def add(self, split, subject, t1=None, t2=None, mask=None):
        """Append the slices of one subject (S, H, W) (or one slice (H, W)) to `split`."""
        if split not in ("train", "test"):
            raise ValueError(f"PreparedWriter.add: split must be 'train' or 'test', got {split!r}")
        if self.paired and (t1 is None or t2 is None):
            raise ValueError("PreparedWriter.add: a paired dataset needs t1 and t2 together")
        if self.masks and t1 is not None and mask is None:
            raise ValueError("PreparedWriter.add: this writer stores masks; pass mask with t1")
        if not self.masks and mask is not None:
            raise ValueError("PreparedWriter.add: created with masks=False but a mask was given")
        if t1 is not None:
            t1 = self._check("t1", t1)
            if t2 is not None and self.paired:
                t2 = self._check("t2", t2, t1.shape[0])
            if mask is not None:
                mask = self._check("mask", mask, t1.shape[0])
        if t2 is not None:
            t2 = self._check("t2", t2)
        if mask is not None and t1 is None:
            raise ValueError("PreparedWriter.add: a mask belongs to t1 slices; pass t1 too")
        subject = str(subject)
        for q, a in (("t1", t1), ("t2", t2)):
            if a is None:
                continue
            self.files[f"{split}_{q}"].append(a.astype(np.float16))
            self.subjects[q][split] += [subject] * a.shape[0]
        if mask is not None:
            self.files[f"{split}_mask"].append(np.asarray(mask).astype(np.uint8) != 0)

    def counts(self):
        return {f"{s}_{q}": len(self.subjects[q][s]) for s in ("train", "test") for q in ("t1", "t2")}

    def finish(self, meta) -> str:
        """Close the arrays, write meta.json (the caller's keys plus shape, paired, n_train,
        n_test, *_subjects, slice_subject, version), move the folder into place; returns out."""
        c = self.counts()
        if self.paired and (c["train_t1"] != c["train_t2"] or c["test_t1"] != c["test_t2"]):
            raise ValueError(f"PreparedWriter.finish: paired dataset with unequal counts {c}")
        for f in self.files.values():
            f.close()
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
            "slice_subject": {"train": s1["train"], "test": s1["test"]},
            "masks": self.masks,
            "version": VERSION,
        })
        if s2 != s1:
            m["slice_subject_t2"] = {"train": s2["train"], "test": s2["test"]}
            m["n_train_t2"], m["n_test_t2"] = c["train_t2"], c["test_t2"]
        else:
            m.pop("slice_subject_t2", None)
        (self.tmp / "meta.json").write_text(_meta_dumps(m))
        # move into place; an existing dataset is moved aside first and removed after
        _check_out(self.out, self.overwrite)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
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
# finding subjects in a source tree


@dataclass
class Subject:
    id: str
    t1_path: str
    t2_path: str
    mask_path: str | None = None


def _nii_stem(name):
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


def _first_existing(*paths):
    for p in paths:
        if p.is_file():
            return p
    return paths[0]


EXPECTED_TREE = {
    "hcp": "SRC/<subject>/T1w/T1w_acpc_dc_restore_brain.nii.gz and T2w_acpc_dc_restore_brain.nii.gz "
           "(--hcp-space mni: SRC/<subject>/MNINonLinear/T1w_restore_brain.nii.gz and T2w_restore_brain.nii.gz)",
    "brats": "SRC/<case>/<case>_t1.nii.gz and <case>_t2.nii.gz (BraTS 2020/2021) or "
             "SRC/<case>/<case>-t1n.nii.gz and <case>-t2w.nii.gz (BraTS 2023)",
    "ixi": "SRC/IXI-T1/IXI###-Site-####-T1.nii.gz and SRC/IXI-T2/IXI###-Site-####-T2.nii.gz",
    "folders": "SRC/t1/NAME.nii[.gz] and SRC/t2/NAME.nii[.gz] (optional SRC/mask/NAME.nii[.gz]), or "
               "PNG slices in SRC/trainA, SRC/trainB, SRC/testA, SRC/testB",
}
_IXI = re.compile(r"^(IXI\d+-[A-Za-z]+-\d+)-(T1|T2)\.nii(\.gz)?$")


def guess_layout(src):
    """Best guess of which layout a tree follows (for error messages), or None."""
    src = Path(src)
    if not src.is_dir():
        return None
    names = {p.name for p in src.iterdir()}
    if "IXI-T1" in names or "IXI-T2" in names:
        return "ixi"
    if {"t1", "t2"} <= names or {"trainA", "trainB"} <= names:
        return "folders"
    for d in sorted(p for p in src.iterdir() if p.is_dir())[:20]:
        sub = {p.name for p in d.iterdir()}
        if "T1w" in sub or "MNINonLinear" in sub:
            return "hcp"
        if any(n.startswith(d.name + "_") or n.startswith(d.name + "-") for n in sub):
            return "brats"
    return None


def find_subjects(layout, src, hcp_space="acpc") -> list:
    """The subjects of a source tree, sorted by id. A subject with a missing file is still listed
    (its missing path is the one expected), so that loading it gives a clear, per-subject error.
    Raises DataError when SRC is missing or no subject of `layout` is found."""
    src = Path(src)
    if layout not in EXPECTED_TREE:
        raise DataError(f"unknown layout {layout!r}; use one of {', '.join(EXPECTED_TREE)} "
                        f"(see data/README.md).")
    if not src.is_dir():
        raise DataError(f"source folder {src} does not exist or is not a folder; pass the folder that "
                        f"holds your {layout} download.")
    subjects = []
    if layout == "hcp":
        if hcp_space not in ("acpc", "mni"):
            raise DataError(f"--hcp-space must be acpc or mni, got {hcp_space!r}.")
        sub, t1n, t2n = (("T1w", "T1w_acpc_dc_restore_brain", "T2w_acpc_dc_restore_brain")
                         if hcp_space == "acpc" else
                         ("MNINonLinear", "T1w_restore_brain", "T2w_restore_brain"))
        for d in sorted(p for p in src.iterdir() if p.is_dir()):
            if not (d / sub).is_dir():
                continue
            t1 = _first_existing(d / sub / f"{t1n}.nii.gz", d / sub / f"{t1n}.nii")
            t2 = _first_existing(d / sub / f"{t2n}.nii.gz", d / sub / f"{t2n}.nii")
            m = _first_existing(d / sub / "brainmask_fs.nii.gz", d / sub / "brainmask_fs.nii")
            subjects.append(Subject(d.name, str(t1), str(t2), str(m) if m.is_file() else None))
    elif layout == "brats":
        for d in sorted(p for p in src.iterdir() if p.is_dir()):
            c = d.name
            files = {p.name for p in d.iterdir() if _nii_stem(p.name) is not None}
            if not any(n.startswith(c + "_") or n.startswith(c + "-") for n in files):
                continue
            new = any(n.startswith(c + "-") for n in files)     # BraTS 2023 names
            t1s, t2s = (("-t1n", "-t2w") if new else ("_t1", "_t2"))
            t1 = _first_existing(d / f"{c}{t1s}.nii.gz", d / f"{c}{t1s}.nii")
            t2 = _first_existing(d / f"{c}{t2s}.nii.gz", d / f"{c}{t2s}.nii")
            subjects.append(Subject(c, str(t1), str(t2), None))
    elif layout == "ixi":
        found = {}
        for q in ("T1", "T2"):
            folder = src / f"IXI-{q}"
            if folder.is_dir():
                for p in folder.iterdir():
                    m = _IXI.match(p.name)
                    if m and m.group(2) == q:
                        found.setdefault(m.group(1), {})[q] = p
        for sid in sorted(found):
            f = found[sid]
            t1 = f.get("T1", src / "IXI-T1" / f"{sid}-T1.nii.gz")
            t2 = f.get("T2", src / "IXI-T2" / f"{sid}-T2.nii.gz")
            subjects.append(Subject(sid, str(t1), str(t2), None))
    elif layout == "folders":
        if (src / "t1").is_dir() or (src / "t2").is_dir():
            stems = {}
            for q in ("t1", "t2", "mask"):
                if (src / q).is_dir():
                    for p in (src / q).iterdir():
                        s = _nii_stem(p.name)
                        if s is not None:
                            stems.setdefault(s, {})[q] = p
            for s in sorted(stems):
                f = stems[s]
                if "t1" not in f and "t2" not in f:
                    continue
                subjects.append(Subject(s, str(f.get("t1", src / "t1" / f"{s}.nii.gz")),
                                        str(f.get("t2", src / "t2" / f"{s}.nii.gz")),
                                        str(f["mask"]) if "mask" in f else None))
    if not subjects:
        g = guess_layout(src)
        hint = f" it looks like the {g} layout" if g and g != layout else ""
        raise DataError(f"no {layout} subjects found in {src} (expected {EXPECTED_TREE[layout]});"
                        + (hint + ", so pass that layout instead" if hint else
                           " check the path and see data/README.md") + ".")
    return subjects


# ----------------------------------------------------------------------------------------
# reading NIfTI volumes


def load_nifti(path, what="image"):
    """(data float32 3-D in stored voxel order, affine float64 (4, 4), header). Trailing
    singleton dimensions are dropped. DataError for a missing, unreadable, truncated, non-3-D,
    non-finite or all-zero image."""
    import nibabel as nib
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} {p} is missing; add it or remove the subject's folder.")
    try:
        img = nib.load(str(p))
    except MemoryError:
        raise
    except Exception as e:
        raise DataError(f"{p} is not a readable NIfTI file ({type(e).__name__}: {e}); re-download or "
                        f"re-export it.") from None
    shape = tuple(img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise DataError(f"{p} is a {len(shape)}-D image of shape {tuple(img.shape)}, expected one 3-D "
                        f"volume; split or re-export it as 3-D.")
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32).reshape(shape)
    except MemoryError:
        raise
    except Exception as e:
        raise DataError(f"{p} could not be read ({type(e).__name__}: {e}); the file is truncated or "
                        f"corrupt, re-download or re-export it.") from None
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{p} has an invalid affine (singular or non-finite); fix its header (sform/qform).")
    bad = data.size - int(np.count_nonzero(np.isfinite(data)))
    if bad:
        raise DataError(f"{p} contains {bad} NaN/inf voxels; fix or re-export the image.")
    if not data.any():
        raise DataError(f"{p} is all zero; re-export it or remove the subject.")
    return data, affine, img.header


def _ras_ornt(affine):
    from nibabel.orientations import io_orientation
    return io_orientation(affine)


def to_canonical(data, affine):
    """Reorient to the closest canonical (RAS+) axes: (data, canonical affine, ornt). Exact (only
    flips and transposes), like nibabel.as_closest_canonical."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff
    ornt = _ras_ornt(affine)
    return apply_orientation(data, ornt), affine @ inv_ornt_aff(ornt, data.shape), ornt


def from_canonical(data, source_affine):
    """Inverse of to_canonical: canonical-order array back to the source's stored voxel order."""
    from nibabel.orientations import apply_orientation
    ornt = _ras_ornt(source_affine)
    inv = np.zeros_like(ornt)
    for i, (ax, flip) in enumerate(ornt):
        inv[int(ax)] = (i, flip)
    return apply_orientation(data, inv)


def resample_to_grid(data, affine, shape, target_affine, order=1, fill=0.0):
    """Sample `data` (voxel->world `affine`) on the grid (shape, target_affine): trilinear
    (order=1) or nearest (order=0) in world coordinates, `fill` outside the source (the value
    fades to `fill` over the half voxel past the edge, like scipy's grid-constant mode). One
    output slab at a time, so memory stays ~ the output. Not a registration: it only uses the
    two affines."""
    M = np.linalg.inv(affine) @ np.asarray(target_affine, dtype=np.float64)  # target ijk -> source ijk
    I, J, K = (int(v) for v in shape)
    n = np.array(data.shape)
    ii, jj = np.meshgrid(np.arange(I, dtype=np.float64), np.arange(J, dtype=np.float64), indexing="ij")
    base = (M[:3, 0, None, None] * ii + M[:3, 1, None, None] * jj + M[:3, 3, None, None])  # (3, I, J)
    out = np.empty((I, J, K), dtype=np.float32)
    for k in range(K):
        c = base + M[:3, 2, None, None] * k
        if order == 0:
            idx = np.floor(c + 0.5).astype(np.int64)
            ok = np.all((idx >= 0) & (idx < n[:, None, None]), axis=0)
            idx = np.clip(idx, 0, (n - 1)[:, None, None])
            out[:, :, k] = np.where(ok, data[idx[0], idx[1], idx[2]], fill)
            continue
        c0 = np.floor(c)
        f = c - c0
        c0 = c0.astype(np.int64)
        acc = np.zeros((I, J), dtype=np.float64)
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    idx = c0 + np.array([dx, dy, dz])[:, None, None]
                    w = ((f[0] if dx else 1 - f[0]) * (f[1] if dy else 1 - f[1])
                         * (f[2] if dz else 1 - f[2]))
                    ok = np.all((idx >= 0) & (idx < n[:, None, None]), axis=0)
                    idx = np.clip(idx, 0, (n - 1)[:, None, None])
                    acc += w * np.where(ok, data[idx[0], idx[1], idx[2]], fill)
        out[:, :, k] = acc
    return out


class SourceInfo(NamedTuple):
    """What is needed to write a result back in a subject's source space."""
    t1_path: str
    t2_path: str
    source_shape: tuple        # stored voxel shape of the T1 (the grid both live on)
    source_affine: np.ndarray  # (4, 4) of the T1
    ornt: np.ndarray           # nibabel orientation source -> canonical
    zooms: tuple               # T1 voxel sizes (mm), stored order
    t1_header: object          # nibabel headers, for writing NIfTI with the source header
    t2_header: object
    t2_resampled: bool         # True when T2 was resampled onto the T1 grid (ixi)


class VolumePair(NamedTuple):
    t1: np.ndarray             # (X, Y, Z) float32, canonical RAS
    t2: np.ndarray             # (X, Y, Z) float32, canonical RAS, same grid as t1
    mask: np.ndarray | None    # (X, Y, Z) bool from the source's mask file, or None
    affine: np.ndarray         # canonical voxel -> world
    info: SourceInfo


def _same_grid(a1, a2, tol=1e-3):
    return np.allclose(a1, a2, atol=tol, rtol=0)


def load_volume_pair(subject, resample_t2=False) -> VolumePair:
    """Load a subject's T1, T2 (and mask file if any) in canonical (RAS) orientation.
    resample_t2=False (hcp, brats, folders): T1 and T2 must share shape and affine (co-registered);
    True (ixi): T2 is resampled (trilinear, world coordinates) onto the T1's grid.
    DataError for any problem with the subject's files."""
    t1, a1, h1 = load_nifti(subject.t1_path, "T1 image")
    t2, a2, h2 = load_nifti(subject.t2_path, "T2 image")
    if not resample_t2:
        if t1.shape != t2.shape:
            raise DataError(f"T1 {subject.t1_path} and T2 {subject.t2_path} have different shapes "
                            f"{t1.shape} and {t2.shape}; this layout needs co-registered images on one "
                            f"grid, so resample one onto the other (or use the ixi layout).")
        if not _same_grid(a1, a2):
            raise DataError(f"T1 {subject.t1_path} and T2 {subject.t2_path} have different affines "
                            f"(max difference {np.abs(a1 - a2).max():.3g}); this layout needs "
                            f"co-registered images on one grid, so resample one onto the other.")
    source_shape = tuple(int(v) for v in t1.shape)
    t1c, ac, ornt = to_canonical(t1, a1)
    if resample_t2:
        t2c = resample_to_grid(t2, a2, t1c.shape, ac, order=1)
    else:
        t2c, _, _ = to_canonical(t2, a2)
    del t1, t2
    maskc = None
    if subject.mask_path:
        m, am, _ = load_nifti(subject.mask_path, "mask")
        if m.shape != source_shape or not _same_grid(am, a1):
            raise DataError(f"mask {subject.mask_path} does not lie on the grid of T1 {subject.t1_path} "
                            f"(shape {m.shape}); use the mask that belongs to this T1, or remove it.")
        maskc = to_canonical(m > 0, a1)[0]
    zooms = tuple(float(z) for z in np.sqrt((a1[:3, :3] ** 2).sum(0)))
    info = SourceInfo(str(subject.t1_path), str(subject.t2_path), source_shape, a1, ornt, zooms,
                      h1, h2, bool(resample_t2))
    return VolumePair(t1c, t2c, maskc, ac, info)


# ----------------------------------------------------------------------------------------
# masks, normalisation, slice selection, crop/pad, and the way back


MASK_RULES = {
    "nonzero": "voxels where T1 or T2 is nonzero (the source images are skull-stripped, so this is "
               "their own brain extraction)",
    "threshold": "voxels where T1 > 10% of the 99th percentile of its nonzero voxels (a foreground / "
                 "head mask, NOT a brain segmentation)",
}


# how each layout's mask is made when the source has none (data/prepare.py, evaluate.py --volumes)
LAYOUT_MASK_RULE = {"hcp": "nonzero", "brats": "nonzero", "ixi": "threshold", "folders": "threshold"}


def derive_mask(t1, t2, rule):
    """A mask for sources without one; see MASK_RULES for what each rule means."""
    if rule == "nonzero":
        return (t1 != 0) | (t2 != 0)
    if rule == "threshold":
        nz = t1[t1 > 0]
        if nz.size == 0:
            return np.zeros(t1.shape, bool)
        return t1 > 0.1 * float(np.percentile(nz, 99))
    raise ValueError(f"derive_mask: unknown rule {rule!r}")


def robust_range(vol, mask=None, percentiles=(0.5, 99.5), what="volume"):
    """(lo, hi): the given percentiles of the voxels inside mask (nonzero voxels if mask is None)."""
    vals = vol[mask] if mask is not None else vol[vol != 0]
    if vals.size == 0:
        raise DataError(f"{what} has no voxels inside its mask; check the image and its mask.")
    lo, hi = (float(v) for v in np.percentile(vals, percentiles))
    if not hi > lo:
        raise DataError(f"{what} is constant ({lo:g}) inside its mask, so it cannot be normalised; "
                        f"check the image or remove the subject.")
    return lo, hi


def apply_range(vol, lo_hi):
    """clip((vol - lo) / (hi - lo), 0, 1) as float32."""
    lo, hi = lo_hi
    out = np.asarray(vol, dtype=np.float32) - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def normalize_volume(vol, mask=None, percentiles=(0.5, 99.5), what="volume"):
    """Robust per-volume normalisation to [0, 1]: (vol01 float32, (lo, hi)) with lo, hi the
    percentiles of the brain (mask) voxels; values are clipped to [lo, hi] then scaled.
    Inverse (for unclipped values): vol = vol01 * (hi - lo) + lo."""
    lo_hi = robust_range(vol, mask, percentiles, what)
    return apply_range(vol, lo_hi), lo_hi


def central_slices(mask, k):
    """Canonical axial indices (inferior -> superior) of the k central slices among those that
    contain mask voxels; k='all' (or None) gives every slice from the lowest to the highest one."""
    zs = np.flatnonzero(mask.any(axis=(0, 1)))
    if zs.size == 0:
        raise DataError("the mask is empty")
    z_lo, z_hi = int(zs[0]), int(zs[-1])
    if k in (None, "all"):
        return list(range(z_lo, z_hi + 1))
    k = int(k)
    if k > z_hi - z_lo + 1:
        raise DataError(f"only {z_hi - z_lo + 1} axial slices contain brain, fewer than --slices {k}")
    start = (z_lo + z_hi + 1 - k) // 2
    return list(range(start, start + k))


def brain_window(mask, size):
    """(row0, col0) of the (H, W) window centred on the bounding box of the mask, in display
    coordinates of an axial slice (rows anterior->posterior, cols left->right); may be negative
    or run past the image (that part is zero-padded)."""
    X, Y, _ = mask.shape
    H, W = size
    xs = np.flatnonzero(mask.any(axis=(1, 2)))
    ys = np.flatnonzero(mask.any(axis=(0, 2)))
    if xs.size == 0:
        raise DataError("the mask is empty")
    r_lo, r_hi = Y - 1 - int(ys[-1]), Y - 1 - int(ys[0])
    c_lo, c_hi = int(xs[0]), int(xs[-1])
    return ((r_lo + r_hi + 1 - H) // 2, (c_lo + c_hi + 1 - W) // 2)


def axial_display(vol, slices):
    """(K, Y, X) display images of canonical axial slices: rows anterior->posterior, cols L->R."""
    return np.asarray(vol)[:, :, list(slices)].transpose(2, 1, 0)[:, ::-1, :]


def _overlap(r0, c0, H, W, Y, X):
    rs, re_, cs, ce = max(r0, 0), min(r0 + H, Y), max(c0, 0), min(c0 + W, X)
    return rs, max(re_, rs), cs, max(ce, cs)


def crop_or_pad_slices(vol, slices, window, size, fill=0):
    """(K, H, W) axial display slices of a canonical volume, cut with the (H, W) window whose
    top-left display pixel is `window` = (row0, col0); outside the volume is `fill`."""
    X, Y, _ = vol.shape
    H, W = size
    r0, c0 = window
    out = np.full((len(slices), H, W), fill, dtype=vol.dtype)
    rs, re_, cs, ce = _overlap(r0, c0, H, W, Y, X)
    if re_ > rs and ce > cs:
        out[:, rs - r0:re_ - r0, cs - c0:ce - c0] = axial_display(vol, slices)[:, rs:re_, cs:ce]
    return out


@dataclass
class SliceGeometry:
    """Where a subject's prepared slices came from, in plain JSON types (stored in meta.json
    under "volumes"): enough to put translated slices back into the source grid."""
    source_shape: list        # stored voxel shape of the source T1
    source_affine: list       # its 4x4 affine (voxel -> world, mm)
    slices: list              # canonical axial indices, inferior -> superior
    window: list              # (row0, col0) of the crop window in display coordinates
    size: list                # (H, W)

    def to_json(self):
        return {"source_shape": [int(v) for v in self.source_shape],
                "source_affine": [[round(float(v), 6) for v in r] for r in np.asarray(self.source_affine)],
                "slices": [int(v) for v in self.slices], "window": [int(v) for v in self.window],
                "size": [int(v) for v in self.size]}

    @classmethod
    def from_json(cls, d):
        return cls(d["source_shape"], d["source_affine"], d["slices"], d["window"], d["size"])

    @property
    def canonical_shape(self):
        ornt = _ras_ornt(np.asarray(self.source_affine, dtype=np.float64))
        return tuple(int(self.source_shape[i]) for i in np.argsort(ornt[:, 0]))


def slices_to_volume(slices, geometry, lo_hi=None, fill=0.0):
    """Inverse of the preparation: (K, H, W) slices (as prepared: display orientation, [0, 1])
    -> a float32 volume in the source's stored voxel order and shape, so that
    nibabel.Nifti1Image(vol, geometry.source_affine, source_header) lines up with the source.
    Undoes crop/pad (pixels outside the window and slices not prepared get `fill`),
    reorientation, and, when lo_hi = (lo, hi) is given, the normalisation (x * (hi - lo) + lo;
    values the normalisation clipped cannot come back). For ixi the T2 was resampled onto the T1
    grid, so its result lands on the T1 grid (the geometry's source)."""
    g = geometry if isinstance(geometry, SliceGeometry) else SliceGeometry.from_json(geometry)
    slices = np.asarray(slices, dtype=np.float32)
    if slices.ndim == 2:
        slices = slices[None]
    H, W = (int(v) for v in g.size)
    if slices.shape != (len(g.slices), H, W):
        raise ValueError(f"slices_to_volume: got {slices.shape}, expected ({len(g.slices)}, {H}, {W})")
    X, Y, Z = g.canonical_shape
    r0, c0 = (int(v) for v in g.window)
    disp = np.full((len(g.slices), Y, X), fill, dtype=np.float32)
    rs, re_, cs, ce = _overlap(r0, c0, H, W, Y, X)
    part = slices[:, rs - r0:re_ - r0, cs - c0:ce - c0]
    if lo_hi is not None:
        lo, hi = lo_hi
        part = part * np.float32(hi - lo) + np.float32(lo)
    disp[:, rs:re_, cs:ce] = part
    vol = np.full((X, Y, Z), fill, dtype=np.float32)
    vol[:, :, list(g.slices)] = disp[:, ::-1, :].transpose(2, 1, 0)
    return np.ascontiguousarray(from_canonical(vol, np.asarray(g.source_affine, dtype=np.float64)))


def slices_to_nifti(slices, geometry, lo_hi=None, header=None, fill=0.0):
    """slices_to_volume wrapped as a float32 nibabel.Nifti1Image with the source affine (and the
    source header, e.g. SourceInfo.t2_header or nibabel.load(path).header, if given)."""
    import nibabel as nib
    g = geometry if isinstance(geometry, SliceGeometry) else SliceGeometry.from_json(geometry)
    vol = slices_to_volume(slices, g, lo_hi, fill)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(vol, np.asarray(g.source_affine, dtype=np.float64), hdr)
    img.set_data_dtype(np.float32)
    img.header.set_slope_inter(1.0, 0.0)
    return img


class SubjectSlices(NamedTuple):
    t1: np.ndarray        # (K, H, W) float32 in [0, 1]
    t2: np.ndarray
    mask: np.ndarray      # (K, H, W) bool
    geometry: SliceGeometry
    t1_range: tuple       # (lo, hi) of the T1 normalisation
    t2_range: tuple
    mask_source: str      # "source" (the subject's mask file) or "derived:<rule>"


def prepare_subject(subject, size=(304, 256), slices=1, percentiles=(0.5, 99.5),
                    resample_t2=False, mask_rule="nonzero") -> SubjectSlices:
    """Everything data/prepare.py does to one NIfTI subject: load + reorient (load_volume_pair),
    mask (the source's, else derive_mask(rule)), normalise each contrast (percentiles of mask
    voxels), pick the central slices, crop/pad around the brain. DataError on any problem."""
    v = load_volume_pair(subject, resample_t2=resample_t2)
    if v.mask is not None:
        mask, mask_source = v.mask, "source"
        if not mask.any():
            raise DataError(f"mask {subject.mask_path} is empty; fix or remove it.")
    else:
        mask, mask_source = derive_mask(v.t1, v.t2, mask_rule), f"derived:{mask_rule}"
        if not mask.any():
            raise DataError(f"T1 {subject.t1_path} gives an empty {mask_rule} mask; check the image.")
    r1 = robust_range(v.t1, mask, percentiles, f"T1 {subject.t1_path}")
    r2 = robust_range(v.t2, mask, percentiles, f"T2 {subject.t2_path}")
    try:
        zs = central_slices(mask, slices)
    except DataError as e:
        raise DataError(f"T1 {subject.t1_path}: {e}; use a smaller --slices.") from None
    window = brain_window(mask, size)
    t1 = apply_range(crop_or_pad_slices(v.t1, zs, window, size), r1)
    t2 = apply_range(crop_or_pad_slices(v.t2, zs, window, size), r2)
    m = crop_or_pad_slices(mask, zs, window, size, fill=False)
    # padding is 0 in the source intensity, which normalises to clip(-lo/(hi-lo)); force 0 there
    geo = SliceGeometry(list(v.info.source_shape), v.info.source_affine.tolist(), zs, list(window),
                        list(size))
    X, Y, _ = v.t1.shape
    H, W = size
    r0, c0 = window
    rs, re_, cs, ce = _overlap(r0, c0, H, W, Y, X)
    inside = np.zeros((H, W), bool)
    inside[rs - r0:re_ - r0, cs - c0:ce - c0] = True
    t1[:, ~inside] = 0.0
    t2[:, ~inside] = 0.0
    return SubjectSlices(t1, t2, m, geo, r1, r2, mask_source)


# ----------------------------------------------------------------------------------------
# the built-in phantom


def prepare_phantom(out, n_train=900, n_test=213, slices=1, size=(304, 256), seed=0,
                    overwrite=False, progress=True, created_by=None) -> str:
    """Write the synthetic phantom (unit/phantom.py) as a prepared dataset; returns the folder.
    Subject i (id "phantom-%04d") uses unit.phantom.subject_seed(seed, i); subjects 0..n_train-1
    are train, the next n_test are test. Masks (intracranial) are stored for both splits."""
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
        "subject_seed": "unit.phantom.subject_seed(seed, i)",
        "slices_per_subject": slices,
    }
    t0 = time.time()
    bar = Progress(n, "phantom subjects", enabled=progress)
    with PreparedWriter(out, (H, W), paired=True, masks=True, overwrite=overwrite) as w:
        for i in range(n):
            s = phantom_subject(subject_seed(seed, i), size=(H, W), slices=slices)
            w.add("train" if i < n_train else "test", f"phantom-{i:04d}", s["t1"], s["t2"], s["mask"])
            bar.update()
        bar.close()
        path = w.finish(meta)
    if progress:
        print(f"wrote {path}: {n_train} train + {n_test} test phantom subjects, "
              f"{n_train * slices} + {n_test * slices} slices of {H}x{W}, "
              f"{folder_mb(path):.1f} MB in {time.time() - t0:.1f} s", file=sys.stderr)
    return path
