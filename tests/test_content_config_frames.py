"""A first config's frame (Content._config_framed): a storm's first k3OS configs and cloud-init
user-data of one shape are its frame with the machine's values put in, byte for byte the
text the whole context renders."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from netboot.content import Content, Trust
from netboot.errors import RenderError
from netboot.model import BootPlan
from tests.conftest import Env, EnvFactory, call
from tests.test_content import own_template

K3OS = "cloud-config/k3os.yaml"


def _frames(env: Env) -> tuple[int, int]:
    """The config frames made so far (each a marked render more) and the configs made of
    them (Content._config_framed's counts, of the templates that may have frames: an
    install script's with frames has its own, _Wanted.frames), read, not patched in: the
    same in the mypyc build (tests/test_compiled.py)."""
    wants = [want for want in env.service.content._wants.values()
             if want.config_frames is not None and want.frames is None]
    return sum(want.made for want in wants), sum(want.framed for want in wants)


def _config_frames(env: Env) -> int:
    """How many templates may have config frames (_Wanted.config_frames not None)."""
    return sum(want.config_frames is not None and want.frames is None
               for want in env.service.content._wants.values())


async def _plan(env: Env, mac: str) -> BootPlan:
    """A first config's plan: the machine's install begun (its token minted), its config
    not fetched yet (so not kept: Content._config)."""
    from netboot.model import Arch, BootRequest, Firmware, MacAddress

    content = env.service.content
    plan, _ = await content.ipxe_script(BootRequest(
        mac=MacAddress.parse(mac), arch=Arch.X86_64, firmware=Firmware.IPXE, via="http",
        remote_addr="192.0.2.9"))
    assert plan.token, plan.reason
    return await content.authorised_plan(mac, plan.token)


def _whole(content: Content, name: str, plan: BootPlan) -> str:
    """The config the whole context renders for ``plan`` (no split, no frame)."""
    return content._render.render(name, content.context(plan))


async def _first_config(env: Env, mac: str, name: str = K3OS) -> tuple[str, str]:
    """A first config of ``mac`` (template ``name``) and the one the whole context renders."""
    content = env.service.content
    plan = await _plan(env, mac)
    text = (content.k3os_config(plan) if name == K3OS
            else content.nocloud(plan, name.rsplit("/", 1)[1]))
    return text, _whole(content, name, plan)


async def _enrol(env: Env, macs: Sequence[tuple[str, str | None]], **body: object,
                 ) -> None:
    store = env.service.store
    for mac, hostname in macs:
        await env.post("/api/v1/machines", {"mac": mac, **body, **(
            {"hostname": hostname} if hostname else {})}, status=201)
        if hostname is None:  # enrolled with a name of enroll.hostname_template's: none
            machine = await store.machine_by("mac", mac)
            assert machine is not None
            await store.update_machine(dataclasses.replace(machine, hostname=None))


async def _operators(make_env: EnvFactory, tmp_path: Path, added: str, octet: int,
                     name: str = K3OS, prefix: str = "h") -> tuple[Env, list[tuple[str, str]]]:
    """A server whose template ``name`` is the shipped one with ``added``, seeded, and three
    machines enrolled (MACs 52:54:00:00:``octet``:01-03, hostnames ``prefix``-1-3)."""
    env, own, shipped = await own_template(make_env, tmp_path, name)
    own.write_text(shipped + added)
    await env.seed()
    macs = [(f"52:54:00:00:{octet:02x}:{i:02x}", f"{prefix}-{i}") for i in range(1, 4)]
    await _enrol(env, macs)
    return env, macs


async def test_first_configs_of_one_shape_are_its_frame_filled_in_as_rendered(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """The first config of a shape is rendered (twice: its frame's marked render and its
    own), every other of that shape is its frame filled in, no render; each is the text the
    whole context renders: with and without a hostname, in two clusters, and after an edit
    of the cluster (its server URL and token), of its group's labels, of the profile, of the
    CA, of the base URL and of the template file, each in the next config."""
    env, own, shipped = await own_template(make_env, tmp_path, K3OS)
    await env.seed()
    await env.post("/api/v1/clusters", {"name": "core", "server_url": "https://192.0.2.51:6443",
                                        "token": "core-secret-token"}, status=201)
    macs = [(f"52:54:00:00:0a:{i:02x}", None if i in (3, 4) else f"n-{i}")
            for i in range(1, 16)]
    await _enrol(env, macs[:6], profile="k3os", cluster="edge")
    await _enrol(env, macs[6:], profile="k3os", cluster="core")
    for i, (mac, hostname) in enumerate(macs[:6]):
        text, whole = await _first_config(env, mac)
        assert text == whole, mac
        assert f"# k3OS config for {hostname or mac}," in text
        assert f"node-{mac.replace(':', '-')}" in text if hostname is None else (
            f'"--node-name"\n    - "{hostname}"' in text)
        # Shapes: a hostname (1, 2), none (3, 4), a hostname again (5, 6): (frames made,
        # configs filled in).
        assert _frames(env) == ((1, 0), (1, 1), (2, 1), (2, 2), (2, 3), (2, 4))[i], mac
    text, whole = await _first_config(env, macs[6][0])  # another cluster: its own shape
    assert text == whole and '"core-secret-token"' in text and _frames(env) == (3, 4)
    text, whole = await _first_config(env, macs[7][0])
    assert text == whole and _frames(env) == (3, 5)
    r = await call(env, "PUT", "/api/v1/clusters/core",
                   json_body={"server_url": "https://192.0.2.52:6443",
                              "token": "core-new-token", "labels": {"zone": "b"}})
    assert r.status == 200, r.text
    text, whole = await _first_config(env, macs[8][0])
    assert text == whole and '"core-new-token"' in text and "192.0.2.52" in text
    assert '"zone": "b"' in text and "core-secret-token" not in text
    r = await call(env, "PUT", "/api/v1/profiles/k3os",
                   json_body={"kernel": "vmlinuz", "initrds": ["initrd.img"],
                              "ssh_authorized_keys": ["ssh-ed25519 AAAAedited"]})
    assert r.status == 200, r.text
    text, whole = await _first_config(env, macs[9][0])
    assert text == whole and "ssh-ed25519 AAAAedited" in text
    # The group's labels: the same cluster object, another join.
    r = await call(env, "PUT", "/api/v1/groups/all-x86",
                   json_body={"selector": {"arch": ["x86_64"]}, "profile": "k3os",
                              "labels": {"rack": "r9"}})
    assert r.status == 200, r.text
    text, whole = await _first_config(env, macs[10][0])
    assert text == whole and '"rack": "r9"' in text
    content = env.service.content
    content._trust = lambda: Trust("https://192.0.2.10:8443", "-----BEGIN CERTIFICATE-----\n"
                                   "MIIB\n-----END CERTIFICATE-----\n", "AA:BB")
    text, whole = await _first_config(env, macs[11][0])
    assert text == whole and "SHA-256 AA:BB" in text
    env.service.base_url = "http://192.0.2.98:8080"
    text, whole = await _first_config(env, macs[12][0])
    assert text == whole and "http://192.0.2.98:8080/api/v1/register" in text
    own.write_text(shipped + "# edited by the operator\n")
    os.utime(own, (1, 1))  # another mtime, whatever the clock's resolution
    text, whole = await _first_config(env, macs[13][0])
    assert text == whole and text.endswith("# edited by the operator\n")
    # Each change above made its new shape's frame (a render more)...
    assert _frames(env) == (3 + 6, 5)
    text, whole = await _first_config(env, macs[14][0])  # ... filled in for the next
    assert text == whole and _frames(env) == (9, 6)


async def test_every_shipped_config_is_its_render_framed_or_not(env: Env) -> None:
    """Every config template shipped in templates/, for machines with and without a hostname,
    agents and the server that writes its cluster's CA: each text the whole context
    renders, asked twice (the second a frame where its template has one)."""
    await env.seed(role="server", server_url="managed")  # its servers write its k3s CA
    r = await call(env, "PUT", "/api/v1/clusters/edge",
                   json_body={"endpoint": "https://192.0.2.60:6443"})
    assert r.status == 200, r.text
    macs = [(f"52:54:00:00:0b:{i:02x}", None if i % 2 else f"s-{i}") for i in range(1, 5)]
    await _enrol(env, macs)
    macs += [(f"52:54:00:00:0b:{i:02x}", None if i % 2 else f"a-{i}") for i in range(5, 9)]
    await _enrol(env, macs[4:], role="agent")
    names = [K3OS, *(f"cloud-config/cloud-init/{n}" for n in ("user-data", "meta-data",
                                                                 "vendor-data"))]
    templates = Path(__file__).parent.parent / "templates" / "cloud-config"
    shipped = sorted(str(p.relative_to(templates.parent)) for p in templates.rglob("*")
                     if p.is_file())
    assert shipped == sorted(names)  # a new one shipped: add it here
    content = env.service.content
    roles = set()
    for mac, _ in macs:
        plan = await _plan(env, mac)
        assert plan.k3s is not None
        roles.add(plan.k3s.role)
        if plan.k3s.role == "server":
            assert "server-ca.crt" in content.k3os_config(plan)
        for name in names:
            for _ in range(2):
                text = (content.k3os_config(plan) if name == K3OS
                        else content.nocloud(plan, name.rsplit("/", 1)[1]))
                assert text == _whole(content, name, plan), (mac, name)
    frames = [want.config_frames for want in content._wants.values()
              if want.config_frames]
    # The k3OS config's and the user-data's (vendor-data's too), for servers and agents.
    assert len(frames) >= 2 and roles == {"server", "agent"}
    framed = [frame for kept in frames for frame in kept.values() if frame is not None]
    assert len(framed) >= 8, framed


async def test_odd_macs_hostnames_and_tokens_are_their_own_render(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """Values a frame cannot take as they are (a hostname or token that tojson or the
    register command's quoting would escape, a '#', a space) are rendered; plain odd ones
    (a hostname "-" or "a.b_c:d", a MAC of fe and ff) filled in: each the text the whole
    context renders."""
    env, _, _ = await own_template(make_env, tmp_path, K3OS)
    await env.seed()
    odd = ["-", "a.b_c:d", 'quo"te', "sp ace", "#hash", "back\\slash", "amp&<lt>", "n-ok",
           "x'y", "9"]
    tokens = [f"plain-{i}" for i in range(7)] + ['quoted"<7', "spaced  8", "x'9"]
    macs = [(f"fe:ff:ff:ff:ff:{i:02x}", f"seed-{i}") for i in range(len(odd))]
    await _enrol(env, macs)
    store = env.service.store
    for (mac, _), hostname in zip(macs, odd, strict=True):
        machine = await store.machine_by("mac", mac)
        assert machine is not None
        await store.update_machine(dataclasses.replace(machine, hostname=hostname))
    content = env.service.content
    for (mac, _), hostname, token in zip(macs, odd, tokens, strict=True):
        # A token source of the operator's own, as the plan carries it.
        plan = dataclasses.replace(await _plan(env, mac), token=token)
        text = content.k3os_config(plan)
        assert text == _whole(content, K3OS, plan), (mac, hostname, token)
    # The first's frame made, the second's filled in ("a.b_c:d", "plain-1"); the rest are
    # not of a frame's letters.
    assert _frames(env) == (1, 1)


async def test_a_config_that_reads_a_machines_value_otherwise_is_rendered_each_time(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """A template that tests a per-machine value (not only prints it) has no split form,
    so no frame: each config rendered, as the whole context gives it."""
    env, own, shipped = await own_template(make_env, tmp_path, K3OS)
    own.write_text(shipped + "{% if mac.endswith('1') %}# one\n{% endif %}")
    await env.seed()
    macs = [f"52:54:00:00:0c:{i}" for i in ("02", "03", "11", "21")]
    await _enrol(env, [(mac, f"h{i}") for i, mac in enumerate(macs)])
    for mac in macs:
        text, whole = await _first_config(env, mac)
        assert text == whole and text.endswith("# one\n") == mac.endswith("1"), mac
    # Each rendered: a frame tried once (its marked render, then refused), never used.
    assert _frames(env) == (1, 0)


@pytest.mark.parametrize(("line", "bad"), [
    # A plain scalar: '-' there is a block sequence's entry where no sequence may start.
    ("node: {{ machine.hostname }}", "-"),
    # After a backslash in a double-quoted scalar: an escape of the value's first letter
    # ('\\n' of the marks' "nb…" and of "n-1" is one, '\\h' is none).
    ('odd: "\\{{ machine.hostname }}"', "h-3"),
])
async def test_a_config_printing_a_value_where_yaml_reads_it_otherwise_is_rendered(
        make_env: EnvFactory, tmp_path: Path, line: str, bad: str) -> None:
    """A value printed where another value of a frame's letters could change what the YAML
    says is no frame's place: each config rendered and checked, and the one that does not
    parse refused as the render refuses it, not served from the frame of one that did."""
    env, own, shipped = await own_template(make_env, tmp_path, K3OS)
    own.write_text(shipped + line + "\n")
    await env.seed()
    macs = [(f"52:54:00:00:0d:{i:02x}", f"n-{i}") for i in range(1, 4)]
    await _enrol(env, macs)
    for mac, _ in macs[:2]:
        text, whole = await _first_config(env, mac)
        assert text == whole, mac
    machine = await env.service.store.machine_by("mac", macs[2][0])
    assert machine is not None
    await env.service.store.update_machine(dataclasses.replace(machine, hostname=bad))
    with pytest.raises(RenderError, match="invalid YAML"):
        await _first_config(env, macs[2][0])
    assert _frames(env) == (1, 0)  # tried once, refused: each rendered


async def test_a_config_reading_a_name_frames_do_not_know_is_rendered_each_time(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """A name a config frame has no place for (the machine's serial; a context name of the
    machine's own added by a wrapped context) keeps its template without frames: a frame
    would hold the value of the machine it was made for, which the check against that
    machine's own render cannot see."""
    env, macs = await _operators(make_env, tmp_path,
                                 "# {{ site_name }} {{ machine.serial }}\n", 0x0E)
    store = env.service.store
    for i, (mac, _) in enumerate(macs):
        machine = await store.machine_by("mac", mac)
        assert machine is not None
        await store.update_machine(dataclasses.replace(machine, serial=f"SN{i}"))
    content = env.service.content
    real = content.context

    def context(plan: BootPlan, **kw: object) -> dict[str, object]:
        made = real(plan, **kw)  # type: ignore[arg-type]
        made["site_name"] = f"site-of-{plan.mac}"
        return made

    content.context = context  # type: ignore[method-assign]
    for i, (mac, _) in enumerate(macs):
        text, whole = await _first_config(env, mac)
        assert text == whole and text.endswith(f"# site-of-{mac} SN{i}\n"), mac
    assert _config_frames(env) == 0  # never framed: not even tried


async def test_an_operators_config_printing_the_cluster_and_its_urls_is_framed(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """An operator's config that prints the cluster's name and the URLs made of the MAC and
    the token in quoted scalars and comments is framed, each the text the whole context
    renders."""
    env, own, shipped = await own_template(make_env, tmp_path, K3OS)
    own.write_text(shipped + "# {{ cluster.name }} {{ events_url }}\n"
                   "netboot_urls: [{{ nocloud_url | tojson }}, \"{{ events_url }}\"]\n")
    await env.seed()
    macs = [(f"52:54:00:00:0f:{i:02x}", f"h-{i}") for i in range(1, 5)]
    await _enrol(env, macs)
    for mac, _ in macs:
        text, whole = await _first_config(env, mac)
        assert text == whole and f"/machines/{mac.replace(':', '-')}/events\"]" in text, mac
    assert _frames(env) == (1, 3)  # the first's frame made; the rest filled in


async def test_a_shape_whose_marked_render_fails_is_not_tried_again(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """A template that renders with a machine's values but not with the marks (here it cuts
    the MAC at its colons) has no frame, and its shape's marked render is tried once, not
    once a config: each config rendered, as the whole context gives it."""
    env, own, shipped = await own_template(make_env, tmp_path, K3OS)
    own.write_text(shipped + '# {{ mac.split(":")[5] }}\n')
    await env.seed()
    macs = [(f"52:54:00:00:10:{i:02x}", f"h-{i}") for i in range(1, 5)]
    await _enrol(env, macs)
    for mac, _ in macs:
        text, whole = await _first_config(env, mac)
        assert text == whole and text.endswith(f"# {mac[-2:]}\n"), mac
    assert _frames(env) == (1, 0)  # tried once (its marked render failed), never used


async def test_a_stored_empty_hostname_and_none_do_not_share_a_frame(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """A hostname "" (never the API's, but a restored backup's or hand SQL's: the codec
    reads it as it is) prints otherwise than None (Jinja prints None as "None"): a config
    framed from one is not the other's, each the text the whole context renders."""
    env, own, shipped = await own_template(make_env, tmp_path, K3OS)
    own.write_text(shipped + "# host {{ machine.hostname }}\n")
    await env.seed()
    macs = [(f"52:54:00:00:11:{i:02x}", None) for i in range(1, 4)]
    await _enrol(env, macs)
    store = env.service.store
    machine = await store.machine_by("mac", macs[0][0])  # the first stored with "" (one
    assert machine is not None  # machine may: the store's hostnames are unique)
    await store.update_machine(dataclasses.replace(machine, hostname=""))
    for i, (mac, _) in enumerate(macs):
        text, whole = await _first_config(env, mac)
        assert text == whole, mac
        assert text.endswith("# host None\n" if i else "# host \n"), mac


@pytest.mark.parametrize("name", [K3OS, "cloud-config/cloud-init/user-data"])
async def test_a_config_that_rendered_after_its_failure_is_told_fixed(
        make_env: EnvFactory, tmp_path: Path, name: str) -> None:
    """A k3OS config or cloud-init file that failed to render (its ``render failed`` event),
    then, its template fixed, rendered: a ``rendered`` event says so, as an iPXE script's,
    a grub.cfg's and a cmdline.txt's do. The config paths told none: the machine's newest
    event stayed the failure (the list's last event, the dashboard's) while its installer
    had its config, and the boot path kept giving way to it."""
    env, own, shipped = await own_template(make_env, tmp_path, name)
    own.write_text(shipped + "# {{ no_such_name }}\n")
    await env.seed()
    mac = "52:54:00:00:12:01"
    await _enrol(env, [(mac, "h-1")])
    content, recorder = env.service.content, env.service.enroller.recorder
    plan = await _plan(env, mac)

    def config() -> str:
        return (content.k3os_config(plan) if name == K3OS
                else content.nocloud(plan, name.rsplit("/", 1)[1]))

    async def kinds() -> list[str]:
        await recorder.flush()
        return [str(e["kind"]) for e in await env.get(f"/api/v1/machines/{mac}/events")]

    with pytest.raises(RenderError, match="no_such_name"):
        config()
    assert (await kinds())[-1] == "render failed"
    own.write_text(shipped)
    os.utime(own, (1, 1))  # another mtime, whatever the clock's resolution
    assert config() == _whole(content, name, plan)
    told = await kinds()
    assert told[-1] == "rendered" and told.count("rendered") == 1, told
    config()  # told once, not at every config
    assert (await kinds()).count("rendered") == 1
NAMES = [K3OS, *(f"cloud-config/cloud-init/{n}" for n in ("user-data", "meta-data",
                                                          "vendor-data"))]


async def _clusters(env: Env, count: int, *, token: str = "tok-c{i}-secret",
                    server_url: str = "https://192.0.2.{i}:6443") -> list[str]:
    """``count`` clusters with their own server URL and join token, no labels: the MACs of
    a machine of each (hostname ``h-i``), enrolled with profile k3os (an agent)."""
    await env.seed()
    macs = []
    for i in range(count):
        await env.post("/api/v1/clusters", {
            "name": f"c{i}", "server_url": server_url.format(i=70 + i),
            "token": token.format(i=i)}, status=201)
        mac = f"52:54:00:00:11:{i:02x}"
        await _enrol(env, [(mac, f"h-{i}")], profile="k3os", cluster=f"c{i}")
        macs.append(mac)
    return macs


async def test_agents_of_many_clusters_share_a_frame_each_with_its_own_token_and_server(
        env: Env) -> None:
    """The agents of clusters alike but for their server URL and join token (a fleet's
    hundreds of clusters) share one frame per shape: each config is the text the whole
    context renders, with its own cluster's token and server URL, never another's; every
    shipped config template, each asked for once."""
    macs = await _clusters(env, 5)
    for name in NAMES:
        for i, mac in enumerate(macs):
            text, whole = await _first_config(env, mac, name)
            assert text == whole, (mac, name)
            if name in (K3OS, "cloud-config/cloud-init/user-data"):
                assert f'"tok-c{i}-secret"' in text and f'"https://192.0.2.{70 + i}:6443"' \
                    in text, (mac, name)
                assert not any(f"tok-c{j}-" in text for j in range(5) if j != i), (mac, name)
    # One frame a template, the rest filled in: k3OS, user-data and meta-data, 4 filled in
    # each (the first two: one frame per cluster before; vendor-data's are counted with the
    # install scripts', _frames).
    assert _frames(env) == (3, 12)


async def test_a_rotated_join_token_or_moved_server_is_in_the_next_config_of_its_frame(
        env: Env) -> None:
    """A cluster's join token rotated, or its server URL moved: the next config of its
    agents, filled in from the frame the clusters share, carries the new values, never the
    old (the frame holds neither)."""
    macs = await _clusters(env, 3)
    for mac in macs[:2]:
        text, whole = await _first_config(env, mac)
        assert text == whole
    r = await call(env, "PUT", "/api/v1/clusters/c2",
                   json_body={"server_url": "https://192.0.2.90:6443", "token": "rotated-2"})
    assert r.status == 200, r.text
    await _enrol(env, [("52:54:00:00:11:20", "h-20")], profile="k3os", cluster="c2")
    for mac in (macs[2], "52:54:00:00:11:20"):
        text, whole = await _first_config(env, mac)
        assert text == whole and '"rotated-2"' in text and "tok-c2" not in text, mac
        assert '"https://192.0.2.90:6443"' in text and "192.0.2.72" not in text, mac
    assert _frames(env) == (1, 3)  # the same frame, filled in with the new values


async def test_join_values_a_frame_cannot_take_as_they_are_are_rendered(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """A join token tojson escapes (a quote, '<', a space, a '#') is rendered, as the whole
    context gives it; an IPv6 server URL (its brackets and slashes are no YAML's there, nor
    tojson's) is filled in."""
    env, _, _ = await own_template(make_env, tmp_path, K3OS)
    macs = await _clusters(env, 3, token='odd"<to ken#{i}')
    for mac in macs:
        text, whole = await _first_config(env, mac)
        assert text == whole and "to ken#" in text, mac
    assert _frames(env) == (0, 0)  # not even tried: no frame's letters
    r = await call(env, "PUT", "/api/v1/clusters/c1", json_body={
        "server_url": "https://[2001:db8::5]:6443", "token": "plain-1"})
    assert r.status == 200, r.text
    r = await call(env, "PUT", "/api/v1/clusters/c2", json_body={
        "server_url": "https://[2001:db8::6]:6443", "token": "plain-2"})
    assert r.status == 200, r.text
    for mac in macs[1:]:
        text, whole = await _first_config(env, mac)
        assert text == whole and "2001:db8::" in text, mac
    assert _frames(env) == (1, 1)


async def test_a_join_token_rotated_to_one_a_frame_cannot_take_is_rendered(
        env: Env) -> None:
    """Whether a cluster's join token and server URL may be put in a frame is looked at
    once a pair (Content._joins_plain), not at every config: a token rotated from a plain
    one to one tojson escapes is looked at anew (its agents' configs rendered, the odd
    token whole), and rotated back to the first, filled in from the frame again."""
    macs = await _clusters(env, 2)
    for mac in macs[::-1]:  # c1's makes the frame, c0's is filled in
        text, whole = await _first_config(env, mac)
        assert text == whole
    await _enrol(env, [(f"52:54:00:00:12:{i:02x}", f"r-{i}") for i in range(2)],
                 profile="k3os", cluster="c1")
    for i, token in enumerate(('odd"<tok en#1', "tok-c1-secret")):
        r = await call(env, "PUT", "/api/v1/clusters/c1", json_body={
            "server_url": "https://192.0.2.71:6443", "token": token})
        assert r.status == 200, r.text
        text, whole = await _first_config(env, f"52:54:00:00:12:{i:02x}")
        assert text == whole and (token if i else "tok en#1") in text, token
    assert _frames(env) == (1, 2)  # the odd token's config rendered, not filled in


@pytest.mark.parametrize("line", [
    '{% if k3s.token.startswith("tok-c1") %}# one\n{% endif %}',
    '{% if k3s.server_url == "https://192.0.2.71:6443" %}# one\n{% endif %}',
    '# {{ k3s.token[4:6] }}{% if "c1" in k3s.server_url ~ k3s.token %} one{% endif %}\n',
])
async def test_a_config_reading_the_join_otherwise_than_printing_it_is_framed_per_cluster(
        make_env: EnvFactory, tmp_path: Path, line: str) -> None:
    """A template that reads the join's token or server URL otherwise than printing them
    (or testing their truth) has no frame shared by clusters: each cluster's configs are its
    own frame's (as before), each the text the whole context renders."""
    env, own, shipped = await own_template(make_env, tmp_path, K3OS)
    own.write_text(shipped + line)
    macs = await _clusters(env, 3)
    for i, mac in enumerate(macs):
        text, whole = await _first_config(env, mac)
        assert text == whole and text.endswith(" one\n") == (i == 1), mac
    assert _frames(env)[0] == 3  # one per cluster


@pytest.mark.parametrize(("line", "ends"), [
    ("", (61, 61)), ("", (61, 62)), ("# cluster {{ cluster.name }}\n", (61, 61))])
async def test_servers_and_a_config_printing_the_cluster_are_framed_per_cluster(
        make_env: EnvFactory, tmp_path: Path, line: str, ends: tuple[int, int]) -> None:
    """What a config holds of its cluster beyond the join's token and server URL keeps its
    frames per cluster: a server's k3s CA and agent token (two managed clusters alike but
    for their CAs and tokens: one endpoint, the same labels), and a template printing the
    cluster's name: each config the text the whole context renders, with its own
    cluster's CA and name. Their agents share a frame though their TLS names (a server's
    k3s arguments alone) differ (two endpoints)."""
    env, own, shipped = await own_template(make_env, tmp_path, K3OS)
    own.write_text(shipped + line)
    await env.seed(role="server", server_url="managed")
    await env.post("/api/v1/clusters", {"name": "m2", "server_url": "managed",
                                        "labels": {"site": "lab"}}, status=201)  # as edge
    for name, at in zip(("edge", "m2"), ends, strict=True):  # they join without a wait
        r = await call(env, "PUT", f"/api/v1/clusters/{name}",
                       json_body={"endpoint": f"https://192.0.2.{at}:6443"})
        assert r.status == 200, r.text
    servers = [(f"52:54:00:00:12:{i:02x}", f"s-{i}") for i in range(1, 7)]
    await _enrol(env, servers[:3], cluster="edge", role="server", profile="k3os")
    await _enrol(env, servers[3:], cluster="m2", role="server", profile="k3os")
    agents = [(f"52:54:00:00:12:{i:02x}", f"a-{i}") for i in range(7, 11)]
    await _enrol(env, agents[:2], cluster="edge", role="agent", profile="k3os")
    await _enrol(env, agents[2:], cluster="m2", role="agent", profile="k3os")
    cas = set()
    content = env.service.content
    for mac, _ in servers + agents:
        plan = await _plan(env, mac)
        assert plan.cluster is not None and plan.k3s is not None
        text, whole = content.k3os_config(plan), _whole(content, K3OS, plan)
        assert text == whole, mac
        if line:
            assert text.endswith(f"# cluster {plan.cluster.name}\n"), mac
        if plan.k3s.role == "server":
            assert plan.cluster.ca_cert.split("\n")[1] in text, mac
            cas.add(plan.cluster.ca_cert)
    # Per cluster: its init server's, its other servers' and (printing the cluster) its
    # agents' frames; the agents of both share one where the cluster is not printed.
    assert len(cas) == 2 and _frames(env) == ((5, 5) if not line else (6, 4))


async def test_meta_data_is_framed_with_each_machines_instance_serial(env: Env) -> None:
    """cloud-init's meta-data (its instance id is made of the machine's instance serial, its
    last change) is its frame with each machine's serial put in, the text the whole
    context renders; a serial of 0 (never changed) is its own shape."""
    await env.seed()
    macs = [(f"52:54:00:00:13:{i:02x}", None if i == 3 else f"m-{i}") for i in range(1, 6)]
    await _enrol(env, macs)
    content = env.service.content
    serials = set()
    for i, (mac, _) in enumerate(macs):
        plan = await _plan(env, mac)
        assert plan.machine is not None  # its last change: one a machine, as a fleet's
        plan = dataclasses.replace(plan, machine=dataclasses.replace(
            plan.machine, updated=1_700_000_000.5 + 7 * i))
        serials.add(int(plan.machine.updated))
        text = content.nocloud(plan, "meta-data")
        assert text == _whole(content, "cloud-config/cloud-init/meta-data", plan), mac
        assert f'-{int(plan.machine.updated)}"' in text, mac
    assert len(serials) == len(macs)
    # Two shapes (a hostname or not): made once each, the other three filled in.
    assert _frames(env) == (2, 3)
    plan = dataclasses.replace(plan, machine=dataclasses.replace(plan.machine, updated=0.5))
    text = content.nocloud(plan, "meta-data")
    assert text == _whole(content, "cloud-config/cloud-init/meta-data", plan)
    assert '-0"' in text and _frames(env) == (3, 3)


async def test_a_meta_data_printing_its_serial_as_a_number_is_rendered(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """An operator's meta-data printing the instance serial through tojson alone (a JSON
    number, where a frame's mark would be a string) has no frame: its marked render is
    refused by the check against the request's own, tried once, and each is rendered."""
    name = "cloud-config/cloud-init/meta-data"
    env, macs = await _operators(make_env, tmp_path, "serial: {{ instance_serial | tojson }}\n",
                                 0x14, name, "m")
    content = env.service.content
    for mac, _ in macs:
        plan = await _plan(env, mac)
        assert plan.machine is not None
        text = content.nocloud(plan, "meta-data")
        assert text == _whole(content, name, plan), mac
        assert text.endswith(f"serial: {int(plan.machine.updated)}\n"), mac
    assert _frames(env) == (1, 0)


@pytest.mark.parametrize(("line", "first"), [
    ("# {{ machine.hostname[0] }}\n", "n-1"),
    ("# {{ machine.hostname[-1] }}\n", "n-1n"),
    ("# {{ k3s.token[0] }}\n", "n-1"),
])
async def test_a_config_printing_a_letter_of_a_value_is_rendered(
        make_env: EnvFactory, tmp_path: Path, line: str, first: str) -> None:
    """A template printing one letter of a value (a constant subscript, which the split's
    proof lets through) has no frame, even where the first machine's letter is the marks'
    own (every mark starts with 'n', a hostname mark ends with it): each config the text the
    whole context renders, never the first machine's letter for the next."""
    env, macs = await _operators(make_env, tmp_path, line, 0x15)
    store = env.service.store
    machine = await store.machine_by("mac", macs[0][0])
    assert machine is not None
    await store.update_machine(dataclasses.replace(machine, hostname=first))
    content = env.service.content
    for i, (mac, _) in enumerate(macs):
        plan = await _plan(env, mac)
        assert plan.k3s is not None
        if "token" in line:  # the cluster's join token, as its plan carries it
            plan = dataclasses.replace(plan, k3s=dataclasses.replace(
                plan.k3s, token=f"{'n' if i == 0 else 'k'}-token-{i}"))
        text = content.k3os_config(plan)
        assert text == _whole(content, K3OS, plan), mac
    assert _frames(env)[1] == 0  # never filled in
