"""Preemption: SIGTERM / SIGUSR1 ask for a checkpoint at the next step boundary, then exit 0.

Slurm (``--signal``), Kubernetes and most schedulers send one of these before
killing a job. A signal may reach only some ranks, so at every step boundary all
ranks agree with one tiny all-reduce (any rank signalled = all save the same
step). A second signal ends the process at once: checkpoints are written to a
temporary folder and renamed only when complete, so the last complete one is
never damaged.
"""

import os
import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    def __init__(self, rank: int, device):
        self.rank, self.device = rank, device
        self.signalled = None
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signalled is not None:
            print(f"rank {self.rank}: second signal ({name}): exiting now; the last complete checkpoint is intact",
                  flush=True)
            os._exit(128 + signum)
        self.signalled = name
        print(f"rank {self.rank}: got {name}: saving a checkpoint at the end of this step, then exiting", flush=True)

    def __enter__(self):
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        """Whether any rank has been signalled (called by every rank at the same step boundary)."""
        flag = torch.tensor([0.0 if self.signalled is None else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
