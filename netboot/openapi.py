"""The OpenAPI 3 document of ``/api/v1`` (served at ``/api/v1/openapi.json``).

A test walks the aiohttp router and this document both ways, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from netboot.access import (
    DURATION_PATTERN,
    GRANTS,
    TOKEN_NAME_PATTERN,
    Permission,
    scope_needed,
)
from netboot.core import SERVER_URL_PATTERN
from netboot.inventory.base import SORT_KEYS
from netboot.model import Arch, MachineState, Role, Scope

_STR = {"type": "string"}
_NSTR = {"type": ["string", "null"]}
_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LIST = {"type": "array", "items": {"type": "string"}}

# What the server accepts, as patterns (netboot.model.MacAddress.parse, enroll.check_hostname,
# model.normalise_uuid): aa:bb:cc:dd:ee:ff, aa-bb-..., aabb.ccdd.eeff, aabbccddeeff and
# pxelinux's 01-aa-bb-...
_HEX2 = "[0-9A-Fa-f]{2}"
MAC_PATTERN = ("^(" + "|".join((
    f"{_HEX2}(:{_HEX2}){{5}}", f"{_HEX2}(-{_HEX2}){{5}}", f"01-{_HEX2}(-{_HEX2}){{5}}",
    "[0-9A-Fa-f]{4}[.][0-9A-Fa-f]{4}[.][0-9A-Fa-f]{4}", "[0-9A-Fa-f]{12}")) + ")$")
_LABEL = "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# A MAC, an id, or a hostname (core.machine_ref).
REF_PATTERN = MAC_PATTERN[:-2] + f"|m-[0-9a-f]{{12}}|{_LABEL}([.]{_LABEL})*)$"
HOSTNAME = {"type": "string", "pattern": f"^{_LABEL}([.]{_LABEL})*$", "maxLength": 253}
_MAC = {"type": "string", "pattern": MAC_PATTERN}
_UUID = {"type": "string", "pattern": "^[0-9A-Fa-f]{8}(-?[0-9A-Fa-f]{4}){3}-?[0-9A-Fa-f]{12}$"}


# Profile, cluster and group names (netboot.core.check_name): path segments of
# /api/v1/<kind>/<name> and words in iPXE script comments, so no '/', no surrounding spaces, no
# unprintable characters, 1 to 253 characters. The pattern is the printable-ASCII part of what
# the server accepts: "printable" (Python's str.isprintable) is a set of Unicode categories,
# which neither an ECMA-262 pattern without the u flag nor Python's re can name, so the other
# printable text the server takes is said in the description, not matched.
NAME_PATTERN = "^[!-.0-~]([ -.0-~]*[!-.0-~])?$"
NAME = {"type": "string", "minLength": 1, "maxLength": 253, "pattern": NAME_PATTERN,
        "description": "printable text without '/' or surrounding spaces, at most 253 "
                       "characters (the server also takes printable non-ASCII text)"}
# Required text that is not only spaces (codec._name).
_TEXT = {"type": "string", "pattern": "\\S"}
_FACT = {"type": ["string", "null"], "maxLength": 256}
# A profile's kernel, initrds and assets (netboot.core.check_asset_ref): a path relative to
# assets.dirs (no URL scheme, no '/' first, no '..' segment, no control character) or, but
# for an asset, an http(s) URL with a host and no space or control character.
_ASSET_PATH = ("(?![A-Za-z][A-Za-z0-9+.-]*:)(?!/)(?!(?:[^/\\\\]*[/\\\\])*[.][.](?:[/\\\\]|$))"
               "[^\\x00-\\x1f\\x7f]*")
_ASSET_URL = "https?://[^/\\x00-\\x20\\x7f][^\\x00-\\x20\\x7f]*"
# The end as (?![\s\S]), not $: Python's $ (jsonschema, schemathesis) also matches before a
# last newline, which the server refuses.
_END = "(?![\\s\\S])"
_BOOT_FILE = {"type": "string", "pattern": f"^(?:{_ASSET_URL}|{_ASSET_PATH}){_END}",
              "description": "a path relative to assets.dirs (e.g. k3os/vmlinuz: no '..', not "
                             "starting with '/') or an http:// or https:// URL"}
_ASSET_FILE = {"type": "string", "pattern": f"^{_ASSET_PATH}{_END}",
               "description": "a path relative to assets.dirs (no '..', not starting with '/')"}
# A profile's fdtdir (U-Boot's FDTDIR, fetched over TFTP from the assets) and iso_url (the
# installer fetches it): the same rules, a path and a URL only (core.Core.put).
_FDTDIR = {"type": ["string", "null"], "pattern": f"^{_ASSET_PATH}{_END}",
           "description": "a directory relative to assets.dirs (no '..', not starting with '/')"}
_ISO_URL = {"type": ["string", "null"], "pattern": f"^(?:{_ASSET_URL})?{_END}",
            "description": "an http:// or https:// URL (no space)"}
# A managed cluster's endpoint (model.check_endpoint): a part of what the server takes that
# holds each form it answers (lowercase; an IPv6 address in brackets; https:// kept), and no
# address it refuses (loopback, link-local, multicast, unspecified; an all-digit name).
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_ENDPOINT_V4 = (f"(?!169[.]254[.])(?:22[0-3]|2[01][0-9]|1[3-9][0-9]|12[89]|1[01][0-9]|12[0-6]"
                f"|[1-9][0-9]|[1-9])(?:[.]{_OCTET}){{3}}")
# A DNS name of any number of labels (k3s.dc1.example.com, the server's canonical form, was
# refused by a pattern of three at most: a client validating a Cluster it was answered
# refused it), of at most 253 characters, a last dot kept, either case (the server lowercases
# it); its last label starts with a letter (no all-digit name).
_ENDPOINT_HOST = ("(?=[A-Za-z0-9.-]{1,253}(?![A-Za-z0-9.-]))"
                  "(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?[.])*"
                  "[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?[.]?")
_G = "[0-9a-f]{1,4}"
# Its first group neither 0 (::, ::1) nor fe80-febf (link-local) nor ff.. (multicast).
_ENDPOINT_V6 = (f"(?=(?:[1-9a-f][0-9a-f]{{0,2}}|[1-9a-e][0-9a-f]{{3}}|f[0-9a-d][0-9a-f]{{2}}):)"
                f"(?:(?:{_G}:){{7}}{_G}|(?:{_G}:){{1,7}}:|"
                + "|".join(f"(?:{_G}:){{1,{7 - n}}}(?::{_G}){{1,{n}}}" for n in range(1, 7))
                + ")")
ENDPOINT_PATTERN = (f"^(?:https://)?(?:{_ENDPOINT_HOST}|{_ENDPOINT_V4}|\\[{_ENDPOINT_V6}\\])"
                    "(?::(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}"
                    "|[1-9][0-9]{0,3}))?(?![\\s\\S])")
_EXTERNAL = {"required": ["server_url"], "properties": {"server_url": {"pattern": "^https://"}}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


# The roles as the model has them (one owner: a role added there is documented here too).
_ROLE = {"type": ["string", "null"], "enum": [*(r.value for r in Role), None]}
_LOADER = {"type": ["string", "null"], "enum": ["ipxe", "shim-grub", None],
           "description": "UEFI first-stage chain: ipxe (unsigned iPXE) or shim-grub (shim, "
                          "GRUB and kernel signed: Secure Boot); unset, the group's, then the "
                          "profile's, else shim-grub for arm64 (no iPXE) and ipxe otherwise"}
_MACHINE_PROPS: dict[str, Any] = {
    "mac": {**_nullable(_MAC), "description": "its first NIC, any common MAC form; normalised"},
    "macs": {"type": "array", "items": _MAC,
             "description": "every NIC; a boot from any of them is this machine"},
    "hostname": _nullable(HOSTNAME), "uuid": _nullable(_UUID), "serial": _NSTR,
    "asset": _NSTR, "labels": _MAP, "cluster": _NSTR,
    "role": _ROLE,
    "profile": _NSTR, "loader": _LOADER,
    "fixed_ipv4": _nullable({"type": "string", "format": "ipv4"}),
}
# Read-only: a state changes only by what happens to the machine (netboot.lifecycle), so the
# input schemas do not have it and the API answers 400 naming "state".
_STATE = {"type": "string", "readOnly": True, "enum": [s.value for s in MachineState]}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"],
              "properties": {"error": _STR, "field": _STR,
                             "scope": {"type": "string", "description": "403: a scope that "
                                       "would be allowed"},
                             "holder": {"type": "string",
                                        "description": "409: id of the machine that has it "
                                        "(an identifier, a hostname, an address) or uses it "
                                        "(a profile or cluster deleted); absent where no "
                                        "machine does (a group uses it: the error names it)"},
                             "candidates": {"type": "array", "items": _STR, "description":
                                            "409 of a {ref} that names two machines (a "
                                            "hostname spelled as another's MAC; an id "
                                            "always names its own): "
                                            "their ids; give the one meant by its id"},
                             "state": {**_STATE, "description": "409 of a refused lifecycle "
                                       "step: the machine's current state"},
                             "event": {"type": "string", "readOnly": True}}},
    # At least one of mac, macs, serial, asset, uuid (a 400 names "mac" otherwise).
    "MachineInput": {"type": "object", "additionalProperties": False,
                     "anyOf": [{"required": [k]} for k in ("mac", "macs", "serial", "asset",
                                                           "uuid")],
                     "properties": _MACHINE_PROPS},
    # PATCH merges into the stored machine: every field optional; "macs" replaces the NICs,
    # "mac" alone may only repeat one of them.
    "MachinePatch": {"type": "object", "additionalProperties": False,
                     "properties": _MACHINE_PROPS},
    "Approve": {"type": "object", "additionalProperties": False, "properties": {
        "cluster": _NSTR, "role": _ROLE,
        "profile": _NSTR, "hostname": _nullable(HOSTNAME)}},
    # Not allOf MachineInput: its additionalProperties=false would reject every response.
    "Machine": {"type": "object", "required": ["id", "macs", "state"], "properties": {
        **_MACHINE_PROPS, "id": _STR, "state": _STATE, "mac_hexhyp": _NSTR, "arch": _NSTR,
        "firmware": _NSTR, "ipv4": _NSTR,
        "facts": _MAP, "token_expires": {"type": ["number", "null"]},
        "created": {"type": "number"}, "updated": {"type": "number"},
        "state_since": {"type": "number", "description": "when it came into its state "
                        "(its creation, if never changed since): the dashboard's Unchanged for"},
        "warnings": {"type": "array", "readOnly": True, "description": (
            "in a PATCH's answer only: what the change does not do (a machine renamed after "
            "its install keeps its old hostname and k3s node name until it installs "
            "again)"), "items": {
                "type": "object", "required": ["field", "error"],
                "properties": {"field": _STR, "error": _STR}}}}},
    "Registered": {"allOf": [{"$ref": "#/components/schemas/Machine"}, {
        "type": "object", "properties": {"machine_token": {
            "type": "string", "description": "the machine's own token, answered only here "
                                             "and only to a request that keeps it (keeps, or "
                                             "a machine_token): what its later boots report "
                                             "with"}}}]},
    "MachineList": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Machine"}},
        "total": {"type": "integer"}, "limit": {"type": "integer"},
        "offset": {"type": "integer"}}},
    "Profile": {"type": "object", "required": ["name", "kernel"], "additionalProperties": False,
                "properties": {
        "name": NAME, "kernel": {**_BOOT_FILE, "allOf": [_TEXT]},
        "initrds": {"type": "array", "items": _BOOT_FILE}, "cmdline": _STR,
        "config_template": {"type": "string", "enum": ["k3os", "cloud-init"]},
        "assets": {"type": "array", "items": {
            "type": "object", "required": ["path"], "additionalProperties": False,
            "properties": {"path": {**_ASSET_FILE, "allOf": [_TEXT]}, "sha256": _NSTR}}},
        "install_device": _STR, "iso_url": _ISO_URL, "ssh_authorized_keys": _LIST,
        "fdtdir": _FDTDIR, "loader": _LOADER,
        "problems": {"type": "array", "readOnly": True, "description": (
            "shown, never taken: each file the profile names as netboot no longer takes it "
            "(a profile stored by an older netboot); a write of it is refused until "
            "corrected"), "items": {
                "type": "object", "required": ["field", "error"],
                "properties": {"field": _STR, "error": _STR}}}, "description": _STR,
        "install_timeout": {"type": ["integer", "null"], "minimum": 60, "maximum": 604800,
                            "description": "seconds an install may take: the install token's "
                                           "lifetime (null: enroll.token_ttl_seconds)"}}},
    # An external cluster (server_url https://...) has no endpoint of its own: its server_url
    # is where nodes join (netboot.core checks it, a 400 naming "endpoint").
    "Cluster": {"type": "object", "required": ["name"], "additionalProperties": False,
                "properties": {
        "name": NAME,
        "server_url": {"type": "string", "anyOf": [{"const": "managed"},
                                                   {"pattern": SERVER_URL_PATTERN}],
                       "description": "https://… of the k3s API, or 'managed' (the default)"},
        "token": {"type": "string", "writeOnly": True,
                  "description": "the k3s node token; required to create an external cluster, "
                                 "generated for a managed one; a replace without it keeps it. "
                                 "A managed cluster with a k3s CA is given it in the secure "
                                 "form K10<ca_hash>::server:<this>"},
        "agent_token": {"type": "string", "writeOnly": True, "description": (
            "the k3s agent token its agents join with (never answered): a managed cluster "
            "makes one, and takes one given (its secret, or K10…::node:<secret>, given "
            "to its servers as agent-token); a change once a node of it has its config is a "
            "409 unless ?force=true. An external cluster's is its servers' "
            "(server/agent-token); none: its agents get its token. A replace without it "
            "keeps it")},
        "ca_hash": {"type": ["string", "null"], "readOnly": True,
                    "description": "managed clusters: SHA-256 of the k3s server CA netboot made "
                                   "(what /cacerts of its servers serves), named by the secure "
                                   "join token; null: the short token (no CA made: a cluster "
                                   "made before, or with enroll.k3s_secure_token false; see "
                                   "POST /api/v1/clusters/{name}/secure-token)"},
        "problems": {"type": "array", "readOnly": True, "description": (
            "shown, never taken: a join token in k3s's short form (agents then check "
            "nothing of the server they join), with the way to the secure form; a weak "
            "join or agent token; a managed cluster without an agent token (its agents "
            "join with the cluster's token, which joins servers too), with the way out"),
            "items": {
                "type": "object", "required": ["field", "error"],
                "properties": {"field": _STR, "error": _STR}}},
        "labels": _MAP, "taints": _LIST, "description": _STR,
        "endpoint": {"type": ["string", "null"], "pattern": ENDPOINT_PATTERN, "description":
                     "managed clusters: where nodes reach the servers (a VIP or DNS name): "
                     "host, host:port or https://host[:port], not loopback, link-local, "
                     "multicast or unspecified; unset, the first registered server's "
                     "address, and nodes wait until one registers"}},
                "if": _EXTERNAL, "then": {"properties": {"endpoint": {"enum": [None, ""]},
                                                         "token": {"minLength": 1}}}},
    # Creating: an external cluster needs its join token (a managed one gets a generated one).
    # Not part of "Cluster": answers never carry the token.
    "ClusterCreate": {"allOf": [_ref("Cluster"), {
        "if": _EXTERNAL, "then": {"required": ["token"],
                                  "properties": {"token": {"minLength": 1}}}}]},
    "Claim": {"type": "object", "required": ["claim"], "properties": {
        "claim": {"type": "string", "pattern": "^[0-9a-f]{64}(?![\\s\\S])"}}},
    "RefusedClaim": {"type": "object", "required": ["peer", "claim", "tries", "first", "last"],
                     "properties": {
        "peer": {**_NSTR, "description": "the address it came from"},
        "claim": {"type": "string", "description": "the sha256 of the secret it sent"},
        "tries": {"type": "integer", "description": "how many times in a row"},
        "first": {"type": "number"}, "last": {"type": "number"}}},
    "Group": {"type": "object", "required": ["name"], "additionalProperties": False,
              "properties": {
        "name": NAME, "selector": {"type": "object", "additionalProperties": _LIST},
        "profile": {**_NSTR, "description": "the name of an existing profile (else a 400 "
                    "naming profile)"},
        "cluster": {**_NSTR, "description": "the name of an existing cluster (else a 400 "
                    "naming cluster)"},
        "role": _ROLE,
        "labels": _MAP, "taints": _LIST,
        "hostname_template": {**_NSTR, "description": "fields in braces, e.g. "
                              "node-{mac_hexhyp}; an unknown field or bad syntax is a 400"},
        "loader": _LOADER}},
    "Event": {"type": "object", "properties": {
        "machine": _STR, "time": {"type": "number"}, "kind": _STR, "message": _STR,
        "data": {"type": "object"}}},
    "EventInput": {"type": "object", "required": ["kind"], "properties": {
        "kind": _STR, "message": _STR, "data": {"type": "object"}}},
    # One credential: the install token or the machine token, never both (a 400 naming
    # "token"; without either, a 400 too).
    "Register": {"type": "object", "required": ["mac"], "oneOf": [
        {"required": ["token"], "not": {"required": ["machine_token"]}},
        {"required": ["machine_token"], "not": {"required": ["token"]}}], "properties": {
        "mac": _MAC, "token": {"type": "string", "minLength": 1,
                               "description": "the machine's install token (its first boot); "
                                              "an unknown MAC or a wrong token is a 401. "
                                              "Spent, from the address it registered: the "
                                              "same answer again (its reply was lost); from "
                                              "elsewhere the same, moved there, within an "
                                              "hour of its registration and with the "
                                              "machine_id it reported, else a 409; "
                                              "registered with an install_secret: with "
                                              "that secret from anywhere, else a 409"},
        "machine_token": {"type": "string", "minLength": 1,
                          "description": "instead of token, at later boots: the machine token "
                                         "the registration answered; the machine's address "
                                         "follows the request's (not a fixed_ipv4)"},
        "hostname": {"type": ["string", "null"],
                     "description": "the device's own name, recorded in the event when it is "
                                    "an RFC 1123 name, else ignored (the event says so)"},
        "addresses": {**_LIST, "description":
                      "the device's own addresses; the request's source address wins unless "
                      "it is not routable. Entries that are loopback, link-local, unspecified, "
                      "multicast, broadcast or not addresses are ignored (an event says so)"},
        "install_secret": {"type": "string", "maxLength": 256, "description":
                           "a secret the register command made once on the installed OS, sent "
                           "with every try: netboot keeps its digest, and a repeat of a "
                           "registration made with one is taken with that secret alone (from "
                           "any address, at any time until a reinstall) and refused without "
                           "it (409)"},
        "keeps": {"type": "string", "enum": ["machine_token"],
                  "description": "the caller keeps the machine token: only then does the "
                                 "answer carry it (an older register command printed the "
                                 "answer to its boot log)"},
        "machine_id": _FACT, "node_name": _FACT, "os": _FACT}},
    "Bulk": {"type": "object", "required": ["machines"], "additionalProperties": False,
             "properties": {
        "machines": {"type": "array", "items": {"$ref": "#/components/schemas/MachineInput"}},
        "dry_run": {"type": "boolean"}}},
    "ImportReport": {"type": "object", "properties": {
        "created": _LIST, "changed": _LIST, "unchanged": _LIST, "applied": {"type": "boolean"},
        "errors": {"type": "array", "items": {"type": "object", "properties": {
            "line": {"type": "integer"}, "field": _STR, "message": _STR}}},
        "errors_total": {"type": "integer", "description": "how many rows are bad, present "
                                                           "when errors lists only the first "
                                                           "1000"},
        "warnings": {"type": "array", "description": (
            "rows that are right but do what the operator should know, present when there "
            "is one: a row renaming an installed machine, whose node keeps its old name "
            "until it installs again"), "items": {"type": "object", "properties": {
                "line": {"type": "integer"}, "field": _STR, "message": _STR}}},
        "warnings_total": {"type": "integer", "description": "how many warnings there are, "
                                                             "present when warnings lists "
                                                             "only the first 1000"}}},
    "Explanation": {"type": "object"},
    "TokenInput": {"type": "object", "required": ["name", "scope"], "additionalProperties": False,
                   "properties": {
                       "name": {"type": "string", "pattern": TOKEN_NAME_PATTERN},
                       "scope": {"type": "string", "enum": [s.value for s in Scope]},
                       "expires_in": {"type": "string", "pattern": DURATION_PATTERN,
                                      "description": "lifetime: 90s, 30m, 12h, 30d, 2w"}}},
    "Token": {"type": "object", "required": ["name", "scope", "created", "expires", "last_used"],
              "properties": {
                  "name": _STR, "scope": {"type": "string", "enum": [s.value for s in Scope]},
                  "created": {"type": "number"}, "expires": {"type": ["number", "null"]},
                  "last_used": {"type": ["number", "null"]}}},
    "NewToken": {"allOf": [{"$ref": "#/components/schemas/Token"},
                           {"type": "object", "required": ["token"], "properties": {
                               "token": {"type": "string", "description": "shown once"}}}]},
    "AuditEntry": {"type": "object",
                   "required": ["time", "actor", "action", "target", "peer", "outcome"],
                   "properties": {
                       "time": {"type": "number"},
                       "actor": {"type": "string", "description":
                                 "a token's name, cli:<user> or machine:<id>; '-' if none"},
                       "action": {"type": "string", "description": "METHOD /route or a CLI "
                                  "command"},
                       "target": _STR, "peer": _STR,
                       "outcome": {"type": "string", "description":
                                   "the HTTP status (followed by 'outcome unknown' where "
                                   "the inventory could not say whether the change was "
                                   "written, and '(written)' where it was found later "
                                   "that it was), or ok / error for the CLI"}}},
    "Status": {"type": "object", "required": ["total", "by_state", "clusters", "failed"],
               "properties": {
                   "total": {"type": "integer"},
                   "by_state": {"type": "object", "additionalProperties": {"type": "integer"}},
                   "clusters": {"type": "object", "additionalProperties": {
                       "type": "object", "additionalProperties": {"type": "integer"}}},
                   "failed": {"type": "array", "items": {"type": "object"}},
                   # /healthz's state with the store's own words, which /healthz (public)
                   # leaves out.
                   "inventory": {"type": "object", "required": ["state", "detail"],
                                 "properties": {
                                     "state": {"enum": ["ok", "degraded", "unknown"]},
                                     "detail": {"type": ["string", "null"]}}},
                   # What stands that the operator must fix, each with the fix in its
                   # message (netboot.standing): the server's start-up checks, and the
                   # older registrations it sees while it runs.
                   "warnings": {"type": "array", "items": {
                       "type": "object", "required": ["kind", "message", "refs"],
                       "properties": {
                           "kind": {"enum": ["clusters-alike", "clock-behind", "clock-skew",
                                             "older-registrations", "rule-refs",
                                             "profile-files", "shared-fixed-ipv4",
                                             "every-interface", "claimable-groups",
                                             "address-in-use"]},
                           "message": {"type": "string"},
                           # The older registrations' first 100 (the message counts
                           # all; netboot status --json lists all).
                           "refs": {"type": "array", "items": {"type": "string"},
                                    "description": "what it is about (machines, clusters); "
                                    "an older-registrations notice lists 100 at most, its "
                                    "message counts them all and netboot status --json "
                                    "lists every one"}}}}}},
}


def _replacing(name: str) -> dict[str, Any]:
    """The body of PUT /api/v1/<kind>/{name}: the object without its name, which is the URL's.
    The server also takes a body that repeats the URL's name (any other is a 400 naming it);
    a schema cannot say "equal to the path parameter", so the document leaves the name out."""
    schema = dict(SCHEMAS[name])
    schema["properties"] = {k: v for k, v in schema["properties"].items() if k != "name"}
    schema["required"] = [k for k in schema["required"] if k != "name"]
    if not schema["required"]:
        del schema["required"]
    return schema


SCHEMAS.update({f"{name}Replace": _replacing(name) for name in ("Profile", "Cluster", "Group")})


def _security(need: Permission) -> list[dict[str, list[str]]]:
    """Alternatives, one per scope that grants ``need``: OpenAPI 3.1 §4.8.30 lets a non-OAuth
    requirement list the roles it needs, and a token's scope is its one role."""
    return [{"bearer": [str(scope)]} for scope in Scope if need in GRANTS[scope]]


def _op(summary: str, *, need: Permission | None, body: str | None = None, ok: int = 200,
        out: str | None = None, errors: tuple[int, ...] = (400, 404),
        params: tuple[dict[str, Any], ...] = (), body_required: bool = True,
        etag: str | None = None) -> dict[str, Any]:
    """One operation; ``need``: the permission it needs (None: no API token, the device's own
    credential is checked by the handler and the caller documents it). ``etag``: what its
    success answers with as its ETag header (api._etag, api._item_etag), the version a later
    change's If-Match names."""
    op: dict[str, Any] = {"summary": summary, "responses": {}}
    if out == "array:Machine" or (out and out.startswith("array:")):
        schema: dict[str, Any] = {"type": "array", "items": _ref(out.split(":", 1)[1])}
    else:
        schema = _ref(out) if out else {}
    op["responses"][str(ok)] = {"description": "success",
                                **({"content": {"application/json": {"schema": schema}}}
                                   if out else {})}
    if etag:
        op["responses"][str(ok)]["headers"] = {"ETag": {
            "description": f"the version of the {etag} (RFC 9110 §8.8.3), for a later "
                           "change's If-Match", "required": True, "schema": _STR}}
    # 503: the inventory failed (a full disk, a lock held too long); never reported as 404.
    codes = set(errors) | {503} | ({401, 403} if need else set())
    for code in sorted(codes):
        op["responses"][str(code)] = {"description": _ERRORS.get(code, "error"), "content": {
            "application/json": {"schema": _ref("Error")}}}
    if body:
        op["requestBody"] = {"required": body_required,
                             "content": {"application/json": {"schema": _ref(body)}}}
    if need:
        op["security"] = _security(need)
        scope = scope_needed(need)
        op["x-netboot-scope"] = str(scope)
        op["description"] = (f"Needs a token of scope {scope}"
                             + (" or admin." if scope != Scope.ADMIN else "."))
    else:
        op["security"] = []
    if params:
        op["parameters"] = list(params)
    return op


_ERRORS = {400: "a field is wrong; 'field' names it", 401: "no token, or an unknown, revoked "
           "or expired one (WWW-Authenticate: Bearer)",
           403: "the token's scope does not allow this; 'scope' names one that would",
           404: "not found", 409: "conflicts with the inventory or the machine's state",
           412: "If-Match names another version of it than its current one (its ETag): "
                "another writer changed it since it was read; nothing was changed",
           413: "request body too large",
           429: "more reports than the machine's budget (enroll.report_burst, report_rate): "
                "ask again after Retry-After seconds",
           503: "the inventory is unavailable"}


def _if_match(what: str) -> dict[str, Any]:
    """The If-Match header of a change of ``what`` (RFC 9110 §13.1.1; api._if_match)."""
    return {"name": "If-Match", "in": "header", "required": False, "schema": _STR,
            "description": f"the ETag of the {what} as read (GET): the change is made only if "
                           "it is still that version, else 412 (RFC 9110 §13.1.1)"}


def _query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    out = {"name": name, "in": "query", "required": False, "schema": schema}
    if description:
        out["description"] = description
    return out


RENDER_KIND_NAMES = ("ipxe", "pxelinux", "grub", "config", "nocloud")


def _path_param(name: str) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "in": "path", "required": True,
                           "schema": {"type": "string"}}
    if name == "ref":
        out["schema"]["pattern"] = REF_PATTERN
        out["description"] = ("one of the machine's MACs (any common form), its id, or its "
                              "hostname (any case); looked up as an id or MAC first, then as "
                              "a hostname: a text that names two machines so (a hostname "
                              "spelled as a MAC) is a 409 listing both (candidates)")
    return out


def document() -> dict[str, Any]:
    READ, ENROLL, OPERATE = Permission.READ, Permission.ENROLL, Permission.OPERATE
    CONFIGURE, ADMINISTER = Permission.CONFIGURE, Permission.ADMINISTER
    paths: dict[str, Any] = {
        "/api/v1/openapi.json": {"get": _op("this document", need=READ, errors=())},
        "/api/v1/machines": {
            "get": _op("list machines", need=READ, out="MachineList", params=(
                _query("state", {"type": "string", "enum": [s.value for s in MachineState]}),
                _query("cluster", _STR),
                _query("q", _STR, "case-insensitive part of the hostname, id, a MAC, the UUID, "
                       "serial or asset tag"),
                _query("sort", {"type": "string", "enum": list(SORT_KEYS)}),
                _query("order", {"type": "string", "enum": ["asc", "desc"]}),
                _query("last_event", {"type": "string", "enum": ["1", "true"]},
                       "add each machine's last event"),
                _query("unchanged_for", {"type": "integer", "minimum": 0, "maximum": 10**9},
                       "seconds: only machines in their state for at least this long "
                       "(state_since; a learnt fact or a token does not reset it); with "
                       "state, those stuck in it"),
                _query("label", {"type": "array",
                                 "items": {"type": "string", "pattern": "^[^=]+="}},
                       "key=value; every one must match"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
                _query("offset", {"type": "integer", "minimum": 0, "maximum": 10**9}))),
            "post": _op("enroll a machine", need=ENROLL, body="MachineInput", ok=201,
                        out="Machine", errors=(400, 409, 413), etag="machine"),
        },
        "/api/v1/machines:bulk": {
            "post": _op("bulk enrollment in one transaction", need=ENROLL, body="Bulk", ok=201,
                        out="ImportReport", errors=(400, 413)),
        },
        "/api/v1/machines:import": {
            "post": _op("an import file (CSV, YAML or JSON) as the body; dry_run=1 checks it",
                        need=ENROLL, ok=201, out="ImportReport", errors=(400, 413),
                        params=(_query("format", {"type": "string",
                                                  "enum": ["csv", "yaml", "json"]}),
                                _query("dry_run", {"type": "string",
                                                   "enum": ["0", "1", "true", "false"]}))),
        },
        "/api/v1/machines/{ref}/render/{kind}": {
            "parameters": [_path_param("ref"), {
                "name": "kind", "in": "path", "required": True,
                # core.RENDER_KINDS (a test holds the two equal; openapi imports no core)
                "schema": {"type": "string", "enum": list(RENDER_KIND_NAMES)}}],
            "get": _op("what the machine would be served now (ipxe, pxelinux, grub, config, "
                       "nocloud), install and join tokens masked; 409 for a config of a "
                       "machine that has no profile", need=READ,
                       errors=(400, 404, 409), params=(_query("arch", _STR),)),
        },
        "/api/v1/events/stream": {
            "get": {**_op("every machine event as it is recorded: Server-Sent Events "
                          "(event: machine, data: an Event; event: missed when this reader "
                          "fell behind; event: inventory, data: the inventory's health as "
                          "GET /status's inventory, as the stream opens and when it "
                          "changes). Each message has an id: a reconnect with "
                          "Last-Event-ID (or ?last_event_id=) is given what was published "
                          "since, or event: missed when that is no longer held",
                          need=READ, errors=()),
                    "responses": {"200": {"description": "text/event-stream"},
                                  "401": {"description": _ERRORS[401]},
                                  "403": {"description": _ERRORS[403]},
                                  "503": {"description": "too many streams open"}}},
        },
        "/api/v1/machines/{ref}": {
            "parameters": [_path_param("ref")],
            "get": _op("one machine", need=READ, out="Machine", etag="machine"),
            "patch": _op("change a machine", need=OPERATE, body="MachinePatch", out="Machine",
                         errors=(400, 404, 409, 412), params=(_if_match("machine"),),
                         etag="machine"),
            "delete": _op("remove a machine", need=OPERATE, ok=204, errors=(400, 404, 412),
                          params=(_if_match("machine"),)),
        },
        "/api/v1/machines/{ref}/approve": {
            "parameters": [_path_param("ref")],
            "post": _op("approve a discovered machine", need=ENROLL, body="Approve",
                        out="Machine", errors=(400, 404, 409, 412), body_required=False,
                        params=(_if_match("machine"),), etag="machine"),
        },
        "/api/v1/machines/{ref}/reinstall": {
            "parameters": [_path_param("ref")],
            "post": _op("install again on next boot", need=OPERATE, out="Machine",
                        errors=(400, 404, 409, 412), params=(_if_match("machine"),),
                        etag="machine"),
        },
        "/api/v1/machines/{ref}/claim": {
            "parameters": [_path_param("ref")],
            "post": _op("give a registered machine (or one installed whose registration "
                        "a restored backup lost) to the install whose registration was "
                        "refused with this claim (a 'registration contested' or "
                        "'registration refused' event or GET .../claims names it): its next "
                        "try is answered, the holder's machine token void",
                        need=OPERATE, body="Claim", out="Machine", errors=(400, 404, 409)),
        },
        "/api/v1/machines/{ref}/claims": {
            "parameters": [_path_param("ref")],
            "get": _op("the claims this server refused for the machine, by the address they "
                       "came from (its latest each), the most tried first: a device retries "
                       "its one claim, a flood's come once; only those refused against "
                       "its registration as it is now (none after a reinstall); header "
                       "Kept-Since: when this server began keeping them (its start, in "
                       "seconds since the epoch)", need=READ,
                       out="array:RefusedClaim"),
        },
        "/api/v1/machines/{ref}/explain": {
            "parameters": [_path_param("ref")],
            "get": _op("which group, profile and decision, and why", need=READ,
                       out="Explanation", params=(
                           _query("arch", {"type": "string", "enum": [a.value for a in Arch]}),)),
        },
        "/api/v1/machines/{ref}/events": {
            "parameters": [_path_param("ref")],
            "get": _op("events, oldest first", need=READ, out="array:Event", params=(
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 10000}),)),
            "post": {**_op("progress report: the machine's install token, or an operator's",
                            need=None, body="EventInput", ok=201, out="Event",
                            errors=(400, 401, 403, 404, 409, 413, 429)),
                     "security": [{"installToken": []}, *_security(OPERATE)],
                     "x-netboot-scope": str(scope_needed(OPERATE)),
                     "description": "The machine's own install token, or a token of scope "
                                    "operator or admin."},
        },
        "/api/v1/register": {
            "post": _op("the installed OS at each boot: first with its install token, then "
                        "with the machine token that answered (in the body)",
                        need=None, body="Register", out="Registered",
                        errors=(400, 401, 409, 413, 429)),
        },
        "/api/v1/status": {
            "get": _op("machines per state, overall and per cluster; the failed ones",
                       need=READ, out="Status", errors=()),
        },
        "/api/v1/clusters/{name}/secure-token": {
            "parameters": [_path_param("name")],
            "post": _op("a managed cluster made with the short token: make its k3s server CA "
                        "and join with the secure token (409 once a node fetched its config)",
                        need=CONFIGURE, out="Cluster", errors=(400, 404, 409, 412),
                        params=(_if_match("cluster"),), etag="cluster"),
        },
        "/api/v1/clusters/{name}/nodes": {
            "parameters": [_path_param("name")],
            "get": _op("machines of a cluster (all of them unless paged)", need=READ,
                       out="array:Machine", params=(
                           _query("limit", {"type": "integer", "minimum": 1,
                                            "maximum": 100000}),
                           _query("offset", {"type": "integer", "minimum": 0}))),
        },
    }
    paths["/api/v1/tokens"] = {
        "get": _op("API tokens (never their values)", need=ADMINISTER, out="array:Token",
                   errors=()),
        "post": _op("create a token; its value is in this answer only", need=ADMINISTER,
                    body="TokenInput", ok=201, out="NewToken", errors=(400, 409, 413)),
    }
    paths["/api/v1/tokens/{name}"] = {
        "parameters": [_path_param("name")],
        "delete": _op("revoke a token", need=ADMINISTER, ok=204, errors=(404,)),
    }
    paths["/api/v1/audit"] = {
        "get": _op("the audit log of changes, oldest first", need=ADMINISTER,
                   out="array:AuditEntry", errors=(400,), params=(
                       _query("since", {"type": "number"}, "seconds since the epoch"),
                       _query("limit", {"type": "integer", "minimum": 1, "maximum": 10000}))),
    }
    # Bulk: 200 for a dry run, and 400 carries the per-row report (or an Error for a bad
    # envelope).
    bulk = paths["/api/v1/machines:bulk"]["post"]["responses"]
    bulk["200"] = {"description": "dry run: what would change",
                   "content": {"application/json": {"schema": _ref("ImportReport")}}}
    bulk["400"]["content"]["application/json"]["schema"] = {
        "anyOf": [_ref("ImportReport"), _ref("Error")]}
    imported = paths["/api/v1/machines:import"]["post"]
    imported["responses"]["200"] = bulk["200"]
    imported["responses"]["400"] = bulk["400"]
    # The file as it is (the format is the query's, whatever the content type says).
    imported["requestBody"] = {"required": True, "content": {
        "text/plain": {"schema": {"type": "string"}},
        "text/csv": {"schema": {"type": "string"}},
        "application/yaml": {"schema": {"type": "string"}}}}
    paths["/api/v1/machines/{ref}/render/{kind}"]["get"]["responses"]["200"] = {
        "description": "the text", "content": {"text/plain": {"schema": {"type": "string"}}}}
    for kind, schema in (("profiles", "Profile"), ("clusters", "Cluster"), ("groups", "Group")):
        paths[f"/api/v1/{kind}"] = {
            "get": _op(f"list {kind}", need=READ, out=f"array:{schema}", errors=()),
            "post": _op(f"create a {kind[:-1]}", need=CONFIGURE,
                        body="ClusterCreate" if kind == "clusters" else schema, ok=201,
                        out=schema, errors=(400, 409, 413), etag=kind[:-1]),
        }
        paths[f"/api/v1/{kind}/{{name}}"] = {
            "parameters": [_path_param("name")],
            "get": _op(f"one {kind[:-1]}", need=READ, out=schema, etag=kind[:-1]),
            "put": _op(f"replace a {kind[:-1]}", need=CONFIGURE, body=f"{schema}Replace",
                       out=schema, etag=kind[:-1],
                       errors=(400, 404, 409, 412), params=(_if_match(kind[:-1]), *((_query(
                           "force", {"type": "string", "enum": ["true", "false"]},
                           "true: take a new token or agent_token though a node of the "
                           "cluster has its config (each such node's history says what it "
                           "breaks)"),) if kind == "clusters" else ()))),
            "delete": _op(f"remove a {kind[:-1]}", need=CONFIGURE, ok=204,
                          errors=(404, 409, 412), params=(_if_match(kind[:-1]),)),
        }
        # What a schema cannot say: a body's "name" must be the URL's, and a group names a
        # profile and a cluster that exist (a 400 naming the field); two equally specific
        # groups that can match one machine are a 409.
        put = paths[f"/api/v1/{kind}/{{name}}"]["put"]
        put["description"] += " The name is the URL's (a body may repeat it, no other)."
        if kind == "groups":
            for op in (put, paths["/api/v1/groups"]["post"]):
                op["description"] += (" Its profile and cluster must name existing ones (a 400 "
                                      "naming the field); a group as specific as another that "
                                      "can match the same machine is a 409 naming selector; "
                                      "hostname_template fields must exist (a 400 naming it).")
        else:
            paths[f"/api/v1/{kind}/{{name}}"]["delete"]["description"] += (
                f" A {kind[:-1]} that a machine or group uses is a 409 naming them.")
    # The same references for machines, one by one and in bulk (there per row, by line).
    machines = (paths["/api/v1/machines"]["post"], paths["/api/v1/machines/{ref}"]["patch"],
                paths["/api/v1/machines/{ref}/approve"]["post"])
    for op in machines:
        op["description"] += (" Its profile and cluster must name existing ones (a 400 naming "
                              "the field).")
    for op in machines[:2]:
        op["description"] += (" A MAC, UUID, serial, asset tag or hostname that another "
                              "machine holds is a 409 naming the field and that machine "
                              "(holder; not to an enroll token, which reads nothing).")
    # Any {ref} may name two machines, a hostname spelled as another's MAC
    # (core.machine_ref): a 409 listing both (candidates) on every operation that takes one.
    for path, item in paths.items():
        if "{ref}" in path:
            for method, op in item.items():
                if method != "parameters" and "409" not in op["responses"]:
                    op["responses"]["409"] = {
                        "description": "the {ref} names two machines (candidates)",
                        "content": {"application/json": {"schema": _ref("Error")}}}
    for path in ("/api/v1/machines:bulk", "/api/v1/machines:import"):
        paths[path]["post"]["description"] += (
            " Each row is checked as one enrollment (its profile and cluster must exist); any "
            "error is a 400 listing line and field, and nothing is applied. With an enroll "
            "token a row may only add a machine or enroll a discovered one: a row naming an "
            "enrolled machine is an error (changing one needs scope operator), as is a row "
            "with role server. An error answer lists the first 1000 bad rows; errors_total "
            "counts them all when there are more.")
    return {
        "openapi": "3.1.0",
        "info": {"title": "netboot", "version": "1",
                 "description": "Enrollment and inventory API of the netboot provisioning "
                                "server."},
        "paths": paths,
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {
                           "bearer": {"type": "http", "scheme": "bearer", "description":
                                      "an API token (netboot tokens create NAME --scope S); "
                                      "scopes: admin, operator, read, enroll"},
                           "installToken": {"type": "http", "scheme": "bearer", "description":
                                            "the machine's one-time install token"}}},
    }
