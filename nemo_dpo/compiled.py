"""Functions compiled by ``torch.compile`` on first use, for rows of any length.

Compiling at import would cost every process that never calls the function.
Rows change length from step to step (padded to the step's longest, packed, or a
short last chunk), and a kernel compiled for one length would be compiled again
for the next: the kernels take their sizes as arguments (``dynamic=True``).
Inductor writes C++ kernels on CPU (built with the machine's compiler) and
Triton kernels on GPU, and caches them on disk, so later runs mostly load them.
"""

import torch

_compiled = {}


def compiled(fn):
    """``fn`` compiled (once per process) for inputs of any size."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]
