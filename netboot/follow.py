"""``netboot events --follow``: a running server's event stream, in the terminal.

Reads ``GET /api/v1/events/stream`` (Server-Sent Events, the dashboard's stream) with a token,
and prints one line per event: a human time, the machine, the kind and the message; or, with
``--json``, the event as one JSON object per line (``jq``-able). When the connection drops it
reconnects after the server's ``retry:`` delay, saying so on stderr; events recorded while it
was away are not replayed (``netboot events REF`` lists a machine's history).

Over HTTPS it trusts netboot's own CA (``ca_file``: the data dir's ``tls/ca.pem``, which the
CLI passes when it can read it) besides the system's; over plain HTTP from another host the
server refuses the API and says where its HTTPS is, which the error here repeats.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from netboot.errors import AuthError, NetbootError
from netboot.logs import printable

RECONNECT_SECONDS = 3.0

# The events after which a machine's name is asked again: the step that names it (approval,
# auto-enrollment, an import) makes a discovered machine, shown by its MAC, a hostname; an
# import that changes an enrolled machine (its hostname too) writes "updated" (without it,
# the old name stayed on every later line, s38-review3). An API edit (PATCH) writes no
# event: a follower started before it shows the name it was told.
RENAMING_KINDS = frozenset({"enrolled", "updated"})


def machine_name(body: dict[str, Any]) -> str:
    """What an operator knows a machine by, as the dashboard shows it: its hostname, else its
    first MAC (a discovered machine), else its id (one enrolled by serial, no NIC yet)."""
    macs = body.get("macs") or []
    return str(body.get("hostname") or (macs[0] if macs else "") or body["id"])


def event_line(event: dict[str, Any], *, as_json: bool, names: dict[str, str] | None = None,
               ) -> str:
    """One printed line: local ISO 8601 time with offset, machine, kind, message."""
    if as_json:
        return json.dumps(event, ensure_ascii=False, sort_keys=True)
    when = datetime.fromtimestamp(float(event["time"])).astimezone().isoformat(
        timespec="seconds")
    # A name is the server's (a hostname checked where it was written), but a line is a
    # terminal's: written as printable() as the message is (s38-review3).
    who = printable(str((names or {}).get(event["machine"], event["machine"])))
    # Messages come from devices too: one line each, whatever they contain, and no ESC or
    # other control character left to drive the terminal (s36-attack).
    message = printable(str(event.get("message", "")).replace("\n", "\\n")
                        .replace("\r", "\\r"))
    return f"{when}  {who}  {printable(str(event['kind']))}  {message}".rstrip()


def _session(ca_file: Path | None, **kwargs: Any) -> aiohttp.ClientSession:
    context: ssl.SSLContext | bool = True  # aiohttp's default: the system's CAs
    if ca_file is not None:
        context = ssl.create_default_context()
        context.load_verify_locations(cafile=str(ca_file))
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context), **kwargs)


async def _refusal(url: str, resp: aiohttp.ClientResponse) -> NetbootError:
    """The server's own reason (a 403 names the HTTPS URL to use), else the status."""
    try:
        body = await resp.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        body = None
    reason = body.get("error") if isinstance(body, dict) else None
    return NetbootError(f"{url}: HTTP {resp.status}" + (f": {reason}" if reason else ""))


async def sse_events(response: aiohttp.ClientResponse, place: list[str] | None = None
                     ) -> AsyncIterator[tuple[str, str]]:
    """(event type, data) of each message of an SSE stream (WHATWG HTML §9.2.6). ``place``,
    when given, holds the last event ID as EventSource keeps it (``id:``, set as a message
    is dispatched, kept until another), for the ``Last-Event-ID`` of a reconnect."""
    kind, data, seen = "message", list[str](), None
    async for raw in response.content:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if seen is not None and place is not None:
                place[:] = [seen]
            if data:
                yield kind, "\n".join(data)
            kind, data, seen = "message", list[str](), None
        elif line.startswith(":"):
            continue  # a comment: the server's keep-alive
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                kind = value
            elif field == "data":
                data.append(value)
            elif field == "id" and "\0" not in value:
                seen = value


async def follow(base_url: str, token: str, *, machine: str | None = None,
                 emit: Callable[[dict[str, Any]], None],
                 stop: Callable[[], bool] = lambda: False, err: TextIO = sys.stderr,
                 ca_file: Path | None = None, names: dict[str, str] | None = None) -> None:
    """Print events as they come until ``stop()`` (checked after each event) or Ctrl-C.

    ``machine`` (an id) keeps only that machine's events. ``names``, when given, is kept
    holding the :func:`machine_name` of each machine an emitted event names (for
    :func:`event_line`): asked of the server the first time a machine is seen and after a
    :data:`RENAMING_KINDS` event, not per event (a storm repeats the same machines).

    The stream is read on by itself while names are asked (up to :data:`NAME_LOOKUPS` at
    once), and each event is emitted in order once its machine's name is known: a storm of
    new machines watched from afar (a round trip per name) no longer holds the stream unread
    until the server's queue for this follower overflows and drops events (s38-review3).
    """
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with _session(ca_file, timeout=timeout) as http:
        read: asyncio.Queue[tuple[dict[str, Any], asyncio.Future[str] | None] | BaseException]
        read = asyncio.Queue()
        namer = _Namer(http, base_url, headers, names) if names is not None else None
        reader = asyncio.ensure_future(_read(http, base_url, headers, machine, read, namer, err))
        try:
            while True:
                item = await read.get()
                if isinstance(item, BaseException):
                    raise item
                event, name = item
                if name is not None and names is not None:
                    names[str(event.get("machine", ""))] = await name
                emit(event)
                if stop():
                    return
        finally:
            reader.cancel()
            if namer is not None:
                namer.cancel()
            await asyncio.gather(reader, return_exceptions=True)


async def _read(http: aiohttp.ClientSession, base_url: str, headers: dict[str, str],
                machine: str | None,
                out: asyncio.Queue[tuple[dict[str, Any], asyncio.Future[str] | None]
                                   | BaseException],
                namer: _Namer | None, err: TextIO) -> None:
    """The stream's events into ``out`` as they are read, each with the lookup of its
    machine's name when one is asked (reconnecting when the stream drops); an error that
    ends the follow (a refused token, a server never reached) is put there too."""
    url = f"{base_url.rstrip('/')}/api/v1/events/stream"
    connected = False
    # The last event's id: a reconnect sends it (Last-Event-ID), as a browser's EventSource
    # does, and the server gives the events of the gap, or says "missed".
    place: list[str] = []
    try:
        while True:
            try:
                resume = {"Last-Event-ID": place[0]} if place else {}
                async with http.get(url, headers={**headers, **resume}) as resp:
                    connected = True
                    if resp.status == 401:
                        raise AuthError("the server refused the token (--token-file)")
                    if resp.status != 200:
                        raise await _refusal(url, resp)
                    async for kind, data in sse_events(resp, place):
                        if kind == "missed":
                            print(f"netboot: {data} events were dropped (this terminal read "
                                  "too slowly, or the stream was away longer than the "
                                  "server keeps them)" if data != "0" else
                                  "netboot: events made while the stream was away are not "
                                  "shown: the server no longer has them (it restarted, or "
                                  "another server answers); `netboot events MACHINE` lists "
                                  "a machine's history", file=err)
                            continue
                        if kind != "machine":
                            continue
                        event = json.loads(data)
                        if machine is None or event.get("machine") == machine:
                            out.put_nowait((event, namer.ask(event) if namer else None))
            except aiohttp.ClientError as exc:
                if not connected:
                    # Never reached: a wrong URL or a stopped server, not a dropped stream.
                    raise NetbootError(f"cannot reach {base_url}: {exc} (is netboot serve "
                                       "running there? --server names it)") from exc
                print(f"netboot: {url}: {exc}; reconnecting in {RECONNECT_SECONDS:.0f} s",
                      file=err)
            else:
                print(f"netboot: {url}: stream ended; reconnecting", file=err)
            await asyncio.sleep(RECONNECT_SECONDS)
    except Exception as exc:  # handed to the caller, which raises it
        out.put_nowait(exc)


# How many machines' names are asked of the server at once while the stream is read on.
NAME_LOOKUPS = 8


class _Namer:
    """The name lookups of a follow: one per machine until an event may rename it, at most
    :data:`NAME_LOOKUPS` at once. ``known``: the names the caller knows already (asked only
    after a renaming event)."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str, headers: dict[str, str],
                 known: dict[str, str]) -> None:
        self._http, self._base, self._auth = http, base_url, headers["Authorization"]
        self._known = known
        self._asked: dict[str, asyncio.Future[str]] = {}
        self._slots = asyncio.Semaphore(NAME_LOOKUPS)

    def ask(self, event: dict[str, Any]) -> asyncio.Future[str] | None:
        """The lookup whose answer names ``event``'s machine; None where ``known`` has it."""
        ident = str(event.get("machine", ""))
        if event.get("kind") not in RENAMING_KINDS:
            asked = self._asked.get(ident)
            if asked is not None:
                return asked
            if ident in self._known:
                return None
        asked = self._asked[ident] = asyncio.ensure_future(self._name(ident))
        return asked

    async def _name(self, ident: str) -> str:
        async with self._slots:
            return await machine_name_of(self._http, self._base, self._auth, ident)

    def cancel(self) -> None:
        for asked in self._asked.values():
            asked.cancel()


async def machine_name_of(http: aiohttp.ClientSession, base_url: str, authorization: str,
                          ident: str) -> str:
    """The :func:`machine_name` of machine ``ident``, asked of the server. A machine the
    server no longer has (deleted since), or a request that fails, keeps its id: the line is
    printed all the same."""
    from urllib.parse import quote

    url = f"{base_url.rstrip('/')}/api/v1/machines/{quote(ident, safe='')}"
    try:
        async with http.get(url, headers={"Authorization": authorization},
                            timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status == 200:
                return machine_name(await resp.json(content_type=None))
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
        pass
    return ident


async def machine_id(base_url: str, token: str, ref: str, *,
                     ca_file: Path | None = None) -> str:
    """The id of the machine ``ref`` (a MAC, an id or its hostname) names, asked of the
    server. The API's {ref} is a MAC or an id; a hostname, which the CLI's other commands
    take (cli._hostname_refs), is then found by the API's search, its exact match."""
    from urllib.parse import quote

    base = base_url.rstrip("/")
    url = f"{base}/api/v1/machines/{quote(ref, safe='')}"
    auth = {"Authorization": f"Bearer {token}"}
    async with _session(ca_file) as http:
        async with http.get(url, headers=auth) as resp:
            if resp.status == 200:
                return str((await resp.json(content_type=None))["id"])
            refused, status = await _refusal(url, resp), resp.status
        if status == 400:  # neither a MAC nor an id: perhaps a hostname
            async with http.get(f"{base}/api/v1/machines", headers=auth,
                                params={"q": ref.strip(), "limit": "1000"}) as found:
                items = ((await found.json(content_type=None)).get("items", [])
                         if found.status == 200 else [])
            named = [m for m in items if m.get("hostname") == ref.strip().lower()]
            if len(named) == 1:
                return str(named[0]["id"])
        raise refused
