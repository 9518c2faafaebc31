"""Writing files so that nothing a user made is lost.

- write_file(path, write): atomic (a temp file next to the target, fsync, rename). On no space, a
  read-only folder or an I/O error the temp file is removed, the file there before is unchanged,
  and WriteError says so in one sentence with the file, the reason and the free space. Every file
  the scripts write goes through it (or Appender, for metrics.jsonl, or unit.data.PreparedWriter).
- lock_folder(folder): an exclusive OS lock (flock) on FOLDER/.lock for the process's lifetime, so
  one process owns a run folder; the OS releases it when the process ends, however it ends.
- refuse_existing(paths): an output that would replace existing files needs --overwrite.
"""
import errno
import fcntl
import gzip
import os
import shutil
import socket

from unit import UserError


class WriteError(UserError):
    """A write failed (disk full, read-only file system, I/O error): the message names the file, the
    reason and the free space; the scripts print it as `error: ...` and exit with status 1."""
    status = 1


def open_for_writing(path, mode="wb", buffering=-1):
    """The one place this project opens a file for writing (tests inject disk faults here)."""
    return open(path, mode, buffering=buffering)


def _size(n):
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def free_space(path):
    """'123.4 MB free' on the file system that holds path (its nearest existing folder)."""
    d = os.path.dirname(os.path.abspath(path))
    while d and not os.path.isdir(d):
        d = os.path.dirname(d)
    try:
        return f"{_size(shutil.disk_usage(d or '/').free)} free"
    except OSError:
        return "free space unknown"


def os_error(e):
    """The OSError behind an exception: itself, or one in its cause/context chain (torch.save turns a
    failed write of its file object into a RuntimeError 'unexpected pos ...' with the OSError as context)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def failure(path, e, then):
    """WriteError: 'cannot write PATH (REASON; N MB free there); THEN'."""
    reason = e.strerror or errno.errorcode.get(e.errno, str(e))
    return WriteError(f"cannot write {path} ({reason}; {free_space(path)} there); {then}")


def write_file(path, write):
    """Write path atomically: write(f) fills a binary temp file next to it (path + ".tmp"), which is
    flushed, fsynced and renamed over path. On an OSError the temp file is removed, path is as it was,
    and WriteError says why (other exceptions are raised as they are, after the same clean-up)."""
    path = os.fspath(path)
    tmp, existed = path + ".tmp", os.path.exists(path)
    try:
        with open_for_writing(tmp) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        err = os_error(e) if isinstance(e, Exception) else None
        if err is None:
            raise
        raise failure(path, err, "the file there before is unchanged" if existed else
                      "nothing was written there") from None


def write_text(path, text):
    write_file(path, lambda f: f.write(text.encode()))


def copy_file(src, dst):
    """Copy src to dst atomically (a kept checkpoint ckpt_eNNN.pt from ckpt.pt)."""
    with open(src, "rb") as s:
        write_file(dst, lambda f: shutil.copyfileobj(s, f, 1 << 20))


def write_png(path, image, **kw):
    """A PIL image as a PNG file."""
    write_file(path, lambda f: image.save(f, format="PNG", **kw))


def write_nifti(path, img):
    """A nibabel image (single file) as .nii or .nii.gz."""
    def write(f):
        if str(path).endswith(".gz"):
            with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=1) as g:
                img.to_stream(g)
        else:
            img.to_stream(f)
    write_file(path, write)


def make_folder(path):
    """os.makedirs(path, exist_ok=True), or WriteError saying why not."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise failure(path, e, "create the folder yourself or choose another") from None


class Appender:
    """A file that lines are appended to (metrics.jsonl), each written through (unbuffered). A failed
    append is cut off again, so the file keeps only whole lines, and raises WriteError."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            self.f = open_for_writing(self.path, "ab", buffering=0)
        except OSError as e:
            raise failure(self.path, e, "nothing was written there") from None

    def write(self, line):
        data, pos = line.encode(), self.f.tell()
        try:
            done = 0
            while done < len(data):
                done += self.f.write(data[done:])
        except OSError as e:
            try:
                os.ftruncate(self.f.fileno(), pos)
            except OSError:
                pass
            raise failure(self.path, e, "its earlier lines are unchanged") from None

    def close(self):
        try:
            self.f.close()
        except OSError:
            pass


def lock_folder(folder, what="run folder", hint="wait for it, or pass another --out"):
    """Hold an exclusive lock on folder/.lock (fcntl.flock) until the process ends or release() is called;
    returns the open descriptor. The file records 'PID HOST' of the holder; the OS drops the lock of a
    process that dies, killed or not, so a stale .lock file never blocks. Held: UserError naming the
    holder. OSError when the lock file cannot be created (the caller says which folder is not writable)."""
    path = os.path.join(folder, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        who = f"PID {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
        raise UserError(f"{what} {folder} is in use by {who} (its lock {path}); {hint}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError as e:
        os.close(fd)
        raise failure(path, e, "the folder was not used") from None
    return fd


def release(fd):
    """Drop a lock_folder() lock (the file stays: removing it would let two processes lock two files)."""
    if fd is not None:
        os.close(fd)


def refuse_existing(paths, what="output"):
    """UserError when any of paths exists: this run would replace it."""
    there = [p for p in paths if os.path.lexists(p)]
    if there:
        more = f" (and {len(there) - 1} more)" if len(there) > 1 else ""
        raise UserError(f"{what} {there[0]}{more} exists already; pass --overwrite to replace it, or choose "
                        f"another name")
