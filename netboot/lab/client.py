"""A small JSON HTTP client whose sockets live inside a lab namespace.

netboot listens on 192.0.2.10 in ``<prefix>-srv``, which the host namespace cannot reach (by
design: nothing of the lab touches the host's network). Rather than spawning ``wget`` per
request, the socket is created inside the namespace (setns on the calling thread only) and
then used from here as usual.

Its connections come from 192.0.2.10, not loopback: netboot answers the API to such a peer
over HTTPS only (``http.plain_api``), so the client speaks HTTPS and verifies netboot's own CA
(``<data_dir>/tls/ca.pem``), as an operator's tools would.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netboot.lab.topology import LabError, connect_in_netns


class _NetnsConnection(http.client.HTTPConnection):
    def __init__(self, ns: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ns = ns

    def connect(self) -> None:
        self.sock = connect_in_netns(self._ns, self.host, self.port, self.timeout or 10.0)


class _NetnsTlsConnection(http.client.HTTPConnection):
    def __init__(self, ns: str, host: str, port: int, timeout: float,
                 context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ns = ns
        self._context = context

    def connect(self) -> None:
        sock = connect_in_netns(self._ns, self.host, self.port, self.timeout or 10.0)
        try:
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise LabError(f"HTTP {self.status}: not JSON: {self.body[:300]!r}") from exc


@dataclass
class ApiClient:
    ns: str
    host: str = "192.0.2.10"
    port: int = 8080
    token: str | None = None
    timeout: float = 10.0
    ca_file: Path | None = None  # HTTPS, verified against this CA; None: plain HTTP

    def _connection(self) -> http.client.HTTPConnection:
        if self.ca_file is None:
            return _NetnsConnection(self.ns, self.host, self.port, self.timeout)
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return _NetnsTlsConnection(self.ns, self.host, self.port, self.timeout, context)

    def request(self, method: str, path: str, body: Any = None) -> Response:
        conn = self._connection()
        headers = {"Accept": "application/json"}
        data: bytes | None = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return Response(resp.status, resp.read())
        finally:
            conn.close()

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Response:
        return self.request("POST", path, body)

    def expect(
        self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 201)
    ) -> Any:
        """Request and return the JSON body, raising with status and body when not ``ok``."""
        r = self.request(method, path, body)
        if r.status not in ok:
            raise LabError(f"{method} {path} -> HTTP {r.status}: {r.body[:500]!r}")
        return r.json() if r.body else None

    def wait_healthy(self, timeout: float = 30.0, path: str = "/healthz") -> None:
        """Poll ``path`` until 200 (bounded): netboot is up when its HTTP server answers."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                r = self.get(path)
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
            except (TimeoutError, OSError, http.client.HTTPException) as exc:
                last = str(exc)
            time.sleep(0.1)
        raise LabError(
            f"netboot not healthy within {timeout} s at {self.host}:{self.port}{path}: {last}"
        )
