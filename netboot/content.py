"""What TFTP and HTTP serve: root-restricted files plus rendered per-machine text.

This module turns a :class:`BootPlan` into bytes (iPXE script, pxelinux config, k3OS config,
cloud-init NoCloud files, U-Boot script image); it never decides what a machine boots.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import shlex
import string
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from json.encoder import encode_basestring_ascii
from operator import itemgetter
from pathlib import Path
from typing import Any
from urllib.parse import quote

from netboot import identity, lifecycle
from netboot.boot import _FEW_CLUSTERS, BootService, _keep
from netboot.enroll import Enroller, token_matches
from netboot.errors import Conflict, NotFound, RenderError, StateChanged
from netboot.files import FileTree, clean_relative
from netboot.inventory.base import Store
from netboot.inventory.codec import cluster_to_dict, machine_to_dict, profile_to_dict
from netboot.model import (
    Arch,
    Blob,
    BootAction,
    BootPlan,
    BootRequest,
    Cluster,
    Firmware,
    MacAddress,
    Machine,
    MachineState,
    Profile,
    equal,
    loopback_url,
    reached_url,
    stands_in,
)
from netboot.render import WHOLE, Renderer, Splice, Spliced, fills_in_place, plain
from netboot.wire import uimage

_HEX_IP = re.compile(r"^[0-9A-F]{1,8}$")
# The characters of a value put in an install script's frame (Content._framed): a MAC's,
# a token's (base64url), a hostname's as a rule. Printed as they are by tojson, in no
# whitespace split of the command line, and none of them a '#'.
_FRAME_PLAIN = string.ascii_letters + string.digits + "-_.:"
# A k3s server URL's in a config's frame (Content._config_framed): a plain value's and an
# URL's ``/`` and an IPv6 host's brackets, none of them YAML's in a double-quoted scalar, a
# comment or a block scalar (render.fills_in_place), nor escaped by tojson.
_FRAME_URL = _FRAME_PLAIN + "/[]"
_FRAME_PLAIN_AT = re.compile(f"[{re.escape(_FRAME_PLAIN)}]*").fullmatch
_FRAME_URL_AT = re.compile(f"[{re.escape(_FRAME_URL)}]*").fullmatch
# The join's values a config's frame puts in where the template only prints them (or tests
# their truth: Renderer.config_join_printing): the cluster's, so one frame serves many.
_JOIN_MARKED = frozenset({"k3s.token", "k3s.server_url"})
# The context names whose values differ from one machine to the next (Content.context), and
# the keys of ``k3s`` that do (its node name, in its k3s arguments too; the rest is its
# cluster's, group's and role's): an iPXE script, command line or config that only prints
# them is rendered once per profile, reason, cluster and the like, and they are filled in
# (the Renderer's ``volatile``, service.renderer_for).
PER_MACHINE = frozenset({"mac", "mac_hexhyp", "machine", "token", "config_url", "nocloud_url",
                         "events_url", "register_command", "instance_serial", "cmdline",
                         "k3s.node_name", "k3s.args"})
# The context names whose values Content freezes (Renderer.freeze) where it makes them once
# and never changes them: the profile's dict and lists (Content._of_profile, once per profile
# version), an install plan's dict (Content._plan_dict, once per reason): a split render keys
# a frozen one by its serial, not by its marshalled content (service.renderer_for); one not
# frozen (a hold's plan) is marshalled, as any other value.
STABLE = frozenset({"profile", "plan", "initrd_urls", "initrd_names", "initrd_paths",
                    "fallback_urls"})
# Context names made together (Content.context with names).
_TRUST_NAMES = frozenset({"https_base_url", "ca_pem", "ca_fingerprint"})
# Enum members looked up once: Python 3.11 finds one through EnumType at each use, ~870
# instructions (callgrind), and a config fetch looks up these on its way (session 32).
_INSTALL = BootAction.INSTALL
_FETCHED = lifecycle.Trigger.CONFIG_FETCHED
# A config plan's reason by its machine's state, made once: not an f-string of the state
# per fetch, whose text a frame's key then hashed again (s50-config).
_CONFIG_REASONS = {state: f"config for {state!s} machine" for state in MachineState}
# Rendered iPXE scripts kept (a storm's held machines; ~1 KiB each).
SCRIPTS_KEPT = 8192
# Install scripts of installs under way asked again, kept (Content._install_script; ~1.3 KiB).
INSTALLS_KEPT = 4096
# Rendered configs kept for installers that ask again (Content._config; ~3.5 KiB each).
CONFIGS_KEPT = 1024

# Default kernel consoles by CPU architecture (the ``console`` of the default command lines).
# The last console= is /dev/console, where init and the installer write. x86 (and a machine
# whose architecture nobody reported) keeps VGA last with the 8250 UART at ttyS0 beside it;
# ARM boards and QEMU's virt machine have a PL011 UART, ttyAMA0, and often no display, so the
# serial port comes last there; RISC-V virt boards have an 8250-compatible ttyS0.
_CONSOLES = {
    Arch.X86: "console=ttyS0 console=tty1",
    Arch.X86_64: "console=ttyS0 console=tty1",
    Arch.ARM64: "console=tty1 console=ttyAMA0",
    Arch.ARM32: "console=tty1 console=ttyAMA0",
    Arch.RISCV64: "console=tty1 console=ttyS0",
}
# The Raspberry Pi firmware rewrites serial0 into whichever UART the board routes to its
# header pins (the mini UART ttyS0 on a Pi 3/4 with Bluetooth, else ttyAMA0).
_RPI_CONSOLE = "console=tty1 console=serial0,115200"
# Looked up once (see _INSTALL): every install script and config asks default_console.
_RPI = Firmware.RPI
_NO_ARCH = Arch.UNKNOWN
_X86_64_CONSOLE = _CONSOLES[Arch.X86_64]


def default_console(arch: Arch | None, firmware: Firmware | None = None) -> str:
    """The kernel console arguments for a machine's architecture (and Raspberry Pi firmware)."""
    if firmware == _RPI:
        return _RPI_CONSOLE
    return _CONSOLES.get(arch or _NO_ARCH, _X86_64_CONSOLE)
_RPI_SERIAL = re.compile(r"^[0-9a-f]{8}$")


@dataclass(frozen=True)
class Urls:
    base: str  # http://192.0.2.10:8080
    register: Splice  # register_texts of the register endpoints (the base's, the others')
    # The boot.ipxe URLs an install script chains, in turn, when this server does not give
    # its kernel or an initrd (the others' that iPXE takes as one word: _chainable).
    fallbacks: tuple[str, ...] = ()

    def asset(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return f"{self.base}/assets/{quote(path.lstrip('/'))}"


@dataclass(frozen=True)
class Trust:
    """How an installed system reaches netboot over HTTPS: the base URL and the CA to trust
    (all empty when HTTPS is off, or the operator's certificate comes without its CA)."""

    https_base: str = ""  # https://192.0.2.10:8443
    ca_pem: str = ""
    ca_fingerprint: str = ""  # SHA-256, AA:BB:…


class _Reached:
    """A base URL as served to the clients that reach this host at one address
    (:func:`reached_url`), made again only when the base changed (a port bound at start)."""

    def __init__(self, base_url: Callable[[], str], local: str, stand_in: str = "") -> None:
        self._base_url = base_url
        self._local = local
        self._stand_in = stand_in
        self._kept = ("", "")

    def __call__(self) -> str:
        base = self._base_url()
        kept = self._kept
        if kept[0] != base:
            kept = self._kept = (base, reached_url(base, self._local, self._stand_in))
        return kept[1]


class _ReachedTrust:
    """:class:`_Reached` for the HTTPS base URL of a Trust: the same Trust object while the
    one it is made of is (the caches compare it by identity first)."""

    def __init__(self, trust: Callable[[], Trust], local: str, stand_in: str = "") -> None:
        self._trust = trust
        self._local = local
        self._stand_in = stand_in
        self._kept: tuple[Trust | None, Trust] = (None, Trust())

    def __call__(self) -> Trust:
        trust = self._trust()
        kept = self._kept
        if kept[0] is not trust:
            https = (reached_url(trust.https_base, self._local, self._stand_in)
                     if trust.https_base else "")
            kept = self._kept = (trust, trust if https == trust.https_base
                                 else replace(trust, https_base=https))
        return kept[1]


# The most other servers a register command names (the peers past it are left out): each
# a device cannot reach costs it up to CONNECT_SECONDS a try once its own server is gone.
MOST_PEERS = 8
REGISTER = "/api/v1/register"


def _urls_of(base: str, others: tuple[str, ...]) -> Urls:
    """The Urls of ``base`` with the register command trying ``others`` after it (``base``
    itself and repeats left out, at most MOST_PEERS of them)."""
    tried = [base]
    for other in others:
        if other not in tried and len(tried) <= MOST_PEERS:
            tried.append(other)
    return Urls(base, register_texts(tuple(f"{u}{REGISTER}" for u in tried)),
                tuple(f"{u}/boot.ipxe" for u in tried[1:] if _chainable(u)))


# What iPXE's script reads as one plain word of a URL (src/core/exec.c: no quoting; words
# split at whitespace, ${...} expanded, a word starting with # a comment): a base URL of
# other characters (a hand-edited record) is left out of install scripts, never quoted.
_CHAINABLE = re.compile(r"https?://[A-Za-z0-9._~:/\[\]@%-]+").fullmatch


def _chainable(url: str) -> bool:
    return _CHAINABLE(url) is not None


def _rendered_over_tftp(rel: str) -> bool:
    """Whether Content.tftp_open renders ``rel`` (with the base URL at hand), not an asset."""
    if rel == "boot.scr.uimg" or rel.startswith(("pxelinux.cfg/", "grub/")):
        return True
    head, _, rest = rel.partition("/")
    return bool(rest) and _RPI_SERIAL.match(head.lower()) is not None


class Content:
    def __init__(
        self,
        store: Store,
        boot: BootService,
        renderer: Renderer,
        assets: FileTree,
        base_url: Callable[[], str],
        enroller: Enroller,
        *,
        clock: Callable[[], float] = time.time,
        logger: logging.Logger | None = None,
        trust: Callable[[], Trust] = Trust,
        caches_of: Content | None = None,
        stand_in: str = "",
        peers: tuple[str, ...] = (),
    ) -> None:
        self._trust = trust
        # The other netboot servers' base URLs that a device may register through when this
        # one is gone (netboot.inventory.peers: the inventory's record, or server.peers),
        # told by set_peers when they change, which is rare (a server started or gone): no
        # look at them per render, and the texts kept are dropped then, not keyed by them.
        self._peers = peers
        # A host in the base URLs swapped for the address a client reached, as a loopback
        # one is (service.url_stand_in: the first of several named interfaces' address).
        self._stand_in = stand_in
        self._store = store
        self._boot = boot
        self._render = renderer
        self.assets = assets
        self._base_url = base_url
        self._enroller = enroller
        self._clock = clock
        self._log = logger or logging.getLogger(__name__)
        self._scripts: OrderedDict[MacAddress, tuple[object, str]] = OrderedDict()  # render_ipxe
        # NIC -> (the kept decision of its install under way, what else its script was made
        # of, its text, the renderer's generation it was checked at): see _install_script.
        self._installs: OrderedDict[MacAddress, tuple[BootPlan, tuple[object, ...], str,
                                                      int]] = OrderedDict()
        self._bootstrap: tuple[object, str] | None = None  # see bootstrap_ipxe
        # Texts an install script's or a config's frame is rendered with in place of the
        # MAC, the MAC with hyphens, the token, the hostname and (a config's) the k3s node
        # name, join token, server URL and instance serial (_framed, _config_framed), found
        # where they are printed: of letters and digits (the same through tojson), and no
        # template's own.
        marks = secrets.token_hex(8)
        self._marks = tuple(f"nb{marks}{kind}" for kind in "mhtnkjus")
        self._marked_at = re.compile(f"(nb{marks}[mhtnkjus])")
        # Marks that differ from those at every letter, a config's frame rendered with too
        # (_config_framed): a template printing a letter of a value (``hostname[0]``, which
        # the split's proof lets through as a constant subscript) gives the same letter of
        # every mark, which a value of that letter matched in the frame's check.
        other = "zy" + marks.translate(str.maketrans("0123456789abcdef", "ghijklmnopqrstuv"))
        self._other_marks = tuple(f"{other}{kind}" for kind in "MHTNKJUS")
        # (NIC, template name) -> (template, what else it was made of, text): see _config
        self._configs: OrderedDict[tuple[MacAddress, str], tuple[object, tuple[object, ...],
                                                                 str]] = OrderedDict()
        # Context values of profiles and clusters, by the object (_of_profile, _of_cluster):
        # id() -> (the object, so that a reused id is not taken for it, ..., the values).
        self._profile_parts: dict[int, tuple[Profile, str, tuple[dict[str, Any],
                                                                  dict[str, Any]]]] = {}
        self._cluster_dicts: dict[int, tuple[Cluster, dict[str, Any]]] = {}
        # An install's reason and retry -> its plan's context dict (_plan_dict).
        self._plan_dicts: dict[tuple[str, int], dict[str, Any]] = {}
        self._urls: Urls | None = None  # see urls
        # (A template's names, its command line's text) -> what its context is given (_wanted)
        self._wants: dict[tuple[frozenset[str] | None, str | None], _Wanted] = {}
        # A config template's (its marking form's id) -> (it, what it is given, whether it
        # only prints the join's token and server URL): _config_framed's two look-ups in one.
        self._config_wants: dict[int, tuple[object, _Wanted, bool]] = {}
        # A cluster's join token and server URL -> whether a config's frame may take them
        # (_config_framed): a fleet's clusters, not a request's.
        self._joins_plain: dict[tuple[str, str], bool] = {}
        # Local address -> this content as the clients that reached it there get it (at).
        self._views: dict[str, Content] = {}
        self._by_address: tuple[str, bool] = ("", False)  # base URL -> at() may differ
        # Whether a render that fails is told as the machine's event (Enroller.render_failed):
        # a device's ask, not an operator's dry run (:meth:`dry`).
        self._tells = True
        if caches_of is not None:
            # A view (at): every cache shared. Each keeps with a text the base URL and the
            # Trust it was made with and hands it out only while they are equal, so a text
            # made for one address is never served to another's clients; the few that keep
            # one value (_urls, _bootstrap) are the view's own.
            self._scripts = caches_of._scripts
            self._installs = caches_of._installs
            self._configs = caches_of._configs
            self._profile_parts = caches_of._profile_parts
            self._cluster_dicts = caches_of._cluster_dicts
            self._plan_dicts = caches_of._plan_dicts
            self._wants = caches_of._wants
            self._config_wants = caches_of._config_wants
            self._joins_plain = caches_of._joins_plain

    def by_address(self) -> bool:
        """Whether what is served differs by the address a client reached (:meth:`at`): the
        base URL names a loopback host (a host without a default route and no --advertise)
        or the stand-in (the first of several named interfaces' address, none given)."""
        base = self._base_url()
        known = self._by_address
        if known[0] != base:  # one look at the base's host a base (not one a request)
            known = self._by_address = (base, loopback_url(base)
                                        or stands_in(base, self._stand_in))
        return known[1]

    def at(self, local: str | None) -> Content:
        """This content as served to a client that reached this host at ``local`` (its
        connection's own address): itself, unless the base URL names a loopback host
        (:func:`reached_url`), then a view whose URLs name ``local``. One view per address
        (a host has a few), made once."""
        if local is None or not self.by_address():
            return self
        base = self._base_url()
        view = self._views.get(local)
        if view is None:
            if len(self._views) >= _FEW:
                self._views.clear()  # bounded: a host has a few addresses
            stand_in = self._stand_in
            view = self._views[local] = self if reached_url(base, local, stand_in) == base \
                else Content(self._store, self._boot, self._render, self.assets,
                             _Reached(self._base_url, local, stand_in), self._enroller,
                             clock=self._clock, logger=self._log,
                             trust=_ReachedTrust(self._trust, local, stand_in),
                             caches_of=self, peers=self._peers)
            # (set_peers tells it too: it keeps its own Urls.)
        return view

    def dry(self) -> Content:
        """This content for a dry run (``netboot render``, the API's render): the same
        caches, but a render that fails is the caller's error only, not the machine's
        ``render failed`` event (no device asked)."""
        view = Content(self._store, self._boot, self._render, self.assets, self._base_url,
                       self._enroller, clock=self._clock, logger=self._log,
                       trust=self._trust, caches_of=self, stand_in=self._stand_in,
                       peers=self._peers)
        view._tells = False
        return view

    def _told(self, plan: BootPlan, kind: str, exc: RenderError, file: str = "") -> None:
        """A device's render of ``kind`` (:data:`_RENDERED`; ``file``: a NoCloud file's
        name) for ``plan`` failed: told as its machine's ``render failed`` event (an unknown
        machine's only logged: no machine to tell it on), then raised on by the caller (the
        device's answer says it too). The device render paths' one way to tell it, each a
        try/except around its render: a context manager (a class's, s42-review) cost
        ~4,500 interpreted instructions a call (callgrind), ~1.5 % of a first install's
        loop, for a path that almost never fails, where an unraised try costs nothing."""
        template, what, command = _RENDERED[kind]
        name = template.format(action=plan.action, file=file) or None
        what = what.format(file=file)
        machine, enroller = plan.machine, self._enroller
        # (No enroller: the render tests' stand-in Content, which renders for no service.)
        if self._tells and machine is not None and enroller is not None:
            version = None if name is None else self._render.version(name)
            enroller.render_failed(machine, what, command,
                                   getattr(version, "filename", None) or name, exc)

    def _rendered(self, plan: BootPlan, what: str) -> None:
        """A device's ``what`` for ``plan`` rendered: if it was told as failing, a
        ``rendered`` event says it is fixed (Enroller.rendered). Called only while some
        render fails: the first-install path pays an empty dict's look."""
        enroller, machine = self._enroller, plan.machine
        if enroller is not None and self._tells and machine is not None \
                and machine.id in enroller.render_failing:
            enroller.rendered(machine, what)

    @property
    def urls(self) -> Urls:
        """The URLs of the base URL as it is now, and the peers (made again only when the
        base changed, or set_peers dropped them: every install script and config reads
        them)."""
        base = self._base_url()
        urls = self._urls
        if urls is None or urls.base != base:
            urls = self._urls = _urls_of(base, self._peers)
            self._render.freeze(urls.fallbacks)  # never changed: a new list is a new Urls
        return urls

    def set_peers(self, peers: tuple[str, ...]) -> None:
        """The other servers a register command names after this one are now ``peers``:
        the URLs made again at the next render (this content's and its views'), and every
        text kept that may print them dropped, as a template's change drops them (a
        config's register command, a frame of one, an operator's script printing it)."""
        if peers == self._peers:
            return
        for url in peers:
            if not _chainable(url):
                self._log.warning("install scripts do not fall back to %r: iPXE would not "
                                  "read it as one URL (write it as http://HOST:PORT)", url)
        for content in (self, *self._views.values()):
            content._peers = peers
            content._urls = None
            content._bootstrap = None
        self._scripts.clear()
        self._installs.clear()
        self._configs.clear()
        self._wants.clear()
        self._config_wants.clear()

    # -- context ----------------------------------------------------------------------
    def context(self, plan: BootPlan, *, token: str | None = None, cmdline: bool = True,
                names: frozenset[str] | None = None,
                stand_in: tuple[str, str, str | None] | None = None,
                serial: str | None = None) -> dict[str, Any]:
        """What templates are rendered with. ``cmdline=False``: without the kernel command
        line (for a template that does not read it: rendering it was half of this).
        ``names``: the names the template reads (Renderer.ipxe_with, yaml_config), where
        known: the values no such name reads (and no command line it reads) are not made;
        an install script reads neither the join nor the register command. ``stand_in``:
        texts given in place of the MAC's two forms and of the machine's hostname, for a
        template reading no other machine key (an install script's frame, _make_frame);
        ``serial``: of its instance serial (a config's frame, _config_framed)."""
        urls = self.urls
        mac = plan.mac
        token = token if token is not None else (plan.token or "")
        machine = plan.machine
        profile = plan.profile
        source = None
        if profile is not None and cmdline and (names is None or "cmdline" in names):
            source = profile.cmdline or self._default_cmdline(profile.config_template)
        # What the names (with what the command line reads) ask for, told once per template
        # and command line, not by a dozen look-ups in a set made anew (the union) for each
        # install script and config (s34-loop).
        want = self._wanted(names, source)
        trust = self._trust() if want.trust else None
        k3s = plan.k3s
        # The values every machine of a profile, reason, cluster and CA shares, made once
        # for them and copied (_shared).
        ctx = self._shared(want, urls, profile, plan, trust).copy()
        # MacAddress.hexhyp's and str()'s texts, without their two calls: made once, three
        # URLs and a name print the first, the context and the register command the second.
        hexhyp = mac.hex("-") if stand_in is None else stand_in[1]
        mac_text = mac.hex(":") if stand_in is None else stand_in[0]
        ctx["mac"] = mac_text
        ctx["mac_hexhyp"] = hexhyp
        ctx["token"] = token
        # Made only for a template that reads them (a k3OS config reads neither, nor the
        # profile's file URLs and paths).
        if want.config_url:
            ctx["config_url"] = f"{urls.base}/config/{hexhyp}" + (f"?token={token}" if token
                                                                 else "")
        if want.instance_serial:
            ctx["instance_serial"] = (serial if serial is not None
                                      else int(machine.updated) if machine else 0)
        if want.machine:
            ctx["machine"] = ({"hostname": stand_in[2]} if stand_in is not None
                              else _machine_dict(machine, want.machine_keys) if machine
                              else {"mac": mac_text, "hostname": None})
        if want.k3s:
            # The cluster's k3s server CA, for its servers only (written before k3s first
            # starts: netboot.pki, k3s_server_ca); "" for agents and clusters without one.
            # and the secret its agents join with (k3s's agent-token), for them too.
            ca = ca_key = agent = ""
            if k3s and k3s.role == "server":  # Role.SERVER's value, as K3sJoin.args
                cluster = plan.cluster
                if cluster is not None:
                    ca, ca_key = cluster.ca_cert, cluster.ca_key
                    agent = cluster.agent_secret
            ctx["k3s"] = {
                "role": str(k3s.role), "server_url": k3s.server_url,
                "cluster_init": k3s.cluster_init, "token": k3s.token,
                "labels": dict(k3s.labels), "taints": list(k3s.taints),
                "node_name": k3s.node_name, "args": list(k3s.args),
                "server_ca": ca, "server_ca_key": ca_key, "agent_token": agent,
            } if k3s else {"role": "agent", "server_url": None, "cluster_init": False,
                           "token": "", "labels": {}, "taints": [], "node_name": "",
                           "args": ["agent"], "server_ca": "", "server_ca_key": "",
                           "agent_token": ""}
        if want.nocloud_url:
            ctx["nocloud_url"] = (f"{urls.base}/nocloud/{hexhyp}/"
                                  + (f"{token}/" if token else ""))
        if want.events_url:
            ctx["events_url"] = f"{urls.base}/api/v1/machines/{hexhyp}/events"
        if want.register_command:
            values = (mac_text, token, k3s.node_name if k3s else "")
            # register_command's way for plain values (a MAC, a token, a node name, as a
            # rule) without its call and its URL's text, which only the other way reads.
            ctx["register_command"] = (
                urls.register.of(values, plain=True) if plain(values)
                else register_command(f"{urls.base}/api/v1/register", *values,
                                      texts=urls.register))
        if want.console:
            ctx["console"] = default_console(machine.arch if machine else None,
                                             machine.firmware if machine else None)
        if source is not None:
            assert profile is not None  # source is its command line
            ctx["cmdline"] = self._render.cmdline(source, ctx, profile.name)
        return ctx

    def _wanted(self, names: frozenset[str] | None, source: str | None) -> _Wanted:
        """What a template reading ``names`` (None: every name) is given, with what its
        command line ``source`` reads (None: none read), found once per such pair (the
        template's names and the text are the same objects at every render: their hashes
        are kept)."""
        key = (names, source)
        want = self._wants.get(key)
        if want is None:
            every = names
            if names is not None and source is not None:
                more = self._render.string_reads(source)
                every = None if more is None else names | more
            want = _Wanted(every)
            if len(self._wants) >= _FEW:
                self._wants.clear()  # bounded: old templates' and command lines' go
                self._config_wants.clear()  # (theirs: the _Wanted counted is the one kept)
            self._wants[key] = want
        return want

    def _shared(self, want: _Wanted, urls: Urls, profile: Profile | None, plan: BootPlan,
                trust: Trust | None) -> dict[str, Any]:
        """The context's values that are not the machine's (Content.PER_MACHINE's are): the
        base URL, the profile's dict and file URLs, the plan's dict, the CA, the cluster's
        dict, as ``want`` asks for them. Kept per template's wants while the objects they
        are made of are the same (the view's profile and cluster, the install's plan dict,
        the CA as TrustOf keeps it): a storm's every install script and config copies one
        dict, without the look-ups and calls that made its values (s34-loop)."""
        plan_dict, stable = self._plan_dict(plan)
        cluster = plan.cluster
        # By the objects' ids: the entry holds the objects, so no other takes their ids
        # while it is kept.
        kept = want.shared.get((id(profile), id(plan_dict), id(cluster)), None) \
            if stable else None
        if kept is not None and kept[3] == urls.base and (kept[4] is trust or kept[4] == trust):
            return kept[5]
        made = self._of_profile(profile, urls) if profile is not None else None
        shared: dict[str, Any] = {
            "base_url": urls.base, "profile": made[0] if made is not None else {},
            "plan": plan_dict}
        if trust is not None:
            shared["https_base_url"] = trust.https_base
            shared["ca_pem"] = trust.ca_pem
            shared["ca_fingerprint"] = trust.ca_fingerprint
        if want.cluster:
            shared["cluster"] = self._of_cluster(cluster) if cluster else {}
        if want.fallbacks:
            shared["fallback_urls"] = urls.fallbacks
        if made is not None and want.profile_files:
            shared.update(made[1])
        if stable:
            # Bounded: a site has a few profiles, clusters and reasons; old objects go.
            if len(want.shared) >= _FEW:
                want.shared.clear()
            want.shared[(id(profile), id(plan_dict), id(cluster))] = (
                profile, plan_dict, cluster, urls.base, trust, shared)
        return shared

    def _of_profile(self, profile: Profile, urls: Urls,
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The context's values made of ``profile`` alone (with the base URL): its dict, and
        its kernel's and initrds' URLs, names and paths. Made once per profile object (the
        view's, replaced when the profile changes) and base URL, not once per install script
        and config: the values are shared, and nothing changes them (the sandbox refuses a
        template's change; Python callers only read them)."""
        kept = self._profile_parts.get(id(profile))
        if kept is not None and kept[0] is profile and kept[1] == urls.base:
            return kept[2]
        made = (profile_to_dict(profile), {
            "kernel_url": urls.asset(profile.kernel),
            "initrd_urls": [urls.asset(i) for i in profile.initrds],
            "initrd_names": [i.rstrip("/").rsplit("/", 1)[-1] for i in profile.initrds],
            "kernel_path": profile.kernel.lstrip("/"),
            "initrd_paths": [i.lstrip("/") for i in profile.initrds]})
        # Never changed once made (above): a split render may key them by identity
        # (Renderer.freeze, STABLE). A changed profile is a new object, so new values.
        for value in (made[0], made[1]["initrd_urls"], made[1]["initrd_names"],
                      made[1]["initrd_paths"]):
            self._render.freeze(value)
        _keep_few(self._profile_parts, id(profile), (profile, urls.base, made))
        return made

    def _plan_dict(self, plan: BootPlan) -> tuple[dict[str, Any], bool]:
        """The context's ``plan``. An install's is made once per reason (its state, profile
        and group) and frozen (Renderer.freeze): its script's split render keys it by
        identity, not by its marshalled content (session 29). Any other plan's is made for
        it: a held machine's reason may name the machine, and one frozen value per machine
        would push the profiles' out of the renderer's bounded list. With it, whether it
        is an install's shared one (Content._shared keeps what is made of it)."""
        reason, retry = plan.reason, plan.retry_seconds
        # Exact types (a bool is an int, equal to one but printed otherwise): equal keys
        # give the very same text.
        shared = (plan.action is _INSTALL and plan.command is None
                  and type(reason) is str and type(retry) is int)
        if shared:
            made = self._plan_dicts.get((reason, retry))
            if made is not None:
                return made, True
        made = {"action": str(plan.action), "reason": reason, "retry_seconds": retry,
                "command": plan.command}
        if shared:
            self._render.freeze(made)  # never changed: nothing writes a context's values
            if len(self._plan_dicts) >= _FEW:
                self._plan_dicts.clear()  # bounded: old reasons go
            self._plan_dicts[(reason, retry)] = made
        return made, shared

    def _of_cluster(self, cluster: Cluster) -> dict[str, Any]:
        """The cluster's context dict (without secrets), made once per cluster object."""
        kept = self._cluster_dicts.get(id(cluster))
        if kept is not None and kept[0] is cluster:
            return kept[1]
        made = cluster_to_dict(cluster, secrets=False)
        _keep_few(self._cluster_dicts, id(cluster), (cluster, made))
        return made

    def _default_cmdline(self, config_template: str) -> str:
        name = "cmdline/cloud-init.txt" if config_template == "cloud-init" else "cmdline/k3os.txt"
        # Kept by the renderer, which reads it again only when it may have changed.
        text = self._render.text(name)
        if text is None:
            raise RenderError(f"no default command line template {name}")
        return text

    # -- iPXE ---------------------------------------------------------------------------
    def bootstrap_ipxe(self) -> str:
        """The script every iPXE asks for first: the same for all, rendered again only when
        its template file or the base URL changed (a storm asks it once per device)."""
        made_of = (self.urls.base, self._render.version("ipxe/boot.ipxe"))
        kept = self._bootstrap
        if kept is not None and kept[0] == made_of:
            return kept[1]
        text = self._render.ipxe("ipxe/boot.ipxe", {"base_url": self.urls.base})
        self._bootstrap = (made_of, text)
        return text

    async def ipxe_script(self, request: BootRequest) -> tuple[BootPlan, str]:
        plan = await self.ipxe_plan(request)
        return plan, self.render_ipxe(plan)

    def ipxe_plan(self, request: BootRequest) -> Awaitable[BootPlan]:
        """The decision for an iPXE script (:meth:`render_ipxe` renders it): the boot
        service's coroutine itself, not one of this module's around it (the HTTP front
        door awaits it in its own)."""
        return self._boot.plan(request)

    def render_ipxe(self, plan: BootPlan) -> str:
        """The iPXE script of a plan (one template per boot action).

        A held machine asks again every few seconds and gets the same script: it is kept
        per NIC while everything it is made of is equal (the plan, and with it the machine,
        profile, cluster and join as the view holds them; the base URL; the CA). Templates
        are re-read when changed on disk, so a kept script is used only while its template
        file is unchanged too. An install script is kept apart, from its second ask on
        (:meth:`_install_script`).
        """
        with self._render.pinned():  # its template and command line: one look at the watch
            try:
                text = self._render_ipxe(plan)
            except RenderError as exc:
                self._told(plan, "ipxe", exc)
                raise
            if self._enroller is not None and self._enroller.render_failing:
                self._rendered(plan, "iPXE script")  # a call only while some render fails
            return text

    def _render_ipxe(self, plan: BootPlan) -> str:
        name = f"ipxe/{plan.action!s}.ipxe"  # !s: see boot._install_plan
        if plan.token or plan.action == BootAction.INSTALL:
            return self._install_script(name, plan)
        made_of = (plan, self._base_url(), self._trust(), self._render.version(name))
        kept = self._scripts.get(plan.mac)
        if kept is not None and kept[0] == made_of:
            return kept[1]
        text = self._render.ipxe(name, self.context(plan))
        _keep(self._scripts, plan.mac, (made_of, text), SCRIPTS_KEPT)  # the oldest dropped
        return text

    def _install_script(self, name: str, plan: BootPlan) -> str:
        """An install script (template ``name``), which carries the install token and the
        kernel command line. An install under way asked again (its installer's retry, a
        storm's second minute: the same token, nothing written), once its decision is the
        one kept for its NIC (BootService.repeated: the same plan object while the machine,
        profile, cluster, join, token and settings are), gets the text rendered for that
        plan before while the rest it is made of is equal: the base URL, the CA, the
        template file as it is now and the command line's text (the profile's, or the
        default cmdline/ file as it is now). Only where the template and its command line
        read nothing but their context: not where either takes in another template. A first
        install's plan is never a kept one: it keeps nothing and looks at nothing more
        (looking cost ~4 % of a first install's loop instructions). Its render was ~a fifth
        of the loop's work per install asked again (session 25).

        The template and command line are looked at again only when the renderer's
        generation moved since the text was kept (a file may have changed: Renderer
        .generation, the pin's one look per answer): while it has not, they are the ones the
        text was made of, and the base URL and CA alone are compared (what they were made of
        was ~200 of a kept ask's ~1,500 loop bytecodes, s43-again). The text, where it is not
        kept yet, is the plan's frame filled in where its shape has one (_framed: the text a
        render gives), not a render of its own: the first ask again made that shape's frame.
        """
        if not self._boot.repeated(plan):
            return self._framed(name, plan)
        kept = self._installs.get(plan.mac)
        generation = self._render.generation()  # the pin's (render_ipxe): no look of its own
        if kept is not None and kept[0] is plan and kept[3] == generation:
            was = kept[1]
            trust = self._trust()
            if was[0] == self._base_url() and (was[1] is trust or was[1] == trust):
                return kept[2]
        made_of = self._install_made_of(name, plan)
        if made_of is None:
            return self._framed(name, plan)
        if kept is not None and kept[0] is plan and kept[1] == made_of:
            text = kept[2]
        else:
            text = self._framed(name, plan)
        _keep(self._installs, plan.mac, (plan, made_of, text, generation), INSTALLS_KEPT)
        return text

    def _framed(self, name: str, plan: BootPlan) -> str:
        """The install script of a plan not kept (a first install's): the frame of its shape
        with its MAC, token and hostname put in, where it has one (:class:`_Frame`), else
        rendered (and its shape's frame made). A storm's first installs share a few shapes:
        one per template, command line, profile, reason, base URL, CA and console, and
        whether the machine has a hostname. The context and the two split renders (the
        command line's and the script's) were ~a fifth of a first install's loop
        instructions; the frame is a copy, a slice assignment and a join.

        The text is the one a render gives: a frame is made only where the template and its
        command line are split (Renderer.only_printing: their per-machine values printed
        whole, through ``or``, ``~`` or ``tojson``, and nothing else of them depends on
        those values), read no per-machine value but those (_Wanted.frames), and the values
        put in are of letters, digits and ``-_.:`` (a MAC, a token, a hostname as a rule):
        their texts are the same through ``tojson`` and the command line's whitespace
        split, where no ``#`` can start a word. It is made from a render with marks in their
        place (``or`` given a mark where its value is true), and checked against the
        render of the request that made it."""
        render = self._render
        template, names = render.reads(name)
        profile, machine, token = plan.profile, plan.machine, plan.token or ""
        want: _Wanted | None = None
        source: str | None = None
        if (names is not None and profile is not None and machine is not None
                and plan.command is None and type(plan.reason) is str
                and type(plan.retry_seconds) is int):
            try:
                source = (profile.cmdline or self._default_cmdline(profile.config_template)
                          if "cmdline" in names else None)
                want = self._wanted(names, source)
            except RenderError:  # the render says why
                pass
        frames = want.frames if want is not None else None
        if frames is None or want is None or profile is None or machine is None:
            return render.ipxe_with(name, lambda names: self.context(plan, names=names))
        hostname = machine.hostname
        trust = self._trust() if want.trust else None
        # The profile by its id: the frame holds it, so that no other takes that id meanwhile.
        key = (template, source, id(profile), plan.action, plan.reason, plan.retry_seconds,
               self._base_url(),
               default_console(machine.arch, machine.firmware) if want.console else None,
               # A hostname's True, or None or "" apart: Jinja prints None as "None" (a
               # stored "" is a restored backup's or hand SQL's, not the API's).
               bool(hostname) or hostname, not token)
        frame = frames.get(key)
        # One look at the hostname and the token, as _config_framed's: their two
        # str.strip(_FRAME_PLAIN) were ~5,800 of a first install's ~290,000 loop instructions
        # (a look-up in the 66 characters for each character of each; callgrind,
        # benchmarks/README.md s50-install), the expression's walk ~3,400.
        plain = _FRAME_PLAIN_AT(f"{hostname or ''}{token}") is not None
        mac = plan.mac
        values = (mac.hex(":"), mac.hex("-"), token, hostname or "")
        if frame is not None and plain and frame.fits(profile, trust):
            want.framed += 1
            return frame.text(values)
        marked = None
        # None yet, or made of others (another CA); not where frames are made more than used
        # (more shapes in turn than are kept: each frame made is a render more).
        tried = plain and (frame is not None or key not in frames) and (
            want.made < _FEW or want.framed >= 8 * want.made)
        if tried:
            # Rendered with two sets of marks that differ at every letter, as a config's
            # frame is (_config_framed): a template printing one letter of a value
            # (``hostname[0]``, a constant subscript the split's proof lets through) gives
            # the same letter of every mark, which the first machine's value of that letter
            # matched in the check below, and the next machine got that letter.
            marked = self._marked_alike(lambda marks: self._marked_script(
                name, plan, marks, bool(token), hostname))
        text = render.ipxe_with(name, lambda names: self.context(plan, names=names))
        if tried:
            want.made += 1
            made = (self._frame_of(marked, profile, trust)
                    if marked is not None and render.only_printing(name, source) else None)
            if len(frames) >= _FEW:
                frames.clear()  # bounded: old templates', profiles' and reasons' go
            # None: this shape is rendered (not tried again).
            frames[key] = made if made is not None and made.text(values) == text else None
        return text

    def _marked_alike(self, render: Callable[[tuple[str, ...]], str]) -> str | None:
        """``render``'s text with :attr:`_marks`, where its text with :attr:`_other_marks`
        (which differ at every letter) is the same text but for the marks: each value
        printed whole, no letter of it (a frame's proof); None where they differ or either
        render failed (the request's own render says why)."""
        texts = []
        for marks in (self._marks, self._other_marks):
            with contextlib.suppress(RenderError):
                texts.append(render(marks))
        if len(texts) == 2 and _swapped(texts[1], self._other_marks, self._marks) == texts[0]:
            return texts[0]
        return None

    def _marked_script(self, name: str, plan: BootPlan, marks: tuple[str, ...], token: bool,
                       hostname: str | None) -> str:
        """Install script ``name`` of ``plan`` rendered with ``marks`` in the places of its
        values (the MAC's two forms always, the token and hostname where true: _framed)."""
        return self._render.ipxe_with(name, lambda names: self.context(
            plan, names=names, token=marks[2] if token else None,
            stand_in=(marks[0], marks[1], marks[3] if hostname else hostname)))

    def _frame_of(self, marked: str, profile: Profile, trust: Trust | None) -> _Frame:
        """The frame of an install script rendered with :attr:`_marks` for its values."""
        pieces = self._marked_at.split(marked)
        which = tuple(self._marks.index(m) for m in pieces[1::2])
        pieces[1::2] = [""] * len(which)
        return _Frame(profile, trust, pieces, which)

    def _install_made_of(self, name: str, plan: BootPlan) -> tuple[object, ...] | None:
        """What an install script of ``plan`` is made of besides the plan (see
        :meth:`_install_script`); None where it cannot be told, and then it is not kept."""
        template, names = self._render.reads(name)
        if names is None:
            return None
        profile = plan.profile
        source = None
        if profile is not None and "cmdline" in names:
            try:
                source = profile.cmdline or self._default_cmdline(profile.config_template)
            except RenderError:
                return None  # the render says why
            if self._render.string_reads(source) is None:
                return None  # it takes in another template
        return (self._base_url(), self._trust(), template, source)

    # -- pxelinux / U-Boot / TFTP -------------------------------------------------------
    async def pxelinux(self, request: BootRequest) -> str:
        return self.render_pxelinux(await self._boot.plan(request))

    def render_pxelinux(self, plan: BootPlan) -> str:
        try:
            text = self._render_pxelinux(plan)
        except RenderError as exc:
            self._told(plan, "pxelinux", exc)
            raise
        if self._enroller is not None and self._enroller.render_failing:
            self._rendered(plan, "pxelinux config")  # a call only while some render fails
        return text

    def _render_pxelinux(self, plan: BootPlan) -> str:
        """The pxelinux config of a plan; an ignored machine gets none (U-Boot moves on)."""
        if plan.action == BootAction.IGNORE:
            raise NotFound(f"no pxelinux config for {plan.mac}: {plan.reason}")
        text = self._render.render(f"pxelinux/{plan.action}.cfg", self.context(plan))
        if "\n  APPEND" in text and len(text.split("\n  APPEND", 1)[1].split("\n")[0]) > 4000:
            raise RenderError("pxelinux APPEND line too long for U-Boot's 4 KiB buffer")
        return text

    def uboot_script(self) -> bytes:
        text = self._render.render("uboot/boot.scr.txt", {"base_url": self.urls.base})
        body = "".join(line + "\n" for line in text.splitlines()
                       if line.strip() and not line.lstrip().startswith("#"))
        # A fixed timestamp keeps the image byte-identical across restarts (cacheable, testable).
        return uimage.script_image(body, timestamp=0, name="netboot")

    # -- GRUB (the shim-grub chain) ---------------------------------------------------
    async def grub_file(self, name: str, peer: tuple[str, int], via: str) -> bytes:
        """A file under GRUB's prefix ``/grub`` (Debian's signed netboot images have it built
        in). They read ``grub.cfg`` only (after ``<platform>/grub.cfg``, which is not found
        here), so that dispatches to ``grub.cfg-01-<mac>`` (colons as ``$net_default_mac``
        has them, or dashes as upstream GRUB's own lookup asks), then ``grub.cfg-<HEX IP>``."""
        if name == "grub.cfg":
            return self._render.render("grub/grub.cfg", {"base_url": self.urls.base}).encode()
        lower = name.lower()
        if lower.startswith("grub.cfg-01-") and len(lower) == 29:
            mac = MacAddress.parse(lower[len("grub.cfg-01-"):])
            machine = await self._store.machine_by("mac", str(mac))
            request = BootRequest(mac=mac, via=via, remote_addr=peer[0],
                                  firmware=machine.firmware if machine and machine.firmware
                                  else Firmware.UEFI,
                                  arch=machine.arch if machine and machine.arch
                                  else Arch.UNKNOWN)
            return self.render_grub(await self._boot.plan(request), via=via).encode()
        if lower.startswith("grub.cfg-") and _HEX_IP.match(name[len("grub.cfg-"):]) \
                and len(name) == len("grub.cfg-") + 8:
            hexip = name[len("grub.cfg-"):]
            machine = await self._by_ip(".".join(str(int(hexip[i:i + 2], 16))
                                                 for i in range(0, 8, 2)))
            if machine is not None:
                return self.render_grub(await self._boot.plan(identity.request_for(
                    machine, via=via, remote_addr=peer[0],
                    firmware=machine.firmware or Firmware.UEFI,
                    arch=machine.arch or Arch.UNKNOWN)), via=via).encode()
        # <platform>/grub.cfg, fonts, locales: site files if any, else not found (GRUB goes on).
        return _read(self.assets.resolve("grub/" + name))

    def render_grub(self, plan: BootPlan, *, via: str = "tftp") -> str:
        try:
            text = self._render_grub(plan, via)
        except RenderError as exc:
            self._told(plan, "grub", exc)
            raise
        if self._enroller is not None and self._enroller.render_failing:
            self._rendered(plan, "grub.cfg")  # a call only while some render fails
        return text

    def _render_grub(self, plan: BootPlan, via: str) -> str:
        """The per-machine grub.cfg of a plan (one template per boot action). The kernel and
        initrds come from the same server and protocol GRUB was loaded over: TFTP paths, or
        ``/assets/...`` for UEFI HTTP boot (GRUB's ``$root`` is that server either way)."""
        ctx = self.context(plan)
        if plan.action == BootAction.INSTALL and plan.profile is not None:
            refs = (plan.profile.kernel, *plan.profile.initrds)
            remote = [r for r in refs if r.startswith(("http://", "https://"))]
            if remote:
                raise RenderError(f"profile {plan.profile.name}: GRUB fetches the kernel and "
                                  f"initrds from netboot itself; {remote[0]} is a URL, put "
                                  "it in netboot's assets")
            head = "/assets/" if via == "http" else "/"
            ctx["grub_kernel"] = head + ctx["kernel_path"]
            ctx["grub_initrds"] = [head + p for p in ctx["initrd_paths"]]
        return self._render.render(f"grub/{plan.action}.cfg", ctx)

    async def tftp_open(self, path: str, peer: tuple[str, int],
                        local: Callable[[], str | None] | None = None) -> Blob:
        """Dynamic per-machine files first (U-Boot/pxelinux/GRUB lookup order), then assets.
        ``local`` (TftpServer.by_address): asks the address the request came in on, which a
        rendered file's URLs name where the base URL is loopback (:meth:`at`; a pxelinux or
        GRUB config's command line carries the config URL). Not asked for an asset."""
        rel = clean_relative(path)
        if local is not None and _rendered_over_tftp(rel) and self.by_address():
            view = self.at(local())
            if view is not self:
                return await view.tftp_open(rel, peer)
        if rel == "boot.scr.uimg":
            return _text_blob(self.uboot_script(), "application/octet-stream")
        if rel.startswith("pxelinux.cfg/"):
            return _text_blob(await self._pxelinux_file(rel.split("/", 1)[1], peer))
        if rel.startswith("grub/"):
            return _text_blob(await self.grub_file(rel.split("/", 1)[1], peer, "tftp"))
        head, _, rest = rel.partition("/")
        if rest and _RPI_SERIAL.match(head.lower()):
            return await self._rpi_file(head.lower(), rest, peer)
        return self.assets.blob(rel)

    async def _pxelinux_file(self, name: str, peer: tuple[str, int]) -> bytes:
        """U-Boot order: <uuid>, 01-<mac>, hex IP prefixes, default-* (protocols.md §3.3)."""
        machine: Machine | None = None
        lower = name.lower()
        if lower.startswith("01-") and len(lower) == 20:
            mac = MacAddress.parse(lower)
            return (await self.pxelinux(BootRequest(mac=mac, via="tftp", remote_addr=peer[0],
                                                    firmware=Firmware.UBOOT,
                                                    arch=await self._arch(mac)))).encode()
        if re.match(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", lower):
            machine = await self._by_uuid(lower)
            if machine is not None and not machine.macs:
                # Enrolled by its UUID alone: any host can ask this name, and a NIC is what
                # its install is keyed by. Not found, U-Boot asks 01-<mac> next, whose NIC its
                # DHCP attached, to be listed (identity.UNLISTED).
                machine = None
        elif _HEX_IP.match(name) and len(name) == 8:
            ip = ".".join(str(int(name[i:i + 2], 16)) for i in range(0, 8, 2))
            machine = await self._by_ip(ip)
        if machine is None:
            # Shorter hex prefixes and default-<arch>-<soc>-<board> are site files, if any.
            return _read(self.assets.resolve("pxelinux.cfg/" + name))
        return (await self.pxelinux(identity.request_for(
            machine, via="tftp", remote_addr=peer[0], firmware=Firmware.UBOOT,
            arch=machine.arch or Arch.UNKNOWN))).encode()

    async def _rpi_file(self, serial: str, rest: str, peer: tuple[str, int]) -> Blob:
        """Raspberry Pi 4/5 bootloaders prefix every file with the board serial (TFTP_PREFIX=0,
        protocols.md §5). Only a machine enrolled with that serial and due to install gets
        files: for any other answer the prefix is refused, the bootloader clears it, finds
        nothing at the root either, and goes on to its next BOOT_ORDER entry (the local disk).
        ``cmdline.txt`` is the profile's rendered command line with a fresh install token;
        everything else comes from the ``rpi/`` asset directory.
        """
        machine = await self._by_serial(serial)
        if machine is None:
            raise NotFound(f"no machine enrolled with Raspberry Pi serial {serial}")
        if not machine.macs:
            # Its TFTP requests carry no MAC, and its installer's config URL, progress reports
            # and registration are keyed by one: enrolled by serial alone, it booted the
            # installer, which then fetched /config/00-00-00-00-00-00 (401) and stopped.
            # Refused before any file, its bootloader goes on to its next BOOT_ORDER entry.
            raise NotFound(f"{machine.ref} (Raspberry Pi serial {serial}) has no MAC enrolled: "
                           "its installer's config and registration need one; add it: netboot "
                           f"machines set {machine.ref} --add-mac MAC (on its label, or "
                           "'ip link' on the Pi)")
        # The Pi's TFTP requests carry no MAC: its serial is what recognises it (the form it
        # was enrolled with, so that the boot path finds the same machine).
        request = replace(identity.request_for(machine, firmware=Firmware.RPI, arch=Arch.ARM64,
                                               via="tftp", remote_addr=peer[0]),
                          serial=machine.serial or serial)
        if rest != "cmdline.txt":
            plan = await self._boot.plan(request, record=False)
            if plan.action != BootAction.INSTALL:
                raise NotFound(f"{machine.ref}: {plan.reason}")
            return self.assets.blob("rpi/" + rest)
        plan = await self._boot.plan(request)
        if plan.action != BootAction.INSTALL:
            raise NotFound(f"{machine.ref}: {plan.reason}")
        try:
            cmdline = self.context(plan)["cmdline"]
        except RenderError as exc:  # was only logged (s42-ops)
            self._told(plan, "cmdline", exc)
            raise
        self._rendered(plan, _RENDERED["cmdline"][1])
        return _text_blob(cmdline + "\n")

    async def _by_serial(self, serial: str) -> Machine | None:
        # The Pi prints its serial as 8 hex digits in the prefix ("0a1b2c3d"); operators copy
        # it from the label, or from /proc/cpuinfo with a 10000000/00000000 prefix.
        for form in (f"{head}{s}" for s in (serial, serial.upper())
                     for head in ("", "10000000", "00000000")):
            machine = await self._store.machine_by("serial", form)
            if machine is not None:
                return machine
        return None

    async def _arch(self, mac: MacAddress) -> Arch:
        machine = await self._store.machine_by("mac", str(mac))
        return machine.arch if machine and machine.arch else Arch.UNKNOWN

    async def _by_uuid(self, uuid: str) -> Machine | None:
        return await self._store.machine_by("uuid", uuid)

    async def _by_ip(self, ip: str) -> Machine | None:
        # By the address's index, not a read of every lease per request (s37-attack).
        lease = await self._store.lease_by_ip(ip)
        return None if lease is None else await self._store.machine_by("mac", lease.mac)

    # -- per-machine configs (need the install token: they carry cluster secrets) -------
    async def authorised_plan(self, mac_text: str, token: str | None) -> BootPlan:
        mac = MacAddress.parse(mac_text)
        found = self._boot.held_machine(mac)  # without machine_by_mac's coroutine where it can
        if isinstance(found, identity.Unseen):
            found = await self._boot.machine_by_mac(mac)
        # Only during an install (booting, installing): the config carries the cluster's join
        # token, which an installed or registered machine no longer needs (409 naming its
        # state); an unknown MAC and a wrong token get the same 401, leaking nothing.
        # A token that opens the config is checked without waiting (only a refusal records
        # an event): the view is as machine_by_mac synced it (after its read of the
        # machine), not synced again.
        # The token that opens it taken without check_token's coroutine (Enroller.
        # token_opens: the same tests); any other way, check_token refuses and says why.
        enroller = self._enroller
        machine = found if enroller.token_opens(found, token, _FETCHED) else \
            await enroller.check_token(
                found, token, _FETCHED,
                refused="a valid install token is required for this machine's config")
        # config_plan's call written out: one coroutine fewer a config fetch (~2,000 loop
        # instructions, session 32); and none where its answer needs no wait (s50-config).
        boot, reason = self._boot, _CONFIG_REASONS[machine.state]
        plan = boot.config_plan_now(machine, token=token, reason=reason, mac=mac)
        if plan is not None:
            return plan
        return await boot.config_plan(machine, token=token, mac=mac, synced=True, reason=reason)

    async def config_plan(self, machine: Machine, token: str | None, *, claim: bool = True,
                          request: BootRequest | None = None,
                          mac: MacAddress | None = None, synced: bool = False) -> BootPlan:
        """The plan a per-machine config is rendered from (the server's and ``netboot render``'s
        alike). ``claim=False`` for dry runs that must not pick the cluster-init node; ``mac``
        is the NIC it is asked for (default: the machine's primary one); ``synced``: see
        BootService.config_plan."""
        return await self._boot.config_plan(machine, token=token, request=request, claim=claim,
                                            mac=mac, synced=synced,
                                            reason=_CONFIG_REASONS[machine.state])

    async def config_fetched(self, plan: BootPlan, what: str) -> None:
        machine = plan.machine
        if machine is None:
            return
        try:
            await self._enroller.config_fetched(machine, what)
            return
        except StateChanged as exc:
            moved = exc
        # Asked twice at once (an installer's retry while its first fetch waits for the
        # group commit): the other fetch moved the machine on. The config rendered is
        # theirs too while the machine is the one read after that very step, and its
        # token still opens it (a reinstall meanwhile clears it: refused as before).
        # Awaited outside the handler: see recorder._write_group.
        now = await self._boot.machine_by_mac(plan.mac)
        step = lifecycle.Trigger.CONFIG_FETCHED
        if now is None or not equal(lifecycle.advance(machine, step, now.updated), now) \
                or not token_matches(now, plan.token, self._clock()):
            raise moved
        await self._enroller.config_fetched(now, what)

    def asset(self, path: str) -> Blob:
        return self.assets.blob(path)

    def k3os_config(self, plan: BootPlan) -> str:
        _need_profile(plan)
        try:
            text = self._config("cloud-config/k3os.yaml", plan)
        except RenderError as exc:
            self._told(plan, "config", exc)
            raise
        if self._enroller is not None and self._enroller.render_failing:
            self._rendered(plan, _RENDERED["config"][1])  # told fixed, as a script's is
        return text

    def nocloud(self, plan: BootPlan, name: str) -> str:
        if name not in ("meta-data", "user-data", "vendor-data"):
            raise NotFound(f"no NoCloud file {name!r}")
        _need_profile(plan)
        header = "#cloud-config" if name != "meta-data" else ""
        try:
            text = self._config(f"cloud-config/cloud-init/{name}", plan, header=header)
        except RenderError as exc:
            self._told(plan, "nocloud", exc, name)
            raise
        if self._enroller is not None and self._enroller.render_failing:
            self._rendered(plan, _RENDERED["nocloud"][1].format(file=name))  # as a script's
        return text

    def _config(self, name: str, plan: BootPlan, *, header: str = "") -> str:
        """Config template ``name`` rendered for ``plan`` and checked (YAML).

        An installer that asks again (a retry, a second read of its seed) while its machine
        stays where its fetches leave it (installing) gets the text rendered before: kept
        per NIC and template while everything it was made of is equal — the plan (with it
        the machine, profile, cluster, join and token as the view holds them), the base URL,
        the CA, and the template file as it is now. Only a template that reads nothing but
        its context is kept this way: not one that takes in another template, nor one that
        reads the kernel command line (made of files too). A first fetch moves its machine
        on (booting -> installing), so its plan is never asked for again: it is not kept."""
        # Without the kernel command line where the template does not read it; the template
        # and the command line checked by one look at the watch.
        with self._render.pinned():
            machine = plan.machine
            read = self._render.reads(name)
            template, names = read
            made_of: tuple[object, ...] | None = None
            if (names is not None and "cmdline" not in names and machine is not None
                    and lifecycle.TRANSITIONS.get(
                        (machine.state, _FETCHED)) is machine.state):
                made_of = (plan, header, self._base_url(), self._trust())
                kept = self._configs.get((plan.mac, name))
                if kept is not None and kept[0] is template and kept[1] == made_of:
                    return kept[2]
            text = self._config_framed(name, plan, header, read)
            if made_of is not None:
                _keep(self._configs, (plan.mac, name), (template, made_of, text), CONFIGS_KEPT)
            return text

    def _config_framed(self, name: str, plan: BootPlan, header: str,
                       read: tuple[Any, frozenset[str] | None]) -> str:
        """Config template ``name`` (``read``: its template and names, Renderer.reads) of
        ``plan``: the frame of its shape with the machine's MAC, token, hostname and k3s
        node name, and its cluster's join token and server URL, put in, where it has one
        (:class:`_Frame`), else rendered and checked (:meth:`_config_rendered`, the shape's
        frame made). A storm's first configs share a few shapes: one per template, header,
        base URL, profile, plan dict, CA, console, the join but its node name, token and
        server URL (role, cluster-init, labels, taints; a server's TLS names), and whether
        the machine has a hostname, the plan a token and the join a node name, a token and
        a server URL; the cluster itself only where the template reads its dict or the node
        is a server (its k3s CA and agent token): a fleet's agents of hundreds of clusters
        share a frame (s43-config). Where the template reads the join token or server URL
        otherwise than printing them (Renderer.config_join_printing), they are in the key
        by value: a frame per cluster. The context, the split's fill and its YAML check
        were ~a quarter of a first config's loop bytecodes (s42-config); the frame is a
        copy, a slice assignment and a join.

        The text is the one the render gives, as for an install script's (:meth:`_framed`):
        a frame is made only where the template has its split form (Renderer
        .config_only_printing: its per-machine values only printed), reads no name but
        _CONFIG_FRAMED_NAMES (of the machine only its hostname), every value put in is of
        letters, digits and ``-_.:`` (the same text through tojson and the register
        command's quoting; a server URL ``/[]`` too: it is in no register command), and
        every place of one is inside a double-quoted scalar, on a
        comment's line or on a block scalar's line (render.fills_in_place: the YAML says
        the same with any such value, so the render's check passes too). It is made from a
        render with marks in their place and kept only if, filled with the request's own
        values, it gives the request's own render."""
        template, names = read
        profile, machine, k3s, cluster = plan.profile, plan.machine, plan.k3s, plan.cluster
        want: _Wanted | None = None
        joins = False  # whether the template only prints the join's token and server URL
        if (names is not None and template is not None and profile is not None
                and machine is not None and plan.command is None
                and type(plan.reason) is str and type(plan.retry_seconds) is int):
            wanted = self._config_wants.get(id(template))
            if wanted is None or wanted[0] is not template:
                wanted = (template, self._wanted(names, None),
                          self._render.config_join_printing(template, name, _JOIN_MARKED))
                _keep_few(self._config_wants, id(template), wanted)
            want, joins = wanted[1], wanted[2]
        frames = want.config_frames if want is not None else None
        if frames is None or want is None or profile is None or machine is None:
            return self._config_rendered(name, plan, header, read)
        token = plan.token or ""
        hostname = machine.hostname
        trust = self._trust() if want.trust else None
        # The join's values by value (its labels and taints are its group's too), but its
        # token and server URL where the template only prints them (or tests their truth:
        # Renderer.config_join_printing): those are put in as the node name is, so that
        # one frame serves a shape's nodes in every cluster (a fleet's hundreds), its key
        # holding whether each is true. The cluster object keys the frame only where more
        # of it is read: its dict, or a server's k3s CA and agent token.
        node = join_token = server_url = ""
        owner = cluster if want.cluster else None
        join: tuple[object, ...] | None = None
        if k3s is not None:
            node = k3s.node_name
            # A server's TLS names (its k3s arguments: an agent's print none, and a managed
            # cluster's are its own) and cluster (its CA) are its frame's.
            tls: tuple[str, ...] | None = None
            if k3s.role == "server":  # Role.SERVER's value, as Content.context reads it
                owner, tls = cluster, k3s.tls_san
            if joins:
                join_token, server_url = k3s.token, k3s.server_url or ""
                join = (k3s.role, k3s.server_url if not server_url else True,
                        k3s.cluster_init, not join_token, tuple(k3s.labels.items()),
                        k3s.taints, tls)
            else:
                join = (k3s.role, k3s.server_url, k3s.cluster_init, k3s.token,
                        tuple(k3s.labels.items()), k3s.taints, tls, None)
        # cloud-init's meta-data: its instance serial (digits) put in; whether it is 0 keyed.
        number = int(machine.updated) if want.instance_serial else 0
        # Profile and cluster by their ids: the frame holds them, so that no other takes
        # those ids meanwhile.
        key = (template, header, id(profile), id(owner), plan.action, plan.reason,
               plan.retry_seconds, self._base_url(),
               default_console(machine.arch, machine.firmware) if want.console else None,
               join, bool(hostname) or hostname, not token, not node,
               not number)  # a hostname None and "" apart, as _framed's
        frame = frames.get(key)
        # One look at the machine's values, not three. The join token and server URL are
        # the cluster's (the same for every node of it): looked at once a pair, not at every
        # config (their two regex walks were ~3,500 loop instructions a first config).
        plain = _FRAME_PLAIN_AT(f"{hostname or ''}{token}{node}") is not None
        if plain and (join_token or server_url):
            pair = (join_token, server_url)
            known = self._joins_plain.get(pair)
            if known is None:
                known = _FRAME_PLAIN_AT(join_token) is not None and (
                    not server_url or _FRAME_URL_AT(server_url) is not None)
                if len(self._joins_plain) >= _FEW_CLUSTERS:  # as many as boot keeps joins of
                    self._joins_plain.clear()  # bounded: old tokens and URLs go
                self._joins_plain[pair] = known
            plain = known
        mac = plan.mac
        values = (mac.hex(":"), mac.hex("-"), token, hostname or "", node, join_token,
                  server_url, str(number) if number else "")
        if frame is not None and plain and frame.fits(profile, trust, owner):
            want.framed += 1
            text = frame.text(values)
            if k3s is not None and k3s.role == "server" and name in _CA_WRITERS:
                _check_server_writes(name, plan, text)  # as the render's (a few a cluster)
            return text
        marked = None
        # None yet, or made of others (another CA, cluster or profile object); not where
        # frames are made more than used (each frame made is a render more).
        tried = plain and (frame is not None or key not in frames) and (
            want.made < _FEW or want.framed >= 8 * want.made)
        if tried:
            # Which values have a place (the others, false, are themselves).
            put = (True, True, bool(token), bool(hostname), bool(node), bool(join_token),
                   bool(server_url), bool(number))
            marked = self._marked_alike(lambda marks: self._marked_config(
                name, plan, header, read, marks, put))
        text = self._config_rendered(name, plan, header, read)
        if tried:
            # Counted, and kept (None) where the marked render failed and this one did not:
            # such a shape is not tried again at every request.
            want.made += 1
            made = (self._config_frame_of(marked, header, profile, trust, owner)
                    if marked is not None and self._render.config_only_printing(template)
                    else None)
            if len(frames) >= _FEW:
                frames.clear()  # bounded: old templates', profiles' and clusters' go
            # None: this shape is rendered (not tried again).
            frames[key] = made if made is not None and made.text(values) == text else None
        return text

    def _marked_config(self, name: str, plan: BootPlan, header: str,
                       read: tuple[Any, frozenset[str] | None], marks: tuple[str, ...],
                       put: tuple[bool, ...]) -> str:
        """Config ``name`` of ``plan`` rendered with ``marks`` in the places of the values
        ``put`` says have one (_config_framed's order; the MAC's two forms always)."""
        k3s, hostname = plan.k3s, plan.machine.hostname if plan.machine else None
        marked_plan = plan if k3s is None else replace(plan, k3s=replace(
            k3s, node_name=marks[4] if put[4] else k3s.node_name,
            token=marks[5] if put[5] else k3s.token,
            server_url=marks[6] if put[6] else k3s.server_url))
        return self._render.yaml_config(name, lambda names: self.context(
            marked_plan, names=names, token=marks[2] if put[2] else None,
            stand_in=(marks[0], marks[1], marks[3] if put[3] else hostname),
            serial=marks[7] if put[7] else None), header=header, read=read)

    def _config_frame_of(self, marked: str, header: str, profile: Profile,
                         trust: Trust | None, cluster: Cluster | None) -> _Frame | None:
        """The frame of a config rendered with :attr:`_marks` for its values; None where a
        value's place is not one any such value may take (render.fills_in_place) or the
        header is not all before the first."""
        pieces = self._marked_at.split(marked)
        places, at = [], 0
        for i, piece in enumerate(pieces):
            if i % 2:
                places.append((at, at + len(piece)))
            at += len(piece)
        if not pieces[0].startswith(header) or not fills_in_place(marked, places):
            return None
        frame = self._frame_of(marked, profile, trust)
        frame.cluster = cluster
        return frame

    def _config_rendered(self, name: str, plan: BootPlan, header: str,
                         read: tuple[Any, frozenset[str] | None]) -> str:
        """Config template ``name`` rendered for ``plan`` and checked (:meth:`_config`)."""
        text = self._render.yaml_config(
            name,
            lambda names: self.context(plan, names=names),
            header=header, read=read)
        k3s = plan.k3s
        if k3s is not None and k3s.role == "server" and name in _CA_WRITERS:
            _check_server_writes(name, plan, text)  # (an agent's config never has the CA)
        return text

    def close(self) -> None:
        """What the renderer holds (its inotify instance) given back."""
        self._render.close()


# The configs that write a server's k3s CA files (before k3s first starts).
_CA_WRITERS = frozenset({"cloud-config/k3os.yaml", "cloud-config/cloud-init/user-data"})


def _server_ca(plan: BootPlan) -> tuple[str, str] | None:
    """(certificate, key) PEM of the k3s server CA ``plan``'s node writes: a server of a
    cluster that has one; None for any other."""
    cluster, k3s = plan.cluster, plan.k3s
    if cluster is None or k3s is None or not cluster.ca_cert or k3s.role != "server":
        return None
    return cluster.ca_cert, cluster.ca_key


def _check_server_writes(name: str, plan: BootPlan, text: str) -> None:
    """A server's config that does not write its cluster's k3s CA, or give it the agent
    token, is refused: its k3s would make a CA of its own, whose hash is not the secure
    token's, and every other node would refuse it; or refuse every agent (a site's template
    from before netboot made the CA, or agent tokens)."""
    ca = _server_ca(plan)
    # The certificate's first base64 line: the same text in any YAML form of the PEM (tojson,
    # a block scalar) but base64 (which a site's template would not use for a PEM).
    if ca is not None and ca[0].split("\n", 2)[1] not in text:
        raise RenderError(f"template {name} does not write the k3s server CA of cluster "
                          f"{plan.cluster.name if plan.cluster else ''!r} to a server node "
                          "(k3s.server_ca and k3s.server_ca_key to "
                          "/var/lib/rancher/k3s/server/tls/server-ca.crt and .key, as netboot's "
                          "template does): k3s would make its own, which the cluster's secure "
                          "token does not name")
    # Agents are given the agent token: a server not given its secret refuses every one.
    cluster = plan.cluster
    if cluster is not None and cluster.agent_token \
            and not _gives(cluster.agent_secret, text):
        raise RenderError(f"template {name} does not give a server node of cluster "
                          f"{cluster.name!r} its agent token (k3s.agent_token as k3s's "
                          "agent-token, in /etc/rancher/k3s/config.yaml, as netboot's template "
                          "does): the cluster's agents join with it, and a server without it "
                          "would refuse them")


def _gives(secret: str, text: str) -> bool:
    """Whether a config's ``text`` holds ``secret`` as a template writes it: as it is (a
    block scalar), or as ``tojson`` writes it, once or twice (k3OS's ``write_files``
    content is a JSON string of a line holding one). An operator's own agent token may hold
    what tojson escapes (``&``, ``<``, ``>``, ``'`` as ``\\u0026``…, ``"``, ``\\``): k3s
    takes any text, and reads the escapes back."""
    if secret in text:
        return True
    once = (encode_basestring_ascii(secret)[1:-1].replace("<", "\\u003c")
            .replace(">", "\\u003e").replace("&", "\\u0026").replace("'", "\\u0027"))
    return once in text or encode_basestring_ascii(once)[1:-1] in text


# Profiles' and clusters' context values kept (Content._of_profile, _of_cluster): a site has
# a few of each; the objects are the view's, new ones after every change.
_FEW = 64


def _keep_few(kept: dict[int, Any], key: int, value: Any) -> None:
    if len(kept) >= _FEW:
        kept.clear()  # bounded: old objects of changed profiles and clusters go
    kept[key] = value


# The context names Content._of_profile's second dict gives (the profile's file URLs, names
# and paths).
_PROFILE_FILES = frozenset({"kernel_url", "initrd_urls", "initrd_names", "kernel_path",
                            "initrd_paths"})


class _Wanted:
    """What Content.context gives a template reading ``names`` (None: every name): each
    optional value, the machine's keys (:func:`_machine_keys`), and the values it shares
    with every machine of a profile, plan dict and cluster (Content._shared: by their ids,
    the objects kept beside, so that no other object takes one of those ids meanwhile)."""

    __slots__ = ("cluster", "config_frames", "config_url", "console", "events_url",
                 "fallbacks", "framed", "frames",
                 "instance_serial", "k3s", "machine", "machine_keys", "made", "nocloud_url",
                 "profile_files", "register_command", "shared", "trust")

    def __init__(self, names: frozenset[str] | None) -> None:
        def reads(some: frozenset[str]) -> bool:
            return names is None or not names.isdisjoint(some)

        self.config_url = reads(frozenset({"config_url"}))
        self.instance_serial = reads(frozenset({"instance_serial"}))
        self.machine = reads(frozenset({"machine"}))
        self.trust = reads(_TRUST_NAMES)
        self.cluster = reads(frozenset({"cluster"}))
        self.fallbacks = reads(frozenset({"fallback_urls"}))
        self.k3s = reads(frozenset({"k3s"}))
        self.nocloud_url = reads(frozenset({"nocloud_url"}))
        self.events_url = reads(frozenset({"events_url"}))
        self.register_command = reads(frozenset({"register_command"}))
        self.console = reads(frozenset({"console"}))
        self.profile_files = reads(_PROFILE_FILES)
        self.machine_keys = None if names is None else _machine_keys(names)
        self.shared: dict[tuple[int, int, int], tuple[Profile | None, dict[str, Any],
                                                      Cluster | None, str, Trust | None,
                                                      dict[str, Any]]] = {}
        # An install script's frames (Content._framed), where its template and command line
        # read nothing but _FRAMED_NAMES (no per-machine value but the MAC's two forms, the
        # token, the config URL made of them, the machine's hostname and the command line;
        # not the cluster: a fleet's hundreds of clusters would be as many shapes): None
        # where they read more. A name this does not know (a new one) is refused.
        self.frames: dict[tuple[object, ...], _Frame | None] | None = (
            {} if names is not None and names <= _FRAMED_NAMES
            and (not self.machine or self.machine_keys == ("hostname",)) else None)
        # A config's frames (Content._config_framed), where its template reads nothing but
        # _CONFIG_FRAMED_NAMES (of the machine its hostname alone); None where it reads more.
        self.config_frames: dict[tuple[object, ...], _Frame | None] | None = (
            {} if names is not None and names <= _CONFIG_FRAMED_NAMES
            and (not self.machine or self.machine_keys == ("hostname",)) else None)
        self.made = 0  # frames made (each a render more)
        self.framed = 0  # scripts and configs made of them


# What each device render (Content._told's kind) is made from and is called in its
# ``render failed`` event: its template (of the plan's action; a NoCloud file's name; "":
# a profile's text, not a file), what the device asked for, and the ``netboot render``
# kind that shows its error (a Pi's cmdline.txt is the iPXE script's command line).
_RENDERED = {
    "ipxe": ("ipxe/{action!s}.ipxe", "iPXE script", "ipxe"),
    "pxelinux": ("pxelinux/{action!s}.cfg", "pxelinux config", "pxelinux"),
    "grub": ("grub/{action!s}.cfg", "grub.cfg", "grub"),
    "config": ("cloud-config/k3os.yaml", "k3OS config", "config"),
    "nocloud": ("cloud-config/cloud-init/{file}", "cloud-init {file}", "nocloud"),
    "cmdline": ("", "Raspberry Pi cmdline.txt (its profile's command line)", "ipxe"),
}


# The names a template with frames may read (_Wanted.frames): the shared values
# (Content._shared's, but the cluster), the console, and the per-machine values a frame has
# a place for (Content._framed).
_FRAMED_NAMES = frozenset({"base_url", "fallback_urls", "profile", "plan", *_TRUST_NAMES,
                           *_PROFILE_FILES, "console", "cmdline", "mac", "mac_hexhyp",
                           "token", "config_url", "machine", "machine.hostname"})


# The names a config with frames may read (_Wanted.config_frames): an install script's but
# the command line (a config that reads it is not kept either: its files), and the join, the
# register command, the cluster's dict (a frame reading it is its cluster's), the URLs made
# of the MAC and the token and meta-data's instance serial (the per-machine values a frame
# has a place for).
_CONFIG_FRAMED_NAMES = _FRAMED_NAMES.difference({"cmdline"}).union(
    {"k3s", "register_command", "cluster", "nocloud_url", "events_url", "instance_serial"})


class _Frame:
    """An install script or config of one shape (Content._framed, _config_framed): its text
    cut at the places of the per-machine values, which of them goes in each, and what else
    it was made of (the profile, trust and, a config's, cluster objects: its key holds the
    rest)."""

    __slots__ = ("cluster", "pick", "profile", "slots", "trust")

    def __init__(self, profile: Profile, trust: Trust | None, slots: list[str],
                 which: tuple[int, ...]) -> None:
        self.profile = profile
        self.trust = trust
        self.cluster: Cluster | None = None  # a config's (Content._config_frame_of)
        self.slots = slots  # the fixed texts, with a place between each two
        # The values (MAC, MAC with hyphens, token, hostname; a config's node name, join
        # token, server URL and instance serial) in the places' order: one C call
        # (itemgetter of one index gives the value, not a tuple).
        self.pick: Callable[[tuple[str, ...]], Any] = (
            itemgetter(*which) if len(which) > 1 else _one(which[0]) if which else _none)

    def fits(self, profile: Profile, trust: Trust | None, cluster: Cluster | None = None,
             ) -> bool:
        return (self.profile is profile and self.cluster is cluster
                and (self.trust is trust or self.trust == trust))

    def text(self, values: tuple[str, ...]) -> str:
        pieces = self.slots.copy()
        pieces[1::2] = self.pick(values)
        return "".join(pieces)


def _swapped(text: str, marks: tuple[str, ...], others: tuple[str, ...]) -> str:
    """``text`` with each of ``marks`` replaced by the same place's of ``others``."""
    for mark, other in zip(marks, others, strict=True):
        text = text.replace(mark, other)
    return text


def _one(index: int) -> Callable[[tuple[str, ...]], tuple[str]]:
    def pick(values: tuple[str, ...]) -> tuple[str]:
        return (values[index],)

    return pick


def _none(values: tuple[str, ...]) -> tuple[()]:
    return ()


# The machine's context keys that are its attribute as it is (machine_to_dict's value):
# the ones a template may be given alone (_machine_dict).
_PLAIN_KEYS = frozenset({"id", "hostname", "uuid", "serial", "asset", "cluster", "profile",
                         "ipv4", "fixed_ipv4", "token_expires", "created", "updated"})


def _machine_dict(machine: Machine, keys: tuple[str, ...] | None) -> dict[str, Any]:
    """The context's ``machine``: the ``keys`` the template reads (:func:`_machine_keys`),
    or the whole dict (None). A lookup of it answers as the whole dict's: a key read is
    there when the whole has it, with the same value. An install script reads only its
    hostname."""
    if keys is None:
        return machine_to_dict(machine, secrets=False)
    if len(keys) == 1:
        # One key (an install script's hostname): without the comprehension's own call,
        # ~1,300 of a first install's loop instructions (callgrind, s38-install).
        key = keys[0]
        return {key: getattr(machine, key)}
    return {key: getattr(machine, key) for key in keys}


def _machine_keys(names: frozenset[str]) -> tuple[str, ...] | None:
    """The machine keys a template reading ``names`` is given: those of ``names``'
    ``machine.KEY`` (render._keys_read) where it reads the dict key by key and only plain
    ones; None: the whole dict (:func:`_machine_dict`)."""
    if "machine" + WHOLE in names:
        return None
    keys = []
    for name in names:
        if name.startswith("machine."):
            key = name[8:]
            if key not in _PLAIN_KEYS:
                return None
            keys.append(key)
    return tuple(keys)


def _text_blob(data: bytes | str, content_type: str = "text/plain; charset=utf-8") -> Blob:
    raw = data.encode() if isinstance(data, str) else data
    return Blob(size=len(raw), data=raw, content_type=content_type)


def _read(path: Path) -> bytes:
    return path.read_bytes()


def register_command(url: str | tuple[str, ...], mac: str, token: str, node_name: str, *,
                     texts: Splice | None = None) -> Spliced:
    """A POSIX shell one-liner the installed OS runs at each boot to register, then to say
    where it is.

    It POSTs with curl where there is one (k3OS ships curl) and with busybox ``wget
    --post-data --header`` otherwise, so it also runs on a busybox-only image. It reports no
    address: on k3OS ``/etc/hosts`` maps the hostname to 127.0.1.1, so ``hostname -i``
    names loopback, and any address the node picks itself may be one other nodes cannot
    reach. netboot records the address the request came from on the provisioning network.

    First boot: the install token, retried for up to an hour; the answer's machine token is
    kept in ``/var/lib/netboot/machine-token`` (k3OS keeps ``/var`` across boots). k3OS runs
    ``run_cmd`` on every boot (its ``ccapply`` service applies the config each time), and
    cloud-init's template runs the command from a per-boot script once that file exists:
    each later boot reports with the machine token, in the background and for 5 minutes at
    most, so that a new lease from a site DHCP server moves the machine's address, its DNS
    name and (a server) its cluster's endpoint (netboot.enroll.Enroller.register). A machine
    registered without a machine token in the answer (the marker file alone) skips the call,
    as before: its spent install token would only be refused.

    ``url``: the register endpoint, or several (the server that rendered the config first,
    then the other servers sharing its inventory): each try POSTs to them in turn until one
    answers 2xx (:func:`register_texts`), so a device whose server died for good after it
    rendered the config registers through another.

    ``texts``: :func:`register_texts` of ``url`` (Content makes it once per base URL and
    peers): the command is its text with the machine's three values, which tojson escapes
    alone.
    """
    # json.dumps of a str is this C function's text (ensure_ascii), without its Python
    # layers: three per config an installer fetches. Its quotes are register_texts'; each
    # value quoted for the single-quoted JSON there, per character as the whole body was.
    splice = texts if texts is not None else register_texts(url)
    values = (mac, token, node_name)
    if plain(values):
        # As a rule (a MAC, a token, a node name): each value's JSON escape and quoting for
        # the shell is the value itself (render.plain), so they are not made (three each
        # per config: ~8,000 of a first config's loop instructions, session 31).
        return splice.of(values, plain=True)
    js = encode_basestring_ascii
    return splice.of((_sq(js(mac)[1:-1]), _sq(js(token)[1:-1]), _sq(js(node_name)[1:-1])))


def _sq(text: str) -> str:
    # Inside the single-quoted JSON of register_texts: close, escaped quote, reopen.
    return text.replace("'", "'\\''")


def register_texts(url: str | tuple[str, ...]) -> Splice:
    """The register command's text around its three values (MAC, token, node name), for
    the register endpoint ``url``, or endpoints tried in turn (:func:`register_command`)."""
    # Single-quoted JSON with '"$(...)"' holes, so the shell fills in live facts; the
    # values netboot knows are JSON-encoded (register_command), never by the shell.
    # The answer's machine token is cut out of it with the shell's own patterns (no sed: a
    # busybox image may have only the applets the command names); both doors answer with
    # json.dumps' '": "' between a key and its value. '"keeps":"machine_token"' asks for
    # that token: an older netboot's command printed its answer, so netboot gives it only to
    # a command that says it keeps it (api._registered_out).
    # The install's secret: made once, before its first try, by the kernel's random UUID
    # (/proc: no applet beyond cat and mv, 122 random bits), kept root's alone (umask 077)
    # in /var, which k3OS keeps across boots (its /etc is a tmpfs copied from the image:
    # /etc/machine-id may be every clone's, or new each boot). Every try of every boot
    # sends the same one: a repeat whose answer was lost proves its install by it, and a
    # repeat without it is refused (netboot.enroll.secret_proves).
    urls = (url,) if isinstance(url, str) else url
    d = "/var/lib/netboot"
    k = f"{d}/machine-token"
    s = f"{d}/install-secret"
    if len(urls) == 1:  # one server: the command as before session 48, to the byte
        post = _post(shlex.quote(urls[0]), "")
    else:
        # Each in turn, the same body (its install secret) to each, until one answers 2xx:
        # a for loop's status is its last command's, break's 0 once one did (POSIX 2.9.4.2),
        # else the last POST's failure. curl's connect bounded apart (a host gone from the
        # link costs a try CONNECT_SECONDS, not its 30); busybox wget has no timeout option
        # that every build takes (Debian's 1.35 segfaults on -T), so it keeps the kernel's.
        post = (f"for u in {' '.join(shlex.quote(u) for u in urls)}; do "
                + _post('"$u"', f"--connect-timeout {CONNECT_SECONDS} ") + " && break; done")
    return Splice((
        f"s={s}; [ -s $s ] || (umask 077; mkdir -p {d} && cat /proc/sys/kernel/random/uuid "
        ">$s.n && mv $s.n $s) 2>/dev/null; "
        f"k={k}; n=360; b='" + _sq('{"mac":"'),
        _sq('",') + "'; a='" + _sq('"token":"'),
        _sq('"') + "'; [ -s $k ] && { n=30; a='" + _sq('"machine_token":"') + "'\"$(cat $k)\"'"
        + _sq('"') + "'; }; b=\"$b$a\"'" + _sq(',"keeps":"machine_token","hostname":"')
        + "'\"$(hostname)\"'"
        + _sq('","machine_id":"') + "'\"$(cat /etc/machine-id 2>/dev/null)\"'"
        + _sq('","install_secret":"') + "'\"$(cat $s 2>/dev/null)\"'"
        + _sq('","node_name":"'),
        _sq('"}') + "'; r() { i=0; while [ $i -lt $n ]; do "
        f"{post} && {{ mkdir -p {d} && touch {d}/registered; "
        "case $o in *'\"machine_token\": \"'*) t=${o#*'\"machine_token\": \"'}; "
        "t=${t%%'\"'*}; [ -z \"$t\" ] || (umask 077; printf %s \"$t\" >$k);; esac; "
        "return 0; }; i=$((i+1)); sleep 10; done; }; "
        f"if [ -s $k ]; then r & elif [ ! -f {d}/registered ]; then r; fi",
    ))


# How long curl waits for a server's connection before the register command tries the next.
CONNECT_SECONDS = 5


def _post(u: str, bound: str) -> str:
    """The shell that POSTs the body ``$b`` to ``u`` (a quoted word) into ``o``: curl where
    there is one (k3OS ships it; ``bound``: more of its options), busybox wget otherwise."""
    return ("if command -v curl >/dev/null; "
            f"then o=$(curl -fsS {bound}-m 30 -H 'Content-Type: application/json' -d \"$b\" "
            f"{u}); else o=$(wget -q -O- --header 'Content-Type: application/json' "
            f"--post-data \"$b\" {u}); fi")


def _need_profile(plan: BootPlan) -> None:
    """A config is what a profile installs: without one there is nothing to render, which is
    the operator's state to fix (409), not a template failure (500)."""
    if plan.profile is None:
        raise Conflict(f"{plan.mac} has no profile: set one on the machine or on a group "
                       "that selects it, then its config can be rendered")
