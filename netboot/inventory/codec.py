"""Model values to and from JSON-ready dicts: one codec for the stores and the REST API.

``*_to_dict`` gives plain JSON types: enums as their string values, ``MacAddress`` as
``aa:bb:cc:dd:ee:ff``, mappings as dicts, tuples as lists. ``*_from_dict`` is strict because the
API parses request bodies with it: unknown fields, wrong types and missing required fields raise
:class:`~netboot.errors.ValidationError` naming the field (``labels.rack``, ``assets[1].path``),
so the edge can answer 400 with that name. Only value-level checks live here (a MAC parses, an
address is IPv4); checks that need the inventory belong to ``enroll.py``.

Both stores round-trip what they are given through these functions, so a value that could not
be read back (a label that is not a string, NaN in event data) is refused on write, not on a
later read.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import itertools
import json
import math
import sys
from _json import make_encoder
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, overload

from netboot import identity
from netboot.errors import NotFound, StateChanged, ValidationError
from netboot.inventory.base import SORT_KEYS, MachineFilter
from netboot.model import (
    ID_PREFIX,
    NO_ENTRIES,
    ApiToken,
    Arch,
    Asset,
    AuditEntry,
    Cluster,
    Event,
    Firmware,
    Group,
    Lease,
    LoaderChain,
    MacAddress,
    Machine,
    MachineState,
    Profile,
    Role,
    Scope,
    check_endpoint,
    machine_of_values,
)
from netboot.pki import k3s_ca_hash

_E = TypeVar("_E", bound=enum.Enum)
_V = TypeVar("_V")

# Sentinel for "field absent", distinct from an explicit JSON null.
_ABSENT: Any = object()


def _names(cls: type[Any]) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


_MACHINE_FIELDS = _names(Machine)
_PROFILE_FIELDS = _names(Profile)
_ASSET_FIELDS = _names(Asset)
_CLUSTER_FIELDS = _names(Cluster)
_GROUP_FIELDS = _names(Group)
_EVENT_FIELDS = _names(Event)
_LEASE_FIELDS = _names(Lease)
_TOKEN_FIELDS = _names(ApiToken)
_AUDIT_FIELDS = _names(AuditEntry)


# --- encoding helpers ---------------------------------------------------------------------


# One encoder, made once: json.dumps with any option builds a new one (and its C encoder) on
# every call, a third of the cost of a machine's document. It holds no state between calls.
_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode


def dumps(value: Mapping[str, Any], field: str = "data") -> str:
    """Compact JSON text; ValidationError naming ``field`` if it is not JSON-representable.

    ``allow_nan=False`` because NaN/Infinity are not JSON and other readers reject them.
    """
    try:
        return _ENCODE(value)
    except (TypeError, ValueError) as exc:
        raise ValidationError(field, f"not representable as JSON: {exc}") from exc


def normalise_mac(text: str, field: str = "mac") -> str:
    """``aa:bb:cc:dd:ee:ff`` for any accepted spelling; ValidationError naming ``field``."""
    try:
        return str(MacAddress.parse(text))
    except ValidationError as exc:
        raise ValidationError(field, exc.message) from exc


def claim_key(kind: str, value: str) -> tuple[str, str]:
    """The (kind, value) a store indexes for a lookup of identifier ``kind`` = ``value``.

    A placeholder or malformed value gives a key no machine holds (they are never indexed).
    """
    if kind == "mac":
        return kind, normalise_mac(value, "mac")
    if kind == "uuid":
        return kind, identity.clean_uuid(value) or ""
    if kind in ("serial", "asset"):
        return kind, identity.clean_text(value) or ""
    raise ValidationError("kind", f"{kind!r} is not one of {', '.join(identity.KINDS)}")


def machine_order(machine: Machine) -> tuple[bool, str, str]:
    """How machines list: by primary MAC, the ones without a known NIC last, by id."""
    return (machine.mac is None, str(machine.mac or ""), machine.id)


def check_expected(machine_id: str, expected: MachineState, current: str | None) -> None:
    """The compare-and-set check of ``Batch.expect``, worded alike in every store."""
    if current is None:
        raise NotFound(f"machine {machine_id} not found")
    # _value_, not value: Enum's value is a property in Python (~1,700 instructions, on the
    # store's writer once a machine of every first install's group commit).
    if current != expected._value_:
        raise StateChanged(f"machine {machine_id} is {current} now, not {expected} as read: "
                           "another writer changed it meanwhile", field="state",
                           holder=machine_id)


def check_version(machine_id: str, read: float, current: float | None) -> None:
    """The compare-and-set check of ``Batch.versions``: the machine's ``updated`` as stored
    is the one its writer read (after :func:`check_expected` where both are given)."""
    if current is None:
        raise NotFound(f"machine {machine_id} not found")
    if current != read:
        raise StateChanged(f"machine {machine_id} was changed (updated {current!r}) since it "
                           f"was read (updated {read!r}): another writer changed it meanwhile",
                           field="updated", holder=machine_id)


def check_filter(flt: MachineFilter) -> None:
    """Negative limits/offsets mean "everything" to SQLite; refuse them rather than guess."""
    if flt.limit < 0:
        raise ValidationError("limit", "must be 0 or more")
    if flt.offset < 0:
        raise ValidationError("offset", "must be 0 or more")
    if flt.sort not in SORT_KEYS:
        raise ValidationError("sort", f"{flt.sort!r} is not one of {', '.join(SORT_KEYS)}")


def sort_machines(machines: list[Machine], sort: str, descending: bool) -> list[Machine]:
    """The Python form of a listing order, as the SQLite store sorts in SQL: by the field
    (machines without it last, either direction), ties in the default order."""
    found = sorted(machines, key=machine_order)
    if sort == "mac":
        return found[::-1] if descending else found

    def value(machine: Machine) -> Any:
        v = getattr(machine, "in_state_since" if sort == "state_since" else sort)
        return v.value if isinstance(v, enum.Enum) else v

    present = [m for m in found if value(m) is not None]
    # Python's sort is stable in both directions: ties keep the default order.
    present.sort(key=value, reverse=descending)
    return present + [m for m in found if value(m) is None]


def matches_text(machine: Machine, text: str) -> bool:
    needle = text.lower()
    fields = [machine.hostname, machine.id, machine.uuid, machine.serial, machine.asset,
              *(str(m) for m in machine.macs)]
    return any(needle in f.lower() for f in fields if f)


# --- decoding helpers (each names the field it rejects) ----------------------------------


def _object(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValidationError(what, f"must be an object, got {_type(value)}")
    for key in value:
        if not isinstance(key, str):
            raise ValidationError(what, f"keys must be strings, got {key!r}")
    return value


def _type(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}.get(
        type(value), type(value).__name__
    )


def _fields(data: Mapping[str, Any], allowed: frozenset[str], prefix: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValidationError(
            prefix + unknown[0],
            f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(sorted(allowed))}",
        )


def _get(data: Mapping[str, Any], key: str, prefix: str, required: bool) -> Any:
    value = data.get(key, _ABSENT)
    if value is _ABSENT and required:
        raise ValidationError(prefix + key, "is required")
    return value


def _str(data: Mapping[str, Any], key: str, prefix: str = "", *, default: Any = _ABSENT) -> str:
    value = _get(data, key, prefix, default is _ABSENT)
    if value is _ABSENT:
        return str(default)
    if not isinstance(value, str):
        raise ValidationError(prefix + key, f"must be a string, got {_type(value)}")
    return value


def _name(data: Mapping[str, Any], key: str, prefix: str = "") -> str:
    value = _str(data, key, prefix)
    if not value.strip():
        raise ValidationError(prefix + key, "must not be empty")
    return value


def _opt_str(data: Mapping[str, Any], key: str, prefix: str = "") -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(prefix + key, f"must be a string or null, got {_type(value)}")
    return value


def _number(value: object, field: str) -> float:
    # bool is an int subclass; true/false as a time is a client bug, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(field, f"must be a number, got {_type(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ValidationError(field, "must be a finite number")
    return number


def _float(data: Mapping[str, Any], key: str, prefix: str = "", *, default: Any = _ABSENT) -> float:
    value = _get(data, key, prefix, default is _ABSENT)
    if value is _ABSENT:
        return float(default)
    return _number(value, prefix + key)


def _opt_float(data: Mapping[str, Any], key: str, prefix: str = "") -> float | None:
    value = data.get(key)
    return None if value is None else _number(value, prefix + key)


def _enum(value: object, cls: type[_E], field: str) -> _E:
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, got {_type(value)}")
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(str(m.value) for m in cls)
        raise ValidationError(field, f"{value!r} is not one of {choices}") from None


def _opt_enum(data: Mapping[str, Any], key: str, cls: type[_E], prefix: str = "") -> _E | None:
    value = data.get(key)
    return None if value is None else _enum(value, cls, prefix + key)


def _str_map(data: Mapping[str, Any], key: str, prefix: str = "") -> dict[str, str]:
    value = data.get(key, _ABSENT)
    if value is _ABSENT:
        return {}
    obj = _object(value, prefix + key)
    out: dict[str, str] = {}
    for k, v in obj.items():
        if not isinstance(v, str):
            raise ValidationError(f"{prefix}{key}.{k}", f"must be a string, got {_type(v)}")
        out[k] = v
    return out


def _str_list(value: object, field: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise ValidationError(field, f"must be an array of strings, got {_type(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ValidationError(f"{field}[{i}]", f"must be a string, got {_type(item)}")
    return tuple(value)


def _str_tuple(data: Mapping[str, Any], key: str, prefix: str = "") -> tuple[str, ...]:
    value = data.get(key, _ABSENT)
    return () if value is _ABSENT else _str_list(value, prefix + key)


def _ipv4(value: str | None, field: str) -> str | None:
    if value is None:
        return None
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValidationError(field, f"{value!r} is not an IPv4 address") from None


# --- machines -----------------------------------------------------------------------------


def machine_to_dict(machine: Machine, *, secrets: bool = True) -> dict[str, Any]:
    """Every field of ``machine``; ``secrets=False`` leaves out ``token_hash``, the install
    token and ``secret_hash`` (API listings)."""
    out: dict[str, Any] = {
        "id": machine.id,
        "macs": [str(m) for m in machine.macs],
        "state": machine.state.value,
        "hostname": machine.hostname,
        "uuid": machine.uuid,
        "serial": machine.serial,
        "asset": machine.asset,
        "labels": dict(machine.labels),
        "cluster": machine.cluster,
        "role": None if machine.role is None else machine.role.value,
        "profile": machine.profile,
        "loader": None if machine.loader is None else machine.loader.value,
        "arch": None if machine.arch is None else machine.arch.value,
        "firmware": None if machine.firmware is None else machine.firmware.value,
        "ipv4": machine.ipv4,
        "fixed_ipv4": machine.fixed_ipv4,
        "facts": dict(machine.facts),
        "token_hash": machine.token_hash,
        "token_expires": machine.token_expires,
        "install_token": machine.install_token,
        "secret_hash": machine.secret_hash,
        "state_since": machine.state_since,
        "created": machine.created,
        "updated": machine.updated,
    }
    if not secrets:
        del out["token_hash"], out["install_token"], out["secret_hash"]
    return out


def macs_from_list(value: object, field: str = "macs") -> tuple[MacAddress, ...]:
    """A list of MACs in any accepted spelling, normalised; a repeated one is refused."""
    out: list[MacAddress] = []
    for i, text in enumerate(_str_list(value, field)):
        try:
            mac = MacAddress.parse(text)
        except ValidationError as exc:
            raise ValidationError(f"{field}[{i}]", exc.message) from None
        if mac in out:
            raise ValidationError(f"{field}[{i}]", f"{mac} is listed twice")
        out.append(mac)
    return tuple(out)


def machine_from_dict(data: object) -> Machine:
    """Strict parse; nothing is required (an absent ``id`` gets a new one). ValidationError
    names the offending field. Whether a machine has enough identity is not a value check:
    see :func:`netboot.identity.require`."""
    d = _object(data, "machine")
    _fields(d, _MACHINE_FIELDS, "")
    state = d.get("state", MachineState.ENROLLED.value)
    ident = {} if d.get("id") is None else {"id": _name(d, "id")}
    if ident and (not ident["id"].startswith(ID_PREFIX) or not ident["id"].isprintable()
                  or "/" in ident["id"] or ident["id"] != ident["id"].strip()):
        # Refs are a MAC or an id, told apart by the prefix (netboot.identity.by_ref).
        raise ValidationError("id", f"{ident['id']!r}: a machine id is '{ID_PREFIX}' and "
                                    "printable text without '/' or spaces")
    return Machine(
        macs=macs_from_list(d.get("macs", [])),
        **ident,
        state=_enum(state, MachineState, "state"),
        hostname=_opt_str(d, "hostname"),
        uuid=_opt_str(d, "uuid"),
        serial=_opt_str(d, "serial"),
        asset=_opt_str(d, "asset"),
        labels=_str_map(d, "labels") or NO_ENTRIES,
        cluster=_opt_str(d, "cluster"),
        role=_opt_enum(d, "role", Role),
        profile=_opt_str(d, "profile"),
        loader=_opt_enum(d, "loader", LoaderChain),
        arch=_opt_enum(d, "arch", Arch),
        firmware=_opt_enum(d, "firmware", Firmware),
        ipv4=_ipv4(_opt_str(d, "ipv4"), "ipv4"),
        fixed_ipv4=_ipv4(_opt_str(d, "fixed_ipv4"), "fixed_ipv4"),
        facts=_str_map(d, "facts") or NO_ENTRIES,
        token_hash=_opt_str(d, "token_hash"),
        token_expires=_opt_float(d, "token_expires"),
        install_token=_opt_str(d, "install_token"),
        secret_hash=_opt_str(d, "secret_hash"),
        state_since=_opt_float(d, "state_since"),
        created=_float(d, "created", default=0.0),
        updated=_float(d, "updated", default=0.0),
    )


# What a store keeps of a machine. A bulk import writes 100,000 of them and ``serve`` reads as
# many back at start, so this side of the codec checks each value once, in place, instead of
# building the machine a second time to see that it reads back.

_MACHINE_TEXT = ("hostname", "uuid", "serial", "asset", "cluster", "profile", "token_hash",
                 "install_token", "secret_hash")
_MACHINE_ENUMS: tuple[tuple[str, type[enum.Enum]], ...] = (
    ("role", Role), ("loader", LoaderChain), ("arch", Arch), ("firmware", Firmware))
# Enum members by value: a dict look-up, where calling the enum class is ten times slower.
_MEMBERS: dict[type[enum.Enum], dict[Any, Any]] = {
    cls: {m.value: m for m in cls} for cls in (MachineState, Role, LoaderChain, Arch, Firmware)}
# JSON's own scanner, without json.loads's wrapper (a quarter of reading a stored machine).
_SCAN = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # set in __init__, untyped


def loads_document(text: str) -> Any:
    """The JSON value of ``text`` as a store wrote it (compact, nothing around it)."""
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:
        end = -1
    return value if end == len(text) else json.loads(text)  # json.loads names the error


# Strings thousands of machines share (cluster, profile, label and fact names and values): one
# copy each in a process holding the whole inventory, not one per machine.
_SHARED = ("cluster", "profile")
_intern = sys.intern


def stored_machine(machine: Machine) -> Machine:
    """``machine`` as a store would read it back: itself when every field already has the
    type and form :func:`machine_from_dict` gives (one pass, no copy), else that round trip,
    which normalises a field (an int time, an IPv4 in another spelling) or raises
    ValidationError naming it."""
    return machine if _exact(machine) else machine_from_dict(machine_to_dict(machine))


def _exact(m: Machine) -> bool:
    # Each field read once by name (a loop of getattr over field names took twice as long:
    # a bulk import checks 100,000 machines).
    macs = m.macs
    if type(macs) is not tuple:
        return False
    for mac in macs:
        if type(mac) is not MacAddress:
            return False
    if len(macs) > 1 and len(set(macs)) != len(macs):
        return False
    ident = m.id
    if (type(ident) is not str or not ident.startswith(ID_PREFIX) or not ident.isprintable()
            or "/" in ident or ident != ident.strip()):
        return False
    if type(m.state) is not MachineState:
        return False
    # Written out, not a loop over a tuple of the fields: ~1,100 instructions less for the
    # text fields, ~700 for the two mappings, ~1,600 for the addresses and times, of the
    # ~13,700 a first install's update took (callgrind; the store's writer checks every
    # update of a group commit holding the GIL, benchmarks/README.md s32-writer).
    if (((v := m.hostname) is not None and type(v) is not str)
            or ((v := m.uuid) is not None and type(v) is not str)
            or ((v := m.serial) is not None and type(v) is not str)
            or ((v := m.asset) is not None and type(v) is not str)
            or ((v := m.cluster) is not None and type(v) is not str)
            or ((v := m.profile) is not None and type(v) is not str)
            or ((v := m.token_hash) is not None and type(v) is not str)
            or ((v := m.install_token) is not None and type(v) is not str)
            or ((v := m.secret_hash) is not None and type(v) is not str)):
        return False
    if ((m.role is not None and type(m.role) is not Role)
            or (m.loader is not None and type(m.loader) is not LoaderChain)
            or (m.arch is not None and type(m.arch) is not Arch)
            or (m.firmware is not None and type(m.firmware) is not Firmware)):
        return False
    if (labels := m.labels) is not NO_ENTRIES:
        if type(labels) is not dict:
            return False
        for k, v in labels.items():
            if type(k) is not str or type(v) is not str:
                return False
    if (facts := m.facts) is not NO_ENTRIES:
        if type(facts) is not dict:
            return False
        for k, v in facts.items():
            if type(k) is not str or type(v) is not str:
                return False
    if (((v := m.ipv4) is not None and not _canonical_ipv4(v))
            or ((v := m.fixed_ipv4) is not None and not _canonical_ipv4(v))):
        return False
    created, updated, expires, since = m.created, m.updated, m.token_expires, m.state_since
    # Four floats are finite when their sum is: an infinity or a NaN among them makes it
    # one. (A sum past the largest double, from times near 1e308, says "not exact" of
    # finite ones: the caller then takes the round trip, which is only slower.)
    return (type(created) is float and type(updated) is float
            and (expires is None or type(expires) is float)
            and (since is None or type(since) is float)
            and math.isfinite(created + updated + (expires or 0.0) + (since or 0.0)))


def _canonical_ipv4(value: object) -> bool:
    try:
        return type(value) is str and str(ipaddress.IPv4Address(value)) == value
    except ValueError:
        return False


def machine_document(machine: Machine) -> dict[str, Any]:
    """:func:`machine_to_dict` without the fields at their defaults (None, empty): half as
    long to write, index (``json_extract``) and read. :func:`machine_from_dict` reads an
    absent field as its default, so both forms read back the same machine."""
    m = machine
    out: dict[str, Any] = {"id": m.id, "macs": [str(mac) for mac in m.macs],
                           "state": m.state.value}
    for key in _MACHINE_TEXT:
        value = getattr(m, key)
        if value is not None:
            out[key] = value
    for key, _ in _MACHINE_ENUMS:
        value = getattr(m, key)
        if value is not None:
            out[key] = value.value
    if m.labels:
        out["labels"] = dict(m.labels)
    if m.facts:
        out["facts"] = dict(m.facts)
    for key in ("ipv4", "fixed_ipv4", "token_expires", "state_since"):
        value = getattr(m, key)
        if value is not None:
            out[key] = value
    out["created"] = m.created
    out["updated"] = m.updated
    return out


# JSON's own string quoting (C), as the encoder of dumps() uses it with ensure_ascii=False.
_quote = json.encoder.encode_basestring
# machine_document's optional fields in its order, each as it starts in the text.
_TEXT_KEYS = tuple(f',"{key}":' for key in _MACHINE_TEXT)


def _unencodable(value: object) -> Any:
    raise TypeError(f"{type(value).__name__} is not a JSON string")


# JSON's own encoder (C) of a mapping of strings, as dumps() writes one (compact, in order,
# strings quoted by _quote), made once: a machine's labels in one call (facts: pair by pair,
# their keys looked up in _QUOTED_KEYS, s34-writer), where a
# comprehension of quoted pairs was ~2,000 instructions a machine more (callgrind).
_ENCODE_MAP = make_encoder(None, _unencodable, _quote, None, ":", ",", False, False, False)
# The enums' values as JSON strings, quoted once.
_QUOTED = {member._value_: _quote(member._value_)
           for cls in (MachineState, Role, LoaderChain, Arch, Firmware) for member in cls}
# The keys of the facts and of the events' data that the boot path writes (boot.learn's and
# install_peer, enroll's ipv6, BootService._new_event's), each quoted once with the colon
# after it: a first install's facts and its event's data were each written by JSON's C
# encoder of a mapping (~9,400 instructions for three facts) or by quoting key and value
# pair by pair; a look-up of an equal key is ~290 instructions against ~550 for quoting it
# and ~200 for the colon (callgrind, benchmarks/README.md s34-writer). Any other key is
# quoted as before: the same text either way.
_QUOTED_KEYS = {key: _quote(key) + ":" for key in (
    "install_peer", "manufacturer", "product", "dhcp_hostname", "platform", "relay",
    "interface", "remote_addr", "uuid", "serial", "asset", "ipv6",
    "via", "firmware", "arch", "mac", "peer")}


# The doubles strictly between 2**30 and 2**31 (times from 2004-01-10 to 2038-01-19): one
# binade, the same spacing (2**-22) for all, ten digits before the point. The difference of
# two of them is exact (Sterbenz's lemma): when it is a whole number k, y = x + k exactly.
# repr() writes the shortest digits that read back to the same double and, of those, the
# nearest (Python's dtoa.c, mode 0). The decimals that read back to y are those of x plus k,
# each as far from y as it was from x (the same spacing; neither is the binade's lowest
# value, whose interval is lopsided; their last bits have the same parity, which decides a
# tie when read), with the same digits after the point and as many before it: so repr(y)
# is repr(x) with k added to its integer part. That part is floor(x): a whole number is 2**-22
# from the doubles beside it, beyond the 2**-23 either side of them that reads back to them.
# So repr(y) is str(int(y)), then the digits of repr(x) from its point on (ten before it).
# Checked against repr itself on 7 million random pairs (benchmarks/README.md, s30-writer;
# tests/inventory/test_codec.py draws 20,000 and the binade's edges).
# Outside this range, or with a fraction of a second between them, the repr is made.
_SHIFT_LOW = 2.0 ** 30
_SHIFT_HIGH = 2.0 ** 31


def machine_json(machine: Machine, install_token: str | None = None,
                 times: dict[float, str] | None = None) -> str:
    """``dumps(machine_document(machine))``: :func:`machine_texts`' document alone."""
    return machine_texts(machine, install_token, times, claims=False)[0]


def machine_texts(machine: Machine, install_token: str | None = None,
                  times: dict[float, str] | None = None, *,
                  claims: bool = True) -> tuple[str, str]:
    """``dumps(machine_document(machine))`` for a machine :func:`stored_machine` returned,
    and :func:`claims_json` of that text ("" unless ``claims``), made of the same quoted
    parts in one pass (a store's writer compares the claims of every update of a group
    commit: the second pass quoted the UUID, serial and asset tag again and wrote the MAC
    again, ~5,000 instructions a first install, benchmarks/README.md s32-writer; a new
    machine's are not compared, and building them is ~1,800). The document holds
    ``install_token`` in place of the machine's own when given (the sealed form a store
    writes: no copy of the machine made for it), and is
    written out directly: the same text in half the time (no intermediate dict, no encoder
    set up per call; a bulk import writes 100,000). Strings are quoted by JSON's own quoting;
    times are finite floats, written as the encoder writes them (``float.__repr__``).
    Each field by its own test, each part its text or "", all joined by one f-string: a
    list appended to field by field and joined was a tenth more (the store's writer encodes
    every machine of a group commit holding the GIL that the event loop waits for).
    ``times``: the text of each creation time written already (by an earlier call given the
    same dict), reused: a float's shortest repr is ~7,000 instructions (three in a first
    install's update, ~10 % of the writer's instructions for it), and the machines of one
    import share their creation time, which each later update of each of them writes again.
    Not the update's time: a storm's installs each have their own. The token's expiry,
    a whole number of seconds after it, is written from the update time's text."""
    m, q, r = machine, _quote, float.__repr__
    macs = m.macs
    # One MAC as a rule: without the comprehension (a call of its own in Python 3.11). Its
    # text by bytes.hex of itself (a MacAddress is its six bytes), not through the ``raw``
    # property: ~600 instructions less a MAC, interpreted.
    mac_text = ('"' + macs[0].hex(":") + '"' if len(macs) == 1 else
                ",".join(['"' + mac.hex(":") + '"' for mac in macs]))
    # Each field only when it is not at its default, as machine_document leaves it out,
    # in its order (_MACHINE_TEXT, _MACHINE_ENUMS, then the rest).
    # The identifiers' quoted texts (None when absent) go into both texts.
    hostname = "" if (v := m.hostname) is None else ',"hostname":' + q(v)
    uuid_text = None if (v := m.uuid) is None else q(v)
    serial_text = None if (v := m.serial) is None else q(v)
    asset_text = None if (v := m.asset) is None else q(v)
    uuid = "" if uuid_text is None else ',"uuid":' + uuid_text
    serial = "" if serial_text is None else ',"serial":' + serial_text
    asset = "" if asset_text is None else ',"asset":' + asset_text
    cluster = "" if (v := m.cluster) is None else ',"cluster":' + q(v)
    profile = "" if (v := m.profile) is None else ',"profile":' + q(v)
    token_hash = "" if (v := m.token_hash) is None else ',"token_hash":' + q(v)
    token = "" if (v := install_token or m.install_token) is None else ',"install_token":' + q(v)
    secret = "" if (v := m.secret_hash) is None else ',"secret_hash":' + q(v)
    role = "" if (e1 := m.role) is None else ',"role":' + _QUOTED[e1._value_]
    loader = "" if (e2 := m.loader) is None else ',"loader":' + _QUOTED[e2._value_]
    arch = "" if (e3 := m.arch) is None else ',"arch":' + _QUOTED[e3._value_]
    firmware = "" if (e4 := m.firmware) is None else ',"firmware":' + _QUOTED[e4._value_]
    labels_text = "".join(_ENCODE_MAP(mapping, 0)) if (mapping := m.labels) else None
    labels = "" if labels_text is None else ',"labels":' + labels_text
    if mapping := m.facts:
        # _facts_text's, written out here: the call was ~700 instructions a machine.
        keyed, pairs = _QUOTED_KEYS.get, []
        for key, value in mapping.items():
            pairs.append((keyed(key) or q(key) + ":") + q(value))
        facts = ',"facts":{' + ",".join(pairs) + "}"
    else:
        facts = ""
    ipv4 = "" if (v := m.ipv4) is None else ',"ipv4":' + q(v)
    fixed_ipv4 = "" if (v := m.fixed_ipv4) is None else ',"fixed_ipv4":' + q(v)
    updated = m.updated
    text_updated = r(updated)
    # An install's token expires a whole number of seconds after its update time (boot.py:
    # now + the timeout), whose text is written already: its own is made of that text's
    # digits after the point (_SHIFT_LOW says why), not by a second repr.
    if (t := m.token_expires) is None:
        expires = ""
    elif (t - updated).is_integer() and _SHIFT_LOW < updated <= t < _SHIFT_HIGH:
        expires = f',"token_expires":{int(t)}{text_updated[10:]}'
    else:
        expires = ',"token_expires":' + r(t)
    # Its state's time is its update's when the state changed last (lifecycle.advance: the
    # same float): that text, not a second repr (~7,000 instructions). Equal nonzero doubles
    # have one repr; 0.0 and -0.0 are equal with two.
    if (t := m.state_since) is None:
        since = ""
    elif t is updated or (t == updated and t):
        since = ',"state_since":' + text_updated
    else:
        since = ',"state_since":' + r(t)
    # A batch's creation times, memoised (the docstring); not 0.0, an equal key to -0.0 of
    # another text (any other two equal floats are one double: one text).
    created = m.created
    text_created = None if times is None else times.get(created)
    if text_created is None:
        text_created = r(created)
        if times is not None and created:
            times[created] = text_created
    text = (f'{{"id":{q(m.id)},"macs":[{mac_text}],"state":{_QUOTED[m.state._value_]}'
            f"{hostname}{uuid}{serial}{asset}{cluster}{profile}{token_hash}{token}{secret}{role}"
            f"{loader}{arch}{firmware}{labels}{facts}{ipv4}{fixed_ipv4}{expires}{since}"
            f',"created":{text_created},"updated":{text_updated}}}')
    if not claims:
        return text, ""
    # claims_json: absent fields null, the MACs' array as the document writes it.
    return text, (f"[{labels_text or 'null'},[{mac_text}],{uuid_text or 'null'},"
                  f"{serial_text or 'null'},{asset_text or 'null'}]")


def _facts_text(mapping: Mapping[str, str]) -> str:
    """A machine's facts as the document writes them (``_ENCODE_MAP``'s text), pair by pair,
    each key's quoted text looked up (_QUOTED_KEYS): ~2,000 instructions less than
    _ENCODE_MAP for a first install's three facts. The keys and values are str (checked by
    :func:`machine_delta`, its caller; :func:`machine_texts` writes the same inline)."""
    q, keyed, pairs = _quote, _QUOTED_KEYS.get, []
    for key, value in mapping.items():
        pairs.append((keyed(key) or q(key) + ":") + q(value))
    return "{" + ",".join(pairs) + "}"


def claims_json(machine: Machine, text: str) -> str:
    """What SQLite's ``json_extract(data, '$.labels', '$.macs', '$.uuid', '$.serial',
    '$.asset')`` gives of ``text``, ``machine``'s own document (:func:`machine_json`'s): the
    JSON array of the fields its label and identifier rows are made of (its labels, and
    :func:`netboot.identity.claims`' MACs, UUID, serial and asset tag), ``null`` for each
    one absent. SQLite writes an extracted value's strings as they are spelled in the
    document and its objects and arrays without spaces, so a stored document that holds
    these five fields as this one does gives this same text (the store's writer compares
    the two texts, :func:`same_claims` only when they differ)."""
    m = machine
    labels = "".join(_ENCODE_MAP(mapping, 0)) if (mapping := m.labels) else "null"
    uuid = "null" if (v := m.uuid) is None else _quote(v)
    serial = "null" if (v := m.serial) is None else _quote(v)
    asset = "null" if (v := m.asset) is None else _quote(v)
    # One MAC as machine_json writes it (~3,500 instructions less than finding it in the
    # text); more as written in the text, between its first two keys: a JSON string holds no
    # unescaped '"', so the id's text cannot hold either key as it is spelled here.
    macs = ('["' + one[0].hex(":") + '"]' if len(one := m.macs) == 1 else
            text[text.index(',"macs":[') + 8:text.index('],"state":') + 1])
    return f"[{labels},{macs},{uuid},{serial},{asset}]"


def same_claims(stored: Any, machine: Machine) -> tuple[bool, bool]:
    """Whether a stored document has ``machine``'s labels, and its identifiers' fields
    (:func:`claims_json`), by value: ``stored`` is what SQLite's ``json_extract`` of those
    five paths gave of it (a JSON array's text). False when unsure (anything but that
    array, a field of another type): the caller then writes those rows again."""
    same_labels, same_keys, _ = claims_change(stored, machine)
    return same_labels, same_keys


def claims_change(stored: Any, machine: Machine
                  ) -> tuple[bool, bool, list[tuple[str, str]] | None]:
    """:func:`same_claims`, and when the identifiers differ only by some that ``machine``
    adds (the same MACs; a UUID, serial or asset tag where the stored document has none),
    the (kind, value) rows :func:`netboot.identity.claims` gives of those: the rows to
    insert, the stored ones staying as they are. None when one changed or went (or
    unsure): the caller deletes the machine's rows and writes them all again.

    A first DHCP sighting adds a UUID (option 97) to a machine enrolled by MAC: deleting
    and inserting its MAC row too was most of the SQLite writer's ~295k instructions a
    first-seen DISCOVER (s34-dhcp). The stored document is parsed once for both answers."""
    try:
        value = loads_document(stored) if type(stored) is str else None
    except ValueError:
        value = None
    if type(value) is not list or len(value) != 5:
        return False, False, None
    labels, macs, uuid, serial, asset = value
    m = machine
    same_labels = not m.labels if labels is None else (
        type(labels) is dict and labels == m.labels)
    if macs != [str(mac) for mac in m.macs]:
        return same_labels, False, None
    new_uuid, new_serial, new_asset = m.uuid, m.serial, m.asset
    if uuid == new_uuid and serial == new_serial and asset == new_asset:
        return same_labels, True, None
    # A stored field that is set and differs (or went): its row may have to go.
    if ((uuid is not None and uuid != new_uuid) or (serial is not None and serial != new_serial)
            or (asset is not None and asset != new_asset)):
        return same_labels, False, None
    # Only fields the stored document lacked (so it has no row of their kind), cleaned as
    # identity.claims cleans them: a placeholder claims nothing, and adds no row.
    added: list[tuple[str, str]] = []
    if uuid is None and (v := identity.clean_uuid(new_uuid)) is not None:
        added.append(("uuid", v))
    if serial is None and (v := identity.clean_text(new_serial)) is not None:
        added.append(("serial", v))
    if asset is None and (v := identity.clean_text(new_asset)) is not None:
        added.append(("asset", v))
    return same_labels, False, added


# The fields machine_delta writes as JSON text (bound through SQLite's json()), the others
# as strings (quoted by SQLite).
DELTA_JSON = frozenset({"facts", "token_expires", "state_since", "updated"})
# The keys machine_delta gives for facts that SQLite's JSON functions write from their bound
# strings (a first install's): FACTS_NEW and the names joined by ",", for a stored document
# with no facts, all of them (``'$.facts', json_object('name', ?, ...)``, one value each);
# FACTS_ADDED and one name, a key added to the stored facts (``'$.facts.name', ?``). Only
# names of _FACT_KEYS, which the statement holds as they are (SQL and JSON path alike).
FACTS_NEW = "facts="
FACTS_ADDED = "facts."
_FACT_KEYS = frozenset(k for k in _QUOTED_KEYS
                        if k.isascii() and k.islower() and k.replace("_", "").isalnum())
# The key machine_delta gives, after "updated" and without a value of its own, for a
# ``state_since`` that is the update time (a state change): set from the ``updated``
# value's parameter again (one value bound, its text made once). A fourth ``json_set`` path
# with its own bound text was ~6,000 of the SQLite writer's instructions a first config
# (benchmarks/README.md s40-config1st).
SINCE_UPDATED = "state_since=updated"


def machine_delta(old: Machine, new: Machine, install_token: str | None = None,
                  learnt: bool = False,
                  ) -> tuple[tuple[str, ...], tuple[str, ...], list[str],
                             tuple[tuple[str, str], ...]] | None:
    """What makes the document of ``old`` (a machine as a store read it: every field in
    :func:`stored_machine`'s form) a document of ``new``: the top-level keys to set, with
    their values (the JSON text of :data:`DELTA_JSON`'s, the string of the others; none
    for :data:`SINCE_UPDATED`, the last key, which sets ``state_since`` to ``updated``'s), and
    the keys to remove (a field back at its default, which :func:`machine_document` leaves
    out), and the identifier rows ``new`` adds (the (kind, value) pairs
    :func:`netboot.identity.claims` gives of a UUID, serial or asset tag ``old`` lacked: the
    caller inserts them, its other rows staying). None when ``new`` changes what this does
    not write this way (its id, MACs, labels or creation time, an identifier changed or
    removed: rows beside the document depend on them) or a changed field would not read back
    as it is (the caller then writes the whole document, whose check names it).
    ``install_token``: what the document holds in place of ``new``'s token when it changed
    (its sealed form).

    A first install changes a machine's state, facts, token and times; its config fetch the
    state and update time: the document written whole was ~52,000 of the SQLite writer's
    instructions a first install, holding the interpreter lock, and its check ~12,500
    (benchmarks/README.md s34-writer, s35-writer). A field is the same when it is the same
    object (a machine made from another by ``replace`` shares the others) or an equal value
    of the same type (an int time equal to a float one is not what a read gives back).
    Written out field by field, without helpers: a call or a loop over a tuple of fields is
    ~1,000 instructions a field here.

    ``learnt``: ``new`` is ``old`` with only what a boot request teaches (Batch.learnt:
    :func:`netboot.boot.learn`'s facts, UUID, serial, asset tag, arch, firmware and update
    time; an identifier only set where ``old`` has none, as the request's Identity cleaned
    it): only those fields are compared, and the identifiers are their own rows. A first
    DHCP sighting's delta was ~33,000 of the SQLite writer's instructions, ~11,000 of them
    the other seventeen fields compared and the UUID cleaned again (benchmarks/README.md,
    s41-sighting)."""
    o, n = old, new
    if not learnt and (
            (n.macs is not o.macs and (type(n.macs) is not type(o.macs) or n.macs != o.macs))
            or (n.id is not o.id and n.id != o.id)
            or ((c := n.labels) is not (d := o.labels) and (c or d)
                and (type(c) is not dict or type(d) is not dict or c != d))
            or ((x := n.created) is not (y := o.created)
                and (type(x) is not type(y) or x != y))):
        return None
    keys: list[str] = []
    values: list[str] = []
    gone: list[str] = []
    # (A tuple, not a list: none made for the update that adds none, a first install.)
    added: tuple[tuple[str, str], ...] = ()
    # Identifiers only added (a UUID, serial or asset tag where the stored document has
    # none): set in the document, their rows inserted beside the stored ones. A first DHCP
    # sighting learns a UUID (option 97): written whole, that was ~66,000 of the writer's
    # lock-held instructions a first DISCOVER (benchmarks/README.md s36-dhcp1st, s36-ident).
    # One changed or removed: None (its row goes, the whole path deletes and writes them).
    # Cleaned as identity.claims cleans them: a placeholder is stored and claims no row.
    if (a := n.uuid) is not (b := o.uuid) and (type(a) is not type(b) or a != b):
        if b is not None or type(a) is not str:
            return None
        keys.append("uuid")
        values.append(a)
        if learnt:
            added += (("uuid", a),)  # the request's Identity cleaned it
        elif v := identity.clean_uuid(a):
            added += (("uuid", v),)
    if (a := n.serial) is not (b := o.serial) and (type(a) is not type(b) or a != b):
        if b is not None or type(a) is not str:
            return None
        keys.append("serial")
        values.append(a)
        if learnt:
            added += (("serial", a),)  # the request's Identity cleaned it
        elif v := identity.clean_text(a):
            added += (("serial", v),)
    if (a := n.asset) is not (b := o.asset) and (type(a) is not type(b) or a != b):
        if b is not None or type(a) is not str:
            return None
        keys.append("asset")
        values.append(a)
        if learnt:
            added += (("asset", a),)  # the request's Identity cleaned it
        elif v := identity.clean_text(a):
            added += (("asset", v),)
    if not learnt:  # the fields learn() leaves as they are, but arch and firmware
        if (e := n.state) is not o.state:
            if type(e) is not MachineState:
                return None
            keys.append("state")
            values.append(e._value_)
        # The optional strings in machine_document's order (json_set appends a key the document
        # lacks: any order reads back alike). A string is compared by value only when both are
        # str: any other type is refused when set. Written out five times on purpose: a loop
        # over (name, value) pairs cost 50,947 instructions a call against 35,402 (s35-writer).
        if (a := n.hostname) is not (b := o.hostname) and (type(a) is not str or a != b):
            if a is None:
                gone.append("hostname")
            elif type(a) is str:
                keys.append("hostname")
                values.append(a)
            else:
                return None
        if (a := n.cluster) is not (b := o.cluster) and (type(a) is not str or a != b):
            if a is None:
                gone.append("cluster")
            elif type(a) is str:
                keys.append("cluster")
                values.append(a)
            else:
                return None
        if (a := n.profile) is not (b := o.profile) and (type(a) is not str or a != b):
            if a is None:
                gone.append("profile")
            elif type(a) is str:
                keys.append("profile")
                values.append(a)
            else:
                return None
        if (a := n.token_hash) is not (b := o.token_hash) and (type(a) is not str or a != b):
            if a is None:
                gone.append("token_hash")
            elif type(a) is str:
                keys.append("token_hash")
                values.append(a)
            else:
                return None
        if (a := n.install_token) is not (b := o.install_token) and (type(a) is not str or a != b):
            if a is None:
                gone.append("install_token")
            elif type(a) is str:
                keys.append("install_token")
                values.append(a if install_token is None else install_token)
            else:
                return None
        if (a := n.secret_hash) is not (b := o.secret_hash) and (type(a) is not str or a != b):
            if a is None:
                gone.append("secret_hash")
            elif type(a) is str:
                keys.append("secret_hash")
                values.append(a)
            else:
                return None
        if (f1 := n.role) is not o.role:
            if f1 is None:
                gone.append("role")
            elif type(f1) is Role:
                keys.append("role")
                values.append(f1._value_)
            else:
                return None
        if (f2 := n.loader) is not o.loader:
            if f2 is None:
                gone.append("loader")
            elif type(f2) is LoaderChain:
                keys.append("loader")
                values.append(f2._value_)
            else:
                return None
    if (f3 := n.arch) is not o.arch:
        if f3 is None:
            gone.append("arch")
        elif type(f3) is Arch:
            keys.append("arch")
            values.append(f3._value_)
        else:
            return None
    if (f4 := n.firmware) is not o.firmware:
        if f4 is None:
            gone.append("firmware")
        elif type(f4) is Firmware:
            keys.append("firmware")
            values.append(f4._value_)
        else:
            return None
    # (Two empty mappings are alike: read back as NO_ENTRIES both.)
    if (c := n.facts) is not (d := o.facts) and (c or d) and (type(c) is not type(d) or c != d):
        if not c:
            gone.append("facts")
        elif type(c) is not dict:
            return None
        else:
            # The facts a first install adds (the request's address and install peer), as
            # SQLite's JSON functions write them from the bound strings (FACTS_NEW,
            # FACTS_ADDED): not quoted nor joined here (its ~9,000 instructions of the
            # writer's lock-held ~75,000 a first install, benchmarks/README.md s44-writer).
            # Only known keys (_FACT_KEYS: the statement names them), and only where the
            # text comes out as the whole object's would: all new, or the stored ones
            # unchanged, in their order, with new ones after them (json_set appends a key).
            new_facts: list[tuple[str, str]] | None = None
            if not d:
                new_facts = list(c.items())
            elif len(c) > len(d):
                pairs = list(c.items())
                if pairs[:len(d)] == list(d.items()):
                    new_facts = pairs[len(d):]
            written = False
            if new_facts is not None:
                # Checked pair by pair: C calls (the set of the keys, of the values' types)
                # measured ~800 instructions more for a first install's two (s44-writer).
                names: list[str] = []
                set_values: list[str] = []
                for k, v in new_facts:
                    if type(k) is not str or type(v) is not str:
                        return None
                    if k not in _FACT_KEYS:
                        break
                    names.append(k)
                    set_values.append(v)
                else:
                    if d:  # each a key of the stored object (a JSON path's name)
                        keys.extend([FACTS_ADDED + k for k in names])
                    else:  # the whole object, made by json_object whatever was stored
                        keys.append(FACTS_NEW + ",".join(names))
                    values += set_values
                    written = True
            if not written:
                for k, v in c.items():
                    if type(k) is not str or type(v) is not str:
                        return None
                keys.append("facts")
                values.append(_facts_text(c))
    if not learnt:
        if (a := n.ipv4) is not (b := o.ipv4) and (type(a) is not str or a != b):
            if a is None:
                gone.append("ipv4")
            elif _canonical_ipv4(a):
                keys.append("ipv4")
                values.append(a)
            else:
                return None
        if (a := n.fixed_ipv4) is not (b := o.fixed_ipv4) and (type(a) is not str or a != b):
            if a is None:
                gone.append("fixed_ipv4")
            elif _canonical_ipv4(a):
                keys.append("fixed_ipv4")
                values.append(a)
            else:
                return None
    updated = n.updated
    if type(updated) is not float or not math.isfinite(updated):
        return None
    text_updated = "" if updated is o.updated or updated == o.updated else repr(updated)
    since_updated = False
    if not learnt:  # (learn() sets no token time nor state time)
        if (t := n.token_expires) is not (u := o.token_expires) and (
                type(t) is not type(u) or t != u):
            if t is None:
                gone.append("token_expires")
            elif type(t) is not float or not math.isfinite(t):
                return None
            elif (t - updated).is_integer() and _SHIFT_LOW < updated <= t < _SHIFT_HIGH:
                # As machine_texts writes it (its text from the update time's).
                keys.append("token_expires")
                values.append(f"{int(t)}{(text_updated or repr(updated))[10:]}")
            else:
                keys.append("token_expires")
                values.append(repr(t))
        if (t := n.state_since) is not (u := o.state_since) and (
                type(t) is not type(u) or t != u):
            if t is None:
                gone.append("state_since")
            elif type(t) is not float or not math.isfinite(t):
                return None
            elif text_updated and (t is updated or (t == updated and t)):
                since_updated = True  # (as a rule: a state change; keyed after "updated")
            else:
                keys.append("state_since")
                values.append((text_updated or repr(updated)) if t == updated and t else repr(t))
    if text_updated:
        keys.append("updated")
        values.append(text_updated)
        if since_updated:
            keys.append(SINCE_UPDATED)
    return tuple(keys), tuple(gone), values, added


# What a store indexes of a new machine beside its document: id, first MAC (None without
# one), whether it has more MACs, hostname, state, cluster, the document's text, created,
# updated, and its identifiers other than MACs as identity.claims cleans them (None when it
# has none, or a placeholder).
# id, first MAC, more MACs, hostname, state, cluster, document, created, updated, UUID,
# serial, asset tag, fixed_ipv4 and profile (columns of their own: sqlite.py migration 8).
BulkColumns = tuple[str, str | None, bool, str | None, str, str | None, str, float, float,
                    str | None, str | None, str | None, str | None, str | None]


def bulk_columns(machine: Machine) -> BulkColumns:
    """:data:`BulkColumns` of ``machine``, checked as :func:`stored_machine` checks it (a
    ValidationError names the field that would not read back)."""
    m = stored_machine(machine)
    # The values identity.claims gives after the MACs, cleaned the same way, without its
    # per-machine Identity and list of MAC strings (a sixth of encoding a bulk row).
    macs = m.macs
    return (m.id, str(macs[0]) if macs else None, len(macs) > 1, m.hostname, m.state._value_,
            m.cluster, machine_texts(m, claims=False)[0], m.created, m.updated,
            identity.clean_uuid(m.uuid),
            identity.clean_text(m.serial), identity.clean_text(m.asset), m.fixed_ipv4,
            m.profile)


def bulk_columns_of(machines: Sequence[Machine]) -> Iterator[BulkColumns]:
    """:func:`bulk_columns` of each of ``machines``; an import's :class:`NewMachines` are
    written from the values their rows were checked to."""
    if isinstance(machines, NewMachines):
        return machines.columns()
    return map(bulk_columns, machines)


_T = TypeVar("_T")


class _Indexed(Sequence[_T]):
    """A sequence read through :meth:`_at` (an item, by an index as a list takes it) and
    :meth:`_sliced` (a list): ``__getitem__`` and its typing overloads, written once."""

    __slots__ = ()

    def _at(self, index: int) -> _T:
        raise NotImplementedError

    def _sliced(self, index: slice) -> list[_T]:
        return list(self)[index]

    @overload
    def __getitem__(self, index: int) -> _T: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[_T]: ...
    def __getitem__(self, index: int | slice) -> _T | Sequence[_T]:
        if isinstance(index, slice):
            return self._sliced(index)
        return self._at(index)


class _MadeOnDemand(_Indexed[_T]):
    """A sequence of values made when read from what it holds (:meth:`_held`, each made by
    :meth:`_made`): a bulk import's 100,000 machines or events are never all made at once."""

    __slots__ = ()

    def _held(self) -> Sequence[Any]:
        raise NotImplementedError

    def _made(self, item: Any) -> _T:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._held())

    def _at(self, index: int) -> _T:
        return self._made(self._held()[index])

    def _sliced(self, index: slice) -> list[_T]:
        return [self._made(item) for item in self._held()[index]]

    def __iter__(self) -> Iterator[_T]:
        return map(self._made, self._held())


# A new machine's row in NewMachines: id, macs, hostname, uuid, serial, asset, cluster, role,
# profile, labels, fixed_ipv4.
_NewRow = tuple[str, tuple[MacAddress, ...], str | None, str | None, str | None, str | None,
                str | None, Role | None, str | None, Mapping[str, str], str | None]


class NewMachines(_MadeOnDemand[Machine]):
    """The new machines of a bulk import, all created at one time in one state, each kept as
    the values its row was checked to (``Enroller.import_rows``) rather than as a
    ``Machine``: nothing reads 100,000 frozen machines between the check and the store, and
    building them (22 attribute sets each) then checking them again field by field in the
    store was a third of an import's CPU.

    Read as a sequence it gives each machine as :func:`stored_machine` would (made on
    demand; the memory and PostgreSQL stores read it so, and SQLite's row-by-row replay that
    names a failing row). SQLite's bulk insert reads :meth:`columns`, which writes each
    document from the values directly.

    What :meth:`add` takes is trusted to be in stored form, as an import row's checks leave
    it: MACs parsed and distinct, text fields ``str`` (hostname checked, identifiers
    normalised and not placeholders), labels ``str`` to ``str``, ``fixed_ipv4`` canonical,
    ``id`` from :func:`netboot.model.new_machine_id`'s source. The state and time shared by
    all are checked here, once. Machines made otherwise (one merged with discovered records)
    go in by :meth:`add_machine` and are checked when written, as any machine is.
    """

    __slots__ = ("_rows", "_state", "_time")

    def __init__(self, state: MachineState, now: float) -> None:
        if type(state) is not MachineState:
            raise ValidationError("state", f"{state!r} is not a machine state")
        # An int time is read back as a float (machine_from_dict); anything else is refused.
        time = float(now) if type(now) is int else now
        if type(time) is not float or not math.isfinite(time):
            raise ValidationError("created", f"{now!r} is not a finite time")
        self._state = state
        self._time = time
        self._rows: list[_NewRow | Machine] = []

    def add(self, ident: str, macs: tuple[MacAddress, ...], hostname: str | None,
            uuid: str | None, serial: str | None, asset: str | None, cluster: str | None,
            role: Role | None, profile: str | None, labels: Mapping[str, str],
            fixed_ipv4: str | None) -> None:
        self._rows.append((ident, macs, hostname, uuid, serial, asset, cluster, role, profile,
                           labels, fixed_ipv4))

    def add_machine(self, machine: Machine) -> None:
        self._rows.append(machine)

    def rename(self, index: int, hostname: str) -> None:
        """Give the machine at ``index`` its hostname (a template's, for a row without)."""
        row = self._rows[index]
        if isinstance(row, Machine):
            self._rows[index] = dataclasses.replace(row, hostname=hostname)
        else:
            self._rows[index] = (row[0], row[1], hostname, *row[3:])

    def hostname(self, index: int) -> str | None:
        row = self._rows[index]
        return row.hostname if isinstance(row, Machine) else row[2]

    def ids(self) -> Iterator[str]:
        return (row.id if isinstance(row, Machine) else row[0] for row in self._rows)

    def refs(self) -> Iterator[str]:
        """Each machine's :attr:`Machine.ref` (its first MAC, else its id)."""
        for row in self._rows:
            macs, ident = (row.macs, row.id) if isinstance(row, Machine) else (row[1], row[0])
            yield macs[0].raw.hex(":") if macs else ident

    def _held(self) -> Sequence[_NewRow | Machine]:
        return self._rows

    def _made(self, row: _NewRow | Machine) -> Machine:
        if isinstance(row, Machine):
            return row
        now = self._time
        (ident, macs, hostname, uuid, serial, asset, cluster, role, profile, labels,
         fixed_ipv4) = row
        # Every field in Machine's order (machine_of_values: the values are as checked).
        return machine_of_values((macs, ident, self._state, hostname, uuid, serial, asset,
                                  labels, cluster, role, profile, None, None, None, None,
                                  fixed_ipv4, NO_ENTRIES, None, None, None, None, None, now,
                                  now))

    def sealed(self, seal: Callable[[Machine], Machine]) -> NewMachines:
        """These machines with ``seal`` applied to those added whole (an import's rows carry
        no install token)."""
        out = NewMachines(self._state, self._time)
        out._rows = [seal(row) if isinstance(row, Machine) else row for row in self._rows]
        return out

    def columns(self) -> Iterator[BulkColumns]:
        """:data:`BulkColumns` of each machine, in order. A row's document is written from
        its values, the fields an import sets in :func:`machine_json`'s order (the same
        text as ``machine_json`` of its machine, a test compares them), in a third less
        time than through a ``Machine``."""
        q = _quote
        state_value = self._state._value_
        now = self._time
        head = ',"state":' + q(state_value)
        tail = ',"created":' + float.__repr__(now) + ',"updated":' + float.__repr__(now) + "}"
        # The text fields a row has, as _TEXT_KEYS starts them (token_hash, install_token:
        # an import sets neither).
        keys = _TEXT_KEYS[:6]
        for row in self._rows:
            if isinstance(row, Machine):
                yield bulk_columns(row)
                continue
            (ident, macs, hostname, uuid, serial, asset, cluster, role, profile, labels,
             fixed_ipv4) = row
            if len(macs) == 1:
                one = macs[0].raw.hex(":")
                first: str | None = one
                text = '{"id":' + q(ident) + ',"macs":["' + one + '"]' + head
            else:
                first = macs[0].raw.hex(":") if macs else None
                text = ('{"id":' + q(ident) + ',"macs":['
                        + ",".join(['"' + mac.raw.hex(":") + '"' for mac in macs]) + "]" + head)
            for key, value in zip(keys, (hostname, uuid, serial, asset, cluster, profile),
                                  strict=True):
                if value is not None:
                    text += key + q(value)
            if role is not None:
                text += ',"role":' + q(role._value_)
            if labels:
                text += ',"labels":{' + ",".join([q(k) + ":" + q(v)
                                                   for k, v in labels.items()]) + "}"
            if fixed_ipv4 is not None:
                text += ',"fixed_ipv4":' + q(fixed_ipv4)
            yield (ident, first, len(macs) > 1, hostname, state_value, cluster, text + tail,
                   now, now, uuid, serial, asset, fixed_ipv4, profile)


class SharedMaps:
    """The labels (and facts) of machines decoded together, each distinct mapping kept
    once: a fleet's machines share a few label sets (a rack, a site), and a mapping is
    ~200 bytes a machine (18 MiB of a re-import that reads 100,000 machines to compare
    with). Safe because a Machine's mappings are never changed in place (they are
    ``Mapping``s; a change makes a new machine with a new mapping). Up to ``limit``
    distinct mappings are remembered; the others are kept as decoded.

    Their creation times too (:meth:`time`): a bulk import creates its machines at one
    time, and a view of 100,000 of them held 100,000 equal floats, 32 bytes a machine in
    Python's allocator (~3 MiB of the resident memory issue 10 bounds). An inventory
    imported in a few runs has a few times; a fleet enrolled one machine at a time has one
    each: the first ``times`` distinct ones are kept, the others stay as decoded."""

    __slots__ = ("_known", "_limit", "_times", "_times_limit")

    def __init__(self, limit: int = 4096, times: int = 256) -> None:
        self._known: dict[tuple[tuple[str, str], ...], Mapping[str, str]] = {}
        self._limit = limit
        self._times: dict[float, float] = {}
        self._times_limit = times

    def shared(self, value: Mapping[str, str] | None) -> Mapping[str, str] | None:
        if not value:
            return value  # None (refused) or the shared empty mapping
        return _once(self._known, tuple(value.items()), value, self._limit)

    def time(self, value: float) -> float:
        """``value``, or an equal float decoded before. Zero is left alone: 0.0 and -0.0
        are equal keys but two values."""
        if not value:
            return value
        return _once(self._times, value, value, self._times_limit)


def _once(known: dict[Any, _V], key: object, value: _V, limit: int) -> _V:
    """The value kept for ``key``, else ``value``, kept if fewer than ``limit`` are."""
    found = known.get(key)
    if found is not None:
        return found
    if len(known) < limit:
        known[key] = value
    return value


def _shared_map(value: object) -> Mapping[str, str] | None:
    if type(value) is not dict:
        return None
    out: dict[str, str] = {}
    for k, v in value.items():
        if type(k) is not str or type(v) is not str:
            return None
        out[_intern(k)] = _intern(v) if len(v) <= 32 else v
    return out


def _stored_mac(text: object) -> MacAddress | None:
    # The store writes aa:bb:cc:dd:ee:ff; anything else takes MacAddress.parse's long way.
    if type(text) is not str or len(text) != 17 or text.count(":") != 5 or text != text.lower():
        return None
    compact = text.replace(":", "")
    if len(compact) != 12 or compact.strip("0123456789abcdef"):
        return None
    return MacAddress(bytes.fromhex(compact))


def machine_from_document(data: object, maps: SharedMaps | None = None) -> Machine:
    """A machine from what a store wrote (:func:`machine_document` or
    :func:`machine_to_dict`): the same checks as :func:`machine_from_dict`, made in one pass
    over the fields a store writes; anything unusual (an unknown field, a MAC in another
    spelling, a wrong type) is handed to :func:`machine_from_dict`, which normalises it or
    names the field. Shared strings are interned (see ``_SHARED``); with ``maps``, labels
    and facts equal to those of a machine decoded before with the same ``maps`` are that
    machine's mapping (see :class:`SharedMaps`)."""
    machine = _document_machine(data, maps) if type(data) is dict else None
    return machine if machine is not None else machine_from_dict(data)


def _document_machine(d: dict[str, Any], maps: SharedMaps | None = None) -> Machine | None:
    # Every field read once by name, in one pass, and the machine built from its values in
    # field order (model.machine_of_values): a view loads 100,000 at start.
    if not d.keys() <= _MACHINE_FIELDS:
        return None
    get = d.get
    raw_macs = get("macs", ())
    if type(raw_macs) is not list:
        return None
    macs: list[MacAddress] = []
    for text in raw_macs:
        mac = _stored_mac(text)
        if mac is None or mac in macs:
            return None
        macs.append(mac)
    ident = get("id")
    if (type(ident) is not str or not ident.startswith(ID_PREFIX) or not ident.isprintable()
            or "/" in ident or ident != ident.strip()):
        return None
    (hostname, uuid, serial, asset, cluster, profile, token_hash, install_token,
     secret_hash) = texts = (
        get("hostname"), get("uuid"), get("serial"), get("asset"), get("cluster"),
        get("profile"), get("token_hash"), get("install_token"), get("secret_hash"))
    for text in texts:
        if text is not None and type(text) is not str:
            return None
    # Shared by thousands of machines: one copy each (see _SHARED).
    if cluster is not None:
        cluster = _intern(cluster)
    if profile is not None:
        profile = _intern(profile)
    try:
        state = _STATES[get("state", "enrolled")]
        role = _ROLES[get("role")]
        loader = _LOADERS[get("loader")]
        arch = _ARCHES[get("arch")]
        firmware = _FIRMWARES[get("firmware")]
    except (KeyError, TypeError):  # TypeError: a list or an object is not hashable
        return None
    labels, facts = _entries(get("labels", _ABSENT)), _entries(get("facts", _ABSENT))
    if maps is not None:
        labels, facts = maps.shared(labels), maps.shared(facts)
    if labels is None or facts is None:
        return None
    ipv4, fixed_ipv4 = get("ipv4"), get("fixed_ipv4")
    if (ipv4 is not None and not _canonical_ipv4(ipv4)) \
            or (fixed_ipv4 is not None and not _canonical_ipv4(fixed_ipv4)):
        return None
    created, updated, expires, since = (_stored_time(get("created", 0.0)),
                                        _stored_time(get("updated", 0.0)),
                                        _stored_time(get("token_expires")),
                                        _stored_time(get("state_since")))
    if created is None or updated is None or created is _NOT_A_TIME \
            or updated is _NOT_A_TIME or expires is _NOT_A_TIME or since is _NOT_A_TIME:
        return None
    if maps is not None:
        created = maps.time(created)
    if updated == created:
        # Never changed since it was enrolled (a bulk import's machines): one float object
        # for both times, 24 bytes less a machine in a process holding the inventory.
        updated = created
    if since and since == updated:
        since = updated  # its state changed at its last update: one float for both
    return machine_of_values((
        tuple(macs), ident, state, hostname, uuid, serial, asset, labels, cluster, role,
        profile, loader, arch, firmware, ipv4, fixed_ipv4, facts, token_hash, expires,
        install_token, secret_hash, since, created, updated))


# Enum members by value, None for an absent field (a member of these is never None).
_STATES: dict[Any, MachineState] = _MEMBERS[MachineState]
_ROLES: dict[Any, Role | None] = {None: None, **_MEMBERS[Role]}
_LOADERS: dict[Any, LoaderChain | None] = {None: None, **_MEMBERS[LoaderChain]}
_ARCHES: dict[Any, Arch | None] = {None: None, **_MEMBERS[Arch]}
_FIRMWARES: dict[Any, Firmware | None] = {None: None, **_MEMBERS[Firmware]}
_NOT_A_TIME: Any = object()


def _entries(value: object) -> Mapping[str, str] | None:
    # Absent or {}: the shared empty mapping; null, [] or any other type: None, for
    # machine_from_dict to name.
    if value is _ABSENT or (type(value) is dict and not value):
        return NO_ENTRIES
    return _shared_map(value)


def _stored_time(value: object) -> Any:
    """A stored time as a finite float; None stays None (``token_expires``), anything else
    (a bool, text, NaN) is _NOT_A_TIME, for machine_from_dict to name."""
    if type(value) is float:
        return value if math.isfinite(value) else _NOT_A_TIME
    if type(value) is int:
        return float(value)
    return None if value is None else _NOT_A_TIME


# --- profiles -----------------------------------------------------------------------------


def profile_to_dict(profile: Profile) -> dict[str, Any]:
    return {
        "name": profile.name,
        "kernel": profile.kernel,
        "initrds": list(profile.initrds),
        "cmdline": profile.cmdline,
        "config_template": profile.config_template,
        "assets": [{"path": a.path, "sha256": a.sha256} for a in profile.assets],
        "install_device": profile.install_device,
        "iso_url": profile.iso_url,
        "ssh_authorized_keys": list(profile.ssh_authorized_keys),
        "fdtdir": profile.fdtdir,
        "loader": None if profile.loader is None else profile.loader.value,
        "description": profile.description,
        "install_timeout": profile.install_timeout,
    }


def _asset_from_dict(data: object, prefix: str) -> Asset:
    d = _object(data, prefix.rstrip("."))
    _fields(d, _ASSET_FIELDS, prefix)
    return Asset(path=_name(d, "path", prefix), sha256=_opt_str(d, "sha256", prefix))


def profile_from_dict(data: object) -> Profile:
    """Strict parse; ``name`` and ``kernel`` are required."""
    d = _object(data, "profile")
    _fields(d, _PROFILE_FIELDS, "")
    raw_assets = d.get("assets", [])
    if not isinstance(raw_assets, list | tuple):
        raise ValidationError("assets", f"must be an array of objects, got {_type(raw_assets)}")
    defaults = Profile(name="-", kernel="-")
    return Profile(
        name=_name(d, "name"),
        kernel=_name(d, "kernel"),
        initrds=_str_tuple(d, "initrds"),
        cmdline=_str(d, "cmdline", default=defaults.cmdline),
        config_template=_str(d, "config_template", default=defaults.config_template),
        assets=tuple(_asset_from_dict(a, f"assets[{i}].") for i, a in enumerate(raw_assets)),
        install_device=_str(d, "install_device", default=defaults.install_device),
        iso_url=_opt_str(d, "iso_url"),
        ssh_authorized_keys=_str_tuple(d, "ssh_authorized_keys"),
        fdtdir=_opt_str(d, "fdtdir"),
        loader=_opt_enum(d, "loader", LoaderChain),
        description=_str(d, "description", default=""),
        install_timeout=_install_timeout(d),
    )


def profile_json(profile: Profile) -> str:
    """The text the SQL stores keep for ``profile`` (sqlite.py's and postgres.py's
    put_profile): its dict, read back first so that what a read of it would refuse is
    refused before it is written, not found by the next reader."""
    data = profile_to_dict(profile)
    profile_from_dict(data)
    return dumps(data, "profile")


def _install_timeout(d: Mapping[str, Any]) -> int | None:
    value = d.get("install_timeout")
    if value is None:
        return None
    # JSON has one number type: 600.0 is the integer 600 (JSON Schema's "integer" takes it,
    # and so does the OpenAPI document; schemathesis sends such a value).
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    # bool is an int in Python; "true" is not a number of seconds.
    if isinstance(value, bool) or not isinstance(value, int) or not 60 <= value <= 7 * 86_400:
        raise ValidationError("install_timeout", "seconds an install may take: an integer "
                                                 "from 60 to 604800, or null for the server's "
                                                 "enroll.token_ttl_seconds")
    return value


# --- clusters -----------------------------------------------------------------------------


def cluster_to_dict(cluster: Cluster, *, secrets: bool = True) -> dict[str, Any]:
    """``secrets=False`` leaves out the join ``token`` and the k3s CA (never listed by the
    API) and names the CA by ``ca_hash``, the hash its secure token carries (None without
    one): what ``curl -sk https://<server>:6443/cacerts | sha256sum`` prints."""
    out: dict[str, Any] = {
        "name": cluster.name,
        "server_url": cluster.server_url,
        "token": cluster.token,
        "labels": dict(cluster.labels),
        "taints": list(cluster.taints),
        "description": cluster.description,
        "endpoint": cluster.endpoint,
    }
    if not secrets:
        del out["token"]
        out["ca_hash"] = k3s_ca_hash(cluster.ca_cert) if cluster.ca_cert else None
        return out
    if cluster.ca_cert or cluster.ca_key:
        # Only where there is one: documents of clusters without stay as they were.
        out["ca_cert"] = cluster.ca_cert
        out["ca_key"] = cluster.ca_key
    if cluster.agent_token:  # as the CA: only where there is one
        out["agent_token"] = cluster.agent_token
    return out


def cluster_from_dict(data: object) -> Cluster:
    """Strict parse; only ``name`` is required."""
    d = _object(data, "cluster")
    _fields(d, _CLUSTER_FIELDS, "")
    return Cluster(
        name=_name(d, "name"),
        server_url=_str(d, "server_url", default="managed"),
        token=_str(d, "token", default=""),
        labels=_str_map(d, "labels"),
        taints=_str_tuple(d, "taints"),
        description=_str(d, "description", default=""),
        endpoint=_endpoint(d),
        ca_cert=_str(d, "ca_cert", default=""),
        ca_key=_str(d, "ca_key", default=""),
        agent_token=_str(d, "agent_token", default=""),
    )


def _endpoint(d: Mapping[str, Any]) -> str | None:
    # Documents written before clusters had an endpoint have no key: None, nothing to migrate.
    text = _opt_str(d, "endpoint")
    return check_endpoint(text) if text else None


# --- groups -------------------------------------------------------------------------------


def group_to_dict(group: Group) -> dict[str, Any]:
    return {
        "name": group.name,
        "selector": {k: list(v) for k, v in group.selector.items()},
        "profile": group.profile,
        "cluster": group.cluster,
        "role": None if group.role is None else group.role.value,
        "labels": dict(group.labels),
        "taints": list(group.taints),
        "hostname_template": group.hostname_template,
        "loader": None if group.loader is None else group.loader.value,
    }


def group_from_dict(data: object) -> Group:
    """Strict parse; ``name`` is required; selector values are arrays of strings."""
    d = _object(data, "group")
    _fields(d, _GROUP_FIELDS, "")
    selector = _object(d.get("selector", {}), "selector")
    return Group(
        name=_name(d, "name"),
        selector={k: _str_list(v, f"selector.{k}") for k, v in selector.items()},
        profile=_opt_str(d, "profile"),
        cluster=_opt_str(d, "cluster"),
        role=_opt_enum(d, "role", Role),
        labels=_str_map(d, "labels"),
        taints=_str_tuple(d, "taints"),
        hostname_template=_opt_str(d, "hostname_template"),
        loader=_opt_enum(d, "loader", LoaderChain),
    )


def group_json(group: Group) -> str:
    """The text the SQL stores keep for ``group``, read back first as :func:`profile_json`."""
    data = group_to_dict(group)
    group_from_dict(data)
    return dumps(data, "group")


# --- events -------------------------------------------------------------------------------


def event_to_dict(event: Event) -> dict[str, Any]:
    return {
        "machine": event.machine,
        "time": event.time,
        "kind": event.kind,
        "message": event.message,
        "data": dict(event.data),
    }


def event_from_dict(data: object) -> Event:
    """Strict parse; ``machine``, ``time`` and ``kind`` are required; ``data`` must be JSON."""
    d = _object(data, "event")
    _fields(d, _EVENT_FIELDS, "")
    payload = dict(_object(d.get("data", {}), "data"))
    dumps(payload, "data")  # refuse what a JSON store could not keep
    return Event(
        machine=_name(d, "machine"),
        time=_float(d, "time"),
        kind=_name(d, "kind"),
        message=_str(d, "message", default=""),
        data=payload,
    )


def stored_event(event: Event, copy: bool = True) -> tuple[Event, str]:
    """``event`` as a store reads it back, and its data as JSON text: checked in place when it
    carries no data (the bulk import's 100,000 "enrolled" events) or text only (the boot
    path's), else the round trip of :func:`event_from_dict`, which names what it refuses.

    ``copy=False``: an event with text-only data is given back itself, not copied: its
    machine, time, kind and message are the objects a copy would hold and its data equal to
    the copy's, for a reader done with it before its caller may change that dict (a store's
    synchronous listeners, see ``EventListener.holding``)."""
    e = event
    if (type(e.machine) is str and e.machine.strip() and type(e.time) is float
            and math.isfinite(e.time) and type(e.kind) is str and e.kind.strip()
            and type(e.message) is str and type(e.data) is dict):
        if (text := e.data_text) is not None:
            # Its maker wrote it with the data (BootService._new_event's boot events):
            # not checked and quoted pair by pair again (~17,000 of the event loop's
            # instructions a first install, benchmarks/README.md s43-install).
            return (Event(e.machine, e.time, e.kind, e.message, dict(e.data), text) if copy
                    else e), text
        if not e.data:
            return e, "{}"
        data = dict(e.data) if copy else e.data
        q, keyed = _quote, _QUOTED_KEYS.get
        pairs = []
        for k, v in data.items():
            if type(k) is not str or type(v) is not str:
                break
            # The boot path's keys quoted once (_QUOTED_KEYS): ~6,000 instructions less an
            # event of five pairs (on the event loop when a listener holds the events).
            pairs.append((keyed(k) or q(k) + ":") + q(v))
        else:
            # Text to text (the boot path's events: via, firmware, arch, MAC, peer): what
            # the round trip gives back, its data encoded once instead of twice, and
            # written out as _ENCODE writes it (a JSON encoder set up per call was half of
            # this; on the event loop for every event of a group commit).
            text = "{" + ",".join(pairs) + "}"
            return (Event(e.machine, e.time, e.kind, e.message, data) if copy else e), text
    value = event_from_dict(event_to_dict(e))
    return value, dumps(dict(value.data), "data")


class EventRun(_MadeOnDemand[Event]):
    """One event, with no data, of each of many machines, in their order: a bulk import's
    100,000 "enrolled: imported" events, kept as their machine ids rather than as events.

    Read as a sequence it gives each :class:`Event` (made on demand: the memory and
    PostgreSQL stores, a listener, the recorder read it so); SQLite writes a run with one
    statement (``INSERT … SELECT`` over the ids) instead of a bound statement per event,
    where those per-event steps were most of the events' cost. The time, kind and message
    shared by all are checked here, once, as :func:`stored_event` checks an event; the ids
    by :func:`run_ids` as SQLite writes them (the other stores read them as events).
    """

    __slots__ = ("kind", "machines", "message", "time")

    def __init__(self, machines: Sequence[str], time: float, kind: str, message: str) -> None:
        when = float(time) if type(time) is int else time
        if type(when) is not float or not math.isfinite(when):
            raise ValidationError("time", f"{time!r} is not a finite time")
        if type(kind) is not str or not kind.strip():
            raise ValidationError("kind", "required")
        if type(message) is not str:
            raise ValidationError("message", "must be text")
        self.machines = machines
        self.time: float = when
        self.kind = kind
        self.message = message

    def _held(self) -> Sequence[str]:
        return self.machines

    def _made(self, machine: str) -> Event:
        return Event(machine, self.time, self.kind, self.message, {})


class Events(_Indexed[Event]):
    """Sequences of events one after another, each kept as it is (an :class:`EventRun`
    stays a run): what :func:`joined` makes of a batch's events and those queued before."""

    __slots__ = ("_parts",)

    def __init__(self, *parts: Sequence[Event]) -> None:
        self._parts = tuple(p for p in parts if len(p))

    def __len__(self) -> int:
        return sum(map(len, self._parts))

    def _at(self, index: int) -> Event:
        if index < 0:
            index += len(self)
        for part in self._parts:
            if 0 <= index < len(part):
                return part[index]
            index -= len(part)
        raise IndexError("event index out of range")

    def __iter__(self) -> Iterator[Event]:
        for part in self._parts:
            yield from part

    def parts(self) -> tuple[Sequence[Event], ...]:
        return self._parts


def joined(*parts: Sequence[Event]) -> Sequence[Event]:
    """``parts`` one after another: a list, as before, unless one holds a run, which is kept."""
    if any(isinstance(p, EventRun | Events) for p in parts):
        return Events(*parts)
    return [e for p in parts for e in p]


def event_parts(events: Sequence[Event], copy: bool = True,
                ) -> Iterator[EventRun | Iterator[tuple[Event, str]]]:
    """``events`` in order: its runs as they are, the other events each with its data's JSON
    (:func:`stored_event`, copied or not as ``copy`` says), checked as they are read."""
    parts = events.parts() if isinstance(events, Events) else (events,)
    for part in parts:
        if isinstance(part, EventRun):
            yield part
        elif isinstance(part, Events):
            yield from event_parts(part, copy)
        else:
            yield map(stored_event, part) if copy else map(
                stored_event, part, itertools.repeat(False))


def event_sayings(events: Sequence[Event]) -> Iterator[tuple[str, tuple[str, str]]]:
    """Each event's machine and (kind, message), in order, without making a run's events."""
    parts = events.parts() if isinstance(events, Events) else (events,)
    for part in parts:
        if isinstance(part, EventRun):
            said = (part.kind, part.message)
            for machine in part.machines:
                yield machine, said
        elif isinstance(part, Events):
            yield from event_sayings(part)
        else:
            for event in part:
                yield event.machine, (event.kind, event.message)


def run_ids(run: EventRun, size: int) -> Iterator[str]:
    """The machine ids of ``run``, ``size`` at a time, as JSON arrays, each id checked as
    :func:`stored_event` checks an event's machine."""
    ids = run.machines
    for start in range(0, len(ids), size):
        chunk = list(ids[start:start + size])
        for ident in chunk:
            if type(ident) is not str or not ident.strip():
                raise ValidationError("machine", "required")
        yield json.dumps(chunk)


# --- leases -------------------------------------------------------------------------------


def lease_to_dict(lease: Lease) -> dict[str, Any]:
    return {
        "mac": lease.mac,
        "ipv4": lease.ipv4,
        "expires": lease.expires,
        "hostname": lease.hostname,
    }


def lease_from_dict(data: object) -> Lease:
    """Strict parse; ``mac``, ``ipv4`` and ``expires`` are required."""
    d = _object(data, "lease")
    _fields(d, _LEASE_FIELDS, "")
    ipv4 = _ipv4(_str(d, "ipv4"), "ipv4")
    assert ipv4 is not None  # _str never returns None
    return Lease(
        mac=normalise_mac(_str(d, "mac")),
        ipv4=ipv4,
        expires=_float(d, "expires"),
        hostname=_opt_str(d, "hostname"),
    )


def token_to_dict(token: ApiToken) -> dict[str, Any]:
    return {"name": token.name, "sha256": token.sha256, "scope": str(token.scope),
            "created": token.created, "expires": token.expires, "last_used": token.last_used}


def token_from_dict(data: object) -> ApiToken:
    """Strict parse; ``name``, ``sha256``, ``scope`` and ``created`` are required."""
    d = _object(data, "token")
    _fields(d, _TOKEN_FIELDS, "")
    return ApiToken(name=_name(d, "name"), sha256=_name(d, "sha256"),
                    scope=_enum(d.get("scope"), Scope, "scope"), created=_float(d, "created"),
                    expires=_opt_float(d, "expires"), last_used=_opt_float(d, "last_used"))


# The api_tokens columns in the order token_from_row reads them (SQLite and PostgreSQL alike).
TOKEN_COLUMNS = "name, sha256, scope, created, expires, last_used"


def token_from_row(row: Sequence[Any]) -> ApiToken:
    """A row of ``SELECT {TOKEN_COLUMNS}``, strictly parsed as :func:`token_from_dict`."""
    return token_from_dict(dict(zip(TOKEN_COLUMNS.split(", "), row, strict=True)))


def audit_to_dict(entry: AuditEntry) -> dict[str, Any]:
    return {"time": entry.time, "actor": entry.actor, "action": entry.action,
            "target": entry.target, "peer": entry.peer, "outcome": entry.outcome}


def audit_from_dict(data: object) -> AuditEntry:
    """Strict parse; every field is required (``target`` and ``peer`` may be empty)."""
    d = _object(data, "audit entry")
    _fields(d, _AUDIT_FIELDS, "")
    return AuditEntry(time=_float(d, "time"), actor=_name(d, "actor"),
                      action=_name(d, "action"), target=_str(d, "target"),
                      peer=_str(d, "peer"), outcome=_name(d, "outcome"))
