"""One progress line on stderr, for every long loop of the project (training, data preparation)."""
import sys
import time


class Progress:
    """`desc n/total [bar] rate/s elapsed ETA  note` on one stderr line.

    On a terminal the line is redrawn in place (at most 10 times a second); otherwise (a log file,
    a batch job) a new line is printed every 10% of the work or every `every_s` seconds, whichever
    comes first. `start` is where a resumed loop begins: the rate counts only what this run did."""

    def __init__(self, total, desc, start=0, stream=None, enabled=True, every_s=60.0):
        self.total, self.desc, self.enabled, self.every_s = int(total), desc, enabled, every_s
        self.stream = stream if stream is not None else sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.n = self.start = int(start)
        self.t0, self.last, self.note, self.shown = time.time(), 0.0, "", False
        self.next_line = self.n

    def _line(self):
        dt = max(time.time() - self.t0, 1e-9)
        rate = (self.n - self.start) / dt
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        w = 24
        fill = int(w * self.n / max(self.total, 1))
        bar = "=" * fill + (">" if fill < w else "") + " " * max(w - fill - 1, 0)
        fmt = lambda s: "--:--" if s != s else f"{int(s) // 60:d}:{int(s) % 60:02d}"   # minutes:seconds
        return (f"{self.desc} {self.n}/{self.total} [{bar}] {rate:.2f}/s "
                f"elapsed {fmt(dt)} ETA {fmt(eta)}{self.note}")

    def update(self, n=1, note=None):
        """Advance by n; `note` (if given) replaces the text after the ETA."""
        self.set(self.n + n, note)

    def set(self, n, note=None):
        """Jump to n (e.g. the training step)."""
        self.n = n
        if note is not None:
            self.note = f"  {note}" if note else ""
        if not self.enabled:
            return
        now = time.time()
        if self.tty:
            if now - self.last >= 0.1 or self.n >= self.total:
                self.stream.write("\r" + self._line() + "\033[K")
                self.stream.flush()
                self.last, self.shown = now, True
        elif self.n >= self.next_line or self.n >= self.total or now - self.last >= self.every_s:
            self.stream.write(self._line() + "\n")
            self.stream.flush()
            self.last, self.next_line = now, self.n + max(1, self.total // 10)

    def write(self, msg):
        """Print a message line without garbling the bar."""
        if self.tty and self.shown and self.enabled:
            self.stream.write("\r\033[K")
        self.stream.write(msg + "\n")
        if self.tty and self.shown and self.enabled:
            self.stream.write(self._line())
        self.stream.flush()

    def close(self):
        if self.enabled and self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False
