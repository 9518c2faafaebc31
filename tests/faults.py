"""Disk faults injected where the project opens files for writing (unit.io.open_for_writing), for the
tests of clean failures. In a test: `inject(monkeypatch, "ENOSPC", "ckpt.pt")`; around a script, as a
user would run it:

    python tests/faults.py ENOSPC ckpt.pt 2 train.py ARGS...   # the 2nd write of ckpt.pt finds the disk full

ENOSPC: the file is created and takes ROOM bytes, then every write fails (a full disk: a partial file
is left unless the writer removes it). EROFS: the open fails (a read-only file system). NAME is the
target's file name (a temp file's ".tmp" suffix is ignored); NTH: which opening of it fails (1 = the
first); the others work.
"""
import errno
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOM = 16


class Full:
    """A file that takes `room` more bytes, then raises OSError(ENOSPC) on every write."""

    def __init__(self, f, room=ROOM):
        self.f, self.room = f, room

    def write(self, b):
        b = memoryview(b).cast("B")
        k = min(len(b), self.room)
        if k:
            self.f.write(b[:k])
            self.room -= k
        if k < len(b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return k

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


class Injector:
    def __init__(self, real, err, name, nth=1):
        self.real, self.err, self.name, self.nth = real, getattr(errno, err), name, nth
        self.seen, self.failed = 0, []

    def __call__(self, path, mode="wb", buffering=-1):
        base = os.path.basename(os.fspath(path))
        if base.removesuffix(".tmp") == self.name:
            self.seen += 1
            if self.seen == self.nth:
                self.failed.append(os.fspath(path))
                if self.err == errno.ENOSPC:
                    return Full(self.real(path, mode, buffering))
                raise OSError(self.err, os.strerror(self.err), os.fspath(path))
        return self.real(path, mode, buffering)


def inject(monkeypatch, err, name, nth=1):
    """Patch unit.io.open_for_writing for the test; returns the Injector (.failed: the paths that failed)."""
    import unit.io
    injector = Injector(unit.io.open_for_writing, err, name, nth)
    monkeypatch.setattr(unit.io, "open_for_writing", injector)
    return injector


if __name__ == "__main__":
    err, name, nth, script, *args = sys.argv[1:]
    sys.path.insert(0, ROOT)
    import unit.io
    unit.io.open_for_writing = Injector(unit.io.open_for_writing, err, name, int(nth))
    sys.argv = [script, *args]
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
