"""Run a function on N real processes (gloo on CPU, as torchrun would) and collect what each returns.

Each process gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); an exception on any rank fails the launch with that
rank's traceback.

A process that initialises several process groups one after another calls
``fresh_master_port()`` before each, as a new launch would get a new port.
Ports chosen before the launch are no good: by the time a later group
rendezvouses, gloo's connections may have taken them as ephemeral ports
(EADDRINUSE), and reusing the launch's port can meet the previous group's store.
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_ports = None  # the launch's FileStore, through which rank 0 tells the others each fresh port
_rendezvous_count = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
