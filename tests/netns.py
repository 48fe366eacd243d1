"""One network namespace per test, entered by one thread: servers and clients on real sockets
with addresses that are not loopback, without touching the host's interfaces.

The namespace (``nbt-<random>-r``) holds only its own loopback interface, with 192.0.2.1,
192.0.2.10 (the advertised address of tests.conftest.write_config) and 192.0.2.60 (a "device")
added to it. A thread enters it with setns(2), which moves that thread only, and runs a whole
scenario on its own event loop. The namespace is deleted after the test.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

CLONE_NEWNET = 0x40000000
ADDRESSES = ("192.0.2.1", "192.0.2.10", "192.0.2.60")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@pytest.fixture
def namespace() -> Iterator[str]:
    ns = f"nbt-{secrets.token_hex(3)}-r"
    ip("netns", "add", ns)
    try:
        ip("-n", ns, "link", "set", "lo", "up")
        for address in ADDRESSES:
            ip("-n", ns, "addr", "add", f"{address}/32", "dev", "lo")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def in_namespace(ns: str, scenario: Any, *, seconds: float = 60) -> Any:
    """Run ``asyncio.run(scenario())`` on a thread that entered ``ns``; its result or error
    (``seconds`` at most: a browser's scenario takes longer than a socket's)."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            out["result"] = asyncio.run(asyncio.wait_for(scenario(), seconds))
        except BaseException as exc:  # reported on the test's thread
            out["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{ns}")
    thread.start()
    thread.join(seconds + 30)
    assert not thread.is_alive(), "the scenario in the namespace did not finish"
    if "error" in out:
        raise out["error"]
    return out["result"]


def until(predicate: Callable[[], bool], seconds: float) -> float | None:
    """Seconds until ``predicate`` held (polled every 50 ms), or None if not within
    ``seconds``."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def udp_sockets(ns: str, needle: str) -> int:
    """How many UDP sockets of ``ns`` have ``needle`` in their ``ss`` line (e.g. "%eth1:67",
    a socket bound to eth1 on port 67; "192.0.2.1:53")."""
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-uanH"], capture_output=True,
                         timeout=20, text=True, check=True).stdout
    return sum(needle in line for line in out.splitlines())
