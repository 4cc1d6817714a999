"""Run a function on N real processes (gloo on CPU, as torchrun would) and collect what each returns.

Each process gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); an exception on any rank fails the launch with that
rank's traceback.

A process that initialises several process groups one after another calls
``fresh_master_port()`` before each, as a new launch would get a new port.
Ports chosen before the launch are no good: reusing the launch's port can meet
the previous group's store.

``free_port()`` hands out ports below the kernel's ephemeral range. A port the
kernel picks (bind to port 0) is free only for that instant: between the pick
and the store listening on it (seconds, while the ranks import torch) any
outgoing connection on the machine, gloo's included, may be given it as its
local port, and the launch fails with EADDRINUSE. Ports below the range are
never given out that way, and each pytest-xdist worker draws from its own slice
of them, so the only other holder can be an earlier store of the same worker,
which the bind check sees.
"""

import os
import random
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_ports = None  # the launch's FileStore, through which rank 0 tells the others each fresh port
_rendezvous_count = 0


FIRST_PORT = 21000  # the Slurm template's jobs rendezvous on 20000 + job id (tests/test_slurm.py)


def _candidates() -> list:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_start = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return []  # not Linux: let the kernel pick
    ports = range(FIRST_PORT, ephemeral_start)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return list(ports[int(worker[2:]) % workers::workers])


def free_ports(n: int) -> list:
    """``n`` different ports that nothing listens on now and that no connection will be handed meanwhile."""
    chosen, held = [], []
    candidates = _candidates()
    random.SystemRandom().shuffle(candidates)  # not the tests' seeded `random`: every launch would pick the same
    try:
        for port in candidates + [0] * n:  # the kernel's pick only if the slice is exhausted
            if len(chosen) == n:
                break
            s = socket.socket()
            held.append(s)  # open until all n are found, so that they differ
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen.append(s.getsockname()[1])
    finally:
        for s in held:
            s.close()
    return chosen


def free_port() -> int:
    return free_ports(1)[0]


def fresh_master_port() -> None:
    """Set MASTER_PORT to a port rank 0 has just found free; every rank calls this at the same point."""
    global _rendezvous_count
    _rendezvous_count += 1
    key = f"port{_rendezvous_count}"
    if _ports is None or int(os.environ["RANK"]) == 0:
        port = str(free_port())
        if _ports is not None:
            _ports.set(key, port)
    else:
        port = _ports.get(key).decode()
    os.environ["MASTER_PORT"] = port


def _entry(rank, world_size, port, out_dir, fn, args):
    global _ports
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    _ports = dist.FileStore(os.path.join(out_dir, "ports"), world_size)
    result = fn(*args)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_world(world_size: int, out_dir: str, fn, *args) -> list:
    """``fn(*args)`` on ``world_size`` processes; returns the per-rank results in rank order."""
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "ports")):
        os.remove(os.path.join(out_dir, "ports"))
    mp.spawn(_entry, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
