"""Command line: serve | machines | profiles | clusters | groups | import | render | explain |
tokens | audit | ca | check-config | lab.

Inventory commands open the same database the server uses (SQLite in WAL mode allows a second
process), so they work whether or not the server runs. They are a thin face over
:mod:`netboot.core`, as the API is: the same rules, defaults and renders, whichever is asked.
Tables and local ISO 8601 times with how long ago where a person reads them; ``--json`` where
a script does, on every command that prints a result (the API's shapes, times as Unix seconds).
Logging is configured here and nowhere else. Whoever can run these commands can open the
inventory file, so the command line acts as admin; its changes are audited as ``cli:<user>``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from netboot import __version__
from netboot.claims import claims_out
from netboot.config import Config, load, located
from netboot.core import (
    Core,
    cluster_problems,
    machine_dict,
    profile_file_errors,
    public_dict,
)
from netboot.enroll import renamed_installed
from netboot.errors import ConfigError, NetbootError, NotFound, ValidationError
from netboot.inventory import codec
from netboot.inventory.base import MachineFilter, Store
from netboot.logs import BatchedStreamHandler, TextFormatter, printable
from netboot.model import Arch, LoaderChain, MacAddress, Machine, MachineState, Scope


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    # printable(): a cell may be a stranger's (a firmware serial, an audit entry's target
    # taken from a refused request's path): a line break or an ESC must not drive the
    # operator's terminal or forge a row (s36-attack).
    cells = [[("" if c is None else printable(str(c))) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line.rstrip()]
    for r in cells:
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(out)


def _ago(t: float, now: float) -> str:
    """How long ago ``t`` was (or how long until it, for expiries), in its largest unit."""
    seconds = abs(now - t)
    if seconds < 1:
        return "just now"
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60), ("s", 1)):
        if seconds >= size:
            amount = f"{int(seconds // size)} {unit}"
            break
    return f"in {amount}" if t > now else f"{amount} ago"


def _when(t: float | None, now: float) -> str:
    """Local ISO 8601 time with its UTC offset, and how long ago: ``2026-12-01T14:57:23+01:00
    (3 min ago)``. Empty when the time was never set (stored as 0 or null)."""
    if not t:
        return ""
    stamp = datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")
    return f"{stamp} ({_ago(t, now)})"


def _human(value: Any) -> str:
    """A field value as a person reads it: mappings as ``k=v, k=v``, lists comma-separated."""
    if isinstance(value, Mapping):
        return ", ".join(f"{printable(str(k))}={_human(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_human(v) for v in value)
    return printable(str(value))  # a stranger's text too: see _table


# Fields of the codec dicts that hold Unix times.
LOADER_HELP = ("UEFI first-stage chain: ipxe, or shim-grub (signed shim, GRUB and kernel, "
               "for Secure Boot); default: the group's, the profile's, else by architecture")
_TIME_FIELDS = frozenset({"created", "updated", "state_since", "token_expires", "time", "expires"})


def _print_fields(fields: Mapping[str, Any], width: int, now: float, *,
                  skip_empty: bool = True) -> None:
    # The values in one column: explain's first_stage_reason (18) ran into its value past
    # the 16 it was given.
    width = max([width, *map(len, fields)])
    for key, value in fields.items():
        if value in (None, {}, [], ""):
            if not skip_empty:
                print(f"{key:{width}} -")
            continue
        shown = _when(value, now) if key in _TIME_FIELDS else _human(value)
        print(f"{key:{width}} {shown}")


def _labels(items: Sequence[str] | None, what: str = "--label") -> dict[str, str]:
    out = {}
    for item in items or ():
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValidationError(what, f"{item!r} is not key=value")
        out[k] = v
    return out


def _config(args: argparse.Namespace) -> Config:
    flags = {k: getattr(args, k, None) for k in ("interface", "advertise", "data_dir",
                                                  "log_level", "http_port", "https_port",
                                                  "dhcp_port",
                                                  "pxe_port", "dhcp_mode", "tftp_port",
                                                  "dns_port", "discovery")}
    if flags.get("interface"):
        flags["interface"] = list(flags["interface"] or ())
    path = getattr(args, "config", None) or os.environ.get("NETBOOT_CONFIG")
    return load(path, flags=flags)


# Commands that change the inventory: each goes to the audit log, as the API's changes do.
CHANGES = frozenset({
    ("machines", "add"), ("machines", "rm"), ("machines", "reinstall"), ("machines", "approve"),
    ("machines", "set"), ("machines", "mark-installed"), ("machines", "claim"),
    *((kind, action) for kind in ("profiles", "clusters", "groups")
      for action in ("add", "rm", "set")),
    ("import", None), ("tokens", "create"), ("tokens", "revoke"),
})


def local_user() -> str:
    """Who runs the command, for the audit log; under sudo, also who asked for it."""
    import pwd

    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a container user without a passwd entry
        user = f"uid{os.geteuid()}"
    sudo = os.environ.get("SUDO_USER")
    return f"{user}(sudo:{sudo})" if sudo and os.geteuid() == 0 else user


def _target(args: argparse.Namespace) -> str:
    """What the audit entry names, as typed. ``machines add`` enrolls by its positional MAC or
    by ``--mac``, ``--serial``, ``--asset``, ``--uuid`` alone (README's ``--mac A --mac B``
    and ``--serial CZ2048XYZ``): those were entered with an empty target, so the log said a
    machine was added and not which (s47-review)."""
    for key in ("name", "mac", "file"):
        if getattr(args, key, None):
            return str(getattr(args, key))
    if getattr(args, "macs", None):  # several machines (rm, reinstall, mark-installed)
        return " ".join(args.macs)
    # One machine by its first NIC (looked up as its hostname by `netboot audit`), else as
    # the other identifier typed.
    typed = (*(getattr(args, "more_macs", None) or ())[:1],
             *(getattr(args, key, None) for key in ("serial", "asset", "uuid")))
    return next((str(value) for value in typed if value), "")


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a container user without a passwd entry
        return f"uid {uid}"


def _readable_data_dir(cfg: Config) -> None:
    """A command run by a user who cannot read the data directory (0700, its keys 0600; the
    README runs the CLI with sudo): one error saying whose it is and to run the command as
    that user. It was the first file's permission error with that file's own fix: for
    secret.key "make it readable by the netboot user", which a user who only forgot sudo
    may follow by opening the key to others; for the CA "give a PEM certificate"."""
    path = cfg.data_dir
    try:
        st = path.stat()
    except OSError:
        return  # missing (made by the command) or unreachable: the command's own error
    if os.access(path, os.R_OK | os.X_OK):
        return
    import stat

    owner = _user_name(st.st_uid)
    raise ConfigError(f"{path} (owner {owner}, mode {stat.S_IMODE(st.st_mode):04o}) holds the "
                      f"inventory and its keys, and this command runs as "
                      f"{_user_name(os.geteuid())}, who cannot read it", key="server.data_dir",
                      fix=f"run the command as {owner}, the user netboot serve runs as "
                          f"(sudo netboot ...), or name another data directory")


async def _hostname_refs(args: argparse.Namespace, store: Store) -> None:
    """A machine named by its hostname where the CLI asks for a REF (`netboot machines show
    edge-1`, `mark-installed rack1-a`): hostnames are unique in the inventory and are what the
    dashboard and `events` name machines by, yet a REF was only a MAC or an id ("'edge-1' is
    neither a MAC address nor a machine id"). Each such REF is given to the command as the
    machine's id, as the API's {ref} is (core.machine_ref)."""
    from netboot.core import machine_ref

    for attr in ("mac", "macs", "ref"):
        value = getattr(args, attr, None)
        if isinstance(value, str):
            setattr(args, attr, await machine_ref(store, value))
        elif isinstance(value, list):
            setattr(args, attr, [await machine_ref(store, v) for v in value])


async def _with_store(args: argparse.Namespace,
                      fn: Callable[[Store, Config], Awaitable[int]]) -> int:
    from netboot.access import Access
    from netboot.service import open_inventory

    cfg = _config(args)
    try:
        _readable_data_dir(cfg)
        store, _ = await open_inventory(cfg)
    except ConfigError as exc:
        raise located(cfg, exc) from exc
    try:
        what = (args.cmd, getattr(args, "action", None))
        if what != ("machines", "add"):  # its MAC is a new machine's
            await _hostname_refs(args, store)
        if what not in CHANGES or getattr(args, "dry_run", False) \
                or (what == ("machines", "claim") and not args.claim):  # a list
            return await fn(store, cfg)
        outcome = "error"
        try:
            code = await fn(store, cfg)
            outcome = "ok" if code == 0 else f"exit {code}"
            return code
        except NetbootError as exc:
            outcome = f"error: {exc}"[:200]
            raise
        finally:
            await Access(store).record(Access.local(local_user()).name,
                                       " ".join(w for w in what if w), _target(args),
                                       peer="local", outcome=outcome)
    finally:
        await store.close()


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _report(args: argparse.Namespace, text: str, value: Any) -> None:
    """The result of a change: a line for a person, or ``value`` as JSON with ``--json``."""
    if getattr(args, "json", False):
        _print_json(value)
    else:
        print(text)


def _core(store: Store, cfg: Config, *, check_templates: bool = False,
          as_device: bool = False, device_at: str | None = None,
          peers: tuple[str, ...] = ()) -> Core:
    """The same core the server builds, with its settings; URLs as the server would give.
    ``as_device`` (``netboot render``): as a device gets them where nothing reachable is
    advertised (:func:`_device_address`), not the server's own 127.0.0.1; ``device_at``:
    the address the machine is known at (names.address_of), which tells its interface."""
    from netboot.content import Trust
    from netboot.model import reached_url
    from netboot.service import (
        advertised_address,
        build_core,
        public_base_url,
        public_https_url,
        url_stand_in,
    )

    @functools.cache
    def advertise() -> str:
        # Once: found without --advertise, it logs a warning, which a render said twice. A
        # render says which address it names itself (_device_address): the server's
        # "advertising 127.0.0.1" above a script naming 192.0.2.10 told the reader wrong.
        return advertised_address(cfg, by_reach_told=as_device)

    @functools.cache
    def local() -> str | None:
        return _device_address(cfg, advertise(), device_at) if as_device else None

    @functools.cache
    def base_url() -> str:
        return reached_url(public_base_url(cfg, advertise()), local(),
                           url_stand_in(cfg, advertise()))

    @functools.cache
    def trust() -> Trust:
        # The CA the server hands out, read, never made here (the server makes it).
        found = _exported_ca(cfg) if cfg.https.enabled else None
        if found is None:
            return Trust()
        return Trust(reached_url(public_https_url(cfg, advertise()), local(),
                                 url_stand_in(cfg, advertise())), *found)

    return build_core(cfg, store, base_url, check_templates=check_templates, trust=trust,
                      peers=peers)


def _device_address(cfg: Config, advertise: str, device_at: str | None = None) -> str | None:
    """The address ``netboot render`` names where the server advertises 127.0.0.1 (no
    default route, no --advertise) and answers each device with the address it reaches
    (service.reached_at, Content.at): that of the interface whose network holds the address
    the machine is known at (``device_at``), as the device asking over it gets; else the
    first interface's, said on stderr with the others' (a device on another gets that
    one's). Likewise where several interfaces are named and no address or public URL given
    (service.url_stand_in): each device gets its interface's. None where an address is
    advertised."""
    import ipaddress

    from netboot.servers.interfaces import network, snapshot_by_ioctl
    from netboot.service import by_reach, named_at, reached_at, url_stand_in

    found = named_at(cfg) if url_stand_in(cfg, advertise) else reached_at(cfg, advertise)
    if not found:
        if by_reach(cfg, advertise):
            print("netboot: no address advertised, no default route and no interface with "
                  "an IPv4 address: rendered with 127.0.0.1, which no device reaches "
                  "(--advertise ADDRESS to choose)", file=sys.stderr)
        return None
    if device_at is not None:
        try:
            known = ipaddress.IPv4Address(device_at)
        except ValueError:
            known = None
        names = dict(found)
        for entry in snapshot_by_ioctl():
            if known is not None and entry.name in names and known in network(entry):
                print(f"netboot: no address advertised: rendered as the device at "
                      f"{device_at} gets it, over {entry.name} ({names[entry.name]}) "
                      f"(--advertise ADDRESS to choose)", file=sys.stderr)
                return names[entry.name]
    (name, address), others = found[0], found[1:]
    also = "; on " + ", ".join(f"{n} {a}" for n, a in others) if others else ""
    print(f"netboot: no address advertised: rendered as a device on {name} gets it "
          f"({address}){also} (--advertise ADDRESS to choose)", file=sys.stderr)
    return address


def _exported_ca(cfg: Config) -> tuple[str, str] | None:
    from netboot.pki import exported_ca

    return exported_ca(cfg.https.ca_file if cfg.https.cert_file else None,
                       cfg.data_dir / "tls")


def _ca(args: argparse.Namespace) -> int:
    """``netboot ca export``: the CA certificate installers and iPXE builds should trust."""
    cfg = _config(args)
    if not cfg.https.cert_file:
        try:
            _readable_data_dir(cfg)
        except ConfigError as exc:
            raise located(cfg, exc) from exc
    found = _exported_ca(cfg)
    if found is None:
        where = ("https.cert_file is set without https.ca_file" if cfg.https.cert_file
                 else f"no CA in {cfg.data_dir / 'tls'} yet")
        raise ConfigError(where, key="https.ca_file" if cfg.https.cert_file
                          else "server.data_dir",
                          fix="set https.ca_file to the CA that issued your certificate"
                          if cfg.https.cert_file else
                          "start netboot once (netboot serve makes its CA on first start)")
    pem, fp = found
    if args.json:
        _print_json({"pem": pem, "sha256": fp})
    else:
        # The fingerprint as a PEM-compatible comment: the output stays a valid PEM file.
        print(f"# SHA256 Fingerprint={fp}")
        print(pem, end="")
    return 0


def _given(args: argparse.Namespace, *keys: str) -> dict[str, Any]:
    """The flags the user gave, under their API field names (argparse: --fixed-ipv4 →
    fixed_ipv4), so that the core sees the same data as from a request body."""
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


# -- machines ----------------------------------------------------------------------------
# What `machines set` changes, in its report's order; "" clears the ones a machine may lack.
_SETTABLE = ("hostname", "cluster", "role", "profile", "fixed_ipv4", "loader")
_CLEARABLE = frozenset({"hostname", "cluster", "profile", "fixed_ipv4", "loader"})


def _has_nic(machine: Machine, text: str) -> bool:
    """Whether ``text`` spells one of ``machine``'s MACs (a bad one is not: the edit's check
    names it)."""
    try:
        return MacAddress.parse(text) in machine.macs
    except ValidationError:
        return False


async def _set_machine(args: argparse.Namespace, core: Core) -> int:
    """``netboot machines set REF --cluster ...``: the API's ``PATCH /machines/{ref}``, the
    fields given and no others (``machines add`` of an enrolled MAC is a 409: there was no
    way to move a machine to another cluster but a file import)."""
    changes: dict[str, Any] = {}
    for key in _SETTABLE:
        value = getattr(args, key, None)
        if value is not None:
            changes[key] = (value or None) if key in _CLEARABLE else value
    added = _labels(args.label) if args.label else {}
    read: list[Machine] = []

    def made(machine: Machine) -> dict[str, Any]:
        # From the machine as update_machine reads it, at each of its reads: made from a
        # read of our own before, the labels and NICs another writer added meanwhile (an
        # operator's label through the API, a NIC attached) were written away (s40-attack).
        read[:] = [machine]
        out = dict(changes)
        if args.label or args.remove_label:
            labels = dict(machine.labels)
            labels.update(added)
            for key in args.remove_label or ():
                labels.pop(key, None)
            out["labels"] = labels
        if args.add_mac:
            # A NIC more (one enrolled by serial alone, a Raspberry Pi's); the API's PATCH
            # takes the whole list.
            # One it has already (attached at a boot by its UUID or serial) is listed: given
            # the machine's install and fixed address from now on (identity.UNLISTED); only
            # those the command names (update_machine's lists), not its other NICs sent back.
            out["macs"] = [*map(str, machine.macs), *(
                m for m in args.add_mac if not _has_nic(machine, m))]
        return out

    if not (changes or args.label or args.remove_label or args.add_mac):
        raise ValidationError("machines set", "nothing to change: give --cluster, --role, "
                                              "--profile, --hostname, --label, --remove-label, "
                                              "--add-mac, --fixed-ipv4 or --loader")
    m = await core.update_machine(args.mac, made, lists=args.add_mac or None)
    shown = [f"{key} {getattr(m, key) or '-'}" for key in _SETTABLE if key in changes]
    if args.add_mac:
        shown.append("macs " + ",".join(map(str, m.macs)))
    if args.label or args.remove_label:
        # Every label the machine keeps, a scanner's too (an enroll token writes any text):
        # escaped as every table is (s38-attack).
        shown.append("labels " + (",".join(f"{printable(k)}={printable(v)}"
                                           for k, v in m.labels.items()) or "-"))
    _report(args, f"{m.ref}: {', '.join(shown)}", machine_dict(m))
    note = renamed_installed(read[0], m) if "hostname" in changes and read else None
    if note:
        print(f"netboot: {note}", file=sys.stderr)
    return 0


def _plan_line(plan: dict[str, Any]) -> str:
    """What an approved machine boots next, as ``netboot explain`` has it. The line said
    ``(no cluster)`` of a machine that its group gives a cluster, role and profile, whose next
    boot installs it into that cluster (s47-review); and nothing of one held after all
    (no profile, or its cluster's first server not registered yet)."""
    joins = (f"cluster {plan['cluster']} as {plan.get('role') or 'agent'}"
             if plan.get("cluster") else "no cluster")
    if plan.get("group"):
        joins += f", group {plan['group']}"
    return f"{joins}; its next network boot: {plan['decision']} ({plan['reason']})"


def _named_by(machine: Machine) -> str:
    """What a new machine was enrolled by: its MAC, else the identifier given (a machine
    enrolled by serial alone was "enrolled m-3f2a... as node-3f2a... (id m-3f2a...)")."""
    if machine.macs:
        return machine.ref
    for key in ("serial", "uuid", "asset"):
        if getattr(machine, key):
            return f"{key} {printable(str(getattr(machine, key)))}"
    return machine.id


async def _machines(args: argparse.Namespace, store: Store, cfg: Config) -> int:
    core = _core(store, cfg)
    if args.action == "add":
        data = {"macs": args.more_macs or [], "labels": _labels(args.label),
                **_given(args, "mac", "hostname", "cluster", "role", "profile", "serial",
                         "uuid", "asset", "fixed_ipv4", "loader")}
        machine = await core.create_machine(data, note="added with the CLI")
        _report(args, f"enrolled {_named_by(machine)} as {machine.hostname} "
                      f"(id {machine.id})", machine_dict(machine))
        return 0
    if args.action == "set":
        return await _set_machine(args, core)
    if args.action == "ls":
        st = MachineState(args.state) if args.state else None
        flt = MachineFilter(state=st, cluster=args.cluster,
                            labels=tuple(_labels(args.label).items()), limit=args.limit)
        machines = await store.list_machines(flt)
        if args.json:
            _print_json([machine_dict(m) for m in machines])
        else:
            now = time.time()
            print(_table([(m.id, " ".join(map(str, m.macs)) or "-", m.hostname, m.state,
                           m.cluster, m.role, m.profile, m.arch, m.firmware, m.ipv4,
                           _ago(m.updated, now) if m.updated else "")
                          for m in machines],
                         ["id", "macs", "hostname", "state", "cluster", "role", "profile", "arch",
                          "firmware", "ipv4", "updated"]))
        return 0
    if args.action == "show":
        machine = await core.machine(args.mac)
        events = await store.list_events(machine.id)
        if args.json:
            _print_json({**machine_dict(machine),
                         "events": [codec.event_to_dict(e) for e in events]})
            return 0
        now = time.time()
        _print_fields(machine_dict(machine), 14, now)
        print("\nevents:")
        print(_table([(_when(e.time, now), e.kind, e.message) for e in events],
                     ["time", "kind", "message"]))
        return 0
    if args.action == "rm":
        removed = []
        for text in args.macs:
            gone = await core.delete_machine(text)
            removed.append(gone.ref)
            if not args.json:
                print(f"removed {gone.ref} (id {gone.id})")
        if args.json:
            _print_json({"removed": removed})
        return 0
    if args.action in ("approve", "reinstall"):
        if args.action == "approve" and args.hostname and len(args.macs) > 1:
            raise ValidationError("--hostname", "names one machine: approve one MAC with it")
        changed = []
        for text in args.macs:
            if args.action == "approve":
                m = await core.approve(text, _given(args, "cluster", "role", "profile",
                                                    "hostname"))
                line = f"approved {m.ref} as {m.hostname}: " + _plan_line(
                    await core.explain(m.id))
            else:
                m = await core.reinstall(text)
                line = f"{m.ref} will install again on its next network boot"
            changed.append(machine_dict(m))
            if not args.json:
                print(line)
        if args.json:
            _print_json(changed)
        return 0
    if args.action == "claim":
        # On the database, as every other command: the refused claims any server kept are
        # there (KeptClaims, s42-ops), beside the events. --server goes through a running
        # server's API instead (_claim).
        if args.claim:
            _claim_given(args, await core.give_to_claim(args.mac, {"claim": args.claim}))
            return 0
        machine = await core.machine(args.mac)
        _claims_listed(args, claims_out(await core.enroller.kept.held(machine)),
                       "the servers of this inventory")
        return 0
    if args.action == "mark-installed":
        # The installer's own report, made by the operator (lifecycle: enrolled, booting,
        # installing or reinstall → installed): a machine that installed after a restored
        # backup, whose next network boot would install it again, boots its disk instead.
        marked = []
        for text in args.macs:
            m = await core.machine(text)
            await core.enroller.report(m, {"kind": "installed", "message": (
                f"marked installed by the operator (was {m.state})")})
            marked.append(await core.machine(m.id))
            if not args.json:
                print(f"{m.ref} is installed: its next network boot goes to its disk "
                      f"(was {m.state})")
        if args.json:
            _print_json([machine_dict(m) for m in marked])
        return 0
    raise ValidationError("action", f"unknown action {args.action!r}")


async def _named(kind: str, args: argparse.Namespace, store: Store, cfg: Config) -> int:
    single = kind[:-1]
    core = _core(store, cfg)
    if args.action == "ls":
        items = await core.list_items(kind)
        if args.json:
            _print_json([public_dict(kind, i) for i in items])
        elif kind == "profiles":
            print(_table([(p.name, p.kernel, ",".join(p.initrds), p.config_template)
                          for p in items], ["name", "kernel", "initrds", "config"]))
        elif kind == "clusters":
            print(_table([(c.name, c.server_url, ",".join(f"{k}={v}" for k, v in c.labels.items()))
                          for c in items], ["name", "server_url", "labels"]))
            # Under the table, where an operator listing clusters reads (cluster_problems).
            for c in items:
                for problem in cluster_problems(c):
                    print(f"\ncluster {c.name}: {problem['error']}")
        else:
            print(_table([(g.name, " ".join(f"{k}={','.join(v)}" for k, v in g.selector.items()),
                           g.profile, g.cluster, g.role) for g in items],
                         ["name", "selector", "profile", "cluster", "role"]))
        return 0
    if args.action == "rm":
        await core.delete(kind, args.name)
        _report(args, f"removed {single} {args.name}", {"removed": args.name})
        return 0
    if args.action == "show":
        item = await core.get(kind, args.name)
        nodes = []
        if kind == "clusters":
            nodes = await store.list_machines(MachineFilter(cluster=args.name, limit=100_000))
        if args.json:
            out = public_dict(kind, item)
            if kind == "clusters":
                out["nodes"] = [machine_dict(m) for m in nodes]
            _print_json(out)
            return 0
        _print_fields(public_dict(kind, item), 18, time.time())
        if kind == "clusters":
            print(f"\nnodes ({len(nodes)}):")
            print(_table([(m.hostname, m.mac, m.role, m.state, m.ipv4) for m in nodes],
                         ["hostname", "mac", "role", "state", "ipv4"]))
        return 0
    if args.action == "set" and kind == "clusters":
        # Changes only what is named; the join token (absent from the public form, so the
        # core keeps it) and everything else stay as they are.
        changed = public_dict(kind, await core.get(kind, args.name))
        if args.endpoint is not None:
            changed["endpoint"] = args.endpoint or None  # "" clears it
        changed |= _given(args, "token", "agent_token")
        cluster = await core.put(kind, changed, create=False, force=args.force)
        if args.secure_token:
            cluster = await core.secure_token(args.name)
        print(f"cluster {cluster.name}: endpoint {cluster.endpoint or 'unset (first server)'}"
              + (f", k3s CA {public_dict(kind, cluster)['ca_hash']} (secure token)"
                 if cluster.ca_cert else ", short token"))
        if args.token is not None or args.agent_token is not None:
            # What the API's response says of them (cluster_problems: weak, short); a forced
            # change is in each configured node's history (Core._token_change).
            for problem in cluster_problems(cluster):
                print(f"netboot: warning: cluster {cluster.name}: {problem['error']}",
                      file=sys.stderr)
        return 0
    if args.action == "add":
        data: dict[str, Any] = {"name": args.name}
        if kind == "profiles":
            data |= {"initrds": args.initrd or [],
                     "ssh_authorized_keys": args.ssh_authorized_key or [],
                     **_given(args, "kernel", "cmdline", "config_template", "loader",
                              "iso_url", "fdtdir", "install_device", "install_timeout",
                              "description")}
        elif kind == "clusters":
            data |= {"labels": _labels(args.label),
                     **_given(args, "server_url", "token", "agent_token", "endpoint")}
        else:
            selector = {}
            for item in args.selector or ():
                k, sep, v = item.partition("=")
                if not sep:
                    raise ValidationError("--selector", f"{item!r} is not key=value[,value]")
                selector[k] = v.split(",")
            data |= {"selector": selector, "labels": _labels(args.label),
                     **_given(args, "profile", "cluster", "role", "loader")}
        item = await core.put(kind, data, create=True)
        _report(args, f"created {single} {args.name}", public_dict(kind, item))
        if kind == "clusters":
            # Its token's problems (short, weak) where the operator gave it, as ls says them.
            for problem in cluster_problems(item):
                print(f"netboot: warning: cluster {item.name}: {problem['error']}",
                      file=sys.stderr)
        return 0
    raise ValidationError("action", f"unknown action {args.action!r}")


async def _import(args: argparse.Namespace, store: Store, cfg: Config) -> int:
    from netboot.enroll import iter_import, parse_import

    # "-": standard input, as Unix tools read it (a file outside a container, piped into
    # `podman exec -i NAME netboot import -`); its errors are named "<stdin>:LINE:".
    path = Path("<stdin>" if args.file == "-" else args.file)
    fmt = args.format or ("" if args.file == "-" else path.suffix.lstrip(".").lower()) or "csv"
    try:
        text = _import_text(None if args.file == "-" else path)
    except ValidationError as exc:
        return _file_error(path, exc)
    # A CSV file is read as the import goes (its lines count its rows, near enough for a
    # progress bar); YAML and JSON are parsed whole anyway.
    rows: Iterable[tuple[int, dict[str, Any]]]
    if fmt == "csv":
        rows, total = iter_import(text, fmt), max(text.count("\n") - 1, 0)
    else:
        try:
            rows = parse_import(text, fmt)
        except ValidationError as exc:
            return _file_error(path, exc)
        total = len(rows)
    show = sys.stderr.isatty() and total >= 1000

    def progress(n: int) -> None:
        if show:
            width = 40
            done = int(width * n / max(total, 1))
            print(f"\r[{'#' * done}{'.' * (width - done)}] {n}/{total}", end="", file=sys.stderr)

    # The server's wiring, its settings (hostname template, report rates): an enroller's
    # fixed_lock is the inventory's too (FixedLock), so a server's PATCH of an address
    # cannot store it beside this import's (s41-review).
    enroller = _core(store, cfg).enroller
    try:
        report = await enroller.import_rows(rows, dry_run=args.dry_run, progress=progress)
    except ValidationError as exc:  # a CSV file is read as the import goes
        return _file_error(path, exc)
    if show:
        print(f"\r[{'#' * 40}] {total}/{total}", file=sys.stderr)
    if args.json:
        _print_json(report.as_dict())
    else:
        for err in report.errors:
            # FILE:LINE: as compilers, config errors (config.located) and editors' jump lists
            # read it.
            print(f"{path}:{err.line}: {err.field}: {err.message}", file=sys.stderr)
        if not report.errors:  # (a rename's note is moot while nothing is imported)
            for note in report.warnings:
                print(f"{path}:{note.line}: warning: {note.field}: {note.message}",
                      file=sys.stderr)
        verb = "would be" if args.dry_run else ("were" if report.applied else "would have been")
        print(f"{len(report.created)} {verb} created, {len(report.changed)} changed, "
              f"{len(report.unchanged)} left as they are")
        if report.errors:
            n = len(report.errors)
            print(f"{n} bad row{'' if n == 1 else 's'}: nothing was imported", file=sys.stderr)
    return 1 if report.errors else 0


def _import_text(path: Path | None) -> str:
    """An import file's text. A spreadsheet's "CSV UTF-8" export starts with a byte-order
    mark, which would otherwise be part of the first column's name (every row then "unknown
    column '\ufeffmac'"); ``POST /api/v1/machines:import`` reads its body the same way. A file
    that cannot be read, or is not UTF-8 (a spreadsheet's plain "CSV" on Windows is
    cp1252), is told as the file's error, not a traceback. ``None``: standard input."""
    try:
        raw = sys.stdin.buffer.read() if path is None else path.read_bytes()
    except OSError as exc:
        raise ValidationError("file", f"cannot read it: {exc.strerror}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ValidationError(
            "file", f"not UTF-8 text (byte 0x{raw[exc.start]:02x}); save it as UTF-8 (a "
            "spreadsheet's \"CSV UTF-8\")", line=line) from None


def _file_error(path: Path, exc: ValidationError) -> int:
    """An import file's whole-file error (not a row's), FILE:LINE: as its rows' errors."""
    if exc.field != "file":
        raise exc
    where = f"{path}:{exc.line}" if exc.line is not None else str(path)
    print(f"{where}: {exc.reason}", file=sys.stderr)
    return 2


async def _render_or_explain(args: argparse.Namespace, store: Store, cfg: Config) -> int:
    device_at = None
    if args.cmd == "render":
        from netboot.identity import by_ref
        from netboot.names import address_of

        # Where the machine is known to be (registered from, or its fixed address) tells
        # which interface it reaches this host over (_device_address).
        machine = await by_ref(store, args.mac)
        if machine is not None:
            device_at = address_of(machine, fixed_first=cfg.dhcp.mode == "authoritative")
    # The servers a config's register command names after this one, as a server names them
    # (server.peers, else the inventory's record: netboot.inventory.peers), read, not written.
    from netboot.inventory.peers import recorded_servers

    core = _core(store, cfg, check_templates=True, as_device=args.cmd == "render",
                 device_at=device_at, peers=tuple(url.rstrip("/") for url in cfg.server.peers)
                 or await recorded_servers(store))
    if args.cmd == "explain":
        result = await core.explain(args.mac, arch=args.arch)
        if args.json:
            _print_json(result)
        else:
            # Every line, empty ones too: "group -" is the answer to "which group matched?".
            _print_fields(result, 16, time.time(), skip_empty=False)
        return 0
    print(await core.render(args.mac, args.kind, arch=args.arch), end="")
    return 0


# -- tokens and the audit log -------------------------------------------------------------
async def _tokens(args: argparse.Namespace, store: Store, cfg: Config) -> int:
    from netboot.access import parse_duration, public_token

    access = _core(store, cfg).access
    now = time.time()
    if args.action == "create":
        expires = None if args.expires is None else parse_duration(args.expires, "--expires")
        token, value = await access.create_token(args.name, args.scope, expires_in=expires)
        if args.json:
            _print_json({**public_token(token), "token": value})
            return 0
        # The value alone on stdout, so that TOKEN=$(netboot tokens create ...) works; the
        # words on stderr. It is shown this once: only its hash is stored.
        until = f", expires {_when(token.expires, now)}" if token.expires else ""
        print(f"token {token.name} (scope {token.scope}{until}); shown once, store it now:",
              file=sys.stderr)
        print(value)
        return 0
    if args.action == "revoke":
        token = await access.revoke(args.name)
        _report(args, f"revoked token {token.name} (scope {token.scope})",
                {"revoked": token.name})
        return 0
    tokens = await access.list_tokens()
    if args.json:
        _print_json([public_token(t) for t in tokens])
        return 0
    print(_table([(t.name, t.scope, _when(t.created, now),
                   "never" if t.expires is None else _when(t.expires, now),
                   "never" if t.last_used is None else _when(t.last_used, now))
                  for t in tokens], ["name", "scope", "created", "expires", "last used"]))
    return 0


def _since(text: str | None, now: float) -> float | None:
    """``--since``: a duration back from now (``2h``, ``7d``), an ISO 8601 time, or Unix
    seconds."""
    from netboot.access import parse_duration

    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return now - parse_duration(text, "--since")
    except ValidationError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValidationError("--since", f"{text!r}: a duration (2h, 7d), an ISO 8601 time "
                              "or Unix seconds") from None


MACHINE_ACTOR = "machine:"  # a device's own report or registration (api.Api.front_post)


async def _audit_machines(store: Store, entries: Sequence[Any]) -> dict[str, Machine]:
    """The machines the entries name, by the text each names them by. An entry keeps what
    the request named: an installer's report ``02-00-00-00-00-00`` (the MAC as its URL had
    it), its registration the id, a CLI change the MAC as typed; the machine's own actor
    ``machine:m-…``. Read as written, one machine was two names a few rows apart
    (s45-review). A text that names no machine now (removed, or a stranger's) is kept."""
    from netboot import identity

    texts = {e.target for e in entries if "machines" in e.action or "register" in e.action}
    texts |= {e.actor[len(MACHINE_ACTOR):] for e in entries
              if e.actor.startswith(MACHINE_ACTOR)}
    found: dict[str, Machine] = {}
    for text in texts:
        try:
            machine = await identity.by_ref(store, text) if text else None
        except ValidationError:  # a file, a hostname that was refused, a stranger's text
            continue
        if machine is not None:
            found[text] = machine
    return found


async def _audit(args: argparse.Namespace, store: Store, cfg: Config) -> int:
    from netboot.follow import machine_name

    now = time.time()
    entries = await _core(store, cfg).access.audit_log(since=_since(args.since, now),
                                                       limit=args.limit)
    machines = await _audit_machines(store, entries)
    if args.json:
        # As recorded, and the id of the machine it names (one key to join rows on).
        rows = []
        for e in entries:
            named = machines.get(e.target) or (machines.get(e.actor[len(MACHINE_ACTOR):])
                                               if e.actor.startswith(MACHINE_ACTOR) else None)
            rows.append({**codec.audit_to_dict(e), "machine": named.id if named else None})
        _print_json(rows)
        return 0

    def name(text: str) -> str:
        # One name a machine, as `netboot events` and the dashboard show it.
        m = machines.get(text)
        return text if m is None else machine_name(
            {"hostname": m.hostname, "macs": [str(x) for x in m.macs], "id": m.id})

    def actor(text: str) -> str:
        if text.startswith(MACHINE_ACTOR):
            return MACHINE_ACTOR + name(text[len(MACHINE_ACTOR):])
        return text

    print(_table([(datetime.fromtimestamp(e.time).astimezone().isoformat(timespec="seconds"),
                   actor(e.actor), e.action, name(e.target), e.peer, e.outcome)
                  for e in entries],
                 ["time", "who", "what", "target", "from", "outcome"]))
    return 0


async def _status(args: argparse.Namespace, store: Store, cfg: Config) -> int:
    from netboot.enroll import fleet_status
    from netboot.service import (
        warn_of_missing_rule_refs,
        warn_of_shared_fixed_addresses,
        warn_of_unservable_profiles,
    )
    from netboot.standing import Standing, from_store

    status = await fleet_status(store)
    # What stands that the operator must fix, read from the inventory (and this config's
    # rules) as GET /status's "warnings": a server's start logged them only (s42-ops).
    standing = Standing(told=False)
    await warn_of_missing_rule_refs(cfg, store, standing)
    await warn_of_unservable_profiles(store, standing)
    await warn_of_shared_fixed_addresses(store, standing)
    await from_store(store, time.time(), standing)
    status["warnings"] = standing.as_list()
    if args.json:
        _print_json(status)
        return 0
    states = [s.value for s in MachineState]
    print(_table([["all", status["total"], *(status["by_state"][s] for s in states)]]
                 + [[name, sum(c.values()), *(c.get(s, 0) for s in states)]
                    for name, c in sorted(status["clusters"].items())],
                 ["cluster", "machines", *states]))
    if status["failed"]:
        print("\nfailed (see 'netboot machines show MAC|ID'):")
        print(_table([(f["mac"] or f["id"], f["hostname"], f["cluster"])
                      for f in status["failed"]], ["machine", "hostname", "cluster"]))
    for notice in status["warnings"]:
        print(f"\nwarning ({notice['kind']}): {notice['message']}")
    return 0


def _own_asset(cfg: Config, ref: str) -> str | None:
    """The asset path a profile's file names where netboot serves it: a path, or a URL of
    this server's ``/assets/`` (its HTTP or HTTPS port; the README's ``iso_url``
    ``http://192.0.2.10:8080/assets/k3os/k3os.iso``, which k3OS's installer fetches only
    once the kernel runs: missing, every install failed there while ``netboot assets`` said
    ok). None for a URL of another server, which netboot cannot check."""
    import urllib.parse

    if not ref.startswith(("http://", "https://")):
        return ref
    try:
        url = urllib.parse.urlsplit(ref)
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        return None
    if url.path.startswith("/assets/") and port in (cfg.http.port, cfg.https.port):
        return urllib.parse.unquote(url.path[len("/assets/"):]) or None
    return None


async def _assets(args: argparse.Namespace, store: Store, cfg: Config) -> int:
    """Which first-stage loaders and profile assets are found, and do their checksums match."""
    from netboot.boot import loader_aliases, loader_names
    from netboot.errors import Forbidden
    from netboot.files import FileTree, sha256_file
    from netboot.service import asset_roots
    from netboot.shipped import boot_assets_dir

    tree = FileTree(asset_roots(cfg), pinned=loader_aliases())
    known: dict[str, str] = {}
    sums = boot_assets_dir() / "checksums.sha256"
    if sums.is_file():
        for line in sums.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                digest, name = line.split(None, 1)
                known[digest] = name.strip()

    rows: list[dict[str, Any]] = []
    bad = 0
    for name in loader_names():
        path = tree.pinned.get(name)
        if path is None:
            rows.append({"kind": "loader", "name": name, "status": "missing", "path": None})
            continue
        d = sha256_file(path)
        status = "ok (known build)" if known.get(d) == Path(name).name else "unknown build"
        signed = _signed(path)
        rows.append({"kind": "loader", "name": name, "status": status, "path": str(path),
                     "sha256": d, "signed": signed})
    for profile in await store.list_profiles():
        wanted = {a.path: a.sha256 for a in profile.assets}
        for ref in (profile.kernel, *profile.initrds, profile.iso_url):
            own = _own_asset(cfg, ref) if ref is not None else None
            if own is not None:
                wanted.setdefault(own, None)
        # A file named as netboot never serves it (stored before the check, session 35):
        # why, not "missing".
        refused = dict(profile_file_errors(profile))
        for ref, expected in wanted.items():
            if ref in refused:
                bad += 1
                rows.append({"kind": f"profile {profile.name}", "name": ref,
                             "status": f"refused ({refused[ref].message})", "path": None})
                continue
            try:
                path = tree.resolve(ref)
            except (NotFound, Forbidden) as exc:
                bad += 1
                rows.append({"kind": f"profile {profile.name}", "name": ref,
                             "status": f"missing ({exc})", "path": None})
                continue
            d = sha256_file(path)
            status = "ok" if expected in (None, d) else "CHECKSUM MISMATCH"
            bad += status != "ok"
            rows.append({"kind": f"profile {profile.name}", "name": ref, "status": status,
                         "path": str(path), "sha256": d})
    if args.json:
        _print_json(rows)
    else:
        print(_table([(r["kind"], r["name"], r["status"], _signature(r.get("signed")),
                       r["path"]) for r in rows],
                     ["for", "file", "status", "signature", "path"]))
    missing = [r["name"] for r in rows
               if r["kind"] != "loader" and r["status"].startswith("missing")]
    if missing:
        # "'k3os/vmlinuz' not found" told a new user neither where it was looked for nor
        # where to put it: the data directory's assets/ is the first of assets.dirs.
        roots = asset_roots(cfg)
        print(f"netboot: {len(missing)} profile file{'s' if len(missing) > 1 else ''} "
              f"missing, looked for under {', '.join(map(str, roots))} (assets.dirs): put "
              f"them under {roots[0]}, e.g. {roots[0] / missing[0]}", file=sys.stderr)
    return 1 if bad else 0


def _signature(signed: object) -> str:
    # Secure Boot firmware refuses an unsigned EFI loader; "-" for a BIOS one (not PE/COFF).
    return "-" if signed is None else "signed" if signed else "UNSIGNED"


def _signed(path: Path) -> bool | None:
    """Whether an EFI loader carries an Authenticode signature (Secure Boot firmware refuses
    one without); None for a file that is not PE/COFF (a BIOS .kpxe)."""
    from netboot.wire.pe import signature

    try:
        return signature(path.read_bytes()).signed
    except ValidationError:
        return None


def _events(args: argparse.Namespace) -> int:
    if not args.follow:
        if not args.ref:
            raise ValidationError("ref", "name a machine (MAC or id), or --follow for all")
        return asyncio.run(_with_store(args, lambda s, c: _machine_events(args, s, c)))
    from netboot import follow

    cfg = _config(args)
    base, ca = _server(args, cfg)
    token = _api_token(args, cfg)

    async def run() -> None:
        machine = (await follow.machine_id(base, token, args.ref, ca_file=ca) if args.ref
                   else None)

        # Lines name machines by hostname or MAC, as the dashboard does; JSON keeps the id.
        names: dict[str, str] | None = None if args.json else {}

        def emit(event: dict[str, Any]) -> None:
            print(follow.event_line(event, as_json=args.json, names=names), flush=True)
        await follow.follow(base, token, machine=machine, emit=emit, ca_file=ca, names=names)

    asyncio.run(run())
    return 0


def _server(args: argparse.Namespace, cfg: Config) -> tuple[str, Path | None]:
    """The running server's base URL (``--server``, else this host's http.port) and the CA
    to trust for it: netboot's own, for an https:// one (readable by whoever may read the
    token)."""
    host = cfg.http.listen if cfg.http.listen not in ("0.0.0.0", "::", "") else "127.0.0.1"
    base = args.server or f"http://{host}:{cfg.http.port}"
    ca_pem = cfg.data_dir / "tls" / "ca.pem"
    return base, ca_pem if base.startswith("https://") and os.access(ca_pem, os.R_OK) else None


def _claim_given(args: argparse.Namespace, m: Any) -> None:
    """What ``netboot machines claim REF CLAIM`` says once given (``m``: the machine)."""
    ref, ipv4 = (m.ref, m.ipv4) if not isinstance(m, dict) else (
        (m.get("macs") or [m["id"]])[0], m.get("ipv4"))
    _report(args, f"{ref} is given to the install whose registration was refused with "
                  f"claim {args.claim}: its next try is answered; the machine token of "
                  f"the registration at {ipv4 or 'no address'} is void",
            m if isinstance(m, dict) else machine_dict(m))


def _claims_listed(args: argparse.Namespace, listed: list[dict[str, Any]], by: str) -> None:
    """What ``netboot machines claim REF`` says: the kept claims ``listed`` (claims_out)."""
    if args.json:
        _print_json(listed)
    elif not listed:
        print(f"no refused claim kept of {args.mac} (by {by})")
    else:
        now = time.time()
        print(_table([(k["peer"] or "-", k["claim"], str(k["tries"]),
                       _when(k["first"], now), _when(k["last"], now)) for k in listed],
                     ["from", "claim", "tries", "first", "last"]))
        print(f"kept by {by}: give one with 'netboot machines claim {args.mac} CLAIM'",
              file=sys.stderr)


def _claim(args: argparse.Namespace) -> int:
    """``netboot machines claim REF [CLAIM] --server URL`` through that running server's
    API (GET .../claims, POST .../claim): also the claims it refused in the last few
    seconds, not yet in the inventory (KeptClaims.every). Without --server the CLI works
    on the database, as every other command (_machines): session 41's went to this host's
    server only, whose memory alone held the claims (s41-ops, s42-ops)."""
    from urllib.parse import quote

    import aiohttp

    from netboot import follow

    cfg = _config(args)
    base, ca = _server(args, cfg)
    base = base.rstrip("/")
    url = f"{base}/api/v1/machines/{quote(args.mac.strip(), safe='')}/claim"

    async def ask(token: str) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"}
        timeout = aiohttp.ClientTimeout(total=30, sock_connect=5)
        async with follow._session(ca, timeout=timeout) as http:
            request = (http.post(url, json={"claim": args.claim}, headers=headers)
                       if args.claim else http.get(url + "s", headers=headers))
            async with request as resp:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = None
                return resp.status, body

    try:
        status, body = asyncio.run(ask(_api_token(args, cfg)))
    except aiohttp.ClientError as exc:  # refused, or its certificate is
        raise NetbootError(f"no server answers at {base} ({exc}): without --server the "
                           "command works on the database") from exc
    if status >= 400:
        reason = body.get("error") if isinstance(body, dict) else None
        text = f"{url}: HTTP {status}" + (f": {reason}" if reason else "")
        if status == 404:
            raise NotFound(text)
        if status == 400:  # as the database's ValidationError: exit status 2
            raise ValidationError(str(body.get("field") or "claim")
                                  if isinstance(body, dict) else "claim", text)
        raise NetbootError(text)  # a 409 (not registered) as its Conflict: 1
    if args.claim:
        _claim_given(args, body)
    else:
        _claims_listed(args, body if isinstance(body, list) else [], base)
    return 0


def _api_token(args: argparse.Namespace, cfg: Config) -> str:
    path = Path(args.token_file) if args.token_file else None
    if path is None:
        env = os.environ.get("NETBOOT_TOKEN")
        if env:
            return env.strip()
        path = cfg.data_dir / "admin.token"
        try:
            _readable_data_dir(cfg)
        except ConfigError as exc:
            raise located(cfg, exc) from exc
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValidationError("token-file", f"cannot read {path}: {exc.strerror}") from exc


async def _machine_events(args: argparse.Namespace, store: Store, cfg: Config) -> int:
    from netboot import follow

    machine = await _core(store, cfg).machine(args.ref)
    names = {machine.id: follow.machine_name(codec.machine_to_dict(machine))}
    for event in await store.list_events(machine.id):
        print(follow.event_line(codec.event_to_dict(event), as_json=args.json, names=names))
    return 0


def _check_config(args: argparse.Namespace) -> int:
    cfg = load(args.file, env={})
    from netboot.service import check_hostname_templates, renderer_for

    try:
        renderer_for(cfg)
        from netboot import groups as grouping

        grouping.check_groups(cfg.discovery.rules)
        check_hostname_templates(cfg)  # serve stopped on a typo that this said OK to
        if cfg.https.enabled and cfg.https.cert_file:
            from netboot.pki import operator_files

            operator_files(cfg.https.cert_file, cfg.https.key_file, cfg.https.ca_file)
    except ConfigError as exc:
        raise located(cfg, exc) from exc  # as serve tells it: the file's line
    warnings = config_warnings(cfg)
    for warning in warnings:
        print(f"netboot: warning: {args.file}: {warning}", file=sys.stderr)
    # What start-up says of this host's interfaces, said here too (each names its line).
    located_warnings = [str(w) for w in _interface_warnings(cfg)]
    for text in located_warnings:
        print(f"netboot: warning: {text}", file=sys.stderr)
    warnings += located_warnings
    _report(args, f"{args.file}: OK", {"file": args.file, "ok": True,
                                       **({"warnings": warnings} if warnings else {})})
    return 0


def _interface_warnings(cfg: Config) -> list[ConfigError]:
    """The host's interfaces read as serve reads them (netlink), for what serve would warn
    of at start (service.interfaces_off_pool): only where authoritative DHCP names some."""
    if cfg.dhcp.mode != "authoritative" or not cfg.server.interfaces:
        return []
    from netboot.servers.interfaces import InterfaceWatcher
    from netboot.service import interfaces_off_pool

    async def addresses() -> tuple[Any, ...]:
        watcher = InterfaceWatcher()
        await watcher.start()
        try:
            return watcher.addresses()
        finally:
            watcher.close()

    return interfaces_off_pool(cfg, asyncio.run(addresses()))


def config_warnings(cfg: Config) -> list[str]:
    """What a valid config sets that an operator should know of before serving with it.
    The clusters' own tokens are in the inventory (sealed), not the file: their short or
    weak form is said by ``clusters ls``/``show``, GET /api/v1/clusters and the dashboard
    (core.cluster_problems)."""
    out = []
    if not cfg.enroll.k3s_secure_token:
        out.append("enroll.k3s_secure_token is false: every new managed cluster gets k3s's "
                   "short join token, with which an agent checks nothing of the server it "
                   "reaches at the cluster's endpoint and sends it the token (a host that "
                   "takes that address collects the nodes); remove the line for the secure "
                   "form (K10<CA hash>::…), unless the site's config templates cannot write "
                   "the cluster's k3s CA")
    if cfg.enroll.trust_first_nic:
        out.append("enroll.trust_first_nic is true: the first NIC that sends the UUID, serial "
                   "or asset tag of a machine enrolled without a MAC is given its install "
                   "(its config carries the cluster's join token) and fixed address, and any "
                   "host on the provisioning network can send those; only where that network "
                   "is closed (port security, 802.1X)")
    return out


def _db_spec(text: str) -> str:
    """A ``db copy`` operand: a path or a DSN, or ``@FILE`` holding either."""
    if not text.startswith("@"):
        return text
    try:
        return Path(text[1:]).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {text[1:]}: {exc.strerror}", source="--from/--to",
                          fix="give a readable file holding the DSN") from exc


def _is_own_inventory(cfg: Config, spec: str) -> bool:
    """Whether ``spec`` names the inventory the configuration serves: a copy of it (a
    backup, a move to PostgreSQL) is as current as it is, so its machines' next boots are
    the server's own, not a restore's: the warning of those was said on every nightly
    backup (a cron job's mail each night)."""
    from netboot.config import inventory_dsn
    from netboot.inventory import transfer

    if transfer.is_dsn(spec):
        try:
            return cfg.inventory.backend == "postgresql" and spec == inventory_dsn(cfg)
        except ConfigError:
            return False
    return cfg.inventory.backend == "sqlite" and Path(spec).resolve() == cfg.db_path.resolve()


async def _db(args: argparse.Namespace) -> int:
    from netboot.inventory import transfer

    if args.action == "migrate":
        from netboot.config import inventory_dsn
        from netboot.service import open_store

        cfg = _config(args)
        if cfg.inventory.backend == "memory":
            raise ConfigError("a memory inventory has no schema to migrate",
                              key="inventory.backend", fix="set backend: sqlite or postgresql")
        open_store(cfg)  # the data dir and a private (0600) SQLite file, as the server makes
        spec = inventory_dsn(cfg) if cfg.inventory.backend == "postgresql" else str(cfg.db_path)
        done = await transfer.migrate(spec, cfg.inventory.postgresql)
        steps = ", ".join(map(str, done.applied))
        _report(args, f"inventory {done.name}: " + (
            f"applied migration{'s' if len(done.applied) > 1 else ''} {steps}; schema version "
            f"{done.version}" if done.applied else f"schema version {done.version}, up to date"),
            {"inventory": done.name, "applied": list(done.applied), "version": done.version})
        return 0
    source, target = _db_spec(args.source), _db_spec(args.target)
    cfg = _config(args)
    # The configured inventory.postgresql (file, NETBOOT_INVENTORY_POSTGRESQL_*): how its
    # connections notice a server gone or silent, as the servers' do.
    copied = await transfer.copy(source, target, force=args.force,
                                 peer=cfg.inventory.postgresql)
    if args.json:
        _print_json({"from": transfer.describe(source), "to": transfer.describe(target),
                     "tables": [{"table": c.table, "rows": c.rows, "sha256": c.sha256}
                                for c in copied.checks],
                     "installs_on_boot": copied.installs_on_boot,
                     "hostnames_unset": copied.hostnames_unset})
    else:
        for c in copied.checks:
            print(f"{c.table:15} {c.rows:8} rows  sha256 {c.sha256}")
        print(f"copied {transfer.describe(source)} to {transfer.describe(target)}: "
              "counts and checksums equal")
    if copied.hostnames_unset:
        count = len(copied.hostnames_unset)
        print(f"netboot: note: {count} machine{'s' if count > 1 else ''} stored with the "
              f"hostname '' (which the API refuses: null is none) copied with none: "
              f"{', '.join(copied.hostnames_unset)}", file=sys.stderr)
    if copied.installs_on_boot and not _is_own_inventory(cfg, source):
        # A restored backup brings machines back as they were then: one that installed
        # since would install again, its disk wiped (s38-user). Said before the servers
        # start, with what avoids it (README's "Restoring a backup").
        count = sum(copied.installs_on_boot.values())
        states = ", ".join(f"{n} {state}" for state, n in copied.installs_on_boot.items())
        # Each state's list: the hint named only the enrolled ones, and a machine whose
        # install was under way at the backup (booting) is the likeliest to have installed
        # since; the operator who listed the enrolled ones missed it (s48-review).
        lists = ", ".join(f"`netboot machines ls --state {state}`"
                          for state in copied.installs_on_boot)
        print(f"netboot: warning: {count} machine{'s' if count > 1 else ''} in the copy "
              f"install{'' if count > 1 else 's'} at the next network boot ({states}): if "
              "this restores a backup, one that installed after the backup was taken "
              "installs again. Before starting the servers, mark those installed (netboot "
              f"machines mark-installed REF ...; {lists} list{'s' if ',' not in lists else ''} "
              "them) (README.md: \"Backup, restore and upgrades\")", file=sys.stderr)
    return 0


# Help of the options several sub-commands share (--help of every option says what it takes).
MACHINE_FLAGS = (("--hostname", "its name: a DNS label, and its k3s node name"),
                 ("--cluster", "the cluster it joins (default: its group's)"),
                 ("--profile", "the profile it installs (default: its group's)"),
                 ("--serial", "its serial number (the firmware's SMBIOS serial)"),
                 ("--uuid", "its SMBIOS system UUID"),
                 ("--asset", "its asset tag"),
                 ("--fixed-ipv4", "the IPv4 address it keeps (authoritative DHCP gives it "
                                  "this one)"))
REF_HELP = "one of its MACs, its id or its hostname"
ROLE_HELP = "k3s role: server (control plane) or agent (default: its group's)"
MACHINE_LABEL_HELP = "a label of the machine, which group selectors match (repeat)"
NODE_LABEL_HELP = "a k3s node label its nodes get (repeat)"

# The sub-commands build_parser adds besides ``lab`` (tests/test_cli.py keeps the two equal).
COMMANDS = frozenset({"serve", "ca", "check-config", "machines", "profiles", "clusters",
                      "groups", "tokens", "audit", "import", "render", "status", "assets",
                      "events", "explain", "db"})


def version_line() -> str:
    """``netboot --version``: the version, and which build. Every build is "0.1.0", so the
    version alone cannot tell an operator whether an upgrade took (pip keeps an installed
    version's files when given a wheel of the same version): a wheel names the digest of its
    files (setup.py), a source checkout its directory."""
    from netboot.shipped import build

    found = build()
    if found is not None:
        return f"netboot {__version__} (build {found})"
    return f"netboot {__version__} (source tree {Path(__file__).resolve().parent.parent})"


class _Version(argparse.Action):
    """``--version``, its line made only when asked (it reads a file)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(version_line())
        parser.exit()


def build_parser(*, lab: bool = True, serve_only: bool = False) -> argparse.ArgumentParser:
    """The whole command line; ``lab=False`` leaves out ``lab``, whose parser imports the
    QEMU lab (a twentieth of ``serve``'s start-up, for a command it never runs), and
    ``serve_only`` every command after ``serve`` (their ~60 parsers were ~0.02 s of CPU,
    a thirtieth of ``serve``'s start-up: issue 10)."""
    parser = argparse.ArgumentParser(prog="netboot", description="Network-boot provisioning "
                                     "server for edge Kubernetes fleets.")
    parser.add_argument("--version", action=_Version, nargs=0, default=argparse.SUPPRESS,
                        help="show the version and the build, and exit")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--config", "-c", help="YAML config file (or NETBOOT_CONFIG)")
    where.add_argument("--data-dir", help="where the inventory and admin token live")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true",
                        help="machine-readable output (times as Unix seconds)")
    common = argparse.ArgumentParser(add_help=False, parents=[where, output])
    # The address a device is told: serve puts it in answers, render in the scripts it prints.
    address = argparse.ArgumentParser(add_help=False)
    address.add_argument("--interface", "-i", action="append",
                         help="provisioning interface (repeat)")
    address.add_argument("--advertise", help="address put in DHCP answers and URLs")
    sub = parser.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", parents=[where, address],
                       help="run proxyDHCP, TFTP, HTTP (and DNS)")
    s.add_argument("--http-port", type=int, help="iPXE scripts, assets, configs (default 8080)")
    s.add_argument("--https-port", type=int, help="the API and the dashboard (default 8443)")
    s.add_argument("--dhcp-port", type=int, help="DHCP (default 67)")
    s.add_argument("--pxe-port", type=int, help="proxyDHCP's PXE port (default 4011)")
    s.add_argument("--dhcp-mode", choices=["proxy", "authoritative", "off"],
                   help="proxy: beside the site's DHCP server (default); authoritative: "
                        "netboot leases addresses (an isolated VLAN); off")
    s.add_argument("--tftp-port", type=int, help="TFTP (default 69)")
    s.add_argument("--dns-port", type=int, help="DNS, when dns is enabled (default 53)")
    s.add_argument("--discovery", choices=["ignore", "hold", "auto"],
                   help="unknown machines: ignore (recorded, boot their disk; default), hold "
                        "(wait for netboot machines approve), auto (discovery.rules enroll "
                        "them)")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="default info")
    s.add_argument("--log-format", choices=["text", "json"], default=None,
                   help="json: one object per line with time, level, logger, message, and "
                        "mac, peer, xid, path, request_id where known (or NETBOOT_LOG_FORMAT)")
    if serve_only:
        return parser

    ca = sub.add_parser("ca", help="netboot's certificate authority")
    casub = ca.add_subparsers(dest="action", required=True)
    casub.add_parser("export", parents=[common],
                     help="print the CA certificate (PEM) and its SHA-256 fingerprint")

    c = sub.add_parser("check-config", parents=[output], help="validate a config file")
    c.add_argument("file", help="the YAML config file, as serve --config reads it")

    m = sub.add_parser("machines", help="enrolled and discovered machines")
    msub = m.add_subparsers(dest="action", required=True)
    a = msub.add_parser("add", parents=[common],
                        help="enroll a machine by MAC(s), serial, asset tag or UUID")
    a.add_argument("mac", nargs="?", help="its (first) MAC")
    a.add_argument("--mac", dest="more_macs", action="append", metavar="MAC",
                   help="a MAC of the machine; repeat for each NIC")
    for flag, what in MACHINE_FLAGS:
        a.add_argument(flag, help=what)
    a.add_argument("--role", choices=["server", "agent"], help=ROLE_HELP)
    a.add_argument("--label", action="append", metavar="KEY=VALUE", help=MACHINE_LABEL_HELP)
    a.add_argument("--loader", choices=[c.value for c in LoaderChain], help=LOADER_HELP)
    ms = msub.add_parser("set", parents=[common],
                         help="change a machine: cluster, role, profile, hostname, labels")
    ms.add_argument("mac", metavar="REF", help=REF_HELP)
    for flag in ("--hostname", "--cluster", "--profile", "--fixed-ipv4"):
        ms.add_argument(flag, help=dict(MACHINE_FLAGS)[flag] + "; '' unsets it")
    ms.add_argument("--role", choices=["server", "agent"], help=ROLE_HELP)
    ms.add_argument("--label", action="append", metavar="KEY=VALUE",
                    help="set a label; the others are kept (repeat)")
    ms.add_argument("--remove-label", action="append", metavar="KEY",
                    help="remove a label (repeat)")
    ms.add_argument("--add-mac", action="append", metavar="MAC",
                    help="a NIC's MAC more (repeat); one enrolled by serial alone needs it")
    ms.add_argument("--loader", choices=["", *(c.value for c in LoaderChain)],
                    help=LOADER_HELP + "; '' unsets it")
    ls = msub.add_parser("ls", parents=[common], help="list machines (--state, --cluster, "
                                                       "--label narrow it)")
    ls.add_argument("--state", choices=[s.value for s in MachineState],
                    help="only machines in this state")
    ls.add_argument("--cluster", help="only machines of this cluster")
    ls.add_argument("--label", action="append", metavar="KEY=VALUE",
                    help="only machines with this label (repeat: all of them)")
    ls.add_argument("--limit", type=int, default=1000, help="at most N (default 1000)")
    sh = msub.add_parser("show", parents=[common], help="one machine whole, with its events")
    sh.add_argument("mac", metavar="REF", help=REF_HELP)
    for action, what in (("rm", "remove machines from the inventory"),
                         ("reinstall", "install again at the next network boot (a new "
                                       "install token)")):
        x = msub.add_parser(action, parents=[common], help=what)
        x.add_argument("macs", nargs="+", metavar="REF", help=REF_HELP)
    mi = msub.add_parser("mark-installed", parents=[common],
                         help="say machines run their installed OS (enrolled, booting, "
                              "installing, reinstall): the next network boot goes to the "
                              "disk, not an install (after restoring a backup)")
    mi.add_argument("macs", nargs="+", metavar="REF", help=REF_HELP)
    ap = msub.add_parser("approve", parents=[common],
                         help="let held (discovered) machines install: cluster, role, profile")
    ap.add_argument("macs", nargs="+", metavar="REF", help=REF_HELP)
    ap.add_argument("--cluster", help=dict(MACHINE_FLAGS)["--cluster"])
    ap.add_argument("--role", choices=["server", "agent"], help=ROLE_HELP)
    ap.add_argument("--profile", help=dict(MACHINE_FLAGS)["--profile"])
    ap.add_argument("--hostname", help="only with one MAC (default: the hostname template)")
    cl = msub.add_parser("claim", parents=[common],
                         help="give a registered machine (or one installed whose "
                              "registration a restored backup lost) to the install whose "
                              "registration was refused with CLAIM (its 'registration "
                              "contested' or 'registration refused' event, or the claims the "
                              "servers kept by address, name it): its next try is answered, "
                              "without a reinstall; without CLAIM, list the claims the "
                              "servers kept (in the database)")
    cl.add_argument("mac", metavar="REF", help=REF_HELP)
    cl.add_argument("claim", nargs="?",
                    help="the claim the event or the list names (64 hexadecimal digits)")
    cl.add_argument("--server", help="through this running server's API instead of the "
                                     "database (also its claims of the last few seconds)")
    cl.add_argument("--token-file", help="file with an API token (default: NETBOOT_TOKEN, "
                                         "else admin.token in the data directory)")

    for kind in ("profiles", "clusters", "groups"):
        k = sub.add_parser(kind, help=f"{kind} of the inventory")
        ksub = k.add_subparsers(dest="action", required=True)
        one = kind[:-1]
        ksub.add_parser("ls", parents=[common], help=f"list the {kind}")
        ksub.add_parser("show", parents=[common], help=f"one {one} whole").add_argument("name")
        ksub.add_parser("rm", parents=[common], help=f"remove a {one}" + (
            "" if kind == "groups" else " (refused while in use)")).add_argument("name")
        add = ksub.add_parser("add", parents=[common], help=f"create a {one}")
        add.add_argument("name")
        if kind == "profiles":
            add.add_argument("--kernel", required=True,
                             help="a path under the assets (k3os/vmlinuz) or an http(s):// URL")
            add.add_argument("--initrd", action="append",
                             help="as --kernel (repeat, in the order they load)")
            add.add_argument("--cmdline", help="the kernel command line, in place of its "
                                               "config template's (templates/README.md)")
            add.add_argument("--config-template", choices=["k3os", "cloud-init"],
                             default="k3os", help="the OS config its machines fetch: k3OS's "
                                                  "config.yaml (default) or cloud-init's")
            add.add_argument("--loader", choices=[c.value for c in LoaderChain],
                             help=LOADER_HELP)
            # The API's other fields of a profile: without --iso-url a k3OS install booted
            # over the network has no image to install (k3os.install.iso_url), and an Arm
            # board needs --fdtdir and its own --install-device (an SD card, eMMC).
            add.add_argument("--iso-url", help="k3OS: the ISO the installer fetches "
                                               "(http:// or https://)")
            add.add_argument("--fdtdir", help="U-Boot: the device trees' directory under "
                                              "the assets (pxelinux FDTDIR)")
            add.add_argument("--install-device", help="the disk to install to (default "
                                                      "/dev/sda; a Pi: /dev/mmcblk0)")
            add.add_argument("--install-timeout", type=int, metavar="SECONDS",
                             help="the install token's lifetime (default: "
                                  "enroll.token_ttl_seconds)")
            add.add_argument("--ssh-authorized-key", action="append", metavar="KEY",
                             help="a public key for the installed OS (repeat)")
            add.add_argument("--description", help="free text, shown in listings")
        elif kind == "clusters":
            add.add_argument("--server-url", default="managed",
                             help="managed (default): netboot forms the cluster, its first "
                                  "server inits it; or the https://HOST:6443 of an existing "
                                  "k3s server, which --token joins")
            add.add_argument("--token", help="an existing cluster's join token (with an "
                                             "https:// --server-url); a managed one's is made")
            add.add_argument("--agent-token", help="an existing cluster's agent token (its "
                                                   "servers' agent-token file), given to its "
                                                   "agents in place of --token")
            add.add_argument("--label", action="append", metavar="KEY=VALUE",
                             help=NODE_LABEL_HELP)
            endpoint_help = ("where nodes reach a managed cluster's servers (a VIP or DNS "
                             "name): host, host:port or https://host:port; default: the "
                             "first registered server")
            add.add_argument("--endpoint", help=endpoint_help)
            cset = ksub.add_parser("set", parents=[common], help="change a cluster")
            cset.add_argument("name")
            cset.add_argument("--endpoint", help=endpoint_help + " ('' unsets it)")
            cset.add_argument("--secure-token", action="store_true",
                              help="a managed cluster made with the short token (before "
                              "netboot made k3s CAs): make its CA and give its nodes the "
                              "secure token (refused once a node fetched its config)")
            cset.add_argument("--token", help="the cluster's join token: an external "
                              "cluster's servers' node-token, or a managed one's own (refused "
                              "while a node of it has its config, unless --force)")
            cset.add_argument("--agent-token", help="the agent token: an external cluster's "
                              "servers' agent-token, or a managed one's (refused while a node "
                              "of it has its config, unless --force)")
            cset.add_argument("--force", action="store_true",
                              help="take --token or --agent-token though nodes of the cluster "
                              "have their config (change it on them first: the refusal says "
                              "how); each such node's history says what it breaks")
        else:
            add.add_argument("--selector", action="append", help="key=value[,value...]")
            add.add_argument("--profile", help="the profile its machines install")
            add.add_argument("--cluster", help="the cluster its machines join")
            add.add_argument("--role", choices=["server", "agent"], help=ROLE_HELP)
            add.add_argument("--label", action="append", metavar="KEY=VALUE",
                             help=NODE_LABEL_HELP)
            add.add_argument("--loader", choices=[c.value for c in LoaderChain],
                             help=LOADER_HELP)

    t = sub.add_parser("tokens", help="API tokens: create, list, revoke")
    tsub = t.add_subparsers(dest="action", required=True)
    tc = tsub.add_parser("create", parents=[common],
                         help="a new token; its value is printed once (stdout)")
    tc.add_argument("name")
    tc.add_argument("--scope", required=True, choices=[s.value for s in Scope],
                    help="admin: everything; operator: enroll, approve, reinstall, remove "
                         "machines; read: the inventory without secrets; enroll: create and "
                         "approve machines only")
    tc.add_argument("--expires", metavar="DURATION", help="lifetime: 12h, 30d, 2w (default: "
                                                           "until revoked)")
    tsub.add_parser("ls", parents=[common], help="list tokens: name, scope, created, expires, "
                                                 "last used (never their values)")
    tsub.add_parser("revoke", parents=[common],
                    help="revoke a token: refused from then on").add_argument("name")
    au = sub.add_parser("audit", parents=[common],
                        help="who changed what, when, from where (API and CLI)")
    au.add_argument("--since", help="2h, 7d, an ISO 8601 time or Unix seconds")
    au.add_argument("--limit", type=int, default=1000, help="the newest N (default 1000)")

    i = sub.add_parser("import", parents=[common], help="bulk-enroll from CSV, YAML or JSON")
    i.add_argument("file", help="the file, or - to read standard input (podman exec -i)")
    i.add_argument("--format", choices=["csv", "yaml", "json"],
                   help="default: the file's suffix, else csv")
    i.add_argument("--dry-run", action="store_true",
                   help="check every row and say what would change; write nothing")

    r = sub.add_parser("render", parents=[where, address], help="what a device would get")
    r.add_argument("mac", metavar="REF", help=REF_HELP)
    r.add_argument("kind", choices=["ipxe", "pxelinux", "grub", "config", "nocloud"],
                   help="the boot script of that loader, or the OS config (config: k3OS's or "
                        "cloud-init's user-data; nocloud: cloud-init's seed)")
    r.add_argument("--arch", choices=[a.value for a in Arch],
                   help="architecture the device reports (default: last seen)")
    sub.add_parser("status", parents=[common],
                   help="machines per state, overall and per cluster; the failed ones")
    sub.add_parser("assets", parents=[common],
                   help="which loaders and profile assets are found; checksums")
    ev = sub.add_parser("events", parents=[common],
                        help="a machine's events; --follow streams every event live")
    ev.add_argument("ref", nargs="?", help="a machine's MAC, id or hostname (with --follow: "
                                           "only its events; default all machines)")
    ev.add_argument("--follow", "-f", action="store_true",
                    help="stream events from the running server until Ctrl-C")
    ev.add_argument("--server", help="the server's base URL (default: this host, http.port)")
    ev.add_argument("--token-file", help="file with an API token (default: NETBOOT_TOKEN, "
                                         "else admin.token in the data directory)")
    e = sub.add_parser("explain", parents=[common], help="why a machine boots what it boots")
    e.add_argument("mac", metavar="REF", help=REF_HELP)
    e.add_argument("--arch", choices=[a.value for a in Arch],
                   help="answer for this architecture (default: last seen)")

    d = sub.add_parser("db", help="the inventory database: schema migrations, copies "
                                   "between SQLite and PostgreSQL")
    dsub = d.add_subparsers(dest="action", required=True)
    dsub.add_parser("migrate", parents=[common],
                    help="apply the schema migrations the configured inventory lacks")
    # --config: its inventory.postgresql sets up the copy's connections (_db).
    dc = dsub.add_parser("copy", parents=[where, output],
                         help="copy every row of one inventory into another, then verify "
                              "counts and checksums; the source is read in one snapshot (a "
                              "running server's inventory can be backed up), stop the servers "
                              "using the target first")
    spec_help = ("an SQLite file, a postgresql:// DSN, or @FILE holding one (a DSN given on "
                 "the command line is visible to other users in ps)")
    dc.add_argument("--from", dest="source", required=True, metavar="DSN_OR_PATH",
                    help=spec_help)
    dc.add_argument("--to", dest="target", required=True, metavar="DSN_OR_PATH",
                    help=spec_help)
    dc.add_argument("--force", action="store_true",
                    help="replace the target's contents if it is not empty")

    if lab:
        try:
            from netboot.lab import cli as lab_cli

            lab_cli.add_parser(sub)
        except ImportError:  # pragma: no cover - the lab module is part of the package
            pass
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # A pipe's output is block-buffered: an answer smaller than the buffer was written only
    # by Python at exit, after _main's handler, which said "Exception ignored in:
    # <_io.TextIOWrapper name='<stdout>'> BrokenPipeError" and exited 120 (`netboot explain
    # MAC | head -3`, `netboot --help | head` on Debian 12's python3; PYTHONUNBUFFERED, set
    # where the tests ran, hid it). Flushed here, where a reader gone is told.
    try:
        code = _main(argv)
    except SystemExit:  # argparse's --help and usage errors print, then exit
        if not _flushed():
            return _reader_gone()
        raise
    return code if _flushed() else _reader_gone()


def _flushed() -> bool:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return False
    return True


def _reader_gone() -> int:
    # `netboot explain … | head`: the reader left; as any Unix tool, no traceback (and none
    # at exit either, when Python flushes stdout again: it goes to /dev/null).
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


def _main(argv: Sequence[str] | None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    # The command is the first word that is not an option (the top level has only -h and
    # --version, which take no value). lab, help and a misspelt command get the whole parser.
    command = next((w for w in words if not w.startswith("-")), None)
    parser = build_parser(lab=command not in COMMANDS, serve_only=command == "serve")
    args = parser.parse_args(words)
    # The server logs at info; inventory commands print their answer, not the store's chatter.
    default = "info" if args.cmd in ("serve", "lab") else "warning"
    level = getattr(args, "log_level", None) or os.environ.get("NETBOOT_SERVER_LOG_LEVEL",
                                                               default)
    # The server writes a loop iteration's lines at once (a line per request in a storm);
    # other commands each line as it comes.
    handler: logging.StreamHandler[TextIO] = (
        BatchedStreamHandler(sys.stderr) if args.cmd == "serve"
        else logging.StreamHandler(sys.stderr))
    log_format = getattr(args, "log_format", None) or os.environ.get("NETBOOT_LOG_FORMAT",
                                                                     "text")
    if log_format == "json":
        from netboot.logs import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # Neither format shows the caller, thread or process: not looked up for every record
    # (the caller's frame walk was a fifth of a log line's cost on the HTTP path).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    try:
        if args.cmd == "serve":
            # aiohttp (a third of the start-up) is imported by serve once its listeners
            # answer (netboot.servers.http.Doorway).
            from netboot.service import loop_factory, serve

            cfg = _config(args)
            logging.getLogger().setLevel(cfg.server.log_level.upper())
            try:
                with asyncio.Runner(loop_factory=loop_factory(cfg.server.event_loop)) as runner:
                    runner.run(serve(cfg))
            except ConfigError as exc:
                raise located(cfg, exc) from exc
            finally:
                handler.flush()  # the last iteration's lines, before any traceback
            return 0
        if args.cmd == "check-config":
            return _check_config(args)
        if args.cmd == "ca":
            return _ca(args)
        if args.cmd == "lab":
            from netboot.lab import cli as lab_cli

            return int(lab_cli.run(args))
        if args.cmd == "machines" and args.action == "claim" and args.server:
            return _claim(args)
        if args.cmd == "machines":
            return asyncio.run(_with_store(args, lambda s, c: _machines(args, s, c)))
        if args.cmd in ("profiles", "clusters", "groups"):
            return asyncio.run(_with_store(args, lambda s, c: _named(args.cmd, args, s, c)))
        if args.cmd == "import":
            return asyncio.run(_with_store(args, lambda s, c: _import(args, s, c)))
        if args.cmd == "tokens":
            return asyncio.run(_with_store(args, lambda s, c: _tokens(args, s, c)))
        if args.cmd == "audit":
            return asyncio.run(_with_store(args, lambda s, c: _audit(args, s, c)))
        if args.cmd == "status":
            return asyncio.run(_with_store(args, lambda s, c: _status(args, s, c)))
        if args.cmd == "assets":
            return asyncio.run(_with_store(args, lambda s, c: _assets(args, s, c)))
        if args.cmd == "events":
            return _events(args)
        if args.cmd == "db":
            return asyncio.run(_db(args))
        if args.cmd in ("render", "explain"):
            return asyncio.run(_with_store(args, lambda s, c: _render_or_explain(args, s, c)))
    except ConfigError as exc:
        print(f"netboot: configuration error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"netboot: {exc.field}: {exc.message}", file=sys.stderr)
        return 2
    except NetbootError as exc:
        print(f"netboot: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_gone()
    parser.error(f"unknown command {args.cmd!r}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
