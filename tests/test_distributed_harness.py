"""The test harness's ports: outside the kernel's ephemeral range, one slice per pytest-xdist worker, never one
something listens on (a CI run failed once on a port the kernel had handed a connection meanwhile)."""

import socket

import pytest

import distributed_harness as harness


def ephemeral_start() -> int:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        return int(f.read().split()[0])


@pytest.mark.skipif(not harness._candidates(), reason="no /proc/sys/net/ipv4/ip_local_port_range (not Linux)")
def test_ports_lie_below_the_ephemeral_range_and_two_workers_never_share_one(monkeypatch):
    ports = harness.free_ports(8)
    assert len(set(ports)) == 8 and max(ports) < ephemeral_start()

    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    slices = []
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        slices.append(set(harness._candidates()))
        assert set(harness.free_ports(4)) <= slices[-1]
    assert slices[0] and slices[1] and not slices[0] & slices[1]


def test_a_port_something_listens_on_is_passed_over(monkeypatch):
    with socket.socket() as listening, socket.socket() as probe:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        probe.bind(("127.0.0.1", 0))
        taken, free = listening.getsockname()[1], probe.getsockname()[1]
        probe.close()
        monkeypatch.setattr(harness, "_candidates", lambda: [taken, free])
        assert harness.free_port() == free
