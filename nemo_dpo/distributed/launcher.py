"""A rank started by torchrun ends when its torchrun ends.

torchrun starts each rank in a session of its own, so when the launcher alone is killed
(``kill -9``, the OOM killer) its ranks go on training, unseen, and race any restart for the
same log dir and GPUs. On Linux a process can ask the kernel for a signal when its parent
ends (``prctl(PR_SET_PDEATHSIG)``): each rank that torchrun started (torchrun sets
``TORCHELASTIC_RUN_ID`` in their environment) asks for SIGKILL. A SIGTERM would start the
preemption save instead, which needs every rank and can take minutes; whoever killed the
launcher wanted the job gone, and checkpoints are atomic, so a kill loses only the steps
since the last one (the run lock left behind is taken over as a dead process's).

Checked with psutil on torch 2.13: the ranks are direct children of the launcher process,
the one a user kills, whether started as ``torchrun`` (a shim or console script that execs
into it) or ``python -m torch.distributed.run``; nothing stands in between (torchrun's NUMA
binding prefixes the command with ``numactl``, which execs it). The kernel sends the signal
when the *thread* that started the child ends; torchrun starts (and restarts) its ranks
from its main thread, which lives as long as it does.

Not for a plain ``python examples/train_dpo.py`` or for ranks started by Slurm's ``srun``:
their parent is a shell or slurmstepd, whose end is not the end of the job.

The launcher may already be gone when the request is made (a rank spends seconds importing
torch first), and then the request is too late: the rank has a new parent. So the parent's
pid is noted when this module is imported, before those imports (cli/train.py imports it
first), and compared after the request.
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
PARENT_AT_IMPORT = os.getppid()


def follow_launcher(parent: int = PARENT_AT_IMPORT) -> bool:
    """Under torchrun on Linux, have this process killed when its launcher (``parent``) ends.

    Returns False if the launcher has already ended (the caller should exit), True otherwise.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    return os.getppid() == parent
