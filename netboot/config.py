"""Configuration: embedded defaults ← YAML file ← ``NETBOOT_*`` environment ← CLI flags.

Every error names where the bad value came from (file and line, environment variable, or flag),
the dotted key, and what to write instead, so that a bad file stops start-up with a fix rather
than a traceback.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml

from netboot.errors import ConfigError, ValidationError
from netboot.inventory import dsn as pg_dsn
from netboot.model import Group, Role, loopback_url, parse_ip

DEFAULT_ASSET_DIRS = (
    "/var/lib/netboot/assets",
    "boot_assets",
    "/usr/lib/ipxe",  # Debian/Ubuntu package "ipxe"
    "/usr/share/ipxe",  # Fedora package "ipxe-bootimgs"
    "/usr/lib/shim",  # Debian "shim-signed": shimx64.efi.signed
    "/usr/lib/grub",  # Debian "grub-efi-{amd64,arm64}-signed": <arch>-efi-signed/grubnet*
)


@dataclass(frozen=True)
class ServerConfig:
    interfaces: tuple[str, ...] = ()  # provisioning interfaces; empty = all (no SO_BINDTODEVICE)
    advertise: str | None = None  # address put in DHCP answers and URLs
    data_dir: str = "/var/lib/netboot"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # auto: uvloop when it is installed (the "fast" extra), else asyncio's own loop.
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    # The other netboot servers' base URLs (http://192.0.2.11:8080) a device's register
    # command tries when this one does not answer; empty: those the shared inventory
    # records (each server records its own: netboot.inventory.peers).
    peers: tuple[str, ...] = ()


@dataclass(frozen=True)
class HttpConfig:
    listen: str = "0.0.0.0"
    port: int = 8080
    public_url: str | None = None  # e.g. http://boot.example:8080 when behind NAT/proxy
    # Who may use the API and the dashboard over this plain listener (firmware and installer
    # routes serve everyone): loopback peers only (the CLI, a TLS proxy on this host), nobody
    # (refuse), or everyone (allow: a TLS-terminating proxy on another host).
    plain_api: Literal["refuse", "loopback", "allow"] = "loopback"
    max_body_bytes: int = 1_048_576
    max_event_bytes: int = 16_384
    # Bounds with nginx's defaults as the bar (README, "Resource limits"), but connections
    # as many as tftp.max_transfers: a pallet of devices keeps a kept-alive connection each
    # (iPXE's pool) through its script, kernel and initrd, and at 1,024 a 1,500-device storm
    # had the cap's guard closing their connections (benchmarks/README.md, session 19).
    max_connections: int = 4096
    max_connections_per_source: int = 128
    header_timeout: int = 60  # seconds
    body_timeout: int = 60
    keepalive_timeout: int = 75
    send_timeout: int = 60
    # Threads that send large files' bodies (512 KiB and more) with sendfile(2) off the event
    # loop's thread, so the kernel's copy runs on another CPU (benchmarks/README.md,
    # s48-sendfile); 0 sends every body on the loop's thread.
    send_threads: int = 2
    # One line per request on the netboot.access logger (nginx's access_log); false leaves
    # the requests to the metrics, for a fleet whose storms would write millions of lines.
    access_log: bool = True


@dataclass(frozen=True)
class MetricsConfig:
    # Prometheus scrapes without credentials by convention; the counts it exposes (machines by
    # state, requests by route) name no machine. false: /metrics needs a token like the API.
    public: bool = True


@dataclass(frozen=True)
class HttpsConfig:
    # On by default: the API (admin token), and later the dashboard, should never need plain
    # HTTP; netboot makes its own CA, so there is nothing to set up. Firmware downloads and
    # the installers that cannot be given a CA keep using the http listener.
    enabled: bool = True
    listen: str | None = None  # default: http.listen
    port: int = 8443
    public_url: str | None = None  # e.g. https://boot.example:8443 behind NAT/proxy
    names: tuple[str, ...] = ()  # extra DNS names / addresses for the generated certificate
    cert_file: str | None = None  # the operator's certificate (PEM, then intermediates)
    key_file: str | None = None  # its key (PEM, unencrypted, 0600)
    ca_file: str | None = None  # the CA that issued cert_file, handed to installers


@dataclass(frozen=True)
class AuthoritativeConfig:
    pool_start: str | None = None
    pool_end: str | None = None
    netmask: str = "255.255.255.0"
    router: str | None = None
    dns: tuple[str, ...] = ()
    domain: str | None = None
    lease_seconds: int = 3600


@dataclass(frozen=True)
class DhcpConfig:
    mode: Literal["proxy", "authoritative", "off"] = "proxy"
    port: int = 67
    pxe_port: int = 4011
    uefi_option43: bool = False  # smee-style single offer for UEFI instead of the 4011 path
    ack_on_67: bool = False
    # Relays (giaddr) answered besides those on a served interface's own networks (and, in
    # authoritative mode, the pool's): the reply goes to giaddr:67, so any other giaddr made
    # netboot reflect offers toward any address (dnsmasq answers a relay only on a network
    # it has a dhcp-range for). IPv4 networks, e.g. ["198.51.100.0/24"].
    relay_networks: tuple[str, ...] = ()
    # Authoritative mode: ping an address before its first offer and offer another if a host
    # answers (dnsmasq's default, --no-ping to turn off; ISC dhcpd's ping-check).
    ping_check: bool = True
    # How long that ping's answer is waited for, in milliseconds (ISC dhcpd's ping-timeout-ms;
    # its ping-timeout is 1 s, dnsmasq's PING_WAIT 3 s): each new device's first offer waits
    # this long when nobody holds its address (up to three times where addresses answer).
    ping_timeout_ms: int = 1000
    authoritative: AuthoritativeConfig = field(default_factory=AuthoritativeConfig)


@dataclass(frozen=True)
class TftpConfig:
    enabled: bool = True
    port: int = 69
    # A pallet powered on at once is a thousand devices asking within a second, each a size
    # probe and a download (EDK2): 1,024 was reached by storm.py's 1,000 devices (RRQs
    # dropped for a retry a second later; size probe p99 1.25 s against dnsmasq's 0.1), at 256
    # a sixth of them failed. 4,096 is twice the --tftp-max the benchmark gives dnsmasq for
    # 1,000 devices (whose own default is 50; atftpd's --maxthread 100; tftpd-hpa forks a
    # process per transfer, unbounded). A slot costs only when used: measured with 1,100 held
    # (benchmarks/tftp_slots.py) a probe ~1.7 KiB and one descriptor, a download of a cached
    # file ~0.4 KiB and one, a streamed one (a file above 16 MiB, or written in the last 2 s)
    # 64 KiB (its read-ahead) and two. The open-files limit it needs is raised at start, or
    # this default lowered to fit, with a warning (service.raise_fd_limit).
    max_transfers: int = 4096
    # Devices behind one relay or NAT address share this; past it an RRQ gets ERROR 0 "busy".
    max_per_client: int = 64
    mtu: int = 1500
    # Microseconds a lone windowed transfer's next ACK is busy-waited for instead of the
    # event loop's sleep (servers/tftp.py, _Link._spin); 0 turns it off. A client slower
    # than the wait (a remote one) is waited for once per up to 64 windows.
    ack_spin_us: int = 100
    # true: every transfer answers from one data port per listener (the kernel's pick at
    # start; dnsmasq's --tftp-single-port), for a firewall that should pass one port. Its
    # price: a host that learnt the port can forge a victim's RRQ and ACKs and have the
    # whole file sent to it (~2,500x amplification, benchmarks/README.md s35-attack).
    # Default: a port the kernel picks per transfer (RFC 1350 §4).
    single_port: bool = False


@dataclass(frozen=True)
class DnsRateLimitConfig:
    """Response-rate limiting of the DNS server's UDP answers (netboot.rrl; BIND 9's
    ``rate-limit``). Each rate is per client network (/24, /56) and, for answers, per
    identical answer (name and type): a device asking its own name shares nothing with its
    neighbours behind the same NAT or relay. The default is above what any boot storm asks
    of one answer: issue 10's whole storm boots 100,000 machines in ~20 s (5,000 a second);
    were all of them behind one address, each asking the cluster's name once as it boots,
    that answer would be asked 5,000 times a second, half the default."""

    enabled: bool = True
    responses_per_second: int = 10_000  # per (client network, name and type)
    nodata_per_second: int = 10_000  # NODATA (the name, no such type), per (network, name)
    nxdomains_per_second: int = 10_000  # per (client network, zone): never per name
    errors_per_second: int = 10_000  # REFUSED, FORMERR, SERVFAIL, NOTIMP, per client network
    # Every answer to one client network, whatever its kind; past it, dropped (not slipped).
    # 0, BIND's default: a cap above a storm's worst (~5 names a device, 5,000 devices a
    # second behind one address) is above what one netboot answers at all (README).
    all_per_second: int = 0
    # Networks never limited (BIND's exempt-clients): the site's resolvers, monitoring.
    exempt_clients: tuple[str, ...] = ()
    window: int = 15  # seconds of debt a flood runs up: quiet that long, it is answered again
    slip: int = 1  # every Nth limited answer is sent empty with TC (0: all dropped)
    ipv4_prefix_length: int = 24
    ipv6_prefix_length: int = 56


@dataclass(frozen=True)
class DnsConfig:
    enabled: bool = False
    port: int = 53
    listen: str | None = None  # default: the advertised address (service._start_dns), never 0.0.0.0
    zone: str = "netboot.lan"
    upstreams: tuple[str, ...] = ()
    forward: bool = True
    # Whose queries for names outside the zone are forwarded, besides clients on this host's
    # own networks, dhcp.relay_networks and the authoritative pool's (BIND's allow-recursion
    # default is "localnets; localhost"): anyone else gets REFUSED (names in the zone answer).
    forward_networks: tuple[str, ...] = ()
    ttl: int = 60
    rate_limit: DnsRateLimitConfig = field(default_factory=DnsRateLimitConfig)


@dataclass(frozen=True)
class AssetsConfig:
    dirs: tuple[str, ...] = DEFAULT_ASSET_DIRS


@dataclass(frozen=True)
class TemplatesConfig:
    dir: str | None = None  # site overrides, searched before the shipped templates


@dataclass(frozen=True)
class DiscoveryConfig:
    policy: Literal["ignore", "hold", "auto"] = "ignore"
    hold_retry_seconds: int = 15
    rules: tuple[Group, ...] = ()  # for policy "auto": selectors → cluster/role/profile
    # Bounds on the records unknown devices cause (netboot.discovery): the oldest discovered
    # record is evicted beyond max_discovered; each source (relay, address, interface) adds at
    # most burst_per_source at once and rate_per_source a second after that; all sources
    # together at most burst_all_sources at once and rate_all_sources a second (a host that
    # takes many addresses of the VLAN is many sources).
    max_discovered: int = 10_000
    rate_per_source: int = 2
    burst_per_source: int = 20
    rate_all_sources: int = 20
    burst_all_sources: int = 200
    # Names of the rules with ``trust_firmware_strings: true`` (written in the rule, not here):
    # only they install a machine they match; the others hold it for approval.
    trusted_rules: tuple[str, ...] = ()


@dataclass(frozen=True)
class EnrollConfig:
    hostname_template: str = "node-{mac_suffix}"
    # Lifetime of an install token when the profile names no install_timeout: long enough for
    # an install and its first boot's registration, short enough that a token read off a
    # network or a console log is soon worth nothing.
    token_ttl_seconds: int = 3600
    # Progress reports (POST /api/v1/machines/<ref>/events) a machine may post at once, and a
    # second after that: an installer sends a few per install; a holder of one machine's
    # install token (it crossed plain HTTP in the config URL) wrote an event, an audit entry
    # and a dashboard line per report without bound until the token expired (s34-attack).
    # Beyond them a report is refused 429 with Retry-After, told once per run.
    report_burst: int = 60
    report_rate: int = 1
    # Profile of machines that neither name one nor are given one by a group; without it,
    # approving such a machine is refused (it would only be held). Checked at start-up.
    default_profile: str | None = None
    # A new managed cluster gets a k3s server CA made by netboot, written to its servers
    # before k3s first starts, and its nodes the secure join token K10<CA hash>::server:…
    # that makes them verify a server before they join it (README "What a host on the
    # provisioning network can take"). False: the short token, as before (a site whose
    # config templates do not write the CA).
    k3s_secure_token: bool = True
    # The first NICs of a machine enrolled without a MAC (by serial, UUID or asset tag) are
    # attached at its first boot but not given its install nor its fixed address until an
    # operator lists them (identity.UNLISTED), as every NIC a boot attaches: a UUID is
    # broadcast in option 97 and printed on manifests, a serial on labels, so any host on
    # the VLAN could send it before the machine's first boot. True trusts them as they
    # attach (a factory floor whose provisioning VLAN is closed, enrolling by serial).
    trust_first_nic: bool = False


@dataclass(frozen=True)
class InventoryConfig:
    backend: Literal["sqlite", "memory", "postgresql"] = "sqlite"
    path: str | None = None  # default <data_dir>/netboot.db
    # postgresql: a DSN (postgresql://user:password@host/db), or a file holding one, so that
    # the password can live apart from the config (mode 0600, a secret mount). Also
    # NETBOOT_INVENTORY_DSN. Never logged nor shown (repr=False; messages redact it).
    dsn: str | None = field(default=None, repr=False)
    dsn_file: str | None = None
    # postgresql: how each connection notices a server gone without a word (a pulled cable,
    # a failed-over VM): keepalives and TCP_USER_TIMEOUT, libpq's settings (dsn.PeerSettings:
    # a dead peer ends a connection in ~15 s); the server's statement_timeout and
    # idle_in_transaction_session_timeout on netboot's sessions.
    postgresql: pg_dsn.PeerSettings = field(default_factory=pg_dsn.PeerSettings)
    # Machine events (the timeline, `netboot explain`) older than this many days are dropped
    # (netboot.retention: hourly, in small batches); 0 keeps them forever. A year keeps a
    # machine's install and registration for its first year of service.
    events_keep_days: int = 365
    # Audit log entries kept, the newest (netboot.access); a count, not an age, so that a
    # flood of refused requests cannot grow it. An install writes 3: the default holds a
    # month of daily 1,000-device pallets; 1,100,000 holds a year of them (~130 MiB).
    audit_keep: int = 100_000


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    https: HttpsConfig = field(default_factory=HttpsConfig)
    dhcp: DhcpConfig = field(default_factory=DhcpConfig)
    tftp: TftpConfig = field(default_factory=TftpConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    assets: AssetsConfig = field(default_factory=AssetsConfig)
    templates: TemplatesConfig = field(default_factory=TemplatesConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    enroll: EnrollConfig = field(default_factory=EnrollConfig)
    inventory: InventoryConfig = field(default_factory=InventoryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # Where each value the operator set came from, by dotted key: (file, line), or (the
    # environment variable or flag, None). Filled by load(), not a key of the file; a value
    # absent here is an embedded default, which start-up may lower to fit (lowered()).
    origins: Mapping[str, tuple[str, int | None]] = field(
        default_factory=dict, repr=False, compare=False, metadata={"key": False})

    @property
    def data_dir(self) -> Path:
        return Path(self.server.data_dir)

    @property
    def db_path(self) -> Path:
        return Path(self.inventory.path) if self.inventory.path else self.data_dir / "netboot.db"

    @property
    def inventory_name(self) -> str:
        """How messages name the inventory: its file, or its DSN without the password."""
        if self.inventory.backend == "postgresql":
            return pg_dsn.redact(inventory_dsn(self))
        return "memory" if self.inventory.backend == "memory" else str(self.db_path)


def inventory_dsn(cfg: Config) -> str:
    """The PostgreSQL DSN, from ``inventory.dsn`` or the file ``inventory.dsn_file`` (checked
    by :func:`load`; read again here, so a rotated password file is picked up on restart)."""
    if cfg.inventory.dsn is not None:
        return cfg.inventory.dsn.strip()
    if cfg.inventory.dsn_file is None:
        raise ConfigError("no DSN", key="inventory.dsn",
                          fix="set inventory.dsn or inventory.dsn_file")
    try:
        return Path(cfg.inventory.dsn_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {cfg.inventory.dsn_file}: {exc}",
                          key="inventory.dsn_file") from exc


# CLI flag → dotted key; the flag names are what error messages suggest.
FLAGS: Mapping[str, str] = {
    "interface": "server.interfaces",
    "advertise": "server.advertise",
    "data_dir": "server.data_dir",
    "log_level": "server.log_level",
    "http_port": "http.port",
    "https_port": "https.port",
    "dhcp_port": "dhcp.port",
    "pxe_port": "dhcp.pxe_port",
    "dhcp_mode": "dhcp.mode",
    "tftp_port": "tftp.port",
    "dns_port": "dns.port",
    "discovery": "discovery.policy",
}


class _Source:
    """Where a raw value came from, for error messages."""

    def __init__(self, name: str, lines: Mapping[str, int] | None = None) -> None:
        self.name = name
        self.lines = lines or {}

    def error(self, key: str, message: str, fix: str | None = None, *,
              at: str | None = None) -> ConfigError:
        """``at``: the key whose line to name, where ``key`` is one that is missing (it has
        no line; the setting that needs it does)."""
        line = self.lines.get(at or key)
        return ConfigError(message, source=self.name, line=line, key=key, fix=fix)


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 numbers: YAML 1.1 reads an unquoted ``52:54:00:00:00:11``
    (a MAC in a selector) as a base-60 integer."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers
            if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(0|[1-9][0-9]*)$"),
                              list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"), list("-+.0123456789"))


def _yaml_with_lines(text: str, name: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML and remember the line of every mapping key, by dotted path."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(
            f"not valid YAML: {getattr(exc, 'problem', exc)}",
            source=name,
            line=line,
            fix="check indentation and quoting on that line",
        ) from exc
    lines: dict[str, int] = {}

    def walk(n: yaml.Node | None, path: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{path}.{k.value}" if path else str(k.value)
                if key in lines:
                    # PyYAML keeps the last of two equal keys without a word: a second
                    # 'http:' section would silently undo the first one's settings.
                    raise ConfigError(
                        f"given twice (first on line {lines[key]}); YAML keeps only the last",
                        source=name, line=k.start_mark.line + 1, key=key,
                        fix="merge the two into one")
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                key = f"{path}[{i}]"
                lines[key] = v.start_mark.line + 1
                walk(v, key)

    walk(node, "")
    data = yaml.load(text, Loader=_Loader) if node is not None else None  # noqa: S506
    return data, lines


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def _coerce(tp: Any, value: Any, key: str, src: _Source) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key, src)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise src.error(
                key,
                f"{value!r} is not one of {', '.join(map(str, choices))}",
                fix=f"write one of: {', '.join(map(str, choices))}",
            )
        return value
    if origin is tuple:
        (item,) = get_args(tp)[:1]
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, list):
            raise src.error(key, f"expected a list, got {type(value).__name__}", "write [a, b]")
        return tuple(_coerce(item, v, f"{key}[{i}]", src) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false",
                                                         "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise src.error(key, f"expected true or false, got {value!r}", "write true or false")
    if tp is int:
        if isinstance(value, bool):
            raise src.error(key, f"expected a number, got {value!r}", "write a whole number")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise src.error(
                key, f"expected a number, got {value!r}", "write a whole number"
            ) from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise src.error(key, f"expected text, got a {type(value).__name__}", "write a string")
        return str(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, src)
    raise src.error(key, f"unsupported type {tp!r}")  # a bug in this module's schema


def _keys(cls: Any) -> list[str]:
    """The keys a section has in a file (Config.origins is not one)."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("key", True)]


def _build(cls: Any, raw: Any, path: str, src: _Source) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise src.error(path or "(top level)", f"expected a mapping, got {type(raw).__name__}",
                        "write key: value pairs")
    hints = typing.get_type_hints(cls)
    names = _keys(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            # Imported for a misspelt key only: a serve that started has no use for difflib
            # (benchmarks/README.md, issue 10, session 15).
            import difflib

            close = difflib.get_close_matches(str(key), names, n=1)
            fix = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(names)}"
            raise src.error(dotted, "unknown key", fix)
        if cls is DiscoveryConfig and key == "rules":
            kwargs[key], kwargs["trusted_rules"] = _rules(value, dotted, src)
        elif cls is DiscoveryConfig and key == "trusted_rules":
            raise src.error(dotted, "unknown key",
                            "write trust_firmware_strings: true in the rule itself")
        else:
            kwargs[key] = _coerce(hints[key], value, dotted, src)
    return cls(**kwargs)


_RULE_FIX = ("write a rule as - {selector: {product: X}, cluster: line-3, role: agent}; its "
             "keys: name, selector, profile, cluster, role (server or agent), labels, taints, "
             "hostname_template, trust_firmware_strings")


def _rules(value: Any, key: str, src: _Source) -> tuple[tuple[Group, ...], tuple[str, ...]]:
    """The auto-enroll rules, and the names of those trusted to install on what they match.

    Everything a rule can select on (product, serial, UUID, even the MAC) comes from the
    request, which any host on the provisioning network can write: ``trust_firmware_strings``
    is the operator saying that, on this network, it is good enough to hand out a join token.
    """
    if not isinstance(value, list):
        raise src.error(key, "expected a list of rules", "write - {selector: {...}, cluster: x}")
    out: list[Group] = []
    trusted: list[str] = []
    for i, item in enumerate(value):
        k = f"{key}[{i}]"
        if not isinstance(item, Mapping):
            raise src.error(k, "expected a mapping", "write selector/cluster/role/profile keys")
        fields = dict(item)
        trust = fields.pop("trust_firmware_strings", False)
        if not isinstance(trust, bool):
            raise src.error(f"{k}.trust_firmware_strings", f"{trust!r} is not true or false",
                            "write trust_firmware_strings: true to let this rule install what "
                            "it matches, or leave it out to hold those machines for approval")
        try:
            rule = group_from_mapping(fields, default_name=f"rule-{i}")
        except ValidationError as exc:
            # With the fix the other errors of a config file carry: the rule's keys, whose
            # list in an "unknown key" message lacks trust_firmware_strings (taken out above).
            raise src.error(f"{k}.{exc.field}", exc.message, _RULE_FIX) from exc
        if any(r.name == rule.name for r in out):
            # Events and trust name a rule: two of one name would be told apart by neither.
            raise src.error(f"{k}.name", f"a second rule named {rule.name!r}",
                            "give each rule its own name")
        out.append(rule)
        if trust:
            trusted.append(rule.name)
    return tuple(out), tuple(trusted)


def group_from_mapping(item: Mapping[str, Any], *, default_name: str) -> Group:
    """A group/rule from plain data (config file rules); the API uses the inventory codec."""
    allowed = {"name", "selector", "profile", "cluster", "role", "labels", "taints",
               "hostname_template"}
    for key in item:
        if key not in allowed:
            raise ValidationError(str(key), f"unknown key (known: {', '.join(sorted(allowed))})")
    sel_raw = item.get("selector") or {}
    if not isinstance(sel_raw, Mapping):
        raise ValidationError("selector", "expected a mapping of label: value or [values]")
    selector = {
        str(k): tuple(str(x) for x in (v if isinstance(v, list) else [v]))
        for k, v in sel_raw.items()
    }
    role = item.get("role")
    if role is not None and role not in ("server", "agent"):
        raise ValidationError("role", f"{role!r} is not server or agent")
    return Group(
        name=str(item.get("name") or default_name),
        selector=selector,
        profile=item.get("profile"),
        cluster=item.get("cluster"),
        role=Role(role) if role else None,
        labels={str(k): str(v) for k, v in (item.get("labels") or {}).items()},
        taints=tuple(item.get("taints") or ()),
        hostname_template=item.get("hostname_template"),
    )


def _env_overrides(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``NETBOOT_HTTP_PORT=8081`` → {"http": {"port": "8081"}}; returns data and key→var.
    A section's own section is a level more: ``NETBOOT_INVENTORY_POSTGRESQL_CHECK_TIMEOUT=5``
    → {"inventory": {"postgresql": {"check_timeout": "5"}}} (key inventory.postgresql.
    check_timeout), as ``NETBOOT_DHCP_AUTHORITATIVE_POOL_START``."""
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    hints = typing.get_type_hints(Config)
    sections = set(_keys(Config))
    for var, value in env.items():
        if not var.startswith("NETBOOT_") or var in ("NETBOOT_CONFIG", "NETBOOT_E2E"):
            continue
        rest = var[len("NETBOOT_"):].lower()
        section, _, key = rest.partition("_")
        if section not in sections or not key:
            continue
        inner = typing.get_type_hints(hints[section])
        nested = next((name for name in _keys(hints[section])
                       if dataclasses.is_dataclass(inner[name]) and key.startswith(f"{name}_")
                       and len(key) > len(name) + 1), None)
        if nested is None:
            out.setdefault(section, {})[key] = value
            origin[f"{section}.{key}"] = var
        else:
            sub = key[len(nested) + 1:]
            out.setdefault(section, {}).setdefault(nested, {})[sub] = value
            origin[f"{section}.{nested}.{sub}"] = var
    return out, origin


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *path, key = dotted.split(".")
    for part in path:
        data = data.setdefault(part, {})
    data[key] = value


def _dotted(data: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


def _utf8(blob: bytes, name: str) -> str:
    """The config file's text; a file in another encoding (an editor's UTF-16, a Latin-1
    comment) is a ConfigError naming its line, not a UnicodeDecodeError's traceback."""
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        utf16 = blob[:2] in (b"\xff\xfe", b"\xfe\xff")
        raise ConfigError(
            "is UTF-16 (its byte-order mark), not UTF-8" if utf16 else
            f"byte 0x{blob[exc.start]:02x} is not UTF-8", source=name,
            line=blob.count(b"\n", 0, exc.start) + 1,
            fix="save the file as UTF-8 (iconv -t UTF-8)") from None


def load(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Build the Config; raises ConfigError naming file/line/key and the fix."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    name = "defaults"
    if path is not None:
        name = str(path)
        try:
            blob = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", source=name,
                              fix="check the path given to --config") from exc
        raw, lines = _yaml_with_lines(_utf8(blob, name), name)
        if raw is not None and not isinstance(raw, Mapping):
            raise ConfigError("expected a mapping at the top level", source=name, line=1,
                              fix="start with sections such as 'http:' or 'dhcp:'")
        data = dict(raw or {})
    # Validate each layer on its own so that the error names the layer that is wrong.
    file_cfg = _build(Config, data, "", _Source(name, lines))
    env_data, env_origin = _env_overrides(env)
    for dotted, var in env_origin.items():
        probe: dict[str, Any] = {}
        _set_dotted(probe, dotted, _dotted(env_data, dotted))
        _build(Config, probe, "", _Source(f"environment variable {var}"))
    flag_data: dict[str, Any] = {}
    for flag, value in (flags or {}).items():
        if value is None or flag not in FLAGS:
            continue
        _set_dotted(flag_data, FLAGS[flag], value)
        probe = {}
        _set_dotted(probe, FLAGS[flag], value)
        _build(Config, probe, "", _Source("--" + flag.replace("_", "-")))
    merged = _merge(_merge(data, env_data), flag_data)
    cfg: Config = _build(Config, merged, "", _Source(name, lines))
    _check(cfg if (env_data or flag_data) else file_cfg, _Source(name, lines))
    _check_inventory(cfg, _Source(name, lines), env_origin)
    origins: dict[str, tuple[str, int | None]] = {key: (name, line)
                                                  for key, line in lines.items()}
    origins.update((key, (f"environment variable {var}", None))
                   for key, var in env_origin.items())
    origins.update((key, ("--" + flag.replace("_", "-"), None))
                   for flag, key in FLAGS.items() if (flags or {}).get(flag) is not None)
    return dataclasses.replace(cfg, origins=origins)


def located(cfg: Config, error: ConfigError) -> ConfigError:
    """``error`` naming where its key was set (file and line, variable or flag), when the
    check that raised it knew only the key: what start-up finds (a port in use, a TLS file,
    an interface, a profile) is about a value the operator set, who must find it to fix it."""
    origin = cfg.origins.get(error.key) if error.key and error.source is None else None
    if origin is None:
        return error
    return ConfigError(error.message, source=origin[0], line=origin[1], key=error.key,
                       fix=error.fix)


def setting(cfg: Config, key: str) -> Any:
    """The value of the dotted ``key`` (``"tftp.max_transfers"``) in ``cfg``."""
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def lowered(cfg: Config, limits: Mapping[str, int], *, why: str, fix: str) -> Config:
    """``cfg`` with each int setting in ``limits`` (dotted key: most it may be) at most that.

    What the host cannot give (the open-files limit, service.raise_fd_limit) lowers an
    embedded default, as dnsmasq restricts its --tftp-max to its descriptors and nginx runs
    with worker_connections above them, with a warning; the caller logs it. A value the
    operator set (file, environment, flag: ``origins``) is what they asked for and cannot
    be given: ConfigError naming where it was set, ``why`` and ``fix``."""
    sections: dict[str, dict[str, int]] = {}
    for key, most in limits.items():
        if setting(cfg, key) <= most:
            continue
        origin = cfg.origins.get(key)
        if origin is not None:
            raise ConfigError(why, source=origin[0], line=origin[1], key=key, fix=fix)
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = most
    return dataclasses.replace(cfg, **{
        section: dataclasses.replace(getattr(cfg, section), **values)
        for section, values in sections.items()})


def _check_inventory(cfg: Config, src: _Source, env_origin: Mapping[str, str]) -> None:
    """The store choice; a DSN's value is never repeated in a message (it may hold a
    password): the message says what is wrong with it and where it came from."""
    inv = cfg.inventory

    def source(key: str) -> _Source:
        var = env_origin.get(key)
        return _Source(f"environment variable {var}") if var else src

    wrong = inv.postgresql.problem()
    if wrong is not None:
        key = f"inventory.postgresql.{wrong[0]}"
        raise source(key).error(key, wrong[1], "write a whole number in those bounds (see "
                                "README, 'When the database stops answering')")
    if inv.backend != "postgresql":
        for key, value in (("inventory.dsn", inv.dsn), ("inventory.dsn_file", inv.dsn_file)):
            if value is not None:
                raise source(key).error(key, f"is set, but inventory.backend is {inv.backend}",
                                        "set inventory.backend: postgresql, or remove it")
        return
    if inv.path is not None:
        raise source("inventory.path").error(
            "inventory.path", "is a SQLite file, but inventory.backend is postgresql",
            "remove inventory.path, or set inventory.backend: sqlite")
    if inv.dsn is not None and inv.dsn_file is not None:
        raise source("inventory.dsn_file").error(
            "inventory.dsn_file", "is set together with inventory.dsn",
            "keep one of the two (the file keeps the password out of the config)")
    fix = "write postgresql://USER:PASSWORD@HOST:5432/DATABASE"
    if inv.dsn is not None:
        trouble = pg_dsn.problem(inv.dsn)
        if trouble is not None:
            raise source("inventory.dsn").error("inventory.dsn", f"the DSN {trouble}", fix)
        return
    if inv.dsn_file is None:
        raise source("inventory.backend").error(
            "inventory.backend", "postgresql needs a database to connect to",
            "set inventory.dsn: postgresql://USER@HOST/DATABASE, inventory.dsn_file, or "
            "NETBOOT_INVENTORY_DSN")
    key = "inventory.dsn_file"
    try:
        text = Path(inv.dsn_file).read_text(encoding="utf-8")
    except OSError as exc:
        raise source(key).error(key, f"cannot read {inv.dsn_file}: {exc.strerror}",
                                "give the path of a file holding the DSN, readable by "
                                "netboot") from exc
    except UnicodeDecodeError as exc:
        raise source(key).error(key, f"{inv.dsn_file} is not UTF-8 text", fix) from exc
    trouble = pg_dsn.problem(text) if text.strip() else "is empty"
    if trouble is not None:
        raise source(key).error(key, f"the DSN in {inv.dsn_file} {trouble}", fix)


def _check(cfg: Config, src: _Source) -> None:
    """Cross-field checks that a single value's type cannot express."""
    for key, port in (("http.port", cfg.http.port), ("https.port", cfg.https.port),
                      ("dhcp.port", cfg.dhcp.port),
                      ("dhcp.pxe_port", cfg.dhcp.pxe_port), ("tftp.port", cfg.tftp.port),
                      ("dns.port", cfg.dns.port)):
        if not 0 <= port <= 65535:
            raise src.error(key, f"port {port} is out of range", "use 1-65535 (0 = any free port)")
    for key, addr in (("server.advertise", cfg.server.advertise),
                      ("dhcp.authoritative.pool_start", cfg.dhcp.authoritative.pool_start),
                      ("dhcp.authoritative.pool_end", cfg.dhcp.authoritative.pool_end),
                      ("dhcp.authoritative.router", cfg.dhcp.authoritative.router)):
        if addr is not None:
            try:
                ipaddress.IPv4Address(addr)
            except ValueError:
                raise src.error(
                    key, f"{addr!r} is not an IPv4 address", "write e.g. 192.0.2.10"
                ) from None
    networks: tuple[tuple[str, tuple[str, ...], Any, str, str], ...] = (
        ("dhcp.relay_networks", cfg.dhcp.relay_networks, ipaddress.IPv4Network,
         "an IPv4 network", "198.51.100.0/24"),
        ("dns.forward_networks", cfg.dns.forward_networks, ipaddress.ip_network,
         "an IP network", "198.51.100.0/24 or 2001:db8::/64"))
    for key, texts, parse, what, example in networks:
        for text in texts:
            try:
                parse(text, strict=False)
            except ValueError:
                raise src.error(key, f"{text!r} is not {what}", f"write e.g. {example}") from None
    auth = cfg.dhcp.authoritative
    if cfg.dhcp.mode == "authoritative":
        if not auth.pool_start or not auth.pool_end:
            # Without its section the pool has no line: the mode's, that asks for it.
            raise src.error("dhcp.authoritative", "authoritative mode needs an address pool",
                            "set dhcp.authoritative.pool_start and pool_end",
                            at=None if "dhcp.authoritative" in src.lines else "dhcp.mode")
        if ipaddress.IPv4Address(auth.pool_start) > ipaddress.IPv4Address(auth.pool_end):
            raise src.error("dhcp.authoritative.pool_end", "pool_end is before pool_start",
                            "swap the two addresses")
    # A host on the link answers within milliseconds once ARP resolves it (the kernel's
    # first ARP request is answered at once by a host that is there); past ~2 s iPXE has
    # sent its DISCOVER again and a firmware's whole DHCP phase may end before the offer.
    if not 10 <= cfg.dhcp.ping_timeout_ms <= 5000:
        raise src.error("dhcp.ping_timeout_ms", f"{cfg.dhcp.ping_timeout_ms} is outside "
                        "10-5000", "write milliseconds, e.g. 1000 (ISC dhcpd's ping-timeout); "
                        "more than 2000 delays every new device's first offer past iPXE's "
                        "first retry")
    if cfg.discovery.policy == "auto" and not cfg.discovery.rules:
        raise src.error("discovery.rules", "policy 'auto' needs at least one rule",
                        "add rules: - {selector: {product: X}, cluster: line-3, role: agent}",
                        at="discovery.policy")
    _check_limits(cfg, src)
    _check_dns_rate_limit(cfg.dns.rate_limit, src)
    _check_peers(cfg.server.peers, src, cfg.http.public_url
                 or (f"http://{cfg.server.advertise}" if cfg.server.advertise else None))
    if cfg.http.public_url and not cfg.http.public_url.startswith(("http://", "https://")):
        raise src.error("http.public_url", "must start with http:// or https://",
                        "write e.g. http://boot.example:8080, or leave it unset")
    if cfg.https.public_url and not cfg.https.public_url.startswith("https://"):
        raise src.error("https.public_url", "must start with https://",
                        "write e.g. https://boot.example:8443, or leave it unset")
    if (cfg.https.key_file or cfg.https.ca_file) and not cfg.https.cert_file:
        given = "https.key_file" if cfg.https.key_file else "https.ca_file"
        raise src.error("https.cert_file", f"not set, and {given} is given without a "
                        "certificate", "set https.cert_file too, or remove "
                        "https.key_file/ca_file to use netboot's own CA", at=given)
    if cfg.https.cert_file and not cfg.https.key_file:
        raise src.error("https.key_file", "not set, and https.cert_file is given without its "
                        "key", "set https.key_file to the PEM private key of https.cert_file",
                        at="https.cert_file")
    if cfg.http.plain_api == "refuse" and not cfg.https.enabled:
        raise src.error("http.plain_api", "'refuse' with https.enabled false leaves no way to "
                        "reach the API or the dashboard",
                        "enable https, or write loopback (this host only) or allow")
    if (cfg.https.enabled and cfg.https.port == cfg.http.port and cfg.http.port != 0
            and (cfg.https.listen or cfg.http.listen) == cfg.http.listen):
        raise src.error("https.port", f"port {cfg.https.port} is also http.port",
                        "use another port for HTTPS (default 8443)")


def _check_peers(peers: tuple[str, ...], src: _Source, own: str | None) -> None:
    """server.peers: base URLs a device's shell puts in its register command's POSTs and its
    install script chains. ``own``: this server's base URL where the config names it."""
    for url in peers:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (raises on a port out of range or not a number)
        except ValueError:
            parts = None
        if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
                or parts.path.strip("/") or parts.query or parts.fragment
                or parts.username is not None or any(c in url for c in " '\"\\$`")):
            raise src.error("server.peers", f"{url!r} is not a server's base URL",
                            "write each as http://HOST:PORT (another netboot server's "
                            "http.public_url, or http://its-advertised-address:8080)")
        # Devices are given these URLs: one naming the loopback (or no host) has each try
        # itself, unless this server is on the loopback too (servers and clients on one host,
        # as a test runs them); the record leaves them out alike (inventory.peers.offered).
        named = parse_ip(parts.hostname)
        if (named is not None and named.is_unspecified) or (
                loopback_url(url) and not (own and loopback_url(own))):
            raise src.error("server.peers", f"{url!r} names no host a device can reach (each "
                            "device would try itself)",
                            "write the other server's provisioning address, http://HOST:PORT "
                            "(its server.advertise or http.public_url)")


def _check_dns_rate_limit(rrl: DnsRateLimitConfig, src: _Source) -> None:
    """dns.rate_limit's bounds: BIND's (window 1-3600, slip 0-10), rates a whole number."""
    for name, value, low, high, fix in (
        ("responses_per_second", rrl.responses_per_second, 0, 10**9,
         "answers a second per client network and answer, e.g. 10000 (0: not limited)"),
        ("nxdomains_per_second", rrl.nxdomains_per_second, 0, 10**9,
         "NXDOMAIN answers a second per client network, e.g. 10000 (0: not limited)"),
        ("errors_per_second", rrl.errors_per_second, 0, 10**9,
         "error answers a second per client network, e.g. 10000 (0: not limited)"),
        ("nodata_per_second", rrl.nodata_per_second, 0, 10**9,
         "NODATA answers a second per client network and name, e.g. 10000 (0: not limited)"),
        ("all_per_second", rrl.all_per_second, 0, 10**9,
         "answers of every kind a second per client network, e.g. 50000 (0: not limited)"),
        ("window", rrl.window, 1, 3600, "seconds, e.g. 15 (BIND's default)"),
        ("slip", rrl.slip, 0, 10, "e.g. 1 (each limited answer sent empty with TC), "
         "2 (every second one), 0 (all dropped)"),
        ("ipv4_prefix_length", rrl.ipv4_prefix_length, 0, 32, "e.g. 24"),
        ("ipv6_prefix_length", rrl.ipv6_prefix_length, 0, 128, "e.g. 56"),
    ):
        if not low <= value <= high:
            raise src.error(f"dns.rate_limit.{name}", f"{value} is outside {low}-{high}",
                            f"write {fix}")
    for text in rrl.exempt_clients:
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise src.error("dns.rate_limit.exempt_clients", f"{text!r} is not an IP network",
                            "write e.g. 192.0.2.53, 198.51.100.0/24 or 2001:db8::/56") from None


def _check_limits(cfg: Config, src: _Source) -> None:
    """Resource bounds: each at least 1, and a per-source cap that fits in the overall one."""
    http, tftp = cfg.http, cfg.tftp
    for key, value, fix in (
        ("http.max_connections", http.max_connections,
         "e.g. 4096 (nginx's worker_connections is 512-1024)"),
        ("http.max_connections_per_source", http.max_connections_per_source, "e.g. 128"),
        ("http.header_timeout", http.header_timeout, "seconds; nginx uses 60"),
        ("http.body_timeout", http.body_timeout, "seconds; nginx uses 60"),
        ("http.keepalive_timeout", http.keepalive_timeout, "seconds; nginx uses 75"),
        ("http.send_timeout", http.send_timeout, "seconds; nginx uses 60"),
        ("tftp.max_transfers", tftp.max_transfers, "e.g. 4096"),
        ("tftp.max_per_client", tftp.max_per_client, "e.g. 64"),
        ("discovery.max_discovered", cfg.discovery.max_discovered, "e.g. 10000"),
        ("discovery.burst_per_source", cfg.discovery.burst_per_source, "e.g. 20"),
        ("discovery.rate_per_source", cfg.discovery.rate_per_source, "records a second, e.g. 2"),
        ("discovery.burst_all_sources", cfg.discovery.burst_all_sources, "e.g. 200"),
        ("discovery.rate_all_sources", cfg.discovery.rate_all_sources,
         "records a second, e.g. 20"),
        ("enroll.report_burst", cfg.enroll.report_burst, "e.g. 60"),
        ("enroll.report_rate", cfg.enroll.report_rate, "reports a second, e.g. 1"),
        ("inventory.audit_keep", cfg.inventory.audit_keep, "entries, e.g. 100000"),
    ):
        if value < 1:
            raise src.error(key, f"{value} is below 1", f"write a whole number >= 1 ({fix})")
    if not 0 <= http.send_threads <= 64:
        raise src.error("http.send_threads", f"{http.send_threads} is not 0-64",
                        "write e.g. 2 (one a CPU), or 0 to send on the event loop's thread")
    if cfg.inventory.events_keep_days < 0:
        raise src.error("inventory.events_keep_days", f"{cfg.inventory.events_keep_days} is "
                        "below 0", "write days, e.g. 365 (0 keeps events forever)")
    if http.max_connections_per_source > http.max_connections:
        raise src.error("http.max_connections_per_source",
                        f"{http.max_connections_per_source} is above http.max_connections "
                        f"({http.max_connections})",
                        "lower it, or raise http.max_connections")
    # The wait holds the event loop (HTTP, DHCP) for its length per window: a millisecond
    # at most, ten times the ~100 us a client on the same host answers in.
    if not 0 <= tftp.ack_spin_us <= 1000:
        raise src.error("tftp.ack_spin_us", f"{tftp.ack_spin_us} is outside 0-1000",
                        "write microseconds, e.g. 100 (0 turns the busy-wait off)")
    if tftp.max_per_client > tftp.max_transfers:
        raise src.error("tftp.max_per_client",
                        f"{tftp.max_per_client} is above tftp.max_transfers "
                        f"({tftp.max_transfers})", "lower it, or raise tftp.max_transfers")
