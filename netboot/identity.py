"""Which machine a boot is: identifiers, the junk firmware reports, and lookup precedence.

A machine is known by any of four kinds of identifier: the MACs of its NICs, its SMBIOS UUID,
its serial number and its asset tag. Each is enough to enroll it (a factory floor knows serials
from labels long before anyone reads a MAC) and each is unique in the inventory: the stores
index every *claim* (kind, value) and refuse a second machine claiming one (Conflict naming the
kind and the holder).

Firmware reports what the board vendor left in SMBIOS, and many leave placeholders that
thousands of boards share ("To be filled by O.E.M.", "Default string", an all-zero UUID).
Such values are not identifiers: they never match, never conflict and are never learnt as a
machine's identity (they stay visible in its facts).

When identifiers of one request point at different machines, the answer is deterministic:

1. an enrolled record (any state but ``discovered``) beats a ``discovered`` one, because a
   discovered record is only a guess made before anyone enrolled the device;
2. among equals, the first in :data:`PRECEDENCE` order wins: the MAC the request came from,
   then the UUID, then the serial, then the asset tag. A MAC is what the wire proves; a UUID is
   meant to be unique by construction; serials and asset tags are typed in by people.

The ``discovered`` records that matched some identifier of the request are the same device
seen earlier (an unknown NIC that booted before the operator enrolled its serial): the boot
path merges them into the winner (:func:`resolve` lists them).
"""

from __future__ import annotations

import re
import uuid as uuidlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, cast

from netboot.errors import Conflict, NotFound, PreconditionFailed, ValidationError
from netboot.model import (
    ID_PREFIX,
    BootRequest,
    MacAddress,
    Machine,
    MachineState,
    by_position,
    slot_init,
)

KINDS = ("mac", "uuid", "serial", "asset")
PRECEDENCE = KINDS

# Stands for "the NIC it will boot from" in a dry run (explain, render) of a machine enrolled
# without a MAC. No NIC has it (IEEE 802 never assigns the all-zero address), so it never
# matches, is never attached and is never learnt.
NO_NIC = MacAddress(bytes(6))
# NO_NIC as plain bytes, what a request's MAC is compared with: a MacAddress and a bytes are
# compared by value in either build, without model.equal's call on every request (setup.py's
# mypyc build compiles ``==`` between two MacAddresses as ``is``: model.equal).
NO_NIC_BYTES = bytes(NO_NIC)

# Placeholders seen in SMBIOS type 1/2/3 strings of real boards (compared case-insensitively,
# spaces and dots ignored): AMI's and Insyde's templates, QEMU without -smbios, vendor dev kits.
_JUNK = frozenset(
    re.sub(r"[\s.]", "", v).lower() for v in (
        "", "To be filled by O.E.M.", "To Be Filled By O.E.M.", "Default string",
        "System Serial Number", "System Product Name", "Chassis Serial Number",
        "Base Board Serial Number", "Not Specified", "Not Applicable", "None", "N/A", "NA",
        "0", "00000000", "0000000000", "0123456789", "123456789", "1234567890", "Unknown",
        "Invalid", "OEM", "O.E.M.", "XXXXXXXXXX", "Asset-1234567890", "No Asset Tag",
        "No Asset Information", "Serial", "SerialNumber", "Type2 - Board Serial Number",
        "Default", "Empty", "-", "Not Available",
    )
)


_SPACES_DOTS = re.compile(r"[\s.]")
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_junk(value: str) -> bool:
    """A placeholder many boards report, or only zeros, F's, spaces or dots."""
    # Most values (a serial, an asset tag) are letters and digits only: nothing to remove.
    key = (value if value.isalnum() else _SPACES_DOTS.sub("", value)).lower()
    return key in _JUNK or not key.strip("0") or not key.strip("f") or not key.strip("x")


def clean_uuid(text: str | None) -> str | None:
    """Canonical lowercase UUID from firmware, or None for a missing, malformed or junk one.

    All-zero and all-F UUIDs are what SMBIOS uses for "not set" and "not present" (DMTF DSP0134
    §7.2.1); some boards also repeat one byte throughout.
    """
    if not text:
        return None
    if _CANONICAL_UUID.fullmatch(text):
        # Already canonical (what netboot.pxe makes of option 97, what the view holds): the
        # same answer without parsing it, on every DHCP request of a storm.
        digits = text.replace("-", "")
        return None if digits == digits[:2] * 16 else text
    try:
        value = uuidlib.UUID(text.strip())
    except ValueError:
        return None
    if len(set(value.bytes)) == 1:
        return None
    return str(value)


def clean_text(text: str | None) -> str | None:
    """A serial or asset tag from firmware, stripped, or None when it is a placeholder."""
    if text is None:
        return None
    value = text.strip()
    return None if is_junk(value) else value


def enrolled_value(kind: str, text: str) -> str:
    """An operator's serial/asset/UUID, normalised; a placeholder is refused naming ``kind``,
    since a machine enrolled by it could never be told from thousands of others."""
    if kind == "uuid":
        try:
            parsed: uuidlib.UUID | None = uuidlib.UUID(text.strip())
        except (ValueError, AttributeError):
            parsed = None
        if parsed is None:  # raised here, not in the except: a mypyc build drops "from None"
            raise ValidationError("uuid", f"{text!r} is not a UUID")
        value = str(parsed)
        if clean_uuid(value) is None:
            raise ValidationError("uuid", f"{text!r} is the placeholder UUID many boards share; "
                                          "it cannot identify one machine")
        return value
    value = text.strip()
    if is_junk(value):
        raise ValidationError(kind, f"{text!r} is a placeholder many boards report; it cannot "
                                    "identify one machine")
    return value


def enrolled_mac(mac: MacAddress, field: str) -> MacAddress:
    """An operator's MAC, refused naming ``field`` where no NIC can have it: a group
    (multicast, broadcast) address, its first byte odd (IEEE 802 I/G bit), or all zeros. A
    machine enrolled by one never matched a boot, and nothing said why (often a typo in the
    first byte)."""
    # Compared as plain bytes: compiled by mypyc, ``mac == MacAddress(...)`` of two
    # MacAddress (a bytes subclass) was false for equal addresses (the session's CI).
    raw = bytes(mac)
    if raw[0] & 1:
        kind = "the broadcast" if raw == _BROADCAST else "a multicast"
        raise ValidationError(field, f"{mac} is {kind} address, never a NIC's (its first "
                                     "byte is odd); check the MAC on the device's label")
    if raw == _ZERO_MAC:
        raise ValidationError(field, f"{mac} is the all-zero address, never a NIC's")
    return mac


_BROADCAST = b"\xff" * 6
_ZERO_MAC = bytes(6)


def claims(machine: Machine) -> list[tuple[str, str]]:
    """Every identifier ``machine`` holds, as (kind, value), in :data:`PRECEDENCE` order.

    Placeholders are left out, so a store never indexes them: they neither match nor conflict.
    """
    return Identity.of_machine(machine).claims()


@dataclass(frozen=True, slots=True)
class Identity:
    """What a request (or an operator) says a machine is: the keys looked up, in order."""

    macs: tuple[MacAddress, ...] = ()
    uuid: str | None = None
    serial: str | None = None
    asset: str | None = None

    @classmethod
    def of_request(cls, request: BootRequest) -> Identity:
        macs = () if request.mac == NO_NIC_BYTES else (request.mac,)
        # The cleaners called for a value given (each answers None to none: an /ipxe
        # request mostly has no UUID, serial or asset tag, and their calls were ~1,800 of
        # a first install's loop instructions; callgrind, s33-loop).
        uuid, serial, asset = request.uuid, request.serial, request.asset
        # identity_of, not a class call (model.by_position), for this class itself.
        return (identity_of if cls is Identity else cls)(
            macs, clean_uuid(uuid) if uuid else None,
            clean_text(serial) if serial is not None else None,
            clean_text(asset) if asset is not None else None)

    @classmethod
    def of_machine(cls, machine: Machine) -> Identity:
        return cls(machine.macs, clean_uuid(machine.uuid), clean_text(machine.serial),
                   clean_text(machine.asset))

    def keys(self, raw: bool) -> list[tuple[str, bytes | str]]:
        """Every identifier, as (kind, key), in :data:`PRECEDENCE` order: the one walk over
        an identity's claims. A MAC is spelled as text (``raw`` false: a store's
        ``machine_by`` takes it so, :meth:`claims`) or by its 6 bytes (a
        :class:`HeldIndex`'s key, :meth:`lookup_keys`); the other kinds by their cleaned
        text."""
        # A flag, not a function per MAC, and no comprehension for the one NIC most have:
        # every first request of a storm walks this, and an import every machine it holds.
        out: list[tuple[str, bytes | str]] = []
        for mac in self.macs:
            out.append(("mac", mac.raw if raw else str(mac)))
        uuid, serial, asset = self.uuid, self.serial, self.asset
        if uuid:
            out.append(("uuid", uuid))
        if serial:
            out.append(("serial", serial))
        if asset:
            out.append(("asset", asset))
        return out

    def claims(self) -> list[tuple[str, str]]:
        return cast("list[tuple[str, str]]", self.keys(False))

    def lookup_keys(self) -> list[tuple[str, bytes | str]]:
        """:meth:`claims` as a :class:`HeldIndex` keys them: a MAC by its raw bytes."""
        return self.keys(True)


# Made twice per /ipxe decision (its look-up, what it tells): model.slot_init.
slot_init(Identity)
# By position: macs, uuid, serial, asset (model.by_position).
identity_of: Callable[[tuple[MacAddress, ...], str | None, str | None, str | None],
                      Identity] = by_position(Identity)


class MachineIndex(Protocol):
    """The store methods identity lookups need (see :class:`netboot.inventory.base.Store`)."""

    async def get_machine(self, machine_id: str) -> Machine | None: ...

    async def machine_by(self, kind: str, value: str) -> Machine | None: ...


async def by_ref(index: MachineIndex, ref: str) -> Machine | None:
    """The machine a user names: by a MAC in any spelling, or by its id.

    Ids start with ``m-`` and never parse as a MAC, so the two cannot be confused; anything
    else is a ValidationError naming ``mac`` (most refs are MACs, and a typo in one is the
    likely mistake).
    """
    text = ref.strip()
    if text.startswith(ID_PREFIX):
        return await index.get_machine(text)
    try:
        mac = MacAddress.parse(text)
    except ValidationError:
        raise ValidationError("mac", f"{ref!r} is neither a MAC address (aa:bb:cc:dd:ee:ff) "
                                     f"nor a machine id ({ID_PREFIX}…)") from None
    return await index.machine_by("mac", str(mac))


async def require_ref(index: MachineIndex, ref: str) -> Machine:
    """:func:`by_ref`, or NotFound naming ``ref``."""
    machine = await by_ref(index, ref)
    if machine is None:
        raise NotFound(f"machine {ref} not found (give one of its MACs or its id)")
    return machine


def request_for(machine: Machine, **kw: Any) -> BootRequest:
    """A boot request as ``machine`` would send it, for dry runs: its primary NIC (or
    :data:`NO_NIC` when none is known yet) and its identifiers."""
    return BootRequest(mac=machine.mac or NO_NIC, uuid=machine.uuid, serial=machine.serial,
                       asset=machine.asset, **kw)


async def matches(index: MachineIndex, identity: Identity,
                  claims: Sequence[tuple[str, str]] | None = None,
                  ) -> list[tuple[str, str, Machine]]:
    """Every (kind, value, machine) an identifier of ``identity`` points at, in precedence
    order; one indexed read per identifier. ``claims``: ``identity.claims()``, when the
    caller keeps them."""
    out: list[tuple[str, str, Machine]] = []
    for kind, value in identity.claims() if claims is None else claims:
        machine = await index.machine_by(kind, value)
        if machine is not None:
            out.append((kind, value, machine))
    return out


@dataclass(frozen=True, slots=True)
class Resolution:
    """Which machine a request is, how it was recognised, and what else it turned out to be."""

    machine: Machine | None
    matched_by: str | None = None  # "mac", "uuid", "serial" or "asset"
    absorb: tuple[Machine, ...] = ()  # discovered records of the same device, to merge
    disagree: tuple[tuple[str, Machine], ...] = ()  # other enrolled machines an identifier named


slot_init(Resolution)
# By position: machine, matched_by, absorb, disagree (model.by_position): a known device's
# every request resolves to one.
resolution_of: Callable[[Machine | None, str | None, tuple[Machine, ...],
                         tuple[tuple[str, Machine], ...]], Resolution] = by_position(Resolution)


def choose(found: Sequence[tuple[str, object, Machine]]) -> Resolution:
    """The precedence rule of this module's docstring, over :func:`matches`' answer. Pure."""
    if not found:
        return resolution_of(None, None, (), ())
    kind, _, first = found[0]
    for _, _, m in found:  # no generator: every DHCP request of a storm comes here
        if m is not first:
            break
    else:
        # Every identifier names the same machine (a known device, every DHCP request of a
        # storm): that machine, by the first of them, as below.
        return resolution_of(first, kind, (), ())
    enrolled = [(k, m) for k, _, m in found if m.state != MachineState.DISCOVERED]
    kind, winner = (enrolled or [(k, m) for k, _, m in found])[0]
    absorb: dict[str, Machine] = {}
    disagree: dict[str, tuple[str, Machine]] = {}
    for k, _, m in found:
        if m.id == winner.id:
            continue
        if m.state == MachineState.DISCOVERED:
            absorb.setdefault(m.id, m)
        else:
            disagree.setdefault(m.id, (k, m))
    return Resolution(winner, kind, tuple(absorb.values()), tuple(disagree.values()))


async def resolve(index: MachineIndex, identity: Identity,
                  claims: Sequence[tuple[str, str]] | None = None) -> Resolution:
    """Which machine ``identity`` is, one read of ``index`` per identifier (a store)."""
    return choose(await matches(index, identity, claims))


class Unseen:
    """:meth:`HeldIndex.held`'s answer where the index cannot tell without a read (never a
    machine)."""


UNSEEN = Unseen()


class HeldIndex(MachineIndex, Protocol):
    """An index that holds identifiers in memory (the boot path's view,
    :class:`netboot.inventory.view.InventoryView`) and reads the store only on a miss."""

    def held(self, kind: str, key: bytes | str) -> Machine | Unseen | None:
        """The holder of identifier ``kind`` = ``key`` (:meth:`Identity.lookup_keys`: a MAC
        by its raw bytes, the other kinds by their text as Identity holds it), None for
        nobody's, when known without waiting; :data:`UNSEEN` where only a read
        (``machine_by``) can tell."""
        ...

    async def machines_by(self, claims: Sequence[tuple[str, str]]) -> list[Machine | None]:
        """``machine_by`` of each claim, in their order, in one read at most."""
        ...


async def lookup(index: HeldIndex, identity: Identity,
                 keys: Sequence[tuple[str, bytes | str]] | None = None) -> Resolution:
    """:func:`resolve` over an index that holds its identifiers: each looked up in memory,
    without a coroutine per identifier, nor a MAC spelled out for the index to parse back
    (every request of a boot storm, and each one's record, asks this); where the index
    cannot tell without the store, every identifier is read through at once (its
    ``machines_by``). ``keys``: ``identity.lookup_keys()``, when the caller keeps them."""
    res = held_lookup(index, identity, keys)
    if res is not None:
        return res
    # Every identifier in one read, not one after another: at start-up each device of a
    # storm comes here, and the index reads many devices' at a time.
    claims = identity.claims()
    return choose([(kind, value, m) for (kind, value), m in zip(
        claims, await index.machines_by(claims), strict=True) if m is not None])


def held_lookup(index: HeldIndex, identity: Identity,
                keys: Sequence[tuple[str, bytes | str]] | None = None) -> Resolution | None:
    """:func:`lookup` where the index tells every identifier from memory (a loaded view:
    every request of a storm), without a coroutine; None where one needs the store's read
    (then :func:`lookup`)."""
    held = index.held
    found: list[tuple[str, bytes | str, Machine]] = []
    for kind, key in identity.lookup_keys() if keys is None else keys:
        machine = held(kind, key)
        if machine is None:
            continue
        if isinstance(machine, Unseen):
            return None
        found.append((kind, key, machine))
    return choose(found)


def merge(into: Machine, others: Iterable[Machine], now: float) -> Machine:
    """``into`` with the NICs, identifiers, facts and labels of ``others`` added (its own win).

    Used when discovered records prove to be ``into``: nothing they learnt is lost.
    """
    macs = list(into.macs)
    facts: dict[str, str] = {}
    labels: dict[str, str] = {}
    uuid, serial, asset = into.uuid, into.serial, into.asset
    arch, firmware = into.arch, into.firmware
    for other in others:
        macs += [m for m in other.macs if m not in macs]
        facts.update(other.facts)
        labels.update(other.labels)
        uuid = uuid or other.uuid
        serial = serial or other.serial
        asset = asset or other.asset
        arch = arch or other.arch
        firmware = firmware or other.firmware
    facts.update(into.facts)
    labels.update(into.labels)
    return replace(into, macs=tuple(macs), facts=facts, labels=labels, uuid=uuid,
                   serial=serial, asset=asset, arch=arch, firmware=firmware, updated=now)


# The fact naming the NICs a boot attached to a machine (by its UUID, serial or asset tag,
# or a discovered record of them merged: BootService._attach), comma-separated, until an
# operator lists them (a NIC list written by PATCH /machines/{ref}, `machines set --add-mac`
# or an import row: Core._patched, enroll._updated). Such a NIC is given neither the
# machine's install (BootService._unlisted_plan: a hold naming the command) nor its
# fixed_ipv4 (BootService.fixed_address): a UUID is broadcast in option 97 of the machine's
# every PXE DISCOVER and printed on manifests, a serial on labels, so any host on the VLAN
# could send one from a made-up MAC and be served the install script, its token and config
# (the cluster's join token), or hold the fixed address beside the machine (s46-attack #4,
# s50-attack). dnsmasq gives a dhcp-host address only to the MACs the operator listed;
# Tinkerbell serves only the MACs of its hardware records. The first NICs of a machine
# enrolled without a MAC are so named too, unless enroll.trust_first_nic (a closed factory
# floor; before session 50 they were trusted).
UNLISTED = "unlisted_nics"

# The fact naming the address a machine's install token was served to: the one address that
# gets it again (a device that reboots mid-install asks from the address it booted with:
# BootService), and where a restored machine's device was (enroll's claim refusal).
INSTALL_PEER = "install_peer"


# The most NICs a machine holds that boots attached and no operator listed: a server's ports
# booting before they are listed. Beyond it a boot attaches no more (BootService._adopt) and
# its NIC is held as one not listed: a host sending a machine's UUID from made-up MACs had
# each attached, a write of the whole machine (its NIC list longer each time) and two events
# apiece, without bound (s50-attack).
UNLISTED_MAX = 8


def unlisted_count(machine: Machine) -> int:
    """How many NICs :data:`UNLISTED` names on ``machine``."""
    text = machine.facts.get(UNLISTED)
    return text.count(",") + 1 if text else 0


def unlisted(machine: Machine, mac: str) -> bool:
    """Whether NIC ``mac`` (text, as ``str(MacAddress)``) is one a boot attached that no
    operator has listed (:data:`UNLISTED`)."""
    text = machine.facts.get(UNLISTED)
    return text is not None and mac.lower() in text.split(",")


def with_unlisted(facts: Mapping[str, str], macs: Iterable[MacAddress]) -> dict[str, str]:
    """``facts`` with ``macs`` added to :data:`UNLISTED`."""
    named = [m for m in facts.get(UNLISTED, "").split(",") if m]
    named += [str(m) for m in macs if str(m) not in named]
    return {**facts, UNLISTED: ",".join(named)}


def listed(facts: Mapping[str, str], macs: Iterable[MacAddress],
           kept: Iterable[MacAddress] | None = None) -> Mapping[str, str]:
    """``facts`` with ``macs`` (an operator's list) taken out of :data:`UNLISTED` (the fact
    dropped when none is left), and with ``kept`` (the machine's NICs after the edit) the
    NICs no longer the machine's too: one an operator removed counted against
    :data:`UNLISTED_MAX` for ever. ``facts`` itself when it names none of them."""
    text = facts.get(UNLISTED)
    if text is None:
        return facts
    gone = {str(m) for m in macs}
    still = None if kept is None else {str(m) for m in kept}
    left = [m for m in text.split(",") if m and m not in gone and (still is None or m in still)]
    if len(left) == len(text.split(",")):
        return facts
    out = {k: v for k, v in facts.items() if k != UNLISTED}
    if left:
        out[UNLISTED] = ",".join(left)
    return out


def require(machine: Machine) -> None:
    """At least one identifier a boot can be matched by; ValidationError naming ``mac``."""
    if not claims(machine):
        raise ValidationError("mac", "required: a machine needs at least one identifier, a "
                                     "MAC (mac, macs), a serial, an asset tag or a UUID")


def machine_version(machine: Machine) -> str:
    """What a machine's edit is compared on (its ``updated``, which every write of it
    moves: the store's compare-and-set), as the API's ETag carries it: exact (repr)."""
    return repr(machine.updated)


def require_version(machine: Machine, versions: Collection[str] | None) -> None:
    """The API's If-Match (RFC 9110 §13.1.1): ``machine`` at one of ``versions`` (None: any),
    else PreconditionFailed (412), before anything is written. Checked on each read of a
    compare-and-set loop, so a write between the check and the commit is read again."""
    if versions is not None and machine_version(machine) not in versions:
        raise PreconditionFailed(f"{machine.ref} changed since the version given (it is "
                                 f"{machine_version(machine)} now): read it again")


def claimed(kind: str, value: str, holder: Machine) -> Conflict:
    """The one wording the stores and the enrollment use when an identifier belongs to
    another machine: the holder by its hostname too (an id and a MAC alone sent the operator
    to look it up), and the ways out (s47-review). The API tells a token that may not read
    machines only that it is held (Api.allow)."""
    known = ", ".join(x for x in (holder.hostname, str(holder.mac) if holder.mac else "") if x)
    name = f"{holder.id} ({known})" if known else holder.id
    return Conflict(f"{kind} {value} already belongs to machine {name}: edit that one "
                    f"(netboot machines set {holder.ref}; PATCH /api/v1/machines/{holder.id}), "
                    f"remove it if its hardware is gone (netboot machines rm {holder.ref}), "
                    f"or give the right {kind}", field=kind,
                    holder=holder.id)
