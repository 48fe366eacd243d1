"""THE decision: what a machine boots, and why.

Every protocol asks here: the DHCP layer for a first stage (or silence), iPXE and pxelinux for a
boot plan. Nothing else decides. The rules, by machine state:

* unknown / discovered → the discovery policy: ``ignore`` (silent), ``hold`` (a visible retry
  loop until an operator approves), ``auto`` (rules assign cluster/role/profile, then install);
* installed / registered → boot the local disk (one-shot install), until reinstall is asked;
* failed → hold, so that a broken install does not loop; ``reinstall`` brings it back;
* any state whose lifecycle allows an install plan (:mod:`netboot.lifecycle`) → install with
  the profile of the machine or its group, issuing a fresh install token that lives for the
  profile's ``install_timeout`` (else ``token_ttl_seconds``);
* booting / installing (an install under way, the device rebooted) → the same install with
  the same token, to the address the token was served to only, and held once that token has
  expired; any other address is held without it (an operator reinstall serves a new one).

The states themselves change only through :mod:`netboot.lifecycle`.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import logging
import time
from collections.abc import Callable, Collection, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from json.encoder import encode_basestring as _quote
from typing import Any, Protocol, TypeVar

from netboot import groups as grouping
from netboot import identity, lifecycle
from netboot.arrival import arrived
from netboot.discovery import DiscoveryGuard, DiscoveryLimits
from netboot.eager import carry_on, eager, first_step
from netboot.enroll import Enroller, hostname_ok
from netboot.errors import DECIDE_ATTEMPTS, Conflict, StateChanged, StoreError, WritesRefused
from netboot.health import InventoryHealth
from netboot.identity import Identity, Resolution, Unseen
from netboot.inventory.base import SERVERS, Batch, GroupCounts, Store, batch_of
from netboot.inventory.view import InventoryView, SearchKept
from netboot.model import (
    Arch,
    BootAction,
    BootPlan,
    BootRequest,
    Cluster,
    Event,
    Firmware,
    FirstStage,
    Group,
    K3sJoin,
    LoaderChain,
    MacAddress,
    Machine,
    MachineState,
    Profile,
    Role,
    endpoint_host,
    endpoint_url,
    event_of,
    join_of,
    machine_changer,
    plan_of,
    slot_init,
    url_host,
)
from netboot.names import serves_cluster, valid_label
from netboot.tokens import TokenSource

# How old the view may be for a DHCP answer when this process wrote nothing since its last
# sync (InventoryView.fresh): what another process commits (the CLI) reaches DHCP answers
# within this bound (on PostgreSQL sooner: its NOTIFY sends the next answer to sync first).
# Firmware retransmits a DISCOVER after seconds (4 s in EDK2 and iPXE).
DHCP_VIEW_AGE = 0.05


LOCAL_STATES = frozenset({MachineState.INSTALLED, MachineState.REGISTERED})
INSTALL_PEER = identity.INSTALL_PEER  # looked up once: every install's path reads it


class AssetLookup(Protocol):
    def exists(self, path: str) -> bool: ...


@dataclass(frozen=True)
class BootSettings:
    policy: str = "ignore"  # ignore | hold | auto
    hold_retry_seconds: int = 15
    rules: tuple[Group, ...] = ()
    trusted_rules: frozenset[str] = frozenset()  # rules that install on request strings
    token_ttl_seconds: int = 3600  # install token lifetime when the profile names none
    cluster_domain: str | None = None  # DNS zone when netboot's DNS serves cluster names
    default_profile: str | None = None  # for machines whose own settings and group name none
    k3s_port: int = 6443
    # s36-journey: netboot's DHCP is authoritative, so a machine is at its fixed address
    # when it has one (names.address_of): a cluster's endpoint follows a server moved there.
    fixed_first: bool = False
    # enroll.trust_first_nic: the first NICs of a machine enrolled without a MAC are listed
    # as they attach (_attach), not held for an operator (identity.UNLISTED).
    trust_first_nic: bool = False


# Enum members a first install or config looks up on its way, looked up once: Python 3.11
# finds a member through EnumType's __getattr__ hook at each use, ~870 loop instructions
# (callgrind; a first install looked up 13, a first config 3: benchmarks/README.md s33-loop).
_DISCOVERED = MachineState.DISCOVERED
_INSTALL = BootAction.INSTALL
_INSTALL_PLAN = lifecycle.Trigger.INSTALL_PLAN
_INSTALL_AGAIN = lifecycle.Trigger.INSTALL_AGAIN
_UNLISTED = identity.UNLISTED  # looked up once: every install's path asks for it
_NO_ARCH = Arch.UNKNOWN
_NO_FIRMWARE = Firmware.UNKNOWN
# ... and those a first DHCP sighting looks up (its decision, its role, its loader, its
# record: nine, ~2 % of the event loop's instructions a first DISCOVER; benchmarks/README.md
# s36-dhcp1st).
_UEFI_FIRMWARES = (Firmware.UEFI, Firmware.UEFI_HTTP)
_IPXE = Firmware.IPXE
_UBOOT = Firmware.UBOOT
_RPI = Firmware.RPI
_AGENT = Role.AGENT  # every decision's role, when neither machine nor group sets one
# The event a decision that installs nothing notes (a repeat of it writes nothing).
_NOTED = {BootAction.LOCAL: "local-boot", BootAction.HOLD: "hold"}
# Decisions kept for repeated requests (BootService.plan), one per NIC: a storm's
# devices and held machines' retry loops, not every machine of a large inventory.
REPEATS_KEPT = 8192
# Distinct DHCP requests of one NIC kept while a record of that NIC is under way
# (BootService._record_dhcp_soon): a firmware asks two to four times per boot, all alike.
WAITING_PER_NIC = 4
# Seconds of paced DHCP records run per turn of the event loop (BootService._pace_records):
# a few records, then the datagrams that came meanwhile are read and answered.
RECORD_SLICE = 0.001


def _asked_again(profile: str) -> str:
    """The note of an install under way asked for its script again (BootService)."""
    return (f"install script again for the install under way (profile {profile}, the same "
            "install token)")


@dataclass(frozen=True, eq=False, slots=True)
class _Repeat:
    """A decision that wrote nothing, and what it was taken from."""

    request: BootRequest
    machine: Machine  # the view's object: replaced when the machine's value changes
    shared: int  # InventoryView.shared when taken
    # InventoryView.held_changes when its machine was looked up: while the view's has not
    # moved, the request's look-up finds what it found then (the machine, nothing to absorb
    # or to disagree with), and is not made again.
    held: int
    settings: BootSettings
    kind: str  # the event it notes, and its message: a repeat writes nothing only while
    message: str  # that note is still the machine's newest
    plan: BootPlan
    # An install under way: its token's expiry, after which the same request is held.
    expires: float | None = None


@dataclass(frozen=True, eq=False, slots=True)
class _Joining:
    """What every node of a managed cluster that is neither its init node nor one of its
    registered servers is told to join (BootService._k3s_join), and what it was read from."""

    shared: int  # InventoryView.shared when read: a setting, cluster or server changed since
    cluster: Cluster  # the view's object (replaced when the cluster changes)
    settings: BootSettings  # the port and zone of the endpoint, the zone of the TLS names
    ids: frozenset[str]  # the init node, the registered servers, the node it was read for
    endpoint: str | None
    san: tuple[str, ...]
    # The cluster's own labels and taints, as a node of no group joins with them: one dict
    # shared by those nodes' joins (_node_join made one a config, ~30 bytecodes).
    labels: Mapping[str, str]
    taints: tuple[str, ...]


# Clusters whose join is kept (_Joining): a site has a few, a fleet of edge sites hundreds
# (one cluster a site). Past the bound, a storm's nodes of clusters drawn at random mostly
# missed it (64 of 200: ~2/3 of first configs read the init node and servers again,
# ~45,000 loop instructions more a first config, s44-config); an entry is a few ids.
_FEW_CLUSTERS = 1024


@dataclass(eq=False, slots=True)
class _Seen:
    """What one NIC's DHCP request was found to be, for its repeats (a firmware asks two to
    four times per boot; a storm's closed loop far more): BootService.first_stage."""

    request: BootRequest
    identity: Identity  # Identity.of_request(request)
    keys: list[tuple[str, bytes | str]]  # identity.lookup_keys(): what the view is asked
    note: str  # _dhcp_note(request): the step its record notes
    # The loader chain decided for ``machine`` (the view's object, replaced when its value
    # changes) while the view's ``rules`` counter (groups, profiles: what _chain reads
    # besides the machine) and the settings were these: the chain still, while all three are.
    machine: Machine | None = None
    rules: int = -1
    settings: BootSettings | None = None
    chain: tuple[LoaderChain | None, str] = (None, "")
    quiet: Machine | None = None  # a machine (object) that ``request`` teaches nothing
    # What ``request`` teaches a machine (object), with the identifier kinds others hold
    # (_taken): _news' answer found by the decision (_tells_more), for its record's learn()
    # to build the copy from instead of working it out again.
    news: tuple[Machine, frozenset[str], dict[str, Any]] | None = None
    # The last decision taken for a request of this NIC from a fresh view, for
    # BootService.repeat_guard (the DHCP server asks right after it).
    decided: _Decided | None = None
    # The look-up from the view's memory of a decision whose record is paced, and the view's
    # ``held_changes`` then: the record's look-up while the view has not changed since
    # (BootService._record_now, which drops it).
    res: Resolution | None = None
    looked: int = -1
    # A paced record of ``request`` was started (_record_dhcp_soon). A memo is never reused
    # for another request (_seen_dhcp makes a new one), and any other request of the NIC
    # replaces it: so while the NIC's record is under way and this memo is the NIC's, the
    # record is this request's, and a repeat of it (equal) teaches it nothing more.
    recorded: bool = False


@dataclass(frozen=True, eq=False, slots=True)
class _Decided:
    """What BootService._first_stage answered one request object, and from what."""

    request: BootRequest  # that very object (the DHCP server asks with it)
    res: Resolution
    args: tuple[LoaderChain | None, str]  # BootService.loader's, after the request
    stage: FirstStage | None
    # Decided in a task after a sync (the view was not fresh: a commit of this process
    # since the last sync, such as a group commit of records), or after another wait: the
    # DHCP server asks for the repeat guard only once its own coroutine resumes, a turn of
    # the loop or more later, when a sync, an adoption, a file or the settings may have
    # moved, and a guard taken then would vouch for an answer decided before. So it is
    # taken at the decision, from what the decision read (None: no such check), and
    # handed out as it is (repeat_guard).
    later: bool = False
    guard: _DhcpRepeat | None = None


# Made for each DHCP decision whose answer may be kept (every repeat decided in full): the
# frozen __init__'s setattr per field was ~9,900 instructions a _Decided, this ~3,900
# (callgrind, benchmarks/README.md s44-sighting).
slot_init(_Decided)


@dataclass(eq=False, slots=True)
class _DhcpRepeat:
    """BootService.repeat_guard's check: True while a repeat of ``request`` (the same bytes
    from the same place: an equal request) would be answered as it was by
    :meth:`BootService.first_stage`, from memory, recording nothing.

    The same tests the decision makes, in its order, on what they read: the inventory up
    and the view fresh (else the decision syncs first), the view's rules counter and the
    settings (groups, profiles, clusters, the policy: the chain; not machines added or
    removed, which the identifiers' look-ups see where they matter), each
    identifier of the request held by the same machine object (the view replaces a
    machine's object when its value changes: state, identifiers, facts), no record of the
    NIC under way, nothing new to record (``_tells_more``: facts it would teach, the step
    noted last; an unknown device's discovery budget, refused as the decision would refuse
    it), and each loader file the decision looked for still there or still missing."""

    service: BootService
    seen: _Seen
    request: BootRequest
    res: Resolution
    found: tuple[tuple[str, bytes | str, Machine | None], ...]  # kind, view key, holder
    rules: int  # InventoryView.rules
    settings: BootSettings
    assets: tuple[tuple[str, bool], ...]  # BootService._assets_read: what the loader found
    args: tuple[LoaderChain | None, str]  # the decision's chain (BootService.loader's)
    # The view's held_changes when ``found`` was last seen to hold: while it has not moved,
    # every held() answers as then (InventoryView.held_changes), so a repeat while the view
    # is unchanged skips the look-ups: ~4,400 of a repeat's ~36,600 instructions
    # (benchmarks/README.md, s38-dhcprep).
    held_at: int
    # The recorder's ``told`` when _tells_more last said False (-1: not yet asked): while
    # it has not moved (and the machine is the one held), it says False again (~3,300
    # instructions a repeat; benchmarks/README.md, s38-dhcprep).
    told_at: int = -1

    def __call__(self) -> bool:
        service = self.service
        view = service._view
        if not service.health.up or not view.fresh(DHCP_VIEW_AGE) \
                or view.rules != self.rules or service.settings is not self.settings:
            return False
        if view.held_changes != self.held_at:
            held = view.held
            for kind, key, machine in self.found:
                if held(kind, key) is not machine:
                    if not self._decided_alike():
                        return False
                    break
            self.held_at = view.held_changes
        request = self.request
        recording = service._recording
        if recording and request.mac in recording:  # (no MAC hashed while none is)
            # Its own paced record under way (the memo still the NIC's: _Seen.recorded):
            # what a repeat would teach, that record does; told after it, below.
            seen = self.seen
            return seen.recorded and service._seen.get(request.mac) is seen \
                and self._files_as_read()
        machine = self.res.machine
        if machine is None:
            if not service.discovery.refuses(request, service._clock()):
                return False
        elif self.told_at != service._recorder.told:
            if service._tells_more(request, self.res, machine, self.seen):
                return False
            self.told_at = service._recorder.told
        return self._files_as_read()

    def _decided_alike(self) -> bool:
        """An identifier's holder replaced: whether the decision, taken again from the view
        now, finds the same machine (by this NIC, nothing to absorb, no other machine named),
        in the same state, with the same chain; then the guard goes on from it (what it
        found, the machine, and _tells_more asked again: what the decision's record asks).
        The view replaces a machine's object at each change of its value, and each group
        commit's learnt facts are one (boot.learn): every NIC's first repeat after its
        record was written was decided in full again (~215,000 instructions, once a NIC of
        the +enrolled mix; benchmarks/README.md, s43-dhcp). The chain is worked out again (a
        group's selector may read a label or a learnt fact); the settings, the rules and
        the files are the guard's other checks."""
        old = self.res.machine
        if old is None:
            return False  # an unknown device now held: decided in full
        service, seen, request = self.service, self.seen, self.request
        view = service._view
        res = identity.held_lookup(view, seen.identity, seen.keys)
        if res is None:
            return False
        new = res.machine
        if new is None or new.id != old.id or new.state != old.state or res.absorb \
                or res.disagree or request.mac not in new.macs:
            return False
        if request.firmware in _UEFI_FIRMWARES \
                and service._held_chain(new, request) != self.args:
            return False
        held = view.held
        found: list[tuple[str, bytes | str, Machine | None]] = []
        for kind, key, _ in self.found:
            holder = held(kind, key)
            if isinstance(holder, Unseen):
                return False
            found.append((kind, key, holder))
        self.found, self.res, self.told_at = tuple(found), res, -1
        return True

    def _files_as_read(self) -> bool:
        """Each loader file the decision looked for still there or still missing."""
        exists = self.service._assets.exists
        for name, found in self.assets:  # noqa: SIM110 - no generator per datagram
            if exists(name) is not found:
                return False
        return True


# First-stage loaders by chain, firmware and architecture, in order of preference.
# iPXE: snponly.efi binds only to the NIC it was loaded from (protocols.md §2.2), so it is
# preferred for UEFI. shim-grub: shim (Microsoft-signed) loads grub<arch>.efi from its own
# directory; Debian's signed netboot GRUB (grubnet*.efi.signed, served under that name) then
# reads $prefix/grub.cfg with its built-in prefix "/grub". Where shim is not installed for an
# arch (arm64 boxes rarely enforce Secure Boot), the signed GRUB is handed out directly.
_LOADERS: dict[tuple[LoaderChain, Firmware, Arch], tuple[str, ...]] = {
    (LoaderChain.IPXE, Firmware.BIOS, Arch.X86): ("undionly.kpxe", "undionly.pxe"),
    (LoaderChain.IPXE, Firmware.BIOS, Arch.X86_64): ("undionly.kpxe", "undionly.pxe"),
    (LoaderChain.IPXE, Firmware.BIOS, Arch.UNKNOWN): ("undionly.kpxe",),
    (LoaderChain.IPXE, Firmware.UEFI, Arch.X86_64): ("snponly.efi", "ipxe.efi"),
    (LoaderChain.IPXE, Firmware.UEFI, Arch.X86): ("i386/snponly.efi", "i386/ipxe.efi"),
    (LoaderChain.IPXE, Firmware.UEFI, Arch.ARM64): ("arm64/snponly.efi", "arm64/snp.efi",
                                                    "arm64/ipxe.efi"),
    (LoaderChain.IPXE, Firmware.UEFI, Arch.ARM32): ("arm32/snp.efi", "arm32/ipxe.efi"),
    (LoaderChain.IPXE, Firmware.UEFI_HTTP, Arch.X86_64): ("ipxe.efi", "snponly.efi"),
    (LoaderChain.IPXE, Firmware.UEFI_HTTP, Arch.ARM64): ("arm64/ipxe.efi", "arm64/snp.efi"),
    (LoaderChain.SHIM_GRUB, Firmware.UEFI, Arch.X86_64): ("shimx64.efi",),
    (LoaderChain.SHIM_GRUB, Firmware.UEFI, Arch.ARM64): ("shimaa64.efi", "grubaa64.efi"),
    (LoaderChain.SHIM_GRUB, Firmware.UEFI_HTTP, Arch.X86_64): ("shimx64.efi",),
    (LoaderChain.SHIM_GRUB, Firmware.UEFI_HTTP, Arch.ARM64): ("shimaa64.efi", "grubaa64.efi"),
}

# What the first stage of the shim-grub chain fetches next from its own directory, under the
# name shim asks for (shim's DEFAULT_LOADER), and where Debian's packages install it; the
# asset tree serves the first file found (netboot.files.FileTree aliases).
# The signed name comes first: /usr/lib/shim holds an unsigned shimx64.efi beside
# shimx64.efi.signed, which Secure Boot firmware would refuse ("Access Denied").
SIGNED_FILES: dict[str, tuple[str, ...]] = {
    "shimx64.efi": ("shimx64.efi.signed", "shimx64.efi"),
    "shimaa64.efi": ("shimaa64.efi.signed", "shimaa64.efi"),
    "grubx64.efi": ("x86_64-efi-signed/grubnetx64.efi.signed", "grubx64.efi"),
    "grubaa64.efi": ("arm64-efi-signed/grubnetaa64.efi.signed", "grubaa64.efi"),
}


def loader_names() -> tuple[str, ...]:
    """Every first-stage file name netboot may hand out (pinned in the asset tree)."""
    names = {name for names in _LOADERS.values() for name in names} | set(SIGNED_FILES)
    return tuple(sorted(names))


def loader_aliases() -> dict[str, tuple[str, ...]]:
    """Pinned name → the file names it may be found under (the packages' own names)."""
    return {name: SIGNED_FILES.get(name, (name,)) for name in loader_names()}


def default_chain(firmware: Firmware, arch: Arch) -> LoaderChain:
    """The chain when no machine, group or profile chooses: Debian has no arm64 iPXE."""
    if firmware in (Firmware.UEFI, Firmware.UEFI_HTTP) and arch == Arch.ARM64:
        return LoaderChain.SHIM_GRUB
    return LoaderChain.IPXE


def learn(machine: Machine, request: BootRequest, now: float,
          taken: frozenset[str] = frozenset(), seen: Identity | None = None) -> Machine:
    """The machine with what this request told about it added; nothing known is lost.

    Identity fields (UUID, serial, asset) are kept once known, and learnt only when they are
    real identifiers: a firmware placeholder ("To be filled by O.E.M.") or one that ``taken``
    says another machine holds stays a fact, never an identity. The newest architecture wins
    (iPXE's cpuid check is better than option 93's "x86"); the first firmware seen is what the
    machine *is* ("UEFI PXE" tells more than the iPXE it chainloads).
    """
    news = _news(machine, request, taken, seen)
    # One copy, stamped: anything in ``news`` differs from what the machine holds.
    return machine if news is None else _learnt_copy(machine, news, now)


def teaches(machine: Machine, request: BootRequest, taken: frozenset[str] = frozenset(),
            seen: Identity | None = None) -> bool:
    """Whether :func:`learn` would change ``machine``: the same rules, without the copy
    (every first request of a storm's machines is asked this before it is recorded)."""
    return _news(machine, request, taken, seen) is not None


def _news(machine: Machine, request: BootRequest, taken: frozenset[str],
          seen: Identity | None = None) -> dict[str, Any] | None:
    """The fields :func:`learn` sets, or None when the request tells nothing new.
    ``seen``: ``Identity.of_request(request)``, when the caller keeps it (_Seen).

    Written out field by field (no getattr by name, no closure, no generator): every first
    install and config asks it, and the loops were half of its ~3.9 µs (session 24)."""
    told: dict[str, str] = {}
    r = request
    # The firmware's strings as facts, in this order (the order the facts are shown in).
    if r.manufacturer:
        told["manufacturer"] = r.manufacturer
    if r.product:
        told["product"] = r.product
    if r.hostname and hostname_ok(r.hostname):  # else ignored, its note says (_dhcp_note)
        told["dhcp_hostname"] = r.hostname
    if r.platform:
        told["platform"] = r.platform
    if r.relay:
        told["relay"] = r.relay
    if r.interface:
        told["interface"] = r.interface
    if r.remote_addr and not (r.relay and r.via == "dhcp"):
        # A relayed DHCP request comes from its relay agent's address (RFC 2131 §4.1), told
        # as ``relay``: not the machine's, which its next HTTP request would set back, a
        # row rewrite at every boot of a machine behind a relay.
        told["remote_addr"] = r.remote_addr
    if seen is None:
        seen = Identity.of_request(request)
    # The request's identifiers kept as facts when they are no identity (a placeholder) or
    # another machine holds them; each learnt as the identity only when the machine has
    # none and no other machine holds it.
    uuid, serial, asset = r.uuid, r.serial, r.asset
    seen_uuid, seen_serial, seen_asset = seen.uuid, seen.serial, seen.asset
    if uuid and (seen_uuid is None or "uuid" in taken):
        told["uuid"] = uuid
    if serial and (seen_serial is None or "serial" in taken):
        told["serial"] = serial
    if asset and (seen_asset is None or "asset" in taken):
        told["asset"] = asset
    if taken:
        if "uuid" in taken:
            seen_uuid = None
        if "serial" in taken:
            seen_serial = None
        if "asset" in taken:
            seen_asset = None
    uuid = machine.uuid or seen_uuid
    serial = machine.serial or seen_serial
    asset = machine.asset or seen_asset
    arch = r.arch if r.arch != _NO_ARCH else machine.arch
    firmware = machine.firmware or (r.firmware if r.firmware != _NO_FIRMWARE else None)
    facts = machine.facts
    # A device that tells what is known already (every retry of a held machine, every
    # repeated step of a storm) changes nothing: answered without building a copy to compare.
    if (uuid == machine.uuid and serial == machine.serial and asset == machine.asset
            and arch == machine.arch and firmware == machine.firmware):
        for k, v in told.items():
            if k not in facts or facts[k] != v:
                break
        else:
            return None
    return {"facts": {**facts, **told}, "uuid": uuid, "serial": serial, "asset": asset,
            "arch": arch, "firmware": firmware}


# learn()'s copy of its machine, the fields _news sets and the stamp, by position
# (model.machine_changer): its dict spread by ** into replace_machine's parameters cost each
# first DHCP sighting's record ~5,600 loop instructions more, a tenth of it (callgrind,
# benchmarks/README.md s44-sighting).
_learnt_fields: Callable[
    [Machine, Mapping[str, str], str | None, str | None, str | None, Arch | None,
     Firmware | None, float], Machine] = machine_changer(
    "facts", "uuid", "serial", "asset", "arch", "firmware", "updated")


def _learnt_copy(machine: Machine, news: dict[str, Any], now: float) -> Machine:
    """``replace_machine(machine, **news, updated=now)`` for _news' answer ``news``."""
    return _learnt_fields(machine, news["facts"], news["uuid"], news["serial"], news["asset"],
                          news["arch"], news["firmware"], now)


def _learnt_again(machine: Machine, learnt: Machine, request: BootRequest, now: float,
                  taken: frozenset[str], seen: Identity | None, current: Machine) -> Machine:
    """BootService._learn_later's redo: ``learnt`` (:func:`learn` of ``machine``) learnt
    again on ``current``, the machine as stored when the facts are written."""
    # Still the object it was learnt on (the view replaces a machine's object when its
    # value changes): learn() would give the same value again.
    return learnt if current is machine else learn(current, request, now, taken, seen)


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# A first install's copy of its machine (BootService._install_plan), its fields by position:
# state, updated, state_since, facts, uuid, serial, asset, arch, firmware, token_hash,
# install_token, token_expires, cluster, role.
_install_copy: Callable[
    [Machine, MachineState, float, float | None, Mapping[str, str], str | None, str | None,
     str | None, Arch | None, Firmware | None, str, str, float, str | None, Role | None],
    Machine] = machine_changer(
    "state", "updated", "state_since", "facts", "uuid", "serial", "asset", "arch", "firmware",
    "token_hash", "install_token", "token_expires", "cluster", "role")


class BootService:
    """Implements the DHCP layer's ``BootDecider`` and the HTTP/TFTP plan lookups."""

    def __init__(
        self,
        store: Store,
        assets: AssetLookup,
        settings: BootSettings,
        enroller: Enroller,
        *,
        clock: Callable[[], float] = time.time,
        new_token: Callable[[], str] | None = None,
        discovery: DiscoveryLimits | None = None,
        logger: logging.Logger | None = None,
        health: InventoryHealth | None = None,
    ) -> None:
        self._store = store  # writes; reads go through the view, kept exact by sync()
        self._view = InventoryView(store)
        self._search = SearchKept()  # matching_text's strings, kept for the next search
        # Whether the inventory answers (kept by the service's watcher and by _fresh).
        self.health = health or InventoryHealth()
        self._recorder = enroller.recorder  # one per process: history keeps its order
        self._recorder.newest = self._newest
        self._recorder.teaches = _learnt_again  # _learn_later's redos: Batch.learnt
        self._recorder.adopt = self._view.adopt
        self._assets = assets
        self.settings = settings
        self._enroller = enroller
        self._clock = clock
        # Install tokens as secrets.token_urlsafe(24) makes them, drawn in bulk (tokens.py).
        self._new_token = new_token or TokenSource()
        self._log = logger or logging.getLogger(__name__)
        self._background: set[asyncio.Task[None]] = set()
        # NIC -> [its lock, how many hold it or wait for it] (_Locked): only while one does.
        # Keyed by the MacAddress itself (bytes: equal NICs, equal keys), not its text; a
        # machine's id (a str: no NIC's key) for what all its NICs write (_adopt).
        self._locks: dict[MacAddress | str, list[Any]] = {}
        # NIC -> the last decision that wrote nothing, to answer its repeats (plan);
        # oldest first, bounded.
        self._repeats: collections.OrderedDict[MacAddress, _Repeat] = collections.OrderedDict()
        # NIC -> its DHCP requests that came while a record of it was under way, looked at
        # once that record is done (_record_dhcp_soon).
        self._recording: dict[MacAddress, list[BootRequest]] = {}
        # NIC -> what its last DHCP request was found to be (_Seen), oldest first, bounded.
        self._seen: collections.OrderedDict[MacAddress, _Seen] = collections.OrderedDict()
        # DHCP records of known machines, run one after another by one task (_pace_records),
        # each with the memo its decision made (_Seen): in a storm of first requests the
        # records fall thousands behind the answers, past the REPEATS_KEPT memos kept by NIC.
        self._paced: collections.deque[tuple[BootRequest, _Seen | None]] = (
            collections.deque())
        self._pacer: asyncio.Task[None] | None = None
        # First stages already described, by everything their description says (loader()).
        self._stages: collections.OrderedDict[tuple[Any, ...], FirstStage] = (
            collections.OrderedDict())
        # Cluster name -> what every joining node of it is told alike (_Joining), while the
        # view's ``shared`` and the cluster and settings objects are the same (_k3s_join).
        self._joining: collections.OrderedDict[str, _Joining] = collections.OrderedDict()
        # (machine id, NIC, fixed address) said not given for being unlisted (fixed_address).
        self._unlisted_seen: set[tuple[str, str, str]] = set()
        # What unknown devices may write (records per source, in all); its counters are read
        # by metrics.
        self.discovery = DiscoveryGuard(store, discovery or DiscoveryLimits(), logger=self._log)

    @property
    def counts(self) -> GroupCounts:
        """Machines per cluster and state (the metrics scrape, the fleet status): from the
        view once loaded, exact after its sync; the store's one grouped read until then."""
        return self._view

    def fixed_holder(self, ipv4: str) -> str | None:
        """The machine whose ``fixed_ipv4`` this is (the view's), for the DHCP pool."""
        return self._view.fixed_holder(ipv4)

    async def fixed_address(self, mac: str) -> str | None:
        """The ``fixed_ipv4`` of the machine NIC ``mac`` is (the authoritative pool's answer
        for it), from the view as a decision reads it (synced first unless fresh, as
        :meth:`first_stage` does): no store read of the whole machine per DHCP packet, and
        the same machines the pool's reservations (:meth:`fixed_holder`) come from. A sync
        that fails answers from the view as it is (:meth:`_fresh`, as a first stage is): the
        pool's address instead would put the machine where its DNS record is not."""
        view = self._view
        if self.health.up and not view.fresh(DHCP_VIEW_AGE):
            await self._fresh()
        machine = await view.machine_by("mac", mac)
        if machine is None:
            return None
        fixed = machine.fixed_ipv4
        # A NIC a boot attached by the machine's UUID or serial and no operator listed gets
        # a pool address: that UUID is any listener's (identity.UNLISTED).
        if fixed is not None and machine.facts and identity.unlisted(machine, mac):
            self._unlisted_told(machine, mac, fixed)
            return None
        return fixed

    def _unlisted_told(self, machine: Machine, mac: str, fixed: str) -> None:
        """Say, once a NIC and fixed address while this process runs (a DHCP client asks
        every few seconds), why ``mac`` is not given its machine's fixed address."""
        key = (machine.id, mac, fixed)
        told = self._unlisted_seen
        if key in told:
            return
        if len(told) >= REPEATS_KEPT:
            told.clear()
        told.add(key)
        self._log.warning(
            "dhcp: NIC %s of machine %s is not given its fixed address %s: a boot attached it "
            "(by its UUID, serial or asset tag) and no operator listed it, so it gets a pool "
            "address. Is it the machine's? netboot machines set %s --add-mac %s", mac,
            machine.ref, fixed, machine.id, mac)

    async def same_machine(self, mac: str, other: str) -> bool:
        """Whether NIC ``other`` is another of ``mac``'s machine (the view's, as
        :meth:`fixed_address` read it just before): the DHCP server gives a machine's
        fixed_ipv4 held by its other NIC, as dnsmasq does within one dhcp-host
        (config_has_mac; LeasePool.fixed_refused)."""
        machine = await self._view.machine_by("mac", mac)
        return machine is not None and any(str(nic) == other for nic in machine.macs)

    async def fixed_moved(self, old: str, new: str, ipv4: str) -> None:
        """Record that the DHCP server gave ``new`` its machine's fixed_ipv4 ``ipv4`` and
        ended ``old``'s lease of it (LeasePool.moved_from): an event of the machine naming
        both NICs, so that a MAC attached by a spoofed UUID taking it is seen in its
        history, not only in the log."""
        machine = await self._view.machine_by("mac", new)
        if machine is not None:
            self._recorder.record(Event(
                machine.id, self._clock(), "fixed address moved",
                f"fixed address {ipv4} moved from NIC {old} to NIC {new}",
                {"from": old, "to": new, "ipv4": ipv4}))

    async def load_view(self) -> None:
        """Read the whole inventory into memory (``netboot serve``, in the background once it
        answers): from then on a decision reads nothing from the store but its change feed."""
        await self._view.load()

    def held_machines(self) -> Iterator[Machine] | None:
        """Every machine as the loaded view holds it, one at a time (None until
        :meth:`load_view` is done)."""
        return self._view.held_machines()

    async def held_counts(self) -> dict[tuple[str | None, MachineState], int] | None:
        """The machines by cluster and state as the loaded view counts them (None until it
        is loaded: never the store's read of every machine)."""
        return await self._view.state_counts() if self._view.loaded else None

    # -- DHCP -------------------------------------------------------------------------
    def first_stage(self, request: BootRequest) -> asyncio.Future[FirstStage | None]:
        """What the firmware's DHCP answer points at, or None to stay silent.

        Called on the DHCP path, which must answer within ~2 s (iPXE drops late proxy offers,
        protocols.md §1.6), and in a storm thousands of times a second. Decided from the
        in-memory view; when it holds everything needed the future is already done (the DHCP
        server answers without a task), else it finishes after the store read.
        """
        decision = self._first_stage_started(request)
        return decision if isinstance(decision, asyncio.Task) else eager(decision)

    def first_stage_now(self, request: BootRequest,
                        ) -> FirstStage | asyncio.Task[FirstStage | None] | None:
        """:meth:`first_stage` for the DHCP server (pxe.BootDecider takes a value): a
        decision taken at once is the value itself, not a future already done. That future
        cost each DISCOVER an ``asyncio.get_running_loop()``, whose fork check is a getpid(2)
        system call in Python 3.11 (~0.5 µs on this project's VM, which callgrind's counts
        do not show), and the future's creation and result (benchmarks/README.md,
        s37-dhcp1st). An error raised while deciding is the caller's."""
        decision = self._first_stage_started(request)
        if isinstance(decision, asyncio.Task):
            return decision
        done, value = first_step(decision)
        return value if done else carry_on(decision, value)

    def _first_stage_started(self, request: BootRequest,
                             ) -> asyncio.Task[FirstStage | None] \
            | Coroutine[Any, Any, FirstStage | None]:
        """The decision's task when the view must be synced first, else its coroutine, not
        yet started (to be run at once as far as it goes)."""
        # From memory when this process wrote nothing since a recent sync (what other
        # processes commit is seen within DHCP_VIEW_AGE); else a sync first, which also
        # notices an unreachable inventory: then the view answers as it is and nothing is
        # recorded.
        if self.health.up and not self._view.fresh(DHCP_VIEW_AGE):
            # The sync is a store read, which must start in a task (the DHCP server asks
            # from its datagram callback, and asyncpg's pool waits for a connection under
            # asyncio.timeout, which refuses to run outside one).
            return asyncio.get_running_loop().create_task(
                self._first_stage(request, fresh=False))
        return self._first_stage(request, fresh=self.health.up)

    async def _first_stage(self, request: BootRequest, *, fresh: bool) -> FirstStage | None:
        """``fresh``: the view is known current; else it is synced here when the inventory
        answers."""
        later = not fresh  # in a task (_first_stage_started): the guard taken at the end
        fresh = fresh or (self.health.up and await self._fresh())
        seen = self._seen_dhcp(request)
        seen.decided = None
        # From the view's memory without a coroutine where it can tell (loaded: always), as
        # plan() looks up: _resolve's coroutine only where the store must be read.
        view = self._view
        res = identity.held_lookup(view, seen.identity, seen.keys)
        looked = view.held_changes  # -1: not answered from memory
        awaited = False  # a wait after the sync: the view may have moved while deciding
        if res is None:
            res, looked, awaited = await self._resolve(request, seen), -1, True
        machine = res.machine
        # Whether a record of this request was under way before this decision (a repeat).
        repeat = seen.recorded and request.mac in self._recording
        if fresh:
            self._record_dhcp_soon(request, res, seen, looked)
        if (machine is None or machine.state == _DISCOVERED) \
                and self.settings.policy == "ignore":
            if not await self._awaiting_nic():
                return None
            fresh = False  # decided from more than repeat_guard checks: not for repeats
        args: tuple[LoaderChain | None, str]
        if request.firmware not in _UEFI_FIRMWARES:
            args = (None, "")
        elif machine is None:
            args = (None, "default for the architecture")
        else:
            rules = self._view.rules
            if seen.machine is not machine or seen.rules != rules \
                    or seen.settings is not self.settings:
                # Taken with the counter read before: a change while deciding makes it stale.
                # Without a coroutine where the view holds the settings (loaded: always).
                chain = self._held_chain(machine, request)
                if chain is None:
                    chain, awaited = await self._chain(machine, request), True
                seen.chain = chain
                seen.machine, seen.rules, seen.settings = machine, rules, self.settings
            args = seen.chain
        stage = self.loader(request, *args)
        if fresh and (repeat or request.mac not in self._recording):
            # While a record of the NIC is under way repeat_guard keeps no answer for the
            # request that started it (not made then, nor kept alive with the memo, for
            # every first request of a storm: the guard and the kept answer were ~63,000
            # instructions more a first DISCOVER), nor for another request. For a repeat
            # of the request recorded, it does: the closed loop's repeats of a machine seen
            # for the first time were each decided in full until the record was written
            # (~215,000 instructions each; benchmarks/README.md, s42-dhcp).
            seen.decided = _Decided(request, res, args, stage)
            if later or awaited:
                # Its DHCP server asks for the guard a turn of the loop or more from now.
                # A stale view's DISCOVERs (each after a group commit, until the sync) were
                # answered but none kept: each NIC's next repeat was decided in full again.
                # Taken now, where nothing was awaited since the sync (what the guard reads
                # is what the decision read); none where the store's or the chain's read
                # was (the view may have moved in between).
                seen.decided = _Decided(request, res, args, stage, True,
                                        None if awaited else
                                        self._guard(seen, request, res, args))
        return stage

    def repeat_guard(self, request: BootRequest,
                     stage: FirstStage) -> Callable[[], bool] | None:
        """For the DHCP server's answer cache (netboot.servers.dhcp), asked right after
        :meth:`first_stage` answered ``request`` with ``stage`` at once (a future already
        done: decided from memory, nothing awaited in between), or once its awaited
        decision is done (then the check taken when it decided: _Decided.later): a check
        that stays True while a request equal to this one would be answered ``stage``
        again, from memory, writing nothing. None when no such check can be made: the
        decision started a record (the repeat after it is decided in full), the view could
        not tell without the store, the inventory is away, or ``ignore`` let an unknown NIC
        boot."""
        seen = self._seen.get(request.mac)
        decided = None if seen is None else seen.decided
        if seen is None or decided is None or decided.request is not request \
                or decided.stage is not stage:
            return None
        if decided.later:
            return decided.guard
        return self._guard(seen, request, decided.res, decided.args)

    def _guard(self, seen: _Seen, request: BootRequest, res: Resolution,
               args: tuple[LoaderChain | None, str]) -> _DhcpRepeat | None:
        """:meth:`repeat_guard`'s check of the decision ``res`` (with the chain ``args``)
        of ``request``, from the view, the settings and the files as they are now."""
        if not self.health.up or (request.mac in self._recording and not seen.recorded):
            return None
        view = self._view
        found: list[tuple[str, bytes | str, Machine | None]] = []
        for kind, key in seen.keys:
            held = view.held(kind, key)
            if isinstance(held, Unseen):
                return None
            found.append((kind, key, held))
        machine = res.machine
        if machine is not None and (res.absorb or res.disagree
                                    or request.mac not in machine.macs):
            return None  # such requests are recorded (_tells_news): never repeats
        return _DhcpRepeat(self, seen, request, res, tuple(found), view.rules,
                           self.settings, self._assets_read(request, args[0]), args,
                           view.held_changes)

    def _seen_dhcp(self, request: BootRequest) -> _Seen:
        """The NIC's memo for this request: its identity worked out once per distinct
        request, not per retransmission."""
        seen = self._seen.get(request.mac)
        if seen is not None and seen.request == request:
            return seen
        known = Identity.of_request(request)
        seen = _Seen(request, known, known.lookup_keys(), _dhcp_note(request))
        if request.mac != identity.NO_NIC_BYTES:  # many devices at once, not one NIC
            _keep(self._seen, request.mac, seen, REPEATS_KEPT)
        return seen

    def _record_dhcp_soon(self, request: BootRequest, res: Resolution,
                          seen: _Seen | None = None, looked: int = -1) -> None:
        """Record what a DHCP request told in the background, unless it told nothing new.

        A firmware asks two to four times per boot (retransmissions, then :4011) and a storm
        repeats that for every device: a machine known here whose facts would not change and
        whose newest event is this same step writes nothing and costs no task; an unknown
        device whose source has spent its discovery budget neither.

        One record per NIC at a time: a request that comes while its NIC's record is under
        way (a retransmission, or any repeat once the loop is busy, when records fall behind
        and a task per request only made them fall further) waits for it, and is then looked
        at against what it wrote: a repeat then writes nothing, costs no second task and
        spends no discovery budget. ``looked``: the view's ``held_changes`` when ``res`` was
        looked up from its memory (-1: read from the store)."""
        mac = request.mac
        waiting = self._recording.get(mac)
        if waiting is not None:
            # A repeat of the request whose record is under way (seen.recorded) teaches
            # nothing that record does not: not queued to be judged after it (which made
            # that record take the coroutine's path, _record_now, and looked it up again).
            if (seen is None or not seen.recorded) and request not in waiting \
                    and len(waiting) < WAITING_PER_NIC:
                waiting.append(request)
            return
        if not self._tells_news(request, res, seen):
            return
        if mac == identity.NO_NIC_BYTES:  # not one NIC: recorded alone, as it comes
            self._spawn(self._record_dhcp(request, admitted=res.machine is None))
            return
        self._recording[mac] = []
        machine = res.machine
        if machine is None or res.absorb or mac not in machine.macs:
            # A new record, a NIC to attach, records to merge: a commit before the record is
            # done, grouped with other tasks' commits.
            self._spawn(self._record_dhcp_nic(request, admitted=machine is None))
            return
        if seen is not None:
            seen.recorded = True
            if looked >= 0:
                seen.res, seen.looked = res, looked  # for the record: _record_now
        self._paced.append((request, seen))
        if self._pacer is None:
            self._pacer = self._spawn(self._pace_records())

    async def _pace_records(self) -> None:
        """Record known machines' DHCP requests one after another, :data:`RECORD_SLICE` of
        them per turn of the event loop.

        Such a record (a step noted, facts learnt for the next group commit) waits for no
        transaction, so a task each ran them all in the loop turn after the datagrams that
        started them: 64 datagrams read at once in a storm meant ~15 ms of records before the
        socket was read again, and on a busy machine every answer queued behind them. Paced,
        the answers go first and the records follow; they wait here, one per NIC (a NIC's
        later requests wait with its record, _record_dhcp_soon)."""
        try:
            while self._paced:
                # At least one record per turn, however short the slice: the queue drains
                # whatever the machine's speed.
                until = time.perf_counter() + RECORD_SLICE
                while True:
                    try:
                        request, seen = self._paced.popleft()
                        if not self._record_now(request, seen):
                            await self._record_dhcp_nic(request, admitted=False, paced=True,
                                                        seen=seen)
                    except Exception as exc:  # one record's failure is not the next one's
                        self._log.error("background inventory write failed: %s", exc)
                    if not self._paced or time.perf_counter() >= until:
                        break
                await asyncio.sleep(0)
        finally:
            self._pacer = None
            while self._paced:  # cancelled (shutdown): the ones never started
                del self._recording[self._paced.popleft()[0].mac]

    def _record_now(self, request: BootRequest, seen: _Seen | None) -> bool:
        """:meth:`_record_dhcp_nic` of a paced record, done here without a coroutine, where
        that one would run from start to end without waiting: no room to wait for in the
        recorder, the NIC's lock free, no later request of the NIC waiting, the view fresh
        (its first attempt syncs nothing then), every identifier answered from memory, the
        machine found by this NIC alone (nothing to attach or merge, no disagreement to
        log) and not a discovered record. The same reads and the same note and facts, in
        the same order; False (nothing done) otherwise, for the coroutine to do it all.

        A storm's first DISCOVERs are nearly all such records; the eight coroutines, the
        lock and the awaits of the general path were, with _newest's coroutine per
        machine, ~7.5 % of the event loop's instructions a first DISCOVER (callgrind,
        benchmarks/README.md, s35-dhcp)."""
        mac = request.mac
        if seen is None:
            return False
        # Used once: not kept alive with the memo (what a storm's memos hold is walked by
        # every full collection of the cyclic GC until they are dropped).
        res, seen.res = seen.res, None
        view = self._view
        if self._recording[mac] or mac in self._locks \
                or self._recorder.crowded() or not view.fresh(DHCP_VIEW_AGE):
            return False
        # The decision's own memo: the same request object as a rule (told by identity
        # first: the dataclass's != builds and compares every field's tuple, ~1 % of the
        # loop's samples a first DISCOVER, s36-dhcp1st).
        if seen.request is not request and seen.request != request:
            return False
        # The decision's look-up where nothing the view answers from has changed since (its
        # group commits and syncs change it: then looked up again): the same answer, without
        # the ~10,000 instructions of the look-up (18 % of the record; callgrind,
        # benchmarks/README.md, s37-dhcp1st).
        if res is None or seen.looked != view.held_changes:
            res = identity.held_lookup(view, seen.identity, seen.keys)
            if res is None:
                return False
        machine = res.machine
        if machine is None or res.absorb or res.disagree or mac not in machine.macs \
                or machine.state == _DISCOVERED:
            return False
        try:
            self._note_now(machine, request, res, "dhcp", seen.note, seen)
        finally:
            del self._recording[mac]
        return True

    def _tells_news(self, request: BootRequest, res: Resolution,
                    seen: _Seen | None = None) -> bool:
        """Whether a DHCP request is worth a record: an unknown device within its source's
        discovery budget (a token is spent), or a machine whose facts it would change (beyond
        those queued for the next group commit) or whose newest event is another step."""
        machine = res.machine
        if machine is None:
            return self.discovery.admit(request, self._clock())
        new_nic = request.mac != identity.NO_NIC_BYTES and request.mac not in machine.macs
        if res.absorb or res.disagree or new_nic:
            return True
        return self._tells_more(request, res, machine, seen)

    def _tells_more(self, request: BootRequest, res: Resolution, machine: Machine,
                    seen: _Seen | None) -> bool:
        """:meth:`_tells_news` for a machine the request names alone, by a NIC it has: what
        may change while the machine does not (the facts queued, the newest note)."""
        # What earlier requests taught it is stored with the next group commit (within the
        # recorder's delay): a repeat meanwhile tells nothing new.
        known = self._recorder.learning(machine)
        if seen is None:
            if teaches(known, request, _taken(res)):
                return True
        elif seen.quiet is not known:
            taken = _taken(res)
            news = _news(known, request, taken, seen.identity)
            if news is not None:
                seen.news = (known, taken, news)
                return True
            seen.quiet = known
        # A discovered record notes no steps (its "discovered" event says it all).
        return machine.state != _DISCOVERED \
            and self._recorder.last(machine.id) != (
                "dhcp", _dhcp_note(request) if seen is None else seen.note)

    async def _record_dhcp_nic(self, request: BootRequest, *, admitted: bool,
                               paced: bool = False, seen: _Seen | None = None) -> None:
        """:meth:`_record_dhcp`, then each request of the same NIC that came meanwhile and
        still tells something new, judged from the inventory as it is then. ``seen``: the
        memo the decision of ``request`` made."""
        mac = request.mac
        waiting = self._recording[mac]
        try:
            await self._record_dhcp(request, admitted=admitted, paced=paced, seen=seen)
            while waiting:
                request = waiting.pop(0)
                if not await self._fresh():
                    return  # the inventory went away: nothing may be written from the view
                res = await self._resolve(request)
                if self._tells_news(request, res):
                    await self._record_dhcp(request, admitted=res.machine is None)
        finally:
            del self._recording[mac]

    async def _awaiting_nic(self) -> bool:
        """Whether some machine was enrolled without a MAC (by serial, asset or UUID).

        DHCP carries no serial or asset tag: such a machine is recognised only by what iPXE
        reports to /ipxe. So while one waits for its first boot, unknown NICs are given the
        first stage even under the ``ignore`` policy; iPXE then asks, and a NIC of no enrolled
        machine gets ``ignore.ipxe``, which exits to the firmware's next boot device.
        """
        return await self._view.count_machines_without_nic() > 0

    def _resolve(self, request: BootRequest, seen: _Seen | Identity | None = None,
                 ) -> Coroutine[Any, Any, Resolution]:
        """Which machine ``request`` is: every decision's and record's one look-up,
        :func:`identity.lookup` over the view. ``seen``: the NIC's memo of ``request``
        where the caller keeps it (its identity and keys worked out once), or the request's
        identity where the caller made it for more than the look-up."""
        if seen is None:
            return identity.lookup(self._view, Identity.of_request(request))
        if isinstance(seen, Identity):
            return identity.lookup(self._view, seen)
        return identity.lookup(self._view, seen.identity, seen.keys)

    async def _record_dhcp(self, request: BootRequest, *, admitted: bool = False,
                           paced: bool = False, seen: _Seen | None = None) -> None:
        """``paced``: a known machine's record (_pace_records), which commits nothing as it
        is decided (a step noted, facts learnt again on the machine as stored when the next
        group commit writes them, Recorder.learned) but in the cases that re-check it: a
        fresh view (what this process committed is in it, what others did within
        DHCP_VIEW_AGE, as for the decision itself) is enough."""
        await self._recorder.room()  # after the answer: a storm's records wait, not offers
        # Under the machine's lock, from a fresh read: a write from a stale snapshot would
        # undo what a concurrent /ipxe plan just stored (its state and install token).
        for attempt in range(DECIDE_ATTEMPTS):
            async with self._lock(request.mac):
                # A sync per paced record was a quarter of its cost (the store's probe of
                # its data version, benchmarks/README.md, session 10); a commit made from a
                # view that missed another process's change fails its compare-and-set
                # (StateChanged) and is decided again from a sync, below.
                if not (paced and attempt == 0 and self._view.fresh(DHCP_VIEW_AGE)):
                    await self._view.sync()
                # The NIC's memo of this request (BootService._seen_dhcp): the one its
                # decision made, else the one still kept: its identity worked out once, not
                # per step (without it, a storm's records worked out the identity, the
                # look-up keys and what the request teaches a second time: 5-6 % of the
                # loop's instructions a first DISCOVER, benchmarks/README.md, s34-dhcp).
                if seen is None or seen.request != request:
                    seen = self._seen.get(request.mac)
                    if seen is not None and seen.request != request:
                        seen = None
                res = await self._resolve(request, seen)
                try:
                    machine = await self._adopt(request, res)
                    if machine is None or machine.state == MachineState.DISCOVERED:
                        await self._discover(request, machine, res, admitted=admitted)
                    elif seen is None:
                        await self._note(machine, request, res, "dhcp", _dhcp_note(request))
                    else:
                        await self._note(machine, request, res, "dhcp", seen.note, seen)
                    return
                except StateChanged:  # another server moved it: note what it is now
                    if attempt == DECIDE_ATTEMPTS - 1:
                        raise

    def _lock(self, mac: MacAddress) -> _Locked:
        """One lock per machine for read-modify-write on the boot path, forgotten as soon as
        no one holds it or waits for it."""
        return _Locked(self._locks, mac)

    def loader(self, request: BootRequest, chain: LoaderChain | None = None,
               why: str = "") -> FirstStage | None:
        """The first stage for this firmware and arch from ``chain`` (None: the default).

        A chain chosen for the machine is kept even when its files are missing (the firmware
        of a Secure Boot machine would refuse the other one anyway): netboot stays silent and
        says why. The default chain falls back to the other one.
        """
        fw, arch = request.firmware, request.arch
        if fw == _IPXE:
            return FirstStage("/boot.ipxe", http=True, reason="iPXE gets the HTTP script")
        if fw == _UBOOT:
            # U-Boot's distro boot fetches boot.scr.uimg itself; netboot generates it.
            return FirstStage("boot.scr.uimg", reason="U-Boot boot script")
        if fw == _RPI:
            return FirstStage("bootcode.bin", reason="Raspberry Pi bootloader")
        if chain is None:
            why = why or "default for the architecture"
        tried, at = self._loader_file(fw, arch, chain)
        if at < len(tried):
            which, name = tried[at]
            key = (fw, arch, which, name, why)
            stage = self._stages.get(key)
            if stage is None:  # bounded: reasons name groups and profiles
                stage = _describe_stage(fw, arch, which, name, why)
                _keep(self._stages, key, stage, _STAGES_KEPT)
            return stage
        self._log.warning("no first-stage loader for mac=%s firmware=%s arch=%s chain=%s; "
                          "staying silent", request.mac, fw, arch,
                          "/".join(str(c) for c in _chains(fw, arch, chain)))
        return None

    def _loader_file(self, fw: Firmware, arch: Arch, chain: LoaderChain | None,
                     ) -> tuple[tuple[tuple[LoaderChain, str], ...], int]:
        """The loader files tried for this firmware, arch and chain, in order, and the place
        of the first that exists in the asset tree (past the end: none): the one walk that
        :meth:`loader` decides by and :meth:`_assets_read` reports."""
        tried = _TRIED[fw, arch, chain]
        exists = self._assets.exists
        for at, (_, name) in enumerate(tried):
            if exists(name):
                return tried, at
        return tried, len(tried)

    def _assets_read(self, request: BootRequest,
                     chain: LoaderChain | None) -> tuple[tuple[str, bool], ...]:
        """What :meth:`loader` reads of the asset tree for this request and chain, and what
        it finds now: each file name it tries, in order, up to the first that exists (none
        for the firmwares whose first stage is no loader file)."""
        fw, arch = request.firmware, request.arch
        # Made once per firmware, arch, chain and place (_READS), not per guard: the tuple
        # of a generator was ~10,400 instructions of each DHCP answer kept, this ~5,700
        # (callgrind, benchmarks/README.md s44-sighting).
        return _READS[fw, arch, chain][self._loader_file(fw, arch, chain)[1]]

    async def matching_text(self, text: str, most: int | None = None
                            ) -> frozenset[str] | None:
        """The ids of the machines a search by ``text`` may find (MachineFilter.text), from
        the view synced first (every commit made before the call); None until the view is
        loaded, when only the store can tell, or when more than ``most`` match."""
        if not self._view.loaded:
            return None
        await self._view.sync()
        found = self._view.matching_text(text, self._search, most)
        return None if found is None else frozenset(found)

    async def machine_by_ref(self, ref: str) -> Machine:
        """:func:`identity.require_ref` against the view, synced first (as
        :meth:`machine_by_mac`): an installer's report finds its machine without a hop to
        the store's thread; what it writes is a compare-and-set on this read."""
        await self._view.sync()
        return await identity.require_ref(self._view, ref)

    def held_machine(self, mac: MacAddress) -> Machine | Unseen | None:
        """:meth:`machine_by_mac` where the view answers without a wait: current (nothing
        committed since its last sync, by anyone) and holding the MAC's machine or knowing
        there is none; UNSEEN where machine_by_mac is to be awaited. Without its coroutine:
        a first config's (s50-config)."""
        view = self._view
        return view.held("mac", mac.raw) if view.current() else identity.UNSEEN

    async def machine_by_mac(self, mac: MacAddress) -> Machine | None:
        """The machine with this NIC as the inventory holds it now: from the view, synced
        first (a store read per config fetch was a hop to its thread). The view is synced
        after the machine was read (what :meth:`config_plan`'s ``synced`` relies on): at
        once from memory, nothing run in between; or, where the view cannot tell (not
        loaded yet: a start-up storm's configs), read through the store, a wait during which
        others commit, and the view synced again, so that a machine moved meanwhile to a
        cluster or profile made meanwhile is not planned without it."""
        view = self._view
        if not view.current():  # sync()'s first step, without its coroutine (a config fetch)
            await view.catch_up()
        held = view.held("mac", mac.raw)
        if not isinstance(held, Unseen):
            return held
        machine = await view.machine_by("mac", str(mac))
        await view.sync()
        return machine

    async def chain(self, machine: Machine | None, request: BootRequest,
                    ) -> tuple[LoaderChain | None, str]:
        """The loader chain chosen for a machine and who chose it (None: the default)."""
        await self._view.sync()
        return await self._chain(machine, request)

    async def _chain(self, machine: Machine | None, request: BootRequest,
                     ) -> tuple[LoaderChain | None, str]:
        if machine is None:
            return None, "default for the architecture"
        if machine.loader is not None:
            return machine.loader, "set on the machine"
        group, profile, _, _ = await self._effective(machine, request)
        return _chain_of(group, profile)

    def _held_chain(self, machine: Machine, request: BootRequest,
                    ) -> tuple[LoaderChain | None, str] | None:
        """:meth:`_chain` where the view holds the groups, profiles and clusters (loaded:
        always), without its coroutine and _effective's; None where it does not."""
        if machine.loader is not None:
            return machine.loader, "set on the machine"
        held = self._held_effective(machine, request)
        return None if held is None else _chain_of(held[0], held[1])

    # -- iPXE / pxelinux ---------------------------------------------------------------
    async def plan(self, request: BootRequest, *, record: bool = True) -> BootPlan:
        if not record:
            await self._view.sync()
            return await self._plan(request, record=False)
        # What every request does without a wait is done here without a coroutine (the
        # backlog's room, the lock, the view's freshness: each an awaited call before,
        # ~1,000 of a first install's loop instructions apiece in the Python build).
        recorder, view, health = self._recorder, self._view, self.health
        if recorder.crowded():
            await recorder.room()  # a storm faster than its notes are written waits here
        for attempt in range(DECIDE_ATTEMPTS):
            lock = _Locked(self._locks, request.mac)
            if not lock.take():
                await lock.wait()
            try:
                # After the lock: what the previous request for this machine committed is
                # seen. The lock orders this process's requests; StateChanged says another
                # server moved the machine between our read and our write: decide again
                # from what it stored.
                if not (health.up and view.current()) and not await self._fresh(unsure=True):
                    return await self._plan_from_memory(request)
                try:
                    # Recorded, as _plan decides it. A request equal to an earlier one whose
                    # decision wrote nothing, resolved to the same machine object (the view
                    # replaces it when its value changes), with the same settings and nothing
                    # else a decision reads changed since (InventoryView.shared), gets that
                    # decision again without taking it: taken again it would answer the same
                    # and write nothing either (its note would repeat, learn() would change
                    # nothing). A held machine's retry loop, a storm's repeated steps.
                    # Written out here, not a coroutine of its own: one level less between
                    # the task and every wait of a decision (~1,400 loop instructions a
                    # level; s35-loop). The request's identity made once: the look-up and
                    # what the install learns read it. From the view's memory without a
                    # coroutine where it can tell (loaded: always).
                    kept = self._repeats.get(request.mac)
                    held = view.held_changes
                    if (kept is not None and kept.held == held and kept.request == request
                            and kept.shared == view.shared and kept.settings is self.settings
                            and recorder.repeats(kept.machine.id, kept.kind, kept.message,
                                                 kept.machine)
                            and (kept.expires is None or self._clock() <= kept.expires)):
                        # Nothing the view holds of machines moved since it was kept: the
                        # look-up below would find its machine again (the request's identity
                        # and look-up were ~230 of a kept ask's ~1,900 loop bytecodes;
                        # s43-again).
                        return kept.plan
                    seen = Identity.of_request(request)
                    res = identity.held_lookup(view, seen)
                    if res is None:
                        res = await self._resolve(request, seen)
                    machine = res.machine
                    if (kept is not None and machine is not None and kept.machine is machine
                            and not res.absorb and not res.disagree and kept.request == request
                            and kept.shared == view.shared and kept.settings is self.settings
                            and recorder.repeats(machine.id, kept.kind, kept.message, machine)
                            and (kept.expires is None or self._clock() <= kept.expires)):
                        return kept.plan
                    activity, events = recorder.activity, recorder.queued_events
                    shared = view.shared
                    plan = await self._plan(request, record=True, res=res, seen=seen)
                    # Kept where the decision wrote nothing but events: its own note, which
                    # _keep_repeat and each repeat check is the machine's newest (repeats).
                    # An install's first ask again, whose "asked again" note was the only
                    # write, was decided in full once more at its next ask (~1,000 loop
                    # bytecodes each) before it was kept (s43-again).
                    if (machine is not None and plan.machine is machine
                            and view.loaded and not res.absorb and not res.disagree
                            and recorder.activity - activity == recorder.queued_events - events
                            and shared == view.shared and machine.state != _DISCOVERED):
                        self._keep_repeat(request, machine, shared, held, plan)
                    return plan
                except StateChanged:
                    if attempt == DECIDE_ATTEMPTS - 1:
                        raise
            finally:
                lock.leave()
        raise AssertionError("unreachable")

    def _keep_repeat(self, request: BootRequest, machine: Machine, shared: int, held: int,
                     plan: BootPlan) -> None:
        """Keep ``plan``, a decision of ``request`` for ``machine`` taken while nothing
        else changed (``shared``: the view's then; ``held``: its held_changes when the
        machine was looked up), to answer the request's repeats (:meth:`plan`), where its
        note repeats too."""
        under_way = lifecycle.allows(machine.state, _INSTALL_AGAIN)
        kind: str | None
        if plan.action == _INSTALL and under_way and plan.token is not None \
                and plan.profile is not None:
            # An install under way asked again from the address its token was served to
            # (the request's, compared whole): the same plan until the token expires, when
            # the clock decides (a hold). Its note is _install_plan's.
            kind, message = "install-plan", _asked_again(plan.profile.name)
            expires = machine.token_expires
        else:
            kind = None if under_way else _NOTED.get(plan.action)
            message, expires = plan.reason, None
        if kind is not None and self._recorder.repeats(machine.id, kind, message, machine):
            _keep(self._repeats, request.mac,
                  _Repeat(request, machine, shared, held, self.settings, kind, message,
                          plan, expires), REPEATS_KEPT)

    async def _fresh(self, *, unsure: bool = False) -> bool:
        """Sync the view; False when the inventory is unreachable (known to be, or found so
        now): the view then answers as it is, and nothing may be written from it.
        ``unsure``: the view's :meth:`~InventoryView.current` said False just now."""
        if not self.health.up:
            return False
        try:
            await (self._view.catch_up() if unsure else self._view.sync())
        except StoreError as exc:
            if self.health.failed(str(exc)):
                self._log.error("inventory unreachable, answering boots from memory: %s", exc)
            return False
        return True

    @property
    def servers_record(self) -> str | None:
        """The inventory's record of servers as the change feed last told it (None: not
        since this server started): netboot.inventory.peers."""
        held = self._view.held_setting(SERVERS)
        return held if isinstance(held, str) else None

    async def resync(self) -> None:
        """Apply what the inventory's change feed says now; StoreError when it does not
        answer (the service's watcher calls this to notice an outage and its end)."""
        await self._view.sync()

    async def _plan_from_memory(self, request: BootRequest) -> BootPlan:
        """The inventory is unreachable: what needs no write is answered from the view (a
        local boot, a hold, ignore), with its event queued for when the inventory is back;
        an install is refused, since its token must be committed before it is handed out."""
        plan = await self._plan(request, record=False)
        if plan.action == BootAction.INSTALL:
            # Told apart for the client: reads answer (a full disk, a stuck lock holder),
            # so its 503 does not send anyone to the network (s37-chaos).
            refused = WritesRefused if self.health.answers else StoreError
            raise refused(f"{self.health.problem()}; an install needs its token recorded "
                          "first")
        kind = _NOTED.get(plan.action)
        machine = plan.machine
        if kind is not None and machine is not None:
            last = self._recorder.pending(machine.id)
            if last is None or (last.kind, last.message) != (kind, plan.reason):
                self._recorder.record(self._new_event(machine, kind, plan.reason, request))
        return plan

    async def _plan(self, request: BootRequest, *, record: bool,
                    res: Resolution | None = None, seen: Identity | None = None) -> BootPlan:
        mac = request.mac
        if res is None:
            res = await self._resolve(request)
        machine = res.machine
        if record and machine is not None and (res.absorb or res.disagree
                                               or _new_nic(request, machine, res.absorb)):
            machine = await self._adopt(request, res)  # else it returns the machine as is
        if machine is None or machine.state == _DISCOVERED:
            machine = await self._discover(request, machine, res) if record else machine
            if self.settings.policy == "auto" and record:
                group = grouping.select(self.settings.rules, request.labels())
                # Still discovered: another server may have enrolled the one it read back
                # (two servers discovering one new NIC at once: _discover's Conflict), and
                # auto-enrolling that was a 409 to the device (s39-multi).
                if group is not None and machine is not None and machine.state == _DISCOVERED:
                    if group.name not in self.settings.trusted_rules:
                        return await self._untrusted_match(request, machine, group)
                    machine = await self._enroller.auto_enroll(machine, group)
            if machine is None or machine.state == _DISCOVERED:
                return await self._unknown_plan(request, machine, record)
        if machine.state in LOCAL_STATES:
            reason = f"{machine.state!s}: boot the local disk"
            asker = request.remote_addr  # None for DHCP: only HTTP and TFTP say
            if asker is not None:
                issued_to = machine.facts.get(INSTALL_PEER)
                if issued_to is not None and asker not in (issued_to, machine.ipv4):
                    # The one trace of an install a stranger took (it asked first with this
                    # MAC: s36-claim): the device, booting after, is sent to an empty disk.
                    # Said in its script and its event; a device whose address merely
                    # changed reads it once. Not from the address the machine registered
                    # or reported since with its machine token (ipv4: no DHCP lease sets
                    # it): a device on a new site DHCP lease was told at every boot that
                    # another host took its install, and to reinstall (s47-review).
                    reason += (f" (its install was served to {issued_to}, this request came "
                               f"from {asker}: if this device never installed, another host "
                               f"took its install; 'netboot machines reinstall {machine.ref}')")
            plan = BootPlan(BootAction.LOCAL, mac, reason, machine=machine)
            if record:
                # Once until something else happens: a device that asks again and again
                # (a retry loop, a storm of reboots) writes one line, not one per request.
                await self._event(machine, "local-boot", plan.reason, request, once=True)
            return plan
        if not (lifecycle.allows(machine.state, _INSTALL_PLAN)
                or lifecycle.allows(machine.state, _INSTALL_AGAIN)):
            reason = ("the last install failed; run 'netboot machines reinstall' to retry"
                      if machine.state == MachineState.FAILED else
                      f"{machine.state!s}: no install until 'netboot machines reinstall'")
            plan = BootPlan(BootAction.HOLD, mac, reason,
                            retry_seconds=self.settings.hold_retry_seconds, machine=machine)
            if record:
                await self._event(machine, "hold", plan.reason, request, once=True)
            return plan
        # Two look-ups where every NIC is listed (a first install's path), the rest rarely.
        if (not machine.macs or _UNLISTED in machine.facts) \
                and self._unlisted_asks(request, machine, record):
            return await self._unlisted_plan(request, machine, record)
        return await self._install_plan(request, machine, res, record, seen)

    def _unlisted_asks(self, request: BootRequest, machine: Machine, record: bool) -> bool:
        """Whether ``request`` asks an install from a NIC no operator listed: attached by this
        boot or an earlier one, or not attached at all, the machine holding
        identity.UNLISTED_MAX such NICs already (_adopt). Of one enrolled without a MAC: a
        dry run (explain, a machine's plan line) says its first NIC is held so too, unless
        enroll.trust_first_nic; a request naming no NIC (U-Boot's pxelinux.cfg/<uuid>,
        which any host can ask) is held, never given a token."""
        if not machine.macs:
            return record or not self.settings.trust_first_nic
        return identity.unlisted(machine, str(request.mac)) or (
            record and _new_nic(request, machine, ()))

    async def _unlisted_plan(self, request: BootRequest, machine: Machine, record: bool,
                             ) -> BootPlan:
        """An install asked from a NIC a boot attached (by the machine's UUID, serial or
        asset tag) and no operator listed: held without a token, with the command that lists
        it. Any host on the VLAN can send a machine's UUID (option 97 of its every PXE
        DISCOVER, a vendor's manifest) or serial (its label) from a made-up MAC, and was given
        the install token and the config (the cluster's join token) of a machine not yet
        installed (identity.UNLISTED). Tinkerbell serves only the MACs of its hardware
        records, dnsmasq a dhcp-host only to the MACs it names."""
        if not machine.macs:
            command = f"netboot machines set {machine.id} --add-mac MAC"
            reason = (f"{machine.state!s}: enrolled without a MAC, the NIC its first boot "
                      "reports its UUID, serial or asset tag from is attached and held without "
                      f"an install token until an operator lists it ({command}; or "
                      "enroll.trust_first_nic: true)")
            return BootPlan(BootAction.HOLD, request.mac, reason, machine=machine,
                            retry_seconds=self.settings.hold_retry_seconds, command=command)
        command = f"netboot machines set {machine.id} --add-mac {request.mac}"
        how = ("was attached at a boot" if request.mac in machine.macs else
               f"was not attached (the machine has {identity.UNLISTED_MAX} NICs not listed)")
        reason = (f"{machine.state!s}: NIC {request.mac} {how} by the machine's UUID, serial "
                  "or asset tag, and no operator listed it: held without an install token "
                  f"until one does ({command})")
        if record and request.mac in machine.macs:  # one not attached is its log line's
            await self._event(machine, "hold", reason, request, once=True)
        return BootPlan(BootAction.HOLD, request.mac, reason, machine=machine,
                        retry_seconds=self.settings.hold_retry_seconds, command=command)

    async def _unknown_plan(self, request: BootRequest, machine: Machine | None,
                            record: bool) -> BootPlan:
        if self.settings.policy == "hold":
            reason = "unknown machine held until an operator approves it"
            if machine is not None and record:
                await self._event(machine, "hold", reason, request, once=True)
            return BootPlan(BootAction.HOLD, request.mac, reason,
                            retry_seconds=self.settings.hold_retry_seconds, machine=machine,
                            command=await self.approve_command(machine or Machine(
                                macs=(request.mac,)), request))
        reason = (f"unknown machine and discovery policy is {self.settings.policy!r}"
                  + ("; no auto rule matched" if self.settings.policy == "auto" else ""))
        return BootPlan(BootAction.IGNORE, request.mac, reason, machine=machine)

    async def _untrusted_match(self, request: BootRequest, machine: Machine, group: Group,
                               ) -> BootPlan:
        """An auto rule matched on what the request says (product, serial, UUID, MAC: any host
        can send ``/ipxe?mac=…&product=…``), and the operator did not trust the rule with
        that: held for approval, with the command that enrolls it as the rule would have."""
        matched = ", ".join(f"{key}={request.labels().get(key, '')!r}"
                            for key in sorted(group.selector))
        reason = (f"auto rule {group.name!r} matched on {matched}, which any host can send; "
                  "held until an operator approves it (or the rule sets "
                  "trust_firmware_strings: true)")
        await self._event(machine, "hold", reason, request, once=True)
        parts = ["netboot machines approve", machine.ref]
        parts += [f"--{key} {value}" for key, value in (
            ("cluster", group.cluster), ("role", group.role), ("profile", group.profile))
            if value]
        return BootPlan(BootAction.HOLD, request.mac, reason, machine=machine,
                        retry_seconds=self.settings.hold_retry_seconds, group=group.name,
                        command=" ".join(parts))

    async def approve_command(self, machine: Machine, request: BootRequest | None = None,
                              ) -> str:
        """The ``netboot machines approve`` line that installs this machine: it names what no
        group or default gives it (a cluster, a role, a profile), with the real name when the
        inventory has only one to choose from."""
        group, profile, cluster, _ = await self._effective(machine, request)
        parts = ["netboot machines approve", machine.ref]
        if cluster is None:
            names = [c.name for c in await self._view.list_clusters()]
            parts.append("--cluster " + (names[0] if len(names) == 1 else "NAME"))
        if machine.role is None and (group is None or group.role is None):
            parts.append("--role agent")
        if profile is None:
            names = [p.name for p in await self._view.list_profiles()]
            parts.append("--profile " + (names[0] if len(names) == 1 else "NAME"))
        return " ".join(parts)

    async def effective(self, machine: Machine, request: BootRequest | None = None,
                        ) -> tuple[Group | None, Profile | None, Cluster | None, Role]:
        """The machine's group, profile, cluster and role: its own settings win over the
        group's; the configured default profile comes last."""
        await self._view.sync()
        return await self._effective(machine, request)

    async def _effective(self, machine: Machine, request: BootRequest | None = None,
                         ) -> tuple[Group | None, Profile | None, Cluster | None, Role]:
        # Every read answered by the view when it holds all three (no coroutine each);
        # otherwise the async getters read what it does not hold yet.
        held = self._held_effective(machine, request)
        if held is not None:
            return held
        group, profile_name, cluster_name, role = self._chosen(
            machine, request, await self._view.list_groups())
        profile = await self._view.get_profile(profile_name) if profile_name else None
        cluster = await self._view.get_cluster(cluster_name) if cluster_name else None
        return group, profile, cluster, role

    def _held_effective(self, machine: Machine, request: BootRequest | None = None,
                        ) -> tuple[Group | None, Profile | None, Cluster | None, Role] | None:
        """:meth:`_effective` where the view holds the groups, profiles and clusters (loaded:
        always), without a coroutine; None where it does not."""
        held = self._view.held_settings()
        if held is None:
            return None
        groups, profiles, clusters = held
        group, profile_name, cluster_name, role = self._chosen(machine, request, groups)
        return (group, profiles.get(profile_name) if profile_name else None,
                clusters.get(cluster_name) if cluster_name else None, role)

    def _chosen(self, machine: Machine, request: BootRequest | None, groups: Sequence[Group],
                ) -> tuple[Group | None, str | None, str | None, Role]:
        """The machine's group, the names of its profile and cluster, and its role."""
        # Without groups nothing is selected: the labels (a dict of the machine's facts and
        # the request's strings) are not made.
        group = grouping.select(groups, grouping.machine_labels(
            machine, request.labels() if request else None)) if groups else None
        profile_name = (machine.profile or (group.profile if group else None)
                        or self.settings.default_profile)
        cluster_name = machine.cluster or (group.cluster if group else None)
        role = machine.role or (group.role if group else None) or _AGENT
        return group, profile_name, cluster_name, role

    async def _install_plan(self, request: BootRequest, machine: Machine, res: Resolution,
                            record: bool, seen: Identity | None = None) -> BootPlan:
        """``seen``: ``Identity.of_request(request)``, where the caller made it already."""
        effective = self._held_effective(machine, request)
        if effective is None:
            effective = await self._effective(machine, request)
        group, profile, cluster, role = effective
        gone = "" if cluster is not None else _gone_cluster(machine, group)
        if profile is None or gone:
            reason = ("no profile: set one on the machine, a group that selects it or "
                      "enroll.default_profile"
                      + (f" (group {group.name!r} has none)" if group else "")
                      if profile is None else gone)
            if record:
                await self._event(machine, "hold", reason, request, once=True)
                # What the firmware told, as a discovered machine's record keeps it: an
                # operator choosing its profile saw no arch, firmware, serial or UUID of an
                # enrolled one held (s43-attack). Nothing on later retries.
                machine = await self._learn(machine, request, self._clock(), _taken(res))
            return BootPlan(BootAction.HOLD, request.mac, reason, machine=machine,
                            retry_seconds=self.settings.hold_retry_seconds,
                            group=group.name if group else None)
        pinned = machine.fixed_ipv4
        if record and pinned and request.remote_addr != pinned:
            # PXE proves nothing about who asks: anyone who saw the MAC in a DHCP broadcast
            # can ask first, take the token and the config (the cluster's join token) and
            # register in the device's place. An address the operator gave the machine is
            # the one thing the asker must hold (Tinkerbell's hegel serves by source address
            # the same way; HTTP is TCP: the address answered the handshake). Checked before
            # the cluster's join is planned, so a stranger claims nothing (s36-claim).
            asker = request.remote_addr or "an unknown address"
            reason = (f"{machine.state}: its install script is served only at its fixed "
                      f"address {pinned}; asked from {asker}")
            await self._event(machine, "token withheld",
                              f"install script asked from {asker}, not from its fixed "
                              f"address {pinned}: held without a token. If the device's "
                              "address changed, change its fixed_ipv4 (PATCH "
                              f"/api/v1/machines/{machine.ref} or an import row)", request,
                              once=True)
            return BootPlan(BootAction.HOLD, request.mac, reason, machine=machine,
                            retry_seconds=self.settings.hold_retry_seconds,
                            group=group.name if group else None)
        k3s = (None if cluster is None else self._known_join(machine, cluster, role, group)
               or await self._k3s_join(machine, cluster, role, group, claim=record))
        if cluster is not None and k3s is not None and k3s.waiting:
            # Held without a state change or a token: the retry loop asks again and installs
            # by itself once a server registers (no power cycle, no operator).
            reason = await self._waiting_reason(cluster)
            if record:
                # What the firmware told (its arch) is kept, so that `explain` answers for
                # the machine as it boots; learn() changes nothing on later retries. Not
                # an identifier another machine holds (_taken): the store refused it, and
                # the retry was a 409 naming that machine's id and MAC (s43-attack).
                await self._event(machine, "hold", reason, request, once=True)
                machine = await self._learn(machine, request, self._clock(), _taken(res))
            return BootPlan(BootAction.HOLD, request.mac, reason, machine=machine,
                            retry_seconds=self.settings.hold_retry_seconds,
                            group=group.name if group else None, cluster=cluster)
        # !s: a StrEnum's text as str() makes it (an f-string formats an enum through its
        # __format__: ~0.2 µs more, for each decision and its event; session 24).
        # Where the profile came from, as _chosen picked it (explain's profile_source): a
        # group's or enroll.default_profile is named; the machine's own is not, so that the
        # usual plan's text (and its log line, its script) is no longer than before: the
        # group was named even when the profile was the machine's own (s38-user).
        reason = (f"{machine.state!s}: install profile {profile.name}"
                  + ("" if machine.profile else f" (group {group.name})"
                     if group is not None and group.profile else " (enroll.default_profile)"))
        token: str | None = None
        if record and lifecycle.allows(machine.state, _INSTALL_AGAIN):
            # An install under way: the same token, never a new one (an unauthenticated
            # /ipxe must not void the real installer's token), and only until it expires.
            now = self._clock()
            expires = machine.token_expires
            if not machine.install_token or (expires is not None and now > expires):
                why = (f"its install token expired at {_utc(expires)} before the install "
                       "finished" if expires is not None and now > expires else
                       "its install token was not kept (issued by an older netboot)")
                reason = (f"{machine.state}: {why}; run 'netboot machines reinstall "
                          f"{machine.ref}' for a new one")
                await self._event(machine, "token expired", reason, request, once=True)
                return BootPlan(BootAction.HOLD, request.mac, reason, machine=machine,
                                retry_seconds=self.settings.hold_retry_seconds,
                                group=group.name if group else None)
            issued_to = machine.facts.get(INSTALL_PEER)
            if issued_to != request.remote_addr:
                # Anyone on the VLAN can ask /ipxe with this MAC: the token goes back only to
                # the address it was served to (HTTP is TCP, so that address answered the
                # handshake; only ARP spoofing forges it). Never a new token: that would void
                # the real installer's. The install goes on; the asker is held.
                reason = (f"{machine.state}: an install is under way and its install token "
                          "was served to another address; if this device's address changed, "
                          f"run 'netboot machines reinstall {machine.ref}'")
                await self._event(
                    machine, "token withheld",
                    f"install script for the install under way asked from "
                    f"{request.remote_addr or 'an unknown address'}, but its install token "
                    f"was served to {issued_to or 'an address netboot did not record'}: held "
                    "without it. If this is the device and its address changed, an operator "
                    f"reinstall gives it a new one: netboot machines reinstall {machine.ref}",
                    request, once=True)
                return BootPlan(BootAction.HOLD, request.mac, reason, machine=machine,
                                retry_seconds=self.settings.hold_retry_seconds,
                                group=group.name if group else None)
            token = machine.install_token
            again = lifecycle.advance(learn(machine, request, now, _taken(res)),
                                      _INSTALL_AGAIN, now)
            # learn() and advance() return the machine itself when nothing changes.
            if again is not machine:  # a fact that did not change writes nothing
                await self._commit_update(again, machine)
                machine = again
            said = self._recorder.last(machine.id)
            # A standing render failure stays the machine's newest event (the list's): its
            # "asked again" note went after it, once its events were rate limited (s42-ops).
            if said is None or said[0] != "render failed":
                await self._event(machine, "install-plan", _asked_again(profile.name),
                                  request, once=True)
        elif record:
            token = self._new_token()
            now = self._clock()
            # What learn() would add, set in the step's copy: one copy of the machine. Each
            # field by name (none told: the machine's own, as a copy keeps it): a dict of
            # them spread by ** into replace_machine's 22 parameters was ~8,500 loop
            # instructions more a first install (callgrind; benchmarks/README.md s39-http1st).
            news = _news(machine, request, _taken(res), seen)
            if news is None:
                told, uuid, serial, asset, arch, firmware = (
                    machine.facts, machine.uuid, machine.serial, machine.asset, machine.arch,
                    machine.firmware)
            else:
                told, uuid, serial, asset, arch, firmware = (
                    news["facts"], news["uuid"], news["serial"], news["asset"], news["arch"],
                    news["firmware"])
            # A copy without the old install peer, in the order the facts were in (a copy
            # and a pop, C calls: the comprehension was ~3,500 more loop instructions).
            facts = dict(told)
            facts.pop(INSTALL_PEER, None)
            if request.remote_addr:
                facts[INSTALL_PEER] = request.remote_addr
            was = machine
            read, version = was.state, was.updated
            # lifecycle.advance's step written out: its "nothing changed" answer never
            # applies (a new token is never the machine's), and its **changes handed on
            # to replace_machine again was ~8,000 loop instructions more (callgrind).
            state = lifecycle.apply(was.state, _INSTALL_PLAN, subject=was)
            stamp: Any = now  # one float for updated and state_since (lifecycle.advance's)
            # By position, in _INSTALL_COPY's order (its keywords matched to replace_machine's
            # 24 parameters were ~3,400 loop instructions more: s40-http1st).
            machine = _install_copy(
                machine, state, stamp, lifecycle.since(was, state, stamp), facts,
                uuid, serial, asset, arch, firmware, hash_token(token), token,
                now + (profile.install_timeout or self.settings.token_ttl_seconds),
                # Bind the machine to the cluster and role it installs into, so that the
                # cluster lists it and a later group edit does not move an installed node.
                machine.cluster or (cluster.name if cluster else None),
                machine.role or (role if cluster else None),
            )
            # The token is what the device is told: committed, with its event, before the
            # answer leaves; compare-and-set, so that of two servers planning this machine
            # at once only one issues a token (the other decides again: install-again), and
            # on the version read, so that a change committed since the read (an operator's
            # new cluster or profile, another NIC attached) is not undone by this whole
            # machine written from it: the plan is decided again from that change (plan()).
            event = self._new_event(
                machine, "install-plan", f"install profile {profile.name}"
                + (f" into cluster {cluster.name} as {role!s}" if cluster else ""), request)
            # By position (merge, create, update, events, expect, versions, audit, bases):
            # keywords cost a class call a dict, ~1,500 loop instructions (callgrind;
            # s33-loop). The machine read as its base: only what changed is written
            # (Batch.bases).
            versions = {machine.id: version}
            await self._recorder.commit(batch_of((), (), (machine,), (event,),
                                                 {machine.id: read}, versions, (),
                                                 {machine.id: was}, ()), version=machine)
            self._view.adopt((machine,), versions)
            # Its NIC's DHCP memo (_Seen) let go: its firmware's DHCP is over for this boot,
            # and the decision it holds names the machine as it was before this step (a
            # copy the view no longer holds). Kept, a storm's ~1,000 memos held ~1.5 KB each
            # to its last moment (benchmarks/README.md, s40-mem); a NIC asking again is
            # decided as one not seen yet, as after forget_memos.
            self._seen.pop(request.mac, None)
        else:
            # A dry run renders for the machine as this request describes it (its arch picks
            # the kernel console), exactly as the recorded plan would, without storing it.
            machine = learn(machine, request, machine.updated)
        # By position (action, mac, reason, retry_seconds, machine, group, profile, cluster,
        # k3s, token, command), by model.plan_of: a class called with keywords is handed
        # them in a dict (type_call), ~3,000 loop instructions more a plan (s33-loop); called
        # at all, ~1,400 more than plan_of (s38-install).
        return plan_of(_INSTALL, request.mac, reason, 0, machine,
                       group.name if group else None, profile, cluster, k3s, token, None)

    async def config_plan(self, machine: Machine, *, token: str | None, reason: str,
                          request: BootRequest | None = None, claim: bool = True,
                          mac: MacAddress | None = None, synced: bool = False) -> BootPlan:
        """What a machine's per-machine config (k3OS, cloud-init) carries: its profile, cluster
        and how it joins. ``claim=False`` for dry runs that must not pick the init node;
        ``mac`` is the NIC the config was asked for (default: the machine's primary one).
        ``synced``: the caller synced the view after it read ``machine`` (by
        :meth:`machine_by_mac`) and has not waited since: no other work ran, so a sync again
        would find what that one left (a config fetch's second sync was ~4,600 of its
        ~500,000 loop instructions)."""
        if not synced:
            await self._view.sync()
        effective = self._held_effective(machine, request)
        if effective is None:
            effective = await self._effective(machine, request)
        group, profile, cluster, role = effective
        gone = "" if cluster is not None else _gone_cluster(machine, group)
        if gone:  # its install plan was held for it (_install_plan): no config either
            raise Conflict(gone, field="cluster")
        k3s = (None if cluster is None else self._known_join(machine, cluster, role, group)
               or await self._k3s_join(machine, cluster, role, group, claim=claim))
        if cluster is not None and k3s is not None and k3s.waiting:
            # Its install plan had an endpoint, which has gone since (the server was removed
            # or is reinstalling): a config without one would install a node that never joins.
            raise Conflict(await self._waiting_reason(cluster))
        return _config_plan_of(machine, mac, reason, group, profile, cluster, k3s, token)

    def config_plan_now(self, machine: Machine, *, token: str | None, reason: str,
                        mac: MacAddress | None = None) -> BootPlan | None:
        """:meth:`config_plan` of a view synced after ``machine`` was read (``synced``) where
        it is answered without a wait, as a storm's first configs are: the view holds the
        groups, profiles and clusters, the machine has a cluster, and its join is known
        (:meth:`_known_join`: a fixed server URL, or a node of a managed cluster whose init
        node and servers are kept) and not waiting. None where config_plan is to be awaited
        (it looks, claims, refuses or plans without a cluster). Without config_plan's
        coroutine: ~1,000 of a first config's loop instructions (s50-config)."""
        effective = self._held_effective(machine)
        if effective is None:
            return None
        group, profile, cluster, role = effective
        if cluster is None:
            return None
        k3s = self._known_join(machine, cluster, role, group)
        if k3s is None or k3s.waiting:
            return None
        return _config_plan_of(machine, mac, reason, group, profile, cluster, k3s, token)

    async def k3s_join(self, machine: Machine, cluster: Cluster, role: Role,
                       group: Group | None, *, claim: bool = True) -> K3sJoin:
        """Cluster formation: external server URL, or managed (first server runs cluster-init).

        Every other node of a managed cluster joins its endpoint (:meth:`_endpoint`); while
        there is none the join is ``waiting`` and the node is held, not installed with a
        name it cannot reach. ``claim=False`` answers what would happen without recording this
        machine as the cluster-init node (``explain`` and other dry runs must not change the
        decision).
        """
        await self._view.sync()
        return await self._k3s_join(machine, cluster, role, group, claim=claim)

    def _known_join(self, machine: Machine, cluster: Cluster, role: Role,
                    group: Group | None) -> K3sJoin | None:
        """:meth:`_k3s_join` where it is answered without a wait (a cluster with a fixed
        server URL; a storm's nodes of a managed one, below), without a coroutine; None
        where the cluster's init node and servers are to be looked at."""
        if cluster.managed:
            kept = self._joining.get(cluster.name)
            if (kept is None or kept.shared != self._view.shared or kept.cluster is not cluster
                    or kept.settings is not self.settings or machine.id in kept.ids):
                return None
            # A storm's nodes of one cluster: its init node, servers, endpoint and TLS names
            # are the same for every one but those nodes themselves (not served from here),
            # until a setting, a cluster or a server changes (``shared`` moves).
            if group is None:
                return join_of(role, kept.endpoint, False, _join_token(cluster, role),
                               kept.labels, kept.taints,
                               machine.hostname or _nameless_node(machine), kept.san)
            labels, taints, node_name = _node_join(machine, cluster, group)
            return join_of(role, kept.endpoint, False, _join_token(cluster, role), labels,
                           taints, node_name, kept.san)
        labels, taints, node_name = _node_join(machine, cluster, group)
        return join_of(role, cluster.server_url, False, _join_token(cluster, role), labels,
                       taints, node_name, ())

    async def _k3s_join(self, machine: Machine, cluster: Cluster, role: Role,
                        group: Group | None, *, claim: bool = True) -> K3sJoin:
        """:meth:`k3s_join` from the view as the caller synced it."""
        known = self._known_join(machine, cluster, role, group)
        if known is not None:
            return known
        labels, taints, node_name = _node_join(machine, cluster, group)
        # Exactly one node of the cluster ever runs --cluster-init, even when two first
        # servers boot at once through two netboot servers: the claim is one insert-if-absent
        # in the store, and whoever lost learns the winner from it (no in-process lock). The
        # view is read as the caller synced it: a stale "nobody" only costs a claim, which
        # answers with the winner.
        view = self._view
        shared = view.shared
        init_id, running = await self._cluster_init(cluster, machine)
        claimed = False
        if init_id is None and role == Role.SERVER and not running:
            claimed = True
            if claim:
                key = f"cluster-init/{cluster.name}"
                stale = await self._view.get_setting(key)  # a deleted node's id, or None
                init_id = await self._store.claim_setting(key, machine.id, replace=stale)
            else:
                init_id = machine.id
        san = self._tls_san(cluster)
        # Only the init node, and only while no other server runs, initialises: reinstalling
        # the first server of a live cluster must join it, not start a second cluster.
        if init_id == machine.id and not running:
            return K3sJoin(role, None, True, _join_token(cluster, role), labels, taints,
                           node_name, san)
        # The first server first, so that every node joins the same one.
        running.sort(key=lambda m: m.id != init_id)
        endpoint = self._endpoint(cluster, running)
        if (not claimed and (init_id is not None or running) and view.loaded
                and shared == view.shared
                and not isinstance(view.held_setting(f"cluster-init/{cluster.name}"), Unseen)):
            # Read from the view alone, nothing changed meanwhile, nothing claimed, and a node
            # of any role joins (a server claims only where no node formed the cluster and
            # none runs): every other node that is neither the init node nor a registered
            # server gets this endpoint too while ``shared`` stays.
            servers = view.held_servers(cluster.name)
            ids = {m.id for m in servers} if isinstance(servers, list) else None
            if ids is not None and machine.id not in ids:
                ids.add(machine.id)
                if init_id is not None:
                    ids.add(init_id)
                own = _node_join(machine, cluster, None)
                _keep(self._joining, cluster.name, _Joining(shared, cluster, self.settings,
                                                            frozenset(ids), endpoint, san,
                                                            own[0], own[1]),
                      _FEW_CLUSTERS)
        return K3sJoin(role, endpoint, False, _join_token(cluster, role), labels, taints,
                       node_name, san)

    async def _cluster_init(self, cluster: Cluster, machine: Machine,
                            ) -> tuple[str | None, list[Machine]]:
        """The id of the node that formed ``cluster`` (None: none, or it was deleted), and
        its registered servers other than ``machine`` (a cluster that already runs)."""
        view = self._view
        key = f"cluster-init/{cluster.name}"
        # What the view holds without a coroutine per read; the store's read where it
        # holds nothing of it yet.
        held = view.held_setting(key)
        init_id = await view.get_setting(key) if isinstance(held, Unseen) else held
        if init_id is not None:
            there = view.held_machine(init_id)
            if isinstance(there, Unseen):
                there = await view.get_machine(init_id)
            # s36-journey: an init node moved to another cluster or made an agent (what an
            # operator does with a first server whose disk died before it registered) no
            # longer forms this one: the next server claims in its place, as for one deleted.
            if there is None or _left(there, cluster.name):
                init_id = None
        servers = view.held_servers(cluster.name)
        if isinstance(servers, Unseen):
            servers = await view.registered_servers(cluster.name)
        running = [m for m in servers if m.id != machine.id]
        return init_id, running

    def _endpoint(self, cluster: Cluster, running: list[Machine]) -> str | None:
        """Where a node of a managed cluster reaches its servers, or None while nowhere.

        A configured endpoint (a VIP) wins; then ``<cluster>.<zone>`` when netboot's DNS
        answers it with a registered server; then the registered address of the first server.
        Never a name that nothing resolves (the cluster's bare name) nor an address a node
        reported about itself without it being checked (registration refuses loopback).
        """
        port = self.settings.k3s_port
        if cluster.endpoint:
            return endpoint_url(cluster.endpoint, port)
        domain = self.settings.cluster_domain
        fixed_first = self.settings.fixed_first
        if domain and serves_cluster(cluster.name, running, fixed_first=fixed_first):
            return f"https://{cluster.name.lower()}.{domain}:{port}"
        for node in running:
            host = ((node.fixed_ipv4 if fixed_first else None) or node.ipv4
                    or node.facts.get("ipv6") or node.fixed_ipv4)
            if host:
                return f"https://{url_host(host)}:{port}"
        return None

    def _tls_san(self, cluster: Cluster) -> tuple[str, ...]:
        names = []
        if cluster.endpoint:
            names.append(endpoint_host(cluster.endpoint))
        if self.settings.cluster_domain and valid_label(cluster.name.lower()):
            names.append(f"{cluster.name.lower()}.{self.settings.cluster_domain}")
        return tuple(names)

    async def _waiting_reason(self, cluster: Cluster) -> str:
        fix = f"or give the cluster one: netboot clusters set {cluster.name} --endpoint HOST"
        if await self._view.registered_servers(cluster.name):
            # Registered, but from no address another node could reach (all were refused).
            return (f"waiting for an address of cluster {cluster.name}'s servers: they "
                    f"registered without one other nodes can reach ({fix})")
        reason = (f"waiting for cluster {cluster.name}'s first server to register: its nodes "
                  f"have no endpoint to join yet ({fix})")
        # s36-journey: the nodes held here wait for one node, which may never come (a dead
        # disk): name it and the way out, or they wait forever with nothing said. Not its
        # state: each held node records its hold once per reason, and a reason that moved
        # with the first server's install would record each of a storm's holds again.
        init_id = await self._view.get_setting(f"cluster-init/{cluster.name}")
        first = await self._view.get_machine(init_id) if init_id else None
        if first is None or _left(first, cluster.name):
            return reason
        # Named by its id (and hostname), not its MAC: this text is every held node's iPXE
        # script, which any host sending a held node's MAC is given, and the first server's
        # MAC is what its own install (its cluster's k3s CA key) answers (s44-attack).
        named = f"{first.hostname} ({first.id})" if first.hostname else first.id
        return (f"{reason}; it is {named}, chosen to initialise it: if it never registers "
                f"(a dead disk), remove it (netboot machines rm {first.id}) and the next "
                "server to boot initialises the cluster")

    async def explain(self, ref: str, *, arch: Arch | None = None) -> dict[str, Any]:
        """Which group matched and why, which profile, which state (``netboot explain``).

        ``ref`` is a MAC or a machine id. ``arch`` answers for a machine that has not booted
        yet (selectors on arch cannot match an architecture nobody has reported); otherwise
        the last one seen is used.
        """
        await self._view.sync()
        machine = await identity.by_ref(self._view, ref)
        if machine is None:
            return {"mac": ref, "known": False, "policy": self.settings.policy,
                    "decision": "unknown machine: discovery policy " + self.settings.policy}
        request = identity.request_for(machine, arch=arch or machine.arch or Arch.UNKNOWN,
                                       firmware=machine.firmware or Firmware.UNKNOWN)
        group, profile, cluster, role = await self._effective(machine, request)
        plan = await self.plan(request, record=False)
        return {
            "mac": str(machine.mac) if machine.mac else None, "id": machine.id,
            "macs": [str(m) for m in machine.macs], "known": True,
            "state": str(machine.state),
            "group": group.name if group else None,
            "group_selector": {k: list(v) for k, v in group.selector.items()} if group else None,
            "profile": profile.name if profile else None,
            "profile_source": self._profile_source(machine, group, profile),
            "cluster": cluster.name if cluster else None,
            "role": str(role), "decision": str(plan.action), "reason": plan.reason,
            "arch": str(request.arch) + ("" if arch or machine.arch else " (not seen yet)"),
            **await self._explain_chain(machine, request),
        }

    async def _explain_chain(self, machine: Machine, request: BootRequest) -> dict[str, Any]:
        """Which UEFI first-stage chain the machine gets and why (what its firmware is sent)."""
        chain, why = await self.chain(machine, request)
        fw = machine.firmware if machine.firmware in (Firmware.UEFI, Firmware.UEFI_HTTP) \
            else Firmware.UEFI
        if request.arch == Arch.UNKNOWN:
            # Not seen yet, no --arch: its loader follows the architecture its firmware's
            # request names. Asked for "unknown", the loader look-up found none: every machine
            # enrolled before its first boot was said to get "no answer" (and a warning logged).
            return {"loader": str(chain or default_chain(fw, request.arch)),
                    "loader_source": why, "first_stage": None,
                    "first_stage_reason": "not known until it boots: its firmware's request "
                    f"names its architecture (netboot explain {machine.ref} --arch "
                    "x86_64 or arm64 shows one)"}
        stage = self.loader(replace(request, firmware=fw), chain, why)
        effective = (stage.chain if stage is not None and stage.chain is not None
                     else chain or default_chain(fw, request.arch))
        return {"loader": str(effective), "loader_source": why,
                "first_stage": stage.path if stage else None,
                "first_stage_reason": (stage.reason if stage else
                                       f"no {effective} loader installed for {fw}/"
                                       f"{request.arch}: the firmware gets no answer")}

    @staticmethod
    def _profile_source(machine: Machine, group: Group | None, profile: Profile | None,
                        ) -> str | None:
        if profile is None:
            return None
        if machine.profile:
            return "machine"
        return "group" if group is not None and group.profile else "default"

    # -- records -----------------------------------------------------------------------
    async def _adopt(self, request: BootRequest, res: Resolution) -> Machine | None:
        """Record what this boot proved about who the machine is; the machine as stored.

        The NIC it booted from is attached when new (a machine enrolled by serial, or by its
        other NIC), and ``discovered`` records of the same device are merged into it, their
        events and facts kept (netboot.identity explains the precedence).
        """
        machine = res.machine
        if machine is None:
            return None
        for kind, other in res.disagree:
            self._log.warning("identifiers disagree: mac=%s is machine %s, but its %s is %s's",
                              request.mac, machine.id, kind, other.id)
        if not res.absorb and not _new_nic(request, machine, res.absorb):
            return machine
        # The caller holds its NIC's lock; another NIC of this machine (a server whose ports
        # PXE-boot at once) holds its own, and the compare-and-set below checks the state
        # alone: without the machine's lock and a look from a fresh view, each stored the
        # machine with its own NIC added, undoing the others' (their "nic-attached" events
        # told, their NICs gone; a discovered record both absorbed, merged twice) (s33-attack).
        async with _Locked(self._locks, machine.id):
            await self._view.sync()
            res = await self._resolve(request)
            machine = res.machine
            if machine is None:
                return None
            new_nic = _new_nic(request, machine, res.absorb)
            if new_nic and identity.unlisted_count(machine) >= identity.UNLISTED_MAX:
                self._not_attached(machine, request.mac)  # held as one not listed (_plan)
                new_nic = False
            if not res.absorb and not new_nic:
                return machine
            return await self._attach(request, res, machine, new_nic)

    def _not_attached(self, machine: Machine, mac: MacAddress) -> None:
        """Say, once a machine while this process runs, that NIC ``mac`` reporting its
        identifiers was not attached: it has identity.UNLISTED_MAX NICs no operator listed."""
        key = (machine.id, "", "")
        if key in self._unlisted_seen:
            return
        if len(self._unlisted_seen) >= REPEATS_KEPT:
            self._unlisted_seen.clear()
        self._unlisted_seen.add(key)
        self._log.warning(
            "machine %s: NIC %s reported its UUID, serial or asset tag but was not attached: "
            "the machine has %d NICs a boot attached and no operator listed, the most kept "
            "(a host sending its UUID from made-up MACs?). List the machine's own (netboot "
            "machines set %s --add-mac MAC) or remove the others (PATCH macs); until then "
            "such NICs are held", machine.ref, mac, identity.UNLISTED_MAX, machine.id)

    async def _attach(self, request: BootRequest, res: Resolution, machine: Machine,
                      new_nic: bool) -> Machine:
        """:meth:`_adopt`'s write, under the machine's lock."""
        now = self._clock()
        updated = identity.merge(machine, res.absorb, now)
        events = [Event(updated.id, now, "merged",
                        f"discovered record {d.id} ({', '.join(map(str, d.macs))}) is this "
                        f"machine, recognised by its {res.matched_by}; its history is kept",
                        {"merged": d.id, "macs": [str(m) for m in d.macs]})
                  for d in res.absorb]
        if new_nic:
            updated = replace(updated, macs=(*updated.macs, request.mac))
        # NICs a boot added: not given the machine's install nor its fixed address until an
        # operator lists them (identity.UNLISTED); a machine enrolled without a MAC trusts
        # its first ones only under enroll.trust_first_nic.
        added = ([m for m in updated.macs if m not in machine.macs]
                 if machine.macs or not self.settings.trust_first_nic else [])
        if added:
            updated = replace(updated, facts=identity.with_unlisted(updated.facts, added))
        if new_nic:
            fixed = f" or its fixed address {machine.fixed_ipv4}" if machine.fixed_ipv4 else ""
            note = (f"; not given its install{fixed} until an operator lists it (netboot "
                    f"machines set {machine.id} --add-mac {request.mac})" if added else "")
            events.append(Event(updated.id, now, "nic-attached",
                                f"booted from NIC {request.mac}, recognised by its "
                                f"{res.matched_by}{note}", {"mac": str(request.mac),
                                                            "matched_by": str(res.matched_by)}))
        read = (machine, *res.absorb)
        await self._recorder.commit(Batch(merge=[(d.id, updated.id) for d in res.absorb],
                                          update=(updated,), events=events,
                                          expect={m.id: m.state for m in read},
                                          versions={m.id: m.updated for m in read}))
        self._log.info("machine %s: mac=%s attached=%s merged=%s (by %s)", updated.id,
                       request.mac, new_nic, [d.id for d in res.absorb], res.matched_by)
        return updated

    async def _discover(self, request: BootRequest, machine: Machine | None,
                        res: Resolution, *, admitted: bool = False) -> Machine | None:
        """Record what an unknown machine's firmware told us (never loses earlier facts).

        None when a new record is over the discovery budget (:mod:`netboot.discovery`): the
        request is answered as for an unknown machine, and nothing is written."""
        now = self._clock()
        if machine is None:
            machine = learn(Machine(macs=(request.mac,), created=now, state=lifecycle.first_state(
                lifecycle.Trigger.DISCOVER, subject=str(request.mac))), request, now, _taken(res))
            if not await self.discovery.reserve(request, machine.id, now, admitted=admitted):
                return None
            first: Conflict | None = None
            try:
                await self._recorder.commit(Batch(create=(machine,), events=(self._new_event(
                    machine, "discovered", f"unknown {request.firmware}/{request.arch} machine "
                    f"seen via {request.via}{_hostname_note(request.hostname)}", request),)))
            except Conflict as exc:  # a concurrent request created it first: read it back
                first = exc
            if first is not None:  # awaited outside the handler: see recorder._write_group
                self.discovery.release(machine.id)
                await self._view.sync()
                existing = (await self._resolve(request)).machine
                if existing is None:
                    raise first
                return existing
            self._log.info("discovered mac=%s firmware=%s arch=%s uuid=%s via=%s",
                           request.mac, request.firmware, request.arch, request.uuid, request.via)
            return machine
        return await self._learn(machine, request, now, _taken(res))

    async def _note(self, machine: Machine, request: BootRequest, res: Resolution, kind: str,
                    message: str, seen: _Seen | None = None) -> None:
        """``seen``: the NIC's memo of ``request`` (its identity, what its decision found it
        teaches)."""
        self._note_now(machine, request, res, kind, message, seen)

    def _note_now(self, machine: Machine, request: BootRequest, res: Resolution, kind: str,
                  message: str, seen: _Seen | None = None) -> None:
        """:meth:`_note`, which waits for nothing, without its coroutine."""
        # A firmware retransmits and asks twice (port 67, then 4011): one line per step.
        self._event_now(machine, kind, message, request, once=True)
        # Even a new identifier (a UUID in option 97) goes with the next group commit, not a
        # commit of its own: this record runs after the answer, and the device's next
        # requests (retransmissions, :4011, iPXE) are recognised by the NIC this one came
        # from. Meanwhile Recorder.learning() shows it to _tells_news, so they write nothing.
        now, taken = self._clock(), _taken(res)
        updated = None
        if seen is not None:
            news = seen.news
            # Used once: not kept alive with the memo (what a storm's memos hold is walked by
            # every full collection of the cyclic GC until they are dropped).
            seen.news = None
            if news is not None and news[0] is machine and news[1] == taken:
                # learn() of the very machine object the decision found news for
                # (_tells_more): the same fields, set without working them out again.
                updated = _learnt_copy(machine, news[2], now)
        self._learn_later(machine, request, now, taken, updated,
                          seen=None if seen is None else seen.identity)

    async def _event(self, machine: Machine, kind: str, message: str,
                     request: BootRequest | None = None, *, once: bool = False) -> None:
        """Queue an event that acknowledges nothing (written within the recorder's delay)."""
        self._event_now(machine, kind, message, request, once=once)

    def _event_now(self, machine: Machine, kind: str, message: str,
                   request: BootRequest | None = None, *, once: bool = False) -> None:
        """:meth:`_event` without its coroutine."""
        event = self._new_event(machine, kind, message, request)
        if once:
            # A held machine retries every few seconds; one event says it, thousands bury
            # the rest of its history. Compared off the request path (netboot.recorder).
            self._recorder.note(event, version=machine)
        else:
            self._recorder.record(event)

    def _learn_later(self, machine: Machine, request: BootRequest, now: float,
                     taken: frozenset[str] = frozenset(),
                     updated: Machine | None = None, seen: Identity | None = None) -> Machine:
        """``machine`` with what ``request`` told about it (:func:`learn`), for the answer;
        stored with the next group commit of boot notes, not before the answer: nothing of
        it is told to the device. It is learnt again then, on the machine as it is stored
        at that moment, so that a change made meanwhile (by an operator, another server)
        is kept, not overwritten with this request's copy."""
        if updated is None:  # else the caller learnt it already
            updated = learn(machine, request, now, taken, seen)
        if updated is not machine:
            # A partial, not a closure: two objects kept until the group commit, not a
            # function and a cell per variable (seven), for every record of a storm.
            self._recorder.learned(machine.id, functools.partial(
                _learnt_again, machine, updated, request, now, taken, seen))
        return updated

    async def _learn(self, machine: Machine, request: BootRequest, now: float,
                     taken: frozenset[str] = frozenset()) -> Machine:
        """:meth:`_learn_later`, except that a new identifier (UUID, serial, asset tag) is
        committed at once: the next request may be recognised by it."""
        updated = learn(machine, request, now, taken)
        # learn() sets an identifier only where the machine has none (never a MAC): a field
        # that changed is a new claim.
        if updated is not machine and (updated.uuid != machine.uuid
                                       or updated.serial != machine.serial
                                       or updated.asset != machine.asset):
            await self._commit_update(updated, machine)
            return updated
        return self._learn_later(machine, request, now, taken, updated)

    async def _newest(self, ids: Collection[str]) -> dict[str, Machine | None]:
        """The machines as stored now (the recorder's source for :meth:`_learn_later`).

        Now, not as of the arrival of the request whose event started the recorder's writer
        (its task inherits that request's netboot.arrival): a probe made since that arrival
        would not see another process's commit made after the probe, and the learnt facts
        would be written over it."""
        with arrived(time.monotonic()):
            await self._view.sync()
        view = self._view
        out: dict[str, Machine | None] = {}
        for machine_id in ids:
            # From memory where the view holds it (a loaded view: every machine), without
            # a coroutine per machine: a storm's group commit learns thousands of them.
            held = view.held_machine(machine_id)
            out[machine_id] = (held if not isinstance(held, Unseen)
                               else await view.get_machine(machine_id))
        return out

    async def _commit_update(self, machine: Machine, read: Machine) -> None:
        """Store what a boot taught about ``machine`` (grouped with concurrent commits), and
        answer with it from now on. Compare-and-set on ``read``, the machine it was decided
        from (its state and version): StateChanged if anyone changed the machine meanwhile
        (another server moved it, an operator edited it), which this write would undo."""
        versions = {machine.id: read.updated}
        await self._recorder.commit(Batch(update=(machine,), expect={machine.id: read.state},
                                          versions=versions, bases={machine.id: read}))
        self._view.adopt((machine,), versions)

    def _new_event(self, machine: Machine, kind: str, message: str,
                   request: BootRequest | None = None) -> Event:
        data: dict[str, str] = {}
        text = "{}"
        if request is not None:
            via, firmware, arch = request.via, str(request.firmware), str(request.arch)
            data = {"via": via, "firmware": firmware, "arch": arch}
            # The data's JSON text made with it (Event.data_text), as codec.stored_event
            # writes it, where its keys are known: the store would check and quote each
            # pair again (~17,000 instructions of a first install's loop, s43-install).
            # The firmware's and arch's texts are their enums' values, which need no
            # escape; the MAC's is hex digits and colons.
            mac = peer = ""
            if request.mac != identity.NO_NIC_BYTES:
                # Its text by bytes.hex of itself (a MacAddress is its six bytes), what its
                # __str__ returns, without that Python-level call (~600 instructions of
                # every first install's loop).
                data["mac"] = mac = request.mac.hex(":")
                mac = f',"mac":"{mac}"'
            if remote := request.remote_addr:
                data["peer"] = remote
                peer = f',"peer":{_quote(remote)}'
            # One string built (an f-string), not one a concatenation.
            text = f'{{"via":{_quote(via)},"firmware":"{firmware}","arch":"{arch}"{mac}{peer}}}'
        return event_of(machine.id, self._clock(), kind, message, data, text)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("background inventory write failed: %s", task.exception())

    def repeated(self, plan: BootPlan) -> bool:
        """Whether ``plan`` is the decision kept for its NIC (:meth:`plan`), which
        answers its repeats while nothing it was taken from changed: what is made of it
        alone may be kept with it (Content's install script)."""
        kept = self._repeats.get(plan.mac)
        return kept is not None and kept.plan is plan

    def forget_memos(self) -> None:
        """The NICs' DHCP memos (_Seen) dropped, once quiet after a storm (Service.forget_idle):
        each is worked out again from its NIC's next request, as for a NIC not seen yet. A
        1,000-device storm left ~1,000 of them (the request, its identity and look-up keys,
        the decision: ~0.7 MiB) held until 8,192 other NICs pushed them out, scattered over
        the pools the storm's Python heap grew by (benchmarks/README.md, s35-mem). A record
        under way keeps the memo it was given (_record_dhcp's ``seen``)."""
        self._seen.clear()

    async def drain(self) -> None:
        """Finish background records and write every queued event (shutdown; readers of
        the history call it first so that they see everything recorded)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._recorder.flush()


K = TypeVar("K")
V = TypeVar("V")


class _Locked:
    """``async with`` one key of ``held`` held by one task at a time, in the order they came:
    ``held[key]`` is [the turns of those waiting (None until one waits), how many hold it or
    wait for it], made by its first user and dropped by its last. Without contention (one
    NIC's requests one after another: nearly always) entering and leaving is a dict's store
    and delete, with no wait; the asyncio.Lock made per request for that (its constructor,
    its acquire coroutine, its release) was ~1 % of a first install's event-loop
    instructions (session 27). A waiter's turn is a future its predecessor completes on
    leaving: the key is handed over, never free meanwhile (as asyncio.Lock, no later comer
    overtakes a waiter). (A WeakValueDictionary of locks did the same, at a weak reference,
    its removal callback and the dictionary's own bookkeeping per request: ~5 % of a first
    install's event-loop time.)"""

    __slots__ = ("_entry", "_held", "_key")

    def __init__(self, held: dict[Any, list[Any]], key: object) -> None:
        self._held = held
        self._key = key

    async def __aenter__(self) -> None:
        if not self.take():
            await self.wait()

    def take(self) -> bool:
        """Hold the key now if no one holds it or waits for it (True); else count this
        user in, and :meth:`wait` for its turn. (``async with`` in two steps, for the
        caller that enters nearly always at once: no coroutine made for that.)"""
        entry = self._held.get(self._key)
        if entry is None:
            self._entry = self._held[self._key] = [None, 1]
            return True
        entry[1] += 1
        self._entry = entry
        return False

    async def wait(self) -> None:
        """After :meth:`take` said False: until the key is handed to this user."""
        entry = self._entry
        waiting: collections.deque[asyncio.Future[None]] | None = entry[0]
        if waiting is None:
            waiting = entry[0] = collections.deque()
        turn = asyncio.get_running_loop().create_future()
        waiting.append(turn)
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():
                self.leave()  # handed the key, cancelled before it ran: handed on
            elif turn in waiting:  # cancelled while waiting: never held
                waiting.remove(turn)
                entry[1] -= 1
                if not entry[1]:
                    del self._held[self._key]
            # (else a leaver dropped its cancelled turn and counted it gone: see leave)
            raise

    async def __aexit__(self, *exc: object) -> None:
        self.leave()

    def leave(self) -> None:
        entry = self._entry
        entry[1] -= 1
        waiting = entry[0]
        while waiting:
            turn = waiting.popleft()
            if not turn.done():  # not cancelled meanwhile
                turn.set_result(None)
                return
            # Cancelled, its waiter not yet woken: counted gone now, not when it wakes.
            # Else a comer before that wake-up found the key counted held by no one and
            # waited for a hand-over nobody was left to make: the NIC's lock held forever.
            entry[1] -= 1
        if not entry[1]:
            del self._held[self._key]


def _keep(kept: collections.OrderedDict[K, V], key: K, value: V, bound: int) -> None:
    """``kept[key] = value`` as its newest entry, the oldest dropped past ``bound``.

    An OrderedDict, not a dict: a dict's oldest entry is found by ``next(iter())``, which
    steps over the slots of every entry deleted since the dict last resized (thousands, once
    it is full): 2.7 µs per call with 8,192 kept, against 0.2 µs for ``popitem(last=False)``
    (benchmarks/README.md, session 11), on every first DHCP request of a fleet's machines."""
    kept[key] = value
    kept.move_to_end(key)
    if len(kept) > bound:
        kept.popitem(last=False)


def _describe_stage(fw: Firmware, arch: Arch, which: LoaderChain, name: str,
                    why: str) -> FirstStage:
    what = ("chainloads iPXE" if which == LoaderChain.IPXE
            else "signed chain shim → GRUB" if name.startswith("shim")
            else "signed GRUB")
    reason = f"{fw}/{arch} {what} ({name}; chain {which}: {why})"
    if fw == Firmware.UEFI_HTTP:
        return FirstStage("/assets/" + name, http=True, reason=f"UEFI HTTP boot: {reason}",
                          chain=which)
    return FirstStage(name, reason=reason, chain=which)


# First stages kept by BootService.loader (each distinct description once).
_STAGES_KEPT = 1024
# The chains tried for a machine that chose none: its architecture's default, then the others.
_FALLBACKS: dict[LoaderChain, tuple[LoaderChain, ...]] = {
    first: (first, *(c for c in LoaderChain if c != first)) for first in LoaderChain}


def _chains(fw: Firmware, arch: Arch, chain: LoaderChain | None) -> tuple[LoaderChain, ...]:
    """The chains :meth:`BootService.loader` tries: the chosen one, else the default's."""
    return _FALLBACKS[default_chain(fw, arch)] if chain is None else (chain,)


# The loader files BootService.loader tries for a firmware, arch and chosen chain (None: the
# default), in order: each chain's names (_LOADERS), the chains as _chains gives them.
_TRIED: dict[tuple[Firmware, Arch, LoaderChain | None], tuple[tuple[LoaderChain, str], ...]] = {
    (fw, arch, chain): tuple((which, name) for which in _chains(fw, arch, chain)
                             for name in _LOADERS.get((which, fw, arch), ()))
    for fw in Firmware for arch in Arch for chain in (None, *LoaderChain)}
# BootService._assets_read's answers by _TRIED's key and the place of the first file found
# (len(tried): none): each file tried up to it, and whether it was there.
_READS: dict[tuple[Firmware, Arch, LoaderChain | None],
             tuple[tuple[tuple[str, bool], ...], ...]] = {
    key: tuple(tuple((name, i == at) for i, (_, name) in enumerate(tried[:at + 1]))
               for at in range(len(tried) + 1))
    for key, tried in _TRIED.items()}


def _dhcp_note(request: BootRequest) -> str:
    note = _DHCP_NOTES[request.firmware, request.arch]
    return note if not request.hostname else note + _hostname_note(request.hostname)


def _hostname_note(name: str | None) -> str:
    """What a device's event says of its DHCP hostname (option 12): nothing, or that it was
    ignored, not stored, for not being an RFC 1123 name (a device may send any 255 bytes
    there; a refusal would only leave it unanswered). Never the name itself."""
    if not name or hostname_ok(name):
        return ""
    return (f"; ignored its DHCP hostname (option 12, {len(name)} characters): not an RFC "
            "1123 name (letters, digits and '-', labels of at most 63, at most 253)")


# What a DHCP record notes, by firmware and arch: written once, not formatted (two enums
# spelled out) for every first request of a storm.
_DHCP_NOTES: dict[tuple[Firmware, Arch], str] = {
    (fw, arch): f"{fw}/{arch} asked for a boot file" for fw in Firmware for arch in Arch}


def _left(machine: Machine, cluster: str) -> bool:
    """Whether a cluster's init node was since given another cluster or made an agent
    (s36-journey). A cluster or role not yet bound (None) has not left."""
    return (machine.cluster is not None and machine.cluster != cluster) or \
        machine.role == Role.AGENT


def _config_plan_of(machine: Machine, mac: MacAddress | None, reason: str, group: Group | None,
                    profile: Profile | None, cluster: Cluster | None, k3s: K3sJoin | None,
                    token: str | None) -> BootPlan:
    """A config's plan (BootService.config_plan, config_plan_now): for the NIC asked for,
    by default the machine's primary one."""
    # By position, as _install_plan's (action, mac, reason, retry_seconds, machine, group,
    # profile, cluster, k3s, token, command): keywords cost a class call a dict.
    return plan_of(_INSTALL, mac or machine.mac or identity.NO_NIC, reason, 0, machine,
                   group.name if group else None, profile, cluster, k3s, token, None)


def _gone_cluster(machine: Machine, group: Group | None) -> str:
    """Why a machine whose cluster (its own, or its group's) is not in the inventory is
    held, "" if it names none. Deleting a cluster in use is refused (Core.delete), but a
    machine or group given it while it was being deleted, or a copy made by hand, named one
    no more there: it installed with no k3s server and an empty token, a node that never
    joins, and nothing said it (s40-attack)."""
    name = machine.cluster or (group.cluster if group else None)
    if not name:
        return ""
    return (f"cluster {name!r} does not exist: create it, or give the "
            + ("machine another (netboot machines set REF --cluster NAME)"
               if machine.cluster else f"group {group.name if group else ''!r} another"))


def _chain_of(group: Group | None, profile: Profile | None) -> tuple[LoaderChain | None, str]:
    """The loader chain a machine that sets none gets from its group or profile, and who
    chose it (None: the default)."""
    if group is not None and group.loader is not None:
        return group.loader, f"set on group {group.name}"
    if profile is not None and profile.loader is not None:
        return profile.loader, f"set on profile {profile.name}"
    return None, "default for the architecture"


def _join_token(cluster: Cluster, role: Role) -> str:
    """The token a node of ``role`` joins ``cluster`` with: an agent its agent token where
    the cluster has one (k3s's servers accept it for an agent's join, never a server's: root
    on an agent must not join the control plane), a server the cluster's token."""
    agent = cluster.agent_token
    return agent if agent and role != "server" else cluster.token  # Role.SERVER's value


def _node_join(machine: Machine, cluster: Cluster, group: Group | None,
               ) -> tuple[dict[str, str], tuple[str, ...], str]:
    """A node's labels, taints and name as it joins ``cluster`` (its group's added)."""
    labels = dict(cluster.labels)
    taints = list(cluster.taints)
    if group is not None:
        labels.update(group.labels)
        taints += [t for t in group.taints if t not in taints]
    return labels, tuple(taints), machine.hostname or _nameless_node(machine)


def _nameless_node(machine: Machine) -> str:
    """The k3s node name of a machine without a hostname: its primary MAC's, else its id."""
    return f"node-{machine.mac.hexhyp}" if machine.mac else f"node-{machine.id}"


def _new_nic(request: BootRequest, machine: Machine, absorb: tuple[Machine, ...]) -> bool:
    """Whether ``request`` came from a NIC that neither ``machine`` nor the discovered
    records it absorbs has yet (BootService._adopt attaches it)."""
    mac = request.mac
    return mac != identity.NO_NIC_BYTES and mac not in machine.macs \
        and all(mac not in d.macs for d in absorb)


def _taken(res: Resolution) -> frozenset[str]:
    """Identifier kinds of the request that other enrolled machines hold: not to be learnt."""
    disagree = res.disagree
    # Nobody's, for nearly every request: no generator, no new set (kept in the NIC's memo).
    return frozenset(kind for kind, _ in disagree) if disagree else _NOBODYS


_NOBODYS: frozenset[str] = frozenset()  # _taken's answer when no other machine holds any
