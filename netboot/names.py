"""DNS answers from the inventory: a frozen zone snapshot and the one answering decision.

Pure: no sockets, no clock. :meth:`Zone.build` turns machines and clusters into an immutable
snapshot keyed by lowercased wire labels (O(1) lookups at 10,000 machines);
:func:`answer` turns one parsed query into a :class:`Decision`: bytes to send, "forward this"
(a name outside every zone we are authoritative for), or "ignore" (not a query at all).
The asyncio adapter lives in :mod:`netboot.servers.dns`; dnslib is used as a codec only,
imported by the functions of the full path: the boot decision (``serves_cluster``) and a
server without DNS never load it (``serve``'s start-up, issue 10).

Records are kept in wire form (:class:`netboot.wire.dns.Record`). A plain query (one
question, at most an EDNS0 OPT) is answered by :func:`answer_plain` through the hand-written
codec of :mod:`netboot.wire.dns`; every other shape goes through :func:`answer` and dnslib,
which turns the same records into dnslib RRs. Both make the same decision from the same
sections (:func:`_lookup`); ``tests/wire/test_dns.py`` holds them to the same bytes.

Records served for zone ``Z`` (e.g. ``netboot.lan``):

* ``Z``: ``SOA`` and ``NS`` (pointing at ``<server_name>.Z``).
* ``<server_name>.Z``: ``A``/``AAAA`` of the server's own addresses.
* ``<hostname>.Z``: ``A`` of every machine with a valid hostname and a known IPv4 address.
* ``<cluster>.Z``: the cluster endpoint, ``A`` of every *registered* server node of the cluster
  (failed or not yet registered nodes are left out), so a managed cluster's ``server_url`` is a
  stable name instead of one node's address.
* ``_k3s._tcp.<cluster>.Z`` and ``_kubernetes._tcp.<cluster>.Z``: ``SRV`` to each registered
  server's ``<hostname>.Z:<k3s_port>``.
* ``PTR`` in the reverse zones covering the addresses above and each of the server's
  interfaces' (``server_ptrs``: ``<server_name>.Z``, as dnsmasq's ``--interface-name``
  answers both ways), ``/24`` for IPv4 and ``/64`` for IPv6 unless networks are given, each
  with its own ``SOA`` and ``NS``.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from netboot.errors import ConfigError, DecodeError
from netboot.model import Cluster, Machine, MachineState, Role
from netboot.wire import dns as wire

Key = tuple[bytes, ...]  # a domain name as lowercased wire labels, most specific first

# Numeric codes (dnslib's Bimap has no name for some of them, e.g. class 255 is "*").
_IN = 1
_CLASS_ANY = 255
_T_A = 1
_T_NS = 2
_T_SOA = 6
_T_PTR = 12
_T_AAAA = 28
_T_SRV = 33
_T_OPT = 41
_T_IXFR = 251
_T_AXFR = 252
_T_ANY = 255

NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5
BADVERS = 16  # extended RCODE, RFC 6891 §6.1.3: upper 8 bits live in the OPT TTL

# RFC 1035 §2.3.4 / §4.2.1: 512 bytes is all a client without EDNS can take over UDP.
MIN_UDP = 512
# DNS flag day 2020: 1232 bytes avoids IP fragmentation on every common path.
DEFAULT_MAX_UDP = 1232
MAX_TCP = 65535  # RFC 7766 §8: 2-byte length prefix

# RFC 1123 §2.1 host names: letters, digits and hyphens, 1-63 octets, no hyphen at either end.
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_SRV_SERVICES = ((b"_k3s", b"_tcp"), (b"_kubernetes", b"_tcp"))


def _key(name: str) -> Key:
    """``"Node1.Netboot.LAN."`` → ``(b"node1", b"netboot", b"lan")``."""
    text = name.strip().rstrip(".").lower()
    return tuple(text.encode("ascii").split(b".")) if text else ()


def key_of(label: Any) -> Key:
    """Lookup key of a parsed :class:`dnslib.DNSLabel`: raw labels, ASCII-lowercased.

    RFC 4343 §3: DNS compares names case-insensitively in ASCII only, which is exactly what
    ``bytes.lower`` does; keeping raw labels means a label containing a dot cannot alias two.
    """
    return tuple(part.lower() for part in label.label)


def _text(key: Key) -> str:
    return ".".join(part.decode("ascii", "backslashreplace") for part in key) + "."


def valid_label(text: str) -> bool:
    return bool(_LABEL.match(text))


def address_of(machine: Machine, *, fixed_first: bool = False) -> str | None:
    """Where a machine is (IPv4): the address it registered from, else its fixed one.

    ``fixed_first`` where netboot's own DHCP hands the fixed address out (authoritative
    mode: the lease NAKs any other, netboot.leases): an operator who changes a registered
    server's fixed address moves the machine there at its next renewal, while the address
    it registered from is where it was. Its cluster's nodes and DNS follow it (s36-journey).
    """
    if fixed_first:
        return machine.fixed_ipv4 or machine.ipv4
    return machine.ipv4 or machine.fixed_ipv4


def host_record(machine: Machine, *, fixed_first: bool = False,
                ) -> tuple[str, ipaddress.IPv4Address] | str | None:
    """The ``<hostname>.Z`` A record a machine gets: (label, address); a reason it is skipped
    (str); or None when it has no name or no address yet (nothing to report).
    ``fixed_first``: see :func:`address_of`."""
    if not machine.hostname:
        return None
    host = machine.hostname.lower()
    if not valid_label(host):
        return f"hostname {machine.hostname!r} is not a DNS label"
    addr = address_of(machine, fixed_first=fixed_first)
    if not addr:
        return None
    try:
        return host, ipaddress.IPv4Address(addr)
    except ValueError:
        return f"address {addr!r} is not IPv4"


def is_cluster_endpoint(machine: Machine) -> bool:
    """Whether a machine is one of the addresses of its cluster's name: a registered server
    (failed or not yet registered nodes would send agents to nothing)."""
    return machine.role == Role.SERVER and machine.state == MachineState.REGISTERED


def serves_cluster(cluster: str, servers: Iterable[Machine], *,
                   fixed_first: bool = False) -> bool:
    """Whether :meth:`Zone.build` answers ``<cluster>.Z`` with an address, given the cluster's
    machines: what the boot decision asks before it hands a node that name. (Two machines
    claiming one hostname can still leave one out; the other servers answer then.)"""
    return valid_label(cluster.lower()) and any(
        is_cluster_endpoint(m) and isinstance(host_record(m, fixed_first=fixed_first), tuple)
        for m in servers)


def _valid_zone(name: str) -> bool:
    key = _key(name)
    return bool(key) and len(".".join(p.decode() for p in key)) <= 253 and all(
        valid_label(p.decode()) for p in key
    )


@dataclass(frozen=True, slots=True)
class _Apex:
    """What a zone apex contributes to negative answers (RFC 2308 §3: SOA in authority)."""

    key: Key
    soa: wire.Record  # TTL already min(SOA TTL, SOA MINIMUM) as RFC 2308 §5 asks


@dataclass(frozen=True, slots=True)
class Zone:
    """An immutable snapshot of every name netboot is authoritative for.

    Build it with :meth:`build`; swap in a new one when the inventory changes. ``conflicts``
    and ``skipped`` say, in words, which inventory entries did not make it into the zone and
    why, so the service can log them once per rebuild rather than once per query.
    """

    name: str
    serial: int
    ttl: int
    server_fqdn: str
    nodes: Mapping[Key, Mapping[int, tuple[wire.Record, ...]]]
    apexes: Mapping[Key, _Apex]
    empty_nonterminals: frozenset[Key]
    endpoints: Mapping[str, tuple[str, ...]]
    conflicts: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    # The longest apex, so find_apex never looks at more suffixes than can possibly match.
    _max_apex_depth: int = field(default=0, repr=False)

    @classmethod
    def build(
        cls,
        machines: Iterable[Machine],
        clusters: Iterable[Cluster],
        *,
        zone: str,
        server_name: str = "netboot",
        server_addrs: Sequence[str] = (),
        server_ptrs: Sequence[str] = (),
        ttl: int = 60,
        k3s_port: int = 6443,
        serial: int,
        reverse_networks: Iterable[str] | None = None,
        fixed_first: bool = False,
    ) -> Zone:
        """Build the snapshot. Raises :class:`ConfigError` for a bad zone or server setting.

        Inventory problems (a hostname that is not a DNS label, two machines claiming one
        name) never raise: the entry is skipped and reported in ``skipped``/``conflicts``.
        ``fixed_first``: netboot's DHCP is authoritative (:func:`address_of`).
        ``server_ptrs``: the server's other addresses (its interfaces'), which get a PTR to
        the server's name but no ``A`` in the shared zone (each DNS listener answers the
        server's name with its own address: :meth:`served_at`).
        """
        if not _valid_zone(zone):
            raise ConfigError(
                f"{zone!r} is not a DNS zone name", key="dns.zone", fix="e.g. netboot.lan"
            )
        server_label = server_name.lower()
        if not valid_label(server_label):
            raise ConfigError(
                f"{server_name!r} is not a DNS label", key="dns.server_name", fix="e.g. netboot"
            )
        if not 0 <= ttl <= 2**31 - 1:
            raise ConfigError(f"ttl {ttl} out of range", key="dns.ttl", fix="e.g. 60")
        if not 0 < k3s_port < 65536:
            raise ConfigError(f"port {k3s_port} out of range", key="dns.k3s_port", fix="6443")
        origin = _key(zone)
        server_key = (server_label.encode(), *origin)
        builder = _Builder(origin, server_key, ttl=ttl, serial=serial)
        server_ips = []
        for text in server_addrs:
            try:
                server_ips.append(ipaddress.ip_address(text))
            except ValueError as exc:
                raise ConfigError(
                    f"{text!r} is not an IP address", key="server.advertise"
                ) from exc
        builder.claim(server_key, "the server's own name")
        for ip in server_ips:
            builder.address(server_key, ip)
        ptr_ips = []
        for text in server_ptrs:
            try:
                extra = ipaddress.ip_address(text)
            except ValueError as exc:
                raise ConfigError(f"{text!r} is not an IP address",
                                  key="server.interfaces") from exc
            if extra not in server_ips and extra not in ptr_ips:
                ptr_ips.append(extra)

        clusters = list(clusters)
        cluster_names: dict[bytes, str] = {}
        for cluster in clusters:
            label = cluster.name.lower()
            if not valid_label(label):
                builder.skipped.append(f"cluster {cluster.name!r}: not a DNS label")
                continue
            ckey = (label.encode(), *origin)
            if builder.claim(ckey, f"cluster {cluster.name!r}"):
                cluster_names[label.encode()] = cluster.name
                for service in _SRV_SERVICES:
                    builder.claim((*service, *ckey), f"cluster {cluster.name!r} SRV")

        machine_ips: list[tuple[Key, ipaddress.IPv4Address]] = []
        endpoint: dict[bytes, list[tuple[Key | None, ipaddress.IPv4Address]]] = {
            c: [] for c in cluster_names
        }
        for machine in machines:
            named = host_record(machine, fixed_first=fixed_first)
            if named is None:
                continue
            if isinstance(named, str):
                builder.skipped.append(f"{machine.ref}: {named}")
                continue
            host, ip = named
            hkey = (host.encode(), *origin)
            own = builder.claim(hkey, f"machine {machine.ref}")
            if own:
                builder.address(hkey, ip)
                machine_ips.append((hkey, ip))
            member_of = (machine.cluster or "").lower().encode()
            if member_of in endpoint and is_cluster_endpoint(machine):
                # An address of its cluster's name even where its own name is another's (a
                # cluster's, the server's, a machine's before it): serves_cluster, which the
                # boot decision asks before it gives nodes that name, counts it by its
                # host_record alone, and a sole server named so left <cluster>.Z with no
                # address while every agent was sent there. Its SRV names it only where its
                # name is its own.
                endpoint[member_of].append((hkey if own else None, ip))

        endpoints: dict[str, tuple[str, ...]] = {}
        for clabel, members in endpoint.items():
            ckey = (clabel, *origin)
            for owned, ip in members:
                builder.address(ckey, ip)
                if owned is None:
                    continue
                # RFC 2782: priority 0, weight 10, the target never compressed.
                srv = _SRV_HEAD.pack(0, 10, k3s_port) + _wire_name(owned)
                for service in _SRV_SERVICES:
                    builder.add((*service, *ckey), _T_SRV, srv)
            endpoints[cluster_names[clabel]] = tuple(str(ip) for _, ip in members)

        # Reverse zones: given networks, or the /24 (IPv4) and /64 (IPv6) of every address.
        all_ips = [(server_key, ip) for ip in (*server_ips, *ptr_ips)] + list(machine_ips)
        if reverse_networks is None:
            nets = {_default_net(ip) for _, ip in all_ips}
        else:
            nets = {_reverse_net(text) for text in reverse_networks}
        for net in sorted(nets, key=lambda n: (n.version, n)):
            builder.apex(_reverse_zone(net))
        for owner, ip in all_ips:
            rkey = _key(ip.reverse_pointer)
            if builder.apex_of(rkey) is None:
                continue  # outside the configured reverse networks: someone else's to answer
            if _T_PTR in builder.nodes.get(rkey, {}):
                builder.conflicts.append(f"{ip}: more than one name; PTR kept for the first")
                continue
            builder.add(rkey, _T_PTR, names=(owner,))

        return builder.freeze(cls, zone=_text(origin), server_fqdn=_text(server_key),
                              endpoints=endpoints)

    # -- lookups -------------------------------------------------------------------------

    def find_apex(self, key: Key) -> _Apex | None:
        """The deepest zone we are authoritative for that contains ``key``."""
        start = max(0, len(key) - self._max_apex_depth)
        for i in range(start, len(key) + 1):
            apex = self.apexes.get(key[i:])
            if apex is not None:
                return apex
        return None

    def records(self, name: str, qtype: int) -> tuple[wire.Record, ...]:
        """Records of one name and type (for the service and tests; ``answer`` is the path)."""
        return self.nodes.get(_key(name), {}).get(qtype, ())

    def __len__(self) -> int:
        return len(self.nodes)

    def served_at(self, address: str) -> Zone:
        """This zone as a listener on ``address`` answers it: the server's own name holds
        that address alone (dnsmasq's ``--localise-queries``: the address on the interface
        the query came in on). A host without a default route advertises 127.0.0.1 and
        listens on each interface (service._start_dns): a device asking over one was told
        127.0.0.1, itself. Everything else is this zone's, shared."""
        ip = ipaddress.ip_address(address)
        key = _key(self.server_fqdn)
        types = {t: rrs for t, rrs in self.nodes.get(key, {}).items()
                 if t not in (_T_A, _T_AAAA)}
        rtype = _T_A if ip.version == 4 else _T_AAAA
        types[rtype] = (wire.Record(key, rtype, self.ttl, ip.packed),)
        nodes = dict(self.nodes)
        nodes[key] = MappingProxyType(types)
        return replace(self, nodes=MappingProxyType(nodes))


class _Builder:
    def __init__(self, origin: Key, server_key: Key, *, ttl: int, serial: int) -> None:
        self.origin = origin
        self.server_key = server_key
        self.ttl = ttl
        self.serial = serial & 0xFFFFFFFF  # RFC 1982 serial arithmetic is 32-bit
        self.nodes: dict[Key, dict[int, list[wire.Record]]] = {}
        self.owners: dict[Key, str] = {}
        self.apexes: dict[Key, _Apex] = {}
        self.conflicts: list[str] = []
        self.skipped: list[str] = []
        self.apex(origin)

    def claim(self, key: Key, owner: str) -> bool:
        """First claim of a name wins: server name, then clusters, then machines."""
        if key in self.owners:
            self.conflicts.append(
                f"{_text(key)} wanted by {owner}, already used by {self.owners[key]}"
            )
            return False
        self.owners[key] = owner
        self.nodes.setdefault(key, {})
        return True

    def add(self, key: Key, rtype: int, head: bytes = b"", *, names: tuple[Key, ...] = (),
            tail: bytes = b"") -> wire.Record:
        rr = wire.Record(key, rtype, self.ttl, head, names, tail)
        self.nodes.setdefault(key, {}).setdefault(rtype, []).append(rr)
        return rr

    def address(self, key: Key, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        self.add(key, _T_A if ip.version == 4 else _T_AAAA, ip.packed)

    def apex(self, key: Key) -> None:
        if key in self.apexes:
            return
        rname = (b"hostmaster", *self.origin)
        # RFC 1912 §2.2 timers; MINIMUM is the negative-caching TTL (RFC 2308 §4), kept at the
        # zone TTL so a machine that registers is not hidden by a cached NXDOMAIN for long.
        timers = _TIMERS.pack(self.serial, 3600, 600, 86400, self.ttl)
        soa = self.add(key, _T_SOA, names=(self.server_key, rname), tail=timers)
        self.add(key, _T_NS, names=(self.server_key,))
        self.apexes[key] = _Apex(key=key, soa=soa)

    def apex_of(self, key: Key) -> Key | None:
        for i in range(len(key) + 1):
            if key[i:] in self.apexes:
                return key[i:]
        return None

    def freeze(
        self, cls: type[Zone], *, zone: str, server_fqdn: str,
        endpoints: dict[str, tuple[str, ...]],
    ) -> Zone:
        # RFC 8020: a name with descendants exists even with no records (an "empty
        # non-terminal", e.g. _tcp.<cluster>.Z): NODATA there, never NXDOMAIN.
        ents: set[Key] = set()
        for key in self.nodes:
            apex = self.apex_of(key)
            if apex is None:
                continue
            for i in range(1, len(key) - len(apex)):
                if key[i:] not in self.nodes:
                    ents.add(key[i:])
        nodes = {
            key: MappingProxyType({t: tuple(rrs) for t, rrs in types.items()})
            for key, types in self.nodes.items()
        }
        return cls(
            name=zone,
            serial=self.serial,
            ttl=self.ttl,
            server_fqdn=server_fqdn,
            nodes=MappingProxyType(nodes),
            apexes=MappingProxyType(dict(self.apexes)),
            empty_nonterminals=frozenset(ents),
            endpoints=MappingProxyType(endpoints),
            conflicts=tuple(self.conflicts),
            skipped=tuple(self.skipped),
            _max_apex_depth=max(len(k) for k in self.apexes),
        )


def _default_net(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Any:
    prefix = 24 if ip.version == 4 else 64
    return ipaddress.ip_network(f"{ip}/{prefix}", strict=False)


def _reverse_net(text: str) -> Any:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ConfigError(f"{text!r} is not a network", key="dns.reverse_networks") from exc
    # RFC 2317 classless delegation is not offered: reverse zones sit on label boundaries.
    step = 8 if net.version == 4 else 4
    if net.prefixlen % step or net.prefixlen == 0:
        raise ConfigError(
            f"{text!r}: reverse zones need a prefix that is a multiple of {step}",
            key="dns.reverse_networks",
            fix="e.g. 192.168.1.0/24 or fd00::/64",
        )
    return net


def _reverse_zone(net: Any) -> Key:
    full = _key(net.network_address.reverse_pointer)
    step = 8 if net.version == 4 else 4
    bits = 32 if net.version == 4 else 128
    return full[(bits - net.prefixlen) // step :]


# -- answering ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """Send ``data`` back to the client."""

    data: bytes
    rcode: int
    truncated: bool = False
    key: Key = ()  # the question's name (lowercased), for log lines

    @property
    def qname(self) -> str:
        return _text(self.key)


@dataclass(frozen=True, slots=True)
class Forward:
    """Not ours: forward the client's raw query upstream (or refuse if forwarding is off)."""

    qname: str


@dataclass(frozen=True, slots=True)
class Ignore:
    """Not a query (e.g. a response sent to us): stay silent, never answer a response."""

    reason: str


Decision = Answer | Forward | Ignore


def parse_query(data: bytes) -> Any:
    """Bytes → :class:`dnslib.DNSRecord`; anything undecodable is a :class:`DecodeError`."""
    from dnslib import DNSError, DNSRecord

    try:
        record = DNSRecord.parse(data)
        for question in record.questions:
            # dnslib can parse names it cannot pack again; RFC 1035 §2.3.4 limits.
            if len(question.qname) > 253 or any(len(p) > 63 for p in question.qname.label):
                raise DecodeError("name too long", field="qname")
    except DNSError as exc:
        raise DecodeError(f"not a DNS message: {exc}", field="message") from exc
    except (ValueError, IndexError, UnicodeError) as exc:  # dnslib's rdata parsers leak these
        raise DecodeError(f"not a DNS message: {exc!r}", field="message") from exc
    return record


def formerr_for(data: bytes) -> bytes | None:
    """A header-only FORMERR for a query we could not parse (RFC 1035 §4.1.1), if it has a
    query header at all; ``None`` when silence is the right answer (a response, or too short).
    """
    if len(data) < 12 or data[2] & 0x80:
        return None
    opcode = (data[2] >> 3) & 0x0F
    # QR=1, the same opcode and RD, everything else clear; all counts zero.
    flags = 0x80 | (opcode << 3) | (data[2] & 0x01)
    return data[:2] + bytes([flags, FORMERR]) + bytes(8)


def _edns(request: Any) -> tuple[list[Any], Any]:
    opts = [rr for rr in request.ar if rr.rtype == _T_OPT]
    return opts, (opts[0] if opts else None)


def _skeleton(request: Any, *, aa: bool, ra: bool, rcode: int = NOERROR) -> Any:
    """Reply header built afresh: copying the request's bitmap (as dnslib's ``reply()`` does)
    would echo TC, Z and junk RCODE bits. RD and CD are copied (RFC 1035 §4.1.1, RFC 4035
    §3.2.2); the question is echoed byte for byte so 0x20 case randomisation survives.
    """
    from dnslib import DNSHeader, DNSRecord

    h = request.header
    header = DNSHeader(id=h.id, qr=1, opcode=h.opcode, aa=int(aa), rd=h.rd, ra=int(ra),
                       rcode=rcode & 0x0F)
    header.cd = h.cd
    return DNSRecord(header, questions=list(request.questions[:1]))


def _with_opt(reply: Any, edns: Any, max_udp: int | None, rcode: int = NOERROR) -> Any:
    # RFC 6891 §7: answer EDNS with EDNS, advertising our own payload size.
    if edns is not None:
        from dnslib import EDNS0

        reply.add_ar(EDNS0(udp_len=max_udp or DEFAULT_MAX_UDP, ext_rcode=rcode >> 4))
    return reply


def error_reply(request: Any, rcode: int, *, recursion: bool = False,
                max_udp: int | None = DEFAULT_MAX_UDP) -> bytes:
    """An empty reply with ``rcode`` (SERVFAIL after a failed forward, REFUSED, ...)."""
    _, edns = _edns(request)
    reply = _skeleton(request, aa=False, ra=recursion, rcode=rcode)
    return bytes(_with_opt(reply, edns, max_udp, rcode).pack())


def fit_udp(request: Any, reply: bytes, *, max_udp: int) -> bytes:
    """A forwarded ``reply`` as a UDP client of ours may get it: as the upstream sent it when
    it fits the size the client can take (512 without EDNS, its payload up to ``max_udp``
    with: :func:`_limit`, as for the zone's own answers), else header and question with TC
    set (RFC 1035 §4.2.1, RFC 7766 §5), so the client asks again over TCP.

    The client's query goes upstream as it came (its EDNS payload included), and an upstream
    may answer up to that payload (Windows DNS Server's default is 4,000 bytes): passed on
    as is, a forged 40-byte query for a large record was a 100x reflection toward its forged
    source, where dnsmasq answers at most the client's size (``--edns-packet-max``).
    """
    _, edns = _edns(request)
    if len(reply) <= _limit(edns, max_udp):
        return reply
    truncated = _skeleton(request, aa=False, ra=True, rcode=reply[3] & 0x0F)
    truncated.header.tc = 1
    return bytes(_with_opt(truncated, edns, max_udp).pack())


def answer(zone: Zone, request: Any, *, max_udp: int | None, recursion: bool = False) -> Decision:
    """The DNS decision for one parsed query.

    ``max_udp`` is the server's UDP payload cap (``None`` over TCP, where only the 2-byte
    length limits). ``recursion`` says whether names outside the zone are forwarded: it sets
    RA (RFC 1035 §4.1.1) and turns "not ours" into :class:`Forward` instead of REFUSED.
    """
    h = request.header
    if h.qr:
        return Ignore("a response, not a query")
    key = key_of(request.q.qname) if request.questions else ()
    opts, edns = _edns(request)

    def fail(rcode: int) -> Answer:
        data = error_reply(request, rcode, recursion=recursion, max_udp=max_udp)
        return Answer(data, rcode, key=key)

    if len(opts) > 1:
        return fail(FORMERR)  # RFC 6891 §6.1.1: more than one OPT is a format error
    if h.opcode != 0:
        return fail(NOTIMP)  # RFC 1035 §4.1.1: only standard queries (no IQUERY/NOTIFY/UPDATE)
    if len(request.questions) != 1:
        return fail(FORMERR)  # RFC 9619: a query carries exactly one question
    if edns is not None and (edns.ttl >> 16) & 0xFF != 0:
        return fail(BADVERS)  # RFC 6891 §6.1.3: we speak EDNS version 0 only
    q = request.q
    if q.qclass not in (_IN, _CLASS_ANY):
        return fail(REFUSED)  # CHAOS/HESIOD: nothing to say, and not to be forwarded
    apex = zone.find_apex(key)
    if apex is None:
        return Forward(_text(key)) if recursion else fail(REFUSED)
    if q.qtype in (_T_AXFR, _T_IXFR):
        return fail(REFUSED)  # zone transfers are not offered (RFC 5936 §4.2 allows refusing)

    sections = _lookup(zone, key, q.qtype)
    assert sections is not None  # apex found above
    rcode, answers, authority, additional = sections
    reply = _skeleton(request, aa=True, ra=recursion, rcode=rcode)
    reply.add_answer(*map(_dnslib_rr, answers))
    reply.add_auth(*map(_dnslib_rr, authority))
    reply.add_ar(*map(_dnslib_rr, additional))
    return _finish(reply, edns, max_udp, key)


Records = tuple[wire.Record, ...] | list[wire.Record]
Sections = tuple[int, Records, Records, Records]


def _lookup(zone: Zone, key: Key, qtype: int) -> Sections | None:
    """RCODE, answer, authority and additional records; ``None`` outside every apex.

    A name with records is inside an apex by construction (``Zone.build``), so the apex is
    only looked for when the SOA is needed: one dictionary lookup for a positive answer.
    """
    node = zone.nodes.get(key)
    if node is None:
        apex = zone.find_apex(key)
        if apex is None:
            return None
        # RFC 2308 §3: SOA in authority for negative answers; RFC 8020: an empty
        # non-terminal exists (NODATA), anything else does not (NXDOMAIN).
        rcode = NOERROR if key in zone.empty_nonterminals else NXDOMAIN
        return rcode, (), (apex.soa,), ()
    found: Records = (node.get(qtype, ()) if qtype != _T_ANY
                      else [rr for rrs in node.values() for rr in rrs])
    if not found:
        # RFC 2308 §2.2 NODATA: the name exists, the type does not. NXDOMAIN here would
        # deny the A record too and poison resolvers that asked for AAAA first.
        apex = zone.find_apex(key)
        assert apex is not None
        return NOERROR, (), (apex.soa,), ()
    if qtype not in (_T_NS, _T_SRV, _T_ANY):
        return NOERROR, found, (), ()
    # RFC 1035 §3.3.11/§3.3.14 additional section processing: addresses of NS/SRV targets.
    additional: list[wire.Record] = []
    for rr in found:
        if rr.rtype in (_T_NS, _T_SRV):
            target = rr.names[0] if rr.rtype == _T_NS else _labels_of(rr.head, 6)
            tnode = zone.nodes.get(target)
            if tnode is not None:
                additional += (*tnode.get(_T_A, ()), *tnode.get(_T_AAAA, ()))
    return NOERROR, found, (), additional


def answer_plain(
    zone: Zone, data: bytes, query: wire.PlainQuery, *, max_udp: int | None,
    recursion: bool = False,
) -> Answer | None:
    """:func:`answer` for a plain query (:func:`netboot.wire.dns.parse_plain_query`), encoded
    by :mod:`netboot.wire.dns` instead of dnslib; ``None`` when the full path must decide
    (a name we do not own, a zone transfer, a class other than IN or ANY).

    Same decision, same sections and the same bytes as :func:`answer` for a lowercase
    question (``tests/wire/test_dns.py``); no dnslib object is built, which is what made a
    name asked for the first time cost ~4x a repeated one.
    """
    if query.qclass not in (_IN, _CLASS_ANY) or query.qtype in (_T_AXFR, _T_IXFR):
        return None
    key = query.labels
    sections = _lookup(zone, key, query.qtype)
    if sections is None:
        return None  # not ours: forwarded or refused by the full path
    rcode, answers, authority, additional = sections
    payload = query.payload
    if max_udp is None:
        limit = MAX_TCP
    elif payload is None:
        limit = MIN_UDP
    else:
        limit = max(MIN_UDP, min(payload, max_udp))  # as _limit()
    reply, truncated = wire.encode_reply(
        data, query, aa=True, ra=recursion, rcode=rcode, answers=answers,
        authority=authority, additional=additional, limit=limit,
        opt_payload=None if payload is None else (max_udp or DEFAULT_MAX_UDP),
    )
    return Answer(reply, rcode, truncated=truncated, key=key)


_TIMERS = struct.Struct(">IIIII")
_SRV_HEAD = struct.Struct(">HHH")


def _wire_name(key: Key) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in key) + b"\x00"


def _labels_of(data: bytes, at: int) -> Key:
    """The uncompressed name at ``data[at:]`` (an SRV target we wrote ourselves)."""
    labels = []
    while data[at]:
        labels.append(data[at + 1 : at + 1 + data[at]])
        at += 1 + data[at]
    return tuple(labels)


def _dnslib_rr(rr: wire.Record) -> Any:
    """A zone record as dnslib's RR, for the full path (odd queries, tests)."""
    from dnslib import AAAA, NS, PTR, RR, SOA, SRV, A, DNSLabel

    t = rr.rtype
    if t == _T_A:
        rdata: Any = A(tuple(rr.head))
    elif t == _T_AAAA:
        rdata = AAAA(tuple(rr.head))
    elif t == _T_NS:
        rdata = NS(DNSLabel(list(rr.names[0])))
    elif t == _T_PTR:
        rdata = PTR(DNSLabel(list(rr.names[0])))
    elif t == _T_SOA:
        rdata = SOA(DNSLabel(list(rr.names[0])), DNSLabel(list(rr.names[1])),
                    _TIMERS.unpack(rr.tail))
    elif t == _T_SRV:
        priority, weight, port = _SRV_HEAD.unpack_from(rr.head)
        rdata = SRV(priority, weight, port, DNSLabel(list(_labels_of(rr.head, 6))))
    else:
        raise AssertionError(f"zone record type {t} has no dnslib form")  # build makes none
    return RR(DNSLabel(list(rr.owner)), t, rdata=rdata, ttl=rr.ttl)


def _limit(edns: Any, max_udp: int | None) -> int:
    if max_udp is None:
        return MAX_TCP
    if edns is None:
        return MIN_UDP
    # RFC 6891 §6.2.5: values below 512 are treated as 512; never beyond our own cap.
    return max(MIN_UDP, min(int(edns.rclass), max_udp))


def _finish(reply: Any, edns: Any, max_udp: int | None, key: Key) -> Answer:
    limit = _limit(edns, max_udp)
    _with_opt(reply, edns, max_udp)
    data = bytes(reply.pack())
    rcode = int(reply.header.rcode)
    if len(data) <= limit:
        return Answer(data, rcode, key=key)
    # RFC 2181 §9: additional data is not required, drop it before setting TC.
    reply.ar = []
    _with_opt(reply, edns, max_udp)
    data = bytes(reply.pack())
    if len(data) <= limit:
        return Answer(data, rcode, key=key)
    # RFC 1035 §4.2.1 / RFC 7766 §5: TC=1 so the client retries over TCP. The question stays
    # (dnslib's truncate() drops it, which makes some stub resolvers discard the reply).
    reply.rr = []
    reply.auth = []
    reply.ar = []
    reply.header.tc = 1
    _with_opt(reply, edns, max_udp)
    return Answer(bytes(reply.pack()), rcode, truncated=True, key=key)


class ZoneHolder:
    """The simplest :class:`~netboot.servers.dns.ZoneSource`: a box the service refills.

    Swapping a reference is atomic on the event loop, so the answer path never waits for the
    inventory; a query sees either the old or the new snapshot, never half of one.
    """

    def __init__(self, zone: Zone) -> None:
        self._zone = zone

    def zone(self) -> Zone:
        return self._zone

    def replace(self, zone: Zone) -> None:
        self._zone = zone


class ServedAt:
    """A :class:`~netboot.servers.dns.ZoneSource` for the listener on one address: the
    shared zone of ``source`` as :meth:`Zone.served_at` that address, made again only when
    the shared one was replaced (a query asks for it each time: one identity check)."""

    def __init__(self, source: Any, address: str) -> None:
        self._source = source
        self.address = address
        self._base: Zone | None = None
        self._zone: Zone | None = None

    def zone(self) -> Zone:
        base = self._source.zone()
        if base is not self._base or self._zone is None:
            self._zone = base.served_at(self.address)
            self._base = base
        return self._zone


def question(name: str, qtype: str = "A", qclass: str = "IN") -> Any:
    """A query record (tests and benchmarks)."""
    from dnslib import CLASS, QTYPE, DNSHeader, DNSQuestion, DNSRecord

    return DNSRecord(DNSHeader(rd=1), questions=[DNSQuestion(name, getattr(QTYPE, qtype),
                                                             getattr(CLASS, qclass))])
