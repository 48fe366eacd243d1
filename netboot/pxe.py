"""Who is asking, and what netboot's DHCP answer to it looks like.

Pure functions over :mod:`netboot.wire.dhcp` values: classify a client request into a
:class:`~netboot.model.BootRequest`, and build proxyDHCP offers/acks and authoritative
OFFER/ACK/NAK packets. Every firmware quirk lives here, with the source that documents it
(protocols.md §1-§5). Which loader a firmware gets is decided by ``netboot/boot.py`` (the
:class:`BootDecider`); this module only turns a :class:`~netboot.model.FirstStage` into the
bytes that firmware understands.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from netboot.errors import ConfigError
from netboot.model import (
    Arch,
    BootRequest,
    Firmware,
    FirstStage,
    MacAddress,
    boot_request_of_values,
)
from netboot.wire.dhcp import (
    BROADCAST_FLAG,
    MIN_PACKET_SIZE,
    OPTIONS_OFFSET,
    ZERO_IP,
    Inbound,
    MessageType,
    Op,
    Opt,
    Option,
    Packet,
    Request,
    encode,
    ip_option,
)


class BootDecider(Protocol):  # implemented by netboot/boot.py
    """What a DHCP client boots. May answer at once (a value) or later (an awaitable): a
    decision known in memory is answered without scheduling a task, which is most of what
    asyncio costs per datagram."""

    def first_stage(
        self, request: BootRequest
    ) -> FirstStage | Awaitable[FirstStage | None] | None: ...

    # Optional (the DHCP server looks for it): ``repeat_guard(request, stage)``, asked right
    # after ``first_stage(request)`` answered ``stage`` (at once, or once its awaitable is
    # done: then a check taken when it decided, never one of the state after), returns a
    # check that stays True while a request equal to this one would get the same answer
    # and record nothing (or None): the server then answers repeats of the same bytes with
    # the reply it sent.
    # netboot.boot.BootService.repeat_guard says what it checks. Also optional:
    # ``first_stage_now(request)``, asked instead of ``first_stage`` when the decider has it
    # (BootService's: its ``first_stage`` always answers a future, for other callers). And
    # ``fixed_holder(ipv4)``: the machine whose fixed_ipv4 an address is, or None (from
    # memory), which the authoritative pool never leases to another (LeasePool); and, for
    # the authoritative pool, awaited: ``fixed_address(mac)``, the fixed_ipv4 of the machine
    # a NIC is (none without it), and ``same_machine(mac, other)``, whether two NICs are one
    # machine's, for a fixed address the machine's other NIC holds (DhcpServer._sibling).


# ---------------------------------------------------------------------------------------------
# settings

MODES = ("proxy", "authoritative")


@dataclass(frozen=True, slots=True)
class DhcpSettings:
    """The DHCP part of the configuration (``dhcp.*`` keys)."""

    mode: str = "proxy"  # "proxy" (beside the site's DHCP server) | "authoritative"
    http_port: int = 8080  # netboot's HTTP port, for http:// boot URLs
    # UEFI PXE: False = "BINL" style, no option 43 on the :67 offer so EDK2 asks :4011
    # (dnsmasq, pixiecore); True = smee's single offer with 43 6=8 + file (protocols.md §1.3).
    uefi_option43: bool = False
    ack_on_67: bool = False  # smee-style ACK to REQUESTs on :67 in proxy mode (non-standard)
    # Vendor-class prefixes treated as PXE clients (dnsmasq --dhcp-pxe-vendor; quirk 4).
    pxe_vendor_classes: tuple[str, ...] = ("PXEClient", "HTTPClient")
    # authoritative mode
    pool_start: str | None = None
    pool_end: str | None = None
    netmask: str = "255.255.255.0"
    router: str | None = None
    dns_servers: tuple[str, ...] = ()
    domain: str | None = None
    lease_seconds: int = 3600
    decline_seconds: int = 600
    offer_seconds: int = 60  # how long an offered address is held for its client
    # Ping an address before its first offer (dnsmasq's default, --no-ping; servers/ping.py).
    # Off here, for the library and tests that build settings by hand; the configuration's
    # dhcp.ping_check (config.DhcpConfig) is on by default and is what serve passes.
    ping_check: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(
                f"unknown mode {self.mode!r}", key="dhcp.mode", fix="proxy or authoritative"
            )
        if not 0 < self.http_port < 65536:
            raise ConfigError(f"{self.http_port} is not a port", key="http.port")
        if self.mode == "authoritative":
            for key in ("pool_start", "pool_end"):
                if not getattr(self, key):
                    raise ConfigError(
                        "authoritative mode needs an address pool", key=f"dhcp.authoritative.{key}",
                        fix="e.g. pool_start: 192.0.2.100, pool_end: 192.0.2.199",
                    )
            for key in ("pool_start", "pool_end", "netmask", "router"):
                value = getattr(self, key)
                if value is not None:
                    _check_ip(value, f"dhcp.authoritative.{key}")
            for value in self.dns_servers:
                _check_ip(value, "dhcp.authoritative.dns")
            start, end = self.pool_range()
            if start > end:
                raise ConfigError("pool_start is after pool_end",
                                  key="dhcp.authoritative.pool_start")
            if self.lease_seconds < 60:
                raise ConfigError("lease shorter than 60 s", key="dhcp.authoritative.lease_seconds")

    def pool_range(self) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
        assert self.pool_start and self.pool_end
        return ipaddress.IPv4Address(self.pool_start), ipaddress.IPv4Address(self.pool_end)

    def network(self) -> ipaddress.IPv4Network:
        assert self.pool_start
        return ipaddress.IPv4Network(f"{self.pool_start}/{self.netmask}", strict=False)


def _check_ip(value: str, key: str) -> None:
    try:
        ipaddress.IPv4Address(value)
    except ValueError as exc:
        raise ConfigError(f"{value!r} is not an IPv4 address", key=key) from exc


# ---------------------------------------------------------------------------------------------
# classification

# Option 93 (RFC 4578 §2.1, IANA "Processor Architecture Types"; protocols.md §2.1). 7 and 9
# are both x86-64 UEFI: implementations use 7 = x64 and 9 = EBC while RFC 4578's text swaps
# them (quirk 16), so treat both as x86-64 like pixiecore, dnsmasq and smee do.
ARCH_CODES: dict[int, Arch] = {
    0: Arch.X86,  # x86 BIOS (also Pi 3/4/5 bootloaders, see quirk 7)
    6: Arch.X86,  # EFI IA32
    7: Arch.X86_64,  # EFI x86-64
    9: Arch.X86_64,  # EFI BC, in practice x86-64
    10: Arch.ARM32,  # EFI ARM32
    11: Arch.ARM64,  # EFI ARM64
    15: Arch.X86,  # EFI IA32 HTTP
    16: Arch.X86_64,  # EFI x86-64 HTTP
    18: Arch.ARM32,  # EFI ARM32 HTTP
    19: Arch.ARM64,  # EFI ARM64 HTTP
    20: Arch.X86,  # x86 BIOS HTTP
    21: Arch.ARM32,  # ARM 32-bit U-Boot
    22: Arch.ARM64,  # ARM 64-bit U-Boot
    27: Arch.RISCV64,  # RISC-V 64 UEFI
    28: Arch.RISCV64,  # RISC-V 64 UEFI HTTP
    41: Arch.ARM64,  # "arm rpiboot" (smee); Pis actually send 0
}
UEFI_PXE_CODES = frozenset({6, 7, 9, 10, 11, 27})
UEFI_HTTP_CODES = frozenset({15, 16, 18, 19, 20, 28})
UBOOT_CODES = frozenset({21, 22})

# Raspberry Pi Foundation / Raspberry Pi Trading OUIs, as smee matches them (quirk 7).
RPI_OUIS = frozenset({"b8:27:eb", "dc:a6:32", "e4:5f:01", "28:cd:c1", "d8:3a:dd"})
# Pi 4/5 option 97 starts with a FourCC (boot-net.adoc); the byte order is not documented,
# so accept it either way round.
_RPI_FOURCCS = (b"RPi4", b"RPi5", b"4iPR", b"5iPR")
_RPI_FOURCC = re.compile(b"|".join(_RPI_FOURCCS))

# iPXE feature sub-option of option 175 for HTTP (features.h FEATURE_HTTP 0x13).
IPXE_FEATURE_HTTP = 0x13

# Option codes read per request, as plain ints: on CPython 3.11 reading an enum member costs
# ~0.1-0.3 µs, and the DHCP path read a dozen per datagram.
_VENDOR_SPECIFIC, _HOSTNAME, _VENDOR_CLASS, _CLIENT_UUID = 43, 12, 60, 97
_CLIENT_ARCH, _USER_CLASS, _ETHERBOOT, _PARAMETER_REQUEST_LIST = 93, 77, 175, 55
_TFTP_SERVER_NAME, _BOOTFILE_NAME, _RELAY_AGENT_INFO = 66, 67, 82
_DISCOVER, _REQUEST = MessageType.DISCOVER, MessageType.REQUEST
_RPI, _UBOOT = Firmware.RPI, Firmware.UBOOT
_NO_ADDRESS = bytes(4)  # 0.0.0.0 as sent
# Option 97's values that mean "no UUID" (_uuid): type 0 and all zeros (QEMU without -uuid)
# or all FF.
_NO_UUIDS = (bytes(17), b"\0" + b"\xff" * 16)
# EFI's GUID byte order (_uuid): its first three fields little-endian, read from option 97
# after the type byte and written back big-endian, the standard order.
_EFI_GUID_HEAD, _GUID_HEAD = struct.Struct("<IHH"), struct.Struct(">IHH")
# A MAC and a Client made without their Python ``__new__`` (_client): a call frame each,
# ~1,000 and ~3,000 instructions of every datagram classified (callgrind, benchmarks/
# README.md s50-sighting).
_new_bytes, _new_tuple = bytes.__new__, tuple.__new__
# Replies broadcast on the client's link whatever ciaddr says (reply_destination): as plain
# ints, for the per-reply test (an enum member read costs ~0.1-0.3 µs).
_BROADCAST_REPLIES = frozenset({int(MessageType.NAK), int(MessageType.OFFER)})


class Client(NamedTuple):
    """A classified client request: the BootRequest plus the protocol facts the reply needs.

    A named tuple rather than a frozen dataclass: one is built per datagram, and a frozen
    dataclass's ``__init__`` (a setattr call per field) was several µs of a proxy offer."""

    request: BootRequest
    message_type: MessageType | None
    vendor_class: str  # option 60 as text ("" when absent)
    pxe: bool  # a PXE/HTTP boot client we may answer as a proxy (60 prefix + option 93)
    ipxe: bool
    ipxe_http: bool  # this iPXE can fetch http:// URLs (protocols.md §2.3)
    requested: frozenset[int]  # option 55

    @property
    def firmware(self) -> Firmware:
        return self.request.firmware

    @property
    def http_client(self) -> bool:
        return self.vendor_class.startswith("HTTPClient")


def _etherboot_features(value: bytes) -> dict[int, bytes] | None:
    """Option 175's sub-options (iPXE ``features.h``): code, length, value. None if garbled."""
    out: dict[int, bytes] = {}
    i = 0
    while i < len(value):
        code = value[i]
        if code in (0, 255):
            i += 1
            continue
        if i + 1 >= len(value) or i + 2 + value[i + 1] > len(value):
            return None
        out[code] = value[i + 2 : i + 2 + value[i + 1]]
        i += 2 + value[i + 1]
    return out


def _uuid(raw: bytes | None, firmware: Firmware) -> str | None:
    # Option 97: type 0 + 16 bytes (RFC 4578 §2.3; quirk 3 says some ROMs omit it). EFI and iPXE
    # send the GUID in EFI byte order, first three fields little-endian (iPXE uuid_mangle(),
    # EDK2 copies EFI_GUID raw); U-Boot sends pxeuuid in standard big-endian order
    # (protocols.md §2.3). All-zero (QEMU without -uuid) and all-FF mean "no UUID".
    if raw is None or len(raw) != 17 or raw[0] != 0 or firmware == _RPI or raw in _NO_UUIDS:
        return None
    # str(uuid.UUID(bytes=body)) without building the UUID object: one per DISCOVER. From
    # one hex() of the whole option, the type byte's two digits skipped; the first three
    # fields' bytes reversed by their digit pairs for EFI's byte order (module constants and
    # no byte slices: half the instructions of reversing the bytes first, s38-dhcp1st).
    # EFI's fields turned by two struct calls, then one hex() and five slices: eleven slices
    # of the option's hex() were ~11,700 instructions a UUID (callgrind, s50-sighting).
    if firmware == _UBOOT:
        h = raw.hex()
        return f"{h[2:10]}-{h[10:14]}-{h[14:18]}-{h[18:22]}-{h[22:]}"
    h = (_GUID_HEAD.pack(*_EFI_GUID_HEAD.unpack_from(raw, 1)) + raw[9:]).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _text(raw: bytes | None) -> str:
    return raw.decode("latin-1").rstrip("\0") if raw else ""


@dataclass(frozen=True, slots=True)
class _Shape:
    """What a request's class options say, whoever sent it: the part of :class:`Client` that
    many devices share (one per firmware, arch and what it asks for)."""

    vendor_class: str
    arch_code: int | None
    arch: Arch
    firmware: Firmware
    platform: str | None
    pxe: bool
    ipxe: bool
    ipxe_http: bool
    requested: frozenset[int]
    # Client's fields from vendor_class on, in its order (_client).
    tail: tuple[str, bool, bool, bool, frozenset[int]]


_Get = Callable[[int], bytes | None]


def _options(packet: Inbound) -> _Get:
    """The packet's option values by code, as ``packet.option`` answers: a parsed
    :class:`Request`'s dict's own ``get``, whose calls cost a third of the Python method's
    (a first DISCOVER read nine options in classifying; s38-dhcp1st)."""
    return packet.values.get if type(packet) is Request else packet.option


RPI_OUI_BYTES = frozenset(bytes.fromhex(oui.replace(":", "")) for oui in RPI_OUIS)


def _is_rpi(packet: Inbound, vendor_class: bytes | None, option: _Get) -> bool:
    """A Raspberry Pi bootloader (quirk 7): PXEClient, and a Pi OUI, a Pi FourCC in 97 or
    "Raspberry Pi" in 43. A device-specific fact (the MAC), hence outside the shape.
    ``option``: the packet's options by code (_options)."""
    if vendor_class is None or not vendor_class.startswith(b"PXEClient"):
        return False
    if packet.chaddr[:3] in RPI_OUI_BYTES:
        return True
    uuid_raw = option(_CLIENT_UUID)
    # Two substring tests first: every PXEClient's 97 is looked at, few hold a FourCC. By
    # find(), not ``in``: bytes' ``in`` first tries its operand as an integer (a byte's
    # value), and for bytes raises and clears a TypeError with its message formatted,
    # ~2,400 instructions a test against find()'s ~1,350; three a DISCOVER were 1.5 % of
    # the event loop's instructions a first DISCOVER (callgrind, benchmarks/README.md,
    # s37-dhcp1st).
    if uuid_raw is not None and (uuid_raw.find(b"RPi") >= 0 or uuid_raw.find(b"iPR") >= 0) \
            and _RPI_FOURCC.search(uuid_raw) is not None:
        return True
    vendor_specific = option(_VENDOR_SPECIFIC)
    return vendor_specific is not None and vendor_specific.find(b"Raspberry Pi") >= 0


def _shape(
    settings: DhcpSettings, vendor_raw: bytes | None, arch_raw: bytes | None,
    user_class: bytes | None, etherboot: bytes | None, requested: bytes | None, rpi: bool,
) -> _Shape:
    vendor_class = _text(vendor_raw)
    # RFC 4578 §2.1: a list of 16-bit codes, even length > 0; take the first (as smee does).
    arch_code = int.from_bytes(arch_raw[:2], "big") if arch_raw and len(arch_raw) >= 2 else None
    # iPXE sends 77 as the raw 4 bytes "iPXE", not RFC 3004 length-prefixed; accept both. Any
    # option 175 also means iPXE (dnsmasq's "dhcp-match=set:ipxe,175").
    ipxe = user_class in (b"iPXE", b"\x04iPXE") or etherboot is not None
    features = _etherboot_features(etherboot) if etherboot is not None else None
    if etherboot is None:
        ipxe_http = ipxe
    else:
        ipxe_http = features is not None and IPXE_FEATURE_HTTP in features

    if ipxe:
        firmware = Firmware.IPXE
    elif vendor_class.startswith("HTTPClient"):
        firmware = Firmware.UEFI_HTTP
    elif vendor_class.startswith("U-Boot"):
        firmware = Firmware.UBOOT
    elif rpi:
        firmware = Firmware.RPI
    elif arch_code == 0:
        firmware = Firmware.BIOS
    elif arch_code in UEFI_PXE_CODES:
        firmware = Firmware.UEFI
    elif arch_code in UEFI_HTTP_CODES:
        firmware = Firmware.UEFI_HTTP
    elif arch_code in UBOOT_CODES:
        firmware = Firmware.UBOOT
    else:
        firmware = Firmware.UNKNOWN
    arch = ARCH_CODES.get(arch_code, Arch.UNKNOWN) if arch_code is not None else Arch.UNKNOWN
    if firmware == Firmware.RPI:
        arch = Arch.ARM64  # the Pi reports x86 BIOS (quirk 7); its CPU is ARM
    platform = None
    if ipxe and arch_code is not None:
        platform = "pcbios" if arch_code == 0 else "efi"

    pxe = arch_code is not None and (
        vendor_class.startswith(tuple(settings.pxe_vendor_classes))
        or vendor_class.startswith("U-Boot")
    )
    requested_codes = frozenset(requested or b"")
    return _Shape(vendor_class, arch_code, arch, firmware, platform, pxe, ipxe, ipxe_http,
                  requested_codes, (vendor_class, pxe, ipxe, ipxe_http, requested_codes))


def _client(shape: _Shape, packet: Inbound, peer: str | None, interface: str | None,
            option: _Get) -> Client:
    """The shape plus what is this device's own: MAC, UUID, hostname, where it came from.
    ``option``: the packet's options by code (_options)."""
    if packet.hlen == 6 and packet.htype == 1:
        raw = packet.chaddr[:6]
        # A request's chaddr is 16 bytes (RFC 2131 §2): six, what MacAddress checks first.
        mac = _new_bytes(MacAddress, raw) if len(raw) == 6 else MacAddress(raw)
    else:  # not Ethernet: classify as unknown with a zero MAC placeholder
        mac = MacAddress(packet.chaddr[:6].ljust(6, b"\0"))
    hostname = option(_HOSTNAME)
    giaddr = packet.giaddr
    if peer == ZERO_IP:
        # RFC 2131 §4.1: a client with no address yet sends from 0.0.0.0, which names no
        # host. Kept, it was learnt as the machine's ``remote_addr`` fact at each first
        # sighting (a row rewrite at every boot of a machine whose HTTP requests had set
        # its real address) and written in each ``dhcp`` event as its "peer": None, as
        # for a request from no address (BootRequest). Discovery's budget reads both as a
        # broadcast on the interface (discovery.source_of).
        peer = None
    # BootRequest's fields in order: mac, arch, firmware, arch_code, uuid, serial,
    # manufacturer, product, asset, hostname, platform, remote_addr, relay, interface, via
    # (tests/test_pxe.py holds it to BootRequest(...) by name).
    request = boot_request_of_values((
        mac, shape.arch, shape.firmware, shape.arch_code,
        _uuid(option(_CLIENT_UUID), shape.firmware), None, None, None, None,
        _text(hostname) or None, shape.platform, peer,
        giaddr if giaddr != ZERO_IP else None, interface, "dhcp"))
    # Client's fields in order: request, message_type, then the shape's (_Shape.tail).
    return _new_tuple(Client, (request, packet.message_type, *shape.tail))


def classify(packet: Inbound, settings: DhcpSettings | None = None,
             peer: str | None = None, interface: str | None = None) -> Client:
    """Classify a client request. Never raises on odd option contents: firmware varies, and
    an unknown value is "unknown", not an error (quirk 15: U-Boot may send arch 0xFFFF)."""
    option = _options(packet)
    vendor_raw = option(_VENDOR_CLASS)
    shape = _shape(
        settings or DhcpSettings(), vendor_raw, option(_CLIENT_ARCH), option(_USER_CLASS),
        option(_ETHERBOOT), option(_PARAMETER_REQUEST_LIST), _is_rpi(packet, vendor_raw, option),
    )
    return _client(shape, packet, peer, interface, option)


class Classifier:
    """:func:`classify` with the shapes remembered: a storm is thousands of devices of a few
    firmware kinds, and working out the kind from options 60, 77, 93, 175 and 55 was a third
    of a proxy offer's cost. One per server (``settings`` decide what is PXE); bounded:
    forgets everything when ``limit`` shapes are held."""

    def __init__(self, settings: DhcpSettings, *, limit: int = 1024) -> None:
        self._settings = settings
        self._limit = limit
        self._shapes: dict[tuple[bytes | bool | None, ...], _Shape] = {}

    def classify(self, packet: Inbound, peer: str | None = None,
                 interface: str | None = None) -> Client:
        option = _options(packet)
        vendor_raw = option(_VENDOR_CLASS)
        arch_raw = option(_CLIENT_ARCH)
        user_class = option(_USER_CLASS)
        etherboot = option(_ETHERBOOT)
        requested = option(_PARAMETER_REQUEST_LIST)
        rpi = _is_rpi(packet, vendor_raw, option)
        key = (vendor_raw, arch_raw, user_class, etherboot, requested, rpi)
        shape = self._shapes.get(key)
        if shape is None:
            shape = _shape(self._settings, vendor_raw, arch_raw, user_class, etherboot,
                           requested, rpi)
            if len(self._shapes) >= self._limit:
                self._shapes.clear()
            self._shapes[key] = shape
        return _client(shape, packet, peer, interface, option)


# ---------------------------------------------------------------------------------------------
# building answers

# PXE discovery control = 8: "use the boot file if present, skip discovery", then END
# (protocols.md §1.3, appendix A; pixiecore/smee send {6: [8]}).
PXE_OPTION43 = bytes((6, 1, 8, 255))
# dnsmasq's `pxe-service=0,"Raspberry Pi Boot"` encoding, byte for byte the Pi 3 capture in
# the Pi docs (protocols.md §5, appendix A): 6=3, 10 = prompt "PXE", 9 = menu item type 0
# "Raspberry Pi Boot" (the match string the Pi bootloader looks for), END.
RPI_OPTION43 = (
    bytes((6, 1, 3))
    + bytes((10, 4, 0)) + b"PXE"
    + bytes((9, 20, 0, 0, 17)) + b"Raspberry Pi Boot"
    + bytes((255,))
)
MAX_FILE = 127  # the 128-byte file field, NUL-terminated (quirk 5)


class Unanswerable(Exception):
    """The FirstStage cannot be expressed to this client; the reason says why. Stay silent."""


def boot_file(stage: FirstStage, client: Client, server_ip: str, http_port: int) -> str:
    """The string that goes in ``file`` (and option 67) for this client.

    Raises Unanswerable when it does not fit or the firmware cannot fetch it.
    """
    http_url = f"http://{server_ip}:{http_port}/{stage.path.lstrip('/')}"
    if client.firmware == Firmware.UEFI_HTTP:
        # HttpBootDxe needs an absolute URI, and a proxy offer is only usable with an IP
        # literal host (HttpOfferTypeProxyIpUri; protocols.md §4). A bare path is taken as a
        # path on netboot's HTTP server.
        name = http_url
    elif client.ipxe:
        if stage.http and client.ipxe_http:
            name = http_url
        else:
            # iPXE without the HTTP feature (175 lacks 0x13), or a TFTP first stage: a full
            # tftp:// URL, as smee does, since with 43 6=8 iPXE will not go looking for a
            # boot server (protocols.md §2.3).
            name = f"tftp://{server_ip}/{stage.path.lstrip('/')}"
    elif stage.http:
        raise Unanswerable(f"{client.firmware} firmware cannot fetch {stage.path!r} over HTTP")
    else:
        name = stage.path
    if len(name.encode()) > MAX_FILE:
        raise Unanswerable(f"boot file {name!r} is longer than {MAX_FILE} bytes")
    return name


def _option43(client: Client, settings: DhcpSettings) -> bytes | None:
    if client.firmware == Firmware.RPI:
        return RPI_OPTION43
    if client.firmware == Firmware.UEFI_HTTP or client.http_client:
        return None  # HttpBootDxe: 43 and :4011 play no part (protocols.md §4)
    if client.ipxe:
        return PXE_OPTION43
    code = client.request.arch_code
    if code is not None and code >= 6 and not settings.uefi_option43:
        # UEFI PXE "BINL" flow: no 43 so EDK2 re-requests at siaddr:4011 (quirk 1;
        # pixiecore dhcp.go, dnsmasq "Redirect EFI clients to port 4011").
        return None
    return PXE_OPTION43


def proxy_reply(
    request: Inbound,
    client: Client,
    stage: FirstStage,
    *,
    server_ip: str,
    settings: DhcpSettings,
    pxe_port: bool,
) -> Packet:
    """A proxyDHCP OFFER (to a :67 DISCOVER) or ACK (to a :4011 REQUEST/INFORM).

    yiaddr stays 0 (EDK2 classifies proxy offers by it), siaddr/54/sname name us, 60 says
    PXEClient or HTTPClient, 97 is echoed, 66/67 only when asked for in 55, and nothing that
    configures the network (protocols.md §1.3). Raises Unanswerable when the stage cannot be
    expressed to the client.
    """
    name = boot_file(stage, client, server_ip, settings.http_port)
    msg = MessageType.OFFER if client.message_type == MessageType.DISCOVER else MessageType.ACK
    vendor = b"HTTPClient" if client.http_client else b"PXEClient"
    options = [
        Option(Opt.MESSAGE_TYPE, bytes((msg,))),
        Option(Opt.SERVER_ID, ip_option(server_ip)),
        Option(Opt.VENDOR_CLASS, vendor),
    ]
    uuid_raw = request.option(Opt.CLIENT_UUID)
    if uuid_raw is not None:
        options.append(Option(Opt.CLIENT_UUID, uuid_raw))
    opt43 = _option43(client, settings)
    if opt43 is not None:
        options.append(Option(Opt.VENDOR_SPECIFIC, opt43))
    options.extend(_boot_name_options(client, name, server_ip, always_67=False))
    options.extend(_agent_information(request))
    # dnsmasq forces the broadcast flag on a DISCOVER answer (the client has no address);
    # on :4011 the request came from an address and the answer goes back to it.
    flags = request.flags | BROADCAST_FLAG if not pxe_port else request.flags
    return Packet(
        op=Op.REPLY, htype=request.htype, hlen=request.hlen, hops=0, xid=request.xid,
        secs=0, flags=flags,
        ciaddr=request.ciaddr if pxe_port else ZERO_IP,
        yiaddr=ZERO_IP, siaddr=server_ip, giaddr=request.giaddr, chaddr=request.chaddr,
        sname=server_ip.encode(), file=name.encode() + b"\0", options=tuple(options),
    )


@dataclass(frozen=True, slots=True)
class _Template:
    """An encoded proxy reply cut around its per-device fields (RFC 2131 §2 offsets): a
    reply is the pieces joined with the request's fields between them, one copy, where a
    bytearray copy, six slice writes and a bytes() copy back were ~9,400 more instructions
    of a DISCOVER decided in full (~132,800 with them; callgrind, benchmarks/README.md
    s45-dhcp)."""

    reply: Packet  # the reply to the first request of its shape: its kind and file are
    #                every such reply's
    head: bytes  # 0-4: op, htype, hlen, hops
    secs: bytes  # 8-10
    ciaddr: bytes  # 12-16 as first sent (a :4011 reply puts the request's in)
    middle: bytes  # 16-24: yiaddr, siaddr
    options: bytes  # 44 up to option 97's value (or the end)
    rest: bytes  # after option 97's value (b"" when not echoed)
    uuid_size: int  # option 97's value's length (0: not echoed)


class ProxyReplies:
    """Encoded proxy replies (:func:`proxy_reply`, then ``encode``), kept by everything that
    decides their bytes but the per-device fields, which are patched in: xid, flags, ciaddr,
    giaddr, chaddr and option 97's value, at their fixed offsets (RFC 2131 §2). A storm asks
    a few shapes (one loader per firmware and arch) thousands of times; building and encoding
    the packet was a fifth of a proxy offer. One per server: ``settings`` are part of the
    shape. Bounded: forgets everything when ``limit`` shapes are held."""

    def __init__(self, settings: DhcpSettings, *, limit: int = 1024) -> None:
        self._settings = settings
        self._limit = limit
        self._held: dict[tuple[object, ...], _Template] = {}

    def encode(self, request: Inbound, client: Client, stage: FirstStage, *, server_ip: str,
               pxe_port: bool) -> tuple[bytes, Packet]:
        """The reply's bytes (padded to MIN_PACKET_SIZE) and a Packet that tells its message
        type and file (its other fields may be another device's). Raises Unanswerable."""
        giaddr = request.giaddr
        if giaddr != ZERO_IP and request.option(_RELAY_AGENT_INFO) is not None:
            # Echoed per request (RFC 3046 §2.2): relayed ones only, never a template.
            reply = proxy_reply(request, client, stage, server_ip=server_ip,
                                settings=self._settings, pxe_port=pxe_port)
            return encode(reply, pad_to=MIN_PACKET_SIZE), reply
        uuid = request.option(_CLIENT_UUID)
        requested = client.requested
        boot = client.request
        # The stage by what of it a reply holds (boot_file: its path and http), not the
        # whole FirstStage: its dataclass __hash__, a Python call per datagram (~1,200
        # instructions), went, and stages differing only in reason or chain share a shape.
        key = (stage.path, stage.http, server_ip, pxe_port, client.message_type is _DISCOVER,
               boot.firmware, client.ipxe, client.ipxe_http, client.http_client,
               boot.arch_code, _TFTP_SERVER_NAME in requested, _BOOTFILE_NAME in requested,
               request.htype, request.hlen, None if uuid is None else len(uuid))
        held = self._held.get(key)
        if held is None:
            reply = proxy_reply(request, client, stage, server_ip=server_ip,
                                settings=self._settings, pxe_port=pxe_port)
            data = encode(reply, pad_to=MIN_PACKET_SIZE)
            template = _template(data, reply, len(request.chaddr))
            if template is not None:
                if len(self._held) >= self._limit:
                    self._held.clear()
                self._held[key] = template
            return data, reply
        flags = request.flags if pxe_port else request.flags | BROADCAST_FLAG
        # The uuid's length is part of the key: it fits the template's place for it.
        return b"".join((
            held.head, request.xid.to_bytes(4, "big"), held.secs, flags.to_bytes(2, "big"),
            ip_option(request.ciaddr) if pxe_port else held.ciaddr, held.middle,
            # (0.0.0.0, a request not relayed, without ip_option's two calls: s38-dhcp1st.)
            _NO_ADDRESS if giaddr == ZERO_IP else ip_option(giaddr), request.chaddr,
            held.options, uuid or b"", held.rest)), held.reply


def _template(data: bytes, reply: Packet, chaddr_size: int) -> _Template | None:
    """Where the per-device parts of an encoded proxy reply sit; None when it cannot be
    patched (a long option split in two by RFC 3396, a chaddr not 16 bytes)."""
    if chaddr_size != 16:
        return None
    at = OPTIONS_OFFSET
    uuid_at = uuid_size = 0
    for option in reply.options:
        if option.code == Opt.PAD:
            at += 1
            continue
        if len(option.data) > 255:
            return None
        if option.code == Opt.CLIENT_UUID:
            uuid_at = at + 2
            uuid_size = len(option.data)
        at += 2 + len(option.data)
    if not uuid_at:
        uuid_at, uuid_size = len(data), 0
    return _Template(reply, data[:4], data[8:10], data[12:16], data[16:24], data[44:uuid_at],
                     data[uuid_at + uuid_size:], uuid_size)


def _agent_information(request: Inbound) -> list[Option]:
    """RFC 3046 §2.2: a relayed request's Relay Agent Information (82), echoed verbatim as
    the reply's last option: the relay (a switch snooping DHCP) may drop a reply without it
    and reads from it which port the client is on. Relayed requests only (giaddr set): the
    reply goes to the relay, which strips it; from anyone else it is not asked for."""
    if request.giaddr == ZERO_IP:
        return []
    info = request.option(_RELAY_AGENT_INFO)
    return [] if info is None else [Option(Opt.RELAY_AGENT_INFO, info)]


def _boot_name_options(
    client: Client, name: str, server_ip: str, *, always_67: bool
) -> list[Option]:
    out = []
    # 66/67 NUL-terminated: "Some PXE ROMs have bugs ... need zero-terminated names" (dnsmasq),
    # and EDK2 forces a NUL on 67 anyway (quirk 5, protocols.md §1.4).
    if Opt.TFTP_SERVER_NAME in client.requested:
        out.append(Option(Opt.TFTP_SERVER_NAME, server_ip.encode() + b"\0"))
    if name and (always_67 or Opt.BOOTFILE_NAME in client.requested):
        out.append(Option(Opt.BOOTFILE_NAME, name.encode() + b"\0"))
    return out


def proxy_should_answer(client: Client, *, pxe_port: bool, settings: DhcpSettings) -> bool:
    """Which requests a proxy answers (protocols.md §1.2): DISCOVER on :67 from PXE clients;
    REQUEST/INFORM (and DISCOVER, like dnsmasq) on :4011; REQUEST on :67 only if asked to."""
    if not client.pxe:
        return False
    mt = client.message_type
    if pxe_port:
        return mt in (MessageType.REQUEST, MessageType.INFORM, MessageType.DISCOVER)
    if mt == _DISCOVER:  # (a module constant: an enum member read costs ~870 instructions)
        return True
    return mt == _REQUEST and settings.ack_on_67


@dataclass(frozen=True, slots=True)
class AddressGrant:
    """What the lease logic granted, for :func:`authoritative_reply`."""

    message_type: MessageType  # OFFER, ACK or NAK
    yiaddr: str = ZERO_IP
    lease_seconds: int | None = None  # None for INFORM/NAK (RFC 2131 §4.3.5: no lease time)
    message: str | None = None  # option 56 text, for NAKs


def authoritative_reply(
    request: Inbound,
    client: Client,
    grant: AddressGrant,
    stage: FirstStage | None,
    *,
    server_ip: str,
    settings: DhcpSettings,
) -> Packet:
    """An authoritative OFFER/ACK/NAK (RFC 2131 §4.3, table 3).

    Boot clients get siaddr (next-server) and the boot file in both ``file`` and option 67 in
    the same answer: U-Boot reads ``file`` then lets 67 override it, EDK2 prefers 67, iPXE
    prefers ``file`` (protocols.md §1.4), and U-Boot never asks for 67 in its 55.
    """
    msg = grant.message_type
    options = [
        Option(Opt.MESSAGE_TYPE, bytes((msg,))),
        Option(Opt.SERVER_ID, ip_option(server_ip)),
    ]
    if msg == MessageType.NAK:
        # RFC 2131 table 3: a NAK carries only 53, 54, 56 (and client id); yiaddr 0.
        if grant.message:
            options.append(Option(Opt.MESSAGE, grant.message.encode()))
        options.extend(_agent_information(request))
        return Packet(
            op=Op.REPLY, htype=request.htype, hlen=request.hlen, xid=request.xid,
            flags=request.flags, giaddr=request.giaddr, chaddr=request.chaddr,
            options=tuple(options),
        )
    if grant.lease_seconds is not None:
        t = grant.lease_seconds
        options += [
            Option(Opt.LEASE_TIME, t.to_bytes(4, "big")),
            # RFC 2131 §4.4.5 defaults: T1 = 0.5, T2 = 0.875 of the lease.
            Option(Opt.RENEWAL_TIME, (t // 2).to_bytes(4, "big")),
            Option(Opt.REBINDING_TIME, (t * 7 // 8).to_bytes(4, "big")),
        ]
    options.append(Option(Opt.SUBNET_MASK, ip_option(settings.netmask)))
    if settings.router:
        options.append(Option(Opt.ROUTER, ip_option(settings.router)))
    if settings.dns_servers:
        options.append(Option(Opt.DNS_SERVERS, ip_option(*settings.dns_servers)))
    if settings.domain:
        options.append(Option(Opt.DOMAIN_NAME, settings.domain.encode()))
    name = ""
    siaddr = ZERO_IP
    if stage is not None:
        name = boot_file(stage, client, server_ip, settings.http_port)
        siaddr = server_ip
        if client.http_client:
            # HttpBootDxe only accepts an offer whose 60 says HTTPClient (protocols.md §4).
            options.append(Option(Opt.VENDOR_CLASS, b"HTTPClient"))
        elif client.firmware == Firmware.RPI:
            options.append(Option(Opt.VENDOR_CLASS, b"PXEClient"))
            options.append(Option(Opt.VENDOR_SPECIFIC, RPI_OPTION43))
        uuid_raw = request.option(Opt.CLIENT_UUID)
        if uuid_raw is not None and client.pxe:
            options.append(Option(Opt.CLIENT_UUID, uuid_raw))
        options.extend(_boot_name_options(client, name, server_ip, always_67=True))
    options.extend(_agent_information(request))
    flags = request.flags
    return Packet(
        op=Op.REPLY, htype=request.htype, hlen=request.hlen, hops=0, xid=request.xid,
        flags=flags, ciaddr=request.ciaddr if msg == MessageType.ACK else ZERO_IP,
        yiaddr=grant.yiaddr, siaddr=siaddr, giaddr=request.giaddr, chaddr=request.chaddr,
        sname=server_ip.encode() if stage is not None else b"",
        file=name.encode() + b"\0" if name else b"", options=tuple(options),
    )


def reply_destination(
    request: Inbound,
    reply: Packet,
    peer: tuple[str, int],
    *,
    pxe_port: bool,
    broadcast: str = "255.255.255.255",
    client_port: int = 68,
    relay_port: int = 67,
) -> tuple[str, int]:
    """Where a reply goes (RFC 2131 §4.1; protocols.md §1.2, §1.5).

    :4011 answers go back to the requester's address and port (EDK2 sends from 4011). Relayed
    requests are answered to giaddr:67. A NAK, or a client without an address, gets a
    broadcast: unicast to yiaddr would need the ARP-cache injection dnsmasq does. A client that
    has an address (ciaddr, e.g. renewing or INFORM) gets unicast. An OFFER answers a
    DISCOVER, whose ciaddr is 0 (RFC 2131 table 5): broadcast whatever it says, or any host
    aimed OFFERs at any address by writing it there (s36-udp).
    """
    if pxe_port:
        return peer
    if request.giaddr != ZERO_IP:
        return (request.giaddr, relay_port)
    if reply.message_type in _BROADCAST_REPLIES:
        return (broadcast, client_port)
    if request.ciaddr != ZERO_IP:
        return (request.ciaddr, client_port)
    return (broadcast, client_port)

