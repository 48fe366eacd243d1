"""Enrollment: single machines, bulk import, approval, auto-enrollment, progress, registration.

Each step is stored with its time as an event, so that ``netboot machines show`` tells where a
device stands and why. Which state a step leads to, and which steps a state refuses, is the
table in :mod:`netboot.lifecycle`; this module only says which step happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import operator
import re
import secrets
import sys
import time
from collections import OrderedDict
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, replace
from typing import Any, NoReturn, TypeGuard

import yaml

from netboot import identity, lifecycle
from netboot.addresses import AddressChoice, IPAddress, check_fixed_ipv4
from netboot.addresses import choose as choose_address
from netboot.claims import KeptClaims, RefusedClaims
from netboot.discovery import TokenBuckets
from netboot.errors import (
    DECIDE_ATTEMPTS,
    AuthError,
    Conflict,
    NotFound,
    RateLimited,
    ScopeRequired,
    StateChanged,
    ValidationError,
    caused,
)
from netboot.groups import machine_labels
from netboot.groups import select as select_group
from netboot.identity import Identity
from netboot.inventory import codec
from netboot.inventory.base import (
    Batch,
    FixedLock,
    GroupCounts,
    GroupsKept,
    MachineFilter,
    Store,
    batch_of,
    by_state,
    fold_hostname,
)
from netboot.inventory.codec import NewMachines
from netboot.logs import log_line, printable
from netboot.model import (
    ID_PREFIX,
    NO_ENTRIES,
    AuditEntry,
    Event,
    Group,
    MacAddress,
    Machine,
    MachineState,
    Role,
    equal,
    event_of,
    replace_machine,
)
from netboot.recorder import Recorder
from netboot.tokens import TokenSource

_HOSTNAME = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$")
_NOT_IN_HOSTNAME = re.compile(r"[^a-z0-9-]+")
MAX_EVENT_KIND = 64
MAX_EVENT_MESSAGE = 2048
# Machines whose report budgets are kept (the least recently reporting forgotten: it starts
# again with a full burst), and whose run of refusals is remembered (told once).
_REPORT_BUDGETS = 16_384
# How many of a machine's newest events are looked through for the ``token expired`` event
# already written for its token (by another process, before a restart).
_EXPIRED_SEEN = 20
# Said by the registration of a machine whose register command keeps no machine token (the
# marker-only one configs rendered before session 37 carry): its answer holds none (that
# command prints it to the boot log: api._registered_out), so its later boots report nothing.
_OLDER_COMMAND = ("; its register command is an older netboot's (it keeps no machine token): "
                  "its later boots will not report a new address until 'netboot machines "
                  "reinstall' renders the current one")
# How long after its registration a repeat with the spent install token may come from another
# address and be taken as the device (Enroller._moved_before_its_answer): the register
# command's own retries, 360 tries 10 s apart (content.register_texts), an hour.
REPEAT_ELSEWHERE_SECONDS = 3600
# A repeat refused for another install's secret (or none) is told as a "registration
# contested" event: at most CONTEST_BURST a machine at once, one every CONTEST_EVERY seconds
# after, so that a flood of them (the spent token is in the config: anyone who read it can
# post it, from as many addresses as it has) cannot fill the store or push out the history;
# the same claim from the same place again is told once.
CONTEST_BURST = 5
CONTEST_EVERY = 60.0
# A machine's script or config that failed to render is a "render failed" event (its file,
# line and fix), which a device asking again every few seconds (iPXE's retry, an installer's
# loop, a DHCP-iPXE cycle between other events) must not repeat into the store: the same
# saying as the machine's newest event is dropped (Recorder.note), and at most
# RENDER_FAILED_BURST a machine at once, one every RENDER_FAILED_EVERY seconds after.
RENDER_FAILED_BURST = 3
RENDER_FAILED_EVERY = 600.0
# A later boot of a known machine refused for its machine token (a reinstall standing, a
# backup restored from before its registration, a reinstall that kept no secret) is a
# "registration refused" event, which the node's register command repeating its try (30
# tries a boot, every boot) or a host posting the MAC must not repeat into the store: the same
# saying as the machine's newest event is dropped, and at most REFUSED_BOOT_BURST a machine at
# once, one every REFUSED_BOOT_EVERY seconds after.
REFUSED_BOOT_BURST = 3
REFUSED_BOOT_EVERY = 600.0
# Where a render error names its template's line (render._line_at: ", line N" and, for an
# included template's, " of FILE").
_RENDER_LINE = re.compile(r", line (\d+)(?: of ([^:]+))?:")
# The newest events of a machine read to find the claim an operator gives it to (claim).
_CLAIMS_SEEN = 200
# The kept claims (netboot.claims) a NotFound of claim names, the most tried first: where an
# operator finds the device's when a flood used its events up (s40-claim).
_CLAIMS_TOLD = 5
# The events that begin a registration's hold of a machine: claims refused before the newest
# are not given it (give_to_claim).
_HOLDERS = frozenset({"registered", "registration claimed"})
# The events whose claim give_to_claim gives a machine to: a registration's repeat refused
# for another install's secret, and a later boot of a machine the inventory knows as
# installed only (a restored backup: Enroller._refused_boot).
_CLAIMING = frozenset({"registration contested", "registration refused"})
# The states of a machine whose node may run an install the inventory lost (a backup of
# before its install restored): told to mark it installed, then claim (_refused_boot).
_LOST_INSTALL = frozenset({MachineState.ENROLLED, MachineState.BOOTING,
                           MachineState.INSTALLING})
# The newest events of a machine read to find its registration's (a registered machine writes
# a few: its repeats are told once a place, its later boots only when its address moves).
_REGISTERED_SEEN = 50

# Event kinds an installer may post that are lifecycle steps; any other kind is only recorded.
REPORTED_STEPS: Mapping[str, lifecycle.Trigger] = {
    "installing": lifecycle.Trigger.INSTALLING,
    "installed": lifecycle.Trigger.INSTALLED,
    "failed": lifecycle.Trigger.FAILED,
}
# Kinds of the events netboot writes itself (a report's kind is a word: those with spaces,
# "token withheld", need no entry), the lifecycle's other steps and its states: refused as
# a report's kind. A device's token (it crossed plain HTTP in the config URL) wrote
# "registered" or "reinstall" on a machine still installing, which the timeline showed and
# the metrics counted as netboot's own record (s33-attack).
# The writers keep their literals; tests/test_enroll.py reads netboot's source for every kind
# written and fails on one missing here.
NETBOOT_KINDS = frozenset(kind for kind in (
    "enrolled", "discovered", "merged", "nic-attached", "install-plan", "local-boot", "hold",
    "dhcp", "config", "registered", "reinstall", "updated", "rendered",
    *(t.value for t in lifecycle.Trigger), *(s.value for s in MachineState),
) if kind not in REPORTED_STEPS)


def hostname_ok(name: str) -> bool:
    """Whether a device's name for itself (DHCP option 12, the hostname a registration
    reports) is an RFC 1123 host name: labels of letters, digits and '-' (not at either end),
    at most 63 each, at most 253 in all. Not lowered: a name in capitals is still one."""
    return len(name) <= 253 and _HOSTNAME.fullmatch(name.lower()) is not None


def check_hostname(name: str, field_name: str = "hostname") -> str:
    lowered = name.strip().lower()
    if len(lowered) > 253 or not _HOSTNAME.match(lowered):
        raise ValidationError(
            field_name, f"{name!r} is not a valid hostname (letters, digits, '-', max 63 a label)"
        )
    return lowered


# The states in which an install token opens anything: from the script that issued it until
# the installed OS registers. failed keeps it so that the installer's retried report, and any
# config or registration it still tries, is answered with the state that refuses it.
TOKEN_STATES = frozenset({MachineState.BOOTING, MachineState.INSTALLING, MachineState.INSTALLED,
                          MachineState.FAILED})
# Looked up once: Python 3.11 finds an enum member through EnumType at each use (~870
# instructions, callgrind), and every first config fetch takes this step (session 32).
_FETCHED = lifecycle.Trigger.CONFIG_FETCHED
_REGISTERED = MachineState.REGISTERED
_DISCOVERED = MachineState.DISCOVERED
# An import row of a caller that may only enroll (Enroller.import_rows' create_only).
_ENROLLED_ALREADY = ("names a machine in the inventory already: changing a machine needs "
                     "scope operator")
# ... and what it may not make: a k3s server is a cluster's control plane (the first one
# forms it and becomes its endpoint, where every later node sends its join token, and a
# server's config carries the cluster's k3s CA key). Tinkerbell's Hardware makes nothing run
# until a Workflow names it; here a server is an operator's choice, or an admin's through a
# group (s39-attack).
SERVER_NEEDS_OPERATOR = ("a server node of a cluster needs scope operator (a scanner's token "
                         "enrolls agents; a group an admin made may give the role)")
# ... nor change through an approval: approving an enrolled machine not yet booted sets its
# cluster, role, profile and hostname, which PATCH and an import refuse such a token.
_APPROVED_ALREADY = ("is enrolled already: changing its cluster, role, profile or hostname "
                     "needs scope operator")


def unknown_ref(kind: str, name: str, known: Iterable[str] = ()) -> str:
    """A machine's (or an import row's) cluster or profile that the inventory has not: the
    name of ``known`` it is likely a slip for, and the way out, as the house's other
    refusals give theirs ("unknown cluster 'egde'" alone left an operator to find the
    add command or the typo, s47-review, s48-review)."""
    # Imported on a refusal only, as config.py does for a misspelt key: serve starts
    # without difflib (test_http_doorway's start-up imports).
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    slip = f" (did you mean {close[0]!r}?)" if close else ""
    add = ("--server-url managed|https://SERVER:6443" if kind == "cluster"
           else "--kernel PATH --initrd PATH")
    return (f"unknown {kind} {name!r}{slip}: add it first (netboot {kind}s add "
            f"{printable(name)} {add}, POST /api/v1/{kind}s), or give one that exists "
            f"(netboot {kind}s ls)")


def enroll_only_refusal(machine: Machine, *, cluster: str | None, role: Role | None,
                        profile: str | None, hostname: str | None) -> ScopeRequired | None:
    """Why a caller that may enroll but not change machines (an ``enroll`` token) may not
    approve ``machine`` so, or None: a server never, a discovered machine as it likes, an
    enrolled one only by a repeat that changes nothing (an approval whose answer was lost)."""
    if role is Role.SERVER:
        return ScopeRequired("operator", SERVER_NEEDS_OPERATOR)
    if machine.state is MachineState.DISCOVERED or (
            machine.hostname and hostname in (None, machine.hostname)
            and cluster in (None, machine.cluster) and role in (None, machine.role)
            and profile in (None, machine.profile)):
        return None
    return ScopeRequired("operator", f"{machine.ref} {_APPROVED_ALREADY}")


def token_is(machine: Machine, token: str | None) -> bool:
    """Whether ``token`` is this machine's install token (constant-time; no expiry, no state)."""
    if not token or not machine.token_hash:
        return False
    digest = hashlib.sha256(token.encode()).hexdigest()
    return hmac.compare_digest(digest, machine.token_hash)


def secret_proves(machine: Machine, secret: str | None) -> bool | None:
    """Whether ``secret`` is the one the register command of ``machine``'s install sent
    with its registration (constant-time, against the digest kept): None when it sent none
    (an older command, or one that could not keep a file), and the older rules decide."""
    held = machine.secret_hash
    if not held:
        return None
    digest = hashlib.sha256(secret.encode()).hexdigest() if secret else ""
    return hmac.compare_digest(digest, held)


# The states whose install's secret digest a reinstall keeps (see Enroller.reinstall): a
# registered machine's, and one asked again before its next install.
_KEEP_SECRET = frozenset({MachineState.REGISTERED, MachineState.REINSTALL})


def _taken_back(machine: Machine, secret: object) -> bool:
    """Whether a later boot refused for its machine token is the node of a reinstall the
    operator took back: the machine is ``installed`` by an operator's word alone (no install
    token: mark-installed from ``reinstall``), and ``secret`` is the one its registered
    install's register command sends with every try (root's alone on the node), whose digest
    the reinstall kept. Else that node was refused at every boot and never registered again:
    a server of it left its cluster's endpoint and DNS name, and every node installed next
    was held waiting for a first server that ran all along."""
    return (machine.state is MachineState.INSTALLED and machine.token_hash is None
            and isinstance(secret, str) and bool(secret_proves(machine, secret)))


def machine_token_is(machine: Machine, token: str) -> bool:
    """Whether ``token`` is the machine token of a registered ``machine`` (constant-time).

    Registration answers it and keeps it in ``install_token``, where the install token was:
    only in state registered is that field a machine token (a reinstall clears it, and the
    next install puts an install token there, which this never takes)."""
    held = machine.install_token
    return (machine.state is _REGISTERED and bool(held) and held is not None
            and hmac.compare_digest(held.encode(), token.encode()))


def _registered_from(machine: Machine, peer: IPAddress | None,
                     choice: AddressChoice) -> bool | None:
    """Whether a registration made again comes from where ``machine`` registered: True from
    its address; None reporting it, which counts only where the registration's own request
    came from the same peer (its event's, for the caller to read: netboot behind a proxy on
    this host, every request from 127.0.0.1 and the report all there is); else False.

    A report stood for the address from any peer: whoever held the spent install token (in
    the config, which crossed plain HTTP) got the machine token from a link-local or IPv6
    peer or from this host, and with it the machine's address and a server's endpoint
    (s38-attack)."""
    at = machine.ipv4
    if at is None:
        return False
    if peer is not None and str(peer) == at:
        return True
    if peer is None or choice.ipv4 is None or str(choice.ipv4) != at:
        return False
    return None


def token_expired(machine: Machine, now: float) -> bool:
    return machine.token_expires is not None and now > machine.token_expires


def token_matches(machine: Machine, token: str | None, now: float) -> bool:
    """An install token that is the machine's, unexpired, during its install: what may post
    the installer's progress reports (a registered machine's old token posts nothing)."""
    return (machine.state in TOKEN_STATES and token_is(machine, token)
            and not token_expired(machine, now))


class _TemplateFields(dict[str, str]):
    def __missing__(self, key: str) -> str:
        raise ValidationError("hostname_template", f"unknown field {{{key}}}")


def render_hostname(template: str, machine: Machine, *, cluster: str | None = None,
                    role: str | None = None) -> str:
    mac = machine.mac
    # A machine enrolled by serial has no NIC known yet; the tail of its id stands in, so
    # "node-{mac_suffix}" still gives a unique, stable name.
    suffix = mac.suffix if mac else machine.id[-6:]
    fields = _TemplateFields(
        mac=mac.hexhyp if mac else machine.id, mac_hexhyp=mac.hexhyp if mac else machine.id,
        mac_suffix=suffix, mac_hexraw=mac.hexraw if mac else machine.id,
        serial=(machine.serial or machine.facts.get("serial", "")),
        uuid=(machine.uuid or "")[:8], asset=machine.asset or "",
        cluster=cluster or machine.cluster or "", role=role or str(machine.role or ""),
        product=machine.facts.get("product", ""),
    )
    try:
        raw = template.format_map(fields)
    except (ValueError, IndexError, AttributeError, TypeError) as exc:
        # "{mac.x}" or "{serial:d}" fail at format time; a bad operator template is a 400 or
        # a start-up error (check_hostname_template), never a 500 in a device's boot request.
        raise caused(ValidationError("hostname_template", f"{template!r}: {exc}"), exc) from exc
    cleaned = _NOT_IN_HOSTNAME.sub("-", raw.lower()).strip("-")
    if not cleaned:
        raise ValidationError("hostname_template", f"{template!r} gave an empty name")
    return cleaned[:63].rstrip("-")


def check_hostname_template(template: str) -> str:
    """Refuse a template with unknown fields or bad syntax before any machine needs it."""
    sample = Machine(macs=(MacAddress(bytes(6)),), serial="s", uuid="u", asset="a",
                     facts={"product": "p"})
    render_hostname(template, sample, cluster="c", role="r")
    return template


@dataclass(frozen=True)
class RowError:
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.message}"


_RUNS_ITS_NAME = frozenset({MachineState.INSTALLING, MachineState.INSTALLED,
                            MachineState.REGISTERED})


def renamed_installed(before: Machine, after: Machine) -> str | None:
    """What to tell of a machine renamed once its installer fetched its config, else None:
    the hostname and k3s ``--node-name`` were written into its installed OS then, and its
    register command sends that node name at every boot (its ``node_name`` fact). The
    inventory, the dashboard and netboot's DNS take the new name at once; the node keeps the
    old one until it installs again. `kubectl get node rack2-a` found nothing after the CLI
    said only ``hostname rack2-a`` (s47-review); the API's PATCH said nothing at all (its
    answer's ``warnings`` now, s48-review); an import's rows said nothing (its report's
    ``warnings`` now, s49-ha)."""
    runs = after.facts.get("node_name")  # none from an older netboot's register command
    if after.state not in _RUNS_ITS_NAME or after.hostname in (before.hostname, runs):
        return None
    named = f"as {printable(runs)}" if runs else "under the name it installed with"
    return (f"{after.hostname or after.ref} still runs {named}: its installed OS keeps that "
            f"hostname and k3s node name until it installs again (netboot machines reinstall "
            f"{after.ref}); netboot's DNS name and views follow the new one now")


@dataclass(frozen=True)
class ImportReport:
    created: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    errors: tuple[RowError, ...] = ()
    applied: bool = False
    # What the operator should know of rows that are right (a rename of an installed
    # machine: renamed_installed), as PATCH's answer and `machines set` say it.
    warnings: tuple[RowError, ...] = ()

    def as_dict(self, most_errors: int | None = None) -> dict[str, Any]:
        """The report as JSON shapes it; ``most_errors``: list at most that many bad rows
        (the first by line) and count them all in ``errors_total``, present only then."""
        shown = self.errors if most_errors is None else self.errors[:most_errors]
        out = {
            "created": list(self.created), "changed": list(self.changed),
            "unchanged": list(self.unchanged), "applied": self.applied,
            "errors": [{"line": e.line, "field": e.field, "message": e.message}
                       for e in shown],
        }
        if len(shown) < len(self.errors):
            out["errors_total"] = len(self.errors)
        if self.warnings:  # bounded as errors are: a file renaming 100,000 installed ones
            told = self.warnings if most_errors is None else self.warnings[:most_errors]
            out["warnings"] = [{"line": w.line, "field": w.field, "message": w.message}
                               for w in told]
            if len(told) < len(self.warnings):
                out["warnings_total"] = len(self.warnings)
        return out


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while an import builds and writes its machines.

    A bulk import allocates about a million container objects (machines, their label dicts,
    events, tuples) that all live until the commit and form no cycles; the collector's
    generational heuristics scanned them again and again: 1.2 s of a 100,000-row import's
    ~14 s of CPU. Other tasks of the process run meanwhile without it for those seconds,
    which only delays reclaiming their cycles. Turned back on only by the import that turned
    it off (two at once: the first to end does; one that found it off leaves it off).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_SORTED_IDS = 1 << 20
# Import rows checked between two turns of the event loop (Enroller._import_rows): ~4-10 ms.
_ROWS_PER_TURN = 1000


def _new_ids(expected: int) -> Iterator[str]:
    """Ids for an import's new machines, as :func:`netboot.model.new_machine_id` makes them
    (``m-`` and 12 random hex digits, from the same source), drawn at once rather than by a
    system call per row; the first ``expected`` in increasing order.

    Why in order: the machines go into the store in the file's order, and every table and
    index keyed by machine id (the machines themselves, their labels and identifiers, their
    events) then grows at its end instead of at a random page per row, which SQLite reads
    and writes again and again: ~2 of its ~5 s of CPU for 100,000 rows. The ids are as
    random as before as a set; only which row gets which follows the file. Past
    ``expected`` (a low guess) or a million, random order, 4,096 at a time.
    """
    # Bounded (~40 MB at most): the guess counts lines, and blank lines are no machines.
    raw = secrets.token_bytes(6 * min(max(expected, 0), _SORTED_IDS))
    # Held as numbers until used (a third of the memory of their text, for a file of updates).
    for number in sorted(int.from_bytes(raw[i:i + 6], "big") for i in range(0, len(raw), 6)):
        yield f"{ID_PREFIX}{number:012x}"
    while True:
        digits = secrets.token_bytes(6 * 4096).hex()
        for i in range(0, len(digits), 12):
            yield ID_PREFIX + digits[i:i + 12]


# Roles by name: calling the enum class is ten times slower than a dict look-up, per row of
# a bulk import.
_ROLES: Mapping[str, Role] = {role.value: role for role in Role}

IMPORT_FIELDS = ("mac", "macs", "hostname", "serial", "asset", "uuid", "cluster", "role",
                 "profile", "labels", "fixed_ipv4")
_IMPORT_FIELDS = frozenset(IMPORT_FIELDS)


def import_macs(row: Mapping[str, Any]) -> tuple[MacAddress, ...]:
    """The NICs of an import row: ``mac`` and ``macs`` (a list, or text split on ``;``, ``,``
    or spaces, as a CSV cell holds it), in that order; a repeated MAC names its field."""
    texts: list[tuple[str, str]] = []
    if row.get("mac"):
        texts.append(("mac", str(row["mac"])))
    value = row.get("macs")
    if isinstance(value, str):
        texts += [("macs", t) for t in re.split(r"[;,\s]+", value) if t]
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ValidationError(f"macs[{i}]", f"must be text, got {type(item).__name__}")
            texts.append(("macs", item))
    elif value is not None:
        raise ValidationError("macs", "a list of MACs, or text separated by ';'")
    out: list[MacAddress] = []
    for field_name, text in texts:
        try:
            mac = MacAddress.parse(text)
        except ValidationError as exc:
            raise caused(ValidationError(field_name, exc.message), None) from None
        if mac in out:
            raise ValidationError(field_name, f"{mac} is listed twice")
        out.append(mac)
    return tuple(out)


def parse_import(text: str, fmt: str) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a CSV, YAML or JSON import file, each with the line it starts on."""
    return list(iter_import(text, fmt))


def iter_import(text: str, fmt: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """:func:`parse_import` row by row: a CSV file is read as the import goes, so that
    100,000 rows are never held as dictionaries all at once. A malformed file raises
    ValidationError when it is reached (the header at the first row). Its length hint
    (``operator.length_hint``) is the number of lines, as many as the rows or more."""
    return _Rows(_iter_import(text, fmt), text.count("\n") + 1)


class _Rows(Iterator[tuple[int, dict[str, Any]]]):
    """Rows read as they are asked for, with a guess at how many there are."""

    def __init__(self, rows: Iterator[tuple[int, dict[str, Any]]], hint: int) -> None:
        self._rows = rows
        self._hint = hint

    # Any, not the tuple: mypyc (setup.py's NETBOOT_MYPYC=1) generates C for a native
    # __next__ returning a tuple that does not compile.
    def __next__(self) -> Any:
        return next(self._rows)

    def __length_hint__(self) -> int:
        return self._hint


def _iter_import(text: str, fmt: str) -> Iterator[tuple[int, dict[str, Any]]]:
    if fmt == "csv":
        yield from _csv_rows(text)
    elif fmt in ("yaml", "yml", "json"):
        yield from _document_rows(text, fmt)
    else:
        raise ValidationError("format", f"{fmt!r} is not csv, yaml or json")


def _csv_rows(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    # Imported by a CSV import only: serve (which imports this module for its Enroller) does
    # not load csv and its C module until an import is posted to it.
    import csv

    reader = csv.reader(_lines(text))
    # Blank lines before the header are skipped, as after it: a spreadsheet's export often
    # starts with one (or a row of empty cells, ",,,"), which was read as a header of no
    # columns, and the real header as a row of "more values than header columns".
    header, header_line = next(reader, None), 1  # the line the header starts on
    while header is not None and not any(cell.strip() for cell in header):
        header_line = reader.line_num + 1
        header = next(reader, None)
    if header is None:
        raise ValidationError("file", "empty CSV file (need a header row with 'mac')")
    # What each column is, decided once from the header rather than per cell: (index, name,
    # how its value is read). A name given twice counts once, by its last column, in the order
    # of its first, as csv.DictReader's dict of a row has it.
    last = {raw: i for i, raw in enumerate(header)}
    columns: list[tuple[int, str, int]] = []
    # The header's name of each field (and label) so far: two names of one ("MAC" and
    # "mac", "label.rack" and "Labels.rack") were two columns whose later value won, the
    # earlier's dropped without a word. Refused at the header, naming both (which one is
    # meant is the operator's to say).
    named: dict[tuple[int, str], str] = {}
    for raw, i in last.items():
        key = raw.strip()
        # A factory's or a spreadsheet's header says "MAC", "Serial", "Label.rack": the
        # fields by any case (a label's own name kept as written). JSON and YAML keys are
        # the format's own, exact.
        if key.lower() in _IMPORT_FIELDS:
            key = key.lower()
        if key.lower().startswith(("label.", "labels.")):
            column = (i, key.split(".", 1)[1], _LABEL_COLUMN)
        elif key == "labels":
            column = (i, key, _LABELS_COLUMN)
        else:
            column = (i, key, _PLAIN_COLUMN)
        _, name, kind = column
        if name:  # empty names (trailing commas) are no column: see below
            first = named.setdefault((kind, name), raw)
            if first != raw:
                what = f"label {name}" if kind == _LABEL_COLUMN else name
                raise ValidationError("file", f"columns {first!r} and {raw!r} are both "
                                      f"{what}: keep one", line=reader.line_num)
        columns.append(column)
    # A column no field is named once, at the header's line: refused by each row's check, a
    # factory's 1,000-row file with a "Location" column printed 1,000 lines. An empty name
    # (a trailing comma) is no column unless a row puts a value under it.
    unknown = [key for _, key, kind in columns if kind == _PLAIN_COLUMN and key
               and key not in _IMPORT_FIELDS]
    if unknown:
        raise ValidationError("file", f"{unknown[0]}: unknown column (known: "
                              + ", ".join(IMPORT_FIELDS) + ", label.NAME)",
                              line=reader.line_num)
    width = len(header)
    for row in reader:
        if not row:
            continue  # a blank line is no row (csv.DictReader skips it too)
        if len(row) < width:
            row.extend([""] * (width - len(row)))  # missing trailing cells are empty
        clean: dict[str, Any] = {}
        labels: dict[str, str] = {}
        bad_labels: ValidationError | None = None
        for i, key, kind in columns:
            value = row[i].strip()
            if not value:
                continue
            if kind == _PLAIN_COLUMN:
                clean[key] = value
            elif kind == _LABEL_COLUMN:
                labels[key] = value
            else:
                for pair in value.split(";"):
                    k, sep, v = pair.partition("=")
                    if not sep:
                        # The row's error, listed with the others' by import_rows
                        # (_row_values), not the end of the file's reading: the operator
                        # fixes every bad row in one go.
                        bad_labels = ValidationError("labels", f"{pair!r} is not key=value")
                        break
                    labels[k.strip()] = v.strip()
        if bad_labels is not None:
            clean["labels"] = bad_labels  # named before extra values on its line, as before
            yield reader.line_num, clean
            continue
        # After the row's own cells, as csv.DictReader files extra values last. Empty ones
        # are no values: a spreadsheet's export or a hand-edited row ending in a comma.
        if len(row) > width and any(cell.strip() for cell in row[width:]):
            # Where the header was, when blank lines before it were skipped: the line an
            # operator would count from is not the first.
            raise ValidationError("file", "more values than header columns" + (
                f" (header: line {header_line})" if header_line > 1 else ""),
                line=reader.line_num)
        if labels:
            clean["labels"] = labels
        yield reader.line_num, clean


_PLAIN_COLUMN, _LABEL_COLUMN, _LABELS_COLUMN = range(3)


def _lines(text: str) -> Iterator[str]:
    """The lines of ``text`` with their ends, as ``io.StringIO(text)`` reads them (split
    at "\\n" only), one at a time: a StringIO holds a copy of the text at four bytes a
    character (45 MiB for a 100,000-row file, a quarter of an import's peak)."""
    start, end = 0, len(text)
    while start < end:
        stop = text.find("\n", start)
        stop = end if stop < 0 else stop + 1
        yield text[start:stop]
        start = stop


def _document_rows(text: str, fmt: str) -> list[tuple[int, dict[str, Any]]]:
    try:
        if fmt == "json":
            data, lines = _json_with_lines(text)
        else:
            # BaseLoader keeps every scalar a string: YAML 1.1 would read an unquoted
            # 52:54:00:00:00:01 as a base-60 integer and lose the MAC.
            # Parsed once: the items' lines come from the node the data is made of (it was
            # composed, then loaded, a second parse of the whole file: PyYAML's parser is
            # pure Python, ~10 s a 1 MiB file of 340,000 empty mappings each time; s38-attack).
            # What yaml.load does, keeping the node.
            loader = yaml.BaseLoader(text)
            try:
                node = loader.get_single_node()
                data = None if node is None else loader.construct_document(node)
            finally:
                loader.dispose()
            lines = _yaml_item_lines(node)
    except json.JSONDecodeError as exc:
        raise caused(ValidationError("file", f"cannot parse json: {exc.msg} (column "
                                     f"{exc.colno})", line=exc.lineno), exc) from exc
    except yaml.MarkedYAMLError as exc:
        raise caused(_yaml_error(exc, text), exc) from exc
    except (ValueError, yaml.YAMLError) as exc:
        raise caused(ValidationError("file", f"cannot parse {fmt}: {exc}"), exc) from exc
    if isinstance(data, dict) and "machines" in data:
        data = data["machines"]
    if not isinstance(data, list):
        raise ValidationError("file", "expected a list of machines (or {machines: [...]})")
    out = []
    for i, item in enumerate(data):
        line = lines[i] if lines else i + 1
        if not isinstance(item, dict):
            if lines:  # the line it is on
                raise ValidationError("file", "expected a mapping (a machine's fields)",
                                      line=line)
            raise ValidationError("file", f"row {line}: expected a mapping")
        out.append((line, item))
    return out


# JSON's insignificant whitespace (RFC 8259 §2), what json's own scanner skips.
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _skip(text: str, i: int) -> int:
    """Past the whitespace at ``text[i]``."""
    space = _JSON_SPACE.match(text, i)
    assert space is not None  # "*": it matches everywhere
    return space.end()


def _json_with_lines(text: str) -> tuple[Any, list[int] | None]:
    """``json.loads(text)``, and the line each machine starts on where the machines are the
    list at its top or under its ``"machines"`` key (rows were numbered 1, 2, 3 and printed
    as the file's lines 1, 2, 3). Each item is decoded where it starts (``raw_decode``), so
    the text is parsed once; a text that is anything else, or malformed, is parsed again by
    ``json.loads``, whose error (or value) is the file's as before."""
    try:
        return _json_items(text)
    except (ValueError, TypeError):
        return json.loads(text), None


def _json_items(text: str) -> tuple[Any, list[int] | None]:
    decode = json.JSONDecoder().raw_decode
    i = _skip(text, 0)
    lines: list[int] | None = None
    if text.startswith("[", i):
        data: Any
        data, lines, i = _json_list(text, i, decode)
    elif text.startswith("{", i):
        data = {}
        i = _skip(text, i + 1)
        closed = text.startswith("}", i)
        while not closed:
            key, i = decode(text, i)
            i = _skip(text, i)
            if not isinstance(key, str) or not text.startswith(":", i):
                raise ValueError("not an object")
            i = _skip(text, i + 1)
            if key == "machines" and text.startswith("[", i):
                data[key], lines, i = _json_list(text, i, decode)
            else:
                data[key], i = decode(text, i)
                lines = None if key == "machines" else lines
            i = _skip(text, i)
            closed = text.startswith("}", i)
            if not closed:
                if not text.startswith(",", i):
                    raise ValueError("not an object")
                i = _skip(text, i + 1)
        i += 1
    else:
        raise ValueError("not a list or an object")
    if _skip(text, i) != len(text):
        raise ValueError("extra data")
    return data, lines


def _json_list(text: str, i: int, decode: Callable[[str, int], tuple[Any, int]],
               ) -> tuple[list[Any], list[int], int]:
    """The list starting at ``text[i]`` ("["), the line of each item, and where it ends."""
    items: list[Any] = []
    lines: list[int] = []
    line, seen = 1, 0
    i = _skip(text, i + 1)
    if text.startswith("]", i):
        return items, lines, i + 1
    while True:
        line += text.count("\n", seen, i)
        seen = i
        lines.append(line)
        value, i = decode(text, i)
        items.append(value)
        i = _skip(text, i)
        if text.startswith("]", i):
            return items, lines, i + 1
        if not text.startswith(",", i):
            raise ValueError("not a list")
        i = _skip(text, i + 1)


def _yaml_item_lines(node: yaml.Node | None) -> list[int] | None:
    """The line each machine of a YAML file starts on: the items of the list at its top,
    or of its ``machines:`` key (the form the error for a lone mapping suggests, whose rows
    were numbered 1, 2, 3 and printed as the file's lines 1, 2, 3)."""
    if isinstance(node, yaml.MappingNode):
        # The last, as the loaded mapping keeps a key given twice.
        found = [value for key, value in node.value
                 if isinstance(key, yaml.ScalarNode) and key.value == "machines"]
        node = found[-1] if found else None
    if isinstance(node, yaml.SequenceNode):
        return [n.start_mark.line + 1 for n in node.value]
    return None


def _yaml_error(exc: yaml.MarkedYAMLError, text: str) -> ValidationError:
    """A YAML file's error on the line it was found (PyYAML's own text names the
    ``"<unicode string>"`` it was read from, and its line a second time): where the problem
    is past the last line (an unclosed bracket or quote), the line of what it left open."""
    mark = exc.problem_mark or exc.context_mark
    context = exc.context_mark
    problem = exc.problem or "not YAML"
    if context is not None and exc.context:
        problem += f" ({exc.context} on line {context.line + 1}, column {context.column + 1})"
    elif mark is not None:
        problem += f" (column {mark.column + 1})"
    line = None if mark is None else mark.line + 1
    if line is not None and context is not None and line > text.count("\n"):
        line = context.line + 1  # the end of the file: the line that was left open
    return ValidationError("file", f"cannot parse yaml: {problem}", line=line)


async def fleet_status(store: Store, counts: GroupCounts | None = None,
                       kept: GroupsKept | None = None) -> dict[str, Any]:
    """Where the fleet stands: machines per state, overall and per cluster, and the failed.

    What an operator enrolling a thousand devices watches (``netboot status``,
    ``GET /api/v1/status``). A machine counts in its own cluster, else in the cluster of the
    group that selects it, as it would boot (a discovered one boots none: in no group's).
    The counts by cluster and state come from
    ``counts`` (the server's in-memory view), else from the store's one grouped read (no
    index holds the state: sqlite.py, migration 7); only when a group gives a cluster are
    the machines without one read once, since a selector matches facts that no index holds,
    and not even then where ``counts`` holds them (the loaded view; ``kept``: what it
    remembers between calls, the caller's).
    """
    pairs = await (store if counts is None else counts).state_counts()
    states = {s.value: n for s, n in by_state(pairs).items()}
    total = sum(states.values())
    clusters: dict[str, dict[str, int]] = {}
    for cluster in await store.list_clusters():
        clusters[cluster.name] = {s.value: n for s in MachineState
                                  if (n := pairs.get((cluster.name, s), 0))}
    groups = await store.list_groups()
    groups_give_clusters = any(g.cluster for g in groups)

    def cluster_of(machine: Machine) -> str | None:
        # A discovered machine is in no group's cluster: it boots nothing of one until it is
        # approved (matchbox and Tinkerbell count no hardware a profile or workflow does not
        # name), and a group matching its learnt facts counted a held rack in the cluster.
        if machine.cluster or not groups_give_clusters or machine.state is _DISCOVERED:
            return machine.cluster
        group = select_group(groups, machine_labels(machine))
        return group.cluster if group else None

    grouped: dict[tuple[str, MachineState], int] | None = None
    if total and groups_give_clusters and counts is not None and kept is not None:
        grouped = await counts.group_counts(kept)
    if grouped is not None:
        for (given, state), n in grouped.items():
            held = clusters.setdefault(given, {})
            held[state.value] = held.get(state.value, 0) + n
    elif total and groups_give_clusters:
        for machine in await store.list_machines(MachineFilter(limit=total)):
            # Machines with a cluster of their own were counted above.
            if not machine.cluster and (name := cluster_of(machine)):
                held = clusters.setdefault(name, {})
                held[machine.state.value] = held.get(machine.state.value, 0) + 1
    failed = await store.list_machines(MachineFilter(state=MachineState.FAILED, limit=20))
    return {
        "total": total,
        "by_state": states,
        "clusters": clusters,
        "failed": [{"mac": str(m.mac) if m.mac else None, "id": m.id, "hostname": m.hostname,
                    "cluster": cluster_of(m)}
                   for m in failed],
    }


# What an import row says of its machine, checked, in NewMachines.add's order: macs,
# hostname, uuid, serial, asset, cluster, role, profile, labels, fixed_ipv4.
_Values = tuple[tuple[MacAddress, ...], str | None, str | None, str | None, str | None,
                str | None, Role | None, str | None, Mapping[str, str], str | None]


def _row_machine(ident: str, values: _Values, now: float) -> Machine:
    """The machine of an import row's values, created and updated ``now``."""
    macs, hostname, uuid, serial, asset, cluster, role, profile, labels, fixed = values
    # An import knows no facts: one shared empty mapping, not 100,000 empty dicts.
    return Machine(macs=macs, id=ident, state=lifecycle.first_state(lifecycle.Trigger.ENROLL),
                   hostname=hostname, serial=serial, asset=asset, uuid=uuid, cluster=cluster,
                   role=role, profile=profile, labels=labels, fixed_ipv4=fixed, created=now,
                   updated=now, facts=NO_ENTRIES)


def _updated(old: Machine, machine: Machine, absorb: Sequence[Machine], now: float) -> Machine:
    """``old`` as an import row naming it leaves it (``machine``: the row's values), with
    the discovered records it ``absorb``s merged in; ``updated`` is still ``old``'s."""
    merged = identity.merge(replace(
        old, macs=(*old.macs, *(m for m in machine.macs if m not in old.macs)),
        hostname=machine.hostname or old.hostname,
        serial=machine.serial or old.serial, asset=machine.asset or old.asset,
        uuid=machine.uuid or old.uuid, cluster=machine.cluster or old.cluster,
        role=machine.role or old.role, profile=machine.profile or old.profile,
        labels={**old.labels, **machine.labels},
        fixed_ipv4=machine.fixed_ipv4 or old.fixed_ipv4,
        # A NIC the row names is the operator's, as PATCH macs lists it: one a boot attached
        # by the machine's UUID or serial is given its install and fixed address
        # (identity.UNLISTED). A shared mapping where it names none (identity.listed).
        facts=identity.listed(old.facts, machine.macs),
    ), absorb, old.updated)
    if lifecycle.allows(old.state, lifecycle.Trigger.ENROLL):
        # Naming a discovered machine in an import enrolls it; for any other state the row
        # only updates its fields.
        merged = lifecycle.advance(merged, lifecycle.Trigger.ENROLL, now)
    return merged


def _taken(field: str, value: str, shown: str, held_as: str, line: int,
           seen: dict[str, int], held: Mapping[str, str], ident: str,
           absorb: Sequence[Machine], existing: Mapping[str, Machine],
           create_only: bool) -> RowError | None:
    """An import row's hostname or fixed_ipv4 that an earlier row gave (``seen``: value ->
    line, this line's noted) or that another machine of the inventory has (``held``: value
    -> machine id; the row's own machine and the discovered records it absorbs excepted),
    as the row's error; else None. A token that may not read machines is told "another
    machine", not which (s37-attack)."""
    if value in seen:
        return RowError(line, field, f"{shown} duplicates line {seen[value]}")
    seen[value] = line
    owner = held.get(value)
    if owner is not None and owner != ident and owner not in {d.id for d in absorb}:
        holder = "another machine" if create_only else existing[owner].ref
        return RowError(line, field, f"{shown} {held_as} {holder} in the inventory")
    return None


def _claim_place(machine: Machine, peer: IPAddress | None) -> str:
    """Where a restored machine's refused later boot came from, against where its device was
    known to be (its fixed address, the address it registered, else the one its install was
    served to), for the operator who may give the machine to its claim. That refusal needs
    no token: any host that knows the MAC (in every DHCP broadcast of the machine) can post
    one with a secret of its own, and its event named the claim and the command alike
    (s50-attack)."""
    for known, what in ((machine.fixed_ipv4, "its fixed address"),
                        (machine.ipv4, "the address it registered from"),
                        (machine.facts.get(identity.INSTALL_PEER), "the address its install was "
                                                           "served to")):
        if known:
            if peer is not None and str(peer) == known:
                return f"it came from {known}, {what}"
            return (f"it came from {peer or 'an unknown address'}, not from {known}, {what}: "
                    "any host that knows the MAC can send one; give it only if the device "
                    "is there now")
    return ("no address of its device is known: check the address it came from against its "
            "DHCP lease or its console")


class _FixedGiven:
    """The fixed_ipv4 addresses an import's rows give, and what lets one held by another
    machine of the inventory through: the row's own machine, a discovered record it
    absorbs, or a machine the file gives another address (two machines' addresses
    swapped: dnsmasq's dhcp-host lines of one file are read as a whole too)."""

    def __init__(self, given: Mapping[str, int], line_of: Mapping[str, int],
                 update: Sequence[Machine], merge: Sequence[tuple[str, str]],
                 existing: Mapping[str, Machine]) -> None:
        self.ident = {line: ident for ident, line in line_of.items()}  # line -> machine id
        # Address -> line, of the addresses the import writes: not one a row gives again to
        # the machine that had it when read (a re-import's), which it does not write.
        self.given = {value: line for value, line in given.items()
                      if (m := existing.get(self.ident[line])) is None
                      or m.fixed_ipv4 != value}
        self.into = dict(merge)  # an absorbed record's id -> the row's machine id
        self.freed = {m.id for m in update if m.id in existing
                      and existing[m.id].fixed_ipv4 not in (None, m.fixed_ipv4)}

    def clashes(self, holders: Mapping[str, tuple[str, str]],
                create_only: bool) -> list[RowError]:
        """Each address given that ``holders`` (address -> the id and ref of its machine)
        has another machine keep, as its row's error, by line."""
        out = []
        for value, line in self.given.items():
            held = holders.get(value)
            if held is None:
                continue
            owner, ref = held
            ident = self.ident.get(line)
            if owner == ident or self.into.get(owner, owner) == ident or owner in self.freed:
                continue
            holder = "another machine" if create_only else ref
            out.append(RowError(line, "fixed_ipv4",
                                f"{value} is the fixed address of {holder} in the inventory"))
        return sorted(out, key=lambda e: e.line)


_USED_HOSTNAME = re.compile(r"hostname '([^']*)' is used by ")


def _chosen_taken(refused: Conflict, chosen: Mapping[str, int],
                  rows: Iterable[Any]) -> Conflict:
    """What an import refused at its commit raises: a hostname the template chose for an
    unnamed row, read as free, that another writer (another server, a CLI) gave meanwhile
    is a StateChanged (field ``updated``) that import_rows answers by making the import
    again from the inventory as stored now, choosing the next free names, as a single
    enrollment chooses again (Enroller.enroll); rows read once (a stream) cannot be, and
    it names the row and the fix. Any other refusal is raised as it is."""
    found = _USED_HOSTNAME.match(str(refused)) if refused.field == "hostname" else None
    line = chosen.get(found.group(1)) if found is not None else None
    if found is None or line is None:
        return refused
    message = (f"line {line}: hostname {found.group(1)!r}, chosen by the hostname template, "
               "was given to another machine by another writer (another server or a CLI) "
               "since this import read the inventory")
    if isinstance(rows, Sequence):
        return StateChanged(message, field="updated", holder=refused.holder)
    return Conflict(f"{message}; import the file again: its unnamed rows get the next free "
                    "names", field="hostname", holder=refused.holder)


def _changes_nothing(old: Machine, values: _Values) -> bool:
    """Whether ``_updated(old, <the row's machine>, [], now) == old``, read from the row's
    checked values without building, copying and comparing machines (three quarters of a
    re-import's CPU, which is mostly such rows). Every value a row gives is None or not
    empty, so ``value or old_value`` keeps the old one exactly when the value is None."""
    macs, hostname, uuid, serial, asset, cluster, role, profile, labels, fixed = values
    if lifecycle.allows(old.state, lifecycle.Trigger.ENROLL):
        return False  # the row enrolls it
    old_macs = old.macs
    for mac in macs:
        if mac not in old_macs:
            return False
    # A NIC a boot attached that the row names is listed by it (_updated).
    if macs and identity.UNLISTED in old.facts and any(identity.unlisted(old, str(mac))
                                                      for mac in macs):
        return False
    for value, current in ((hostname, old.hostname), (uuid, old.uuid), (serial, old.serial),
                           (asset, old.asset), (cluster, old.cluster), (role, old.role),
                           (profile, old.profile), (fixed, old.fixed_ipv4)):
        if value is not None and value != current:
            return False
    if labels:
        old_labels = old.labels
        for key, value in labels.items():
            if old_labels.get(key) != value:
                return False
    return True


# An identifier of an import row as (kind, key): a MAC by its 6 bytes, the others as text
# (what netboot.identity.claims gives, cleaned).
_Claim = tuple[str, str | bytes]
# kind -> key -> the id of the machine holding it (str), or the line of the row naming it.
_Claimed = dict[str, dict[str | bytes, str | int]]


def _claims_of(machines: Iterable[Machine]) -> _Claimed:
    """Who holds each identifier of ``machines`` (:func:`netboot.identity.claims`)."""
    claimed: _Claimed = {"mac": {}, "uuid": {}, "serial": {}, "asset": {}}
    for m in machines:
        machine_id = m.id
        for kind, key in Identity.of_machine(m).keys(True):  # MACs by their bytes
            claimed[kind][key] = machine_id
    return claimed


def _claim_text(key: str | bytes) -> str:
    return str(MacAddress(key)) if isinstance(key, bytes) else key


class Enroller:
    def __init__(
        self,
        store: Store,
        *,
        hostname_template: str = "node-{mac_suffix}",
        clock: Callable[[], float] = time.time,
        logger: logging.Logger | None = None,
        report_burst: int = 60,
        report_rate: float = 1.0,
        new_token: Callable[[], str] | None = None,
    ) -> None:
        self._store = store
        # Machine tokens, as install tokens are minted (netboot.tokens: one getrandom(2) a
        # draw, not one a registration on the event loop; ~4 us a registration otherwise).
        self._new_token = new_token or TokenSource()
        # Reports a machine may post (config enroll.report_burst, enroll.report_rate): a
        # token bucket per machine; the machines refused since their last report taken.
        self._report_burst, self._report_rate = report_burst, report_rate
        self._reports = TokenBuckets(report_rate, report_burst, _REPORT_BUDGETS)
        self._refusing: set[str] = set()
        self._contests = TokenBuckets(1 / CONTEST_EVERY, CONTEST_BURST, _REPORT_BUDGETS)
        self._render_fails = TokenBuckets(1 / RENDER_FAILED_EVERY, RENDER_FAILED_BURST,
                                          _REPORT_BUDGETS)
        self._refused_boots = TokenBuckets(1 / REFUSED_BOOT_EVERY, REFUSED_BOOT_BURST,
                                           _REPORT_BUDGETS)
        # Machine id -> what of it failed to render, told as a "render failed" event and not
        # rendered since (Content tells a success: rendered): the boot path's "asked again"
        # note gives way to it, the list's last event keeps saying why (s42-ops).
        self.render_failing: OrderedDict[str, set[str]] = OrderedDict()
        # Each refused claim by the address it came from, beside the rate-limited events: a
        # flood of random secrets cannot hide the device's (s40-claim: netboot.claims).
        self.claims = RefusedClaims(since=clock())
        # ... shared through the inventory: listed and given by any server, kept through a
        # restart (s42-ops).
        self.kept = KeptClaims(self.claims, store, clock=clock, logger=logger)
        # (machine id, token expiry) told as a "token expired" event (refuse_expired).
        self._expired_told: set[tuple[str, float, str]] = set()
        # Every event of this process is written through one recorder, so that history keeps
        # its order: what the boot path queued goes out before what is committed here.
        self.recorder = Recorder(store, logger=logger)
        self.hostname_template = hostname_template
        self._clock = clock
        self._log = logger or logging.getLogger(__name__)
        # How a registration finds its machine by MAC: the store, or (set by the wiring) the
        # boot path's view, synced first (BootService.machine_by_mac), which spares a storm's
        # registrations a hop to the store's thread; the write is a compare-and-set anyway.
        self.find_mac: Callable[[MacAddress], Awaitable[Machine | None]] = (
            lambda mac: self._store.machine_by("mac", str(mac)))
        # The running server's own addresses and its DHCP router's (set by the wiring): no
        # machine's fixed_ipv4 may be one (addresses.check_fixed_ipv4).
        self.server_addresses: Callable[[], Collection[str]] = tuple
        # Held by a write that sets a fixed_ipv4 (Core.create_machine, update_machine, an
        # import) from its check that no other machine has it to its commit: two API calls
        # at once cannot both pass the check (s40-net), nor two processes or servers on one
        # inventory (FixedLock: this process's lock, then the store's own).
        self.fixed_lock: Any = FixedLock(store)

    async def event(self, machine_id: str, kind: str, message: str = "",
                    data: Mapping[str, Any] | None = None) -> None:
        await self.recorder.commit(Batch(events=(Event(machine_id, self._clock(), kind,
                                                       message, dict(data or {})),)))

    # -- hostnames --------------------------------------------------------------------
    async def unique_hostname(self, template: str, machine: Machine, *, cluster: str | None,
                              role: str | None, taken: set[str] | None = None) -> str:
        base = render_hostname(template, machine, cluster=cluster, role=role)
        name = base
        for n in range(2, 10_000):
            other = await self._store.get_machine_by_hostname(name)
            if (other is None or other.id == machine.id) and (taken is None
                                                                  or name not in taken):
                return name
            name = f"{base[:58]}-{n}"
        raise Conflict(f"no free hostname for template {template!r}")

    def template_for(self, machine: Machine, groups: Sequence[Group]) -> str:
        """The hostname template of the most specific group selecting this machine by what is
        known at enrollment (MAC, serial, UUID, asset, labels, facts), else the default."""
        labels = {**machine.facts, **machine.labels}
        if machine.mac is not None:
            labels["mac"] = str(machine.mac)
        for key in ("serial", "uuid", "asset"):
            if getattr(machine, key):
                labels[key] = getattr(machine, key)
        if machine.arch:
            labels["arch"] = str(machine.arch)
        if machine.firmware:
            labels["firmware"] = str(machine.firmware)
        group = select_group(groups, labels)
        return group.hostname_template if group and group.hostname_template \
            else self.hostname_template

    async def name_for(self, machine: Machine, *, cluster: str | None = None,
                       role: str | None = None) -> str:
        template = self.template_for(machine, await self._store.list_groups())
        return await self.unique_hostname(template, machine, cluster=cluster, role=role)

    # -- enrollment -------------------------------------------------------------------
    async def enroll(self, machine: Machine, how: str) -> Machine:
        """Create ``machine``, named by the hostname template when it has no hostname.

        It needs one identifier (a MAC, serial, asset tag or UUID). One that an enrolled
        machine holds is a Conflict naming the field and that machine; ``discovered`` records
        holding one are the same device seen before enrollment and are merged into it, their
        NICs, facts and events kept.
        """
        identity.require(machine)
        for attempt in range(1, DECIDE_ATTEMPTS + 1):
            refused: Conflict | None = None
            try:
                made = await self._enroll(machine, how, attempt)
            except Conflict as exc:
                refused = exc
            # Decided outside the handler: see recorder._write_group (mypyc's coroutines).
            if refused is not None:
                # The device's DISCOVER recorded between this read and this write (an
                # operator enrolling a pallet as it powers on): its discovered record now
                # holds the identifier; read again and take it over, as if it had been there.
                # Or the name the template chose, read as free, was given to another machine
                # by another writer since (another server, a CLI): the store's unique index
                # refused it, and the next free one is chosen, as if it had been taken then.
                chosen = refused.field == "hostname" and machine.hostname is None
                if attempt >= DECIDE_ATTEMPTS or not (
                        chosen or await self._discovered(refused.holder)):
                    raise refused
                continue
            if made is not None:
                return made
        raise AssertionError("unreachable: the last attempt raises")

    async def _discovered(self, holder: str | None) -> bool:
        """Whether ``holder`` (a Conflict's machine) is a discovered record."""
        if holder is None:
            return False
        other = await self._store.get_machine(holder)
        return other is not None and other.state == MachineState.DISCOVERED

    async def _enroll(self, machine: Machine, how: str, attempt: int) -> Machine | None:
        """One attempt of :meth:`enroll`; None: a discovered record it takes over was
        changed since it was read (a boot's facts, its DHCP notes), and is read again."""
        found = await identity.matches(self._store, Identity.of_machine(machine))
        for kind, value, other in found:
            if other.state != MachineState.DISCOVERED:
                raise identity.claimed(kind, value, other)
        now = self._clock()
        absorb = list({m.id: m for _, _, m in found}.values())
        # The first discovered record becomes this machine (its id and history stay); any
        # other merges into it.
        keep = absorb.pop(0) if absorb else None
        if keep is not None:
            machine = replace(machine, id=keep.id, created=keep.created,
                              macs=(*machine.macs, *(m for m in keep.macs
                                                     if m not in machine.macs)),
                              facts={**keep.facts, **machine.facts},
                              arch=keep.arch, firmware=keep.firmware,
                              state=lifecycle.apply(keep.state, lifecycle.Trigger.ENROLL,
                                                    subject=keep.ref))
        else:
            machine = replace(machine, created=now,
                              state=lifecycle.first_state(lifecycle.Trigger.ENROLL,
                                                          subject=machine.ref))
        machine = identity.merge(machine, absorb, now)
        if machine.hostname is None:
            machine = replace(machine, hostname=await self.name_for(
                machine, cluster=machine.cluster,
                role=str(machine.role) if machine.role else None))
        events = [Event(machine.id, now, "enrolled", how)]
        events += [Event(machine.id, now, "merged", f"discovered record {d.id} "
                         f"({', '.join(map(str, d.macs))}) is this machine; its history is kept",
                         {"merged": d.id}) for d in absorb]
        # Compare-and-set on every record taken over, as read: the boot path may store a
        # discovered record's facts (or another NIC's, an approval) meanwhile, which
        # writing the record read would undo; refused, the records are read again.
        read = [keep, *absorb] if keep is not None else []
        batch = Batch(merge=[(d.id, machine.id) for d in absorb], events=events,
                      create=() if keep else (machine,), update=(machine,) if keep else (),
                      expect={d.id: d.state for d in read},
                      versions={d.id: d.updated for d in read})
        return machine if await self._written(batch, attempt, read) else None

    async def _written(self, batch: Batch, attempt: int, read: Sequence[Machine], *,
                       recorded: bool = True) -> bool:
        """Whether ``batch``, a write of the machines ``read`` as read, was written (through
        the recorder, else straight to the store). False when another writer changed one of
        them since its read without moving its state (StateChanged on ``updated``) and an
        attempt is left: the caller makes its step again on the machines as stored now.
        Any other refusal, and the last, is raised as it came."""
        refused: StateChanged | None = None
        try:
            if recorded:
                await self.recorder.commit(batch)
            else:
                await self._store.apply_batch(batch)
        except StateChanged as exc:
            refused = exc
        # Decided outside the handler: see recorder._write_group (mypyc's coroutines).
        if refused is None:
            return True
        if refused.field != "updated" or attempt >= DECIDE_ATTEMPTS \
                or all(m.id != refused.holder for m in read):
            raise refused
        return False

    async def _read_again(self, machine: Machine) -> Machine:
        """``machine`` as stored now, for a device's step refused by :meth:`_written`: made
        again only on the same state and install token (a reinstall, another server's step
        is the device's 409 as before)."""
        now = await self._store.get_machine(machine.id)
        if now is None:
            raise NotFound(f"machine {machine.ref} not found")
        if now.state != machine.state or now.token_hash != machine.token_hash:
            raise StateChanged(f"machine {machine.id} is {now.state} now, not {machine.state} "
                               "as read: another writer changed it meanwhile", field="state",
                               holder=machine.id)
        return now

    # -- transitions ------------------------------------------------------------------
    async def validate_refs(self, cluster: str | None, profile: str | None) -> None:
        if cluster and await self._store.get_cluster(cluster) is None:
            raise ValidationError("cluster", unknown_ref(
                "cluster", cluster, [c.name for c in await self._store.list_clusters()]))
        if profile and await self._store.get_profile(profile) is None:
            raise ValidationError("profile", unknown_ref(
                "profile", profile, [p.name for p in await self._store.list_profiles()]))

    async def refs_still(self, clusters: Mapping[str, int], profiles: Mapping[str, int],
                         ) -> None:
        """The clusters and profiles a write names (name -> the import line naming it
        first, 0 for a single write), checked again under ``fixed_lock``, which the write
        holds to its commit and Core.delete holds for its delete of one: one checked before
        (validate_refs, an import's read) and deleted by another writer since (another
        server or a CLI on this inventory, whose delete found nothing naming it yet) is a
        409 naming it, not a machine or group left naming one that is gone (a machine held
        at its next boot)."""
        for kind, names, get in (("cluster", clusters, self._store.get_cluster),
                                 ("profile", profiles, self._store.get_profile)):
            for name, line in names.items():
                if await get(name) is None:
                    where, since = ((f"line {line}: ", "this import read the inventory")
                                    if line else ("", "this write checked it"))
                    raise Conflict(f"{where}{kind} {name!r} was deleted by another writer "
                                   f"(another server or a CLI on this inventory) since {since}; "
                                   "create it again or name another", field=kind)
                    # No holder: a Conflict's holder is a machine's id (errors.Conflict,
                    # OpenAPI's Error); the gone name is the message's (s43-review).

    async def auto_enroll(self, machine: Machine, group: Group) -> Machine:
        hostname = machine.hostname or await self.unique_hostname(
            group.hostname_template or self.hostname_template, machine,
            cluster=group.cluster, role=str(group.role) if group.role else None)
        updated = lifecycle.advance(
            machine, lifecycle.Trigger.AUTO_ENROLL, self._clock(), hostname=hostname,
            cluster=machine.cluster or group.cluster, role=machine.role or group.role,
            profile=machine.profile or group.profile,
            labels={**group.labels, **machine.labels},
        )
        # On the version read too: the boot path that called decides again on a refusal
        # (errors.DECIDE_ATTEMPTS), from the change that moved it.
        await self._store.apply_batch(Batch(update=(updated,), expect={machine.id: machine.state},
                                            versions={machine.id: machine.updated}))
        await self.event(machine.id, "enrolled",
                         f"auto-enrolled by rule {group.name!r} as {updated.hostname}")
        self._log.info("auto-enrolled mac=%s rule=%s hostname=%s cluster=%s",
                       machine.mac, group.name, updated.hostname, updated.cluster)
        return updated

    async def approve(self, ref: str, *, cluster: str | None, role: Role | None,
                      profile: str | None, hostname: str | None = None,
                      enroll_only: bool = False,
                      versions: Collection[str] | None = None) -> Machine:
        """Enroll a discovered machine (or change an enrolled one before it boots).
        ``enroll_only``: for a caller that may enroll but not change machines (an ``enroll``
        token): no server, and no change to a machine enrolled already (its repeat of an
        approval that changes nothing is answered as before). ``versions``: the API's
        If-Match (identity.require_version), checked on each read."""
        await self.validate_refs(cluster, profile)
        for attempt in range(1, DECIDE_ATTEMPTS + 1):
            machine = await identity.require_ref(self._store, ref)
            identity.require_version(machine, versions)
            lifecycle.apply(machine.state, lifecycle.Trigger.APPROVE, subject=machine.ref)
            refused = enroll_only and enroll_only_refusal(
                machine, cluster=cluster, role=role, profile=profile, hostname=hostname)
            if refused:
                raise refused
            name = check_hostname(hostname) if hostname else machine.hostname
            if not name:
                name = await self.name_for(machine, cluster=cluster,
                                           role=str(role) if role else None)
            updated = lifecycle.advance(machine, lifecycle.Trigger.APPROVE, self._clock(),
                                        hostname=name, cluster=cluster or machine.cluster,
                                        role=role or machine.role,
                                        profile=profile or machine.profile)
            if updated is machine:
                # A repeated approval, nothing new: answered as a repeated PUT is, with no
                # write and no second "enrolled" event in the machine's history.
                return machine
            if await self._written(Batch(update=(updated,), expect={machine.id: machine.state},
                                         versions={machine.id: machine.updated}),
                                   attempt, (machine,), recorded=False):
                break
        await self.event(machine.id, "enrolled", f"approved as {name}"
                         + (f" for cluster {updated.cluster}" if updated.cluster else ""))
        return updated

    def token_opens(self, machine: Machine | None, token: str | None,
                    step: lifecycle.Trigger) -> TypeGuard[Machine]:
        """Whether :meth:`check_token` gives ``machine`` back as it is: its own install
        token, a state that takes ``step``, unexpired. Where True, the caller takes it
        without that coroutine (a first config's, ~1,000 loop instructions: s50-config);
        where False, check_token says why (and records an expiry)."""
        return (machine is not None and token_is(machine, token)
                and lifecycle.allows(machine.state, step)
                and not token_expired(machine, self._clock()))

    async def check_token(self, machine: Machine | None, token: str | None,
                          step: lifecycle.Trigger, *, refused: str) -> Machine:
        """The machine, if ``token`` is its install token and it may take ``step`` now.

        AuthError (401) with ``refused`` for an unknown machine or a token not its own: the
        same answer for both, so that nothing about the inventory leaks. For its own token,
        TransitionRefused (409, naming the state) when the state does not take the step (a
        registered machine's config, a second registration), then AuthError once the token
        has expired (recorded once as a ``token expired`` event: an install that outlived
        its profile's install_timeout needs a reinstall, and the operator should see why).
        """
        if self.token_opens(machine, token, step):
            return machine
        # Refused: which answer, as above.
        if machine is None or not token_is(machine, token):
            raise AuthError(refused)
        lifecycle.apply(machine.state, step, subject=machine)  # its ref made only to refuse
        if token_expired(machine, self._clock()):
            await self.refuse_expired(machine, str(step))
        return machine

    async def refuse_expired(self, machine: Machine, what: str) -> NoReturn:
        """AuthError (401) saying that ``machine``'s install token expired (``what``: the
        step it refused), told once as a ``token expired`` event."""
        assert machine.token_expires is not None
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(machine.token_expires))
        message = (f"the install token of {machine.ref} expired at {when} ({what} "
                   f"refused); 'netboot machines reinstall {machine.ref}' issues a new one")
        # Told once a step a token: this process remembers whom it told (bounded), and the
        # newest events tell another process or a restart. The newest event alone was not
        # enough: a holder of the expired token alternating its config and a report made
        # every refusal's message differ from the newest event's, and every request wrote
        # an event, without bound (s34-attack).
        told = (machine.id, machine.token_expires, what)
        if told not in self._expired_told:
            recent = await self._store.list_events(machine.id, limit=_EXPIRED_SEEN)
            if not any(e.kind == "token expired" and e.message == message for e in recent):
                await self.event(machine.id, "token expired", message)
            if len(self._expired_told) >= _REPORT_BUDGETS:
                self._expired_told.clear()
            self._expired_told.add(told)
        raise AuthError(message)

    async def reinstall(self, ref: str, *,
                        versions: Collection[str] | None = None) -> Machine:
        """``versions``: the API's If-Match (identity.require_version), checked on each
        read: a write after it fails the compare-and-set and is read again."""
        for attempt in range(1, DECIDE_ATTEMPTS + 1):
            machine = await identity.require_ref(self._store, ref)
            identity.require_version(machine, versions)
            # The machine token is void; a registered install's secret digest is kept, inert
            # (only a registered machine's is compared) unless the operator takes the
            # reinstall back (mark-installed): then its node, still running that install,
            # proves itself by it at its next boot and is registered again (_taken_back).
            # Its next install's registration replaces it.
            kept = machine.secret_hash if machine.state in _KEEP_SECRET else None
            updated = lifecycle.advance(machine, lifecycle.Trigger.REINSTALL, self._clock(),
                                        token_hash=None, token_expires=None, install_token=None,
                                        secret_hash=kept)
            if await self._written(Batch(update=(updated,), expect={machine.id: machine.state},
                                         versions={machine.id: machine.updated}),
                                   attempt, (machine,), recorded=False):
                break
        # Its refused claims were against the registration it leaves (also told apart by
        # claims.registration_of, for another server's reinstall): freed now.
        self.claims.forget(machine.id)
        await self.event(machine.id, "reinstall", f"reinstall requested (was {machine.state})")
        return updated

    def config_fetched(self, machine: Machine, what: str) -> Awaitable[None]:
        """The fetch of ``machine``'s config recorded: awaited, its commit (or, fetched
        again, its place in the queue). Not a coroutine itself: it hands back the recorder's,
        so that a first config's wake-up from its group commit passes one coroutine level
        fewer (benchmarks/README.md, s50-config). A refused step raises here, at the call."""
        # The state alone: lifecycle.moved, advance without **changes (s39-http1st).
        updated = lifecycle.moved(machine, _FETCHED, self._clock())
        # By position, as model.event_of makes it (no class call: s38-install).
        event = event_of(machine.id, self._clock(), "config", f"{what} fetched", {}, "{}")
        if updated is machine:
            # Fetched again (an installer retrying): no state moves, and the event tells the
            # device nothing: queued with the next group commit of boot notes.
            return self._noted(event)
        # The state and its event in one transaction, grouped with concurrent commits (a
        # storm's devices fetch their configs together): committed before the config is
        # answered, compare-and-set on the state it was read in.
        # On its version too (Batch.versions): an operator's edit or a device's fact stored
        # since the read is not undone; refused, the config is planned again (the HTTP
        # server, errors.DECIDE_ATTEMPTS).
        # By position (merge, create, update, events, expect, versions, audit, bases):
        # keywords cost a class call a dict, ~1,500 loop instructions a first config
        # (callgrind; s33-loop). The machine read as its base (Batch.bases).
        return self.recorder.commit(batch_of((), (), (updated,), (event,),
                                             {machine.id: machine.state},
                                             {machine.id: machine.updated}, (),
                                             {machine.id: machine}, ()))

    async def _noted(self, event: Event) -> None:
        await self.recorder.room()
        self.recorder.record(event)

    def forget_idle(self) -> None:
        """The report budgets full again by now forgotten (the same as none: a machine
        reporting again starts from a full burst either way), once quiet after a storm
        (Service.forget_idle): else each machine of a storm held one until 16,384 others
        reported."""
        self._reports.forget_full(self._clock())

    async def report(self, machine: Machine, body: Mapping[str, Any], *,
                     audit: Sequence[AuditEntry] = ()) -> Event:
        """A progress report from an installer (POST /api/v1/machines/<ref>/events) about
        ``machine`` as the caller read it to check the token: the state change is a
        compare-and-set on that read, so a change since then is a 409, not a lost write.
        ``audit``: the entries of a report that succeeds, written in its transaction.

        At most ``report_burst`` reports of a machine at once, ``report_rate`` a second after
        that: beyond, RateLimited (429), the first of a run logged and recorded as an event
        (``reports limited``), the others not."""
        if not self._reports.take(machine.id, self._clock()):
            await self._refuse_report(machine)
        if self._refusing:
            self._refusing.discard(machine.id)  # a run of refusals ends: the next one is told
        kind = body.get("kind")
        # fullmatch: "$" matches before a trailing newline too, so "registered\n" passed as
        # a kind of the device's own, shown as netboot's "registered" (s36-attack).
        if not isinstance(kind, str) or not kind or len(kind) > MAX_EVENT_KIND \
                or not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", kind):
            raise ValidationError("kind", "required: a short lowercase word such as "
                                          "'installing', 'installed', 'failed', 'progress'")
        if kind in NETBOOT_KINDS:
            raise ValidationError("kind", f"'{kind}' is a kind netboot records itself; report "
                                          "'installing', 'installed', 'failed' or a kind of "
                                          "your own, such as 'progress'")
        message = body.get("message", "")
        if not isinstance(message, str) or len(message) > MAX_EVENT_MESSAGE:
            raise ValidationError("message", f"text of at most {MAX_EVENT_MESSAGE} characters")
        data = body.get("data", {})
        if not isinstance(data, dict):
            raise ValidationError("data", "must be an object")
        unknown = set(body) - {"kind", "message", "data"}
        if unknown:
            raise ValidationError(sorted(unknown)[0], "unknown field")
        step = REPORTED_STEPS.get(kind)
        for attempt in range(1, DECIDE_ATTEMPTS + 1):
            updated = (lifecycle.advance(machine, step, self._clock()) if step is not None
                       else machine)
            event = Event(machine.id, self._clock(), kind, message, data)
            # The reported state and its event in one transaction: acknowledged to the
            # installer. Compare-and-set on the state and the version read: an operator's
            # edit or another writer's fact stored since is not undone by the whole machine
            # written from this read (the step is made again on it).
            moved = updated is not machine
            if await self._written(Batch(
                    update=(updated,) if moved else (), events=(event,),
                    expect={machine.id: machine.state} if moved else {},
                    versions={machine.id: machine.updated} if moved else {}, audit=audit),
                    attempt, (machine,)):
                break
            machine = await self._read_again(machine)
        return event

    async def _refuse_report(self, machine: Machine) -> NoReturn:
        """RateLimited for a report past its machine's budget; the first of a run is told."""
        retry = max(1, math.ceil(1 / self._report_rate))
        told = machine.id in self._refusing
        message = (f"more than {self._report_burst} reports about {machine.ref} at once "
                   f"({self._report_rate:g} a second after): refused until the rate allows "
                   f"one; try again in {retry} s")
        if not told:
            if len(self._refusing) >= _REPORT_BUDGETS:
                self._refusing.clear()  # bounded; each machine refused is told once again
            self._refusing.add(machine.id)
            self._log.warning("reports refused mac=%s machine=%s: more than %d at once, %g a "
                              "second after (enroll.report_burst, enroll.report_rate); told "
                              "once until one is taken", machine.mac, machine.id,
                              self._report_burst, self._report_rate)
            await self.event(machine.id, "reports limited",
                             f"{message}; the refused ones are not recorded")
        raise RateLimited(message, retry_after=retry, told=told)

    async def register(self, body: Mapping[str, Any], peer: IPAddress | None, *,
                       audit: Callable[[Machine], AuditEntry] | None = None) -> Machine:
        """:meth:`_register`; a registration that lost its compare-and-set to the same
        registration made meanwhile (two requests of one device at once: its retry after a
        timeout while the first was being written, through the other server of a pair or
        the same one) is made again once, and answered as the repeat it is (the same machine
        token), not a 409 that left the device retrying (s39-multi)."""
        raced: StateChanged | None = None
        try:
            return await self._register(body, peer, audit=audit)
        except StateChanged as exc:
            raced = exc  # decided outside the handler: see recorder._write_group (mypyc)
        if not await self._registered_meanwhile(raced, body.get("token")):
            raise raced
        return await self._register(body, peer, audit=audit)

    async def _registered_meanwhile(self, refused: StateChanged, token: object) -> bool:
        """Whether ``refused`` was a registration's compare-and-set on the state, and its
        machine is now registered with this install token (spent: its hash is kept)."""
        if refused.field != "state" or refused.holder is None \
                or not isinstance(token, str) or not token:
            return False
        now = await self._store.get_machine(refused.holder)
        return now is not None and now.state is _REGISTERED and token_is(now, token)

    async def _register(self, body: Mapping[str, Any], peer: IPAddress | None, *,
                        audit: Callable[[Machine], AuditEntry] | None = None) -> Machine:
        """The installed OS's POST /api/v1/register: its first boot with the install token,
        and every later boot with the machine token that registration answered.

        ``audit``: the audit entry of a registration that succeeds, made for its machine and
        written in the registration's own transaction.

        ``peer`` is the address the request came from; it is registered unless it is not
        routable and the device reports one that is (:func:`netboot.addresses.choose`).
        A reported entry that is not a usable address is ignored with an event, not a 400:
        the device builds the list from ``hostname -i`` on its own, and refusing the whole
        registration would leave it retrying, unregistered, for something it cannot fix.
        The same for its ``hostname`` (``$(hostname)``): one that is no RFC 1123 name is
        left out of the event, which says so.

        The machine it returns holds its machine token in ``install_token`` (the field that
        held the install token until then: one secret a machine at a time, sealed at rest
        the same way), for the caller's answer to the device.

        Three ways in, by the credential (README, "Registration and later boots"):

        * the install token of a machine installed: the registration (one transition);
        * the same, spent, from the place the machine registered (its address, or reporting
          it from the peer its registration came from: a proxy on this host): a repeat of a
          registration whose answer was lost. Answered as the first was, with the same
          machine token; no state change, one event saying it was a repeat.
          From anywhere else it is a 409 naming the state, as before;
        * ``machine_token``: a later boot of the registered OS reporting where it is now.
          Its address (DNS name, a server's cluster endpoint) follows, unless the operator
          fixed one (``fixed_ipv4``), which it keeps whatever it reports.
        """
        mac_text = body.get("mac")
        if not isinstance(mac_text, str):
            raise ValidationError("mac", "required")
        mac = MacAddress.parse(mac_text)
        token = body.get("token")
        machine_token = body.get("machine_token")
        if machine_token is not None:
            if not isinstance(machine_token, str) or not machine_token:
                raise ValidationError("machine_token", "the machine token that registration "
                                                       "answered (text)")
            if token is not None:
                raise ValidationError("token", "give the install token or the machine token, "
                                               "not both")
        elif not isinstance(token, str) or not token:
            raise ValidationError("token", "required: the install token from the kernel command "
                                           "line or config")
        machine = await self.find_mac(mac)
        taken_back = False
        # Same answer for unknown MAC and wrong token: registration must not reveal the inventory.
        if machine_token is not None:
            if machine is None or not machine_token_is(machine, machine_token):
                if machine is None or not _taken_back(machine, body.get("install_secret")):
                    if machine is not None:
                        self._refused_boot(machine, peer, body.get("install_secret"))
                    raise AuthError("unknown machine or wrong token")
                # The node of a reinstall the operator took back: registered again below
                # (the machine token it holds was voided by the reinstall).
                machine_token, taken_back = None, True
        elif machine is None or machine.state is not _REGISTERED \
                or not token_is(machine, token):
            # A replay with the spent token of a registered machine is a 409 naming its state
            # (below, once its place is known: a repeat from where it registered is not).
            machine = await self.check_token(machine, token, lifecycle.Trigger.REGISTER,
                                             refused="unknown machine or wrong token")
        addresses = body.get("addresses", [])
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise ValidationError("addresses", "must be a list of strings")
        reported: dict[str, str] = {}
        for key in ("machine_id", "node_name", "os"):
            value = body.get(key)
            if value is not None:
                if not isinstance(value, str) or len(value) > 256:
                    raise ValidationError(key, "must be a string of at most 256 characters")
                reported[key] = value
        hostname = body.get("hostname")
        if hostname is not None and not isinstance(hostname, str):
            raise ValidationError("hostname", "must be a string")
        secret = body.get("install_secret")
        if secret is not None and (not isinstance(secret, str) or len(secret) > 256):
            raise ValidationError("install_secret", "must be a string of at most 256 "
                                                    "characters")
        keeps = body.get("keeps")
        if keeps is not None and keeps != "machine_token":
            raise ValidationError("keeps", 'only "machine_token": the register command keeps '
                                           "the machine token the answer carries")
        choice = choose_address(peer, addresses)
        # What was refused is said in the one event of this step, where an operator reading
        # why agents join some address looks.
        refused = "".join(f"; ignored {r.source} address {r.text!r} ({r.reason})"
                          for r in choice.refused)
        if hostname and not hostname_ok(hostname):
            # The device's own $(hostname): bounded and checked (RFC 1123), never a refusal
            # that would leave it retrying for a name it cannot change; not written either.
            refused += (f"; ignored its hostname ({len(hostname)} characters, not an RFC 1123 "
                        "name: letters, digits and '-', labels of at most 63, at most 253)")
            hostname = None
        entries = (audit(machine),) if audit else ()  # made once: the caller keeps each
        if machine.state is _REGISTERED:
            elsewhere = False
            proven = None if machine_token is not None else secret_proves(machine, secret)
            if proven:
                # The secret its install's register command made and sent with its
                # registration (root's alone on the device): the same install, wherever it
                # is now and whenever it retries (a lost answer, a new lease, a k3OS reboot
                # with a new or an image's machine-id). A fixed_ipv4 stays.
                elsewhere = (machine.fixed_ipv4 is None and choice.ipv4 is not None
                             and str(choice.ipv4) != machine.ipv4)
            elif proven is not None:
                # Registered with a secret, repeated without it (or with another): not its
                # install, from its own address too (a local process reading the config's
                # spent token got the machine token there), so a 409 naming the state.
                # Told: the machine's own device, if a host registered it first (README
                # "What a host on the provisioning network can take").
                await self._contested(machine, peer, choice, secret)
                lifecycle.apply(machine.state, lifecycle.Trigger.REGISTER, subject=machine)
            elif machine_token is None:
                repeat = _registered_from(machine, peer, choice)
                if repeat is None:  # reporting its address: with the registration's evidence?
                    repeat = await self._registered_peer(machine) == str(peer)
                if not repeat:
                    # From a new lease, its answer lost: with the machine-id it registered
                    # (s38-journey); else a 409.
                    elsewhere = await self._moved_before_its_answer(machine, choice, reported)
                    if not elsewhere:
                        lifecycle.apply(machine.state, lifecycle.Trigger.REGISTER,
                                        subject=machine)
            # Each writes an audit entry (and the log keeps the newest AUDIT_KEEP): at the
            # reports' rate, or one machine's token pushed the operator's entries out in a
            # minute of requests (s38-attack). A later boot posts a few; a repeat one in 10 s.
            if not self._reports.take(machine.id, self._clock()):
                await self._refuse_report(machine)
            if self._refusing:
                self._refusing.discard(machine.id)
            if machine_token is not None:
                return await self._reported_at(machine, choice, peer, reported, entries)
            if elsewhere:
                return await self._repeated_elsewhere(machine, peer, choice, entries,
                                                      proven=bool(proven))
            return await self._repeated(machine, peer, choice, entries)
        for attempt in range(1, DECIDE_ATTEMPTS + 1):
            facts = {**machine.facts, **reported}
            # A machine the operator gave an address (fixed_ipv4) registers that one, never
            # the request's or its report's: its servers' address is where agents send their
            # join token, and the holder of a token is not proven to be the device (PXE
            # proves nothing: s36-claim). Its install script goes only to that address.
            pinned = machine.fixed_ipv4
            ipv4 = pinned or (str(choice.ipv4) if choice.ipv4 else machine.ipv4)
            if choice.ipv6:
                facts["ipv6"] = str(choice.ipv6)
            # The token is spent: its retrievable copy goes, and its expiry (the API, the
            # dashboard and `machines show` showed a registered machine's token as valid
            # until then: s35-user); its hash stays so that a replay is told apart from a
            # stranger (and refused by state, above, before any expiry), until a reinstall.
            # In its place the machine token, with which the OS reports at later boots
            # (install_token is "the device's secret": one at a time, sealed alike).
            updated = lifecycle.advance(machine, lifecycle.Trigger.REGISTER, self._clock(),
                                        ipv4=ipv4, facts=facts,
                                        install_token=self._new_token(),
                                        token_expires=None,
                                        secret_hash=hashlib.sha256(secret.encode()).hexdigest()
                                        if secret else None)
            where = (f"{pinned} (its fixed address; the request came from "
                     f"{peer or 'an unknown address'})" if pinned else
                     f"{choice.address} "
                     f"({'the request' if choice.source == 'peer' else 'reported'})"
                     if choice.address else
                     f"no usable address (kept {machine.ipv4 or 'none'})")
            event = Event(machine.id, self._clock(), "registered", f"registered at {where}"
                          + (f" as {hostname}" if hostname else "") + refused
                          + ("; again, its install's secret proving the install it still "
                             "runs (a reinstall taken back, marked installed; or a claim given "
                             "after a restore): a new machine token replaces the one the "
                             "inventory no longer holds"
                             if taken_back else "; its install token is spent")
                          + ("" if keeps else _OLDER_COMMAND),
                          {"addresses": addresses,
                           "peer": str(peer) if peer else None,
                           "refused": [{"address": r.text, "reason": r.reason,
                                        "source": r.source} for r in choice.refused]})
            # The registration and its event in one transaction, grouped with concurrent
            # commits (a storm's machines register together; a write of its own each was a
            # transaction and a trip to the store's thread per machine, then a second commit
            # for the event). Compare-and-set on the state: of two registrations with one
            # token (two servers), one wins; and on the version read: an operator's edit (its
            # labels, cluster) stored since is not undone, the registration made again on it.
            if await self._written(Batch(update=(updated,), events=(event,),
                                         expect={machine.id: machine.state},
                                         versions={machine.id: machine.updated},
                                         audit=entries), attempt, (machine,)):
                break
            machine = await self._read_again(machine)
        # Claims refused against an earlier registration (a reinstall by the CLI or another
        # server, which this one's kept claims never heard of) are not this one's.
        self.claims.forget(machine.id)
        log_line(self._log, logging.INFO, "registered mac=%s ip=%s cluster=%s", mac, ipv4,
                 machine.cluster)  # once per machine of a storm: see log_line
        return updated

    async def _contested(self, machine: Machine, peer: IPAddress | None,
                         choice: AddressChoice, secret: str | None) -> None:
        """A ``registration contested`` event for a repeat refused for another install's
        secret (or none): where it came from, and its claim (the sha256 of the secret it
        sent, as netboot would keep it) that :meth:`give_to_claim` hands the machine to.
        Bounded (:data:`CONTEST_BURST`, :data:`CONTEST_EVERY`); one claim from one place is
        told once while nothing else is recorded of the machine."""
        claim = hashlib.sha256(secret.encode()).hexdigest() if secret else None
        from_ = str(peer) if peer else "an unknown address"
        if choice.address and str(choice.address) != from_:
            from_ += f" (reporting {choice.address})"
        message = (f"a registration with its spent install token from {from_} was refused: "
                   + (f"another install's secret (claim {claim})" if claim else
                      "no install's secret (an older register command, or a process that "
                      "read the config)")
                   + f", while the one registered at {machine.ipv4 or 'no address'} holds "
                   "the machine. If that one is not this machine's device and the refused "
                   "one is, " + (f"'POST /api/v1/machines/{machine.ref}/claim' with "
                                 f'{{"claim": "{claim}"}} (netboot machines claim '
                                 f"{machine.ref} {claim}) gives the machine to it at its "
                                 "next try, without a reinstall" if claim else
                                 "'netboot machines reinstall' gives it back"))
        kind = "registration contested"
        if claim:
            self.kept.refused(machine, str(peer) if peer else "", claim, self._clock())
        if self.recorder.last(machine.id) == (kind, message) \
                or not self._contests.take(machine.id, self._clock()):
            return
        await self.event(machine.id, kind, message,
                         {"peer": str(peer) if peer else None, "claim": claim})

    def _refused_boot(self, machine: Machine, peer: IPAddress | None,
                      secret: object = None) -> None:
        """A ``registration refused`` event: a later boot of ``machine``'s installed OS (its
        register command with a machine token) was refused, the answer the same 401 as an
        unknown MAC's. It was told nowhere: after a reinstall that stands its node's 30
        tries a boot, and after a backup restored from before its registration then marked
        installed (or a reinstall by a netboot that kept no install secret) every boot, were
        refused with the machine's history silent on why (s41-attack). Says what state
        refused it and the way out. Queued with the boot path's notes (no commit awaited:
        the answer is the 401 either way, as soon as an unknown MAC's); bounded
        (:data:`REFUSED_BOOT_BURST`, :data:`REFUSED_BOOT_EVERY`); the token is not told.

        A machine ``installed`` with no install's secret kept (an inventory restored from a
        backup taken before its registration, then marked installed) is told with the claim
        of the ``secret`` the node sent (its sha256, as a contested registration's): the
        operator's ``netboot machines claim REF CLAIM`` (:meth:`give_to_claim`) has its next
        try registered again, without a reinstall; the claim alone gives nothing (s49-ha)."""
        state = machine.state
        ref = machine.ref
        claim = None
        if state is MachineState.INSTALLED and not machine.secret_hash \
                and isinstance(secret, str) and 0 < len(secret) <= 256:
            claim = hashlib.sha256(secret.encode()).hexdigest()
        if state is _REGISTERED:
            why = ("the machine token it sent is not the one its registration gave (an "
                   "inventory restored from a backup taken before that registration, or a "
                   "host that is not its device)")
            fix = (f"if it is the device, 'netboot machines reinstall {ref}' and a network "
                   "boot install it again")
        elif state is MachineState.REINSTALL:
            why = ("the machine is to be reinstalled: the reinstall voided the machine token "
                   "of the install its node still runs")
            fix = ("a network boot installs it again; if the reinstall was asked by mistake, "
                   f"'netboot machines mark-installed {ref}' takes it back"
                   + ("" if machine.secret_hash else " (though with no install secret kept "
                      "its node cannot prove its install then: a reinstall by an older "
                      "netboot dropped it)"))
        else:
            why = (f"the machine is {state} and holds no machine token"
                   + (": marked installed, but its node's install secret is not the one kept"
                      if state is MachineState.INSTALLED and machine.secret_hash else
                      " (a reinstall voided it and no new install registered, or the "
                      "inventory was restored from a backup taken before its registration; "
                      "no install secret is kept to prove its node by)"))
            fix = (f"'netboot machines reinstall {ref}' and a network boot install it again, "
                   "with a new machine token")
            if claim is not None:
                fix = (f"if it is this machine's device, running the install the inventory "
                       f"lost ({_claim_place(machine, peer)}), "
                       f"'netboot machines claim {ref} {claim}' (POST "
                       f"/api/v1/machines/{ref}/claim) registers it again at its next try, "
                       f"without a reinstall; else {fix}")
            elif state in _LOST_INSTALL and isinstance(secret, str) and secret:
                fix = (f"if it is this machine's device and installed since a backup that was "
                       f"restored, 'netboot machines mark-installed {ref}': its next try's "
                       f"refusal names the claim that registers it again without a reinstall; "
                       f"else {fix}")
        message = (f"a later boot of its installed OS (its register command, from "
                   f"{peer or 'an unknown address'}) was refused (401): {why}. It retries at "
                   f"every boot until then. Fix: {fix}")
        kind = "registration refused"
        recorder = self.recorder
        if claim is not None:  # kept by address, beside the rate-limited events (claims)
            self.kept.refused(machine, str(peer) if peer else "", claim, self._clock())
        if recorder.repeats(machine.id, kind, message, machine) \
                or not self._refused_boots.take(machine.id, self._clock()):
            return
        recorder.note(Event(machine.id, self._clock(), kind, message,
                            {"peer": str(peer) if peer else None, "state": str(state),
                             **({"claim": claim} if claim else {})}),
                      machine)

    def render_failed(self, machine: Machine, what: str, kind: str, template: str | None,
                      exc: Exception) -> None:
        """A ``render failed`` event: ``machine``'s ``what`` (its iPXE script, its config)
        failed to render with ``exc`` (a RenderError: a template's undefined name, its
        syntax, a check of its output), from ``template`` (its file, None: not one file),
        with the line and the fix. It was only logged, a 500 to the device: the dashboard
        and ``netboot machines show`` said nothing of why the machine was stuck (s41-ops).
        Queued with the boot path's notes (no commit awaited: the device's answer is the
        500 either way); bounded (:data:`RENDER_FAILED_BURST`, :data:`RENDER_FAILED_EVERY`)."""
        text = str(exc)
        where = _RENDER_LINE.search(text)
        line = int(where.group(1)) if where else None
        # A line of a template it includes is named by that file's name (in the text).
        included = where.group(2) if where else None
        at = f", line {line}" if line and not included else ""
        message = (f"its {what} failed to render: {text}"
                   + (f" (template file {template}{at})" if template else "")
                   + f". Fix: correct that template line, or the value it reads (the "
                   "machine's, its profile's, cluster's or group's); 'netboot render "
                   f"{machine.ref} {kind}' shows the error without a boot, and the device's "
                   "next try renders it again")
        recorder = self.recorder
        if recorder.repeats(machine.id, "render failed", message, machine) \
                or not self._render_fails.take(machine.id, self._clock()):
            return
        recorder.note(Event(machine.id, self._clock(), "render failed", message,
                            {"template": template, "line": line, "included": included,
                             "error": text}), machine)
        failing = self.render_failing
        failing.setdefault(machine.id, set()).add(what)
        if len(failing) > _REPORT_BUDGETS:
            failing.popitem(last=False)

    def rendered(self, machine: Machine, what: str) -> None:
        """``machine``'s ``what``, told as failing (:attr:`render_failing`), rendered now: a
        ``rendered`` event, so that its failure is no longer its newest (at most one a
        ``render failed`` event: bounded as they are)."""
        failing = self.render_failing.get(machine.id)
        if failing is None or what not in failing:
            return
        failing.discard(what)
        if not failing:
            del self.render_failing[machine.id]
        self.recorder.note(Event(machine.id, self._clock(), "rendered",
                                 f"its {what} rendered again: the render failure told before "
                                 "is fixed"), machine)

    async def give_to_claim(self, ref: str, claim: str) -> Machine:
        """Give registered machine ``ref`` to the install whose refused registration made
        ``claim`` (a ``registration contested`` event among its newest): its digest becomes
        the one kept, the machine token of the registration that held it is void, and the
        claimant's next try (the same secret) is answered as its registration's repeat,
        moved to where it is (k3s's node password has the same remedy: delete the node's
        stored password and the next join sets it). NotFound for a claim it did not make."""
        for attempt in range(1, DECIDE_ATTEMPTS + 1):
            machine = await identity.require_ref(self._store, ref)
            # Installed with no install's secret kept: a restored backup's machine whose
            # node runs an install the inventory lost (_refused_boot names its claim).
            restored = machine.state is MachineState.INSTALLED and not machine.secret_hash
            if machine.state is not _REGISTERED and not restored:
                raise Conflict(f"{machine.ref} is {machine.state}, not registered: its next "
                               "registration is its install's own", field="state")
            events = await self._store.list_events(machine.id, limit=_CLAIMS_SEEN)
            # Only a claim refused against the registration that holds the machine now: one
            # refused before it (before a reinstall and the new install's registration, or
            # before the machine was given to another claim) was another holder's rival, a
            # flood's or the device's old install's secret; given, it took the machine from
            # its device (s41-review, s41-ops). Its event is newer than the holder's; its
            # kept entry was refused against the registration as it is now (claims).
            made: Event | None = None
            since = machine.in_state_since
            for e in reversed(events):
                if e.kind in _HOLDERS or e.time < since:
                    break
                if made is None and e.kind in _CLAIMING \
                        and isinstance(e.data.get("claim"), str) \
                        and hmac.compare_digest(e.data["claim"].encode(), claim.encode()):
                    made = e
            kept = await self.kept.held(machine)
            held = next((h for h in kept if h.claim == claim), None)
            if made is None and held is None:
                raise NotFound(f"no refused registration of {machine.ref} made claim "
                               f"{claim!r} (its newest {_CLAIMS_SEEN} events since its "
                               "registration, and the claims the servers kept: one refused "
                               "in the last few seconds is found at the device's next try"
                               + "".join(f"; {h.peer or 'an unknown address'} sent {h.claim} "
                                         f"{h.tries} times" for h in kept[:_CLAIMS_TOLD])
                               + ")")
            # Where it came from: its kept entry (how often it tried) else its event's.
            peer = (held.peer if held else made.data.get("peer") if made else None) \
                or "an unknown address"
            tries = f", {held.tries} tries" if held else ""
            if restored:
                # Its install token (the install it ran, as the backup knew it) is void too:
                # the node's next try is taken by its secret alone (_taken_back), and it is
                # registered again with a new machine token.
                updated = replace_machine(machine, secret_hash=claim, install_token=None,
                                          token_hash=None, token_expires=None,
                                          updated=self._clock())
                said = (f"given to the install whose later boot from {peer} was refused "
                        f"(claim {claim}{tries}) by the operator's word: the inventory (a "
                        "restored backup) had lost its registration; its next try registers "
                        "it again, with a new machine token")
            else:
                updated = replace_machine(machine, secret_hash=claim, install_token=None,
                                          updated=self._clock())
                said = (f"given to the install whose registration from {peer} was refused "
                        f"(claim {claim}{tries}): its next try is answered; the machine token "
                        f"of the registration at {machine.ipv4 or 'no address'} is void")
            event = Event(machine.id, self._clock(), "registration claimed", said)
            if await self._written(Batch(update=(updated,), events=(event,),
                                         expect={machine.id: machine.state},
                                         versions={machine.id: machine.updated}),
                                   attempt, (machine,)):
                break
        self.claims.forget(machine.id)  # refused against the registration no longer held
        return updated

    async def _registration(self, machine: Machine) -> Event | None:
        """The newest ``registered`` event of ``machine`` among its newest
        :data:`_REGISTERED_SEEN` (None when it is gone): read only on the rare paths of a
        repeat that is not from the registered address. Bounded: each such 409 comes before
        the rate limit, and the store's default read was 1,000 events (s38-review3)."""
        events = await self._store.list_events(machine.id, limit=_REGISTERED_SEEN)
        return next((e for e in reversed(events) if e.kind == "registered"), None)

    async def _registered_peer(self, machine: Machine) -> str | None:
        """The peer the newest registration of ``machine`` came from, as its event recorded
        it: a repeat by report only."""
        event = await self._registration(machine)
        peer = event.data.get("peer") if event is not None else None
        return peer if isinstance(peer, str) else None

    async def _repeated(self, machine: Machine, peer: IPAddress | None,
                        choice: AddressChoice, entries: Sequence[AuditEntry]) -> Machine:
        """A registration made again with the spent install token from where the machine
        registered: the device's connection dropped after netboot committed, and its register
        command retries. Answered as the first was (the same machine token), nothing moved;
        one event says it was a repeat. (It retried 409s for an hour and never learnt it was
        registered: the defect session 36 left.)"""
        from_ = peer or choice.address or "an unknown address"
        event = Event(machine.id, self._clock(), "registration repeated",
                      f"registered again from {from_} with its spent install token: a repeat "
                      f"of its registration at {machine.ipv4 or 'no address'} (its answer was "
                      "lost), answered as the first; nothing changed")
        update: tuple[Machine, ...] = ()
        if not machine.install_token:
            # Registered by a netboot that gave no machine token: it gets one now.
            machine = replace_machine(machine, install_token=self._new_token(),
                                      updated=self._clock())
            update = (machine,)
        # Said once while it repeats from one place (its retries, or whoever replays the
        # spent token from there): each is audited, as every request is; only the first is
        # history.
        told = self.recorder.last(machine.id) == (event.kind, event.message)
        await self.recorder.commit(Batch(update=update, events=() if told else (event,),
                                         audit=entries))
        return machine

    async def _moved_before_its_answer(self, machine: Machine, choice: AddressChoice,
                                       reported: Mapping[str, str]) -> bool:
        """Whether a repeat with the spent install token from an address that is not where
        ``machine`` registered is taken as its device, whose answer was lost and whose lease
        changed before it retried (it has no machine token, so it could only retry 409s until
        a reinstall: s37-register's "left"). Only while the register command would still be
        retrying (:data:`REPEAT_ELSEWHERE_SECONDS` since its registration), only carrying the
        ``/etc/machine-id`` its registration reported (none reported: never), only for a
        machine without ``fixed_ipv4`` (its address is the operator's, and a request from
        elsewhere is not its device: s36-claim), only to a usable address. The spent token
        alone is not enough: it crossed plain HTTP in the config URL and sits in the config
        on disk, where the machine-id is not. What this gives a holder of both is in README
        "Registration and later boots". Read on this path
        alone (it was a 409), so the registration's time is its event's, not a field more on
        every machine."""
        known = machine.facts.get("machine_id")
        if machine.fixed_ipv4 is not None or choice.ipv4 is None or not known \
                or not hmac.compare_digest(known.encode(),
                                           reported.get("machine_id", "").encode()):
            return False
        since = self._clock() - REPEAT_ELSEWHERE_SECONDS
        registered = await self._registration(machine)
        if registered is None or registered.time < since:
            return False
        # A machine-id another machine reported too is the image's, not the device's: an
        # image built with one in /etc (a cloned golden image; k3OS's /etc, its image's, comes
        # from an Alpine stage that ran `apk add dbus`, whose post-install in today's aports
        # writes /etc/machine-id) gives every machine the same one, known to whoever has the
        # image, and the spent token alone would move the machine (s38-review2). Read on
        # this rare path alone, after the token, the machine-id and the hour matched.
        return not any(other.id != machine.id and other.facts.get("machine_id") == known
                       for other in await self._all_machines())

    async def _repeated_elsewhere(self, machine: Machine, peer: IPAddress | None,
                                  choice: AddressChoice, entries: Sequence[AuditEntry], *,
                                  proven: bool = False) -> Machine:
        """A repeat taken by :meth:`_moved_before_its_answer` (or ``proven`` by its install's
        secret, :func:`secret_proves`): answered as the first was (the
        same machine token), its address moved to where it is now (its DNS name, a server's
        cluster endpoint follow, as a later boot's report moves them), one event saying so.
        Its later retries come from that address: repeats as any other."""
        ipv4 = str(choice.ipv4)
        for attempt in range(1, DECIDE_ATTEMPTS + 1):
            updated = replace_machine(machine, ipv4=ipv4, updated=self._clock(),
                                      install_token=machine.install_token
                                      or self._new_token())
            event = Event(machine.id, self._clock(), "registration repeated",
                          f"registered again from {choice.address} "
                          f"({'the request' if choice.source == 'peer' else 'reported'}) "
                          + ("with its spent install token and its install's secret, after "
                             "its registration at " if proven else
                             "with its spent install token, within "
                             f"{REPEAT_ELSEWHERE_SECONDS // 60} minutes of its registration at ")
                          + f"{machine.ipv4 or 'no address'}: taken as its device, whose answer "
                          f"was lost and whose address changed; {machine.ipv4 or 'none'} -> "
                          f"{ipv4}", {"peer": str(peer) if peer else None})
            if await self._written(Batch(update=(updated,), events=(event,),
                                         expect={machine.id: machine.state},
                                         versions={machine.id: machine.updated},
                                         audit=entries), attempt, (machine,)):
                break
            machine = await self._read_again(machine)  # a reinstall since: its 409/401
        log_line(self._log, logging.INFO, "address mac=%s ip=%s cluster=%s", machine.mac, ipv4,
                 machine.cluster)
        return updated

    async def _reported_at(self, machine: Machine, choice: AddressChoice,
                           peer: IPAddress | None, reported: Mapping[str, str],
                           entries: Sequence[AuditEntry]) -> Machine:
        """A later boot of a registered machine, with its machine token, saying where it is:
        a site DHCP server's new lease moves its address, so its DNS name and, for a server,
        its cluster's endpoint follow. A fixed_ipv4 stays whatever it reports."""
        for attempt in range(1, DECIDE_ATTEMPTS + 1):
            facts = {**machine.facts, **reported}
            if choice.ipv6:
                facts["ipv6"] = str(choice.ipv6)
            ipv4 = machine.fixed_ipv4 or (str(choice.ipv4) if choice.ipv4 else machine.ipv4)
            if ipv4 == machine.ipv4 and facts == machine.facts:
                # The usual boot: nothing moved, nothing written but its audit entry.
                if entries:
                    await self.recorder.commit(Batch(audit=entries))
                return machine
            updated = replace_machine(machine, ipv4=ipv4, facts=facts, updated=self._clock())
            events: tuple[Event, ...] = ()
            if ipv4 != machine.ipv4:
                events = (Event(machine.id, self._clock(), "address changed",
                                f"reported {choice.address} "
                                f"({'the request' if choice.source == 'peer' else 'reported'})"
                                f" at boot with its machine token: {machine.ipv4 or 'none'} "
                                f"-> {ipv4}", {"peer": str(peer) if peer else None}),)
            # Compare-and-set as the registration: an operator's edit since is not undone.
            if await self._written(Batch(update=(updated,), events=events,
                                         expect={machine.id: machine.state},
                                         versions={machine.id: machine.updated},
                                         audit=entries), attempt, (machine,)):
                break
            machine = await self._read_again(machine)
        log_line(self._log, logging.INFO, "address mac=%s ip=%s cluster=%s", machine.mac, ipv4,
                 machine.cluster)
        return updated

    # -- bulk import ------------------------------------------------------------------
    async def import_rows(self, rows: Iterable[tuple[int, Mapping[str, Any]]], *,
                          dry_run: bool = False,
                          progress: Callable[[int], None] | None = None,
                          create_only: bool = False) -> ImportReport:
        """One transaction: every row applies or none; errors list every bad row.

        A row names a machine by any of its identifiers (MACs, serial, asset tag, UUID): one
        that an enrolled machine holds makes the row an update of that machine (its new NICs
        added, nothing dropped); ``discovered`` records holding one are merged into it (or,
        with no enrolled machine named, the first of them is enrolled in place). A row
        whose identifiers point at two enrolled machines, or repeat one of an earlier row, is
        an error naming the line and the field.

        ``create_only``: for a caller that may enroll but not change or read machines (an
        ``enroll`` token: a factory-floor scanner). A row that names an enrolled machine is
        an error instead of its update, and no error names another machine: through an
        import such a token renamed machines and set their role, labels and fixed address
        (s37-attack), which PATCH refuses it, and each "used by" told it which MAC holds a
        serial or a hostname. Discovered records are still enrolled (what approving does).
        """
        for attempt in range(1, DECIDE_ATTEMPTS + 1):
            refused: StateChanged | None = None
            with _collector_paused():
                try:
                    # Not under the fixed-address lock: only its check of the addresses
                    # given against the inventory as stored then, and its commit, are
                    # (_import_rows); held for the whole run, every other server's and
                    # CLI's write of a fixed_ipv4 waited for a large file's parse.
                    return await self._import_rows(rows, dry_run=dry_run, progress=progress,
                                                   create_only=create_only)
                except StateChanged as exc:
                    refused = exc
            # A machine the import read was changed meanwhile without moving its state (a
            # boot's facts, an edit): the import is made again from what is stored now when
            # its rows can be read again (a list: the API's, a parsed file); a stream of
            # rows is read once, and the import is re-run by whoever ran it (409).
            if refused.field != "updated" or attempt >= DECIDE_ATTEMPTS \
                    or not isinstance(rows, Sequence):
                raise refused
        raise AssertionError("unreachable: the last attempt raises")

    async def _import_rows(self, rows: Iterable[tuple[int, Mapping[str, Any]]], *,
                           dry_run: bool, progress: Callable[[int], None] | None,
                           create_only: bool = False) -> ImportReport:
        errors: list[RowError] = []
        clusters = {c.name: c.name for c in await self._store.list_clusters()}
        profiles = {p.name: p.name for p in await self._store.list_profiles()}
        existing = {m.id: m for m in await self._all_machines()}
        # Every identifier the import has met, by kind: the id of the inventory's machine
        # holding it (a str) until a row names it, then that row's line (an int). One map,
        # not a second one of the rows' identifiers, and a MAC by its 6 bytes (the stored
        # machine's own), not as text: a re-import's 200,000 identifiers are the
        # inventory's, and a row's copies are dropped once it is done (~40 MiB of its peak).
        claimed = _claims_of(existing.values())
        # Folded as the store's unique index folds them (RFC 4343): an inventory's
        # "Edge-SN2" (an older netboot's, a hand edit's) holds "edge-sn2" too.
        by_host = {fold_hostname(m.hostname): m.id for m in existing.values() if m.hostname}
        seen_host: dict[str, int] = {}  # folded hostname -> line
        # One fixed_ipv4 per machine, as Core._fixed_ipv4_free: the inventory's holders,
        # and the line that gave one (a machine's NICs share it: one row, one machine).
        by_fixed = {m.fixed_ipv4: m.id for m in existing.values() if m.fixed_ipv4}
        seen_fixed: dict[str, int] = {}
        line_of: dict[str, int] = {}  # machine id -> line
        update: list[Machine] = []
        merge: list[tuple[str, str]] = []
        unchanged: list[Machine] = []  # named when reported, after the identifiers are dropped
        now = self._clock()
        # The new machines, kept as their rows' checked values until the store writes them.
        create = NewMachines(lifecycle.first_state(lifecycle.Trigger.ENROLL), now)
        unnamed: list[int] = []  # where in create: rows without a hostname
        # The clusters and profiles the rows name (-> the first line naming each), checked
        # again at the commit, under the lock a delete of one holds (refs_still).
        named_clusters: dict[str, int] = {}
        named_profiles: dict[str, int] = {}
        # How many rows there are, if the rows can tell (a list; iter_import's estimate).
        ids = _new_ids(operator.length_hint(rows, 0))
        for n, (line, row) in enumerate(rows):
            if n % _ROWS_PER_TURN == 0:
                if progress is not None:
                    progress(n)
                # The loop's other work between chunks of rows: checking 340,000 rows of a
                # 1 MiB file (every one an error) held every DHCP, TFTP and HTTP answer for
                # ~1.4 s, an enroll token's to repeat (s38-attack, left). What the import
                # read may change meanwhile, as it may while it waits for its commit: its
                # compare-and-set (expect, versions) and the store's unique identifiers stand.
                await asyncio.sleep(0)
            try:
                values, own = self._row_values(row, clusters, profiles)
                target, absorb = self._row_target(own, line, existing, claimed,
                                                  anonymous=create_only)
            except ValidationError as exc:
                errors.append(RowError(line, exc.field, exc.message))
                continue
            if create_only and values[6] is Role.SERVER:
                errors.append(RowError(line, "role", SERVER_NEEDS_OPERATOR))
                continue
            if create_only and target is not None and target.state != MachineState.DISCOVERED:
                errors.append(RowError(line, own[0][0] if own else "mac", _ENROLLED_ALREADY))
                continue
            if target is not None:
                if target.id in line_of:
                    errors.append(RowError(line, "mac", f"names machine {target.ref} again "
                                           f"(line {line_of[target.id]})"))
                    continue
                ident = target.id
            else:
                ident = next(ids)
            line_of[ident] = line
            hostname = values[1]
            if target is not None and hostname == target.hostname:
                hostname = target.hostname  # the stored string, not the row's copy, is kept
            if hostname and (clash := _taken(
                    "hostname", fold_hostname(hostname), repr(hostname), "is used by", line,
                    seen_host, by_host, ident, absorb, existing, create_only)) is not None:
                errors.append(clash)
                continue
            # Against the file's other rows here; against the inventory's holders once
            # every row is read (_FixedGiven): a machine the file gives another address
            # frees its own (two machines' addresses swapped).
            if (fixed := values[9]) is not None and (clash := _taken(
                    "fixed_ipv4", fixed, fixed, "", line, seen_fixed, {}, ident, absorb,
                    existing, create_only)) is not None:
                errors.append(clash)
                continue
            if target is not None and not absorb and _changes_nothing(target, values):
                # The usual row of a re-import: nothing to build, copy or compare.
                unchanged.append(target)
                continue
            if values[5] is not None and values[5] not in named_clusters:
                named_clusters[values[5]] = line
            if values[7] is not None and values[7] not in named_profiles:
                named_profiles[values[7]] = line
            if target is None and not absorb:
                # The usual row: a new machine, never built as a Machine here (its checked
                # values go to the store as they are).
                if hostname is None:
                    unnamed.append(len(create))
                create.add(ident, *values)
                continue
            machine = _row_machine(ident, values, now)
            if target is None:
                # New, and discovered records prove to be it.
                merge += [(d.id, machine.id) for d in absorb]
                if hostname is None:
                    unnamed.append(len(create))
                create.add_machine(identity.merge(machine, absorb, now))
                continue
            merged = _updated(target, machine, absorb, now)
            try:
                lifecycle.check_move(target, merged.cluster, merged.role)
            except Conflict as exc:
                errors.append(RowError(line, exc.field or "cluster", str(exc)))
                continue
            merge += [(d.id, machine.id) for d in absorb]
            if equal(merged, target):
                unchanged.append(target)
            else:
                update.append(replace(merged, updated=now))
        # 200,000 identifiers of a large file, needed no more: not held through the write.
        claimed.clear()
        # Machines enrolled without a name get one from the hostname template, unique against
        # both the inventory and the rest of the file.
        # (Made only when needed: for a re-import, two sets of 100,000 names for nothing.)
        taken = {*by_host, *seen_host} if unnamed else set()
        chosen: dict[str, int] = {}  # a name the template chose -> its row's line
        groups = await self._store.list_groups()
        # Only a group's own template changes a machine's: without any, each unnamed row
        # takes the default without its labels made to select one (25,000 rows of a file).
        templated = any(g.hostname_template for g in groups)
        for i in unnamed:
            if errors:
                break
            if create.hostname(i) is not None:
                continue  # named by a discovered record it absorbed
            m = create[i]
            try:
                base = render_hostname(self.template_for(m, groups) if templated
                                       else self.hostname_template, m)
            except ValidationError as exc:
                errors.append(RowError(line_of[m.id], exc.field, exc.message))
                continue
            name, n = base, 2
            while name in taken:
                name, n = f"{base[:58]}-{n}", n + 1
            taken.add(name)
            create.rename(i, name)
            chosen[name] = line_of[m.id]
        # A hostname freed by one row and taken by another in the same file is fine; a name
        # taken from a machine the file does not rename is not.
        renamed = {m.id for m in update} | {source for source, _ in merge}
        named = [*((ident, create.hostname(i)) for i, ident in enumerate(create.ids())),
                 *((m.id, m.hostname) for m in update)] if by_host else []
        for ident, hostname in named:
            owner = by_host.get(fold_hostname(hostname or ""))
            if owner and owner != ident and owner not in renamed:
                line = line_of[ident]
                if not any(e.line == line for e in errors):
                    holder = "another machine" if create_only else existing[owner].ref
                    errors.append(RowError(line, "hostname",
                                           f"{hostname!r} is used by {holder}"))
        given = _FixedGiven(seen_fixed, line_of, update, merge, existing) if seen_fixed \
            else None
        if given is not None and given.given:
            failed = {e.line for e in errors}
            errors += [clash for clash in given.clashes(
                {v: (i, existing[i].ref) for v, i in by_fixed.items()}, create_only)
                if clash.line not in failed]
        # A row renaming a machine whose installed OS carries its old name: said, by line.
        renames = [RowError(line_of[m.id], "hostname", note) for m in update
                   if m.id in existing and m.hostname != existing[m.id].hostname
                   and (note := renamed_installed(existing[m.id], m))]
        report = ImportReport(
            created=tuple(create.refs()), changed=tuple(m.ref for m in update),
            unchanged=tuple(m.ref for m in unchanged),
            errors=tuple(sorted(errors, key=lambda e: e.line)),
            warnings=tuple(sorted(renames, key=lambda e: e.line)),
        )
        if errors or dry_run:
            return report
        # An event per machine is its history ("enrolled: imported"): the new machines'
        # as one run of their ids (codec.EventRun), not 100,000 events.
        events = codec.joined(
            codec.EventRun(list(create.ids()), now, "enrolled", "imported"),
            [Event(m.id, now, "updated", "changed by an import") for m in update],
            [Event(target, now, "merged", f"discovered record {source} is this machine "
                   "(found by an import); its history is kept", {"merged": source})
             for source, target in merge])
        # Compare-and-set on every machine the import read and changes or absorbs, on its
        # state and its version: a machine another server moved meanwhile fails the import,
        # which is re-run; one changed otherwise (a fact, an edit) is not undone by the
        # machine written from the import's read (import_rows makes it again).
        read = [existing[m] for m in [*(u.id for u in update), *(s for s, _ in merge)]
                if m in existing]
        batch = Batch(merge=merge, create=create, update=update, events=events,
                      expect={m.id: m.state for m in read},
                      versions={m.id: m.updated for m in read})
        if (given is None or not given.given) and not named_clusters and not named_profiles:
            try:
                await self.recorder.commit(batch)
            except Conflict as refused:
                raise _chosen_taken(refused, chosen, rows) from None
            return replace(report, applied=True)
        # Written under the lock every write of a fixed_ipv4 holds from its check to its
        # commit (Core._fixed_ipv4_free; across servers and processes, FixedLock). The store
        # refuses an address another machine holds (its unique index, which lets a batch
        # swap addresses): one given to another machine since this import read the
        # inventory is a 409 naming its line and holder, never two machines with one
        # address. The holders are read only then, to name the line: reading every machine
        # with an address first, under the lock, was ~2 s of CPU of a re-import of 100,000
        # giving 1,000 new ones (s41-integrity).
        # (The holders read after the handler: mypyc's compiled coroutines must not await
        # inside one, tests/test_compiled.py.)
        # The clusters and profiles the rows name, under the same lock (Core.delete's
        # delete of one holds it): one deleted by another writer since the import read it,
        # finding no machine naming it yet, is a 409 naming the line, nothing written;
        # before, the import's machines were written naming one that was gone.
        # Held and released by hand, the release after the handler: an exception leaving an
        # ``async with`` of a compiled coroutine is awaited through the lock's __aexit__
        # while it is handled (a PostgreSQL advisory lock's release suspends), which in
        # mypyc's build left it broken and crashed the process (s43: an import refused on
        # its version, made again, on PostgreSQL; tests/test_compiled.py's run of
        # test_enroll).
        lock = self.fixed_lock
        await lock.__aenter__()
        raised: BaseException | None = None
        try:
            await self._import_held(batch, given, chosen, rows, create_only,
                                    named_clusters, named_profiles)
        except BaseException as exc:  # raised again once the lock is released
            raised = exc
        await lock.__aexit__(None, None, None)
        if raised is not None:
            raise raised
        return replace(report, applied=True)

    async def _import_held(self, batch: Batch, given: _FixedGiven | None,
                           chosen: Mapping[str, int], rows: Iterable[Any],
                           create_only: bool, named_clusters: Mapping[str, int],
                           named_profiles: Mapping[str, int]) -> None:
        """An import's commit under ``fixed_lock`` (its caller holds it): the names checked
        again, the batch written, an address taken meanwhile named by its line."""
        await self.refs_still(named_clusters, named_profiles)
        held: Conflict | None = None
        try:
            await self.recorder.commit(batch)
        except Conflict as exc:
            if exc.field != "fixed_ipv4":
                raise _chosen_taken(exc, chosen, rows) from None
            held = exc
        if held is not None and given is not None:
            clashes = given.clashes(await self._fixed_holders(), create_only)
            if not clashes:
                raise held
            raise Conflict(f"line {clashes[0].line}: fixed_ipv4 {clashes[0].message}, "
                           "given it by another writer since this import read the "
                           "inventory; import the file again", field="fixed_ipv4",
                           holder=held.holder)

    async def _fixed_holders(self) -> dict[str, tuple[str, str]]:
        """Each fixed_ipv4 of the inventory now: its machine's id and ref (one scan)."""
        flt = MachineFilter(with_fixed_ipv4=True)
        total = await self._store.count_machines(flt)
        return {m.fixed_ipv4: (m.id, m.ref) for m in await self._store.list_machines(
            replace(flt, limit=total + 100)) if m.fixed_ipv4} if total else {}

    @staticmethod
    def _row_target(own: Sequence[_Claim], line: int, existing: Mapping[str, Machine],
                    claimed: _Claimed, *, anonymous: bool = False,
                    ) -> tuple[Machine | None, list[Machine]]:
        """The machine an import row updates (None: a new one) and the discovered records it
        absorbs, given the row's identifiers (``own``) and ``claimed`` (each identifier met
        so far: the id of the machine holding it, or the line of the row that named it, as
        it leaves it for the row); ValidationError naming the field of a contested
        identifier (``anonymous``: without naming the machines)."""
        for kind, key in own:
            seen = claimed[kind].get(key)
            if type(seen) is int:
                raise ValidationError(kind, f"duplicate of line {seen} ({_claim_text(key)})")
        target: Machine | None = None
        absorb: dict[str, Machine] = {}
        for kind, key in own:
            holder = claimed[kind].get(key)
            if not isinstance(holder, str):
                continue  # nobody's (a line was refused above)
            other = existing[holder]
            if other.state == MachineState.DISCOVERED:
                absorb[other.id] = other
            elif target is None:
                target = other
            elif other.id != target.id:
                if anonymous:
                    raise ValidationError(kind, f"{_claim_text(key)} belongs to another "
                                                "machine than the row's other identifiers")
                raise ValidationError(kind, f"{_claim_text(key)} belongs to machine "
                                            f"{other.ref}, but the "
                                            f"row's other identifiers name {target.ref}")
        for kind, key in own:
            claimed[kind][key] = line
        found = list(absorb.values())
        if target is None and found:
            # Only discovered records: the first becomes the enrolled machine (its id and
            # history stay), the others merge into it.
            target, found = found[0], found[1:]
        return target, found

    def _row_values(self, row: Mapping[str, Any], clusters: Mapping[str, str],
                    profiles: Mapping[str, str]) -> tuple[_Values, list[_Claim]]:
        """What a row says of its machine, checked (:data:`_Values`), and its identifiers
        as :func:`netboot.identity.claims` gives them.

        Every check below runs for every row; what a bulk import of 100,000 CSV rows makes
        cheap is the usual case: a test of the whole key set at once, text cells passed by
        one type test, one MAC parsed without import_macs's lists, and only the identifier
        columns the row has cleaned."""
        if not row.keys() <= _IMPORT_FIELDS:
            unknown = next(k for k in row if k not in _IMPORT_FIELDS)
            raise ValidationError(unknown, f"unknown column (known: {', '.join(IMPORT_FIELDS)})")
        for key, value in row.items():
            if type(value) is str:
                continue  # every cell of a CSV row
            # YAML may give a number (serial: 12345); a list, an object or true/false in a
            # scalar column is a mistake to report, not to str() into a value.
            if key not in ("labels", "macs") and value is not None and (
                    isinstance(value, bool) or not isinstance(value, str | int)):
                raise ValidationError(key, f"must be text, got {type(value).__name__}")
        labels = row.get("labels") or {}
        if isinstance(labels, dict):
            for k, v in labels.items():
                if type(v) is not str and (isinstance(v, bool)
                                           or not isinstance(v, str | int | float)):
                    raise ValidationError(f"labels.{k}", f"must be text, got {type(v).__name__}")
        mac_text = row.get("mac")
        if type(mac_text) is str and mac_text and "macs" not in row:
            try:
                macs: tuple[MacAddress, ...] = (MacAddress.parse(mac_text),)
            except ValidationError as exc:
                raise caused(ValidationError("mac", exc.message), None) from None
        else:
            macs = import_macs(row)
        for mac in macs:
            identity.enrolled_mac(mac, "mac" if "macs" not in row else "macs")
        # Names are checked against the inventory's and the inventory's copy is kept: one
        # string for the 12,500 machines of a cluster, not one each.
        cluster = row.get("cluster") or None
        if cluster is not None:
            if cluster not in clusters:
                raise ValidationError("cluster", unknown_ref("cluster", cluster, clusters))
            cluster = clusters[cluster]
        profile = row.get("profile") or None
        if profile is not None:
            if profile not in profiles:
                raise ValidationError("profile", unknown_ref("profile", profile, profiles))
            profile = profiles[profile]
        role_text = row.get("role") or None
        role = None if role_text is None else _ROLES.get(role_text)
        if role_text is not None and role is None:
            raise ValidationError("role", f"{role_text!r} is not server or agent")
        if not isinstance(labels, dict):
            if isinstance(labels, ValidationError):
                raise labels  # a CSV labels cell that is not k=v;k=v (_csv_rows)
            raise ValidationError("labels", "must be a mapping of key: value")
        hostname = check_hostname(str(row["hostname"])) if row.get("hostname") else None
        # enrolled_value refuses placeholders and normalises the rest: these are the claims
        # identity.claims would find, in its order, without cleaning them twice (a MAC by
        # its bytes, see _Claim).
        own: list[_Claim] = [("mac", mac.raw) for mac in macs]
        uuid = serial = asset = None
        if row.get("uuid"):
            uuid = identity.enrolled_value("uuid", str(row["uuid"]))
            own.append(("uuid", uuid))
        if row.get("serial"):
            serial = identity.enrolled_value("serial", str(row["serial"]))
            own.append(("serial", serial))
        if row.get("asset"):
            asset = identity.enrolled_value("asset", str(row["asset"]))
            own.append(("asset", asset))
        fixed = row.get("fixed_ipv4") or None
        if fixed is not None:
            # The same check as the store's codec, so that a dry run does not pass a row
            # (999.1.1.1) that the real import then refuses without naming its line.
            try:
                fixed = str(ipaddress.IPv4Address(str(fixed)))
            except ValueError:
                raise caused(ValidationError("fixed_ipv4", f"{fixed!r} is not an IPv4 address"),
                             None) from None
            check_fixed_ipv4(fixed, self.server_addresses())
        if not own:
            raise ValidationError("mac", "required: a mac (or macs), serial, asset or uuid")
        return (macs, hostname, uuid, serial, asset, cluster, role, profile,
                {sys.intern(str(k)): sys.intern(str(v)) for k, v in labels.items()}
                if labels else NO_ENTRIES, fixed), own

    async def _all_machines(self) -> list[Machine]:
        # One read: pages by OFFSET walk the skipped rows again for every page.
        total = await self._store.count_machines()
        return await self._store.list_machines(MachineFilter(limit=total + 100)) if total else []

