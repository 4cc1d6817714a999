"""Functions compiled by ``torch.compile`` on first use, for rows of any length.

Compiling at import would cost every process that never calls the function.
Rows change length from step to step (padded to the step's longest, packed, or a
short last chunk), and a kernel compiled for one length would be compiled again
for the next: the kernels take their sizes as arguments (``dynamic=True``).
Inductor writes C++ kernels on CPU (built with the machine's compiler) and
Triton kernels on GPU, and caches them on disk, so later runs mostly load them.
Compiling costs seconds of the first step that uses a kernel (forward and
backward are compiled when first run): :func:`seconds_compiling` says how many,
from dynamo's own accounting, so that the trainer can report it.
"""

import torch
from torch._dynamo.utils import calculate_time_spent

_compiled = {}


def compiled(fn):
    """``fn`` compiled (once per process) for inputs of any size."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


def seconds_compiling() -> float:
    """Wall time this process has spent in ``torch.compile`` so far (every compiled function, forward and
    backward graphs, loads from inductor's disk cache included)."""
    return calculate_time_spent().get("total_wall_time", 0.0)
