"""The one wiring point: build everything from a Config, run all servers on one loop, stop cleanly.

Only this module (and ``cli.py``) names concrete classes; everything else receives its
collaborators through narrow protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import json
import logging
import os
import signal
import socket
import ssl
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from netboot.access import SESSION_COOKIE, TOKEN_PREFIX, Access
from netboot.boot import BootService, BootSettings, loader_aliases
from netboot.cacerts import deferred_system_cas
from netboot.config import Config, inventory_dsn, located
from netboot.content import PER_MACHINE, STABLE, Content, Trust
from netboot.core import OLDER_LOOK_SECONDS, Core, OlderRegistrations
from netboot.discovery import DiscoveryLimits
from netboot.enroll import Enroller
from netboot.errors import ConfigError, StoreError, UnreadableRow
from netboot.events import EventBus
from netboot.files import FileTree
from netboot.health import ClockSkew
from netboot.inventory.base import (
    EventListener,
    MachineFilter,
    ServerClock,
    Store,
    cannot_tell,
    release_held_caches,
    stuck_writes,
)
from netboot.inventory.dsn import INSTALL_ASYNCPG
from netboot.inventory.peers import Peers
from netboot.inventory.view import return_freed_memory
from netboot.logs import RateLimitedLog
from netboot.metrics import Metrics
from netboot.model import Machine, MachineState, Scope, parse_ip, reached_url
from netboot.pki import Authority, Tls, operator_files, server_names
from netboot.render import Renderer
from netboot.sealing import Sealer, read_key, write_key
from netboot.servers.http import (
    AccessLogger,
    ConnectionGuard,
    DeviceRoutes,
    Doorway,
    FrontDoor,
    HttpLimits,
    PlainHttp,
    RequestIds,
    listen,
)
from netboot.servers.sendthreads import SendThreads
from netboot.servers.sockets import bind_error
from netboot.shipped import shipped_root, templates_dir
from netboot.standing import (
    SERVED_REFS,
    Notice,
    Standing,
    clock_behind,
    every_interface,
    look_at_names,
    newest,
    older_notice,
)

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)


SECRET_KEY_FILE = "secret.key"
# What netboot's own certificate names besides the configured names and addresses.
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
# How often a server asks the inventory what changed: its view of the boot path follows other
# servers' writes at once anyway (every boot request syncs), this notices an outage and its
# end without traffic, writes the boot events queued meanwhile, and relays other servers'
# events to this server's live streams.
WATCH_SECONDS = 0.5
# How often a shared database's clock is compared with this host's (health.ClockSkew): a
# clock drifts over hours, or jumps when NTP first sets it; one statement each time.
CLOCK_CHECK_SECONDS = 300.0
# The id of the key that sealed this inventory's secrets: a different key file is refused at
# start rather than discovered at the first config request.
SEAL_KEY_SETTING = "secrets-key-id"
# netboot's own CA, shared by every server of one inventory: {"cert": PEM, "key": PEM}, the
# key encrypted as tls/ca.key is (with a passphrase derived from secret.key, which they share).
CA_SETTING = "tls-ca"


def open_store(config: Config, sealer: Sealer | None = None,
               listener: EventListener | None = None) -> Store:
    """The configured store; ``listener`` (the live event bus) is told of committed events."""
    if config.inventory.backend == "memory":
        from netboot.inventory.memory import MemoryStore

        return MemoryStore(listener=listener)
    if config.inventory.backend == "postgresql":
        try:
            from netboot.inventory.postgres import PostgresStore
        except ImportError as exc:
            raise ConfigError("postgresql needs the asyncpg driver, which is not installed",
                              key="inventory.backend",
                              fix=INSTALL_ASYNCPG) from exc
        return PostgresStore(inventory_dsn(config), sealer=sealer, listener=listener,
                             peer=config.inventory.postgresql)
    from netboot.inventory.sqlite import SqliteStore

    try:
        config.db_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        key = "inventory.path" if config.inventory.path else "server.data_dir"
        raise ConfigError(f"cannot create {config.db_path.parent}: {exc.strerror}", key=key,
                          fix="create it, or point --data-dir at a writable directory") from exc
    private_database(config.db_path)
    return SqliteStore(config.db_path, sealer=sealer, listener=listener)


def secure_data_dir(path: Path) -> None:
    """The data dir holds the inventory, the secrets key, the CA key and the admin token:
    0700, tightened if netboot owns it and it is looser (a package's 0755 /var/lib dir)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}", key="server.data_dir",
                          fix="create it, or point --data-dir at a writable directory") from exc
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        try:
            if st.st_uid != os.geteuid():
                raise PermissionError("owned by another user")
            os.chmod(path, 0o700)
            log.warning("data dir %s was mode %04o; now 0700 (it holds keys and secrets)",
                        path, mode)
        except OSError:
            log.warning("data dir %s is mode %04o (owner uid %d) and netboot cannot change "
                        "it: other users may read the inventory; chmod 0700 it", path, mode,
                        st.st_uid)


def private_database(path: Path) -> None:
    """Create the database file 0600 before SQLite does: SQLite gives its -wal and -shm files
    the database file's mode, so this one mode covers all three (an empty file is an empty
    database to SQLite). Files of an older netboot (0644) are tightened. A file that cannot
    be created is left to the store, which names the cause (a read-only file system)."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(p.stat().st_mode) & 0o077:
                try:
                    os.chmod(p, 0o600)
                except OSError as exc:
                    log.warning("%s is readable by others and cannot be made 0600: %s", p,
                                exc.strerror)


async def open_inventory(config: Config, listener: EventListener | None = None,
                         *, another_made_it: bool = False) -> tuple[Store, Sealer]:
    """The inventory, open, with its secrets key (made on first start) checked against it.

    The key must be the one that sealed the inventory's join tokens: a missing or different
    key file is a start-up error that names the file and the fix, never garbage tokens. The
    tokens of an inventory written before sealing existed are sealed once the key is in its
    file and claimed as the inventory's, never before: sealed as the store opened, a kill
    between that commit and the key's write (or a write that failed) left them sealed with a
    key no file held, and the next start made another; of two servers starting with new
    keys, the one that lost the claim had sealed them with its own (s45-integrity).
    ``another_made_it``: the call again after another process made the key file between
    this one's read and write (it is read now, once).
    """
    secure_data_dir(config.data_dir)
    key_path = config.data_dir / SECRET_KEY_FILE
    sealer = read_key(key_path)
    new_key = sealer is None
    if sealer is None:
        if another_made_it:
            # Said to exist at the write, and not there at the read: a symbolic link to a
            # file that is not there (a secrets mount not yet mounted). Called again, this
            # went round without end (RecursionError), the store opened at each turn.
            raise ConfigError(f"the secrets key {key_path} exists but cannot be read (a "
                              "symbolic link to a missing file?)", key="server.data_dir",
                              fix=f"make {key_path} the key file itself, or mount what its "
                                  "link names before netboot starts")
        sealer = Sealer.generate()
    store = open_store(config, sealer, listener)
    try:
        await store.open()
    except StoreError as exc:
        if config.inventory.backend != "sqlite" or isinstance(exc, UnreadableRow):
            raise  # UnreadableRow: the data's to put right, named with its fix, not a setting
        # The file cannot be opened (its directory unwritable or read-only, not a database):
        # a setting to fix, named with the file and line it was set on (config.located);
        # the reason says how (inventory.sqlite._unopenable).
        raise ConfigError(str(exc), key="inventory.path" if config.inventory.path
                          else "server.data_dir") from exc
    try:
        fix = (f"restore {key_path} from a backup of {config.data_dir}; the join tokens "
               "cannot be read without it (else move the inventory away and enroll again)")
        if config.inventory.backend == "postgresql":
            # Several servers share the database: each needs the one key that sealed it.
            fix = (f"copy {SECRET_KEY_FILE} from the data dir of a netboot server already "
                   f"using this database to {key_path} (mode 0600)")
        if new_key:
            recorded = await store.get_setting(SEAL_KEY_SETTING)
            if recorded is not None:
                raise ConfigError(f"the secrets key {key_path} is missing, and the inventory "
                                  f"{config.inventory_name} holds join tokens sealed with key "
                                  f"{recorded}", key="server.data_dir", fix=fix)
            try:
                write_key(key_path, sealer)
            except FileExistsError:
                # Another netboot process (a CLI command) made it a moment ago: use that one.
                await store.close()
                return await open_inventory(config, listener, another_made_it=True)
            log.warning("created the secrets key %s: back it up, apart from the inventory; "
                        "without it the join tokens in the inventory cannot be read", key_path)
        # Claimed, not just read and written: of two servers starting together on a new
        # shared database, one key wins, and the other is told to copy it.
        recorded = await store.claim_setting(SEAL_KEY_SETTING, sealer.key_id)
        if recorded != sealer.key_id:
            raise ConfigError(f"{key_path} is key {sealer.key_id}, but the inventory "
                              f"{config.inventory_name} was sealed with key {recorded}",
                              key="server.data_dir", fix=fix)
        # From now on this key is the inventory's, in its file: clear tokens sealed with it.
        await store.seal_clear_tokens()
    except BaseException:
        await store.close()
        raise
    return store, sealer


def prepare_tls(config: Config, advertise: str, sealer: Sealer,
                addresses: Sequence[str] | None = None) -> Tls | None:
    """The HTTPS certificate: the operator's files, checked, or netboot's own CA's (made on
    first start, re-issued when it no longer names the advertised address). ``addresses``:
    the interfaces' addresses devices reach this host at, as the watcher has them now
    (Service._follow_tls); None: reached_at's, read now."""
    https = config.https
    if not https.enabled:
        return None
    if https.cert_file:
        return operator_files(https.cert_file, https.key_file, https.ca_file)
    # This host's own names too: the CLI (netboot events --follow) and scripts on the server
    # reach the API at https://127.0.0.1:8443, the only place plain HTTP would also answer.
    if addresses is None:
        addresses = [address for _, address in reached_at(config, advertise)] \
            or named_addresses(config)
    names = server_names(advertise, config.http.public_url, (
        *([h] if (h := _url_host(https.public_url)) else []), *https.names,
        *LOCAL_NAMES, *addresses))
    authority = Authority(config.data_dir / "tls", sealer.derive("ca key passphrase"))
    return authority.server_certificate(names)


async def share_ca(config: Config, store: Store, sealer: Sealer) -> None:
    """Servers of one inventory have one CA (s39-multi). Each made its own, so a device or
    client that trusts one server's (an iPXE built with it, an installed system given it by
    its config, an operator's CURL_CA_BUNDLE) failed to verify another behind the same name
    (an active-active pair's address). The first server's CA is claimed in the inventory; a
    server without a CA of its own takes it (its first start: nothing trusts one of its own
    yet), one that made its own just now and lost the claim to another server starting
    together too; one that had its own before (a pair set up earlier) is told how to share.
    Before :func:`prepare_tls`, which issues the server certificate from the CA on disk."""
    if not config.https.enabled or config.https.cert_file:
        return
    authority = Authority(config.data_dir / "tls", sealer.derive("ca key passphrase"))
    mine = authority.files()
    if mine is None and (authority.cert_path.exists() or authority.private_file.exists()):
        return  # half a CA: never written over (its key lost); prepare_tls says so, with a fix
    recorded = await store.get_setting(CA_SETTING)
    made = mine is None
    if mine is None:
        if recorded is not None:
            theirs = json.loads(recorded)
            authority.adopt(theirs["cert"].encode(), theirs["key"].encode())
            log.info("took the inventory's certificate authority into %s, as every netboot "
                     "server sharing it", authority.directory)
            return
        authority.load_or_create()
        mine = authority.files()
        assert mine is not None
    if recorded is None:
        recorded = await store.claim_setting(CA_SETTING, json.dumps(
            {"cert": mine[0].decode(), "key": mine[1].decode()}))
    theirs = json.loads(recorded)
    if theirs["cert"] == mine[0].decode():
        return
    if made:
        authority.adopt(theirs["cert"].encode(), theirs["key"].encode())
        return
    log.warning("this server's certificate authority (%s) is not the one of the other netboot "
                "servers sharing the inventory %s: a device or client that trusts one does "
                "not verify the other; to share it, stop this server and remove %s (it takes "
                "the inventory's at its next start; give devices that trust this one the "
                "other, netboot ca export)", authority.cert_path, config.inventory_name,
                authority.directory)


def _read_or_empty(tls: Tls | None) -> bytes:
    """The certificate file's bytes (b"": none, or unreadable): whether a re-issue wrote it."""
    if tls is None:
        return b""
    try:
        return tls.cert_file.read_bytes()
    except OSError:
        return b""


def _url_host(url: str | None) -> str | None:
    return urlsplit(url).hostname if url else None


def trust_for(config: Config, tls: Tls | None, https_base: str) -> Trust:
    if tls is None:
        return Trust()
    return Trust(https_base=https_base, ca_pem=tls.ca_pem, ca_fingerprint=tls.ca_fingerprint)


class TrustOf:
    """The current :func:`trust_for`, made again only when the certificate (a reload_tls
    replaces the Tls object, frozen) or the HTTPS URL changed: every install script and config
    reads it, and a Trust made each time was ~1 µs of a first install's loop."""

    __slots__ = ("_config", "_https", "_kept", "_tls")

    def __init__(self, config: Config, tls: Callable[[], Tls | None],
                 https: Callable[[], str]) -> None:
        self._config, self._tls, self._https = config, tls, https
        self._kept: tuple[Tls | None, str, Trust] | None = None

    def __call__(self) -> Trust:
        tls, https = self._tls(), self._https()
        kept = self._kept
        if kept is None or kept[0] is not tls or kept[1] != https:
            kept = self._kept = (tls, https, trust_for(self._config, tls, https))
        return kept[2]


def asset_roots(config: Config) -> list[Path]:
    roots = [config.data_dir / "assets"]
    for d in config.assets.dirs:
        p = Path(d)
        if not p.is_absolute():
            # Relative asset dirs name netboot's shipped data (the default "boot_assets"), the
            # same directory whether it runs from a checkout or an installed wheel, not the cwd.
            p = shipped_root() / p
        if p not in roots:
            roots.append(p)
    return roots


def renderer_for(config: Config, *, check: bool = True) -> Renderer:
    dirs = [Path(config.templates.dir)] if config.templates.dir else []
    if check and dirs and not dirs[0].is_dir():
        # Else a mistyped path serves the shipped templates in place of the site's, silently.
        raise ConfigError(f"{dirs[0]} is not a directory", key="templates.dir",
                          fix="give the directory of the site's templates (templates/README.md)"
                              ", or remove the key to use the shipped ones")
    dirs.append(templates_dir())
    # Scripts and command lines rendered once per profile and reason, the values of each
    # machine filled in (the same text: netboot.render._Split).
    renderer = Renderer(dirs, volatile=PER_MACHINE, stable=STABLE)
    if check:
        renderer.check_all()
    return renderer


def public_base_url(config: Config, advertise: str) -> str:
    """The base of every URL a device is given (before the HTTP port is known when it is 0)."""
    return (config.http.public_url or f"http://{advertise}:{config.http.port}").rstrip("/")


def public_https_url(config: Config, advertise: str) -> str:
    """The HTTPS base of the API and configs (before the port is known when it is 0)."""
    return (config.https.public_url or f"https://{advertise}:{config.https.port}").rstrip("/")


def boot_settings(config: Config) -> BootSettings:
    return BootSettings(policy=config.discovery.policy,
                        hold_retry_seconds=config.discovery.hold_retry_seconds,
                        rules=config.discovery.rules,
                        trusted_rules=frozenset(config.discovery.trusted_rules),
                        token_ttl_seconds=config.enroll.token_ttl_seconds,
                        cluster_domain=config.dns.zone if config.dns.enabled else None,
                        default_profile=config.enroll.default_profile,
                        trust_first_nic=config.enroll.trust_first_nic,
                        fixed_first=config.dhcp.mode == "authoritative")


def build_core(config: Config, store: Store, base_url: Callable[[], str], *,
               check_templates: bool = True, trust: Callable[[], Trust] = Trust,
               stand_in: str = "", peers: tuple[str, ...] = ()) -> Core:
    """The operations below the API and the CLI, built the same way for both, so that
    ``netboot render`` and ``explain`` answer with the server's settings (DNS zone, default
    profile, discovery policy, token lifetime)."""
    assets = FileTree(asset_roots(config), pinned=loader_aliases())
    enroller = Enroller(store, hostname_template=config.enroll.hostname_template,
                        report_burst=config.enroll.report_burst,
                        report_rate=config.enroll.report_rate)
    boot = BootService(store, assets, boot_settings(config), enroller,
                       discovery=DiscoveryLimits(
                           max_discovered=config.discovery.max_discovered,
                           rate_per_source=config.discovery.rate_per_source,
                           burst_per_source=config.discovery.burst_per_source,
                           rate_all_sources=config.discovery.rate_all_sources,
                           burst_all_sources=config.discovery.burst_all_sources))
    enroller.find_mac = boot.machine_by_mac  # registrations from the synced view
    content = Content(store, boot, renderer_for(config, check=check_templates), assets,
                      base_url, enroller, trust=trust, stand_in=stand_in, peers=peers)
    return Core(store, enroller, boot, content, audit_keep=config.inventory.audit_keep,
                secure_token=config.enroll.k3s_secure_token)


async def check_default_profile(config: Config, store: Store) -> None:
    """A default profile that does not exist would hold every machine it is meant for."""
    name = config.enroll.default_profile
    if name is not None and await store.get_profile(name) is None:
        raise ConfigError(f"profile {name!r} does not exist", key="enroll.default_profile",
                          fix=f"create it (netboot profiles add {name} --kernel ...; the CLI "
                              "works while the server is stopped) or remove the key")


async def warn_of_missing_rule_refs(config: Config, store: Store,
                                    standing: Standing | None = None) -> None:
    """An auto rule's cluster or profile that does not exist: each device it matched was
    held, its console telling `netboot machines approve MAC --cluster nope`, which is
    refused, and nothing said at start (s37-user). Told, file and line, not refused: it may
    be created once the server runs (through the API: a container's operator has no CLI
    while it is stopped), and removing one a rule names is refused (Core.delete). Kept in
    ``standing`` (each new one logged; a fresh one: all of them), as the other checks of
    this kind (netboot.standing)."""
    from netboot.config import located

    notices: list[Notice] = []
    for i, rule in enumerate(config.discovery.rules if config.discovery.policy == "auto"
                             else ()):  # other policies: the rules enroll nothing
        for kind, ref in (("cluster", rule.cluster), ("profile", rule.profile)):
            found = (await store.get_cluster(ref) if kind == "cluster"
                     else await store.get_profile(ref)) if ref is not None else True
            if found is None:
                add = "--kernel ..." if kind == "profile" else "--server-url managed"
                told = located(config, ConfigError(
                    f"{kind} {ref!r} does not exist: until it does, the devices this rule "
                    "matches are held", key=f"discovery.rules[{i}].{kind}",
                    fix=f"create it: netboot {kind}s add {ref} {add}, or correct the rule"))
                notices.append(Notice("rule-refs", str(told), (str(ref),)))
    (standing or Standing()).set("rule-refs", notices)


async def warn_of_unservable_profiles(store: Store, standing: Standing | None = None) -> None:
    """A profile stored before its files were checked at write time (session 35) may name
    one as netboot no longer takes it (core.profile_file_errors): a PUT of it unchanged is
    refused, and a '..' or a URL netboot does not hand on fails its boots too (a leading '/'
    is still read from the assets' root). Said at start, each file with its fix."""
    from netboot.core import profile_file_errors

    (standing or Standing()).set("profile-files", [Notice("profile-files", (
        f"profile {profile.name}: {error.field}: {error.message}; stored by an older "
        "netboot, it is kept, but a write of it is refused until it is corrected (netboot "
        f"profiles show {profile.name}; PUT /api/v1/profiles/{profile.name})"), (profile.name,))
        for profile in await store.list_profiles()
        for _, error in profile_file_errors(profile)])


async def mend_stray_columns(store: Store) -> None:
    """The ``fixed_ipv4`` and ``profile`` columns beside each machine's document (S42's
    unique index of addresses, the index a profile's delete finds its users by) are the
    writers' to set; hand SQL that changed a document's address or profile without its
    column (a tool of its own, a restore edited by hand) left the inventory refusing
    nothing for that address and a profile's delete blind to that machine. A dnsmasq user
    has the hosts file read again whole at each start; here each start sets such a
    machine's columns from its document (its whole row written again, as netboot's own
    writes set them: an address another machine's column holds stays out of the index,
    named by warn_of_shared_fixed_addresses) and names it. A trigger keeping them would
    parse the document on every write of a boot (S42: ~12,000-23,000 instructions an
    update). A compare-and-set on the machine as read: one written meanwhile is left to
    that write, which set them."""
    mend = getattr(store, "mend_stray_columns", None)
    if mend is None:
        return  # the memory store keeps no such column
    for ref, how in await mend():
        log.warning("machine %s: its columns beside its document (the inventory's indexes of "
                    "its fixed_ipv4 and profile) did not say what its document says, SQL "
                    "having changed one without the other; set from the document: %s. Change "
                    "machines through netboot (netboot machines set, PATCH "
                    "/api/v1/machines/REF), or set those columns with the document",
                    ref, how)


async def warn_of_shared_fixed_addresses(store: Store, standing: Standing | None = None
                                         ) -> None:
    """Machines that share a ``fixed_ipv4``, stored before the API refused it (s40-net):
    said at start, each address with its machines and the fix, and served as before (DHCP
    gives it to the first that asks, the others a pool address: LeasePool.fixed_refused).
    The machines sharing one alone, found by the store's SQL (json_extract in SQLite, in
    C): every machine given one was read and decoded, ~3.9 s of CPU at every start and
    ``netboot status`` of a fleet of 100,000 given their addresses (s44-review)."""
    holders: dict[str, list[str]] = {}
    flt = MachineFilter(shared_fixed_ipv4=True)
    total = await store.count_machines(flt)
    for machine in await store.list_machines(replace(flt, limit=total + 100)) if total else ():
        if machine.fixed_ipv4 is not None:
            holders.setdefault(machine.fixed_ipv4, []).append(machine.ref)
    (standing or Standing()).set("shared-fixed-ipv4", [Notice("shared-fixed-ipv4", (
        f"machines {', '.join(refs)} share the fixed_ipv4 {address} (stored by an older "
        "netboot): authoritative DHCP gives it to the first that asks and the others a pool "
        "address; give each its own (netboot machines set REF --fixed-ipv4 ..., PATCH "
        "/api/v1/machines/REF)"), tuple(refs))
        for address, refs in sorted(holders.items()) if len(refs) > 1])


def advertised_address(config: Config, *, by_reach_told: bool = False) -> str:
    """The address DHCP answers and URLs name. ``by_reach_told``: the caller says itself
    which address a device gets where none is found (``netboot render`` prints the
    interface's), so the warning that 127.0.0.1 is advertised, which its output would
    contradict, is left out."""
    if config.server.advertise:
        return config.server.advertise
    if config.server.interfaces:
        from netboot.servers.sockets import interface_ipv4

        try:
            return interface_ipv4(config.server.interfaces[0])
        except Exception as exc:
            # interface_ipv4's ConfigError says what failed already: its message alone, not
            # its str() (key and fix), or the line says each twice.
            wanted = config.server.interfaces[0]
            raise ConfigError(
                exc.message if isinstance(exc, ConfigError)
                else f"cannot read the IPv4 address of {wanted!r}: {exc}",
                key="server.interfaces", fix="name an interface that has an IPv4 address, "
                "or set server.advertise / --advertise") from exc
    # Embedded defaults: the address of the interface that carries the default route, read
    # from /proc/net/route (no traffic is sent to find it).
    from netboot.servers.sockets import interface_ipv4

    name = default_route_interface()
    if name is not None:
        try:
            address = interface_ipv4(name)
        except Exception:
            address = None
        if address:
            log.warning("no --interface or --advertise given: advertising %s (%s, the default "
                        "route's interface); name the provisioning interface with --interface",
                        address, name)
            return address
    # Devices are still answered where they reach this host (reached_at, Content.at: DHCP,
    # HTTP, TFTP's rendered files, DNS on each interface; netboot render and the summary
    # name the interfaces' addresses), but which interface provisions is a guess.
    if by_reach_told:
        return "127.0.0.1"
    # Said as the start-up summary says it ("netboot serving on 192.0.2.10 (no address
    # advertised ...)", Service.summary): the same reached_at list, not the 127.0.0.1 that
    # only the server's own clients are given.
    reached = reached_at(config, "127.0.0.1")
    if reached:
        log.warning("no --interface or --advertise given and no default route: no one "
                    "address advertised; each device is answered with the address it reaches "
                    "this host at (%s: DHCP on each interface, the URLs of each request); "
                    "name the provisioning interface with --interface (or set --advertise) "
                    "to choose one", ", ".join(f"{address} on {name}"
                                               for name, address in reached))
    else:
        log.warning("no --interface or --advertise given, no default route and no interface "
                    "with an IPv4 address yet: advertising 127.0.0.1; a device is answered "
                    "with the address it reaches this host at once an interface has one, but "
                    "name the provisioning interface with --interface to fix it")
    return "127.0.0.1"


def dhcp_listeners(config: Config,
                   advertise: str) -> tuple[list[str] | None, str | None, bool]:
    """The interfaces DHCP listens on (None: all, on one socket), the address its answers
    give (None: each interface's own) and whether it listens on each interface that has an
    IPv4 address (DhcpServer's each_interface).

    Where nothing was given and the host has no default route, the advertised address is
    127.0.0.1 (advertised_address), which a PXE client would take as its boot server: it is
    itself. Then DHCP listens on each interface that has an IPv4 address, each answering
    with that address, as dnsmasq answers with the address of the interface a request came
    in on; one that comes up later is served too, one that goes away let go (dnsmasq's
    --bind-dynamic: servers.interfaces).

    With an address advertised and no interface named, DHCP listens on each interface that
    has an IPv4 address too, each answering with the advertised address: one socket on
    0.0.0.0 sent each broadcast reply where the route to 255.255.255.255 goes (the default
    route's interface; without one, nowhere), so a PXE device on a second NIC's network
    (or on the only one of a host without a default route) never got its offer. dnsmasq
    sends a reply out of the interface its request came in on (IP_PKTINFO)."""
    if this_host_only(config, advertise):
        return ["lo"], advertise, False
    if config.server.interfaces:
        # Several named and no address given: each answers with its own (dnsmasq's
        # next-server and option 54 default to the receiving interface's address), not
        # the first one's, which a device on another's network may not reach.
        return (list(config.server.interfaces),
                advertise if config.server.advertise or len(config.server.interfaces) == 1
                else None, False)
    if not by_reach(config, advertise):
        return None, advertise, True
    found = [name for name, _ in reached_at(config, advertise)]
    log.info("dhcp: no address to advertise: answering on %s, each with its own address, "
             "and on each interface that comes up later", ", ".join(found) or "no interface yet")
    return None, None, True


def interfaces_off_pool(config: Config, addresses: Sequence[Any]) -> list[ConfigError]:
    """Authoritative DHCP with ``server.interfaces`` named: each named interface that has an
    IPv4 address now but none on the pool's network, which answers no request that is not
    relayed (DhcpServer's pool links, as dnsmasq: "no address range available for DHCP
    request via vb"). Said at start and by check-config, where the setting was written,
    not first at the interface's first request; a warning, not a refusal: dnsmasq starts
    with such an interface (it logs its range only), and an address may come later.
    ``addresses``: InterfaceWatcher's (name, address, prefixlen) entries."""
    auth = config.dhcp.authoritative
    if config.dhcp.mode != "authoritative" or not auth.pool_start or not config.server.interfaces:
        return []
    import ipaddress

    from netboot.servers.interfaces import network

    pool = ipaddress.IPv4Network(f"{auth.pool_start}/{auth.netmask}", strict=False)
    out = []
    for name in config.server.interfaces:
        mine = [entry for entry in addresses if entry.name == name]
        nets = [network(entry) for entry in mine]
        # The server's rule (LeasePool.links, dnsmasq's): an address of it that the pool's
        # network holds, not a network equal to the pool's (a /24 address under a /16 pool
        # netmask is answered).
        if mine and not any(ipaddress.IPv4Address(entry.address) in pool for entry in mine):
            out.append(located(config, ConfigError(
                f"authoritative DHCP: interface {name} has no address on the pool's network "
                f"{pool} (dhcp.authoritative.pool_start, netmask; {name} has "
                f"{', '.join(map(str, nets))}): its requests are not answered, only relayed "
                f"ones (dnsmasq answers none there either)",
                key="server.interfaces",
                fix=f"give {name} an address on {pool}, take it out of server.interfaces, "
                    "or relay its network's requests (dhcp.relay_networks)")))
    return out


def url_stand_in(config: Config, advertise: str) -> str:
    """The host that a device's URLs name as the address its request came in on
    (Content.at, model.stands_in), where ``server.interfaces`` names several and neither
    an address nor a public URL was given: the advertised (first interface's) address,
    which a device on another named interface's network may not reach. Else none."""
    if (len(config.server.interfaces) > 1 and not config.server.advertise
            and not config.http.public_url and not config.https.public_url):
        return advertise
    return ""


def this_host_only(config: Config, advertise: str) -> bool:
    """Whether a loopback address was advertised on purpose (``--advertise 127.0.0.1``, no
    interface named): a trial on this host. DHCP then listens on ``lo`` and TFTP on that
    address only. Before, both listened on every interface: proxyDHCP answered PXE clients
    of the LAN with a boot server of 127.0.0.1 (themselves; beside the LAN's own PXE
    server, a boot taken from it), and TFTP served the LAN. dnsmasq's
    ``dhcp-range=127.0.0.1,proxy`` answers on no interface but the one holding that
    network."""
    return (not config.server.interfaces and bool(config.server.advertise)
            and _loopback(advertise))


def by_reach(config: Config, advertise: str) -> bool:
    """Whether devices are answered with the address they reach this host at: nothing was
    given and 127.0.0.1 is advertised (no default route: advertised_address)."""
    return not (config.server.interfaces or config.server.advertise) and _loopback(advertise)


def reached_at(config: Config, advertise: str) -> list[tuple[str, str]]:
    """Where nothing was given and 127.0.0.1 is advertised (no default route): each
    interface with an IPv4 address that is not loopback, and that address, where devices
    reach this host (DHCP answers with it, the HTTPS certificate names it, a device's URLs
    name the one its request came in on: Content.at). Else none."""
    if not by_reach(config, advertise):
        return []
    from netboot.servers.sockets import interface_ipv4

    found = []
    for _, name in socket.if_nameindex():
        try:
            address = interface_ipv4(name)
        except ConfigError:
            continue
        if not _loopback(address):
            found.append((name, address))
    return found


def named_addresses(config: Config) -> list[str]:
    """The first IPv4 address of each interface of ``server.interfaces`` that has one now
    (start-up's read; Service._tls_addresses then follows every address of each)."""
    return [address for _, address in named_at(config)]


def named_at(config: Config) -> list[tuple[str, str]]:
    """Each interface of ``server.interfaces`` that has an IPv4 address now, and its first."""
    from netboot.servers.sockets import interface_ipv4

    found = []
    for name in config.server.interfaces:
        try:
            found.append((name, interface_ipv4(name)))
        except ConfigError:
            continue
    return found


def _loopback(address: str) -> bool:
    parsed = parse_ip(address)
    return parsed is not None and parsed.is_loopback


def default_route_interface(route_table: str = "/proc/net/route") -> str | None:
    """The interface of the IPv4 default route, or None."""
    try:
        lines = Path(route_table).read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # Iface Destination Gateway Flags ...: destination 00000000 is the default route.
        if len(fields) > 3 and fields[1] == "00000000" and int(fields[3], 16) & 1:
            return fields[0]
    return None


def _unwritable(path: Path, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot write {path}: {exc.strerror}", key="server.data_dir",
                       fix="point --data-dir at a directory netboot can write")


async def ensure_admin_token(access: Access, data_dir: Path) -> Path | None:
    """Create an admin token when none is valid (first start, or every admin token revoked
    or expired, which would leave only the CLI to recover): the token's value goes to a 0600
    file and its hash into the store.

    Returns the file's path when a token was made now, None when an admin token exists. The
    token itself is never printed: standard output ends up in journals and CI logs.
    """
    if await access.has_admin():
        return None
    names = {t.name for t in await access.list_tokens()}
    name = next(n for n in ("admin", *(f"admin-{i}" for i in range(2, len(names) + 3)))
                if n not in names)
    path = data_dir / "admin.token"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
    except OSError as exc:
        raise _unwritable(path, exc) from exc
    with os.fdopen(fd, "w") as fh:
        _, token = await access.create_token(name, Scope.ADMIN)
        try:
            fh.write(token + "\n")
            fh.flush()
        except OSError as exc:
            await access.revoke(name)  # a token nobody can read would only be a risk
            raise _unwritable(path, exc) from exc
    return path


@dataclass
class Service:
    config: Config
    store: Store
    enroller: Enroller
    boot: BootService
    content: Content
    # aiohttp's application: made by ``app_factory`` (which imports aiohttp) in build(), or
    # by start() once the listeners answer (``build(app=False)``, what ``serve`` does).
    app: web.Application | None
    advertise: str
    new_admin_token_file: Path | None = None
    tls: Tls | None = None
    # Prepares the certificate again (re-issued if due, or the operator's files re-read),
    # naming the addresses given (None: those read now; prepare_tls).
    tls_source: Callable[[Sequence[str] | None], Tls | None] | None = None
    tls_context: ssl.SSLContext | None = None
    metrics: Metrics = field(default_factory=Metrics)
    # The shared database's clock against this host's (a store with a ServerClock).
    clock_skew: ClockSkew = field(default_factory=ClockSkew)
    events: EventBus = field(default_factory=EventBus)
    # Answers plain GETs of device routes before aiohttp (both listeners); None: aiohttp all.
    front: FrontDoor | None = None
    app_factory: Callable[[], web.Application] | None = None
    runner: web.AppRunner | None = None
    # The listeners' protocol factory: the front door until aiohttp is ready (Doorway).
    doorway: Doorway | None = None
    listeners: list[asyncio.Server] = field(default_factory=list)
    http_guard: ConnectionGuard | None = None
    # The threads that send large files' bodies off the loop's thread (http.send_threads),
    # made at start(), ended at close().
    send_threads: SendThreads | None = None
    servers: list[Any] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # Called once the inventory view is loaded (``serve`` freezes the heap there).
    view_loaded: Callable[[], None] | None = None
    http_port: int = 0
    https_port: int = 0
    # The base URL lives in one box that Content reads on every render, so that the port
    # bound at start (http.port 0) reaches the URLs without rebuilding anything.
    url_holder: dict[str, str] = field(default_factory=dict)
    dns_port: int = 0
    # The host's IPv4 addresses as they come and go, for the listeners that follow them
    # (DHCP on named interfaces or each one, DNS on each address): None when none does.
    watcher: Any = None
    _dns_by_address: dict[str, Any] = field(default_factory=dict)
    _dns_changed: asyncio.Event | None = None
    _dns_rrl: Any = None  # dns.rate_limit's one limiter for every DNS listener (None: off)
    _tls_changed: asyncio.Event | None = None  # set: the certificate follows the addresses
    _tls_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _event_cursor: int = -1
    _zone_holder: Any = None
    _zone_fingerprint: int | None = None
    _zone_serial: int = 0
    # The machines an older register command registered, named at the start and live.
    _older: OlderRegistrations = field(default_factory=OlderRegistrations)
    # What stands that the operator must fix (netboot.standing): start-up's checks, kept
    # and looked at again while this server runs, for GET /status and the dashboard.
    standing: Standing = field(default_factory=Standing)
    # This server in the inventory's record of servers, and the others (recorded at the
    # first watch, once the HTTP port is bound, and every peers.REFRESH_SECONDS).
    peers: Peers | None = None
    _newest: Machine | None = None  # the inventory's newest change at start (clock-behind)
    _standing_next: float = 0.0  # when to look again (time.monotonic)
    # The DHCP server's addresses in use (ip -> (until, text)): told, and as last recorded in
    # the inventory (_record_in_use), by the task that records them.
    _in_use_marks: dict[str, tuple[float, str]] = field(default_factory=dict)
    _in_use_recorded: dict[str, tuple[float, str]] = field(default_factory=dict)
    _in_use_writer: asyncio.Future[None] | None = None

    @property
    def base_url(self) -> str:
        return self.url_holder["base"]

    @base_url.setter
    def base_url(self, value: str) -> None:
        self.url_holder["base"] = value

    def forget_idle(self) -> None:
        """Per-machine state a storm left that mattered only while it lasted, dropped once
        quiet after it (``serve``'s release_when_quiet, before the heap is trimmed): the
        NICs' DHCP memos, the installers' report budgets full again, the TFTP clients past
        their late-copy window, the HTTP front's parsed request heads. Each is made again as
        for a machine not seen yet. Held, a 1,000-device storm's ~2 MB of them stayed until
        thousands of other machines pushed them out. Dropped, they leave room in the arenas
        Python's heap grew by in the storm (which other survivors keep: the resident figure
        stays), for the next storm to fill before it asks for new ones (benchmarks/README.md,
        s35-mem)."""
        self.boot.forget_memos()
        self.enroller.forget_idle()
        if self.front is not None:
            self.front.forget_heads()
        for server in self.servers:
            forget = getattr(server, "forget_ended", None)
            if forget is not None:
                forget()

    def connection_guard(self) -> ConnectionGuard:
        """The bounds on HTTP connections the config sets (both listeners share one)."""
        http = self.config.http
        return ConnectionGuard(HttpLimits(
            max_connections=http.max_connections,
            max_connections_per_source=http.max_connections_per_source,
            header_timeout=http.header_timeout, body_timeout=http.body_timeout,
            keepalive_timeout=http.keepalive_timeout, send_timeout=http.send_timeout,
        ), logging.getLogger("netboot.http"), senders=self.send_threads)

    async def start(self) -> None:
        """Bind every listener, then make aiohttp's application if build() left it to here
        (its import in a thread, while the front door answers: Doorway), and hand both HTTP
        listeners to aiohttp."""
        cfg = self.config
        self._event_cursor, _ = await self.store.events_since(-1)
        self.tasks.append(asyncio.ensure_future(self._watch_inventory()))
        if isinstance(self.store, ServerClock):
            self.tasks.append(asyncio.ensure_future(self._watch_clock(self.store)))
        if cfg.inventory.events_keep_days:
            from netboot.retention import keep_events

            self.tasks.append(asyncio.ensure_future(keep_events(
                self.store, cfg.inventory.events_keep_days, clock=time.time, log=log)))
        access = logging.getLogger("netboot.access") if cfg.http.access_log else None
        assert self.front is not None
        doorway = self.doorway = Doorway(
            self.front, AccessLogger(access) if access is not None else None)
        # The limits the open-files limit holds, from here on (lowered defaults: warned).
        cfg = self.config = raise_fd_limit(cfg)
        http = cfg.http
        if http.send_threads and self.send_threads is None:
            self.send_threads = threads = SendThreads(http.send_threads)
            threads.start()
            self.metrics.read_send_threads(
                lambda: (threads.given, threads.in_flight, threads.alive))
        self.http_guard = self.connection_guard()
        try:
            # Bound, not yet served: /healthz answers "ok" only once every listener of
            # start() is bound (below), or a client told "ready" found HTTPS, TFTP or DHCP
            # not yet there (the e2e lab's API call over HTTPS was refused under load).
            self.listeners.append(await listen(doorway, http.listen, http.port,
                                               start_serving=False))
        except OSError as exc:
            raise bind_error(exc, what="HTTP", proto="TCP", host=http.listen,
                             port=http.port, key="http.port", flag="--http-port") from exc
        self.http_port = int(self.listeners[0].sockets[0].getsockname()[1])
        if http.port == 0 and not http.public_url:  # answers give the port bound
            self.base_url = f"http://{self.advertise}:{self.http_port}"
        if self.tls is not None:
            # The same application on both listeners: one set of routes, one error mapping,
            # one connection cap (the guard counts both).
            host = cfg.https.listen or http.listen
            self.tls_context = self.tls.ssl_context()
            try:
                self.listeners.append(await listen(doorway, host, cfg.https.port,
                                                   ssl_context=self.tls_context,
                                                   start_serving=False))
            except OSError as exc:
                raise bind_error(exc, what="HTTPS", proto="TCP", host=host,
                                 port=cfg.https.port, key="https.port",
                                 flag="--https-port") from exc
            self.https_port = int(self.listeners[1].sockets[0].getsockname()[1])
            if cfg.https.port == 0 and not cfg.https.public_url:
                self.url_holder["https"] = f"https://{self.advertise}:{self.https_port}"
            self.tasks.append(asyncio.ensure_future(self._renew_tls_periodically()))
            if not cfg.https.cert_file and (cfg.server.interfaces
                                            or by_reach(cfg, self.advertise)):
                # The certificate names each interface's address (reached_at), or each
                # named interface's (a device that reaches another named interface than the
                # advertised one's must not fail TLS): one that comes later is named too,
                # re-issued by netboot's CA within a second; one gone is left out of it
                # from the next re-issue on.
                self._tls_changed = changed = asyncio.Event()
                (await self._watcher()).subscribe(lambda _: changed.set())
                # Checked once now: build() read the addresses (prepare_tls), and one that
                # came since is told by no change (the watcher tells only later ones).
                changed.set()
                self.tasks.append(asyncio.ensure_future(self._follow_tls()))
        if cfg.tftp.enabled:
            from netboot.servers.tftp import TftpServer

            tftp = TftpServer(self.content, port=cfg.tftp.port,
                              host=self.advertise if this_host_only(cfg, self.advertise)
                              else "0.0.0.0",
                              max_transfers=cfg.tftp.max_transfers,
                              max_per_client=cfg.tftp.max_per_client, mtu=cfg.tftp.mtu,
                              ack_spin=cfg.tftp.ack_spin_us / 1e6,
                              single_port=cfg.tftp.single_port,
                              interfaces=list(cfg.server.interfaces) or None,
                              observer=self.metrics,
                              by_address=self.content.by_address(),
                              # Named interfaces followed as they come and go (0.0.0.0
                              # without: every interface's datagrams reach it already).
                              watcher=await self._watcher() if cfg.server.interfaces
                              else None)
            await tftp.start()
            self.metrics.read_tftp_stats(lambda: tftp.stats)
            self.servers.append(tftp)
        if cfg.dhcp.mode != "off":
            from netboot.pxe import DhcpSettings
            from netboot.servers.dhcp import DhcpServer

            auth = cfg.dhcp.authoritative
            settings = DhcpSettings(
                mode=cfg.dhcp.mode, http_port=self.http_port,
                uefi_option43=cfg.dhcp.uefi_option43, ack_on_67=cfg.dhcp.ack_on_67,
                pool_start=auth.pool_start, pool_end=auth.pool_end, netmask=auth.netmask,
                router=auth.router, dns_servers=auth.dns, domain=auth.domain,
                lease_seconds=auth.lease_seconds, ping_check=cfg.dhcp.ping_check)
            interfaces, advertise, each = dhcp_listeners(cfg, self.advertise)
            dhcp = DhcpServer(settings, self.boot, self.store, interfaces=interfaces,
                              advertise=advertise, port=cfg.dhcp.port,
                              pxe_port=cfg.dhcp.pxe_port, observer=self.metrics,
                              each_interface=each, relay_networks=cfg.dhcp.relay_networks,
                              watcher=await self._watcher(),
                              in_use_told=self._in_use_told,
                              ping_wait=cfg.dhcp.ping_timeout_ms / 1000)
            await dhcp.start()
            for warning in interfaces_off_pool(cfg, (await self._watcher()).addresses()):
                log.warning("%s", warning)
            if interfaces is None:  # every interface: said where there are several
                self.standing.set("every-interface", [every_interface(
                    [(a.name, a.address) for a in (await self._watcher()).addresses()
                     if not _loopback(a.address)], cfg.dhcp.mode, cfg.http.listen)])
            self.metrics.read_dhcp_outcomes(dhcp.summary.totals)
            self.servers.append(dhcp)
        if cfg.dns.enabled:
            await self._start_dns()
        for listener in self.listeners:
            await listener.start_serving()
        # The whole inventory into the boot path's view, while serving (until it is in,
        # decisions read through to the store): ready at once, no reads once loaded. Begun
        # before aiohttp's import: /healthz and DHCP answer from now on, and a storm that
        # starts at once must not wait for the API's import to have its view.
        self.tasks.append(asyncio.ensure_future(self._load_view()))
        await self._open_aiohttp(access)

    async def _open_aiohttp(self, access: logging.Logger | None) -> None:
        """aiohttp's application, runner and handlers on the listeners bound by start()."""
        if self.app is None:
            assert self.app_factory is not None
            # Imported in a thread: the event loop answers the front door's requests
            # meanwhile (the GIL is shared, but released every few ms and during I/O).
            await asyncio.to_thread(_import_aiohttp_side)
            self.app = self.app_factory()
        from netboot.servers.aio import GuardedSite, handlers

        self.runner = runner = web_runner(self.app, access)
        await runner.setup()
        assert self.doorway is not None and self.http_guard is not None
        for listener, scheme in zip(self.listeners, ("http", "https"), strict=False):
            port = listener.sockets[0].getsockname()[1]
            await GuardedSite(runner, listener, name=f"{scheme}://:{port}").start()
        self.doorway.open(handlers(runner, guard=self.http_guard, front=self.front,
                                   access=access))

    async def _load_view(self) -> None:
        started = time.monotonic()
        # Until view_loaded's full collection too (FrozenHeap.start): restored before it, the
        # collector would start one of its own at the next young collection, and then that.
        with no_full_collections():
            try:
                with brisk_switching():
                    await self.boot.load_view()
            except StoreError as exc:
                log.warning("inventory view not loaded, decisions read the store: %s", exc)
                return
            log.info("inventory view loaded in %.1f s", time.monotonic() - started)
            await self.look_for_older_registrations(start=True)
            self._newest = newest(self.boot.held_machines() or ())
            self.standing.set("clock-behind", [clock_behind(self._newest, time.time())])
            if self.view_loaded is not None:
                self.view_loaded()

    def reload_tls(self) -> None:
        """Prepare the certificate again and load it into the listener's context: netboot's
        CA re-issues it when it is due; an operator's renewed files are read again."""
        if self.tls_source is None or self.tls_context is None:
            return
        tls = self.tls_source(self._tls_addresses())
        if tls is not None:
            self._use_tls(tls)

    def _use_tls(self, tls: Tls) -> None:
        """Loaded into the listener's context: the handshakes from now on use it; a
        connection open already keeps the certificate it was given (an SSL object copies
        its context's certificate when it is made)."""
        assert self.tls_context is not None
        # Loaded into a scratch context first: OpenSSL drops the live context's key when
        # given a certificate it does not match, so a pair that fails after the certificate
        # (a key that does not load or match) left the listener neither, every handshake
        # failing, where this raises with the loaded pair still served.
        tls.load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        tls.load_into(self.tls_context)
        self.tls = tls

    def server_addresses(self) -> frozenset[str]:
        """This server's addresses (the advertised one, each interface's as the watcher has
        them now) and its DHCP router's: none is a machine's to have (its fixed_ipv4:
        addresses.check_fixed_ipv4; authoritative DHCP refuses one at offer time too)."""
        found = {self.advertise}
        if self.watcher is not None:
            found.update(entry.address for entry in self.watcher.addresses())
        dhcp = self.config.dhcp
        if dhcp.mode == "authoritative" and dhcp.authoritative.router:
            found.add(dhcp.authoritative.router)
        return frozenset(found)

    def _tls_addresses(self) -> list[str] | None:
        """The interfaces' addresses the certificate names where they are followed (no
        default route or interfaces named, netboot's own CA: _follow_tls), as the watcher
        has them now, each one, secondaries too; else None (prepare_tls reads them)."""
        if self._tls_changed is None or self.watcher is None:
            return None
        return self._interface_addresses()

    async def _follow_tls(self) -> None:
        """The certificate re-issued when an address comes that it does not name (the CA's
        check: Authority.server_certificate), in a thread (a new RSA key is ~0.1 s of CPU,
        the event loop serves meanwhile), then loaded for new connections. An address that
        goes away stays named until the next re-issue."""
        assert self._tls_changed is not None and self.tls_source is not None
        while True:
            await self._tls_changed.wait()
            self._tls_changed.clear()
            addresses = self._tls_addresses()
            current = self.tls
            try:
                async with self._tls_lock:  # one writer of the CA's files at a time
                    before = await asyncio.to_thread(_read_or_empty, current)
                    tls = await asyncio.to_thread(self.tls_source, addresses)
                    if tls is None or await asyncio.to_thread(_read_or_empty, tls) == before:
                        continue
                    self._use_tls(tls)
            except (ConfigError, OSError, ssl.SSLError) as exc:
                log.error("HTTPS certificate not re-issued for %s, keeping the loaded one: "
                          "%s", ", ".join(addresses or ()), exc)
                continue
            log.info("https: the certificate now names %s; new connections get it",
                     ", ".join(addresses or ()))

    async def _renew_tls_periodically(self) -> None:
        # Twice a day is far inside the 30 days of RENEW_BEFORE; a failure keeps the loaded
        # certificate (still valid for weeks) and is logged, not fatal.
        while True:
            await asyncio.sleep(12 * 3600)
            try:
                async with self._tls_lock:
                    self.reload_tls()
            except (ConfigError, OSError, ssl.SSLError) as exc:
                log.error("HTTPS certificate not renewed, keeping the loaded one: %s", exc)

    async def _watch_inventory(self) -> None:
        """Every WATCH_SECONDS, one :meth:`watch_once`."""
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            try:
                await self.watch_once()
            except Exception:
                log.exception("watching the inventory failed; trying again")

    async def _watch_clock(self, store: ServerClock) -> None:
        """At start and every CLOCK_CHECK_SECONDS, one :meth:`check_clock`."""
        while True:
            try:
                await self.check_clock(store)
            except Exception:
                log.exception("comparing the inventory's clock with this host's failed")
            await asyncio.sleep(CLOCK_CHECK_SECONDS)

    def _in_use_told(self, in_use: list[tuple[str, str, float]]) -> None:
        """The pool's addresses that answered a ping and are kept from clients now
        (DhcpServer, dhcp.ping_check): shown while they last (GET /status's warnings, the
        dashboard's banner), not only logged (the DHCP server logged each already), and
        recorded in the inventory for ``netboot status`` (_record_in_use)."""
        self.standing.set("address-in-use", [Notice("address-in-use", text, (ip,))
                                             for ip, text, _ in in_use], told=False)
        self._in_use_marks = {ip: (until, text) for ip, text, until in in_use}
        if self._in_use_marks != self._in_use_recorded and (
                self._in_use_writer is None or self._in_use_writer.done()):
            self._in_use_writer = asyncio.ensure_future(self._record_in_use())

    async def _record_in_use(self) -> None:
        """This server's marks into the inventory's record (base.DHCP_IN_USE, a
        compare-and-set: two servers writing at once keep both), until what is recorded is
        what it holds; the marks it ended (reclaimed) taken out. A store that refuses: said
        once, tried again at the next change."""
        from netboot.inventory.base import DHCP_IN_USE
        from netboot.pingcheck import in_use_record

        while self._in_use_marks != self._in_use_recorded:
            marks = dict(self._in_use_marks)
            ended = set(self._in_use_recorded) - set(marks)
            try:
                text = await self.store.get_setting(DHCP_IN_USE)
                for _ in range(5):  # a lost round: another server wrote between
                    new = in_use_record(text, marks, ended, time.time())
                    if new == text:
                        break
                    held = await self.store.claim_setting(DHCP_IN_USE, new, replace=text)
                    if held == new:
                        break
                    text = held
            except StoreError as exc:
                log.warning("could not record the addresses in use in the inventory (netboot "
                            "status shows them from there): %s", exc)
                return
            self._in_use_recorded = marks

    async def check_clock(self, store: ServerClock) -> None:
        """The database's clock against this host's (health.ClockSkew): logged past its
        threshold, the gauge netboot_inventory_clock_skew_seconds either way."""
        try:
            database, local, round_trip = await store.server_clock()
        except StoreError:
            return  # the watcher reports the outage
        said = self.clock_skew.observe(database, local, round_trip)
        if said is not None:
            level, message = said
            log.log(logging.WARNING if level == "warning" else logging.INFO, "%s", message)
        # Shown while it lasts (GET /status's warnings, the dashboard, netboot status's
        # server), as the clock behind at start is: a clock that drifts or is stepped out
        # of step later was the log's and a gauge's alone (s43-ops' leftover).
        skew = self.clock_skew.said
        self.standing.set("clock-skew", [Notice("clock-skew", skew)] if skew else (),
                          told=False)

    async def look_for_older_registrations(self, *, start: bool = False) -> None:
        """Warn of the machines an older register command registered: every one at the
        start, then each one the view brings while this server runs (another server of the
        inventory, still on an older version, registered it: a rolling upgrade), looked
        for when the count of registered machines moved (OlderRegistrations). Only the
        next start named those (s41-ops)."""
        counts = await self.boot.held_counts()
        if counts is None:
            return
        registered = sum(n for (_, state), n in counts.items()
                         if state is MachineState.REGISTERED)
        older, now = self._older, time.monotonic()
        if start or older.due(registered, now):
            held = self.boot.held_machines()
            if held is not None:
                told = older_notice(older.new(held, registered, now), live=not start)
                if told is not None:  # those not named before
                    log.warning("%s", told.text)
                self.standing.set("older-registrations",
                                  [older_notice(older.current, refs=SERVED_REFS)],
                                  told=False)

    async def look_again_at_what_stands(self) -> None:
        """Every OLDER_LOOK_SECONDS: the clusters named alike, the groups giving clusters on
        claimable strings, the rules' references (one fixed since is no longer shown; one
        another server's older self wrote is) and the clock against the inventory's newest
        change at start, and, while they stand, the profiles' files and the shared fixed
        addresses (none can be written now: the API and the store refuse them)."""
        now = time.monotonic()
        if now < self._standing_next:
            return
        self._standing_next = now + OLDER_LOOK_SECONDS
        standing, store = self.standing, self.store
        # Looked at again whether it stood or not: a clock stepped back later (a board's
        # NTP correcting, a hand's date) behind the inventory's newest change at start was
        # not told (s43-ops' leftover). One told stays as said (its text names the time).
        behind = clock_behind(self._newest, time.time())
        if behind is None or not standing.holds("clock-behind"):
            standing.set("clock-behind", [behind])
        await look_at_names(store, standing)
        await warn_of_missing_rule_refs(self.config, store, standing)
        if standing.holds("profile-files"):
            await warn_of_unservable_profiles(store, standing)
        if standing.holds("shared-fixed-ipv4"):
            await warn_of_shared_fixed_addresses(store, standing)

    async def watch_once(self) -> None:
        """Sync the boot path's view (noticing an outage of the inventory and its end),
        write the boot events queued while it was away, and relay the events other servers
        committed to this server's event stream."""
        health, recorder = self.boot.health, self.enroller.recorder
        stuck: str | None = None
        try:
            await self.boot.resync()
            if self.peers is not None:
                # The others as the feed told them; this server's own entry written at the
                # first watch and every REFRESH_SECONDS (in this loop: no timer of its own).
                self.peers.heard(self.boot.servers_record)
                await self.peers.refresh_if_due(time.monotonic())
            await self.look_for_older_registrations()
            stuck = stuck_writes(self.store)
            health.doubt(cannot_tell(self.store))
            if stuck is not None:  # reads answer, writes would each fail after a wait
                raise StoreError(stuck)
            if recorder.failing is not None:
                await recorder.flush()
            if not self.events.relaying:
                # Nobody watches: no event to read back, only the place of the newest (one
                # look at the events' primary key), so that a stream opened next sees what
                # others commit from about then on, as it would have.
                cursor, _ = await self.store.events_since(-1)
                if cursor != self._event_cursor:
                    # Committed meanwhile, by this server or others, and not read: a stream
                    # resuming from before now is told "missed" (EventBus.unread).
                    self.events.unread()
                self._event_cursor = cursor
                self.events.relay(())
            else:
                for _ in range(100):  # bounded: 100k events per round at most
                    self._event_cursor, events = await self.store.events_since(
                        self._event_cursor)
                    self.events.relay(events)
                    if len(events) < 1000:
                        break
        except StoreError as exc:
            # Reads answered (the sync did) when it is the store's stuck_writes: an operator
            # looks at the database's locks or its pooler, not at the network (s35-pg).
            answers = stuck is not None
            if health.failed(str(exc), answers=answers):
                log.error("inventory %s: boots of known machines are answered from "
                          "memory, writes are refused: %s",
                          "refuses writes" if answers else "unreachable", exc)
            return
        if health.restored():
            log.warning("inventory reachable again: the view is synced, writes are accepted "
                        "(%d boot events still queued)", recorder.queued)
        try:
            # After the sync, the queued writes and the relay, and apart from them: a read of
            # what stands that fails (a statement timeout of the shared addresses' scan) is
            # no outage of the inventory. Inside, it marked the inventory down (writes
            # refused, /healthz degraded) and skipped the relay and the queued writes.
            await self.look_again_at_what_stands()
        except StoreError as exc:
            log.warning("looking again at what stands (GET /status's warnings) failed: %s; "
                        "looked at again in %.0f s", exc, OLDER_LOOK_SECONDS)

    async def _start_dns(self) -> None:
        from netboot.names import ZoneHolder
        from netboot.servers.dns import rate_limiter

        cfg = self.config
        # Each served interface's address points back at the server's name (PTR), followed:
        # every interface's where none is named (HTTP and TFTP answer on 0.0.0.0, devices
        # reach each; followed only with DHCP on, which watches them, before s39-net).
        await self._watcher()
        self._zone_holder = ZoneHolder(await self._build_zone())
        self._dns_rrl = rrl = rate_limiter(cfg.dns.rate_limit)
        if rrl is not None:
            self.metrics.read_dns_limited(lambda: {"dropped": rrl.dropped,
                                                   "truncated": rrl.slipped})
        upstreams = []
        for item in cfg.dns.upstreams:
            host, _, port = item.partition("#")
            try:
                upstreams.append((host, int(port or 53)))
            except ValueError:
                raise ConfigError(f"{item!r} is not addr or addr#port", key="dns.upstreams",
                                  fix="write e.g. 192.0.2.53 or 192.0.2.53#5353") from None
        # Default: the advertised address, never 0.0.0.0 (a resolver of this host's may own
        # port 53 elsewhere). Where that is 127.0.0.1 (no default route, no --advertise),
        # which no device can reach, each interface's address too, as DHCP answers on each
        # (dhcp_listeners): one server each, the zone shared, the server's own name holding
        # the address asked (names.ServedAt); the advertised one last, for this host's own
        # clients. An address that comes later gets one, one that goes away is let go. The
        # same with interfaces named: each named interface's addresses (the advertised one,
        # the first's, listened on as before), where a device on the second NIC's network
        # found no DNS (it listened on the advertised address only).
        following = not cfg.dns.listen and (by_reach(cfg, self.advertise)
                                            or bool(cfg.server.interfaces))
        hosts = [cfg.dns.listen or self.advertise]
        if following:
            hosts[:0] = self._followed_dns()
        self.dns_port = cfg.dns.port
        for address in hosts:
            await self._listen_dns(address, upstreams, fixed=address == hosts[-1])
        if following:
            self._dns_changed = changed = asyncio.Event()
            self.watcher.subscribe(lambda _: changed.set())
            self.tasks.append(asyncio.ensure_future(self._follow_dns(upstreams)))

        limited = RateLimitedLog(log)
        due = asyncio.Event()
        if self.watcher is not None:
            self.watcher.subscribe(lambda _: due.set())  # an address's PTR at once

        async def refresh() -> None:
            # Registrations and failures change cluster endpoints; a bounded staleness of a
            # couple of seconds keeps the answer path free of inventory reads.
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await due.wait()
                due.clear()
                try:
                    await self.refresh_zone()
                except StoreError as exc:  # every 2 s while the disk is broken: no traceback
                    limited.log(logging.WARNING, "zone", "DNS zone rebuild failed, keeping "
                                "the previous zone: %s", exc)
                except Exception:
                    log.exception("DNS zone rebuild failed; keeping the previous zone")

        self.tasks.append(asyncio.ensure_future(refresh()))

    async def _watcher(self) -> Any:
        """The host's addresses, followed (one rtnetlink socket for every listener)."""
        if self.watcher is None:
            from netboot.servers.interfaces import InterfaceWatcher

            self.watcher = InterfaceWatcher()
            await self.watcher.start()
        return self.watcher

    def _interface_addresses(self) -> list[str]:
        """The addresses of the interfaces served, as they are now: the named interfaces'
        where some are named, else each interface's (one 0.0.0.0 socket serves them all);
        none before the watcher runs. The zone gives each a PTR to the server's name
        (dnsmasq's --interface-name answers both ways)."""
        if self.watcher is None:
            return []
        named = self.config.server.interfaces
        return self._dns_addresses(a for a in self.watcher.addresses()
                                   if not named or a.name in named)

    @staticmethod
    def _dns_addresses(addresses: Any) -> list[str]:
        found: list[str] = []
        for entry in addresses:
            if not _loopback(entry.address) and entry.address not in found:
                found.append(entry.address)
        return found

    async def _listen_dns(self, address: str, upstreams: list[tuple[str, int]], *,
                          fixed: bool) -> None:
        from netboot.names import ServedAt
        from netboot.servers.dns import DnsServer

        cfg = self.config
        source = self._zone_holder if fixed else ServedAt(self._zone_holder, address)
        dns = DnsServer(source, host=address, port=self.dns_port, upstreams=upstreams,
                        forward=cfg.dns.forward, forwards_for=self._dns_forwards_for(),
                        rate_limiter=self._dns_rrl)
        await dns.start()
        self.servers.append(dns)
        self.dns_port = dns.port  # port 0: the first's, for every address
        if not fixed:
            self._dns_by_address[address] = dns

    def _dns_forwards_for(self) -> Callable[[str], bool]:
        """Whose queries for names outside the zone are forwarded: this host's (loopback) and
        those of clients on a network of one of its interfaces, of dhcp.relay_networks (the
        devices behind relays), of the authoritative pool and of dns.forward_networks. BIND's
        allow-recursion default is "localnets; localhost", unbound's localhost alone; netboot
        forwarded for whoever reached the address it listens on, so a host routed to it from
        another network had an open resolver (s45-attack)."""
        import ipaddress

        from netboot.servers.interfaces import Ipv6Networks, network

        cfg = self.config
        given: list[Any] = [ipaddress.ip_network(text, strict=False)
                            for text in (*cfg.dhcp.relay_networks, *cfg.dns.forward_networks)]
        auth = cfg.dhcp.authoritative
        if cfg.dhcp.mode == "authoritative" and auth.pool_start:
            given.append(ipaddress.ip_network(f"{auth.pool_start}/{auth.netmask}",
                                              strict=False))
        watcher = self.watcher
        ipv6 = Ipv6Networks()

        def forwards_for(address: str) -> bool:
            try:
                ip = ipaddress.ip_address(address.partition("%")[0])
            except ValueError:
                return False
            if ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if ip.is_loopback or any(ip in net for net in given):
                return True
            if ip.version == 6:
                # As IPv4's on-link clients (s46-dns; before, an IPv6 client needed
                # dns.forward_networks): a link-local source is a neighbour on the link the
                # query came in on (no router forwards one, RFC 4291 §2.5.6), and the
                # interfaces' IPv6 prefixes are read as they are now.
                return ip.is_link_local or ipv6.holds(ip)
            # The interfaces' networks as they are now (an address added later counts).
            return watcher is not None and any(
                ip in network(entry) for entry in watcher.addresses())

        return forwards_for

    async def _follow_dns(self, upstreams: list[tuple[str, int]]) -> None:
        """DNS on each address of the interfaces served as addresses come and go (by_reach,
        or the named interfaces')."""
        assert self._dns_changed is not None
        while True:
            await self._dns_changed.wait()
            self._dns_changed.clear()
            wanted = self._followed_dns()
            for address, dns in list(self._dns_by_address.items()):
                if address not in wanted:
                    del self._dns_by_address[address]
                    self.servers.remove(dns)
                    await dns.close()
                    log.info("dns: stopped listening on %s (the address went away)", address)
            for address in wanted:
                if address in self._dns_by_address:
                    continue
                try:
                    await self._listen_dns(address, upstreams, fixed=False)
                except (ConfigError, OSError) as exc:
                    log.warning("dns: cannot listen on %s: %s", address, exc)

    def _followed_dns(self) -> list[str]:
        """The addresses DNS follows (_start_dns): the served interfaces' but the
        advertised one, which has its listener for good."""
        return [a for a in self._interface_addresses() if a != self.advertise]

    async def _build_zone(self) -> Any:
        from netboot.names import Zone

        cfg = self.config
        machines = await self.store.list_machines(MachineFilter(limit=10_000_000))
        clusters = await self.store.list_clusters()
        ptrs = self._interface_addresses()
        fingerprint = hash((
            tuple(ptrs),
            # fixed_ipv4: an address of the zone too (names.address_of), s36-journey.
            tuple((m.id, m.hostname, m.ipv4, m.fixed_ipv4, m.state, m.role, m.cluster)
                  for m in machines),
            tuple(c.name for c in clusters)))
        if fingerprint == self._zone_fingerprint and self._zone_holder is not None:
            return self._zone_holder.zone()
        self._zone_fingerprint = fingerprint
        self._zone_serial = max(self._zone_serial + 1, int(time.time()))
        zone = Zone.build(machines, clusters, zone=cfg.dns.zone, server_addrs=[self.advertise],
                          server_ptrs=ptrs,
                          ttl=cfg.dns.ttl, serial=self._zone_serial,
                          fixed_first=cfg.dhcp.mode == "authoritative")
        for problem in (*zone.conflicts, *zone.skipped):
            log.warning("dns zone %s: %s", cfg.dns.zone, problem)
        return zone

    async def refresh_zone(self) -> None:
        """Rebuild the DNS snapshot now if the inventory changed (also runs every 2 s)."""
        if self._zone_holder is not None:
            self._zone_holder.replace(await self._build_zone())

    async def close(self) -> None:
        if self.peers is not None and self.peers.refreshed:
            # A clean stop: the other servers' devices stop naming this one now, not once
            # its entry ages out (peers.STALE_SECONDS); bounded by WITHDRAW_SECONDS.
            await self.peers.withdraw()
        self.events.close()  # open event streams end first: see EventBus.close
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for server in reversed(self.servers):
            await server.close()
        self.servers.clear()
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None
        await self.boot.drain()
        await self.enroller.kept.close()  # the refused claims still to write (s42-ops)
        if self.runner is not None:
            await self.runner.cleanup()
        for listener in self.listeners:  # closed by the runner, unless it never started
            listener.close()
        if self.doorway is not None:
            for conn in list(self.doorway.early):
                if conn.transport is not None:
                    conn.transport.close()
        if self.send_threads is not None:  # their connections are closed: none sends now
            self.send_threads.close()
            self.send_threads = None
        self.content.close()
        if self._in_use_writer is not None:  # the last marks recorded before the store goes
            with contextlib.suppress(Exception):
                await self._in_use_writer
        await self.store.close()

    def reached_addresses(self) -> list[str]:
        """Where a device's URLs name the address it reached (Content.at: 127.0.0.1 is
        advertised, or several interfaces are named), each interface's address, not the
        loopback one no device can use, nor the first named one's only; else none."""
        cfg = self.config
        if not self.content.by_address():
            return []
        if url_stand_in(cfg, self.advertise):
            return named_addresses(cfg)
        return [address for _, address in reached_at(cfg, self.advertise)]

    def device_bases(self) -> tuple[str, ...]:
        """The base URLs devices are given: one per interface where each is given the
        address it reached (reached_addresses), else the base URL. What this server records
        among the inventory's servers (netboot.inventory.peers), so that a pair's devices on
        each of its VLANs are told an address of it they can reach."""
        base = self.base_url
        stand_in = url_stand_in(self.config, self.advertise)
        return tuple(dict.fromkeys(reached_url(base, address, stand_in)
                                   for address in self.reached_addresses())) or (base,)

    def summary(self) -> str:
        cfg = self.config
        stand_in = url_stand_in(cfg, self.advertise)
        reached = self.reached_addresses()
        https = self.url_holder.get("https", "")

        def each(url: str, path: str = "") -> str:
            return ", ".join(f"{reached_url(url, a, stand_in)}/{path}"
                             for a in reached) or f"{url}/{path}"

        # A loopback address advertised on purpose: DHCP and TFTP serve this host only.
        local = " on lo only (a loopback address advertised)" \
            if this_host_only(cfg, self.advertise) else ""
        lines = [
            f"netboot serving on {', '.join(reached) or self.advertise}"
            + (" (no address advertised: each device gets the one it reaches)"
               if reached else ""),
            f"  HTTP   {each(self.base_url)}  (iPXE chain URL: {each(self.base_url, 'boot.ipxe')})",
            (f"  HTTPS  {each(https)}  (API and configs; CA SHA-256 "
             f"{self.tls.ca_fingerprint or 'not given'}, printed by: netboot ca export)"
             if self.tls else "  HTTPS  off"),
            f"  TFTP   udp/{cfg.tftp.port}{local}" if cfg.tftp.enabled else "  TFTP   off",
            (f"  DHCP   {cfg.dhcp.mode} on udp/{cfg.dhcp.port} + udp/{cfg.dhcp.pxe_port}{local}"
             if cfg.dhcp.mode != "off" else "  DHCP   off"),
            f"  DNS    udp+tcp/{cfg.dns.port} zone {cfg.dns.zone}" if cfg.dns.enabled
            else "  DNS    off",
            f"  inventory {cfg.inventory_name}",
            f"  assets {assets_line(self.content.assets.roots)}",
            f"  discovery policy: {cfg.discovery.policy}",
        ]
        if self.new_admin_token_file:
            lines.append(f"  admin token created in {self.new_admin_token_file} (mode 0600; "
                         "send it as 'Authorization: Bearer <token>')")
        return "\n".join(lines)


def assets_line(roots: Sequence[Path]) -> str:
    """The directories files are served from, for the start-up summary. The first is the
    site's own (asset_roots: the data directory's assets/), where README says to put a
    profile's kernel, initrd and ISO: named even before it is made, which a fresh install's
    summary left out, naming only the shipped loaders' directories."""
    shown = [str(r) for r in roots if r.is_dir()]
    if roots and not roots[0].is_dir():
        shown.insert(0, f"{roots[0]} (not made yet: put a profile's files here)")
    return ", ".join(shown)


# Descriptors an HTTP connection holds: its socket (a file it sends is one of AssetFiles' kept
# descriptors, counted in OTHER_DESCRIPTORS).
PER_CONNECTION = 1
# And while a send thread sends its body (http.send_threads, a file of at least 768 KiB):
# the duplicates of its socket and of its file that only the thread closes
# (servers/sendthreads). Uncounted, 240 slow readers of a large file (a tenth of a
# provisioning VLAN's devices, or one host) under the 256 connections a 512 limit was said
# to hold ran the process out: every device's next asset was a 404 or a reset (s49-attack).
PER_THREAD_BODY = 2
# Descriptors a TFTP transfer holds: its socket, connected to the client on a port of its
# own (the listener's shared data port with tftp.single_port; servers/tftp._Link), and,
# while its file is streamed (above the packet cache's 16 MiB, or written in the last 2 s:
# storm.py's fresh loader), that file's own;
# a size probe or a download of a cached file holds the socket only (its datagrams are the
# cache's shared copy). Measured by benchmarks/tftp_slots.py, 1,100 held of each kind: 1.00
# a probe or a cached download, 2.00 a streamed one. The worst case is counted: a storm of
# streamed transfers past the limit would fail its opens (EMFILE) instead of queueing.
PER_TRANSFER = 2
# The rest, none of it growing with load: stdio, the event loop's epoll and wake-up pipe, the
# listeners (TFTP's listener, data socket and epoll per interface, DHCP's, DNS's, HTTP's and
# HTTPS'), SQLite's database, WAL and shared memory per connection (four), inotify on the
# templates, the HTTP side's kept asset descriptors (AssetFiles.max_open, 64), and those open
# for a moment: an asset read for the cache, a TFTP file while its packets are built. 27 at
# idle with a listener each (tftp_slots.py); the rest is for the moments. Not counted: a
# flood of connections past http.max_connections, each accepted (asyncio takes up to the
# listen backlog per wake-up) before its 503 closes it; if that runs the process out, asyncio
# pauses accepting for a second and a TFTP request is dropped for its retry (TftpServer).
OTHER_DESCRIPTORS = 256
# Transfers kept when the limit lowers the defaults: tftp.max_per_client's default, below
# which one relay's devices would be the whole server's.
FEWEST_TRANSFERS = 64


def descriptors(connections: int, transfers: int, *, send_threads: bool = False) -> int:
    """The open-files limit that ``connections`` HTTP connections and ``transfers`` TFTP
    transfers need at once (``send_threads``: each connection's body may be a thread's)."""
    return (per_connection(send_threads) * connections + PER_TRANSFER * transfers
            + OTHER_DESCRIPTORS)


def per_connection(send_threads: bool) -> int:
    """Descriptors an HTTP connection may hold."""
    return PER_CONNECTION + (PER_THREAD_BODY if send_threads else 0)


def raise_fd_limit(config: Config) -> Config:
    """Make room for the configured connections and transfers in the descriptor limit, or
    lower the default limits to what it holds; returns the config to serve with.

    systemd starts services with a soft limit of 1024 and a high hard limit (524,288 since
    v240), expecting a program that needs more to raise its own soft limit (as nginx does
    with worker_rlimit_nofile). When the hard limit is lower than what is needed, what is
    still an embedded default gives way, TFTP's transfers first, as dnsmasq restricts its
    --tftp-max to its descriptors and nginx runs with "worker_connections exceed open file
    resource limit": one WARNING naming the limit, what was lowered, and the fix. A value
    the operator set stops start-up (config.lowered), since what was asked cannot be given.
    """
    import resource

    from netboot.config import lowered, setting

    http, tftp = config.http, config.tftp
    # Transfers count when TFTP serves (what is set for it then is kept as it is).
    serving = tftp.max_transfers if tftp.enabled else 0
    threads = http.send_threads > 0
    per = per_connection(threads)
    need = descriptors(http.max_connections, serving, send_threads=threads)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft == resource.RLIM_INFINITY or soft >= need:
        return config
    room = soft - OTHER_DESCRIPTORS
    connections, transfers = http.max_connections, serving
    set_connections = "http.max_connections" in config.origins
    if tftp.enabled and "tftp.max_transfers" not in config.origins:
        floor = 1 if set_connections else FEWEST_TRANSFERS
        transfers = min(transfers, max(floor, (room - per * connections)
                                       // PER_TRANSFER))
    if not set_connections:
        connections = min(connections, (room - PER_TRANSFER * transfers) // per)
    fix = (f"raise LimitNOFILE= (systemd) / ulimit -n to {need}, or lower "
           "http.max_connections / tftp.max_transfers")
    why = (f"the open-files limit is {soft} (hard {hard}), below the {need} descriptors that "
           f"http.max_connections ({http.max_connections}) and tftp.max_transfers "
           f"({serving}) need")
    if connections < 1 or (tftp.enabled and transfers < 1) or descriptors(
            connections, transfers, send_threads=threads) > soft:
        # Nothing left to lower: what was set (or the limit itself) is the trouble.
        key = next((k for k in ("tftp.max_transfers", "http.max_connections")
                    if k in config.origins), "http.max_connections")
        origin = config.origins.get(key, (None, None))
        raise ConfigError(why, source=origin[0], line=origin[1], key=key, fix=fix)
    if not tftp.enabled:
        transfers = tftp.max_transfers
    limits = {"tftp.max_transfers": transfers, "http.max_connections": connections,
              "tftp.max_per_client": transfers, "http.max_connections_per_source": connections}
    fitted = lowered(config, limits, why=why, fix=fix)

    changes = [f"{key} {setting(config, key)} to {setting(fitted, key)}" for key in limits
               if setting(config, key) != setting(fitted, key)]
    log.warning("the open-files limit is %d (hard %d), below the %d descriptors that "
                "http.max_connections and tftp.max_transfers need: lowered %s; raise "
                "LimitNOFILE= (systemd) or ulimit -n to %d to serve them", soft, hard, need,
                ", ".join(changes), need)
    return fitted


def check_hostname_templates(config: Config) -> None:
    """A template typo must stop start-up (and `netboot check-config`), not fail every
    matching device's boot request."""
    from netboot.enroll import check_hostname_template
    from netboot.errors import ValidationError

    templates = [("enroll.hostname_template", config.enroll.hostname_template)]
    templates += [(f"discovery.rules[{i}].hostname_template", rule.hostname_template)
                  for i, rule in enumerate(config.discovery.rules) if rule.hostname_template]
    for key, template in templates:
        try:
            check_hostname_template(template)
        except ValidationError as exc:
            raise ConfigError(exc.message, key=key,
                              fix="use {mac_suffix}, {mac}, {serial}, {uuid}, {asset}, "
                                  "{cluster}, {role} or {product}") from exc


async def build(config: Config, *, app: bool = True) -> Service:
    """The service, its listeners not yet bound. ``app=False`` leaves aiohttp's application
    (and aiohttp's import) to :meth:`Service.start`, after the listeners answer: what
    ``serve`` does; every check that can stop a start (config, templates, store, TLS) is
    here either way."""
    events = EventBus()
    metrics = Metrics()
    events.listen(metrics.event)
    store, sealer = await open_inventory(config, events)
    try:
        advertise = advertised_address(config)
        await share_ca(config, store, sealer)
        tls = prepare_tls(config, advertise, sealer)
        from netboot import groups as grouping

        grouping.check_groups(config.discovery.rules)
        check_hostname_templates(config)
        await check_default_profile(config, store)
        if gone := await store.forget_stale_settings():
            log.info("dropped %d settings no one reads: the refused claims of deleted "
                     "machines, an older netboot's markers", gone)
        # Start-up's checks of what an older netboot stored, here (the clock's and the older
        # registrations' once the view is loaded): logged, and kept for GET /status.
        standing = Standing()
        await warn_of_missing_rule_refs(config, store, standing)
        await warn_of_unservable_profiles(store, standing)
        await mend_stray_columns(store)
        await warn_of_shared_fixed_addresses(store, standing)
        await look_at_names(store, standing)
        holder: dict[str, str] = {"base": public_base_url(config, advertise),
                                  "https": public_https_url(config, advertise)}
        # Late-bound: renders read the service's current certificate (reload_tls replaces it).
        stand_in = url_stand_in(config, advertise)
        # The other servers a device's register command tries after this one (a pair's
        # way out when the server that rendered a config is gone for good): the site's,
        # else the inventory's record as it changes (Peers.heard and refresh_if_due,
        # called from watch_once).
        named = tuple(url.rstrip("/") for url in config.server.peers)
        core = build_core(config, store, lambda: holder["base"],
                          trust=TrustOf(config, lambda: service.tls, lambda: holder["https"]),
                          stand_in=stand_in, peers=named)
        # (A lambda: the service is made below.) Its base URLs, one per interface where a
        # device is given the address it reached: Service.device_bases.
        peers = Peers(store, lambda: service.device_bases(),  # noqa: PLW0108
                      named=named,
                      told=core.content.set_peers)
        new_token = await ensure_admin_token(core.access, config.data_dir)
        # Before any config is served: a cluster made before agent tokens whose nodes have
        # none of their configs yet gets one now (its agents then never carry its token).
        for name in await core.give_agent_tokens():
            log.info("cluster %s: made its k3s agent token (its agents join with it)", name)
        http_log = logging.getLogger("netboot.http")
        ids = RequestIds()
        plain = PlainHttp(
            config.http.plain_api,
            https_url=lambda: holder["https"] if service.tls is not None else None,
            api_token_prefix=TOKEN_PREFIX, session_cookie=SESSION_COOKIE, log=http_log,
            stand_in=stand_in)
        if config.http.plain_api == "allow":
            log.warning("http.plain_api is allow: the API and the dashboard answer plain HTTP "
                        "from any peer, and tokens cross the network in clear")
        devices = DeviceRoutes(core.content, health=core.boot.health)
        front = FrontDoor(devices, log=http_log, observer=metrics, ids=ids, plain=plain)
        metrics.watch_inventory(core.boot.health, lambda: core.enroller.recorder.queued,
                                lambda: core.enroller.recorder.backlog)
        core.enroller.recorder.committed = metrics.inventory_commit
        skew = ClockSkew()
        metrics.read_clock_skew(lambda: skew.seconds)

        def make_app() -> web.Application:
            return web_app(config, core, events, metrics, devices, front, ids, plain, http_log,
                           standing)

        service = Service(config, store, core.enroller, core.boot, core.content,
                          make_app() if app else None, advertise,
                          new_admin_token_file=new_token, tls=tls, url_holder=holder,
                          tls_source=lambda addresses: prepare_tls(config, advertise,
                                                                   sealer, addresses),
                          metrics=metrics, events=events, front=front, app_factory=make_app,
                          clock_skew=skew, standing=standing, peers=peers)
        core.enroller.server_addresses = service.server_addresses
    except BaseException:
        await store.close()
        raise
    return service


def _import_aiohttp_side() -> None:
    """Import what aiohttp's application needs (the API, the dashboard: aiohttp itself;
    prometheus_client waits for the first scrape: netboot.metrics). aiohttp's client makes
    two TLS contexts as it is imported, each reading the system CA bundle: held back, and
    never read (netboot.cacerts): ``serve`` makes no outgoing HTTPS request, and the ~150
    certificates of each were ~2 MiB resident for good (benchmarks/README.md, issue 10,
    session 14). A request through those contexts would fail its verification, not go
    unverified."""
    if "frozenlist" not in sys.modules:
        # aiohttp's signals and middleware lists as frozenlist's pure-Python FrozenList (a
        # list behind a flag: iterated once per response), not its C++ extension, which
        # maps libstdc++ and libgcc_s into the process: 1.2 MiB resident for good that
        # nothing else here loads (benchmarks/README.md, issue 10, session 14). An entry
        # of None is how an import is refused; frozenlist falls back on ImportError.
        sys.modules.setdefault("frozenlist._frozenlist", None)  # type: ignore[arg-type]
    with deferred_system_cas():
        import netboot.api
        import netboot.servers.aio
        import netboot.web.dashboard  # noqa: F401


def web_app(config: Config, core: Core, events: EventBus, metrics: Metrics,
            devices: DeviceRoutes, front: FrontDoor, ids: RequestIds, plain: PlainHttp,
            http_log: logging.Logger, standing: Standing | None = None) -> web.Application:
    """aiohttp's application: the device routes (those the front door leaves), the API and
    the dashboard, under netboot's middlewares; the front door answers the installer's POSTs
    with the API's handlers from then on (until then they wait for aiohttp)."""
    from aiohttp import web

    from netboot.api import Api
    from netboot.servers.aio import (
        LOG_KEY,
        MAX_BODY_KEY,
        MAX_EVENT_KEY,
        OBSERVER_KEY,
        PLAIN_HTTP_KEY,
        REQUEST_IDS_KEY,
        body_timeout_middleware,
        errors_middleware,
        install,
        plain_http_middleware,
        request_middleware,
        serve_devices,
    )
    from netboot.web.dashboard import Dashboard

    # The plain-HTTP policy answers before any body is read (a login's token stays
    # unread), inside the error middleware that translates its refusal.
    app = web.Application(middlewares=[request_middleware, errors_middleware,
                                       plain_http_middleware, body_timeout_middleware],
                          client_max_size=config.http.max_body_bytes)
    install(app, body_timeout=config.http.body_timeout)
    app[REQUEST_IDS_KEY] = ids  # the front door's too: one sequence of request ids
    app[LOG_KEY] = http_log
    app[MAX_BODY_KEY] = config.http.max_body_bytes
    app[MAX_EVENT_KEY] = config.http.max_event_bytes
    app[OBSERVER_KEY] = metrics
    app[PLAIN_HTTP_KEY] = plain
    serve_devices(app, devices)
    api = Api(core, clock=time.time, events=events, standing=standing)
    api.add_to(app)
    front.take_reports(api, max_body=config.http.max_body_bytes,
                       max_event=config.http.max_event_bytes)
    Dashboard(core.access, core.boot.counts, metrics,
              metrics_public=config.metrics.public).add_to(app)
    return app


def web_runner(app: web.Application, access: logging.Logger | None) -> web.AppRunner:
    from aiohttp import web

    from netboot.servers.aio import AiohttpAccessLogger

    return web.AppRunner(app, access_log=access, access_log_class=AiohttpAccessLogger)


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``netboot serve`` runs on (``server.event_loop``); None = asyncio's.

    uvloop halves the per-datagram cost of the UDP servers (benchmarks/README.md: TFTP
    lock-step CPU per MiB, proxyDHCP offers/s); it is an optional dependency, so ``auto``
    falls back to asyncio's loop, which stays fully supported.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("uvloop is not installed", key="server.event_loop",
                              fix="install uvloop into netboot's environment (from the "
                                  "source checkout: pip install '.[fast]'), or set it to "
                                  "auto or asyncio") from None
        return None
    return uvloop.new_event_loop


# The interpreter's switch interval while the inventory view loads (brisk_switching).
LOAD_SWITCH_INTERVAL = 0.0005


@contextlib.contextmanager
def brisk_switching(interval: float = LOAD_SWITCH_INTERVAL) -> Iterator[None]:
    """The GIL handed between threads every ``interval`` seconds, not Python's 5 ms, while
    the block runs: the view's load at start-up (Service._load_view).

    The load decodes each page of 1,000 machines on the store's pager thread, in Python,
    ~15-50 ms holding the GIL; meanwhile a storm's DHCP decisions read through to the store
    (their machines not loaded yet), each handing the GIL between the event loop and the
    reader's thread several times, and each hand-off waited up to the switch interval. With
    100,000 machines at load 7-11, 35-88 % of a 1,000-DISCOVER storm passed decide_timeout
    (1 s), and 0-27 % with 0.5 ms, the load no slower (benchmarks/README.md, session 10).
    Only while loading: for the whole process, 0.5 ms made /ipxe slower (session 8)."""
    before = sys.getswitchinterval()
    if before <= interval:
        # Shorter already: set so, or another load's is on (two services in one process,
        # as tests run them), which restores it; restored here, it would stay short.
        yield
        return
    sys.setswitchinterval(interval)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


# Python's full-collection threshold while the inventory view loads (no_full_collections):
# more young collections than a load ever makes (~45 for 100,000 machines).
LOAD_FULL_THRESHOLD = 1 << 30


@contextlib.contextmanager
def no_full_collections(threshold: int = LOAD_FULL_THRESHOLD) -> Iterator[None]:
    """No full (oldest-generation) collection starts on its own while the block runs: the
    view's load at start-up (Service._load_view); young collections go on as ever.

    The load adds ~300,000 objects that live as long as the process (100,000 machines), and
    each full collection the collector starts meanwhile walks all of those loaded so far: 4
    of them in one load, 0.19-0.22 s of CPU and pauses of 60-240 ms in which no DHCP offer,
    TFTP block or HTTP answer of a start-up storm goes out (benchmarks/README.md, sessions 5,
    7 and s28-storm). None is needed: once loaded, FrozenHeap.start collects the whole heap
    once and freezes it. Cycles made meanwhile are still found by the young collections while
    young, and by that collection if older (a load that never ended, on a store that hangs
    without an error, would leave the older ones uncollected until it did)."""
    before = gc.get_threshold()
    if before[2] >= threshold:
        # Raised already: another load's is on (two services in one process, as tests run
        # them), which restores it; restored here, it would stay raised.
        yield
        return
    gc.set_threshold(before[0], before[1], threshold)
    try:
        yield
    finally:
        now = gc.get_threshold()
        gc.set_threshold(now[0], now[1], before[2])


# Seconds between two looks at the process's CPU time (release_when_quiet), and the share
# of one core that counts as busy: a boot storm uses most of one, an idle server ~1 %.
RELEASE_LOOK_SECONDS = 5.0
BUSY_SHARE = 0.1


class QuietAfterBusy:
    """Whether now is the moment to give freed memory back: the first quiet look after a
    busy stretch (a boot storm), once; never while busy (what was freed is about to be
    used again), never twice in a row of quiet looks (nothing more was freed)."""

    def __init__(self, busy_cpu: float) -> None:
        self._busy_cpu = busy_cpu  # CPU seconds between two looks that mean busy
        self._last: float | None = None
        self._busy = False

    def due(self, cpu: float) -> bool:
        """``cpu``: the process's CPU seconds so far (all threads), read at this look."""
        last, self._last = self._last, cpu
        if last is not None and cpu - last >= self._busy_cpu:
            self._busy = True
            return False
        was_busy, self._busy = self._busy, False
        return was_busy


async def release_when_quiet(release: Callable[[], None] = return_freed_memory,
                             look: float = RELEASE_LOOK_SECONDS,
                             cpu: Callable[[], float] = time.process_time,
                             caches: Callable[[], Awaitable[None]] | None = None) -> None:
    """After each busy stretch, once the process is quiet again, empty the store's
    ``caches`` (its connections' page caches: base.HeldCaches), then ``release`` the C
    heap's free pages (malloc_trim, on the default executor's thread: it walks every arena).

    A 1,000-device storm with 100,000 machines enrolled left ~3.5-5 MiB of the glibc heap
    free but resident (its buffers, the store threads' reads), of the ~20 MiB the storm
    added to the resident memory (issue 10: < 150 MiB; benchmarks/README.md, session 12).
    Python's own allocator keeps its arenas of small objects where one object of them
    lives on; this reaches only what it passed to malloc (blocks over 512 bytes: TFTP
    windows, request bodies, rendered configs) and the threads' arenas."""
    quiet = QuietAfterBusy(BUSY_SHARE * look)
    loop = asyncio.get_running_loop()
    while True:
        if quiet.due(cpu()):
            if caches is not None:
                await caches()
            await loop.run_in_executor(None, release)
        await asyncio.sleep(look)


class FrozenHeap:
    """Every object alive once the view is loaded kept out of the cyclic garbage collector's
    reach (gc.freeze), and what lives on after each full collection too.

    With 100,000 machines in the view the process holds ~300,000 objects that live as long as
    it does, and each full collection walks them all: 130-220 ms on this project's first
    2-core machine, during which no DHCP offer, TFTP block or HTTP answer goes out (a boot
    storm's p99). Frozen, a full collection walks only what was made since. But a storm makes
    objects that live too (each first install's machine, which replaces the frozen one in the
    view): Python's full collections came every ~3,000 first installs, each walking every
    machine changed since the start, ~19 µs per install and pauses up to 229 ms after
    ~90,000 installs (session 12). So what survives a full collection is frozen with the
    rest: the next one walks only what was made since the last.

    Frozen objects are still freed when their count drops to zero (a machine the view
    replaces); only a reference cycle among them would stay. So the garbage there is now is
    collected first, once, and again, the whole heap thawed and collected, whenever the
    frozen objects have doubled since (``GROWTH``; a storm of first installs of all 100,000
    machines adds ~35 %): whatever cycles objects frozen alive have become since is bounded
    by that growth, and collected then (a pause longer than the start-up's collection:
    390-420 ms under load with 100,000 machines, session 12). (The request
    paths make no cycles: gc.DEBUG_SAVEALL over a storm's first installs saved nothing,
    session 10.)

    While frozen, the young and middle generations' thresholds are ``YOUNG`` (Python's are
    700 and 10), given back at stop. A young collection is due once the tracked objects
    alive have grown by the first since the last one, and the requests in flight swing that
    count by more than 700 by themselves (50 first installs hold ~2,000 tracked objects:
    coroutines, futures, batches, machine copies, freed at the answer): at 700 a young
    collection came every ~40 first installs, walked ~1,200 objects, nearly all of them
    requests' objects still in flight, and moved those to the middle generation, whose
    collections moved them on to the oldest, bringing its full collections closer. At 2,000
    the swing seldom reaches it: 6-10 times fewer young collections on first installs and
    first configs, the objects the collector walks per request, every generation included,
    35 -> 15 and 25 -> 10, and full collections 2-2.5 times rarer, each walking ~1.4 times
    more (what survived since the last freeze); per first DISCOVER 65 -> 55
    (benchmarks/README.md, s30-gc). The middle generation's 3 (was 10): each young
    collection now hands it more, and at 3 its collections walk 1.8-2.7 times what they did
    at 700 (2.9-3.9 times at 10). Raised to (10,000, 10) instead, each older-generation
    collection walked ten times more survivors: in a storm of enrolled machines' first
    DISCOVERs the offers' p99 rose from ~4 to 6-12 ms with stalls up to 19 ms
    (dhcp_offers.py, session 10).
    """

    YOUNG = (2000, 3)  # the young and middle generations' thresholds while frozen

    GROWTH = 2.0  # the frozen count, against the last thaw's, that asks for the next
    # Full collections per look at the frozen count: gc.get_freeze_count() walks every frozen
    # object (~3 ms with 400,000 of them under load). Counting what each freeze adds instead
    # (gc.get_objects(2)) counted the requests' objects that were alive then and freed just
    # after: a thaw (400 ms under load with 100,000 machines) came twice as often.
    LOOK_EVERY = 16

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._full = 0  # full collections since the last thaw
        self._limit = sys.maxsize
        self._young: tuple[int, int] | None = None  # the thresholds start replaced
        self.thaws = 0

    def start(self) -> None:
        """Freeze now and after each full collection (``Service.view_loaded``), with the
        young generations' thresholds at ``YOUNG``; in the loop."""
        self._loop = asyncio.get_running_loop()
        self._thaw()
        if self._collected not in gc.callbacks:
            gc.callbacks.append(self._collected)
        if self._young is None:
            # The oldest generation's is left as it is: no_full_collections may hold it.
            young, middle, oldest = gc.get_threshold()
            self._young = young, middle
            gc.set_threshold(*self.YOUNG, oldest)

    def stop(self) -> None:
        """No more freezing (what is frozen stays so); the young thresholds given back."""
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._collected)
        self._loop = None
        if self._young is not None:
            gc.set_threshold(*self._young, gc.get_threshold()[2])
            self._young = None

    def _collected(self, phase: str, info: dict[str, int]) -> None:
        # Called by the collector in whichever thread allocated (the GIL held); a collection
        # cannot be started from here, so the thaw goes to the loop.
        if phase != "stop" or info["generation"] != 2:
            return
        gc.freeze()
        self._full += 1
        loop = self._loop
        if loop is not None and not self._full % self.LOOK_EVERY \
                and gc.get_freeze_count() > self._limit:
            self._limit = sys.maxsize  # one thaw asked for at a time
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._thaw)

    def _thaw(self) -> None:
        self._limit = sys.maxsize  # the collection below calls _collected too
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.thaws += 1
        self._full = 0
        self._limit = int(gc.get_freeze_count() * self.GROWTH)


async def serve(config: Config, *, ready: asyncio.Event | None = None) -> None:
    """Build, start and run the service until SIGINT/SIGTERM. Its listeners answer before
    aiohttp is imported (:meth:`Service.start`)."""
    # A fatal signal in C code (SIGSEGV, SIGBUS from a mapped file) still ends the process,
    # but with the Python stacks of every thread on stderr rather than without a line.
    if not faulthandler.is_enabled():
        faulthandler.enable()
    service = await build(config, app=False)
    frozen = FrozenHeap()
    service.view_loaded = frozen.start
    store = service.store

    async def caches() -> None:
        service.forget_idle()
        await release_held_caches(store)

    service.tasks.append(asyncio.ensure_future(release_when_quiet(caches=caches)))
    try:
        await service.start()
        print(service.summary(), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("shutting down")
    finally:
        frozen.stop()
        await service.close()
