"""Receiving on a non-blocking UDP socket with any event loop.

``loop.sock_recvfrom`` / ``sock_sendto`` are not implemented by uvloop, which netboot may run
on (``server.event_loop``); the test clients use these instead so that the same tests drive
the servers on either loop.
"""

from __future__ import annotations

import asyncio
import socket


async def recvfrom(sock: socket.socket, size: int) -> tuple[bytes, tuple[str, int]]:
    """One datagram from the non-blocking ``sock`` (callers bound the wait with a timeout)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, addr = sock.recvfrom(size)
        except (BlockingIOError, InterruptedError):
            pass
        else:
            return data, (addr[0], addr[1])
        ready = loop.create_future()
        loop.add_reader(sock.fileno(), _wake, ready)
        try:
            await ready
        finally:
            loop.remove_reader(sock.fileno())


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)
