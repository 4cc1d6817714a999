"""nemo_dpo/distributed/init.py: a plain ``python`` run (a world of one, as convert, the bench and a debugging
session start) rendezvouses on a port the kernel picks, so that it starts while another holds torchrun's 29500."""

import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a process of its own: the world is process-global

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORLD = """
import torch, torch.distributed as dist
from nemo_dpo.distributed.init import destroy_distributed, init_distributed
init_distributed(1, 1, seed=0)
value = torch.ones(1)
dist.all_reduce(value)
print("world", dist.get_world_size(), value.item())
destroy_distributed()
"""


def test_a_world_of_one_starts_while_the_default_port_is_taken():
    launch_env = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in launch_env}
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            holder.bind(("127.0.0.1", 29500))
            holder.listen()
        except OSError:
            pass  # another process listens there: taken either way
        proc = subprocess.run([sys.executable, "-c", WORLD], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 0 and "world 1 1.0" in proc.stdout, proc.stderr[-3000:]
