"""Proxy reply templates: byte for byte what building and encoding each reply gives."""

from __future__ import annotations

import pytest

from netboot.model import FirstStage
from netboot.pxe import DhcpSettings, ProxyReplies, classify, proxy_reply
from netboot.wire import dhcp
from netboot.wire.dhcp import MessageType, Op, Opt

SERVER_IP = "192.0.2.1"


def request(i: int, *, message: MessageType = MessageType.DISCOVER, uuid: bool = True,
            arch: bytes = b"\x00\x07", vendor: bytes = b"PXEClient:Arch:00007:UNDI:003000",
            prl: bytes = bytes((1, 3, 60, 66, 67, 97)), flags: int = 0,
            giaddr: str = dhcp.ZERO_IP, ciaddr: str = dhcp.ZERO_IP,
            extra: tuple[dhcp.Option, ...] = ()) -> dhcp.Packet:
    options = [dhcp.Option(Opt.MESSAGE_TYPE, bytes((message,))),
               dhcp.Option(Opt.PARAMETER_REQUEST_LIST, prl),
               dhcp.Option(Opt.CLIENT_ARCH, arch)]
    if uuid:
        options.append(dhcp.Option(Opt.CLIENT_UUID, b"\x00" + bytes((i,)) * 16))
    options += [dhcp.Option(Opt.VENDOR_CLASS, vendor), *extra]
    # Through the codec, as the server sees it (chaddr padded to its 16 bytes).
    return dhcp.parse(dhcp.encode(dhcp.Packet(
        op=Op.REQUEST, xid=0x1000 + i, chaddr=bytes((0x52, 0x54, 0, 0, 0, i)), flags=flags,
        giaddr=giaddr, ciaddr=ciaddr, options=tuple(options))))


SHAPES = {
    "uefi": {},
    "uefi-no-uuid": {"uuid": False},
    "bios": {"arch": b"\x00\x00", "vendor": b"PXEClient:Arch:00000:UNDI:002001"},
    "no-66-67": {"prl": bytes((1, 3))},
    "relayed": {"giaddr": "198.51.100.1"},
    "broadcast-flag": {"flags": dhcp.BROADCAST_FLAG},
    "ipxe": {"extra": (dhcp.Option(Opt.USER_CLASS, b"iPXE"),)},
    "pxe-request": {"message": MessageType.REQUEST, "ciaddr": "198.51.100.7"},
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pxe_port", [False, True])
def test_templated_replies_equal_built_ones(shape: str, pxe_port: bool) -> None:
    settings = DhcpSettings()
    replies = ProxyReplies(settings)
    stages = (FirstStage("snponly.efi"), FirstStage("/boot.ipxe", http=True))
    for stage in stages:
        for i in range(1, 5):  # the first builds the template, the others patch it
            packet = request(i, **SHAPES[shape])  # type: ignore[arg-type]
            client = classify(packet, settings, "0.0.0.0")
            try:
                built = proxy_reply(packet, client, stage, server_ip=SERVER_IP,
                                    settings=settings, pxe_port=pxe_port)
            except Exception as exc:  # the template must raise the same
                with pytest.raises(type(exc)):
                    replies.encode(packet, client, stage, server_ip=SERVER_IP,
                                   pxe_port=pxe_port)
                continue
            data, reply = replies.encode(packet, client, stage, server_ip=SERVER_IP,
                                         pxe_port=pxe_port)
            assert data == dhcp.encode(built, pad_to=dhcp.MIN_PACKET_SIZE)
            assert reply.message_type == built.message_type
            assert reply.file_name == built.file_name


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pxe_port", [False, True])
def test_stages_differing_only_in_reason_or_chain_share_a_template(shape: str,
                                                                   pxe_port: bool) -> None:
    """A reply holds a stage's path and http only (boot_file): stages that differ in their
    reason or chain (a machine's own chain, its group's, its profile's, the default, each
    with its own reason) give the same bytes, from one template. The template is keyed by
    those two fields, not by the FirstStage, whose dataclass __hash__ was a Python call per
    datagram (s38-dhcp1st)."""
    from netboot.model import LoaderChain

    settings = DhcpSettings()
    replies = ProxyReplies(settings)
    stages = [FirstStage("snponly.efi", reason=why, chain=chain)
              for why in ("set on the machine", "group g", "profile p", "")
              for chain in (LoaderChain.IPXE, None)]
    for i, stage in enumerate(stages, 1):
        packet = request(i, **SHAPES[shape])  # type: ignore[arg-type]
        client = classify(packet, settings, "0.0.0.0")
        built = proxy_reply(packet, client, stage, server_ip=SERVER_IP, settings=settings,
                            pxe_port=pxe_port)
        data, reply = replies.encode(packet, client, stage, server_ip=SERVER_IP,
                                     pxe_port=pxe_port)
        assert data == dhcp.encode(built, pad_to=dhcp.MIN_PACKET_SIZE)
        assert (reply.message_type, reply.file_name) == (built.message_type, built.file_name)
    assert len(replies._held) == 1


def test_a_template_made_for_a_relayed_request_answers_one_not_relayed_and_back() -> None:
    """giaddr is patched per reply, whatever the template was made from: relayed (without
    option 82, so templated) then not, and the other way round, each the bytes built."""
    settings = DhcpSettings()
    for first, then in (("198.51.100.1", dhcp.ZERO_IP), (dhcp.ZERO_IP, "198.51.100.1")):
        replies = ProxyReplies(settings)
        for i, giaddr in enumerate((first, then, first), 1):
            packet = request(i, giaddr=giaddr)
            client = classify(packet, settings, "0.0.0.0")
            stage = FirstStage("snponly.efi")
            built = proxy_reply(packet, client, stage, server_ip=SERVER_IP, settings=settings,
                                pxe_port=False)
            data, _ = replies.encode(packet, client, stage, server_ip=SERVER_IP, pxe_port=False)
            assert data == dhcp.encode(built, pad_to=dhcp.MIN_PACKET_SIZE), (first, i)
        assert len(replies._held) == 1
