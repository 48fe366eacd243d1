"""Shared by the benchmarks: start a peer server, wait until it answers, stop it by its PID."""

from __future__ import annotations

import contextlib
import secrets
import socket
import subprocess
from collections.abc import Iterator, Sequence


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


def ip(*args: str, stdin: str | None = None) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30, input=stdin,
                   text=True)


@contextlib.contextmanager
def veth_namespaces(prefix: str, server_if: str, client_if: str, server_ip: str,
                    client_ips: Sequence[str]) -> Iterator[tuple[str, str]]:
    """Two fresh network namespaces joined by a veth pair: (server, client). The pair is
    created inside the server namespace and its peer moved straight into the client's, so
    the host namespace never holds either end; both are deleted on the way out."""
    tag = secrets.token_hex(3)
    server, client = f"{prefix}-{tag}-s", f"{prefix}-{tag}-c"
    created: list[str] = []
    try:
        for ns in (server, client):
            ip("netns", "add", ns)
            created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", server, "link", "add", server_if, "type", "veth", "peer", "name", client_if,
           "netns", client)
        ip("-n", server, "addr", "add", f"{server_ip}/24", "dev", server_if)
        ip("-n", server, "link", "set", server_if, "up")
        ip("-n", client, "-batch", "-",
           stdin="".join(f"addr add {a}/24 dev {client_if}\n" for a in client_ips))
        ip("-n", client, "link", "set", client_if, "up")
        yield server, client
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True,
                           timeout=30)
