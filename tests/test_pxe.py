"""Classification of every captured client packet, and netboot's proxy answer to each."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netboot import pxe
from netboot.boot import BootService, BootSettings, loader_aliases
from netboot.enroll import Enroller
from netboot.errors import ConfigError, DecodeError
from netboot.files import FileTree
from netboot.inventory.memory import MemoryStore
from netboot.model import Arch, Firmware, FirstStage, LoaderChain
from netboot.pxe import Client, DhcpSettings, Unanswerable
from netboot.wire import dhcp
from netboot.wire.dhcp import MessageType, Op, Opt
from tests.dhcp_fakes import TableDecider
from tests.pcap import all_captures, capture, dhcp_datagrams
from tests.wire.test_dhcp import mutated

SERVER = "192.0.2.10"
SETTINGS = DhcpSettings()
# Options that configure the network: a proxy must never send them (protocols.md §1.3).
NETWORK_OPTIONS = {1, 3, 6, 12, 15, 28, 51, 58, 59}


def frame(name: str, number: int) -> dhcp.Packet:
    for d in dhcp_datagrams(capture(name)):
        if d.frame == number:
            return dhcp.parse(d.payload)
    raise LookupError(f"{name} frame {number}")


def with_option(p: dhcp.Packet, code: int, data: bytes | None) -> dhcp.Packet:
    """Replace (or remove, data None) option ``code``, keeping the others in order."""
    out = []
    done = False
    for o in p.options:
        if o.code == code:
            if data is not None and not done:
                out.append(dhcp.Option(code, data))
            done = True
        else:
            out.append(o)
    if not done and data is not None:
        out.append(dhcp.Option(code, data))
    return p.with_options(out)


# -- classification of the captured clients ---------------------------------------------------

# (capture, frame, message type, arch, arch code, firmware, pxe client)
CLIENTS = [
    ("bios-ipxe", 14, MessageType.DISCOVER, Arch.X86, 0, Firmware.IPXE, True),
    ("bios-ipxe", 17, MessageType.REQUEST, Arch.X86, 0, Firmware.IPXE, True),
    ("bios-ipxe", 26, MessageType.REQUEST, Arch.X86, 0, Firmware.IPXE, True),
    ("bios-undionly-chain", 24, MessageType.DISCOVER, Arch.X86, 0, Firmware.IPXE, True),
    ("uefi-ipxerom", 7, MessageType.DISCOVER, Arch.X86_64, 7, Firmware.IPXE, True),
    ("uefi-edk2pxe", 8, MessageType.DISCOVER, Arch.X86_64, 7, Firmware.UEFI, True),
    ("uefi-edk2pxe", 19, MessageType.REQUEST, Arch.X86_64, 7, Firmware.UEFI, True),
    ("uefi-edk2pxe", 29, MessageType.DISCOVER, Arch.X86_64, 7, Firmware.IPXE, True),
    ("uefi-httpboot", 7, MessageType.DISCOVER, Arch.X86_64, 16, Firmware.UEFI_HTTP, True),
    ("uefi-httpboot-viaproxy", 6, MessageType.DISCOVER, Arch.X86_64, 16, Firmware.UEFI_HTTP,
     True),
    ("uboot-arm64", 6, MessageType.DISCOVER, Arch.ARM64, 22, Firmware.UBOOT, True),
    ("uboot-arm64", 12, MessageType.REQUEST, Arch.ARM64, 22, Firmware.UBOOT, True),
    ("uboot-arm64-proxyonly-FAIL", 69, MessageType.DISCOVER, Arch.ARM64, 11, Firmware.UEFI,
     True),
    ("uboot-arm64", 48, MessageType.DISCOVER, Arch.UNKNOWN, None, Firmware.UNKNOWN, False),
    ("bios-ipxe", 70, MessageType.DISCOVER, Arch.UNKNOWN, None, Firmware.UNKNOWN, False),
]


@pytest.mark.parametrize(
    ("name", "number", "mtype", "arch", "code", "firmware", "is_pxe"), CLIENTS,
    ids=[f"{c[0]}-{c[1]}" for c in CLIENTS],
)
def test_classify_captured_clients(
    name: str, number: int, mtype: MessageType, arch: Arch, code: int | None,
    firmware: Firmware, is_pxe: bool,
) -> None:
    packet = frame(name, number)
    client = pxe.classify(packet, SETTINGS, "0.0.0.0")
    req = client.request
    assert client.message_type == mtype
    assert (req.arch, req.arch_code, req.firmware, client.pxe) == (arch, code, firmware, is_pxe)
    assert req.via == "dhcp" and req.relay is None
    assert req.uuid is None  # QEMU without -uuid sends an all-zero 97; U-Boot sends none
    assert str(req.mac) in ("52:54:00:00:00:11", "52:54:00:00:00:21", "52:52:52:52:52:52")


def test_ipxe_rom_platform_and_http_feature() -> None:
    bios = pxe.classify(frame("bios-ipxe", 14))
    efi = pxe.classify(frame("uefi-ipxerom", 7))
    assert bios.ipxe and bios.ipxe_http and bios.request.platform == "pcbios"
    assert efi.ipxe and efi.ipxe_http and efi.request.platform == "efi"


UUID = uuid.UUID("4c4c4544-0039-3910-8031-b2c04f4d3732")


def test_uuid_byte_order_efi_and_ipxe_little_endian() -> None:
    for name, number in (("uefi-edk2pxe", 8), ("bios-ipxe", 14), ("uefi-httpboot", 7)):
        p = with_option(frame(name, number), Opt.CLIENT_UUID, b"\x00" + UUID.bytes_le)
        assert pxe.classify(p).request.uuid == str(UUID), name


def test_uuid_byte_order_uboot_big_endian() -> None:
    p = with_option(frame("uboot-arm64", 6), Opt.CLIENT_UUID, b"\x00" + UUID.bytes)
    assert pxe.classify(p).request.uuid == str(UUID)


@pytest.mark.parametrize("raw", [b"\x00" + b"\xff" * 16, b"\x01" + UUID.bytes, UUID.bytes])
def test_uuid_ignored_when_malformed_or_placeholder(raw: bytes) -> None:
    p = with_option(frame("uefi-edk2pxe", 8), Opt.CLIENT_UUID, raw)
    assert pxe.classify(p).request.uuid is None


ARCHES = [
    (0, Arch.X86, Firmware.BIOS), (6, Arch.X86, Firmware.UEFI), (7, Arch.X86_64, Firmware.UEFI),
    (9, Arch.X86_64, Firmware.UEFI), (10, Arch.ARM32, Firmware.UEFI),
    (11, Arch.ARM64, Firmware.UEFI), (15, Arch.X86, Firmware.UEFI_HTTP),
    (16, Arch.X86_64, Firmware.UEFI_HTTP), (18, Arch.ARM32, Firmware.UEFI_HTTP),
    (19, Arch.ARM64, Firmware.UEFI_HTTP), (20, Arch.X86, Firmware.UEFI_HTTP),
    (21, Arch.ARM32, Firmware.UBOOT), (22, Arch.ARM64, Firmware.UBOOT),
    (41, Arch.ARM64, Firmware.UNKNOWN), (0xFFFF, Arch.UNKNOWN, Firmware.UNKNOWN),
]


@pytest.mark.parametrize(("code", "arch", "firmware"), ARCHES)
def test_arch_codes(code: int, arch: Arch, firmware: Firmware) -> None:
    p = with_option(frame("uefi-edk2pxe", 8), Opt.CLIENT_ARCH, code.to_bytes(2, "big"))
    p = with_option(p, Opt.VENDOR_CLASS, b"PXEClient")
    client = pxe.classify(p)
    assert (client.request.arch, client.request.arch_code, client.firmware) == (
        arch, code, firmware)


def test_odd_arch_option_is_unknown_not_an_error() -> None:
    p = with_option(frame("uefi-edk2pxe", 8), Opt.CLIENT_ARCH, b"\x07")
    client = pxe.classify(p)
    assert client.request.arch_code is None and not client.pxe


# -- a synthetic Raspberry Pi DISCOVER (boot-net.adoc; no Pi capture exists in the lab) --------

PI_MAC = bytes.fromhex("dca6320136c2")
PI_97 = b"\x00" + b"RPi4" + bytes.fromhex("00c03111") + PI_MAC[2:] + bytes.fromhex("9ffefdef")


def pi_discover(mac: bytes = PI_MAC, uuid_raw: bytes | None = PI_97) -> dhcp.Packet:
    opts = [
        dhcp.Option(Opt.MESSAGE_TYPE, b"\x01"),
        dhcp.Option(Opt.PARAMETER_REQUEST_LIST, bytes([1, 3, 43, 60, 66, 67, *range(128, 136)])),
        dhcp.Option(Opt.VENDOR_CLASS, b"PXEClient:Arch:00000:UNDI:002001"),
        dhcp.Option(Opt.CLIENT_ARCH, b"\x00\x00"),
        dhcp.Option(Opt.CLIENT_NDI, b"\x01\x02\x01"),
    ]
    if uuid_raw is not None:
        opts.append(dhcp.Option(Opt.CLIENT_UUID, uuid_raw))
    return dhcp.Packet(op=Op.REQUEST, xid=0x26F30339, chaddr=mac, options=tuple(opts))


def test_raspberry_pi_by_oui_and_by_fourcc() -> None:
    by_oui = pxe.classify(pi_discover(uuid_raw=None))
    by_97 = pxe.classify(pi_discover(mac=bytes.fromhex("020000000001")))
    plain = pxe.classify(pi_discover(mac=bytes.fromhex("020000000001"), uuid_raw=None))
    assert by_oui.firmware == by_97.firmware == Firmware.RPI
    assert by_oui.request.arch == Arch.ARM64 and by_oui.request.arch_code == 0
    assert by_97.request.uuid is None  # 97 is a FourCC/serial, not a UUID
    assert plain.firmware == Firmware.BIOS


@pytest.mark.parametrize(("uuid_raw", "option_43", "pi"), [
    (b"\x00" + b"5iPR" + bytes(12), None, True),  # the FourCC byte-swapped
    (b"\x00" + b"RPi5" + bytes(12), b"", True),
    (b"\x00" + b"RPi3" + bytes(12), None, False),  # "RPi" but no Pi 4/5 FourCC
    (b"\x00" + b"iPR" + bytes(13), b"\x09\x0cRaspberry P", False),
    (None, b"\x09\x0cRaspberry Pi Boot", True),  # 43 alone (a Pi 3's bootloader)
    (b"\x00" + bytes(16), b"Raspberry Pi", True),
    (b"\x00" + bytes(16), b"raspberry pi", False),
    (None, None, False),
])
def test_raspberry_pi_by_option_97_or_43(uuid_raw: bytes | None, option_43: bytes | None,
                                         pi: bool) -> None:
    """A non-Pi MAC: told by a FourCC in 97 (either byte order) or "Raspberry Pi" in 43,
    each a byte-string search (quirk 7)."""
    packet = pi_discover(mac=bytes.fromhex("020000000001"), uuid_raw=uuid_raw)
    if option_43 is not None:
        packet = dataclasses.replace(packet, options=(
            *packet.options, dhcp.Option(Opt.VENDOR_SPECIFIC, option_43)))
    firmware = pxe.classify(packet).firmware
    assert firmware == (Firmware.RPI if pi else Firmware.BIOS)


# -- proxy answers ------------------------------------------------------------------------------

async def answer(
    packet: dhcp.Packet, *, pxe_port: bool = False, settings: DhcpSettings = SETTINGS,
    peer: tuple[str, int] = ("0.0.0.0", 68),
) -> tuple[dhcp.Packet, bytes, tuple[str, int], Client]:
    client = pxe.classify(packet, settings, peer[0])
    assert pxe.proxy_should_answer(client, pxe_port=pxe_port, settings=settings)
    stage = await TableDecider().first_stage(client.request)
    assert stage is not None
    reply = pxe.proxy_reply(packet, client, stage, server_ip=SERVER, settings=settings,
                            pxe_port=pxe_port)
    raw = dhcp.encode(reply, pad_to=dhcp.MIN_PACKET_SIZE)
    dest = pxe.reply_destination(packet, reply, peer, pxe_port=pxe_port)
    return dhcp.parse(raw), raw, dest, client


def check_rules(request: dhcp.Packet, reply: dhcp.Packet, raw: bytes, client: Client,
                *, pxe_port: bool) -> None:
    """The rules of protocols.md §1.3/§1.4 that hold for every proxy answer."""
    assert len(raw) >= 300
    assert reply.op == Op.REPLY
    assert (reply.xid, reply.chaddr, reply.htype, reply.hlen, reply.giaddr) == (
        request.xid, request.chaddr.ljust(16, b"\0"), request.htype, request.hlen,
        request.giaddr)
    assert raw[16:20] == bytes(4)  # yiaddr 0.0.0.0
    assert reply.siaddr == SERVER
    assert reply.server_name == SERVER
    codes = [o.code for o in reply.options]
    assert codes[:3] == [53, 54, 60]
    expected_type = MessageType.OFFER if request.message_type == MessageType.DISCOVER else (
        MessageType.ACK)
    assert reply.message_type == expected_type
    assert reply.option(Opt.SERVER_ID) == bytes(int(x) for x in SERVER.split("."))
    assert reply.option(Opt.VENDOR_CLASS) == (
        b"HTTPClient" if client.vendor_class.startswith("HTTPClient") else b"PXEClient")
    assert reply.option(Opt.CLIENT_UUID) == request.option(Opt.CLIENT_UUID)
    assert not NETWORK_OPTIONS & set(codes)
    assert 52 not in codes  # never overload (protocols.md §1.1)
    name = reply.file_name or ""
    assert len(name) <= 127 and raw[108 + len(name)] == 0
    asked = request.requested_options
    assert (Opt.BOOTFILE_NAME in codes) == (Opt.BOOTFILE_NAME in asked and bool(name))
    if Opt.BOOTFILE_NAME in codes:
        assert reply.option(Opt.BOOTFILE_NAME) == name.encode() + b"\0"
    assert (Opt.TFTP_SERVER_NAME in codes) == (Opt.TFTP_SERVER_NAME in asked)
    if Opt.TFTP_SERVER_NAME in codes:
        assert reply.option(Opt.TFTP_SERVER_NAME) == SERVER.encode() + b"\0"
    if not pxe_port:
        assert reply.broadcast and reply.ciaddr == "0.0.0.0"
    else:
        assert reply.ciaddr == request.ciaddr


PXE43 = bytes((6, 1, 8, 255))
# (capture, frame, port 4011?, expected file, expected option 43)
ANSWERS = [
    ("bios-ipxe", 14, False, "http://192.0.2.10:8080/boot.ipxe", PXE43),
    ("bios-ipxe", 26, True, "http://192.0.2.10:8080/boot.ipxe", PXE43),
    ("bios-undionly-chain", 24, False, "http://192.0.2.10:8080/boot.ipxe", PXE43),
    ("uefi-ipxerom", 7, False, "http://192.0.2.10:8080/boot.ipxe", PXE43),
    ("uefi-ipxerom", 17, True, "http://192.0.2.10:8080/boot.ipxe", PXE43),
    ("uefi-edk2pxe", 8, False, "snponly.efi", None),
    ("uefi-edk2pxe", 19, True, "snponly.efi", None),
    ("uefi-httpboot", 7, False, "http://192.0.2.10:8080/assets/ipxe.efi", None),
    ("uboot-arm64", 6, False, "boot.scr.uimg", None),
    ("uboot-arm64-proxyonly-FAIL", 69, False, "snponly-arm64.efi", None),
]


@pytest.mark.parametrize(("name", "number", "on_4011", "file", "opt43"), ANSWERS,
                         ids=[f"{a[0]}-{a[1]}" for a in ANSWERS])
async def test_proxy_answer_to_captured_client(
    name: str, number: int, on_4011: bool, file: str, opt43: bytes | None
) -> None:
    request = frame(name, number)
    peer = (request.ciaddr, 4011 if name == "uefi-edk2pxe" else 68) if on_4011 else (
        "0.0.0.0", 68)
    reply, raw, dest, client = await answer(request, pxe_port=on_4011, peer=peer)
    check_rules(request, reply, raw, client, pxe_port=on_4011)
    assert reply.file_name == file
    assert reply.option(Opt.VENDOR_SPECIFIC) == opt43
    if on_4011:
        assert dest == peer  # unicast back to the requester (EDK2 sends from port 4011)
    else:
        assert dest == ("255.255.255.255", 68)


async def test_bios_ipxe_offer_bytes_match_appendix_a() -> None:
    """Byte-for-byte: the options of the OFFER for the BIOS iPXE ROM (protocols.md app. A)."""
    request = frame("bios-ipxe", 14)
    _, raw, _, _ = await answer(request)
    url = b"http://192.0.2.10:8080/boot.ipxe"
    expected = (
        b"\x35\x01\x02"
        + b"\x36\x04" + bytes((192, 0, 2, 10))
        + b"\x3c\x09PXEClient"
        + b"\x61\x11" + request.option(Opt.CLIENT_UUID)  # type: ignore[operator]
        + b"\x2b\x04\x06\x01\x08\xff"
        + b"\x42\x0b192.0.2.10\x00"
        + b"\x43" + bytes((len(url) + 1,)) + url + b"\x00"
        + b"\xff"
    )
    assert raw[236:240] == dhcp.MAGIC_COOKIE
    assert raw[240 : 240 + len(expected)] == expected
    assert raw[240 + len(expected) :] == bytes(len(raw) - 240 - len(expected))
    assert raw[0:4] == bytes((2, 1, 6, 0))
    assert raw[10:12] == b"\x80\x00"  # broadcast flag
    assert raw[20:24] == bytes((192, 0, 2, 10))  # siaddr
    assert raw[44:54] == b"192.0.2.10" and raw[54] == 0
    assert raw[108 : 108 + len(url) + 1] == url + b"\0"


async def test_uefi_single_offer_style_flag() -> None:
    settings = DhcpSettings(uefi_option43=True)
    reply, *_ = await answer(frame("uefi-edk2pxe", 8), settings=settings)
    assert reply.option(Opt.VENDOR_SPECIFIC) == PXE43


async def test_uefi_http_offer_out_of_the_box() -> None:
    request = frame("uefi-httpboot-proxyonly-FAIL", 4)
    reply, raw, _dest, client = await answer(request)
    check_rules(request, reply, raw, client, pxe_port=False)
    assert reply.option(Opt.VENDOR_CLASS) == b"HTTPClient"
    url = "http://192.0.2.10:8080/assets/ipxe.efi"
    assert reply.file_name == url
    assert reply.option(Opt.BOOTFILE_NAME) == url.encode() + b"\0"  # EDK2 HTTP asks for 67
    assert reply.option(Opt.VENDOR_SPECIFIC) is None


async def test_raspberry_pi_offer_has_dnsmasq_option43() -> None:
    request = pi_discover()
    reply, raw, _, client = await answer(request)
    check_rules(request, reply, raw, client, pxe_port=False)
    appendix_a = bytes.fromhex(
        "2b20060103" "0a0400505845" "09140000115261737062657272792050692042" "6f6f74ff"
    )
    assert appendix_a[2:] == pxe.RPI_OPTION43
    assert reply.option(Opt.VENDOR_SPECIFIC) == appendix_a[2:]
    assert raw.find(appendix_a) > 240
    assert reply.option(Opt.TFTP_SERVER_NAME) == b"192.0.2.10\0"
    assert reply.option(Opt.CLIENT_UUID) == PI_97
    assert reply.file_name is None and not reply.has_option(Opt.BOOTFILE_NAME)


async def test_relayed_discover_goes_to_giaddr() -> None:
    request = dhcp.Packet(**{**_fields(frame("uefi-edk2pxe", 8)), "giaddr": "198.51.100.1",
                             "hops": 1})
    reply, raw, dest, client = await answer(request)
    check_rules(request, reply, raw, client, pxe_port=False)
    assert dest == ("198.51.100.1", 67)
    assert reply.giaddr == "198.51.100.1" and client.request.relay == "198.51.100.1"
    assert reply.hops == 0


def _fields(p: dhcp.Packet) -> dict[str, object]:
    # What the constructor takes: the option index is derived, not a field one passes.
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.init}


async def test_ipxe_without_http_feature_gets_tftp_url() -> None:
    request = frame("bios-ipxe", 14)
    ether = request.option(Opt.ETHERBOOT)
    assert ether is not None
    # Rebuild 175 without the HTTP (0x13) sub-option.
    subs, i = [], 0
    while i < len(ether):
        code, length = ether[i], ether[i + 1]
        if code != 0x13:
            subs.append(ether[i : i + 2 + length])
        i += 2 + length
    request = with_option(request, Opt.ETHERBOOT, b"".join(subs))
    reply, *_ = await answer(request)
    assert reply.file_name == "tftp://192.0.2.10/boot.ipxe"


async def test_ipxe_by_user_class_alone_gets_http() -> None:
    request = with_option(frame("bios-ipxe", 14), Opt.ETHERBOOT, None)
    reply, *_ = await answer(request)
    assert reply.file_name == "http://192.0.2.10:8080/boot.ipxe"


def test_who_is_answered() -> None:
    s = SETTINGS
    disc = pxe.classify(frame("uefi-edk2pxe", 8))
    req67 = pxe.classify(frame("uefi-edk2pxe", 15))
    req4011 = pxe.classify(frame("uefi-edk2pxe", 19))
    udhcpc = pxe.classify(frame("uefi-edk2pxe", 74))
    assert pxe.proxy_should_answer(disc, pxe_port=False, settings=s)
    assert not pxe.proxy_should_answer(req67, pxe_port=False, settings=s)
    assert pxe.proxy_should_answer(req67, pxe_port=False, settings=DhcpSettings(ack_on_67=True))
    assert pxe.proxy_should_answer(req4011, pxe_port=True, settings=s)
    assert not pxe.proxy_should_answer(udhcpc, pxe_port=False, settings=s)
    hw = with_option(frame("uefi-edk2pxe", 8), Opt.VENDOR_CLASS, b"HW-Client:Arch:00007")
    assert not pxe.proxy_should_answer(pxe.classify(hw), pxe_port=False, settings=s)
    quirk4 = DhcpSettings(pxe_vendor_classes=("PXEClient", "HTTPClient", "HW-Client"))
    assert pxe.proxy_should_answer(pxe.classify(hw, quirk4), pxe_port=False, settings=quirk4)


def test_unanswerable_stages() -> None:
    bios = pxe.classify(with_option(frame("uefi-edk2pxe", 8), Opt.CLIENT_ARCH, b"\x00\x00"))
    with pytest.raises(Unanswerable):
        pxe.boot_file(FirstStage("/boot.ipxe", http=True), bios, SERVER, 8080)
    with pytest.raises(Unanswerable):
        pxe.boot_file(FirstStage("x" * 128), bios, SERVER, 8080)
    assert pxe.boot_file(FirstStage("x" * 127), bios, SERVER, 8080) == "x" * 127


def test_settings_validation() -> None:
    with pytest.raises(ConfigError) as err:
        DhcpSettings(mode="both")
    assert err.value.key == "dhcp.mode"
    with pytest.raises(ConfigError) as err:
        DhcpSettings(mode="authoritative")
    assert err.value.key == "dhcp.authoritative.pool_start"
    with pytest.raises(ConfigError):
        DhcpSettings(mode="authoritative", pool_start="192.0.2.200", pool_end="192.0.2.100")
    ok = DhcpSettings(mode="authoritative", pool_start="192.0.2.100", pool_end="192.0.2.199")
    assert str(ok.network()) == "192.0.2.0/24"


async def test_arm64_uefi_offer_from_the_real_decision(tmp_path: Path) -> None:
    """Arch 11 (arm64 UEFI): Debian has no arm64 iPXE, so this was silence; with the signed
    arm64 GRUB installed the offer names it, by the same rules as every UEFI PXE answer."""
    request = frame("uboot-arm64-proxyonly-FAIL", 69)
    client = pxe.classify(request, SETTINGS, "0.0.0.0")
    assert client.request.arch_code == 11

    async def decide() -> FirstStage | None:
        store = MemoryStore()
        await store.open()
        boot = BootService(store, FileTree([tmp_path], pinned=loader_aliases()),
                           BootSettings(policy="hold"), Enroller(store))
        stage = await boot.first_stage(client.request)
        await boot.drain()
        return stage

    assert await decide() is None
    (tmp_path / "arm64-efi-signed").mkdir()
    (tmp_path / "arm64-efi-signed" / "grubnetaa64.efi.signed").write_bytes(b"MZ")
    stage = await decide()
    assert stage is not None and stage.chain == LoaderChain.SHIM_GRUB
    reply = pxe.proxy_reply(request, client, stage, server_ip=SERVER, settings=SETTINGS,
                            pxe_port=False)
    raw = dhcp.encode(reply, pad_to=dhcp.MIN_PACKET_SIZE)
    parsed = dhcp.parse(raw)
    check_rules(request, parsed, raw, client, pxe_port=False)
    assert parsed.file_name == "grubaa64.efi"
    assert parsed.option(Opt.VENDOR_SPECIFIC) is None  # UEFI: no option 43 (protocols.md §1.4)


# -- fuzzing: the DHCP decoding path past the codec ----------------------------------------


@settings(max_examples=1000)
@given(st.sampled_from([d.payload for p in all_captures() for d in dhcp_datagrams(p)][:40]),
       st.lists(st.tuples(st.integers(0, 699), st.integers(0, 255)), max_size=8))
def test_fuzz_any_packet_that_decodes_classifies_without_raising(
        seed: bytes, flips: list[tuple[int, int]]) -> None:
    """classify() reads option contents firmware fills as it likes: whatever decodes must
    classify (an odd value is "unknown"), or the server's boundary would log a bug per packet."""
    try:
        packet = dhcp.parse(mutated(seed, flips, len(seed)))
    except DecodeError:
        return
    client = pxe.classify(packet, DhcpSettings(), "0.0.0.0")
    assert isinstance(client, Client)


# -- Classifier: classify with the shapes remembered ---------------------------------------

CLIENT_DATAGRAMS = [d.payload for p in all_captures() for d in dhcp_datagrams(p)
                    if d.payload[0] == Op.REQUEST]


def test_classifier_answers_as_classify_for_every_captured_request() -> None:
    """Over every client datagram of the captures, asked twice (the second from the shape
    cache), read by parse_request as the server does: the same Client as classify() over
    parse(), for either settings."""
    assert len(CLIENT_DATAGRAMS) > 50
    for settings_ in (SETTINGS, DhcpSettings(pxe_vendor_classes=("PXEClient",))):
        classifier = pxe.Classifier(settings_)
        for _ in range(2):
            for data in CLIENT_DATAGRAMS:
                expected = pxe.classify(dhcp.parse(data), settings_, "192.0.2.7", "eth1")
                assert classifier.classify(dhcp.parse_request(data), "192.0.2.7",
                                           "eth1") == expected


def test_classifier_keeps_device_facts_out_of_the_shape() -> None:
    """Two devices of one shape differ in MAC, UUID, hostname and relay; a Pi is told by its
    OUI or 97 FourCC, which are the device's: each gets its own answer from one cache."""
    classifier = pxe.Classifier(SETTINGS, limit=2)
    base = frame("uefi-edk2pxe", 8)
    other = dataclasses.replace(
        with_option(with_option(base, Opt.CLIENT_UUID, b"\0" + bytes(range(1, 17))),
                    Opt.HOSTNAME, b"node7"),
        chaddr=bytes.fromhex("020000000007").ljust(16, b"\0"), giaddr="192.0.2.254")
    pi = pi_discover()
    pi_by_fourcc = pi_discover(mac=bytes.fromhex("020000000008"))
    for packet in (base, other, pi, pi_by_fourcc, base, pi, other):
        data = dhcp.encode(packet)
        assert classifier.classify(dhcp.parse_request(data), "0.0.0.0") == pxe.classify(
            packet, SETTINGS, "0.0.0.0")
    assert classifier.classify(dhcp.parse_request(dhcp.encode(pi))).firmware == Firmware.RPI


@settings(max_examples=500)
@given(st.sampled_from(CLIENT_DATAGRAMS[:40]),
       st.lists(st.tuples(st.integers(240, 420), st.integers(0, 255)), max_size=6))
def test_fuzz_classifier_answers_as_classify(seed: bytes, flips: list[tuple[int, int]]) -> None:
    classifier = pxe.Classifier(SETTINGS)
    data = mutated(seed, flips, len(seed))
    try:
        packet = dhcp.parse(data)
    except DecodeError:
        return
    request = dhcp.parse_request(data)
    for _ in range(2):
        assert classifier.classify(request, "0.0.0.0") == pxe.classify(packet, SETTINGS,
                                                                        "0.0.0.0")


def test_a_classified_request_holds_each_fact_in_its_own_field() -> None:
    """netboot.pxe builds the BootRequest from its values in field order (no __init__, one
    per datagram): each fact a DISCOVER tells lands in the field named for it, as
    BootRequest(...) by name would put it."""
    from netboot.model import BootRequest, MacAddress, boot_request_of_values

    mac = bytes.fromhex("525400abcdef")
    uuid_opt = b"\x00" + bytes(range(1, 17))
    opts = (b"\x35\x01\x01" + b"\x5d\x02\x00\x07" + bytes((97, len(uuid_opt))) + uuid_opt
            + b"\x0c\x05node7" + b"\x3c\x20PXEClient:Arch:00007:UNDI:003000" + b"\xff")
    head = (bytes((1, 1, 6, 1)) + (0x1234).to_bytes(4, "big") + bytes(4) + bytes(8)
            + bytes(4) + bytes((198, 51, 100, 1)) + mac.ljust(16, b"\0") + bytes(192))
    packet = dhcp.parse_request(head + b"\x63\x82\x53\x63" + opts)
    request = pxe.classify(packet, SETTINGS, "198.51.100.9", "eth9").request
    assert request == BootRequest(
        mac=MacAddress(mac), arch=Arch.X86_64, firmware=Firmware.UEFI, arch_code=7,
        uuid=str(uuid.UUID(bytes_le=bytes(range(1, 17)))), hostname="node7",
        remote_addr="198.51.100.9", relay="198.51.100.1", interface="eth9", via="dhcp")
    values = tuple(getattr(request, f.name) for f in dataclasses.fields(BootRequest))
    assert boot_request_of_values(values) == BootRequest(*values)
    # The Client too is made from its values in field order (the shape's part kept with
    # the shape): each in the field named for it, through either classify.
    for client in (pxe.classify(packet, SETTINGS, "198.51.100.9", "eth9"),
                   pxe.Classifier(SETTINGS).classify(packet, "198.51.100.9", "eth9")):
        assert type(client) is pxe.Client and type(client.request.mac) is MacAddress
        assert client._asdict() == pxe.Client(
            request=request, message_type=dhcp.MessageType.DISCOVER,
            vendor_class="PXEClient:Arch:00007:UNDI:003000", pxe=True, ipxe=False,
            ipxe_http=False, requested=frozenset())._asdict()
    with pytest.raises(ValueError):
        boot_request_of_values(values[:-1])


def test_a_request_from_no_address_has_no_remote_address() -> None:
    """RFC 2131 §4.1: a client with no address sends from 0.0.0.0, which names no host: its
    request has none (learnt as a fact, it rewrote a known machine at every boot; s49). A
    client that holds an address (the :4011 REQUEST) or a relay still names its own, and
    discovery's budget reads a request from no address as before, the interface's."""
    from netboot.discovery import source_of

    packet = dhcp.parse_request(dhcp.encode(frame("uefi-edk2pxe", 8)))
    classifier = pxe.Classifier(SETTINGS)
    for classified in (pxe.classify(packet, SETTINGS, "0.0.0.0", "eth1"),
                       classifier.classify(packet, "0.0.0.0", "eth1")):
        assert classified.request.remote_addr is None
        assert source_of(classified.request) == source_of(dataclasses.replace(
            classified.request, remote_addr="0.0.0.0")) == "broadcast on eth1"
    for peer in ("192.0.2.50", "198.51.100.1"):
        assert pxe.classify(packet, SETTINGS, peer).request.remote_addr == peer
        assert classifier.classify(packet, peer).request.remote_addr == peer


def test_uuid_text_is_what_the_uuid_module_makes_of_either_byte_order() -> None:
    """pxe._uuid's text, worked from the option's hex digits (s38-dhcp1st), against
    uuid.UUID for random values: EFI and iPXE in EFI byte order (bytes_le), U-Boot in
    RFC 4122's; the placeholders and malformed values none."""
    import random

    from netboot.model import Firmware

    rng = random.Random(38)
    for _ in range(500):
        value = uuid.UUID(bytes=rng.randbytes(16))
        for firmware in (Firmware.UEFI, Firmware.IPXE, Firmware.BIOS, Firmware.UEFI_HTTP):
            assert pxe._uuid(b"\x00" + value.bytes_le, firmware) == str(value)
        assert pxe._uuid(b"\x00" + value.bytes, Firmware.UBOOT) == str(value)
        assert pxe._uuid(b"\x00" + value.bytes, Firmware.RPI) is None
        assert pxe._uuid(b"\x01" + value.bytes, Firmware.UEFI) is None
        assert pxe._uuid(value.bytes, Firmware.UEFI) is None
    for firmware in (Firmware.UEFI, Firmware.UBOOT):
        assert pxe._uuid(b"\x00" + bytes(16), firmware) is None
        assert pxe._uuid(b"\x00" + b"\xff" * 16, firmware) is None
        assert pxe._uuid(None, firmware) is None


def test_a_request_and_a_packet_of_the_same_bytes_classify_alike() -> None:
    """classify reads a parsed Request's options through its dict (pxe._options) and a
    Packet's through option() (s38-dhcp1st): every captured client datagram, and each with
    a Pi's option 43 and a hostname added, classifies to the same Client either way, by
    classify and by a Classifier (whose second reading of a shape is from memory)."""
    datagrams = [d.payload for path in all_captures() for d in dhcp_datagrams(capture(path.stem))]
    extra = [dhcp.encode(with_option(with_option(dhcp.parse(data), Opt.VENDOR_SPECIFIC,
                                                 b"\x09\x0cRaspberry Pi"), Opt.HOSTNAME, b"n1"))
             for data in datagrams[:20]]
    classifier = pxe.Classifier(SETTINGS)
    seen = 0
    for data in datagrams + extra:
        try:
            packet = dhcp.parse(data)
        except Exception:
            continue
        request = dhcp.parse_request(data)
        if packet.op != Op.REQUEST:
            continue
        expected = pxe.classify(packet, SETTINGS, "0.0.0.0", "eth0")
        assert pxe.classify(request, SETTINGS, "0.0.0.0", "eth0") == expected
        for _ in range(2):
            assert classifier.classify(request, "0.0.0.0", "eth0") == expected
            assert classifier.classify(packet, "0.0.0.0", "eth0") == expected
        seen += 1
    assert seen > 40
