"""Socket helpers shared by the listeners."""

from __future__ import annotations

import socket
from pathlib import Path

from netboot.servers import sockets


def test_listener_receive_buffer_grows_for_a_storm() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        before = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        sockets.grow_receive_buffer(sock, 1 << 20)
        after = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    # Privileged (the tests run as root): past rmem_max; the kernel reports double what
    # was asked (its bookkeeping). Unprivileged: up to rmem_max, which may be the default.
    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    assert after >= 2 * (1 << 20) or after >= min(2 * rmem_max, 2 * (1 << 20)) > before
