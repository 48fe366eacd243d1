"""Operations shared by the API and the CLI: one rule for each, whichever face is asked.

Validation, referential integrity and defaults for machines, profiles, clusters and groups;
approval and reinstall; and what a device would get (``render``, ``explain``), computed by the
very calls the HTTP server makes. ``api.py`` and ``cli.py`` turn a request or the command line
into plain data (the JSON shapes of the API), call here and format the answer; neither decides
anything itself (as matchbox's ``server.Server`` sits below its HTTP and gRPC faces).

Errors are the ones of :mod:`netboot.errors`: ValidationError naming the field (400, exit 2),
NotFound (404), Conflict (409) naming what is in the way.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from netboot import groups as grouping
from netboot import identity, lifecycle
from netboot.access import AUDIT_KEEP, Access
from netboot.addresses import check_fixed_ipv4
from netboot.boot import BootService
from netboot.content import Content
from netboot.enroll import Enroller, check_hostname, check_hostname_template, enroll_only_refusal
from netboot.errors import (
    DECIDE_ATTEMPTS,
    Conflict,
    NotFound,
    OutcomeUnknown,
    PreconditionFailed,
    StateChanged,
    StoreError,
    ValidationError,
)
from netboot.inventory import codec
from netboot.inventory.base import INSTALLS_UNDER_WAY, Batch, InstallsSince, MachineFilter, Store
from netboot.logs import printable
from netboot.model import (
    ID_PREFIX,
    Arch,
    BootAction,
    BootPlan,
    BootRequest,
    Cluster,
    Event,
    Firmware,
    Group,
    MacAddress,
    Machine,
    MachineState,
    Profile,
    Role,
)
from netboot.pki import K3S_AGENT_USER, k3s_ca_hash, k3s_secure_token, k3s_server_ca

KINDS = ("profiles", "clusters", "groups")
RENDER_KINDS = ("ipxe", "pxelinux", "grub", "config", "nocloud")
NOCLOUD_FILES = ("meta-data", "user-data", "vendor-data")
# The config formats a profile can name (templates/cloud-config/): any other was rendered
# as k3os.
CONFIG_TEMPLATES = ("k3os", "cloud-init")
# What a render shows where a device's one-time install token would be (none is issued). In
# a token's own alphabet (URL-safe base64), so it is quoted and escaped exactly as a real one
# (in URLs, JSON, shell), and the rest of the text is byte for byte what the device gets.
TOKEN_PLACEHOLDER = "INSTALL-TOKEN"
# What ``netboot render`` shows in place of a cluster's k3s CA key.
CA_KEY_PLACEHOLDER = "K3S-CA-KEY"
MACHINE_INPUT = frozenset({"mac", "macs", "hostname", "uuid", "serial", "asset", "labels",
                           "cluster", "role", "profile", "loader", "fixed_ipv4"})
APPROVE_INPUT = ("cluster", "role", "profile", "hostname")
# What an edit (PATCH, `machines set`) may change, as a machine's attributes, in the order its
# "updated" event names them.
_EDITABLE = ("macs", "hostname", "uuid", "serial", "asset", "labels", "cluster", "role",
             "profile", "loader", "fixed_ipv4")
# A URL scheme (RFC 3986 §3.1) before the first '/': netboot hands on http(s) URLs as they
# are (content.Urls.asset) and reads anything else as a path under assets.dirs, where
# "tftp://host/x" or "file:/x" is never found.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


# An external cluster's server_url, as k3s's --server takes it: https://, a host name (Go's URL
# parser, and so k3s, takes an underscore in one: some sites have them) or an
# IPv4 address or a bracketed IPv6 address (each form ipaddress and urlsplit take), a port
# of 1 to 65535, a path of printable ASCII; nothing else. It is written into every agent's
# config; "https://" and anything after it was taken, control characters and all, and k3s
# on each agent failed to parse it (and a URL parser in a client of the API raised on it).
_H16 = "[0-9A-Fa-f]{1,4}"
_IPV6 = "|".join((f"(?:{_H16}:){{7}}{_H16}", f"(?:{_H16}:){{1,7}}:",
                  *(f"(?:{_H16}:){{1,{7 - n}}}(?::{_H16}){{1,{n}}}" for n in range(1, 7)),
                  f":(?:(?::{_H16}){{1,7}}|:)"))
_PORT = ("(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}"
         "|[1-9][0-9]{0,3})")
_LABEL = "[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
# The end as (?![\s\S]), not $ (which also matches before a last newline): openapi's.
SERVER_URL_PATTERN = (f"^https://(?:{_LABEL}(?:[.]{_LABEL})*|\\[(?:{_IPV6})\\])(?::{_PORT})?"
                      "(?:/[!-~]*)?(?![\\s\\S])")


def check_asset_ref(field: str, ref: str, *, url: bool = True, path: bool = True) -> None:
    """Refuse a profile's kernel, initrd or asset that netboot could never serve: it was
    stored and each boot was refused (the asset route's 403 for '..', a 404 for the rest).

    A path is relative to ``assets.dirs`` ('k3os/vmlinuz', the README's form), with no '..'
    segment (the asset route and TFTP refuse one, files.clean_relative) and not absolute: a
    leading '/' was read from the assets' root, so '/var/lib/netboot/assets/k3os/vmlinuz' or
    matchbox's '/assets/k3os/vmlinuz' named a file that is not there. An http(s) URL (where
    ``url``) is fetched by the firmware itself. No control character (a newline would start
    a command of its own in an iPXE, pxelinux or GRUB script), and no space in a URL: it
    is written into the script as given, where a space ends it (a path is percent-quoted in
    iPXE's URL, content.Urls.asset, so a space there is kept). ``path``: False where only
    a URL will do (a profile's iso_url, which the installer fetches as given)."""
    bad = next((c for c in ref if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ValidationError(field, f"{ref!r} holds {bad!r}: a boot script would read it as "
                                     "the end of the line")
    if ref.startswith(("http://", "https://")) and url:
        if len(ref.split("/", 3)[2]) == 0:
            raise ValidationError(field, f"{ref!r} names no host")
        if " " in ref:  # iPXE, pxelinux and GRUB split their lines at ASCII spaces only
            raise ValidationError(field, f"{ref!r} holds a space: a boot script would read it "
                                         "as the end of the URL (write it %20)")
        return
    if not path:
        raise ValidationError(field, f"{ref!r} is not an http:// or https:// URL: the "
                                     "installer fetches it as given")
    fix = ("a path relative to assets.dirs (e.g. 'k3os/vmlinuz')"
           + (" or an http:// or https:// URL" if url else ""))
    scheme = _SCHEME.match(ref)
    if scheme:
        raise ValidationError(field, f"{ref!r} is a {scheme[0]} URL, which netboot does not "
                                     f"serve or hand on; give {fix}")
    if ref.startswith("/"):
        raise ValidationError(field, f"{ref!r} is not relative; give {fix}")
    # A backslash is a separator where the path is served (files.clean_relative).
    if ".." in re.split(r"[/\\]", ref):
        raise ValidationError(field, f"{ref!r} leaves the assets: '..' is refused when "
                                     f"served; give {fix}")


def profile_file_errors(profile: Profile) -> list[tuple[str, ValidationError]]:
    """Each file a profile names as netboot does not take it (:func:`check_asset_ref`): its
    kernel, initrds, assets, fdtdir and iso_url. A write is refused for the first
    (:meth:`Core.put`); a profile stored before these checks (session 35) is shown with all
    of them (``problems``, :func:`public_dict`; ``netboot assets``; a warning at start), so
    its operator learns why its PUT is refused (and, for a '..' or a URL netboot does not
    hand on, why its boots fail). Each with the text the profile gives."""
    checks: list[tuple[str, str, bool, bool]] = [("kernel", profile.kernel, True, True)]
    checks += [(f"initrds[{i}]", ref, True, True) for i, ref in enumerate(profile.initrds)]
    # netboot assets checks these files on disk (cli._assets): no URL.
    checks += [(f"assets[{i}].path", a.path, False, True) for i, a in enumerate(profile.assets)]
    # U-Boot fetches <fdtdir>/<board>.dtb over TFTP, from the assets as the kernel's path is
    # (templates/pxelinux/install.cfg); the installer fetches iso_url (the k3OS command
    # line's k3os.install.iso_url), where a space would end it.
    if profile.fdtdir:
        checks.append(("fdtdir", profile.fdtdir, False, True))
    if profile.iso_url:
        checks.append(("iso_url", profile.iso_url, True, False))
    errors = []
    for field, ref, url, path in checks:
        try:
            check_asset_ref(field, ref, url=url, path=path)
        except ValidationError as exc:
            errors.append((ref, exc))
    return errors


def check_name(name: str) -> None:
    # Names are path segments of /api/v1/<kind>/<name> and appear in iPXE script comments:
    # a '/' would make the object unaddressable, a newline would end the comment line.
    if ("/" in name or name != name.strip() or len(name) > 253
            or any(not ch.isprintable() for ch in name)):
        raise ValidationError("name", f"{name!r}: use printable text without '/' or "
                                      "surrounding spaces (at most 253 characters)")


def machine_dict(machine: Machine) -> dict[str, Any]:
    """A machine as the API and ``--json`` show it: every field but its token hash, and its
    first NIC as ``mac`` (and ``mac_hexhyp``) for clients written when a machine had one."""
    out = codec.machine_to_dict(machine, secrets=False)
    out["mac"] = str(machine.mac) if machine.mac else None
    out["mac_hexhyp"] = machine.mac.hexhyp if machine.mac else None
    out["state_since"] = machine.in_state_since  # None stored: in it since it was created
    return out


# The fields a machine's "updated" event says from what to what (one short value each);
# the others (macs, labels, identifiers) are named only.
_SHOWN_CHANGE = frozenset({"hostname", "cluster", "role", "profile", "loader", "fixed_ipv4"})


def _change(field: str, before: Any, after: Any) -> str:
    """One field of an edit as its event says it: a move read "changed cluster" between
    the reinstall and the next install into the new cluster, with no word of which the
    machine left (s48-review)."""
    if field not in _SHOWN_CHANGE:
        return field
    return (f"{field} {printable(str(before)) if before else 'none'} to "
            f"{printable(str(after)) if after else 'none'}")


def public_dict(kind: str, item: Any) -> dict[str, Any]:
    """A profile, cluster or group as the API and ``--json`` show it (never a cluster token)."""
    if kind == "profiles":
        out = codec.profile_to_dict(item)
        errors = profile_file_errors(item)
        if errors:
            out["problems"] = [{"field": e.field, "error": e.message} for _, e in errors]
        return out
    if kind == "clusters":
        out = codec.cluster_to_dict(item, secrets=False)
        problems = cluster_problems(item)
        if problems:
            out["problems"] = problems
        return out
    return codec.group_to_dict(item)


def item_version(kind: str, item: Any) -> str:
    """A profile's, cluster's or group's version, as the API's ETag carries it for a later
    replace's If-Match (RFC 9110 §13.1.1): the SHA-256 of what a GET shows of it. Never of
    a cluster's secrets: a read token holder could test guesses of a weak one against it
    (a change of them alone is still caught by the write's compare-and-set on the cluster
    as read, Core._put_cluster)."""
    shown = json.dumps(public_dict(kind, item), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(shown.encode()).hexdigest()[:32]


def _require_item_version(kind: str, item: Any, versions: Collection[str] | None) -> None:
    if versions is not None and item_version(kind, item) not in versions:
        raise PreconditionFailed(f"{kind[:-1]} {item.name!r} changed since the version given "
                                 f"(it is {item_version(kind, item)} now): read it again")


_T = TypeVar("_T")
_log = logging.getLogger(__name__)
# Machines read a page at a time where every one of a kind is looked at (a group delete's
# installs under way).
_PAGE = 1000
# A node's newest events read back after a commit whose answer was lost (Core._not_stored):
# the lost one is among them unless this many were written to the node since.
_READ_BACK = 100


# A group delete's catch-up on the installs begun during its look (Core.delete): at most
# _CATCH_UP reads outside the delete's transaction, until one finds _FEW_UNDER_WAY or fewer.
_CATCH_UP = 4
_FEW_UNDER_WAY = 100


def _installs_given(group: Group, groups: Sequence[Group], machines: Iterable[Machine],
                    ) -> list[str]:
    """Those of ``machines`` whose install is under way (booting, installing) with
    ``group``'s profile: their own names none and the group selects them (of ``groups``)
    as their stored labels and facts read. The install plan binds a machine's cluster and
    role (lifecycle.JOINED), not its profile, which its config reads again
    (BootService.config_plan): a delete in between broke the install (its config a 409
    naming no profile, or the default profile's). Looked at before the delete
    (Core._installing_with), then in the delete's transaction at the machines written
    since (InstallsSince): an install planned between the two is seen."""
    using: list[str] = []
    for machine in machines:
        if machine.profile is not None or machine.state not in INSTALLS_UNDER_WAY:
            continue
        chosen = grouping.select(groups, grouping.machine_labels(machine))
        if chosen is not None and chosen.name == group.name:
            using.append(f"machine {machine.ref}")
    return using


def _refuse_installs(group: Group, using: list[str], most: int = 5) -> None:
    """The 409 of a group's delete while it gives ``using`` (``most`` named, then how many
    more) their install's profile."""
    if using:
        installing = using[:most] + ([f"{len(using) - most} more machines"]
                                     if len(using) > most else [])
        raise Conflict(
            f"group {group.name!r} gives its profile {group.profile!r} to "
            f"{', '.join(installing)}, whose install is under way: its "
            "installer fetches its config from it, which without the group is a "
            "409 (or another profile's) and the install breaks midway. Wait for "
            "those installs to finish, or give each machine the profile itself "
            f"(netboot machines set REF --profile {group.profile}), then delete it",
            field="name")


async def _again_on_change(step: Callable[[], Awaitable[_T]]) -> _T:
    """``step``: a read, its checks, and a compare-and-set write on that read; made again on
    what is stored now when another writer (a server, a CLI) changed it between the two
    (StateChanged), up to DECIDE_ATTEMPTS times, then that refusal (a 409)."""
    for attempt in range(1, DECIDE_ATTEMPTS + 1):
        try:
            return await step()
        except StateChanged:
            if attempt == DECIDE_ATTEMPTS:
                raise
    raise AssertionError("unreachable")  # the loop returns or raises


# k3s's secure token: "K10" and the server CA's SHA-256 (hex), then "::" (k3s clientaccess).
_SECURE_TOKEN = re.compile(r"K10[0-9a-f]{64}::")


# The fewest characters of a join token's secret taken as not weak. k3s takes any non-empty
# token and bounds no guesses at its join endpoints (its /v1-k3s/ routes check each basic
# auth as it comes), and a secure token's CA hash is public (/cacerts): the secret is all a
# guess has to find. k3s's own are 32 hex characters (128 bits), netboot's 64.
WEAK_TOKEN_BELOW = 16
# The states of a node that fetched its config (its k3s runs, or will, on what it was given).
_CONFIGURED = (MachineState.INSTALLING, MachineState.INSTALLED, MachineState.REGISTERED,
               MachineState.FAILED)
# A refused registration's claim: the sha256 of its install's secret (enroll._contested).
_CLAIM = re.compile("[0-9a-f]{64}")
# The nodes told, each by an event, that a forced agent token change left them on the old.
_FORCE_TOLD = 10_000
# The event each node that had its config gets when one of its cluster's tokens is changed
# by force (Core._running_change): literal kinds, so that the kinds netboot writes are read
# from its source and refused as a device's report (tests/test_enroll.py).
_FORCED_KINDS = {"token": "token changed", "agent_token": "agent token changed"}


def token_secret(token: str) -> str:
    """The part of a k3s join token that is the secret, as k3s's parseToken reads it: after
    ``K10<hash>::`` and a ``user:`` if any; the whole of a short token."""
    if token.startswith("K10") and "::" in token:
        rest = token.partition("::")[2]
        return rest.partition(":")[2] if ":" in rest else rest
    return token


def weak_token(token: str) -> str | None:
    """Why ``token`` (a cluster's k3s join token) is weak, or None: a secret of fewer than
    :data:`WEAK_TOKEN_BELOW` characters, or one character repeated. Never shows the token."""
    secret = token_secret(token)
    if len(secret) < WEAK_TOKEN_BELOW:
        return (f"its secret is {len(secret)} characters: k3s bounds no guesses at its join "
                f"endpoints, so a host reaching a server of it can try them; use "
                f"{WEAK_TOKEN_BELOW} or more random ones (k3s makes 32 hex characters)")
    if len(set(secret)) == 1:
        return "its secret is one character repeated: give a random one"
    return None


def cluster_problems(cluster: Cluster) -> list[dict[str, str]]:
    """What an operator should know of ``cluster``, as a profile's problems are shown: a
    join token in k3s's short form, with which an agent checks nothing of the server it
    joins (k3s sends the token to whoever answers at the endpoint; the secure form's CA hash
    makes an agent refuse a server whose CA is not the cluster's). A cluster made before
    netboot made k3s CAs keeps it until its operator opts in (session 37's note); said where
    an operator looks (``clusters ls``/``show``, GET /clusters, the dashboard), with the way
    out for its case. The token is not shown: only its form."""
    if not cluster.token:
        return []
    problems = []
    weak = weak_token(cluster.token)
    if weak:
        # Whatever its form: the secure form's CA hash is public, its secret is not.
        problems.append({"field": "token", "error": f"a weak k3s join token: {weak}"})
    weak = weak_token(cluster.agent_token) if cluster.agent_token else None
    if weak:  # an operator's own, given: every agent's config carries it
        problems.append({"field": "agent_token", "error": f"a weak k3s agent token: {weak}"})
    if cluster.managed and not cluster.agent_token:
        # Its servers were configured before netboot made agent tokens (Core.
        # give_agent_tokens gave it none): its agents are given the cluster's token, which
        # k3s takes for a server's join too (README "k3s's agent token").
        problems.append({"field": "agent_token", "error": (
            "no agent token: its agents join with the cluster's token, which k3s also "
            "takes for a server's join, so root on an agent, or whoever reads an agent's "
            "config, can join its control plane and read its datastore. Fix: reinstall "
            f"every node of it (netboot machines reinstall), then restart netboot or edit "
            f"cluster {cluster.name} before any of them fetches its config: it is given one")})
    if _SECURE_TOKEN.match(cluster.token):
        return problems
    node_token = ("the secure token its first server wrote, "
                  "/var/lib/rancher/k3s/server/node-token (K10…), as its token")
    if cluster.managed:
        fix = (f"'netboot clusters set {cluster.name} --secure-token' while none of its nodes "
               f"has fetched its config; after, give it {node_token} "
               f"(PUT /api/v1/clusters/{cluster.name} with \"token\")")
    else:
        fix = f"give it {node_token.replace('its first server', 'one of its servers')}"
    return [{"field": "token", "error": "the short k3s join token: an agent joining checks "
             "nothing of the server it reaches at the endpoint, and sends it the token; the "
             f"secure form (K10<CA hash>::…) makes it refuse a server that is not the "
             f"cluster's. Fix: {fix}"}, *problems]


def _given(value: str, data: Mapping[str, Any], key: str, create: bool) -> str | None:
    """A cluster's secret as its creator or an edit gave it (None: not given)."""
    return value if value and (create or key in data) else None


def _secret(token: str, ca_cert: str) -> str:
    """The secret a cluster's stored token wraps: after "::" and the user, as k3s's
    parseToken reads it, where the cluster's CA made it the secure form; else as stored."""
    return token_secret(token) if ca_cert else token


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValidationError("kind", f"{kind!r} is not one of {', '.join(KINDS)}")
    return kind[:-1]


def _identifier(kind: str, value: str | None) -> str | None:
    return identity.enrolled_value(kind, value) if value else None


def _mac_or_none(ref: str) -> MacAddress | None:
    try:
        return MacAddress.parse(ref)
    except ValidationError:
        return None


async def machine_ref(store: Store, ref: str) -> str:
    """``ref`` as the machine commands take it, where an operator may name a machine by its
    hostname (every API ``{ref}``, every CLI REF): the text itself when it is a machine id
    (``m-…``) or one of its MACs, the id of the machine whose hostname it is (any case)
    otherwise. The order of lookup is the id or MAC first, then the hostname; a text that is
    both (a hostname spelled as a MAC, ``aabbccddeeff``) and names two machines is a
    Conflict listing both, never either one: a ``DELETE`` must not take the machine the
    operator did not mean. A machine's id always names it (a hostname spelled as another
    machine's id does not take it: the Conflict's remedy is the id). Texts that cannot be
    hostnames (a MAC with colons) cost no hostname read, as before; a valid hostname nobody
    has is NotFound."""
    bare = ref.strip()
    try:
        name = check_hostname(bare)
    except ValidationError:
        if bare.startswith(ID_PREFIX) or _mac_or_none(bare) is not None:
            return ref  # a MAC with ':' or '.'
        raise ValidationError("mac", f"{ref!r} is neither a MAC address (aa:bb:cc:dd:ee:ff), "
                                     f"a machine id ({ID_PREFIX}…) nor a hostname") from None
    by_name = await store.get_machine_by_hostname(name)
    if not bare.startswith(ID_PREFIX) and _mac_or_none(bare) is None:
        if by_name is None:
            raise NotFound(f"machine {ref} not found (give one of its MACs, its id or its "
                           "hostname)")
        return by_name.id
    if by_name is None:
        return ref
    other = await identity.by_ref(store, bare)
    if other is None or other.id == by_name.id:
        return by_name.id
    if bare.startswith(ID_PREFIX):
        # An id names its machine, whatever another's hostname spells: it is what the 409
        # below tells the operator to give, and the only name of a machine enrolled without
        # a MAC or a hostname (an enroll token may give a machine such a hostname).
        return other.id
    raise Conflict(f"{ref!r} names two machines: {other.id} by its MAC and {by_name.id} "
                   f"by its hostname {by_name.hostname}: give the one you mean by its id",
                   field="ref", candidates=(other.id, by_name.id))


def older_registrations(machines: Iterable[Machine]) -> list[Machine]:
    """The registered machines an older netboot's register command registered (no install
    secret: configs rendered before session 39; before session 37 also no machine token
    kept): they keep that command's weaker rules (a repeat registration from their address
    is answered without proof) until reinstalled. ``machines``: the loaded view's (service:
    once loaded, at every start; no read of the store). A start-up read every registered
    machine from the store until a start found none, then a marker in the settings stopped
    it for good: in a rolling upgrade (several servers, one PostgreSQL) the first upgraded
    server wrote it while another, still older, registered machines without a secret, which
    no later start then named (s41-ops)."""
    return [m for m in machines
            if m.state is MachineState.REGISTERED and m.secret_hash is None]


# How often at most a running server looks again for machines an older register command
# registered (OlderRegistrations), while the count of registered machines moves: a look
# reads every machine the view holds (~38 ms at 100,000 in CPython: s41-ops).
OLDER_LOOK_SECONDS = 10.0


class OlderRegistrations:
    """The machines an older register command registered (:func:`older_registrations`), each
    named once while it stays one: at the start (all of them), then live, as a running
    server's view brings another server's registrations (a rolling upgrade: an older server
    of the inventory registers machines without a secret while this one runs, which only
    the next start named: s41-ops, s42-ops). Looked for again only when the number of
    registered machines moved, at most every ``every`` seconds."""

    __slots__ = ("_every", "_next", "_registered", "_told", "current")

    def __init__(self, every: float = OLDER_LOOK_SECONDS) -> None:
        self._every = every
        self._next = -math.inf
        self._registered: int | None = None
        self._told: set[str] = set()
        # Every one found at the last look, named before or not (what /status shows).
        self.current: list[Machine] = []

    def due(self, registered: int, now: float) -> bool:
        """Whether to look (:meth:`new`) with ``registered`` machines registered at ``now``."""
        return registered != self._registered and now >= self._next

    def new(self, machines: Iterable[Machine], registered: int, now: float) -> list[Machine]:
        """The machines of ``machines`` an older register command registered, not named
        before (one reinstalled and registered so again is named again)."""
        self._registered, self._next = registered, now + self._every
        older = self.current = older_registrations(machines)
        told = self._told
        self._told = {m.id for m in older}
        return [m for m in older if m.id not in told]


def _arch(text: str | None) -> Arch | None:
    try:
        return Arch(text) if text else None
    except ValueError:
        raise ValidationError("arch", f"{text!r} is not one of "
                              f"{', '.join(a.value for a in Arch)}") from None


class Core:
    def __init__(self, store: Store, enroller: Enroller, boot: BootService, content: Content,
                 *, clock: Callable[[], float] = time.time,
                 audit_keep: int = AUDIT_KEEP, secure_token: bool = True) -> None:
        self.store = store
        self.enroller = enroller
        self.boot = boot
        self.content = content
        self._clock = clock
        # enroll.k3s_secure_token: a new managed cluster gets its k3s server CA and the
        # secure join token (_managed_join).
        self._secure_token = secure_token
        # Tokens, scopes and the audit log: one set of rules for the API, CLI and dashboard.
        self.access = Access(store, clock=clock, commit=enroller.recorder.commit,
                             audit_keep=audit_keep)

    # -- machines -----------------------------------------------------------------------
    async def machine(self, ref: str) -> Machine:
        """The machine ``ref`` names: one of its MACs or its id (netboot.identity.by_ref)."""
        return await identity.require_ref(self.store, ref)

    async def _parse_machine(self, data: Mapping[str, Any]) -> Machine:
        if "state" in data:
            # A state is what happened to the machine (netboot.lifecycle), not a setting.
            raise ValidationError("state", "is set by what happens to the machine: use "
                                  "POST /api/v1/machines/{ref}/approve or .../reinstall "
                                  "(netboot machines approve|reinstall)")
        unknown = sorted(set(data) - MACHINE_INPUT)
        if unknown:
            raise ValidationError(unknown[0], "unknown or read-only field")
        # A machine has NICs ("macs"); "mac", for clients that know one, is its first.
        fields = dict(data)
        mac_text = fields.pop("mac", None)
        macs = list(codec.macs_from_list(fields.pop("macs", None) or []))
        if mac_text is not None:
            if not isinstance(mac_text, str):
                raise ValidationError("mac", "must be a string such as aa:bb:cc:dd:ee:ff")
            mac = MacAddress.parse(mac_text)
            macs = [mac, *(m for m in macs if m != mac)]
        for i, nic in enumerate(macs):
            identity.enrolled_mac(nic, "mac" if i == 0 and mac_text is not None else "macs")
        machine = replace(codec.machine_from_dict(fields), macs=tuple(macs))
        if machine.hostname == "":
            # No host name (OpenAPI's pattern refuses it), and not stored as one: a machine
            # named "" held that name against a second "" and shared frames with nameless
            # ones (Content._framed).
            raise ValidationError("hostname", "'' is not a hostname: send null, or leave "
                                              "it out, for none")
        if machine.hostname is not None:
            machine = replace(machine, hostname=check_hostname(machine.hostname))
        # UUIDs in canonical form, as firmware's are before they are matched (bulk import does
        # the same); garbage, or a placeholder thousands of boards share, is a 400 naming the
        # field, not a machine that nothing matches or everything does.
        machine = replace(machine, uuid=_identifier("uuid", machine.uuid),
                          serial=_identifier("serial", machine.serial),
                          asset=_identifier("asset", machine.asset))
        await self.enroller.validate_refs(machine.cluster, machine.profile)
        return machine

    async def create_machine(self, data: Mapping[str, Any], *, note: str) -> Machine:
        """Enroll one machine; ``note`` says how (the message of its 'enrolled' event).

        It needs one identifier (a MAC, serial, asset tag or UUID: 400 naming ``mac``); one
        that another machine holds is a 409 naming the field and the holder, unless the holder
        is a ``discovered`` record of the same device, which it takes over
        (:meth:`Enroller.enroll`)."""
        machine = await self._parse_machine(data)
        check_fixed_ipv4(machine.fixed_ipv4, self.enroller.server_addresses())
        if machine.fixed_ipv4 is None and machine.cluster is None and machine.profile is None:
            return await self.enroller.enroll(replace(machine, updated=self._clock()), note)
        async with self.enroller.fixed_lock:  # checked and written with no other between
            await self._refs_still(machine.cluster, machine.profile)
            await self._fixed_ipv4_free(machine.fixed_ipv4, None)
            return await self.enroller.enroll(replace(machine, updated=self._clock()), note)

    async def _refs_still(self, cluster: str | None, profile: str | None) -> None:
        """The cluster and profile a write names, checked again under ``enroller.fixed_lock``
        (held by the write to its commit, and by :meth:`delete`'s delete): one checked
        before (validate_refs) and deleted by another writer since (another server or a CLI
        on this inventory, whose delete found no machine naming it yet) is a 409 naming it,
        not a machine left naming one that is gone (held at its next boot)."""
        await self.enroller.refs_still({cluster: 0} if cluster else {},
                                       {profile: 0} if profile else {})

    async def update_machine(self, ref: str,
                             changes: Mapping[str, Any] | Callable[[Machine], Mapping[str, Any]],
                             *, versions: Collection[str] | None = None,
                             lists: Collection[str] | None = None) -> Machine:
        """Change the given fields; the others are kept. ``macs`` replaces the NICs; ``mac``
        alone may only repeat one of them (one-NIC clients send it back).

        ``changes`` may be made from the machine as read (a label added to its labels, a NIC
        to its NICs: ``netboot machines set``), at each read: made from a read before this
        one, it wrote back what another writer changed meanwhile (another operator's label,
        a NIC attached). ``versions``: the machine's :func:`machine_version` as the caller saw
        it (the API's If-Match); if it is none of them now, :class:`PreconditionFailed` and
        nothing written. ``lists``: the NICs of a new ``macs`` the operator named (``machines
        set --add-mac``), which alone are listed (identity.UNLISTED); None: every NIC of it."""
        if not callable(changes) and all(changes.get(k) is None
                                         for k in ("fixed_ipv4", "cluster", "profile")):
            return await self._update_machine(ref, changes, versions, lists)
        # _patched's fixed-address check and the write, as one (a change made from the
        # machine as read may set one too); its cluster's and profile's check too, which
        # Core.delete's delete waits for (_refs_still).
        async with self.enroller.fixed_lock:
            return await self._update_machine(ref, changes, versions, lists)

    async def _update_machine(
            self, ref: str, changes: Mapping[str, Any] | Callable[[Machine], Mapping[str, Any]],
            versions: Collection[str] | None, lists: Collection[str] | None = None,
    ) -> Machine:
        attempt = 0
        while True:
            attempt += 1
            old = await self.machine(ref)
            identity.require_version(old, versions)
            machine = await self._patched(old, changes(old) if callable(changes) else changes,
                                          lists)
            # The whole machine is written back: compare-and-set on the state and on the
            # version read, so that what another writer stored since the read (a state and
            # install token, a NIC attached, a fact a device reported, another server's
            # edit) is not overwritten with the old one. A state moved is the operator's to
            # see (409); any other change only moved the base the edit applies to, so the
            # edit is made again on the new version.
            # An "updated" event with the change, as an import's: without it a machine's
            # history skipped every edit (its hostname, cluster or fixed address moved with
            # no line between its events), and `events --follow` kept its old name
            # (s39-attack). The audit log says who; the event says what, where it is read.
            changed = [_change(f, getattr(old, f), getattr(machine, f)) for f in _EDITABLE
                       if getattr(old, f) != getattr(machine, f)]
            events = (Event(old.id, machine.updated, "updated",
                            f"changed {', '.join(changed)}"),) if changed else ()
            try:
                await self.store.apply_batch(Batch(update=(machine,), events=events,
                                                   expect={old.id: old.state},
                                                   versions={old.id: old.updated}))
            except StateChanged as e:
                if e.field != "updated" or attempt == DECIDE_ATTEMPTS:
                    raise
                continue
            return machine

    async def _patched(self, old: Machine, changes: Mapping[str, Any],
                       lists: Collection[str] | None = None) -> Machine:
        """``old`` with ``changes`` made (update_machine), checked as a new machine is."""
        if "mac" in changes and "macs" not in changes:
            text = changes["mac"]
            if not isinstance(text, str) or MacAddress.parse(text) not in old.macs:
                raise ValidationError("mac", "not one of this machine's MACs; send 'macs' to "
                                             "change its NICs")
            changes = {k: v for k, v in changes.items() if k != "mac"}
        merged = {k: v for k, v in codec.machine_to_dict(old).items() if k in MACHINE_INPUT}
        if merged.get("hostname") == "":
            merged["hostname"] = None  # stored before "" was a 400: none, not a bar to edits
        merged.update(changes)
        parsed = await self._parse_machine(merged)
        identity.require(parsed)
        lifecycle.check_move(old, parsed.cluster, parsed.role)
        if parsed.fixed_ipv4 != old.fixed_ipv4:  # one stored before is the DHCP log's to say
            check_fixed_ipv4(parsed.fixed_ipv4, self.enroller.server_addresses())
            await self._fixed_ipv4_free(parsed.fixed_ipv4, old.id)
        # A NIC list the operator writes lists each NIC it names (``lists``: those the
        # command named, not the others it sent back): one a boot attached by the machine's
        # UUID or serial may now be given its install and fixed address (identity.UNLISTED).
        named = parsed.macs if lists is None else [MacAddress.parse(m) for m in lists]
        facts = identity.listed(old.facts, named, parsed.macs) if "macs" in changes \
            else old.facts
        return replace(old, macs=parsed.macs, hostname=parsed.hostname, uuid=parsed.uuid,
                       serial=parsed.serial, asset=parsed.asset, labels=parsed.labels,
                       cluster=parsed.cluster, role=parsed.role, profile=parsed.profile,
                       loader=parsed.loader, fixed_ipv4=parsed.fixed_ipv4, facts=facts,
                       updated=self._clock())

    async def _fixed_ipv4_free(self, fixed: str | None, own: str | None) -> None:
        """A ``fixed_ipv4`` another machine has is a 409 naming it: two machines given one
        address both answer ARP for it, and authoritative DHCP gives it to the first that
        asks (the other a pool address, LeasePool.fixed_refused). dnsmasq refuses the same
        address in two dhcp-host lines unless they are one host's MACs ("duplicate IP
        address"); one machine's NICs share its one fixed_ipv4 (s39-review2). A read
        before the write (a scan of the stored documents, on an edit of the field only):
        made under ``enroller.fixed_lock`` with the write, which holds the inventory's lock
        too (FixedLock): two calls at once, from any processes on one inventory, cannot both
        pass (benchmarks/README.md ### s40-net, ### s40-cas)."""
        if fixed is None:
            return
        for other in await self.store.list_machines(MachineFilter(fixed_ipv4=fixed, limit=2)):
            if other.id != own:
                name = f"{other.ref} ({other.hostname})" if other.hostname else other.ref
                raise Conflict(f"fixed_ipv4 {fixed} is the fixed address of machine "
                               f"{name}: give each machine an address of its own",
                               field="fixed_ipv4", holder=other.id)

    async def delete_machine(self, ref: str, *,
                             versions: Collection[str] | None = None) -> Machine:
        """``versions``: the API's If-Match (identity.require_version); checked on the read
        and, with it, the delete compares that read's ``updated`` in its own transaction: a
        write of the machine between the two (another server, a CLI) is a 412, nothing
        deleted."""
        machine = await self.machine(ref)
        identity.require_version(machine, versions)
        try:
            await self.store.delete_machine(
                machine.id, expect_updated=None if versions is None else machine.updated)
        except StateChanged:
            identity.require_version(await self.machine(ref), versions)  # a 412 as a rule
            raise
        return machine

    async def approve(self, ref: str, data: Mapping[str, Any], *, enroll_only: bool = False,
                      versions: Collection[str] | None = None) -> Machine:
        """Let a discovered machine install: cluster, role, profile and hostname are optional,
        but it must end up with a profile (its own, a group's or ``enroll.default_profile``),
        or approving would leave it held with nothing said. ``enroll_only``: the caller may
        not change machines (Enroller.approve)."""
        unknown = sorted(set(data) - set(APPROVE_INPUT))
        if unknown:
            raise ValidationError(unknown[0], "unknown field")
        for key in APPROVE_INPUT:
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ValidationError(key, "must be a string or null")
        role_text = data.get("role")
        if role_text is not None and role_text not in ("server", "agent"):
            raise ValidationError("role", f"{role_text!r} is not server or agent")
        role = Role(role_text) if role_text else None
        machine = await self.machine(ref)
        identity.require_version(machine, versions)
        cluster, profile = data.get("cluster"), data.get("profile")
        await self.enroller.validate_refs(cluster, profile)
        lifecycle.apply(machine.state, lifecycle.Trigger.APPROVE, subject=machine.ref)
        refused = enroll_only and enroll_only_refusal(
            machine, cluster=cluster, role=role, profile=profile, hostname=data.get("hostname"))
        if refused:  # before the profile's check, whose error names every profile
            raise refused
        await self._check_installable(replace(machine, cluster=cluster or machine.cluster,
                                              role=role or machine.role,
                                              profile=profile or machine.profile))
        if cluster is None and profile is None:
            return await self.enroller.approve(machine.id, cluster=cluster, role=role,
                                               profile=profile, hostname=data.get("hostname"),
                                               enroll_only=enroll_only, versions=versions)
        async with self.enroller.fixed_lock:  # the names checked again, as create_machine's
            await self._refs_still(cluster, profile)
            return await self.enroller.approve(machine.id, cluster=cluster, role=role,
                                               profile=profile, hostname=data.get("hostname"),
                                               enroll_only=enroll_only, versions=versions)

    async def _check_installable(self, machine: Machine) -> None:
        group, profile, _, _ = await self.boot.effective(machine)
        if profile is not None:
            return
        names = sorted(p.name for p in await self.store.list_profiles())
        where = f"group {group.name!r} gives none" if group else "no group selects it"
        choose = (f"one of: {', '.join(names)}" if names
                  else "none exists yet: netboot profiles add NAME --kernel ...")
        raise ValidationError(
            "profile", f"{machine.ref} would stay held without a profile: {where} and "
            f"enroll.default_profile is not set; name one with --profile (API: \"profile\"), "
            f"{choose}")

    async def reinstall(self, ref: str, *,
                        versions: Collection[str] | None = None) -> Machine:
        return await self.enroller.reinstall(ref, versions=versions)

    async def give_to_claim(self, ref: str, data: Mapping[str, Any]) -> Machine:
        """POST /machines/{ref}/claim: a registered machine (or one installed whose
        registration a restored backup lost) given to the install whose registration was
        refused with ``claim`` (Enroller.give_to_claim)."""
        claim = data.get("claim")
        if not isinstance(claim, str) or not _CLAIM.fullmatch(claim):
            raise ValidationError("claim", "the claim a 'registration contested' or "
                                           "'registration refused' event of the machine "
                                           "names (64 hexadecimal digits)")
        return await self.enroller.give_to_claim(ref, claim)

    # -- profiles, clusters, groups -------------------------------------------------------
    async def get(self, kind: str, name: str) -> Any:
        single = _kind(kind)
        item = await getattr(self.store, f"get_{single}")(name)
        if item is None:
            raise NotFound(f"{single} {name!r} not found")
        return item

    async def list_items(self, kind: str) -> list[Any]:
        _kind(kind)
        items: list[Any] = await getattr(self.store, f"list_{kind}")()
        return items

    async def put(self, kind: str, data: Mapping[str, Any], *, create: bool,
                  force: bool = False, versions: Collection[str] | None = None) -> Any:
        """Create (``create``) or replace a profile, cluster or group from its JSON shape.
        ``force``: a managed cluster's token or agent token changed though nodes of it have
        their config (:meth:`_token_change`). ``versions``: a replace's If-Match
        (:func:`item_version`); another is a 412, nothing written."""
        single = _kind(kind)
        stored = None
        if not create:
            stored = await self.get(kind, str(data.get("name")))  # replacing needs it to exist
            _require_item_version(kind, stored, versions)
        parse: Callable[[Any], Any] = {"profile": codec.profile_from_dict,
                                       "cluster": codec.cluster_from_dict,
                                       "group": codec.group_from_dict}[single]
        # A profile's problems and a cluster's ca_hash and problems are what a GET shows
        # (public_dict), not fields: a body read, corrected and written back carries them.
        # A cluster's CA is netboot's own (_managed_join).
        aside = {"profile": ("problems",), "cluster": ("ca_hash", "problems")}.get(single, ())
        if single == "cluster":
            for key in ("ca_cert", "ca_key"):
                if key in data:
                    raise ValidationError(key, "a managed cluster's k3s CA is made by netboot, "
                                               "never given")
        item = parse({k: v for k, v in data.items() if k not in aside})
        check_name(item.name)
        if single == "cluster":
            return await self._put_cluster(item, data, create=create, force=force,
                                           versions=versions, stored=stored)
        if single == "group":
            await self._check_group(item)
        elif item.config_template not in CONFIG_TEMPLATES:
            # Any other name was rendered as k3os: a "cloudinit" typo installed the wrong OS
            # config instead of being refused (the OpenAPI document's enum; the CLI's choices).
            raise ValidationError("config_template", f"{item.config_template!r} is not one "
                                  f"of {', '.join(CONFIG_TEMPLATES)}")
        else:
            errors = profile_file_errors(item)
            if errors:
                raise errors[0][1]
        put = getattr(self.store, f"put_{single}")
        if single == "group" and (item.cluster is not None or item.profile is not None):
            put = functools.partial(self._put_group_naming, put)
        if create:
            await put(item, create=True)
            return item
        # A compare-and-set on the one read (If-Match checked on each read): a replace
        # committed meanwhile by another server or a CLI is not written over unseen; read
        # again, it is a 412 where If-Match was given, else this replace is made on it.
        again = False  # the first try writes on the read above

        async def step() -> Any:
            nonlocal stored, again
            if again:  # another writer's change since the last read: on it, read again
                stored = await self.get(kind, item.name)
                _require_item_version(kind, stored, versions)
            again = True
            await put(item, expect=stored)
            return item
        return await _again_on_change(step)

    async def _put_group_naming(self, put: Callable[..., Awaitable[None]], group: Group,
                                **kw: Any) -> None:
        """A group naming a cluster or profile written (``put``) with them checked again
        under the lock Core.delete's delete of one holds (_refs_still): checked before
        (_check_group) and deleted by another writer since, finding no group naming it
        yet, the group was written naming one that is gone, and every machine it selects
        then enrolled into it or booted with it was held."""
        async with self.enroller.fixed_lock:
            await self._refs_still(group.cluster, group.profile)
            await put(group, **kw)

    async def _put_cluster(self, cluster: Cluster, data: Mapping[str, Any], *, create: bool,
                           force: bool, versions: Collection[str] | None = None,
                           stored: Cluster | None = None) -> Cluster:
        """A cluster checked and written; a replace as a compare-and-set on the cluster read
        first (made again on the cluster as stored now when another server changed it
        meanwhile): an edit must not undo the agent token another server's start-up gave
        the cluster (Core.give_agent_tokens), whose configs name it. ``stored``: a
        replace's cluster as the caller read it (If-Match checked), the first try's read;
        each try's checks and write are made on its one read."""
        if create:
            await self._cluster_name_free(cluster.name)
        read = stored

        async def step() -> Cluster:
            nonlocal read
            if not create and read is None:  # If-Match on each read: the write compares it
                read = await self.get("clusters", cluster.name)
                _require_item_version("clusters", read, versions)
            # What a forced token change tells its nodes (_running_change), written once the
            # change is: told before the write, a write refused (another writer's edit each
            # try, a full disk) left every node's history saying a change no one made, and
            # each try made again on another's edit told them once more.
            told: list[Event] = []
            made = await self._check_cluster(cluster, data, read, create=create, force=force,
                                             told=told)
            expect, read = read, None  # a next try reads again: another writer's change
            await self.store.put_cluster(made, create=create, expect=expect)
            if told:
                await self._tell_saved(cluster.name, told)
            return made
        return await _again_on_change(step)

    async def _tell_saved(self, name: str, events: list[Event]) -> None:
        """A forced change's events for its nodes, after the change was saved: a store that
        refuses them now (a full disk, a lock past its wait) leaves them queued, written
        with the recorder's next group commit once it takes writes, and the change answered
        as made. Its error answered ("nothing was changed; try again") for a change that was
        saved, and the retry, no change any more, told no node what broke its k3s.

        A commit whose answer was lost (OutcomeUnknown: perhaps stored) is read back first,
        and only the events not stored are queued: all queued again, a stored commit told
        each node twice. Unread, they are not written again (the recorder's rule for a group
        whose outcome is unknown: at most once)."""
        recorder = self.enroller.recorder
        try:
            await recorder.commit(Batch(events=tuple(events)))
            return
        except StoreError as exc:
            lost = exc
        if isinstance(lost, OutcomeUnknown):
            try:
                events = await self._not_stored(events)
            except StoreError as exc:
                _log.error("cluster %s: its change is saved; its %d nodes' events of it may "
                           "or may not be stored (%s) and are not written again: unread "
                           "(%s)", name, len(events), lost, exc)
                return
        if events:
            _log.warning("cluster %s: its change is saved; its %d nodes' events of it are "
                         "queued until the inventory takes writes again: %s", name,
                         len(events), lost)
        for event in events:
            recorder.record(event)

    async def _not_stored(self, events: list[Event]) -> list[Event]:
        """Those of ``events`` their machine's newest stored events do not hold (by time,
        kind and message, as the store gives them back). A read a node, on a path a lost
        commit alone takes."""
        missing = []
        for event in events:
            newest = await self.store.list_events(event.machine, limit=_READ_BACK)
            if not any((e.time, e.kind, e.message) == (event.time, event.kind, event.message)
                       for e in newest):
                missing.append(event)
        return missing

    async def _cluster_name_free(self, name: str) -> None:
        """A cluster named as another but for case is a 409: both are one DNS name,
        ``<cluster>.<zone>`` (names compare without case, RFC 4343 §3), which then answered
        both clusters' servers (the zone reads a machine's cluster in lower case) while the
        nodes of each were sent there: a node joined the other cluster's server, or was
        refused by it (its CA hash)."""
        for other in await self.store.list_clusters():
            if other.name != name and other.name.lower() == name.lower():
                raise Conflict(f"cluster {other.name!r} exists: a cluster's name is also its "
                               f"DNS name ({name.lower()}.<zone>), which does not tell case "
                               "apart; give this one another name", field="name")

    async def _check_cluster(self, cluster: Cluster, data: Mapping[str, Any],
                             old: Cluster | None, *, create: bool, force: bool = False,
                             told: list[Event] | None = None) -> Cluster:
        """``cluster`` checked against ``old`` (as stored: the read its write compares,
        None for a new one) and, a managed one, given its join token and CA."""
        if not cluster.managed and not re.search(SERVER_URL_PATTERN, cluster.server_url):
            raise ValidationError("server_url", f"{cluster.server_url!r}: an https:// URL of "
                                  "the k3s API (a host name or address, a port, a path; no "
                                  "space or control character), or 'managed'")
        if cluster.endpoint and not cluster.managed:
            raise ValidationError("endpoint", "only a managed cluster has one: an external "
                                              "cluster's server_url already is its endpoint")
        if old is not None and old.managed != cluster.managed:
            await self._no_node_moved(old)
        if not cluster.managed:
            # Its servers are not netboot's: its agent token, if any, is the operator's (the
            # servers' agent-token file), kept as the token is when an edit leaves it out.
            if old is not None and ("token" not in data or "agent_token" not in data):
                cluster = replace(
                    cluster, token=cluster.token if "token" in data else old.token,
                    agent_token=(cluster.agent_token if "agent_token" in data
                                 else old.agent_token))
            if cluster.token:
                return cluster
            raise ValidationError("token", "required for an external cluster (k3s node token)")
        return await self._managed_join(cluster, data, old, create=create, force=force,
                                        told=told)

    async def secure_token(self, name: str, *,
                           versions: Collection[str] | None = None) -> Cluster:
        """Give a managed cluster made with the short token (before netboot made k3s CAs, or
        with ``enroll.k3s_secure_token: false``) its CA and the secure token: refused once a
        node of it fetched its config (_no_node_configured); a cluster that has one keeps
        it. ``versions``: the API's If-Match, as a replace's.

        Written as a compare-and-set on the cluster read, as every other cluster write
        (_put_cluster): it was written whole without one, so an edit committed meanwhile by
        another server or a CLI (its description, the agent token a starting server gave
        it) was undone, and of two asked at once each made a CA, the last stored, and the
        other's caller shown a CA hash that no longer was the cluster's. The loser reads
        the cluster again: the winner's CA is kept, and returned."""
        async def step() -> Cluster:
            cluster = await self.get("clusters", name)
            _require_item_version("clusters", cluster, versions)
            if not cluster.managed:
                raise ValidationError("server_url", f"cluster {name!r} is external: its "
                                      "servers made their CA; give their own secure token "
                                      "(K10…, their node-token file) as its token")
            made: Cluster = await self._managed_join(cluster, {}, cluster, create=False,
                                                     secure=True)
            if made != cluster:
                await self.store.put_cluster(made, create=False, expect=cluster)
            return made
        return await _again_on_change(step)

    async def _managed_join(self, cluster: Cluster, data: Mapping[str, Any],
                            old: Cluster | None, *, create: bool,
                            secure: bool = False, force: bool = False,
                            told: list[Event] | None = None) -> Cluster:
        """A managed cluster's join token and k3s server CA (README "What a host on the
        provisioning network can take").

        A new cluster gets a CA (netboot.pki, k3s_server_ca) and the secure token form
        ``K10<its hash>::server:<secret>``, unless ``enroll.k3s_secure_token`` is false (its
        token then as given: a site's own secure token, say). A cluster made before keeps
        its short token: its first server may have made its own CA already, and agents
        given a hash of another would refuse it; ``secure`` (:meth:`secure_token`) makes
        its CA while none of its nodes has fetched its config. A cluster's CA, once made, is
        kept (its servers run on it), and a token given for it is taken as the secret it
        wraps. ``told``: where a forced change's events for its nodes go (_running_change),
        for the caller to write with the change."""
        # ``old``: the cluster as its caller read it, whose write compares that read (one
        # read a try: each of _put_cluster's tries read it three times, and decided on reads
        # other than the one its compare-and-set held to).
        if create:
            old = None
        if old is not None and not old.managed:
            # An external cluster made managed (none of its nodes has its config:
            # _no_node_moved) is a new one: its token was its servers', or netboot's of
            # when it was managed before, wrapping a CA that an external cluster does not
            # keep; kept, the next first server got no CA and a token naming that one, and
            # every agent refused it (s40-attack).
            old, create = None, True
        ca_cert, ca_key = (old.ca_cert, old.ca_key) if old is not None else ("", "")
        # The secrets alone: what was given, or kept, or new (never returned or logged).
        secret = _given(cluster.token, data, "token", create)
        if old is not None and secret == old.token:
            secret = None  # its own token given back (a node-token read): kept as it is
        if secret is None and old is not None:
            secret = _secret(old.token, old.ca_cert)
        if not secret:
            secret = secrets.token_hex(32)
        agent = _given(cluster.agent_token, data, "agent_token", create)
        if agent is not None and agent.startswith("K10") and "::" in agent:
            # A secure form given (a server's agent-token file): its secret, wrapped below
            # with this cluster's CA (k3s keeps a server's agent-token as given: the secret).
            agent = token_secret(agent)
        if agent is not None and old is not None and agent != (
                _secret(old.agent_token, old.ca_cert) if old.agent_token else ""):
            told_of = await self._agent_token_change(old, force)
            if told is not None:
                told += told_of
        if agent is None and old is not None and old.agent_token:
            agent = _secret(old.agent_token, old.ca_cert)
        if not agent and (old is None or await self._configured_node(old) is None):
            # A new cluster, or one made before netboot made agent tokens whose servers were
            # not yet told to run without one (they would refuse agents given one).
            agent = secrets.token_hex(32)
        if not ca_cert and (secure or (create and self._secure_token)):
            if old is not None:
                await self._no_node_configured(old)
            # An RSA key: 10-70 ms of CPU here, off the event loop.
            ca_cert, ca_key = await asyncio.to_thread(k3s_server_ca)
        if ca_cert and secret.startswith(f"K10{k3s_ca_hash(ca_cert)}::"):
            # This CA's secure form given (a server's node-token after ``k3s token rotate``):
            # its secret, wrapped below; wrapped whole, k3s read the password as
            # "K10<hash>::server:<secret>" and the servers on the secret refused every node.
            secret = token_secret(secret)
        token = k3s_secure_token(secret, ca_cert) if ca_cert else secret
        if old is not None and token_secret(token) != token_secret(old.token):
            # The secret k3s compares, not the form: the secure token a short cluster's first
            # server wrote (README's way out) wraps the secret it has, and is no change.
            told_of = await self._token_change(old, force)
            if told is not None:
                told += told_of
        agent_token = (k3s_secure_token(agent, ca_cert, user=K3S_AGENT_USER) if ca_cert and agent
                       else agent or "")
        return replace(cluster, token=token, ca_cert=ca_cert, ca_key=ca_key,
                       agent_token=agent_token)

    async def _token_change(self, old: Cluster, force: bool) -> list[Event]:
        """A managed cluster's own (server) token changed by an edit: refused (409) while a
        node of it has its config, unless ``force``, as its agent token is
        (:meth:`_agent_token_change`). k3s's way is ``k3s token rotate`` (k3s-io/k3s
        docs/adrs/server-token-rotation.md, docs cli/token): run on one server, it
        re-encrypts the datastore's bootstrap data with the new token; then every server, and
        every agent that joined with the old one, is restarted with the new. Given to
        netboot alone, the running servers keep the old, and every server installed next
        (and every agent given the cluster's token: one without an agent token) is refused,
        or, a server, cannot open the bootstrap data."""
        return await self._running_change(
            old, force, "token",
            why="k3s keeps the token its servers started with (the datastore's bootstrap "
                "data is encrypted with it); nodes given a new one would be refused by its "
                "servers",
            by_hand="rotate it in k3s (k3s token rotate --new-token NEW on one of its "
                    "servers, then the token in every server's config and in every agent's "
                    "that joined with it, and restart k3s)",
            told="until it is rotated there (k3s token rotate on a server, then each node's "
                 "token, restarting k3s) or the node is reinstalled; until then servers given "
                 "the new one are refused by servers on the old one")

    async def _agent_token_change(self, old: Cluster, force: bool) -> list[Event]:
        """A managed cluster's agent token changed by an edit: refused (409) while a node of
        it has its config, unless ``force``, which tells each such node's history what it
        breaks. k3s has no rotation of the agent token (``k3s token rotate`` changes the
        server token alone): each server keeps the ``agent-token`` its config gave it, each
        agent that joined keeps its token and presents it again at every start of k3s, so
        the new one given to the next nodes is refused by the running servers, and the old
        one by servers configured after."""
        return await self._running_change(
            old, force, "agent_token",
            why="k3s keeps the agent token a server was given (its agent-token) and the one "
                "an agent joined with, checked at every start of k3s; nodes given a new one "
                "would be refused by its servers",
            by_hand="change agent-token on each of its servers and the token of each of its "
                    "agents by hand (/etc/rancher/k3s/config.yaml, then restart k3s)",
            told="(a server's agent-token, an agent's token) until it is changed there by "
                 "hand or the node is reinstalled; until then agents given the new one are "
                 "refused by servers on the old one, and the reverse")

    async def _running_change(self, old: Cluster, force: bool, field: str, *, why: str,
                              by_hand: str, told: str) -> list[Event]:
        """A managed cluster's ``field`` (token, agent_token) changed while a node of it has
        its config: a 409 naming the node, ``why`` and the fixes (reinstall; ``by_hand``
        and force); with ``force``, the events of each such node (up to _FORCE_TOLD) saying
        that its k3s keeps the old one ``told``, returned: written by the caller with the
        change (Core._put_cluster), not before it."""
        configured = await self._configured_node(old)
        if configured is None:
            return []
        node, state = configured
        what = field.replace("_", " ")
        if not force:
            raise Conflict(
                f"cluster {old.name!r} runs on the {what} it has: {node.ref} is {state} with "
                f"its config, and {why}. Fix: reinstall every node of it (netboot machines "
                f"reinstall) before changing it; or {by_hand}, then give it again with force "
                f"(PUT /api/v1/clusters/{old.name}?force=true, or netboot clusters set "
                f"{old.name} --{field.replace('_', '-')} ... --force)", field=field)
        now = self._clock()
        events = [Event(m.id, now, _FORCED_KINDS[field],
                        f"the {what} of cluster {old.name} was changed by force while this "
                        f"node was {m.state} with its config: its k3s keeps the old one {told}")
                  for state in _CONFIGURED for m in await self.store.list_machines(
                      MachineFilter(cluster=old.name, state=state, limit=_FORCE_TOLD))]
        return events[:_FORCE_TOLD]

    async def give_agent_tokens(self) -> list[str]:
        """Give each managed cluster made before netboot made agent tokens one, while none of
        its nodes has fetched a config (its servers would refuse agents given one): run at
        start-up, before any config is served. The names of the clusters given one."""
        given = []
        for read in await self.store.list_clusters():
            cluster: Cluster | None = read
            for _attempt in range(DECIDE_ATTEMPTS):
                if cluster is None or not cluster.managed or cluster.agent_token:
                    break
                made = await self._managed_join(cluster, {}, cluster, create=False)
                if not made.agent_token:
                    break
                # Compare-and-set on the cluster as read: several servers on one PostgreSQL
                # start at once, each here; the last write won, and a server's config served
                # from the first named a secret its peers then no longer gave (s39-agenttok).
                # The loser reads the winner's token (or an edit made meanwhile) and keeps it.
                try:
                    await self.store.put_cluster(made, create=False, expect=cluster)
                except StateChanged:
                    cluster = await self.store.get_cluster(cluster.name)
                    continue
                given.append(cluster.name)
                break
        return given

    async def _configured_node(self, cluster: Cluster) -> tuple[Machine, MachineState] | None:
        """A node of ``cluster`` that fetched its config (and its state), if any."""
        for state in _CONFIGURED:
            nodes = await self.store.list_machines(MachineFilter(cluster=cluster.name,
                                                                 state=state, limit=1))
            if nodes:
                return nodes[0], state
        return None

    async def _no_node_configured(self, cluster: Cluster) -> None:
        """Refuse a new CA for ``cluster`` once one of its nodes fetched a config without it:
        a server among them runs k3s on a CA of its own making, whose hash no token names."""
        configured = await self._configured_node(cluster)
        if configured is not None:
            node, state = configured
            raise Conflict(f"cluster {cluster.name!r} has nodes that fetched their config "
                           f"with its short token ({node.ref} is {state}): a server "
                           "among them made its own k3s CA. Reinstall every node of it "
                           "(netboot machines reinstall) before asking for the secure "
                           "token")

    async def _no_node_moved(self, old: Cluster) -> None:
        """Refuse turning ``old`` from managed to external or back once one of its nodes
        fetched its config: they run on its k3s CA and join token (netboot's, or the external
        servers'), which the other kind does not keep; a machine's cluster is refused the
        same way while it is registered (lifecycle.check_move)."""
        configured = await self._configured_node(old)
        if configured is not None:
            node, state = configured
            kind, moved = (("managed", "give it an endpoint (netboot clusters set "
                            f"{old.name} --endpoint)") if old.managed else
                           (f"external ({old.server_url})", "give another https:// URL"))
            raise Conflict(f"cluster {old.name!r} is {kind} and has nodes that fetched their "
                           f"config ({node.ref} is {state}): they joined it with its k3s CA "
                           "and token, which the other kind does not keep. Reinstall or "
                           "remove its nodes first (netboot machines reinstall); to point "
                           f"them at a load balancer, {moved}", field="server_url")

    async def _check_group(self, group: Group) -> None:
        if group.hostname_template:
            check_hostname_template(group.hostname_template)
        await self.enroller.validate_refs(group.cluster, group.profile)
        others = [g for g in await self.store.list_groups() if g.name != group.name]
        grouping.check_groups([*others, group])

    async def delete(self, kind: str, name: str, *,
                     versions: Collection[str] | None = None) -> None:
        """Remove a profile, cluster or group; refused while anything still uses it, since
        a machine whose profile or cluster vanished would boot without one, silently.
        ``versions``: the API's If-Match (:func:`item_version`); another is a 412.

        The delete compares the item read and (a profile, a cluster) finds no machine or
        group naming it in its own transaction (Store.delete_profile): a machine enrolled
        into it, or an edit of it, by another server or a CLI after this check is a 409 (a
        412 where If-Match was given), nothing deleted; before, the machine was left naming
        a cluster that was gone and was held at its next boot."""
        single = _kind(kind)
        delete = getattr(self.store, f"delete_{single}")
        async def step() -> None:  # changed since read: If-Match and the users again
            item = await self.get(kind, name)
            _require_item_version(kind, item, versions)
            unused: dict[str, Any] = {}
            if single == "group":
                # The feed's position before the look: the delete's transaction looks again
                # at the machines written since (an install planned meanwhile: the boot
                # path takes no lock), so no install under way loses its group unseen.
                if item.profile is not None:
                    since = await self.store.feed_position()
                    groups = await self.store.list_groups()
                    _refuse_installs(item, await self._installing_with(item, groups))
                    # Caught up outside the transaction on what was written during the look
                    # (a storm's thousands: 10,000 decoded were ~0.8 s of CPU, every boot's
                    # write waiting), so that the transaction's own look is at a few.
                    for _ in range(_CATCH_UP):
                        since, machines = await self.store.under_way_since(since)
                        _refuse_installs(item, _installs_given(item, groups, machines))
                        if len(machines) <= _FEW_UNDER_WAY:
                            break
                    unused = {"installs": InstallsSince(since, lambda machines: _refuse_installs(
                        item, _installs_given(item, groups, machines)))}
            else:  # a group is no machine's: none names one
                users, holder = await self._users(single, name)
                if users:
                    # Field and holder as the delete's own check (base.in_use) names them:
                    # this one had neither.
                    raise Conflict(f"{single} {name!r} is used by {', '.join(users)}; "
                                   "change or remove those first", field=single,
                                   holder=holder)
                unused = {"unused": True}
                # Under the lock a machine write naming it holds from its check to its
                # commit (_refs_still): one that checked it before waits, then is refused.
                async with self.enroller.fixed_lock:
                    await delete(name, expect=item, **unused)
                return
            await delete(name, expect=item, **unused)
        await _again_on_change(step)

    async def _installing_with(self, group: Group, groups: Sequence[Group]) -> list[str]:
        """_installs_given of every machine whose install is under way, a page at a time
        (the first 10,000 alone hid a storm's others)."""
        using: list[str] = []
        for state in INSTALLS_UNDER_WAY:
            # By id after the last one read, not an offset: a machine leaving the state
            # between two pages (a storm's booting ones, installing) moved the others one
            # place back, and the one then first of the next page was skipped, unchanged and
            # so not among those the catch-up reads.
            after = ""
            while True:
                page = await self.store.list_machines(MachineFilter(
                    state=state, limit=_PAGE, after_id=after))
                using += _installs_given(group, groups, page)
                if len(page) < _PAGE:
                    break
                after = page[-1].id
        return using

    async def _users(self, ref: str, name: str, most: int = 5) -> tuple[list[str], str | None]:
        """What names profile or cluster ``name`` (``ref``), told as the 409 tells them, and
        the id of the first machine among them (the 409's holder), if any."""
        users = [f"group {g.name!r}" for g in await self.store.list_groups()
                 if getattr(g, ref) == name]
        if ref == "profile" and name == self.boot.settings.default_profile:
            users.append("the configuration (enroll.default_profile)")
        settings = self.boot.settings
        if settings.policy == "auto":
            # A rule naming one that does not exist holds every device it matches (start-up
            # warns of it: service.warn_of_missing_rule_refs), as a group naming one would.
            users += [f"the configuration (discovery.rules[{i}].{ref})"
                      for i, rule in enumerate(settings.rules) if getattr(rule, ref) == name]
        # By the indexed column (a profile's since S42's migration: every machine was
        # read here, 100,000 documents decoded for a profile's delete), a few named and the
        # rest counted.
        flt = (MachineFilter(cluster=name, limit=most) if ref == "cluster"
               else MachineFilter(profile=name, limit=most))
        machines = await self.store.list_machines(flt)
        total = await self.store.count_machines(flt)
        users += [f"machine {m.ref}" for m in machines]
        if total > len(machines):
            users.append(f"{total - len(machines)} more machines")
        return users, machines[0].id if machines else None

    # -- what a device gets -----------------------------------------------------------------
    async def explain(self, ref: str, *, arch: str | None = None) -> dict[str, Any]:
        """Why a machine (a MAC or an id) boots what it boots; an unknown MAC is explained
        too: what the discovery policy gives it."""
        return await self.boot.explain(ref, arch=_arch(arch))

    async def render(self, ref: str, kind: str, *, arch: str | None = None,
                     local: str | None = None, join_token: str | None = None) -> str:
        """Exactly what the server would serve this machine now, by the same calls, without
        recording anything; :data:`TOKEN_PLACEHOLDER` stands where its install token goes,
        and ``join_token`` (when given) where its cluster's join token goes: put there
        before rendering, so that no form a template gives it (JSON's and Jinja2's
        ``tojson`` escapes, any filter) is left for a reader to find (the API's masking of
        the token's text missed ``tojson``'s ``\u0026`` for ``&``: s37-attack).
        ``local``: as a device that reached this host at that address gets it (where the
        base URL is loopback, :meth:`Content.at`; the dashboard's preview, asked at it).

        ``ref`` is a MAC (as if the machine booted from that NIC; an unknown one gets what the
        discovery policy gives) or a machine id (as if it booted from its first NIC, or, with
        none known yet, as iPXE would report it: by its serial, asset tag or UUID)."""
        if kind not in RENDER_KINDS:
            raise ValidationError("kind", f"{kind!r} is not one of {', '.join(RENDER_KINDS)}")
        machine = await identity.by_ref(self.store, ref)
        key = _mac_or_none(ref)
        if machine is None and key is None:
            raise NotFound(f"machine {ref} not found (give one of its MACs or its id)")
        wanted = _arch(arch)
        content = self.content.at(local).dry()  # its failure is not the machine's event
        if kind in ("ipxe", "pxelinux", "grub"):
            firmware = {"pxelinux": Firmware.UBOOT, "grub": Firmware.UEFI}.get(kind,
                                                                               Firmware.IPXE)
            arch_now = wanted or (machine.arch if machine and machine.arch else Arch.UNKNOWN)
            if machine is not None:
                request = identity.request_for(machine, firmware=firmware, arch=arch_now,
                                               via="cli")
                if key is not None:
                    request = replace(request, mac=key)
            else:
                assert key is not None
                request = BootRequest(mac=key, firmware=firmware, arch=arch_now, via="cli")
            plan = _join_token_as(await self.boot.plan(request, record=False), join_token)
            if plan.action == BootAction.INSTALL:
                plan = replace(plan, token=TOKEN_PLACEHOLDER)
            if kind == "ipxe":
                return content.render_ipxe(plan)
            if kind == "grub":
                return content.render_grub(plan)
            return content.render_pxelinux(plan)
        if machine is None:
            raise NotFound(f"machine {ref} not found")
        # The server's config request carries no facts of its own; an --arch asks "as if it
        # reported this architecture" (for a machine that has not booted yet).
        nic = key or machine.mac or identity.NO_NIC
        facts = (BootRequest(mac=nic, arch=wanted, firmware=machine.firmware or Firmware.UNKNOWN,
                             via="cli") if wanted else None)
        plan = _join_token_as(await content.config_plan(
            machine, TOKEN_PLACEHOLDER, claim=False, request=facts, mac=key), join_token)
        if plan.cluster is not None and plan.cluster.ca_key:
            # The CA key a server is given, withheld as the install token is: it would let
            # whoever reads the render (the dashboard's view of it) sign as the cluster.
            plan = replace(plan, cluster=replace(plan.cluster, ca_key=CA_KEY_PLACEHOLDER))
        if kind == "config":
            return content.k3os_config(plan)
        return "".join(f"--- {name}\n{content.nocloud(plan, name)}"
                       for name in NOCLOUD_FILES)


def _join_token_as(plan: BootPlan, token: str | None) -> BootPlan:
    """``plan`` with ``token`` as its cluster's join token and agent token (None: as they
    are)."""
    k3s, cluster = plan.k3s, plan.cluster
    if token is None or k3s is None:
        return plan
    if cluster is not None and cluster.agent_token:
        cluster = replace(cluster, agent_token=token)
    return replace(plan, k3s=replace(k3s, token=token), cluster=cluster)
