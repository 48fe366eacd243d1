"""tests/ports.py: a reserved port is given to no bind to port 0, and its server binds it."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path

import pytest

from tests.netns import in_namespace
from tests.ports import reserved_port

# The namespace's ephemeral range: ten ports, so that a few binds to port 0 are given every
# one of them (the host's ~28,000 would take a test of thousands, and still only probably).
RANGE = (40000, 40009)
HOST_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def binds_to_port_0(host: str, *, reuse: bool) -> set[int]:
    """Every port a bind to port 0 on ``host`` is given, the sockets kept until the kernel
    has none left to give (bounded: the range has ten)."""
    held: list[socket.socket] = []
    try:
        for _ in range(RANGE[1] - RANGE[0] + 5):
            sock = socket.socket()
            held.append(sock)
            if reuse:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, 0))
            except OSError:
                break
        return {s.getsockname()[1] for s in held if s.getsockname()[1]}
    finally:
        for sock in held:
            sock.close()


@pytest.mark.netns
@pytest.mark.root
@pytest.mark.requires("ip", "iproute2")
def test_a_reserved_port_is_given_to_no_other_bind_and_its_server_takes_it(
        namespace: str) -> None:
    host_range = HOST_RANGE.read_text()
    # The namespace's own setting (net.ipv4 is per namespace), written by a process in it.
    subprocess.run(["ip", "netns", "exec", namespace, "sh", "-c",
                    f"echo '{RANGE[0]} {RANGE[1]}' > {HOST_RANGE}"], check=True, timeout=20)
    assert HOST_RANGE.read_text() == host_range  # the host's is untouched

    async def scenario() -> None:
        # The probe it replaces: closed, its port is the next bind's as much as any.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            probed = probe.getsockname()[1]
        assert probed in binds_to_port_0("127.0.0.1", reuse=True)

        assert HOST_RANGE.read_text().split() == [str(n) for n in RANGE]  # this thread's
        port = reserved_port()
        assert RANGE[0] <= port <= RANGE[1]
        for host in ("127.0.0.1", "0.0.0.0"):
            for reuse in (True, False):
                given = binds_to_port_0(host, reuse=reuse)
                assert len(given) == RANGE[1] - RANGE[0]  # all the others
                assert port not in given, (host, reuse)
        # What a test's server does with it: bind it (SO_REUSEADDR) and serve.
        server = await asyncio.get_running_loop().create_server(
            asyncio.Protocol, "127.0.0.1", port, reuse_address=True)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            writer.close()
        finally:
            server.close()
            await server.wait_closed()

    in_namespace(namespace, scenario)
