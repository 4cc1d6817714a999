"""Console lines for long passes: what is being done, how far it is, when it will end.

A run can spend minutes before its first step (tokenizing a large file,
training a tokenizer, precomputing reference log-probs) and validation can take
a while too. A pass that lasts longer than a few seconds says so: a line every
``interval`` seconds with done/total and an ETA, and one when it ends. Short
passes print nothing, so quick runs keep a quiet console.
"""

import time


def duration(seconds) -> str:
    """``M:SS`` or ``H:MM:SS``; ``?`` when not known yet."""
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class PassProgress:
    """``advance()`` per item of a pass over ``total`` items; ``log`` prints a line (rank 0's print, or nothing)."""

    def __init__(self, what: str, total: int, unit: str, log, interval: float = 5.0):
        self.what, self.total, self.unit, self.log, self.interval = what, total, unit, log, interval
        self.start = self.last = time.perf_counter()
        self.done = 0
        self.reported = False

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.perf_counter()
        if now - self.last >= self.interval and self.done < self.total:
            self.last, self.reported = now, True
            elapsed = now - self.start
            eta = elapsed / self.done * (self.total - self.done)
            self.log(f"{self.what}: {self.done:,}/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%), "
                     f"elapsed {duration(elapsed)}, eta {duration(eta)}")

    def finish(self) -> None:
        """A closing line, if the pass was long enough to report progress."""
        if self.reported:
            self.log(f"{self.what}: {self.done:,} {self.unit} in {duration(time.perf_counter() - self.start)}")
