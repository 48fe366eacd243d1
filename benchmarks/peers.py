"""Shared by the benchmarks: start a peer server, wait until it answers, stop it by its PID."""

from __future__ import annotations

import socket
import subprocess


def wait_for_udp_answer(host: str, port: int, request: bytes, *, tries: int = 50,
                        timeout: float = 0.2) -> bool:
    """Send ``request`` until anything comes back (bounded: ``tries`` times ``timeout``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        for _ in range(tries):
            s.sendto(request, (host, port))
            try:
                s.recvfrom(4096)
                return True
            except OSError:
                continue
    return False


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End a peer this benchmark started, by its own handle."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
