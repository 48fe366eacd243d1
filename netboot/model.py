"""Frozen values shared by every layer: addresses, machines, profiles, clusters, boot plans.

Nothing here does I/O. Validation that needs only the value itself lives here (a MAC parses or
it does not); validation that needs the inventory (a cluster exists) lives in ``enroll.py``.
"""

from __future__ import annotations

import enum
import ipaddress
import operator
import os
import re
import secrets
import types
import uuid as uuidlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING as _MISSING
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol, TypeVar, overload
from urllib.parse import urlsplit, urlunsplit

from netboot.errors import ValidationError

_C = TypeVar("_C")

try:
    # Exported (the alias) to render.py too.
    from mypy_extensions import mypyc_attr as mypyc_attr  # noqa: PLC0414
except ImportError:  # installed with mypy, which only the compiled build needs
    def mypyc_attr(*attrs: str, **kwattrs: object) -> Callable[[_C], _C]:
        """mypyc's class marks (setup.py's compiled build), nothing without mypyc."""
        return lambda cls: cls

_HEX = re.compile(r"^[0-9a-f]{12}$")
_DNS_NAME = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*\.?$")
_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:/\[\]]+))(?::(?P<port>\d{1,5}))?$")


# A subclass of bytes: mypyc makes no native class of one (setup.py's compiled build keeps it a
# Python class, its methods compiled).
@mypyc_attr(native_class=False)
class MacAddress(bytes):
    """A 48-bit Ethernet address, normalised whatever form it came in.

    Accepted: ``aa:bb:cc:dd:ee:ff``, ``AA-BB-CC-DD-EE-FF``, ``aabb.ccdd.eeff`` (Cisco),
    ``aabbccddeeff`` and pxelinux's ``01-aa-bb-...`` (ARP type prefix).

    Its six bytes themselves (``raw`` is the address): one object, not a frozen dataclass
    holding a ``bytes``; with 100,000 machines in the view, 3 MiB less. Equal to, and hashed
    as, its bytes, so the view's index finds a machine by either; immutable like any bytes.
    """

    __slots__ = ()

    @overload
    def __new__(cls, raw: bytes) -> MacAddress: ...
    @overload
    def __new__(cls, raw: bytearray | memoryview) -> MacAddress: ...

    # Typed for callers by the overloads; the implementation takes any object (compiled, a
    # ``bytes`` argument is checked on the way in: a TypeError, not the ValidationError below).
    def __new__(cls, raw: object) -> MacAddress:
        if isinstance(raw, bytes) and len(raw) == 6:  # a DHCP request's: one check, not three
            return bytes.__new__(cls, raw)
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise ValidationError("mac", f"a MAC address is bytes, got {type(raw).__name__}")
        if len(raw) != 6:
            raise ValidationError("mac", f"a MAC address has 6 bytes, got {len(raw)}")
        return bytes.__new__(cls, raw)

    @property
    def raw(self) -> bytes:
        return self

    def __repr__(self) -> str:
        return f"MacAddress(raw={bytes(self)!r})"

    @classmethod
    def parse(cls, text: str) -> MacAddress:
        if not isinstance(text, str):
            raise ValidationError("mac", "must be a string such as aa:bb:cc:dd:ee:ff")
        s = text.strip().lower()
        if len(s) == 17 and s[2::3] in (":::::", "-----"):
            # The usual spellings, without the general checks below (a bulk import parses
            # 100,000 of them, every /ipxe and /config request one). Twelve characters that
            # bytes.fromhex reads as six bytes are twelve hex digits (it skips whitespace
            # only between whole bytes): _HEX's test without the expression's match, and
            # the value made as __new__ makes one of six bytes, without its call (~3,400
            # of a first install's loop instructions; callgrind, s33-loop).
            try:
                raw = bytes.fromhex(s.replace(s[2], ""))
            except ValueError:
                pass  # the general checks say why
            else:
                if len(raw) == 6:
                    return bytes.__new__(cls, raw)
        # pxelinux.cfg/01-<mac>: "01" is the ARP hardware type of Ethernet.
        if len(s) == 20 and s.startswith("01-"):
            s = s[3:]
        compact = s.replace(":", "").replace("-", "").replace(".", "")
        seps = {c for c in s if c in ":-."}
        if len(seps) > 1 or not _HEX.match(compact):
            raise ValidationError(
                "mac", f"{text!r} is not a MAC address (use aa:bb:cc:dd:ee:ff)"
            )
        if seps:
            sep = seps.pop()
            groups = s.split(sep)
            sizes = {len(g) for g in groups}
            if not ((len(groups) == 6 and sizes == {2}) or (sep == "." and sizes == {4})):
                raise ValidationError(
                    "mac", f"{text!r} is not a MAC address (use aa:bb:cc:dd:ee:ff)"
                )
        return cls(bytes.fromhex(compact))

    def __str__(self) -> str:
        return self.hex(":")

    @property
    def hexhyp(self) -> str:
        """``aa-bb-cc-dd-ee-ff``: iPXE's ``${netX/mac:hexhyp}`` and the form used in URLs."""
        return self.hex("-")

    @property
    def hexraw(self) -> str:
        return self.hex()

    @property
    def suffix(self) -> str:
        """Last three bytes as hex, for hostname templates (``{mac_suffix}``)."""
        return self[3:].hex()

    @property
    def oui(self) -> str:
        return self[:3].hex(":")


class Arch(enum.StrEnum):
    """CPU architecture of a client, derived from DHCP option 93 or iPXE's ``${buildarch}``."""

    X86 = "x86"
    X86_64 = "x86_64"
    ARM32 = "arm32"
    ARM64 = "arm64"
    RISCV64 = "riscv64"
    UNKNOWN = "unknown"


class Firmware(enum.StrEnum):
    """What is asking: the first stage that speaks to us decides what we can hand it."""

    BIOS = "bios"  # legacy PXE ROM (arch 0, not iPXE)
    UEFI = "uefi"  # UEFI PXE (PxeBcDxe)
    UEFI_HTTP = "uefi-http"  # UEFI HTTP boot (HttpBootDxe, option 60 HTTPClient)
    IPXE = "ipxe"  # iPXE, as ROM or chainloaded (option 77 "iPXE" / option 175)
    UBOOT = "uboot"  # U-Boot (option 60 "U-Boot.*")
    RPI = "rpi"  # Raspberry Pi bootloader (option 43/97 or OUI)
    UNKNOWN = "unknown"


class LoaderChain(enum.StrEnum):
    """The first-stage chain a UEFI machine is given (the rest of the boot is the same).

    ``ipxe``: snponly.efi/ipxe.efi, then netboot's iPXE script (Debian does not sign iPXE, so
    firmware enforcing Secure Boot refuses it). ``shim-grub``: shim (signed by Microsoft's UEFI
    CA) loads GRUB and GRUB the kernel, each signed by Debian, then netboot's grub.cfg.
    """

    IPXE = "ipxe"
    SHIM_GRUB = "shim-grub"


class MachineState(enum.StrEnum):
    DISCOVERED = "discovered"
    ENROLLED = "enrolled"
    BOOTING = "booting"
    INSTALLING = "installing"
    INSTALLED = "installed"
    REGISTERED = "registered"
    FAILED = "failed"
    REINSTALL = "reinstall"


class Role(enum.StrEnum):
    SERVER = "server"
    AGENT = "agent"


class BootAction(enum.StrEnum):
    INSTALL = "install"  # kernel + initrd + cmdline of the machine's profile
    LOCAL = "local"  # boot the local disk (iPXE ``exit``, pxelinux ``localboot``)
    HOLD = "hold"  # unknown machine waiting for approval: retry later
    IGNORE = "ignore"  # stay silent / tell the firmware nothing


@dataclass(frozen=True, slots=True)
class Event:
    """One step in a machine's life, recorded with its time (seconds since the epoch).

    ``machine`` is the machine's id (:attr:`Machine.id`), not a MAC: a machine has several NICs
    or none known yet, and its history follows it whichever NIC it booted from.

    ``data_text``: ``data`` as the JSON text a store writes (codec.stored_event's), made by
    the maker that made ``data`` and gives it away unchanged (BootService._new_event), so
    that no store encodes it again: a first ``/ipxe`` install's event of five pairs was
    ~17,000 instructions of the event loop in codec.stored_event (benchmarks/README.md
    s42-install, s43-install). None (as a rule): the store encodes ``data``. Not compared
    nor shown: the same event either way. An event made from another with other data
    (``dataclasses.replace``) must not keep it.
    """

    machine: str
    time: float
    kind: str
    message: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)
    data_text: str | None = field(default=None, compare=False, repr=False)


def equal(a: object, b: object) -> bool:
    """``a == b`` as Python compares them, in either build. Where both sides are typed as one
    Python class that a compiled module declares (``Machine``, whose ``__eq__`` dataclasses
    writes as the module runs; ``MacAddress``, whose ``__eq__`` is bytes'), setup.py's
    mypyc build compiles ``==`` and ``!=`` as ``is``: mypyc finds no ``__eq__`` in the
    class's body and takes object's (mypy 2.4's ``translate_eq_cmp``). Typed ``object``
    here, they are compared by the values' own ``__eq__``. Found in session 32: two fetches
    of one config at once answered one of them 409 in the compiled build only
    (Content.config_fetched compared a machine with the one read again by ``!=``)."""
    return a == b


ID_PREFIX = "m-"


def new_machine_id() -> str:
    """A fresh machine id: ``m-`` and 12 hex digits.

    The ``m-`` prefix keeps an id from ever parsing as a MAC (12 hex digits alone would), so
    that ``/machines/{ref}`` and ``netboot explain REF`` can take either without ambiguity.
    """
    return ID_PREFIX + secrets.token_hex(6)


# The labels or facts of a machine that has none, shared by every such machine a store reads
# (100,000 empty dicts are 6 MiB). Read-only, so that sharing it cannot leak a change.
NO_ENTRIES: Mapping[str, str] = types.MappingProxyType({})

# The fields a machine leaves at None until it first boots or is given an install (its
# firmware's arch and kind, its address, its install token, what its firmware and OS told
# of it), or that few machines ever set (an asset tag, a loader chain, a fixed address): 10 of
# Machine's 22, each with the value it has until then (facts: any empty mapping, read back as
# NO_ENTRIES). A machine with each of them so is of the compact layout (they are class
# attributes there, read as fast as a slot); one with any other, of the whole layout
# (_two_layouts). With 100,000 machines enrolled and not yet
# booted (issue 10's storm), 80 bytes less each: ~7.6 MiB.
_SELDOM_SET: dict[str, Any] = {
    "asset": None, "loader": None, "arch": None, "firmware": None, "ipv4": None,
    "fixed_ipv4": None, "facts": NO_ENTRIES, "token_hash": None, "token_expires": None,
    "install_token": None, "secret_hash": None, "state_since": None}


def _two_layouts(cls: type[_C], compact: type[_C], whole: type[_C]) -> None:
    """Give the frozen dataclass ``cls`` (declared with ``__slots__ = ()``: its fields are
    class attributes there, their defaults) its two layouts: ``compact``, a subclass with a
    slot for each field but those of :data:`_SELDOM_SET` (read from ``cls``: its value
    there), and
    ``whole``, a subclass of ``compact`` with their slots. ``cls(...)``,
    :func:`machine_of_values` and ``dataclasses.replace`` make the compact one when those
    fields are all None, else the whole one: equal values are of the same class
    (dataclasses' ``__eq__`` compares classes first). What dataclasses' ``slots=True``
    does, with two layouts; ``cls`` itself has no instance. (Declared in the module, not
    made here: setup.py's mypyc build checks an argument typed ``Machine`` against the
    classes it knows.)"""
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    seldom = tuple(n for n in names if n in _SELDOM_SET)
    for name in seldom:
        setattr(cls, name, _SELDOM_SET[name])  # a factory's field has no class attribute
    # One constructor for both, choosing the layout by the values; ``__init__`` is object's
    # (dataclasses' would set each field again, and has no slot to set a seldom one in).
    params, lines = [], []
    scope: dict[str, Any] = {"_missing": _MISSING}
    for i, f in enumerate(fields(cls)):  # type: ignore[arg-type]
        if f.default is not _MISSING:
            scope[f"d{i}"] = f.default
            params.append(f"{f.name}=d{i}")
        else:
            scope[f"f{i}"] = f.default_factory
            params.append(f"{f.name}=_missing")
            lines.append(f"    if {f.name} is _missing:\n        {f.name} = f{i}()")
    lines.append("    return of_values((" + ", ".join(names) + ",))")
    of_values = scope["of_values"] = _layouts_of_values(compact, whole, names, seldom)
    exec(f"def __new__(cls, {', '.join(params)}):\n" + "\n".join(lines), scope)  # noqa: S102
    new = scope["__new__"]
    new.__qualname__ = f"{cls.__qualname__}.__new__"
    new.__module__ = cls.__module__
    klass: Any = cls
    del klass.__init__
    klass.__new__ = new
    klass._of_values = staticmethod(of_values)
    for layout in (compact, whole):
        layout.__name__, layout.__qualname__ = cls.__name__, cls.__qualname__


def _without_slots_field(cls: type[_C]) -> type[_C]:
    """``cls`` as dataclasses makes it from its declaration. setup.py's mypyc build records
    every class attribute of a Python class in its ``__annotations__``, ``__slots__`` too,
    which dataclasses then takes for a field: here it is dropped and the class made again
    from its declared fields (the methods dataclasses wrote removed first, as it writes
    none over a class's own)."""
    declared: dict[str, Any] = getattr(cls, "__dataclass_fields__", {})
    if "__slots__" not in declared:
        return cls
    klass: Any = cls
    for name in ("__init__", "__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__",
                 "__match_args__", "__dataclass_fields__", "__dataclass_params__"):
        if name in klass.__dict__:
            delattr(klass, name)
    klass.__annotations__ = {k: v for k, v in klass.__annotations__.items()
                             if k != "__slots__"}
    for name, declaration in declared.items():
        if name != "__slots__":
            setattr(klass, name, declaration)  # the Field: its default, factory, repr
    made: type[_C] = dataclass(frozen=True)(klass)  # the same class
    return made


def _twin(cls: type[Any]) -> type[Any] | None:
    """A class of ``cls``'s own layout whose instances take plain attribute stores, or None
    where Python refuses one (a mypyc native class, setup.py's compiled build, is no base of
    a Python class). A frozen value is filled in its twin, then given ``cls`` by
    ``__class__`` assignment (allowed between two classes of one layout: the twin adds no
    slot), frozen from then on. Why: the frozen dataclass's ``__setattr__`` refuses every
    store, so each slot was set through its descriptor's ``__set__`` method-wrapper, ~600
    instructions a field (a first ``/ipxe`` install made ~84 such stores, ~8 % of the
    loop's instructions, session 28); the twin's ``__setattr__`` and ``__delattr__`` are
    ``object``'s (both: either one of Python's own makes every store a call of it), so its
    stores are STORE_ATTR's specialised slot store, ~20. A whole-layout Machine, built
    alone: 18,400 -> 5,250 instructions (callgrind); the ``__class__`` assignment ~700 of
    those."""
    try:
        twin = type(cls.__name__, (cls,), {
            "__slots__": (), "__setattr__": object.__setattr__,
            "__delattr__": object.__delattr__, "__module__": cls.__module__,
            "__qualname__": cls.__qualname__})
        probe: Any = object.__new__(twin)
        probe.__class__ = cls
    except TypeError:
        return None
    return twin


def _layouts_of_values(compact: Any, whole: Any, names: list[str], seldom: tuple[str, ...]
                       ) -> Callable[[Sequence[Any]], Any]:
    """:func:`_of_values` for :func:`_two_layouts`' pair: the compact layout when the
    seldom-set fields are all None. Each filled in its :func:`_twin` (both layouts are
    Python classes in every build: Machine is no native class)."""
    count = len(names)
    twins = _twin(compact), _twin(whole)
    if None in twins:
        raise TypeError(f"{compact.__name__}'s layouts take no twin")
    scope: dict[str, Any] = {"new": object.__new__, "compact": compact, "whole": whole,
                             "tcompact": twins[0], "twhole": twins[1]}
    # Every value unpacked at once (the length is checked first), stored in declaration
    # order; the compact layout's seldom-set values (its class attributes) dropped.
    every = ", ".join(f"m.{name}" for name in names)
    common = ", ".join("_" if name in seldom else f"m.{name}" for name in names)
    # None, or (facts) any empty mapping: read back as NO_ENTRIES, equal to it. By value,
    # not by identity: equal machines must be of the same layout.
    scope["Mapping"] = Mapping
    test = " and ".join(
        f"values[{i}] is None" if _SELDOM_SET[names[i]] is None else
        f"(values[{i}] is v{i} or (not values[{i}] and isinstance(values[{i}], Mapping)))"
        for i in map(names.index, seldom))
    scope.update({f"v{names.index(n)}": _SELDOM_SET[n] for n in seldom})

    def wrong(values: Sequence[Any]) -> ValueError:
        return ValueError(f"a {compact.__name__} has {count} fields, {len(values)} given")

    scope["wrong"] = wrong
    exec("def of_values(values):\n"  # noqa: S102
         f"    if len(values) != {count}:\n        raise wrong(values)\n"
         f"    if {test}:\n        m = new(tcompact)\n        {common} = values\n"
         "        m.__class__ = compact\n"
         f"    else:\n        m = new(twhole)\n        {every} = values\n"
         "        m.__class__ = whole\n"
         "    return m", scope)
    of_values: Callable[[Sequence[Any]], Any] = scope["of_values"]
    return of_values


@mypyc_attr(native_class=False)  # two layouts (_two_layouts): mypyc makes one per class
@dataclass(frozen=True)
class Machine:
    """A device, whichever of its NICs it boots from.

    ``id`` is its stable key in the inventory. ``macs`` are all its NICs, the first being the
    one named first at enrollment (or the first seen booting); it may be empty for a machine
    enrolled by serial, asset tag or UUID that has not booted yet. ``uuid``, ``serial`` and
    ``asset`` each identify it too (see :mod:`netboot.identity` for how a boot is matched).
    """

    __slots__ = ()  # the values are in the slots of its layouts (_two_layouts)

    macs: tuple[MacAddress, ...] = ()
    id: str = field(default_factory=new_machine_id)
    state: MachineState = MachineState.ENROLLED
    hostname: str | None = None
    uuid: str | None = None
    serial: str | None = None
    asset: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    cluster: str | None = None
    role: Role | None = None
    profile: str | None = None
    loader: LoaderChain | None = None  # None: the group's, else the profile's, else by arch
    arch: Arch | None = None
    firmware: Firmware | None = None
    ipv4: str | None = None  # last address seen (registration or lease)
    fixed_ipv4: str | None = None  # address to hand out in authoritative DHCP mode
    facts: Mapping[str, str] = field(default_factory=dict)  # what firmware/OS told us
    token_hash: str | None = None  # sha256 hex of the install token: what checks it
    token_expires: float | None = None
    # The install token itself, kept only while its install is under way so that a device that
    # reboots mid-install gets the same one again (netboot.boot); sealed at rest by the store,
    # never listed, never in a repr. Cleared at registration and by a reinstall.
    install_token: str | None = field(default=None, repr=False)
    # sha256 hex of the secret the register command made on the installed OS (kept there
    # where only root reads it, sent with each try of its registration): what proves a
    # repeat of a lost answer's registration is the same install (netboot.enroll). Set at
    # registration, cleared by a reinstall; never listed.
    secret_hash: str | None = field(default=None, repr=False)
    # When its state last changed (lifecycle.advance: the same float as ``updated`` then);
    # None: never since it was created, read as ``created`` (:attr:`in_state_since`), so
    # the machines a storm leaves enrolled and unbooted keep the compact layout.
    state_since: float | None = None
    created: float = 0.0
    updated: float = 0.0

    @property
    def mac(self) -> MacAddress | None:
        """The primary NIC, where one MAC is needed (hostnames, node names); None if unknown."""
        return self.macs[0] if self.macs else None

    @property
    def in_state_since(self) -> float:
        """When it came into its state: the dashboard's "Unchanged for", the API's
        ``unchanged_for`` (a learnt fact or a token moves ``updated``, not this)."""
        since = self.state_since
        return self.created if since is None else since

    @property
    def ref(self) -> str:
        """How logs, messages and URLs name the machine: its primary MAC, else its id."""
        return str(self.macs[0]) if self.macs else self.id

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled and copied by its values (copy, pickle), remade in the layout they call
        # for (_two_layouts): a layout's slots cannot be set again on a frozen instance.
        # The shared empty mapping as a dict (a mappingproxy is not pickled), equal to it.
        return machine_of_values, (
            tuple({} if value is NO_ENTRIES else value for value in _machine_values(self)),)


_without_slots_field(Machine)
_MACHINE_SLOTS = tuple(f.name for f in fields(Machine) if f.name not in _SELDOM_SET)


@mypyc_attr(native_class=False)
class _CompactMachine(Machine):
    """A :class:`Machine` whose seldom-set fields have their first values (_two_layouts)."""

    __slots__ = _MACHINE_SLOTS


@mypyc_attr(native_class=False)
class _WholeMachine(_CompactMachine):
    """A :class:`Machine` with one or more seldom-set fields given (_two_layouts)."""

    __slots__ = tuple(_SELDOM_SET)


_two_layouts(Machine, _CompactMachine, _WholeMachine)

_F = TypeVar("_F")


def _of_values(cls: type[_F]) -> Callable[[Sequence[Any]], _F]:
    """A constructor of the frozen slotted dataclass ``cls`` from ``values`` (every field, in
    declaration order, taken as given), without the frozen ``__init__``'s
    ``object.__setattr__`` by name per field: filled in its :func:`_twin`, every value
    unpacked into its slot at once; where ``cls`` has none (a mypyc native class), each slot
    set by its descriptor directly, written out one statement per field as dataclasses
    writes ``__init__`` (a loop over the setters cost half as much again)."""
    klass: Any = cls  # a dataclass: what fields() takes
    names = [f.name for f in fields(klass)]
    count = len(names)

    def wrong(values: Sequence[Any]) -> ValueError:
        return ValueError(f"a {cls.__name__} has {count} fields, {len(values)} given")

    twin = _twin(cls)
    scope: dict[str, Any] = {"cls": cls, "wrong": wrong, "twin": twin}
    if twin is not None:
        scope["new"] = object.__new__
        body = (f"    m = new(twin)\n    {', '.join(f'm.{n}' for n in names)}, = values\n"
                "    m.__class__ = cls\n")
    else:
        scope.update({f"s{i}": cls.__dict__[name].__set__ for i, name in enumerate(names)})
        # cls.__new__: a native class's own (setup.py's compiled build), which
        # object.__new__ refuses to make.
        scope["new"] = cls.__new__
        body = "    m = new(cls)\n" + "".join(f"    s{i}(m, values[{i}])\n"
                                              for i in range(count))
    exec("def of_values(values):\n"  # noqa: S102
         f"    if len(values) != {count}:\n        raise wrong(values)\n"
         + body + "    return m", scope)
    of_values: Callable[[Sequence[Any]], _F] = scope["of_values"]
    return of_values


def slot_init(cls: type[Any]) -> None:
    """Give the frozen slotted dataclass ``cls`` an ``__init__`` that fills its slots
    without the frozen ``__setattr__``: the same parameters, defaults and factories as the
    one dataclasses writes, whose ``object.__setattr__`` by name per field made a BootPlan
    cost twice as much (a first install builds a BootRequest, a BootPlan, a K3sJoin, two
    Events, two Identities and a Resolution). The value is made ``cls``'s :func:`_twin` by
    ``__class__`` assignment, its slots stored as plain attributes, and made ``cls`` again
    (two assignments, ~1,300 instructions, against ~600 a field saved: a BootPlan and an
    Event built, 17,700 -> 11,300 instructions, callgrind); an instance of a subclass, or
    of a class with no twin (a mypyc native class: setup.py's compiled build), has each slot
    set through its descriptor. For the values built once or more per request; a class with
    a ``__post_init__`` (what an ``InitVar`` is for) or a keyword-only or ``init=False``
    field is refused here. Set on the class (a mypyc build's native class takes it as well,
    and its slots' setters are its getset descriptors)."""
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has a __post_init__")
    params, made, set_each = [], [], []
    twin = _twin(cls)
    scope: dict[str, Any] = {"_missing": _MISSING, "klass": cls, "twin": twin,
                             "become": vars(object)["__class__"].__set__}
    for i, f in enumerate(fields(cls)):
        if not f.init or f.kw_only:
            raise TypeError(f"{cls.__name__}.{f.name} is not a plain init field")
        scope[f"s{i}"] = cls.__dict__[f.name].__set__
        set_each.append(f"    s{i}(self, {f.name})\n")
        if f.default is not _MISSING:
            scope[f"d{i}"] = f.default
            params.append(f"{f.name}=d{i}")
        elif f.default_factory is not _MISSING:
            scope[f"f{i}"] = f.default_factory
            params.append(f"{f.name}=_missing")
            made.append(f"    if {f.name} is _missing:\n        {f.name} = f{i}()\n")
        else:
            params.append(f.name)
    # ``become``: object's own __class__ setter, which the frozen __setattr__ would refuse;
    # back in the twin, a plain assignment gives the class back.
    twinned = ("" if twin is None else
               "    if type(self) is klass:\n        become(self, twin)\n"
               + "".join(f"        self.{f.name} = {f.name}\n" for f in fields(cls))
               + "        self.__class__ = klass\n        return None\n")
    exec(f"def __init__(self, {', '.join(params)}):\n" + "".join(made)  # noqa: S102
         + twinned + "".join(set_each) + "    return None", scope)
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    setattr(cls, "__init__", init)  # noqa: B010  (mypy refuses a method assigned)


def by_position(cls: type[_F]) -> Callable[..., _F]:
    """A maker of the frozen slotted dataclass ``cls`` (one :func:`slot_init` gave its
    ``__init__``) from every field's value by position, defaults included: ``cls(...)``'s
    value, without the class call. A class call goes through ``type_call``, which makes
    the instance, then hands ``__init__`` its arguments again as a tuple with the instance
    put before them (``slot_tp_init``), and ``__init__`` gives the instance its twin's class
    by a call of ``object.__class__``'s setter; here one Python call makes it in its twin,
    stores the slots and gives it ``cls``: a BootPlan of eleven fields 4,656 -> 3,221
    instructions (callgrind, benchmarks/README.md s38-install; seven such values a first
    install, five a first config). Where ``cls`` has no twin (a mypyc native class,
    setup.py's compiled build) the maker is ``cls`` itself. Each maker is declared with
    its fields' types where it is made, so that mypy checks the values given."""
    twin = _twin(cls)
    if twin is None:
        return cls
    klass: Any = cls  # a dataclass: what fields() takes
    names = [f.name for f in fields(klass)]
    scope: dict[str, Any] = {"new": object.__new__, "twin": twin, "cls": cls}
    # One store a statement: STORE_ATTR's specialised slot store each (the unpacking of a
    # tuple of them into the slots was ~600 instructions more for eleven, callgrind).
    exec(f"def made({', '.join(names)}):\n    m = new(twin)\n"  # noqa: S102
         + "".join(f"    m.{name} = {name}\n" for name in names)
         + "    m.__class__ = cls\n    return m", scope)
    made: Callable[..., _F] = scope["made"]
    made.__qualname__ = f"{cls.__qualname__}.made"
    made.__module__ = cls.__module__
    return made


slot_init(Event)
# By position: machine, time, kind, message, data, data_text.
event_of: Callable[[str, float, str, str, Mapping[str, Any], str | None], Event] = (
    by_position(Event))


_machine_of_values: Callable[[Sequence[Any]], Machine] = Machine._of_values  # type: ignore[attr-defined]
_MACHINE_LAYOUTS = (_CompactMachine, _WholeMachine)


# Each field's place in that order, and all its values at once (one C call).
_MACHINE_PLACES = {f.name: i for i, f in enumerate(fields(Machine))}
_machine_values = operator.attrgetter(*_MACHINE_PLACES)


class _ReplaceMachine(Protocol):
    def __call__(self, machine: Machine, /, **changes: Any) -> Machine: ...


def _machine_replacer() -> _ReplaceMachine:
    """:data:`replace_machine`: a function with a keyword parameter per field, each read from
    the machine when not given (``m.hostname if hostname is _KEEP else hostname``: one
    slot read each), written out as dataclasses writes ``__init__``. Taking the changes as
    ``**changes`` and walking them (a dict look-up and a list store per change, after an
    attrgetter of all 22 fields into a list) was 4.4-5.0 µs of a first install's copy
    (lifecycle.advance: 14 changes); this is 2.9-3.2 (timed alone, session 24)."""
    names = list(_MACHINE_PLACES)
    keep = object()

    def unknown(rest: Mapping[str, Any]) -> TypeError:
        return TypeError(f"Machine has no field {next(iter(rest))!r}")

    def other(machine: Any, given: Sequence[Any], rest: Mapping[str, Any]) -> Any:
        # A subclass: its own __init__ decides (dataclasses.replace), an unknown field too.
        # (Any: a compiled build checks a Machine argument against its two layouts alone.)
        made: Any = replace(machine, **{n: v for n, v in zip(names, given, strict=True)
                                        if v is not keep}, **rest)
        return made

    def positional(given: object) -> TypeError:
        return TypeError("replace_machine() takes 1 positional argument, the machine: the "
                         f"changes by name ({given!r} was given by position)")

    scope: dict[str, Any] = {"_KEEP": keep, "of_values": _machine_of_values,
                             "layouts": _MACHINE_LAYOUTS, "unknown": unknown, "other": other,
                             "positional": positional}
    # ``_machine_`` positional-only: no field can clash with it. The fields are not
    # keyword-only (``*``): a keyword-only parameter not given is filled from the
    # function's ``__kwdefaults__`` dict, one look-up each (~120 instructions, ~12 a first
    # install's loop: session 29), the others from its defaults tuple. A field given by
    # position lands first in ``_by_position_``, which refuses it, as ``*`` did.
    exec("def replace_machine(_machine_, _by_position_=_KEEP, /, "  # noqa: S102
         + ", ".join(f"{n}=_KEEP" for n in names) + ", **rest):\n"
         "    if _by_position_ is not _KEEP:\n"
         "        raise positional(_by_position_)\n"
         "    if type(_machine_) not in layouts:\n"
         "        return other(_machine_, (" + ", ".join(names) + ",), rest)\n"
         "    if rest:\n        raise unknown(rest)\n"
         "    return of_values((" + ", ".join(f"_machine_.{n} if {n} is _KEEP else {n}"
                                    for n in names) + ",))", scope)
    made: _ReplaceMachine = scope["replace_machine"]
    made.__module__ = __name__
    made.__doc__ = _REPLACE_DOC
    return made


_REPLACE_DOC = """``dataclasses.replace(machine, **changes)`` in a fifth of the time: replace walks
the fields and calls the frozen ``__init__`` (~16 µs for a Machine), and an install copies a
machine at each step (lifecycle.advance). The same value (Machine has no ``__post_init__``
or ``InitVar``); an unknown field is a TypeError, as replace says."""
replace_machine = _machine_replacer()


def machine_changer(*changed: str) -> Callable[..., Machine]:
    """A :data:`replace_machine` for one set of fields, given by position in ``changed``'s
    order: ``change(machine, *values)`` is ``replace_machine(machine, **dict(zip(changed,
    values)))``, the same value. For a step made once or more per request with the same
    fields each time (a first install's copy: 14 of them; a config's state step: 3):
    ``replace_machine``'s keywords matched to its 24 parameters, the others filled from
    their defaults and 24 ``_KEEP`` tests were ~3,400 instructions of a first install's copy
    of 14,000 (callgrind, benchmarks/README.md s40-http1st); here every field is read or
    given in place, by position. A machine of another class (a subclass) is replace's."""
    names = list(_MACHINE_PLACES)
    unknown = [n for n in changed if n not in _MACHINE_PLACES]
    if unknown or len(set(changed)) != len(changed) or not changed:
        raise TypeError(f"not a set of Machine's fields: {changed!r}")
    scope: dict[str, Any] = {"of_values": _machine_of_values, "layouts": _MACHINE_LAYOUTS,
                             "replace_machine": replace_machine}
    args = ", ".join(changed)
    exec(f"def change(_machine_, {args}, /):\n"  # noqa: S102
         "    if type(_machine_) not in layouts:\n"
         "        return replace_machine(_machine_, "
         + ", ".join(f"{n}={n}" for n in changed) + ")\n"
         "    return of_values((" + ", ".join(n if n in changed else f"_machine_.{n}"
                                    for n in names) + ",))", scope)
    made: Callable[..., Machine] = scope["change"]
    made.__module__ = __name__
    made.__qualname__ = made.__name__ = f"change_{'_'.join(changed)}"
    return made


# lifecycle.moved's step (a config fetched): the state, stamped (updated, state_since).
restate: Callable[[Machine, MachineState, float, float | None], Machine] = machine_changer(
    "state", "updated", "state_since")


def machine_of_values(values: Sequence[Any]) -> Machine:
    """``Machine(*values)`` (every field, in declaration order) in half the time: the frozen
    dataclass's ``__init__`` sets each of its 22 fields through ``object.__setattr__`` by
    name. For a decoder that has checked every value already (a store's reader: the view
    loads 100,000 machines at start, a third of that was this constructor); the values are
    taken as given."""
    return _machine_of_values(values)


@dataclass(frozen=True, slots=True)
class Asset:
    path: str  # relative to the assets root
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class Profile:
    """What to install: kernel, initrds and command line (a template), and the config format."""

    name: str
    kernel: str  # asset path or absolute URL
    initrds: tuple[str, ...] = ()
    cmdline: str = ""  # Jinja2 template, one line after rendering
    config_template: str = "k3os"  # "k3os" | "cloud-init" (templates/cloud-config/<name>...)
    assets: tuple[Asset, ...] = ()
    install_device: str = "/dev/sda"
    iso_url: str | None = None
    ssh_authorized_keys: tuple[str, ...] = ()
    fdtdir: str | None = None  # pxelinux FDTDIR for U-Boot boards that need a device tree
    loader: LoaderChain | None = None  # first-stage chain for UEFI; None: by architecture
    description: str = ""
    # How long an install of this profile may take, seconds: the lifetime of the install token
    # issued with its script. None: the server's enroll.token_ttl_seconds.
    install_timeout: int | None = None


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    server_url: str = "managed"  # an https:// k3s URL, or "managed"
    # k3s join secret; never logged, never listed. Out of repr: a cluster in a log line or a
    # traceback's locals must not carry it.
    token: str = field(default="", repr=False)
    labels: Mapping[str, str] = field(default_factory=dict)  # node labels
    taints: tuple[str, ...] = ()
    description: str = ""
    # Where the nodes of a managed cluster reach its servers: a VIP or DNS name in front of
    # them (kube-vip, a load balancer), as host, host:port or https URL (check_endpoint).
    # Unset, it is the first registered server's address (netboot.boot).
    endpoint: str | None = None
    # The k3s server CA netboot made for this managed cluster (netboot.pki, k3s_server_ca):
    # written to its server nodes before k3s first starts, and named by the secure form of
    # ``token``. Empty for a cluster made before netboot made them (its first server made
    # its own CA) or made without one. The key is a secret as the token is (sealed at rest,
    # out of repr, never listed).
    ca_cert: str = ""
    ca_key: str = field(default="", repr=False)
    # What the cluster's agents join with, as they are given it (the secure form
    # ``K10<CA hash>::node:<secret>`` where the cluster has a CA): k3s's servers, given its
    # secret as ``agent-token``, accept it for an agent's join only, never for a server's
    # (README "What a host on the provisioning network can take"), so root on an agent, or
    # whoever reads its config, cannot join the control plane. Empty: agents join with
    # ``token`` (a cluster whose servers were configured before netboot made agent tokens;
    # an external cluster whose operator gave none). A secret as the token is.
    agent_token: str = field(default="", repr=False)

    @property
    def managed(self) -> bool:
        return self.server_url == "managed"

    @property
    def agent_secret(self) -> str:
        """The password alone of :attr:`agent_token` as k3s's parseToken reads it from the
        agents' token (pkg/clientaccess/token.go: after ``K10<hash>::``, then after the first
        ``:``, the user's; the whole of a bare one without ``:``), "" without one: what a
        server is given as k3s's ``agent-token``, which k3s takes as the password as given
        (pkg/daemons/control/deps, getNodePass), not as a ``K10`` form; and what a rendered
        text must never show. Not the text after the last ``:``: a secret with one
        (``site:pass``) gave the servers ``pass`` and every agent was refused."""
        token = self.agent_token
        rest = token.partition("::")[2] if "::" in token else token
        return rest.partition(":")[2] if ":" in rest else rest


# Request labels that a group selector may name besides machine labels.
SELECTOR_KEYS = (
    "mac",
    "uuid",
    "serial",
    "arch",
    "firmware",
    "hostname",
    "manufacturer",
    "product",
    "asset",
)


@dataclass(frozen=True, slots=True)
class Group:
    """Selector over request labels → profile, cluster, role. The most specific match wins."""

    name: str
    selector: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    profile: str | None = None
    cluster: str | None = None
    role: Role | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[str, ...] = ()
    hostname_template: str | None = None
    loader: LoaderChain | None = None  # first-stage chain of its machines (over the profile's)

    @property
    def specificity(self) -> int:
        return len(self.selector)


@dataclass(frozen=True, slots=True)
class Lease:
    """An address handed out in authoritative DHCP mode."""

    mac: str
    ipv4: str
    expires: float
    hostname: str | None = None


class Scope(enum.StrEnum):
    """What an API token may do (netboot.access maps each to its permissions)."""

    ADMIN = "admin"  # everything, secrets included: tokens, audit, profiles, clusters, groups
    OPERATOR = "operator"  # enroll, approve, change, reinstall and remove machines; read
    READ = "read"  # the inventory, without secrets
    ENROLL = "enroll"  # create and approve machines only (factory-floor scanners)


@dataclass(frozen=True, slots=True)
class ApiToken:
    """A named bearer token of the API. Only the sha256 of its value is kept: the value is
    shown once, at creation."""

    name: str
    sha256: str
    scope: Scope
    created: float
    expires: float | None = None
    last_used: float | None = None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One change asked of netboot: who (a token's name, ``cli:<user>``, ``machine:<mac>``),
    what (``POST /api/v1/machines`` or ``machines add``) on which target, from where (peer
    address, ``local`` for the CLI), and how it ended (an HTTP status or ``ok``/``error``)."""

    time: float
    actor: str
    action: str
    target: str
    peer: str
    outcome: str


@dataclass(frozen=True, slots=True)
class BootRequest:
    """What a client told us about itself, from whichever protocol it came in on."""

    mac: MacAddress
    arch: Arch = Arch.UNKNOWN
    firmware: Firmware = Firmware.UNKNOWN
    arch_code: int | None = None  # raw DHCP option 93 value
    uuid: str | None = None
    serial: str | None = None
    manufacturer: str | None = None
    product: str | None = None
    asset: str | None = None
    hostname: str | None = None
    platform: str | None = None  # iPXE ${platform}: pcbios | efi
    remote_addr: str | None = None
    relay: str | None = None  # giaddr when relayed
    interface: str | None = None  # provisioning interface the request came in on
    via: str = "http"  # dhcp | tftp | http

    def labels(self) -> dict[str, str]:
        """The facts a selector can match, all as lowercase-insensitive strings."""
        out = {"mac": str(self.mac), "arch": str(self.arch), "firmware": str(self.firmware)}
        for key in ("uuid", "serial", "manufacturer", "product", "asset", "hostname"):
            value = getattr(self, key)
            if value:
                out[key] = value
        return out


slot_init(BootRequest)
_request_of_values = _of_values(BootRequest)


def boot_request_of_values(values: Sequence[Any]) -> BootRequest:
    """``BootRequest(*values)`` (every field, in declaration order) without the frozen
    ``__init__``'s setattr call per field (2.3 µs for its 15): one is built for every DHCP
    request classified (netboot.pxe), whose values are checked there."""
    return _request_of_values(values)


@dataclass(frozen=True, slots=True)
class K3sJoin:
    """How a node joins its cluster: decided once, rendered into every config format."""

    role: Role
    server_url: str | None  # None for the first server of a managed cluster (cluster-init)
    cluster_init: bool
    token: str = field(repr=False)  # the cluster's join secret (see Cluster.token)
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[str, ...] = ()
    node_name: str = ""
    # Names other nodes reach the servers by (a VIP, <cluster>.<zone>): k3s must put them in
    # its serving certificate, or joining through them fails TLS verification.
    tls_san: tuple[str, ...] = ()

    @property
    def waiting(self) -> bool:
        """No endpoint to join yet: neither the cluster's first server nor given a URL."""
        return not self.cluster_init and self.server_url is None

    @property
    def args(self) -> tuple[str, ...]:
        """k3OS ``k3s_args``: exec-style, first word server|agent (k3os pkg/config)."""
        out: list[str] = [str(self.role)]
        if self.cluster_init:
            out.append("--cluster-init")
        if self.node_name:
            out += ["--node-name", self.node_name]
        if self.role == "server":  # Role.SERVER's value: its look-up was a fifth of this
            for name in self.tls_san:
                out += ["--tls-san", name]
        return tuple(out)


slot_init(K3sJoin)
# By position: role, server_url, cluster_init, token, labels, taints, node_name, tls_san.
join_of: Callable[[Role, str | None, bool, str, Mapping[str, str], tuple[str, ...], str,
                   tuple[str, ...]], K3sJoin] = by_position(K3sJoin)


@dataclass(frozen=True, slots=True)
class BootPlan:
    """The one decision of :mod:`netboot.boot`: what this machine boots now, and why."""

    action: BootAction
    mac: MacAddress
    reason: str
    retry_seconds: int = 0
    machine: Machine | None = None
    group: str | None = None
    profile: Profile | None = None
    cluster: Cluster | None = None
    k3s: K3sJoin | None = None
    token: str | None = field(default=None, repr=False)  # install token, only when issued
    command: str | None = None  # for a held machine: what an operator runs to move it on


slot_init(BootPlan)
# By position: action, mac, reason, retry_seconds, machine, group, profile, cluster, k3s,
# token, command.
plan_of: Callable[[BootAction, MacAddress, str, int, Machine | None, str | None,
                   Profile | None, Cluster | None, K3sJoin | None, str | None, str | None],
                  BootPlan] = by_position(BootPlan)


@dataclass(frozen=True, slots=True)
class FirstStage:
    """What a firmware's DHCP answer points at.

    ``path`` is a TFTP file name (``undionly.kpxe``) or, when ``http`` is true, a path on
    netboot's HTTP server (``/boot.ipxe``) that the DHCP layer turns into an absolute URL with
    the address it advertises on the interface the request came in on.
    """

    path: str
    http: bool = False
    reason: str = ""
    chain: LoaderChain | None = None  # for UEFI: the loader chain this first stage starts


@dataclass(frozen=True, slots=True)
class Blob:
    """Bytes to serve over TFTP or HTTP: rendered in memory, or a file on disk to stream."""

    size: int
    data: bytes | None = None
    path: str | None = None  # absolute path of a regular file when not in memory
    content_type: str = "application/octet-stream"
    mtime: float | None = None
    # The stat the lookup took of ``path``, for a server to start from without a second one
    # moments later (TFTP: a system call and a stat_result per transfer). Not compared: the
    # same file is the same blob whichever moment it was looked at.
    stat: os.stat_result | None = field(default=None, compare=False, repr=False)


def normalise_uuid(text: str) -> str:
    """Canonical lowercase UUID; raises ValidationError naming ``uuid``."""
    try:
        return str(uuidlib.UUID(text.strip()))
    except (ValueError, AttributeError) as exc:
        raise ValidationError("uuid", f"{text!r} is not a UUID") from exc


def check_endpoint(text: str) -> str:
    """A cluster endpoint in canonical form: ``host``, ``host:port`` or ``https://host[:port]``.

    The host is a DNS name or an address other nodes can reach (not loopback, link-local,
    multicast or unspecified: a node would dial itself or nothing). An IPv6 address with a
    port is written in brackets (RFC 3986 §3.2.2). Raises ValidationError naming ``endpoint``.
    """
    if not isinstance(text, str):
        raise ValidationError("endpoint", "must be a string: host, host:port or https://host:port")
    raw = text.strip()
    scheme, sep, rest = raw.partition("://")
    if not sep:
        scheme, rest = "", raw
    elif scheme.lower() != "https":
        raise ValidationError("endpoint", f"{text!r}: the k3s API is https://, not {scheme}://")
    rest = rest[:-1] if sep and rest.endswith("/") else rest
    # A bare IPv6 address (2001:db8::1) has colons but no port.
    if not rest.startswith("[") and rest.count(":") > 1:
        rest = f"[{rest}]"
    found = _HOST_PORT.match(rest)
    if not found:
        raise ValidationError("endpoint", f"{text!r} is not host, host:port or https://host:port"
                                          " (no path, user or query)")
    host = (found.group("v6") or found.group("host")).lower()
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
        if found.group("v6") or not _DNS_NAME.match(host) or len(host) > 253 \
                or host.rstrip(".").replace(".", "").isdigit():
            raise ValidationError("endpoint", f"{text!r}: {host!r} is not a DNS name or an "
                                              "IP address") from None
    if address is not None and (address.is_loopback or address.is_link_local
                                or address.is_multicast or address.is_unspecified):
        raise ValidationError("endpoint", f"{text!r}: other nodes cannot reach {host}")
    port = found.group("port")
    if port is not None and not 1 <= int(port) <= 65535:
        raise ValidationError("endpoint", f"{text!r}: port {port} is not 1-65535")
    host = f"[{host}]" if isinstance(address, ipaddress.IPv6Address) else host
    return (f"https://{host}" if sep else host) + (f":{int(port)}" if port else "")


def _split_endpoint(endpoint: str) -> tuple[str, str | None]:
    found = _HOST_PORT.match(endpoint.removeprefix("https://"))
    if found is None:
        raise ValidationError("endpoint", f"{endpoint!r} is not host, host:port or https URL")
    return found.group("v6") or found.group("host"), found.group("port")


def endpoint_url(endpoint: str, default_port: int) -> str:
    """The k3s ``server_url`` of a canonical endpoint (k3s listens on 6443 by default)."""
    host, port = _split_endpoint(endpoint)
    return f"https://{url_host(host)}:{port or default_port}"


def endpoint_host(endpoint: str) -> str:
    """The name or address of an endpoint, as k3s's ``--tls-san`` takes it."""
    return _split_endpoint(endpoint)[0]


def url_host(address: str) -> str:
    """An address as the host part of a URL: IPv6 in brackets (RFC 3986 §3.2.2)."""
    return f"[{address}]" if ":" in address else address


def reached_url(url: str, local: str | None, stand_in: str = "") -> str:
    """``url`` as a client that reached this host at ``local`` (the socket's own address of
    its connection) can use it: a loopback host in it, or ``stand_in`` (:func:`stands_in`),
    is ``local``; any other URL, or a ``local`` that is loopback itself, unspecified or
    unknown (None), unchanged.

    A loopback host is what a host without a default route advertises when no address is
    given (service.advertised_address warns of it): on a device's side 127.0.0.1 is the
    device itself, and its boot fails there, silently. dnsmasq (``--dhcp-boot`` without a
    server address) and pixiecore's DHCP answer with the address of the interface the
    request came in on, pixiecore's iPXE scripts with the request's Host header; this takes
    the socket's own address, not the Host header, which the client writes (an open
    redirect where the URL is a page's)."""
    if local is None:
        return url
    address = parse_ip(local)
    if address is None or address.is_loopback or address.is_unspecified:
        return url
    if not (loopback_url(url) or stands_in(url, stand_in)):
        return url
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port is not None else ""
    return urlunsplit(parts._replace(netloc=f"{url_host(str(address))}{port}"))


def stands_in(url: str, stand_in: str) -> bool:
    """Whether a URL's host is ``stand_in``: the first named interface's address where
    ``server.interfaces`` names several and no address or public URL was given
    (service.url_stand_in), which a device on another named interface's network may not
    reach; dnsmasq and pixiecore answer with the address a request came in on."""
    return bool(stand_in) and urlsplit(url).hostname == stand_in


def loopback_url(url: str) -> bool:
    """Whether a URL's host names this host's loopback only (no other host can reach it)."""
    host = urlsplit(url).hostname
    if host is None:
        return False
    named = parse_ip(host)
    return host.lower() == "localhost" if named is None else named.is_loopback


def parse_ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address of a transport or a URL's host (its scope dropped, IPv4-mapped IPv6 as
    IPv4), or None."""
    try:
        address = ipaddress.ip_address((text or "").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
