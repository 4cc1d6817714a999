"""How a failure is reported in a job of many ranks: once, by the rank that saw it, naming who is missing.

A bad data file or a full disk fails every rank the same way: printed by each,
the message would appear once per GPU, each with a traceback. A file missing
on one node fails only that node's ranks, so "rank 0 prints" would hide it.
:func:`say_once` prints a message on the first rank that reports it and on no
other: the ranks agree through the process group's key-value store (no
collective, so a rank that fails while the others wait in one still reports).

A rank that hangs (stopped, stuck in I/O) makes the others wait in a
collective until ``trainer.distributed_timeout_minutes`` expires; gloo then says
only "Timed out waiting ...". :class:`Heartbeat` records in the same store the
step each rank last started; after a timeout each rank that gave up says so in
the store, and the ranks that never do are the ones the others waited for. The
timeout is then reported with the setting that expired and those ranks.
"""

import hashlib
import sys
import time
from datetime import timedelta

import torch.distributed as dist

_KEY = "nemo_dpo/"


def _store():
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        return None


def say_once(message: str, rank: int) -> None:
    """Print ``message`` to stderr unless another rank has printed the same message already."""
    store = _store()
    if store is not None:
        key = _KEY + "said/" + hashlib.sha256(message.encode()).hexdigest()[:32]
        try:
            if store.add(key, 1) > 1:
                return
        except (RuntimeError, dist.DistError):
            pass  # the store is gone (its host died): better twice than never
    print(f"rank {rank}: {message}", file=sys.stderr, flush=True)


def is_timeout(err: BaseException) -> bool:
    """Whether ``err`` is a collective that waited past the process-group timeout (gloo or NCCL)."""
    text = str(err)
    return isinstance(err, (RuntimeError, dist.DistError)) and ("Timed out" in text or "timed out" in text
                                                                or "Timeout" in text)


class Heartbeat:
    """Each rank's last started step, in the process group's store; after a timeout, which ranks are missing."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.store = _store()

    def beat(self, step: int) -> None:
        if self.store is not None:
            self.store.set(f"{_KEY}step/{self.rank}", str(step))

    def _get(self, key: str):
        try:
            return self.store.get(key).decode() if self.store.check([key]) else None
        except (RuntimeError, dist.DistError):
            return None

    def missing(self, wait_seconds: float = 10.0) -> dict:
        """After this rank's collective timed out: ``{rank: last step started or None}`` of the ranks that did not
        time out too within ``wait_seconds`` (the ranks every other rank was waiting for)."""
        if self.store is None:
            return {}
        self.store.set_timeout(timedelta(seconds=5))
        try:
            self.store.set(f"{_KEY}timed_out/{self.rank}", "1")
        except (RuntimeError, dist.DistError):
            return {}
        deadline = time.monotonic() + wait_seconds
        while True:
            absent = [r for r in range(self.world_size) if self._get(f"{_KEY}timed_out/{r}") is None]
            if not absent or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        return {r: self._get(f"{_KEY}step/{r}") for r in absent}

    def timeout_message(self, minutes: float) -> str:
        missing = self.missing()
        own = self._get(f"{_KEY}step/{self.rank}") if self.store is not None else None
        who = ", ".join(f"rank {r} (last started step {s})" if s else f"rank {r} (no step started)"
                        for r, s in sorted(missing.items()))
        where = f" at step {own}" if own else " before the first step"
        return (f"a collective{where} waited longer than trainer.distributed_timeout_minutes={minutes:g} and was "
                f"abandoned: " + (f"{who} did not arrive (hung: stopped, stuck in I/O, or its host unreachable)"
                                  if who else "every rank gave up waiting (one of them is stuck inside a collective)"))
