"""Peak resident memory of a child process, sampled while it runs (shared by the bench scripts)."""

import subprocess
import time

import psutil


def run_sampling_rss(args: list, interval: float = 0.01, **popen_kwargs) -> tuple:
    """Run ``args`` to completion; returns (exit status, peak resident bytes)."""
    proc = subprocess.Popen(args, **popen_kwargs)
    child, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, child.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(interval)
    return proc.wait(), peak
