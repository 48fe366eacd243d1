"""TFTP content: per-machine files generated on request in U-Boot's lookup order, then assets."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from netboot.errors import Forbidden, NotFound
from netboot.model import Arch, Firmware, Lease, MachineState
from netboot.wire import uimage
from tests.conftest import KERNEL, Env, EnvFactory, boot, call, install_token

PEER = ("192.0.2.101", 2000)


async def test_boot_script_image(env: Env) -> None:
    blob = await env.service.content.tftp_open("boot.scr.uimg", PEER)
    assert blob.data is not None and blob.size == len(blob.data)
    (script,) = uimage.decode(blob.data).scripts
    assert b"pxe get && pxe boot" in script


async def test_pxelinux_by_mac_follows_the_machine_state(env: Env) -> None:
    await env.seed()
    # Behind a site DHCP server netboot never sees U-Boot's DHCP, so the TFTP request carries
    # no architecture: an arch selector cannot match it; a MAC glob can.
    await env.post("/api/v1/groups", {"name": "arm", "selector": {"mac": ["52:54:00:00:00:2*"],
                                                                      "firmware": ["uboot"]},
                                      "profile": "k3os", "cluster": "edge"}, status=201)
    await env.post("/api/v1/machines", {"mac": "52:54:00:00:00:21", "hostname": "arm-1"},
                   status=201)
    content = env.service.content
    with pytest.raises(NotFound):
        # Unknown machine, policy ignore: no config, U-Boot goes on down its list.
        await content.tftp_open("pxelinux.cfg/01-52-54-00-00-00-99", PEER)
    text = (await content.tftp_open("pxelinux.cfg/01-52-54-00-00-00-21", PEER)).data
    assert text is not None and b"LABEL install" in text and b"KERNEL vmlinuz" in text
    events = await env.get("/api/v1/machines/52:54:00:00:00:21/events")
    assert events[-1]["kind"] == "install-plan" and events[-1]["data"]["via"] == "tftp"
    await env.post("/api/v1/machines/52:54:00:00:00:21/events", {"kind": "installed"},
                   status=201)
    text = (await content.tftp_open("pxelinux.cfg/01-52-54-00-00-00-21", PEER)).data
    assert text is not None and b"LOCALBOOT 0" in text


async def test_pxelinux_by_uuid_and_hex_ip(env: Env) -> None:
    await env.seed()
    await env.post("/api/v1/machines", {"mac": "52:54:00:00:00:21", "hostname": "arm-1",
                                        "profile": "k3os",
                                        "uuid": "8d3a0c51-3b6b-4f0e-9d4c-52e5c1a2b3c4"},
                   status=201)
    content = env.service.content
    by_uuid = await content.tftp_open("pxelinux.cfg/8d3a0c51-3b6b-4f0e-9d4c-52e5c1a2b3c4", PEER)
    assert by_uuid.data is not None and b"LABEL install" in by_uuid.data
    await env.service.store.put_lease(Lease("52:54:00:00:00:21", "192.0.2.101", 2e9))
    by_ip = await content.tftp_open("pxelinux.cfg/C0000265", PEER)
    assert by_ip.data is not None and b"LABEL install" in by_ip.data
    for miss in ("pxelinux.cfg/C000026", "pxelinux.cfg/C0000299", "pxelinux.cfg/default-arm"):
        with pytest.raises(NotFound):
            await content.tftp_open(miss, PEER)


async def test_a_hex_ip_name_reads_one_lease_not_every_lease(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pxelinux.cfg/<hex IP>`` (TFTP, any host, a forged source too) and GRUB's
    ``grub.cfg-<hex IP>`` (TFTP and HTTP) read every lease of the inventory per request to
    find one: 7 ms of CPU at 4,094 leases, 132 ms at 65,534 (a /16 pool that forged
    DISCOVERs fill), so a few dozen such names a second held the process that answers every
    boot (s37-attack). Now the address's index is asked; the answer is the same."""
    await env.seed()
    await env.post("/api/v1/machines", {"mac": "52:54:00:00:00:21", "hostname": "arm-1",
                                        "profile": "k3os"}, status=201)
    store = env.service.store
    for i in range(50):
        await store.put_lease(Lease(f"02:00:00:00:01:{i:02x}", f"198.51.100.{i + 1}", 2e9))
    await store.put_lease(Lease("52:54:00:00:00:21", "192.0.2.101", 2e9))

    async def every_lease() -> list[Lease]:
        raise AssertionError("read every lease to find one address")

    monkeypatch.setattr(store, "list_leases", every_lease)
    content = env.service.content
    for name in ("pxelinux.cfg/C0000265", "grub/grub.cfg-C0000265"):
        blob = await content.tftp_open(name, PEER)
        assert blob.data is not None and b"install" in blob.data, name
    with pytest.raises(NotFound):
        await content.tftp_open("pxelinux.cfg/C6336499", PEER)  # 198.51.100.153: none


async def test_site_default_file_and_assets(env: Env) -> None:
    root = env.service.content.assets.roots[-1]
    (root / "pxelinux.cfg").mkdir()
    (root / "pxelinux.cfg" / "default").write_text("DEFAULT site\n")
    content = env.service.content
    blob = await content.tftp_open("pxelinux.cfg/default", PEER)
    assert blob.data == b"DEFAULT site\n"
    kernel = await content.tftp_open("/vmlinuz", PEER)
    assert kernel.size == len(KERNEL) and kernel.path is not None


@pytest.mark.parametrize("path", ["../etc/passwd", "a/../../etc/passwd", "x\x00y",
                                  "..\\..\\etc\\passwd"])
async def test_traversal_refused(env: Env, path: str) -> None:
    with pytest.raises(Forbidden):
        await env.service.content.tftp_open(path, PEER)


async def test_pinned_loader_follows_package_symlink(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Debian links /usr/lib/ipxe/ipxe.efi to /boot/ipxe.efi: the loader is served, but the same
    kind of symlink under any other name is still refused."""
    from netboot.files import FileTree

    outside = tmp_path / "boot"
    outside.mkdir()
    (outside / "ipxe.efi").write_bytes(b"MZ")
    root = tmp_path / "ipxe"
    root.mkdir()
    (root / "ipxe.efi").symlink_to(outside / "ipxe.efi")
    (root / "other.efi").symlink_to(outside / "ipxe.efi")
    tree = FileTree([root], pinned=["ipxe.efi", "snponly.efi"])
    assert tree.blob("ipxe.efi").size == 2
    assert tree.exists("ipxe.efi") and not tree.exists("snponly.efi")
    with pytest.raises(Forbidden):
        tree.blob("other.efi")


async def test_raspberry_pi_serial_prefix(env: Env) -> None:
    await env.seed()
    await env.post("/api/v1/profiles", {"name": "pi", "kernel": "kernel8.img",
                                        "cmdline": "console=serial0 ds=nocloud;s={{ nocloud_url }}",
                                        "config_template": "cloud-init"}, status=201)
    await env.post("/api/v1/machines", {"mac": "dc:a6:32:01:36:c2", "hostname": "pi-1",
                                        "serial": "100000009ffefdef", "profile": "pi",
                                        "cluster": "edge"}, status=201)
    root = env.service.content.assets.roots[-1]
    (root / "rpi").mkdir()
    (root / "rpi" / "start4.elf").write_bytes(b"pi")
    content = env.service.content
    pi = await content.tftp_open("9ffefdef/start4.elf", PEER)
    assert pi.path is not None and pi.path.endswith("rpi/start4.elf")
    cmdline = await content.tftp_open("9ffefdef/cmdline.txt", PEER)
    assert cmdline.data is not None
    text = cmdline.data.decode()
    assert text.startswith("console=serial0 ds=nocloud;s=http://192.0.2.10:8080/nocloud/"
                           "dc-a6-32-01-36-c2/") and text.endswith("/\n")
    with pytest.raises(NotFound):
        await content.tftp_open("0badf00d/start4.elf", PEER)  # not enrolled
    await env.post("/api/v1/machines/dc:a6:32:01:36:c2/events", {"kind": "installed"},
                   status=201)
    for name in ("start4.elf", "cmdline.txt"):  # installed: fall through to the local disk
        with pytest.raises(NotFound):
            await content.tftp_open(f"9ffefdef/{name}", PEER)


async def test_a_raspberry_pis_cmdline_that_fails_to_render_is_its_event_until_fixed(
        env: Env) -> None:
    """A Pi's profile command line with an undefined name: its cmdline.txt over real TFTP
    was an error packet and a log line only (s41-ops left it): now a ``render failed``
    event of the machine names it, its fix; fixed, the next fetch is a ``rendered``."""
    from netboot.servers.tftp import TftpServer
    from netboot.wire.tftp import Data, Error
    from tests.servers.tftp_client import LOOPBACK, RawClient

    await env.seed()
    await env.post("/api/v1/profiles", {"name": "pi", "kernel": "kernel8.img",
                                        "cmdline": "console=serial0 s={{ nocloud_urll }}",
                                        "config_template": "cloud-init"}, status=201)
    mac = "dc:a6:32:01:36:c3"
    await env.post("/api/v1/machines", {"mac": mac, "hostname": "pi-2",
                                        "serial": "100000009ffefdee", "profile": "pi",
                                        "cluster": "edge"}, status=201)
    server = TftpServer(env.service.content, host=LOOPBACK, port=0)
    await server.start()

    async def fetched() -> object:
        with RawClient() as client:
            client.rrq((LOOPBACK, server.port), "9ffefdee/cmdline.txt")
            packet, _ = await client.recv()
            return packet

    async def kinds() -> list[tuple[str, str]]:
        await env.service.enroller.recorder.flush()
        return [(str(e["kind"]), str(e["message"]))
                for e in await env.get(f"/api/v1/machines/{mac}/events")]
    try:
        assert isinstance(await fetched(), Error)
        failed = [m for k, m in await kinds() if k == "render failed"]
        assert len(failed) == 1 and "Raspberry Pi cmdline.txt" in failed[0], failed
        assert "nocloud_urll" in failed[0] and "Fix:" in failed[0], failed
        resp = await env.client.put("/api/v1/profiles/pi", headers=env.auth, json={
            "kernel": "kernel8.img", "cmdline": "console=serial0 s={{ nocloud_url }}",
            "config_template": "cloud-init"})
        assert resp.status == 200, await resp.text()
        assert isinstance(await fetched(), Data)
        assert (await kinds())[-1][0] == "rendered"
    finally:
        await server.close()


async def test_a_raspberry_pi_enrolled_without_a_mac_is_refused_saying_how_to_add_it(
        env: Env) -> None:
    # Enrolled by serial alone (boot_assets/README.md: "enroll it with serial"), a Pi was
    # handed its firmware and a cmdline.txt whose config URL named 00-00-00-00-00-00: its
    # installer's config fetch was a 401 and its registration could never be taken.
    await env.seed()
    await env.post("/api/v1/machines", {"serial": "0a1b2c3d", "hostname": "pi-1",
                                        "profile": "k3os", "cluster": "edge"}, status=201)
    root = env.service.content.assets.roots[-1]
    (root / "rpi").mkdir()
    (root / "rpi" / "start4.elf").write_bytes(b"pi")
    content = env.service.content
    machine = await env.service.store.machine_by("serial", "0a1b2c3d")
    assert machine is not None
    for name in ("start4.elf", "cmdline.txt"):
        with pytest.raises(NotFound) as refused:
            await content.tftp_open(f"0a1b2c3d/{name}", PEER)
        assert str(refused.value) == (
            f"{machine.ref} (Raspberry Pi serial 0a1b2c3d) has no MAC enrolled: its "
            "installer's config and registration need one; add it: netboot machines set "
            f"{machine.ref} --add-mac MAC (on its label, or 'ip link' on the Pi)")
    resp = await env.client.patch(f"/api/v1/machines/{machine.id}",
                                  json={"macs": ["dc:a6:32:01:36:c2"]}, headers=env.auth)
    assert resp.status == 200, await resp.text()
    assert (await content.tftp_open("0a1b2c3d/start4.elf", PEER)).path is not None
    cmdline = await content.tftp_open("0a1b2c3d/cmdline.txt", PEER)
    assert cmdline.data is not None and b"/config/dc-a6-32-01-36-c2?token=" in cmdline.data


@pytest.mark.parametrize(("buildarch", "arch", "console"), [
    ("x86_64", "x86_64", "console=ttyS0 console=tty1"),
    ("i386", "x86", "console=ttyS0 console=tty1"),
    ("arm64", "arm64", "console=tty1 console=ttyAMA0"),
    ("arm32", "arm32", "console=tty1 console=ttyAMA0"),
    ("riscv64", "riscv64", "console=tty1 console=ttyS0"),
])
async def test_default_kernel_console_follows_the_architecture(
        env: Env, buildarch: str, arch: str, console: str) -> None:
    """The default command line names the UART the architecture has (PL011 ttyAMA0 on ARM,
    not the PC's ttyS0), in the iPXE script and in the pxelinux file U-Boot reads."""
    await env.seed()
    mac = "52:54:00:00:00:31"
    await env.post("/api/v1/machines", {"mac": mac, "profile": "k3os", "cluster": "edge"},
                   status=201)
    script = await boot(env, mac, arch=buildarch)
    kernel = next(line for line in script.splitlines() if line.startswith("kernel "))
    assert kernel.endswith(" " + console), kernel
    assert kernel.count("console=") == 2
    await env.post(f"/api/v1/machines/{mac}/reinstall", {}, status=200)
    store = env.service.store
    machine = await store.machine_by("mac", mac)
    assert machine is not None and machine.arch == Arch(arch)
    await store.update_machine(dataclasses.replace(machine, firmware=None))
    blob = await env.service.content.tftp_open("pxelinux.cfg/01-52-54-00-00-00-31", PEER)
    assert blob.data is not None
    append = next(line for line in blob.data.decode().splitlines()
                  if line.startswith("  APPEND "))
    assert append.endswith(" " + console), append


async def test_raspberry_pi_console_is_the_firmware_serial0_alias(env: Env) -> None:
    await env.seed()
    await env.post("/api/v1/machines", {"mac": "52:54:00:00:00:32", "profile": "k3os",
                                        "serial": "0a1b2c3d"}, status=201)
    store = env.service.store
    machine = await store.machine_by("mac", "52:54:00:00:00:32")
    assert machine is not None
    await store.update_machine(dataclasses.replace(machine, firmware=Firmware.RPI))
    blob = await env.service.content.tftp_open("0a1b2c3d/cmdline.txt", PEER)
    assert blob.data is not None
    assert blob.data.decode().rstrip("\n").endswith(" console=tty1 console=serial0,115200")


# -- GRUB (shim-grub chain): $prefix is /grub in Debian's signed netboot images -------------

async def test_grub_dispatch_then_per_machine_config(env: Env) -> None:
    await env.seed(cmdline="console=ttyS0 netboot.config={{ config_url }} x=$y;z")
    await env.post("/api/v1/machines", {"mac": "52:54:00:00:00:31", "hostname": "sb-1",
                                        "profile": "k3os", "cluster": "edge",
                                        "loader": "shim-grub"}, status=201)
    content = env.service.content
    top = (await content.tftp_open("grub/grub.cfg", PEER)).data
    assert top is not None and b"configfile $prefix/grub.cfg-01-$net_default_mac" in top
    with pytest.raises(NotFound):  # read first by the signed image, then grub.cfg
        await content.tftp_open("grub/x86_64-efi/grub.cfg", PEER)
    # $net_default_mac has colons; upstream GRUB's own search asks with dashes.
    for name in ("grub/grub.cfg-01-52:54:00:00:00:31", "grub/grub.cfg-01-52-54-00-00-00-31"):
        text = (await content.tftp_open(name, PEER)).data
        assert text is not None
        lines = text.decode().splitlines()
        linux = next(line for line in lines if line.startswith("linux "))
        # Single-quoted words: GRUB must not expand the $ or split at the ; of the cmdline.
        assert linux.startswith("linux '/vmlinuz' 'console=ttyS0' 'netboot.config=http")
        assert "'x=$y;z'" in linux and "?token=" in linux
        assert "initrd '/initrd.img'" in lines and lines[-1] == "boot"
    over_http = await content.grub_file("grub.cfg-01-52-54-00-00-00-31", PEER, "http")
    assert b"linux '/assets/vmlinuz'" in over_http
    await env.post("/api/v1/machines/52:54:00:00:00:31/events", {"kind": "installed"},
                   status=201)
    local = (await content.tftp_open("grub/grub.cfg-01-52-54-00-00-00-31", PEER)).data
    assert local is not None and b"netboot: booting from local disk" in local \
        and b"\nexit\n" in local and b"linux" not in local


async def test_grub_hold_rereads_its_file_and_unknown_exits(env: Env) -> None:
    await env.seed()
    await env.post("/api/v1/machines", {"mac": "52:54:00:00:00:32", "hostname": "sb-2",
                                        "profile": "k3os"}, status=201)
    machine = await env.service.store.machine_by("mac", "52:54:00:00:00:32")
    assert machine is not None
    await env.service.store.update_machine(dataclasses.replace(machine,
                                                               state=MachineState.FAILED))
    content = env.service.content
    held = (await content.tftp_open("grub/grub.cfg-01-52-54-00-00-00-32", PEER)).data
    assert held is not None
    assert b"sleep " in held and held.rstrip().endswith(
        b"configfile $prefix/grub.cfg-01-$net_default_mac")
    ignored = (await content.tftp_open("grub/grub.cfg-01-52-54-00-00-00-99", PEER)).data
    assert ignored is not None and ignored.rstrip().endswith(b"exit")



async def test_ipxe_script_is_kept_only_while_what_it_is_made_of_is_unchanged(
        env: Env) -> None:
    """render_ipxe keeps a script per NIC; any change to the plan (here the profile, as a
    profile edit gives it), the base URL or the template renders again; an install script
    (with its token) is kept only for the decision kept for its NIC (the next test)."""
    from netboot.model import BootAction, BootPlan, MacAddress, Profile

    content = env.service.content
    rendered: list[str] = []
    real, real_with = content._render.ipxe, content._render.ipxe_with
    inside: list[bool] = []

    # A script rendered is one call of ipxe or of ipxe_with (an install script's, whose
    # split form may answer without ipxe), whichever comes first.
    def counting(name: str, context: dict[str, object]) -> str:
        if not inside:
            rendered.append(name)
        return real(name, context)

    def counting_with(name: str, context: Callable[[object], dict[str, object]]) -> str:
        rendered.append(name)
        inside.append(True)
        try:
            return real_with(name, context)  # type: ignore[arg-type]
        finally:
            inside.pop()

    content._render.ipxe = counting  # type: ignore[method-assign]
    content._render.ipxe_with = counting_with  # type: ignore[method-assign]
    mac = MacAddress.parse("52:54:00:00:00:77")
    profile = Profile(name="p", kernel="vmlinuz")
    plan = BootPlan(BootAction.HOLD, mac, "held for a test", retry_seconds=15,
                    profile=profile)
    first = content.render_ipxe(plan)
    assert content.render_ipxe(dataclasses.replace(plan)) == first  # an equal plan
    assert len(rendered) == 1
    edited = dataclasses.replace(plan, profile=dataclasses.replace(profile, kernel="v2"))
    content.render_ipxe(edited)
    assert len(rendered) == 2
    other = dataclasses.replace(edited, reason="held for another reason")
    content.render_ipxe(other)
    assert len(rendered) == 3
    env.service.base_url = "http://192.0.2.99:8080"
    assert "192.0.2.99" in content.render_ipxe(other)
    assert len(rendered) == 4
    install = BootPlan(BootAction.INSTALL, mac, "install", profile=profile, token="tok")
    content.render_ipxe(install)
    content.render_ipxe(install)  # not the decision kept for its NIC (BootService.repeated)
    assert len(rendered) == 6


async def test_an_install_script_is_made_of_the_names_its_template_reads(env: Env) -> None:
    """An install script (and its command line) renders from a context of the names its
    template and command line read: the same text as the whole context gives."""
    from netboot.model import BootAction, BootRequest, MacAddress

    await env.seed(cmdline="nb.cfg={{ config_url }} nb.ev={{ events_url }}")
    await env.post("/api/v1/machines", {"mac": "52:54:00:00:00:41"}, status=201)
    content = env.service.content
    made: list[frozenset[str] | None] = []
    real = content.context

    def context(plan: object, **kw: object) -> dict[str, object]:
        made.append(kw.get("names"))  # type: ignore[arg-type]
        return real(plan, **kw)  # type: ignore[arg-type]

    content.context = context  # type: ignore[method-assign,assignment]
    plan, text = await content.ipxe_script(BootRequest(
        mac=MacAddress.parse("52:54:00:00:00:41"), arch=Arch.X86_64,
        firmware=Firmware.IPXE, via="http", remote_addr="192.0.2.9"))
    assert plan.action == BootAction.INSTALL, plan.reason
    assert made and made[-1] is not None and "k3s" not in made[-1]  # not the whole context
    assert text == content._render.ipxe("ipxe/install.ipxe", real(plan))
    assert f"nb.cfg={env.service.base_url}/config/52-54-00-00-00-41?token={plan.token}" in text
    assert "nb.ev=" in text and "/api/v1/machines/52-54-00-00-00-41/events" in text


async def test_a_context_of_names_has_each_name_read_as_the_whole_context_has_it(
        env: Env) -> None:
    """Content.context for the names a template reads gives each of them the whole
    context's value; the config URL, serial and profile files no name reads are not made (a
    k3OS config reads none of them)."""
    from netboot.model import BootAction, BootRequest, MacAddress

    await env.seed()
    await env.post("/api/v1/machines", {"mac": "52:54:00:00:00:44"}, status=201)
    content = env.service.content
    plan, _ = await content.ipxe_script(BootRequest(
        mac=MacAddress.parse("52:54:00:00:00:44"), arch=Arch.X86_64,
        firmware=Firmware.IPXE, via="http", remote_addr="192.0.2.9"))
    assert plan.action == BootAction.INSTALL and plan.token, plan.reason
    whole = content.context(plan, cmdline=False)
    optional = {"config_url", "instance_serial", "kernel_url", "initrd_urls", "initrd_names",
                "kernel_path", "initrd_paths"}
    assert whole.keys() >= optional
    for read in [*({name} for name in optional), {"config_url", "kernel_path", "mac"},
                 {"instance_serial", "plan"}]:
        names = frozenset(read)
        ctx = content.context(plan, cmdline=False, names=names)
        assert {name: ctx[name] for name in names} == {name: whole[name] for name in names}
        # Made only where read (the profile's files together: made once per profile).
        files = optional - {"config_url", "instance_serial"}
        assert ctx.keys() & optional == (names & optional) | (files if names & files else set())
    config = content.context(plan, names=content._render.reads("cloud-config/k3os.yaml")[1])
    assert not config.keys() & optional


def test_a_machine_read_key_by_key_is_given_those_keys_as_the_whole_has_them() -> None:
    """Content.context's machine for a template that reads only some of its plain keys has
    those keys, with machine_to_dict's values; any other key read, or a use of the whole,
    gets the whole dict (without the secrets)."""
    from netboot.content import _PLAIN_KEYS, _machine_dict, _machine_keys
    from netboot.inventory.codec import machine_to_dict
    from netboot.model import MacAddress, Machine, Role

    def given(machine: Machine, names: frozenset[str] | None) -> dict[str, object]:
        return _machine_dict(machine, None if names is None else _machine_keys(names))

    machine = Machine(macs=(MacAddress.parse("52:54:00:00:00:43"),), hostname="n-1",
                      uuid="u", serial="s", asset="a", labels={"l": "1"}, cluster="edge",
                      role=Role.SERVER, profile="k3os", arch=Arch.X86_64, ipv4="192.0.2.1",
                      fixed_ipv4="192.0.2.2", facts={"f": "1"}, token_hash="h",
                      token_expires=5.0, install_token="secret", created=1.0, updated=2.0)
    whole = machine_to_dict(machine, secrets=False)
    assert whole.keys() >= _PLAIN_KEYS
    for key in _PLAIN_KEYS:
        got = given(machine, frozenset({"machine", f"machine.{key}"}))
        assert got == {key: whole[key]}, key
    got = given(machine, frozenset({"machine", "machine.hostname", "machine.uuid"}))
    assert got == {"hostname": "n-1", "uuid": "u"}
    for names in (None, frozenset({"machine", "machine.hostname", "machine.*"}),
                  frozenset({"machine", "machine.hostname", "machine.labels"}),
                  frozenset({"machine", "machine.install_token"}),
                  frozenset({"machine", "machine.nothing"})):
        assert given(machine, names) == whole, names


async def test_an_install_script_is_given_the_machine_keys_it_reads(env: Env) -> None:
    """The shipped install script reads the machine's hostname alone: its context's machine
    is that key, and the script is the one the whole context gives."""
    from netboot.model import BootAction, BootRequest, MacAddress

    await env.seed()
    await env.post("/api/v1/machines", {"mac": "52:54:00:00:00:44", "hostname": "n-44"},
                   status=201)
    content = env.service.content
    made: list[dict[str, object]] = []
    real = content.context

    def context(plan: object, **kw: object) -> dict[str, object]:
        made.append(real(plan, **kw))  # type: ignore[arg-type]
        return made[-1]

    content.context = context  # type: ignore[method-assign,assignment]
    plan, text = await content.ipxe_script(BootRequest(
        mac=MacAddress.parse("52:54:00:00:00:44"), arch=Arch.X86_64,
        firmware=Firmware.IPXE, via="http", remote_addr="192.0.2.9"))
    assert plan.action == BootAction.INSTALL, plan.reason
    assert made and made[-1]["machine"] == {"hostname": "n-44"}
    assert "installing n-44 " in text
    assert text == content._render.ipxe("ipxe/install.ipxe", real(plan))


def _counting_renders(env: Env) -> list[str]:
    """The install scripts rendered from now on (each call of the renderer's ipxe_with, the
    way a first install's script is rendered), by template name."""
    renderer = env.service.content._render
    rendered: list[str] = []
    real = renderer.ipxe_with

    def counting(name: str, context: Callable[[object], dict[str, object]]) -> str:
        rendered.append(name)
        return real(name, context)  # type: ignore[arg-type]

    renderer.ipxe_with = counting  # type: ignore[method-assign]
    return rendered


async def _first_install(env: Env, mac: str, arch: Arch = Arch.X86_64,
                         ) -> tuple[str, str]:
    """A first install's script, and the script the whole context renders for its plan."""
    from netboot.model import BootAction, BootRequest, MacAddress

    content = env.service.content
    plan, text = await content.ipxe_script(BootRequest(
        mac=MacAddress.parse(mac), arch=arch, firmware=Firmware.IPXE, via="http",
        remote_addr="192.0.2.9"))
    assert plan.action == BootAction.INSTALL and plan.token, plan.reason
    return text, content._render.ipxe(f"ipxe/{plan.action}.ipxe", content.context(plan))


async def _first_installs_as_rendered(env: Env, macs: list[str]) -> list[str]:
    """Each machine's first install script, in turn, each the text the whole context
    renders for its plan."""
    texts = []
    for mac in macs:
        text, whole = await _first_install(env, mac)
        assert text == whole, mac
        texts.append(text)
    return texts


async def test_first_install_scripts_of_one_shape_are_its_frame_filled_in_as_rendered(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """A storm's first installs share a few script shapes (a template, command line,
    profile, reason, base URL, CA and console, and whether the machine has a hostname: not
    its cluster, which the script does not read): the first of a shape is rendered, the
    others are its frame with their MAC, token and hostname put in (Content._framed), no
    render. Each is the text the whole context renders; an edit of the template, of the
    profile or of the base URL is in the next one."""
    env, own, shipped = await own_template(make_env, tmp_path, "ipxe/install.ipxe")
    await env.seed()
    await env.post("/api/v1/clusters", {"name": "core", "server_url": "https://192.0.2.51:6443",
                                        "token": "k3s-secret-token"}, status=201)
    machines = [("52:54:00:00:05:01", "n-1", Arch.X86_64), ("52:54:00:00:05:02", "n-2",
                                                             Arch.X86_64),
                ("52:54:00:00:05:03", None, Arch.X86_64), ("52:54:00:00:05:04", None,
                                                            Arch.X86_64),
                ("52:54:00:00:05:05", "n-5", Arch.ARM64), ("52:54:00:00:05:06", "n-6",
                                                            Arch.ARM64),
                ("52:54:00:00:05:07", "n-7", Arch.X86_64), ("52:54:00:00:05:08", "n-8",
                                                            Arch.X86_64),
                ("52:54:00:00:05:09", "n-9", Arch.X86_64), ("52:54:00:00:05:0a", "n-10",
                                                            Arch.X86_64)]
    store = env.service.store
    for mac, hostname, _ in machines:
        body: dict[str, object] = {"mac": mac, "profile": "k3os",
                                   "cluster": "core" if mac.endswith(("2", "6")) else "edge"}
        if hostname is not None:
            body["hostname"] = hostname
        await env.post("/api/v1/machines", body, status=201)
        if hostname is None:  # enrolled with a name of enroll.hostname_template's: none
            machine = await store.machine_by("mac", mac)
            assert machine is not None and machine.hostname
            await store.update_machine(dataclasses.replace(machine, hostname=None))
    rendered = _counting_renders(env)
    tokens = set()
    for i, (mac, hostname, arch) in enumerate(machines[:6]):
        text, whole = await _first_install(env, mac, arch)
        assert text == whole, mac
        assert f"installing {hostname or mac} " in text
        tokens.add(install_token(text))
        # The first of each shape (hostname, none; another console) rendered: three times,
        # its frame's two marked renders (two sets of marks: a letter of a value printed
        # is not a frame's) and its own; the second of each filled in.
        assert len(rendered) == (i // 2 + 1) * 3, (mac, rendered)
    assert len(tokens) == 6
    text, whole = await _first_install(env, machines[6][0])  # a known shape: filled in
    assert text == whole and len(rendered) == 9
    own.write_text(shipped + "# edited by the operator\n")
    os.utime(own, (1, 1))  # another mtime, whatever the clock's resolution
    text, whole = await _first_install(env, machines[7][0])
    assert text == whole and text.endswith("# edited by the operator\n")
    r = await call(env, "PUT", "/api/v1/profiles/k3os", json_body={"kernel": "vmlinuz-2"})
    assert r.status == 200, r.text
    text, whole = await _first_install(env, machines[8][0])
    assert text == whole and "/assets/vmlinuz-2" in text
    env.service.base_url = "http://192.0.2.98:8080"
    text, whole = await _first_install(env, machines[9][0])
    assert text == whole and "http://192.0.2.98:8080/assets/vmlinuz-2" in text
    assert len(rendered) == 18  # each change rendered its new shape once (and twice marked)


async def test_an_install_script_of_a_stored_empty_hostname_is_not_none_s_frame(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """A hostname "" (never the API's, but a restored backup's or hand SQL's: the codec
    reads it as it is) prints otherwise than None (Jinja prints None as "None"): a script
    framed from one is not the other's, each the text the whole context renders."""
    env, own, shipped = await own_template(make_env, tmp_path, "ipxe/install.ipxe")
    own.write_text(shipped + "# host {{ machine.hostname }}\n")
    await env.seed()
    macs = [f"52:54:00:00:09:{i:02x}" for i in range(1, 4)]
    store = env.service.store
    for i, mac in enumerate(macs):  # the second stored with "" (one machine may: the
        await env.post("/api/v1/machines", {"mac": mac}, status=201)  # store's hostnames
        machine = await store.machine_by("mac", mac)  # are unique), the others with None
        assert machine is not None
        await store.update_machine(dataclasses.replace(
            machine, hostname="" if i == 1 else None))
    for i, mac in enumerate(macs):
        text, whole = await _first_install(env, mac)
        assert text == whole, mac
        assert text.endswith("# host \n" if i == 1 else "# host None\n"), mac


async def test_a_hostname_that_prints_otherwise_than_itself_is_rendered_not_filled_in(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """As a token's: a stored hostname of other characters than a frame's (hand SQL's or a
    restored backup's; the API takes RFC 1123 names only): escaped by tojson, its spaces
    folded by the command line's split, a letter outside ASCII. Its script is rendered, as
    the whole context gives it; plain ones around it are their shape's frame filled in
    (Content._framed looks at the hostname and the token in one go, as _config_framed)."""
    env, own, shipped = await own_template(make_env, tmp_path, "ipxe/install.ipxe")
    own.write_text(shipped + "# {{ machine.hostname | tojson }}\n")
    await env.seed(cmdline="nb.h={{ machine.hostname }} nb.c={{ config_url }}")
    names = ["plain-0", "plain-1", 'quoted"<2', "spaced  3", "h\u00f6st-4", "plain-5",
             "tab\t6", "plain:7.x_"]
    macs = [f"52:54:00:00:0b:{i:02x}" for i in range(1, len(names) + 1)]
    store = env.service.store
    for mac, name in zip(macs, names, strict=True):
        await env.post("/api/v1/machines", {"mac": mac}, status=201)
        machine = await store.machine_by("mac", mac)
        assert machine is not None
        await store.update_machine(dataclasses.replace(machine, hostname=name))
    rendered = _counting_renders(env)
    texts = await _first_installs_as_rendered(env, macs)
    assert texts[2].endswith('# "quoted\\"\\u003c2"\n') and "nb.h=spaced 3 " in texts[3]
    assert texts[4].endswith('# "h\\u00f6st-4"\n') and texts[7].endswith('# "plain:7.x_"\n')
    # The shape's frame (its two marked renders and its own), then each of the four
    # hostnames a frame cannot hold rendered; the four plain ones after the first filled in.
    assert len(rendered) == 3 + 4


@pytest.mark.parametrize("line", ["# {{ machine.hostname[0] }}\n",
                                  "# {{ machine.hostname[0] ~ mac[0] }}\n"])
async def test_an_install_script_printing_a_letter_of_a_value_is_never_anothers_frame(
        make_env: EnvFactory, tmp_path: Path, line: str) -> None:
    """A template printing one letter of a value (a constant subscript, which the split's
    proof lets through): every mark starts with 'n', so where the first machine's hostname
    began with 'n' too the frame's check held and the next machines got its 'n' (s43-config
    found it in config frames). Each script is the text the whole context renders."""
    env, own, shipped = await own_template(make_env, tmp_path, "ipxe/install.ipxe")
    own.write_text(shipped + line)
    await env.seed()
    macs = [f"52:54:00:00:0a:{i:02x}" for i in range(1, 5)]
    for i, mac in enumerate(macs):
        await env.post("/api/v1/machines", {"mac": mac, "hostname": "n-1" if i == 0
                                            else f"k-{i}"}, status=201)
    for mac in macs:
        text, whole = await _first_install(env, mac)
        assert text == whole, mac


async def test_an_install_script_that_reads_a_machines_value_otherwise_is_rendered_each_time(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """Where the template does more with a per-machine value than print it (a test of the
    MAC), no frame stands for its scripts: each is rendered, as the whole context gives it."""
    env, own, shipped = await own_template(make_env, tmp_path, "ipxe/install.ipxe")
    own.write_text(shipped + "{% if mac.endswith('1') %}# one\n{% endif %}")
    await env.seed()
    # The first not one the test is true of: its frame would hold for it, not the others.
    macs = [f"52:54:00:00:06:{i}" for i in ("02", "03", "11", "21")]
    for mac in macs:
        await env.post("/api/v1/machines", {"mac": mac}, status=201)
    rendered = _counting_renders(env)
    for mac in macs:
        text, whole = await _first_install(env, mac)
        assert text == whole and text.endswith("# one\n") == mac.endswith("1"), mac
    # Each rendered; the first three times (its frame tried: its two marked renders, then
    # refused).
    assert rendered == ["ipxe/install.ipxe"] * (len(macs) + 2)


async def test_an_install_script_reading_a_name_frames_do_not_know_is_rendered_each_time(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """A context name a frame has no place for and does not know to be shared (one added
    later: here a machine's own, given by a wrapped context) keeps its template without
    frames: a frame would hold the value of the machine it was made for, which the check
    against that machine's own render cannot see."""
    env, own, shipped = await own_template(make_env, tmp_path, "ipxe/install.ipxe")
    own.write_text(shipped + "# {{ site_name }}\n")
    await env.seed()
    macs = [f"52:54:00:00:08:{i:02x}" for i in range(1, 4)]
    for mac in macs:
        await env.post("/api/v1/machines", {"mac": mac}, status=201)
    content = env.service.content
    real = content.context

    def context(plan: object, **kw: object) -> dict[str, object]:
        made = real(plan, **kw)  # type: ignore[arg-type]
        made["site_name"] = f"site-of-{made['mac']}" if "stand_in" not in kw else (
            f"site-of-{plan.mac}")  # type: ignore[attr-defined]
        return made

    content.context = context  # type: ignore[method-assign,assignment]
    for mac in macs:
        text, whole = await _first_install(env, mac)
        assert text == whole and text.endswith(f"# site-of-{mac}\n"), mac


async def test_a_token_that_prints_otherwise_than_itself_is_rendered_not_filled_in(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """A frame's values are put in as they are: a token of other characters (a token source
    of the operator's own, escaped by tojson; spaces the command line's words fold) is
    rendered, as the whole context gives it."""
    env, own, shipped = await own_template(make_env, tmp_path, "ipxe/install.ipxe")
    own.write_text(shipped + "# {{ token | tojson }}\n")
    await env.seed(cmdline="nb.t={{ token }} nb.c={{ config_url }}")
    macs = [f"52:54:00:00:07:{i:02x}" for i in range(1, 6)]
    for mac in macs:
        await env.post("/api/v1/machines", {"mac": mac}, status=201)
    given = iter(["plain-0", "plain-1", 'quoted"<2', "spaced  3", "plain-4"])
    env.service.boot._new_token = given.__next__  # type: ignore[method-assign]
    rendered = _counting_renders(env)
    texts = await _first_installs_as_rendered(env, macs)
    assert texts[2].endswith('# "quoted\\"\\u003c2"\n') and "nb.t=spaced 3 " in texts[3]
    assert len(rendered) == 3 + 1 + 1  # the shape's (two marked), then each of the two tokens'


async def test_an_operators_install_script_gets_every_name_it_reads(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """An operator's install template that reads more than the shipped one (the join, the
    register command, the CA, the cluster) is given those too."""
    from netboot.model import BootRequest, MacAddress

    own_env, own, shipped = await own_template(make_env, tmp_path, "ipxe/install.ipxe")
    own.write_text(shipped + "# {{ k3s.token }} {{ register_command | length > 0 }}"
                   " {{ ca_pem is string }} {{ cluster.name }}\n")
    await own_env.seed()
    await own_env.post("/api/v1/machines", {"mac": "52:54:00:00:00:42"}, status=201)
    plan, text = await own_env.service.content.ipxe_script(BootRequest(
        mac=MacAddress.parse("52:54:00:00:00:42"), arch=Arch.X86_64,
        firmware=Firmware.IPXE, via="http", remote_addr="192.0.2.9"))
    assert text.endswith("# k3s-secret-token True True edge\n")
    assert text == own_env.service.content._render.ipxe(
        "ipxe/install.ipxe", own_env.service.content.context(plan))


async def own_template(make_env: EnvFactory, tmp_path: Path, name: str,
                       ) -> tuple[Env, Path, str]:
    """A server whose template directory overrides ``name`` with a copy of the shipped file:
    (the server, the operator's file, the shipped text)."""
    own = tmp_path / "own-templates" / name
    own.parent.mkdir(parents=True)
    shipped = (Path(__file__).parent.parent / "templates" / name).read_text()
    own.write_text(shipped)
    env = await make_env(f"templates:\n  dir: {tmp_path / 'own-templates'}\n")
    return env, own, shipped


async def test_bootstrap_script_is_rendered_again_only_when_its_template_or_url_change(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """Every device asks /boot.ipxe first: kept, but never stale after an edit of the
    template file (an operator's override) or of the base URL."""
    env, own, shipped = await own_template(make_env, tmp_path, "ipxe/boot.ipxe")
    content = env.service.content
    first = content.bootstrap_ipxe()
    assert content.bootstrap_ipxe() is first  # kept
    own.write_text(shipped + "# edited by the operator\n")
    os.utime(own, (1, 1))  # another mtime, whatever the clock's resolution
    assert content.bootstrap_ipxe().endswith("# edited by the operator\n")
    env.service.base_url = "http://192.0.2.99:8080"
    assert "http://192.0.2.99:8080/ipxe?" in content.bootstrap_ipxe()


async def test_a_bootstrap_override_made_after_start_is_served_at_once(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """An operator's new ipxe/boot.ipxe, made in templates.dir while the server runs, is what
    the next /boot.ipxe gets: the script kept from the shipped file is not served again (a
    file's mtime never shows a new file earlier in the search path; the watch does)."""
    own_dir = tmp_path / "own-templates"
    own_dir.mkdir()
    env = await make_env(f"templates:\n  dir: {own_dir}\n")
    resp = await env.client.get("/boot.ipxe")
    shipped = await resp.text()
    assert resp.status == 200 and shipped.startswith("#!ipxe")
    assert await (await env.client.get("/boot.ipxe")).text() == shipped
    (own_dir / "ipxe").mkdir()
    (own_dir / "ipxe" / "boot.ipxe").write_text("#!ipxe\nchain {{ base_url }}/own\n")
    resp = await env.client.get("/boot.ipxe")
    assert await resp.text() == "#!ipxe\nchain http://192.0.2.10:8080/own\n"
    (own_dir / "ipxe" / "boot.ipxe").unlink()  # the shipped file again
    assert await (await env.client.get("/boot.ipxe")).text() == shipped


async def test_default_cmdline_file_is_read_again_when_it_changes(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """The default kernel command line (cmdline/k3os.txt) is rendered into every install
    script and config: kept, but an operator's edit of the file shows in the next one."""
    from netboot.model import BootAction, BootPlan, MacAddress, Profile

    env, own, shipped = await own_template(make_env, tmp_path, "cmdline/k3os.txt")
    content = env.service.content
    plan = BootPlan(BootAction.INSTALL, MacAddress.parse("52:54:00:00:00:78"), "install",
                    profile=Profile(name="p", kernel="vmlinuz"), token="tok")
    first = content.context(plan)["cmdline"]
    assert content.context(plan)["cmdline"] == first
    own.write_text(shipped.rstrip("\n") + " netboot.edited=1\n")
    os.utime(own, (1, 1))  # another mtime, whatever the clock's resolution
    assert content.context(plan)["cmdline"] == first + " netboot.edited=1"
    own.unlink()  # the shipped file again
    assert content.context(plan)["cmdline"] == first


async def test_an_install_asked_again_gets_its_script_as_everything_it_is_made_of_is_now(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """An install under way asked again gets the script kept from its last ask only while
    nothing it is made of changed: an edit of its profile, of its machine, of the base URL,
    of the default command line file or of the install template is in the next answer."""
    from tests.conftest import call, install_token

    env, own, shipped = await own_template(make_env, tmp_path, "cmdline/k3os.txt")
    own_install = tmp_path / "own-templates" / "ipxe" / "install.ipxe"
    own_install.parent.mkdir()
    own_install.write_text((Path(__file__).parent.parent / "templates" / "ipxe"
                            / "install.ipxe").read_text())
    await env.seed()
    await env.post("/api/v1/machines", {"mac": "52:54:00:00:00:79"}, status=201)
    from netboot.model import MacAddress

    mac = MacAddress.parse("52:54:00:00:00:79")

    async def kept() -> str:
        """The script once its install's decision is the one kept for the NIC (its note
        stored), asked again: the text kept with it."""
        for _ in range(2):
            text = await boot(env, str(mac))
            await env.service.boot.drain()
        assert await boot(env, str(mac)) == text
        assert env.service.content._installs[mac][2] == text
        return text

    await env.service.boot.load_view()  # as serve does: decisions kept from a loaded view
    token = install_token(await boot(env, str(mac)))  # the install begins
    again = await kept()
    assert install_token(again) == token

    r = await call(env, "PUT", "/api/v1/profiles/k3os", json_body={"kernel": "vmlinuz-2"})
    assert r.status == 200, r.text
    assert "/assets/vmlinuz-2" in await boot(env, str(mac))
    edited = await kept()
    assert "/assets/vmlinuz-2" in edited and install_token(edited) == token

    r = await call(env, "PATCH", "/api/v1/machines/52-54-00-00-00-79",
                   json_body={"hostname": "renamed-node"})
    assert r.status == 200, r.text
    assert "renamed-node" in await boot(env, str(mac))  # in the script
    assert "renamed-node" in await kept()

    # The rest leaves the decision as it is: what else the script is made of.
    env.service.base_url = "http://192.0.2.98:8080"
    assert "http://192.0.2.98:8080/assets/vmlinuz-2" in await boot(env, str(mac))
    await kept()
    own.write_text(shipped.rstrip("\n") + " netboot.edited=1\n")
    os.utime(own, (1, 1))  # another mtime, whatever the clock's resolution
    assert "netboot.edited=1" in await boot(env, str(mac))
    await kept()
    own_install.write_text(own_install.read_text() + "# edited by the operator\n")
    os.utime(own_install, (1, 1))
    assert (await boot(env, str(mac))).endswith("# edited by the operator\n")
    assert len(env.service.content._installs) == 1


async def test_the_servers_renderer_splits_scripts_around_per_machine_values(env: Env) -> None:
    """serve's scripts and command lines are rendered once per profile and reason, each
    machine's values filled in (tests/test_render.py shows the text is the same)."""
    from netboot.content import PER_MACHINE

    assert env.service.content._render.volatile == PER_MACHINE


async def test_a_profiles_context_values_follow_the_profile_and_the_base_url(env: Env) -> None:
    """The profile's and cluster's context values are made once per object (the view's,
    replaced by every edit) and base URL: an edited profile, another base URL, another
    cluster each give their own, equal to what a context made from scratch holds."""
    from netboot.inventory.codec import cluster_to_dict, profile_to_dict
    from netboot.model import BootAction, BootPlan, Cluster, MacAddress, Profile

    content = env.service.content
    mac = MacAddress.parse("52:54:00:00:00:79")
    profile = Profile(name="p", kernel="storm/vmlinuz", initrds=("storm/initrd", "a b/x.img"))
    plan = BootPlan(BootAction.INSTALL, mac, "install", profile=profile, token="tok",
                    cluster=Cluster(name="edge", token="secret"))

    def expected(plan: BootPlan) -> dict[str, object]:
        base, p = env.service.base_url, plan.profile
        assert p is not None and plan.cluster is not None
        return {"profile": profile_to_dict(p), "cluster": cluster_to_dict(plan.cluster,
                                                                          secrets=False),
                "kernel_url": content.urls.asset(p.kernel), "kernel_path": p.kernel,
                "initrd_urls": [content.urls.asset(i) for i in p.initrds],
                "initrd_names": [i.rsplit("/", 1)[-1] for i in p.initrds],
                "initrd_paths": list(p.initrds), "base_url": base}

    def made(plan: BootPlan) -> dict[str, object]:
        ctx = content.context(plan)
        return {k: ctx[k] for k in expected(plan)}

    assert made(plan) == expected(plan)
    assert content.context(plan)["profile"] is content.context(plan)["profile"]  # kept
    edited = dataclasses.replace(plan, profile=dataclasses.replace(profile, kernel="v2",
                                                                   initrds=()))
    assert made(edited) == expected(edited) != expected(plan)
    env.service.base_url = "http://192.0.2.99:8080"
    assert made(plan) == expected(plan) and "192.0.2.99" in str(made(plan)["kernel_url"])
    other = dataclasses.replace(plan, cluster=Cluster(name="core", token="s2"))
    assert made(other) == expected(other) != expected(plan)
    assert "secret" not in str(content.context(plan)["cluster"])


async def test_an_install_plans_context_dict_is_made_once_per_reason(env: Env) -> None:
    """An install's ``plan`` context dict is made once per reason and retry and frozen
    (Content._plan_dict), so that its script's split render finds it again by identity;
    another reason gives its own, and so does a retry of another type (a bool equals an
    int but prints otherwise); any other plan's (a hold's, whose reason may name the
    machine) is made for it and never frozen. Each holds what its plan says, and the
    scripts follow the reason."""
    from netboot import content as content_module
    from netboot import model
    from netboot.model import BootAction, BootPlan, MacAddress, Profile

    content = env.service.content
    frozen = content._render._frozen
    # A partial mypyc build (content.py compiled, model.py not: how a change of content.py
    # is compiled alone to test it) reads a Python BootPlan's ``retry_seconds`` as its
    # declared int, so a bool given is 1 there, where the plan keeps True: the whole build
    # and the interpreted one agree with the plan (s42-review; every partial build failed
    # here from s31 on, each session finding it again).
    partial = (content_module.__file__ or "").endswith(".so") and not (
        model.__file__ or "").endswith(".so")
    mac = MacAddress.parse("52:54:00:00:00:7a")
    profile = Profile(name="p", kernel="storm/vmlinuz", initrds=("storm/initrd",))

    def plan(reason: str, action: BootAction = BootAction.INSTALL,
             retry: int = 0) -> dict[str, object]:
        made = BootPlan(action, mac, reason, retry_seconds=retry, profile=profile, token="tok")
        got: dict[str, object] = content.context(made)["plan"]
        # (A compiled BootPlan keeps a bool given as an int; a compiled content reads it so.)
        kept = int(made.retry_seconds) if partial else made.retry_seconds
        assert got == {"action": str(action), "reason": reason, "retry_seconds": kept,
                       "command": None} and type(got["retry_seconds"]) is type(kept)
        return got

    new = plan("new: install profile p")
    assert plan("new: install profile p") is new and id(new) in frozen
    again = plan("installing: install profile p")
    assert again is not new and id(again) in frozen
    one = plan("new: install profile p", retry=1)
    assert plan("new: install profile p", retry=1) is one
    as_bool = plan("new: install profile p", retry=True)  # its own, where the plan keeps it
    assert (as_bool is one) == (type(as_bool["retry_seconds"]) is int)
    held = plan("held: 52:54:00:00:00:7a", BootAction.HOLD, 15)
    assert plan("held: 52:54:00:00:00:7a", BootAction.HOLD, 15) is not held
    assert id(held) not in frozen
    scripts = [content.render_ipxe(BootPlan(BootAction.INSTALL, mac, reason, profile=profile,
                                            token="tok"))
               for reason in ("new: install profile p", "installing: install profile p")]
    assert "(new: install profile p)" in scripts[0]
    assert "(installing: install profile p)" in scripts[1]


async def test_a_kept_config_is_rendered_again_when_its_template_file_changes(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """An installer's retry gets the config kept from its last fetch (Content._config) only
    while the template file is unchanged: an operator's edit is what the next fetch gets."""
    from tests.conftest import call, install_token

    env, own, shipped = await own_template(make_env, tmp_path, "cloud-config/k3os.yaml")
    await env.seed()
    await env.post("/api/v1/machines", {"mac": "52:54:00:00:00:78"}, status=201)
    token = install_token(await boot(env, "52:54:00:00:00:78"))
    path = f"/config/52-54-00-00-00-78?token={token}"

    async def fetch() -> str:
        r = await call(env, "GET", path, admin=False)
        assert r.status == 200, r.text
        return r.body.decode()

    await fetch()  # booting -> installing
    kept = await fetch()
    assert await fetch() == kept
    own.write_text(shipped + "# edited by the operator\n")
    os.utime(own, (1, 1))  # another mtime, whatever the clock's resolution
    assert await fetch() == kept + "# edited by the operator\n"


async def test_the_urls_follow_the_base_url(env: Env) -> None:
    """Content.urls is made again when the base URL changes (kept while it does not): the
    next script or config carries the new one."""
    content = env.service.content
    assert content.urls is content.urls
    assert content.urls.asset("k/vmlinuz") == f"{env.service.base_url}/assets/k/vmlinuz"
    env.service.base_url = "http://192.0.2.99:8080"
    assert content.urls.base == "http://192.0.2.99:8080"
    assert content.urls.asset("k/vmlinuz") == "http://192.0.2.99:8080/assets/k/vmlinuz"


async def test_the_machine_keys_found_once_per_set_of_names_are_each_sets_own(env: Env) -> None:
    """Content's machine keys are found once per set of names a template reads (with its
    command line's: Content._wanted): each set asked in turn gets what _machine_dict gives
    for it."""
    from netboot.content import _machine_dict, _machine_keys
    from netboot.inventory.codec import machine_to_dict
    from netboot.model import MacAddress, Machine

    machine = Machine(macs=(MacAddress.parse("52:54:00:00:00:44"),), hostname="n-2",
                      uuid="u", labels={"l": "1"})
    content = env.service.content
    sets = [frozenset({"machine", "machine.hostname"}), frozenset({"machine", "machine.uuid"}),
            frozenset({"machine", "machine.labels"}), frozenset({"machine"})]
    for _ in range(2):
        for names in sets:
            assert _machine_dict(machine, content._wanted(names, None).machine_keys) == \
                _machine_dict(machine, _machine_keys(names))
    assert _machine_dict(machine, content._wanted(None, None).machine_keys) == \
        machine_to_dict(machine, secrets=False)


async def test_a_contexts_shared_values_follow_the_ca_profile_cluster_and_base_url(
        env: Env) -> None:
    """The values of a context no machine has of its own (the base URL, the profile's dict
    and files, the plan's, the CA, the cluster's) are made once per template's names and
    the objects they come from (Content._shared), and shared by the next machine's; a new
    CA, an edited profile, another cluster or base URL each give the context a context made
    from nothing gives, for a k3OS config's names (with the CA) and an install script's
    (with its command line's)."""
    from netboot.content import Trust
    from netboot.model import BootAction, BootPlan, Cluster, K3sJoin, MacAddress, Profile, Role

    content = env.service.content
    config = content._render.reads("cloud-config/k3os.yaml")[1]
    script = content._render.reads("ipxe/install.ipxe")[1]
    assert config is not None and script is not None and "ca_pem" in config
    profile = Profile(name="p", kernel="storm/vmlinuz", initrds=("storm/initrd",))
    trust = Trust("https://192.0.2.10:8443", "PEM-1", "AA:01")
    content._trust = lambda: trust
    join = K3sJoin(Role.AGENT, "https://192.0.2.20:6443", False, "secret", node_name="n")
    edge = Cluster(name="edge", token="secret")  # the view's object: the same for each

    def plan(mac: str, **changes: object) -> BootPlan:
        made = BootPlan(BootAction.INSTALL, MacAddress.parse(mac), "new: install profile p",
                        profile=profile, token="tok-" + mac[-2:],
                        cluster=edge, k3s=join)
        return dataclasses.replace(made, **changes) if changes else made

    def fresh(p: BootPlan, names: frozenset[str]) -> dict[str, object]:
        content._wants.clear()  # nothing kept: made from nothing
        return content.context(p, names=names)

    base = env.service.base_url
    for names in (config, script):
        content._wants.clear()
        first = content.context(plan("52:54:00:00:01:01"), names=names)
        second = content.context(plan("52:54:00:00:01:02"), names=names)
        assert second["profile"] is first["profile"] and second["mac"] != first["mac"]
        assert second == fresh(plan("52:54:00:00:01:02"), names)
        content._wants.clear()
        content.context(plan("52:54:00:00:01:01"), names=names)  # kept for what follows
        trust = Trust("https://192.0.2.11:8443", "PEM-2", "AA:02")  # a new CA
        got = content.context(plan("52:54:00:00:01:03"), names=names)
        assert got == fresh(plan("52:54:00:00:01:03"), names)
        assert ("ca_pem" in names) == (got.get("ca_pem") == "PEM-2")
        profile = dataclasses.replace(profile, kernel="v2")  # an edited profile
        got = content.context(plan("52:54:00:00:01:04"), names=names)
        assert got == fresh(plan("52:54:00:00:01:04"), names)
        other = plan("52:54:00:00:01:05", cluster=Cluster(name="core", token="s2"))
        assert content.context(other, names=names) == fresh(other, names)
        content.context(plan("52:54:00:00:01:06"), names=names)
        env.service.base_url = "http://192.0.2.99:8080"
        got = content.context(plan("52:54:00:00:01:07"), names=names)
        assert got == fresh(plan("52:54:00:00:01:07"), names)
        assert "192.0.2.99" in str(got.get("kernel_url", got["base_url"]))
        env.service.base_url = base
    # The whole context (no names) too: what a hold's and pxelinux's renders are given.
    content.context(plan("52:54:00:00:01:08"))
    trust = Trust("https://192.0.2.12:8443", "PEM-3", "AA:03")
    assert content.context(plan("52:54:00:00:01:09"))["ca_pem"] == "PEM-3"
    other = plan("52:54:00:00:01:0a", cluster=Cluster(name="core", token="s2"))
    assert content.context(other)["cluster"]["name"] == "core"
    assert content.context(plan("52:54:00:00:01:0b"))["cluster"]["name"] == "edge"


async def test_a_config_read_through_the_store_is_planned_from_a_view_as_new_as_its_machine(
        env: Env) -> None:
    """Until the view is loaded (start-up, a storm's first configs), a MAC it never saw is
    read through the store: a wait after the view's sync, during which others commit. The
    machine read then may be newer than the view's clusters and profiles; the plan must not
    mix them (the machine moved to a cluster made meanwhile, planned with no cluster: a
    config without its join). Content.authorised_plan skips config_plan's sync only where
    the machine came from the synced view without a wait."""
    from netboot.inventory.sqlite import SqliteStore
    from tests.conftest import install_token

    await env.seed()
    mac = "52:54:00:00:00:7a"
    await env.post("/api/v1/machines", {"mac": mac}, status=201)
    token = install_token(await boot(env, mac))
    store = env.service.store
    assert isinstance(store, SqliteStore)
    view = env.service.boot._view
    await view.sync()
    view._clear()  # as at start-up: nothing held, not loaded
    await view.list_groups()
    await view.list_profiles()
    await view.list_clusters()  # the settings held, the MAC not: read through
    assert view.held_settings() is not None and not view.loaded
    read = store.machines_by

    async def moved_meanwhile(claims):  # type: ignore[no-untyped-def]
        # Committed after the config fetch's sync, before its machine is read (another
        # server, the CLI, an operator's API call while the read waits for its thread).
        edge = await store.get_cluster("edge")
        assert edge is not None
        await store.put_cluster(dataclasses.replace(edge, name="edge2"), create=True)
        machine = await store.machine_by("mac", mac)
        assert machine is not None
        await store.update_machine(dataclasses.replace(machine, cluster="edge2"))
        return await read(claims)

    store.machines_by = moved_meanwhile  # type: ignore[method-assign]
    try:
        plan = await env.service.content.authorised_plan(mac.replace(":", "-"), token)
    finally:
        del store.machines_by
    assert plan.machine is not None and plan.machine.cluster == "edge2"
    assert plan.cluster is not None and plan.cluster.name == "edge2", plan
    assert plan.k3s is not None


async def test_a_profile_edit_shows_at_once_in_the_next_script_and_config(env: Env) -> None:
    """A profile's context values are made once per profile version (Content._of_profile)
    and the split renders keep a skeleton per distinct value: an edit of the profile is in
    the next install script (its command line) and config, for a machine whose script was
    rendered before it and for one never seen. (It failed with a skeleton key that took a
    profile's dict by a serial not given anew per version: session 26's s26-key.)"""
    from tests.conftest import call, install_token

    await env.seed()
    macs = [f"52:54:00:00:01:{i:02x}" for i in range(3)]
    for mac in macs:
        await env.post("/api/v1/machines", {"mac": mac}, status=201)
    before = await boot(env, macs[0])
    assert "k3os.install.device=/dev/vdz" not in before
    token = install_token(before)
    path = f"/config/{macs[0].replace(':', '-')}?token={token}"
    r = await call(env, "GET", path, admin=False)
    assert r.status == 200 and "ssh-ed25519 AAAAedited" not in r.body.decode()
    await boot(env, macs[1])  # rendered with the profile as it was

    r = await call(env, "GET", "/api/v1/profiles/k3os")
    assert r.status == 200, r.text
    profile = r.json()
    for edit in ({"install_device": "/dev/vdz"}, {"install_device": "/dev/vdy"}):
        r = await call(env, "PUT", "/api/v1/profiles/k3os",
                       json_body={**profile, **edit,
                                  "ssh_authorized_keys": ["ssh-ed25519 AAAAedited"]})
        assert r.status == 200, r.text
        for mac in macs:
            script = await boot(env, mac)
            assert f"k3os.install.device={edit['install_device']} " in script, script
        r = await call(env, "GET", path, admin=False)
        assert r.status == 200 and "ssh-ed25519 AAAAedited" in r.body.decode(), r.text


async def test_a_tftp_config_names_the_address_reached_where_the_base_url_is_loopback(
        env: Env) -> None:
    """A host without a default route and no --advertise serves 127.0.0.1 as its base URL
    (a device's own loopback): a pxelinux config's command line (its config URL) names the
    address the request came in on, as TftpServer's ``local`` tells it; an asset's lookup
    never asks it (a system call per RRQ); with an advertised base it is not asked."""
    await env.seed()
    await env.post("/api/v1/machines", {"mac": "52:54:00:00:00:41", "profile": "k3os"},
                   status=201)
    content = env.service.content
    asked: list[str] = []

    def local() -> str:
        asked.append("asked")
        return "198.51.100.10"

    path = "pxelinux.cfg/01-52-54-00-00-00-41"
    advertised = (await content.tftp_open(path, PEER, local)).data
    assert advertised is not None and b"http://192.0.2.10:8080/" in advertised
    assert asked == []
    env.service.base_url = "http://127.0.0.1:8080"
    await content.tftp_open("vmlinuz", PEER, local)
    assert asked == []
    text = (await content.tftp_open(path, PEER, local)).data
    assert text is not None and asked == ["asked"]
    assert b"http://198.51.100.10:8080/config/" in text and b"127.0.0.1" not in text, text
    # Without a way to ask (TftpServer without by_address), the base URL as it is.
    kept = (await content.tftp_open(path, PEER)).data
    assert kept is not None and b"http://127.0.0.1:8080/config/" in kept


async def test_a_script_that_fails_to_render_is_the_machines_event_bounded_with_its_fix(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """An operator's install template with an undefined name (line 3), and its grub.cfg
    too: each device ask was a 500 and a log line, and nothing on the machine, so that the
    dashboard and `netboot machines show` said nothing of why it was stuck (s41-ops). Now
    a ``render failed`` event names what failed, the template's file and line, and the fix;
    a device asking again and again (20 times, its iPXE and GRUB asks alternating, so that
    no two in a row say the same) records at most RENDER_FAILED_BURST of them; an
    operator's dry run (the API's render) records none. Real HTTP, the real SQLite store,
    `netboot machines show` as its own process."""
    import json
    import subprocess
    import sys

    from netboot.enroll import RENDER_FAILED_BURST

    own = tmp_path / "own-templates"
    (own / "ipxe").mkdir(parents=True)
    (own / "grub").mkdir()
    (own / "ipxe" / "install.ipxe").write_text(
        "#!ipxe\n# a site's script\nkernel {{ kernel_urll }} {{ cmdline }}\nboot\n")
    (own / "grub" / "install.cfg").write_text("set timeout=1\n{{ no_such_name }}\n")
    env = await make_env(f"templates:\n  dir: {own}\n")
    await env.seed()
    mac = "52:54:00:41:00:01"
    await env.post("/api/v1/machines", {"mac": mac}, status=201)

    async def told() -> list[dict[str, object]]:
        await env.service.enroller.recorder.flush()
        events = await env.get(f"/api/v1/machines/{mac}/events")
        return [e for e in events if e["kind"] == "render failed"]

    dry = await env.client.get(f"/api/v1/machines/{mac}/render/ipxe?arch=x86_64",
                               headers=env.auth)
    assert dry.status == 500 and "kernel_urll" in await dry.text()
    assert await told() == []  # an operator's dry run: no device is stuck
    for i in range(20):
        path = (f"/ipxe?mac={mac}&arch=x86_64" if i % 2 == 0
                else f"/grub/grub.cfg-01-{mac}")
        resp = await env.client.get(path)
        assert resp.status == 500, (path, resp.status, await resp.text())
        if i == 0:  # the machines list's last event (the dashboard's list) says it
            await env.service.enroller.recorder.flush()
            listed = await env.get("/api/v1/machines?last_event=1")
            assert listed["items"][0]["last_event"]["kind"] == "render failed"
    failed = await told()
    assert 2 <= len(failed) <= RENDER_FAILED_BURST, failed
    # Its events rate limited, the failure is still the list's last event: the install's
    # "asked again" note went after it and the list said install-plan (s42-ops).
    listed = await env.get("/api/v1/machines?last_event=1")
    assert listed["items"][0]["last_event"]["kind"] == "render failed", listed
    # Fixed, the next asks render: a "rendered" event each says so, and then the list's last
    # event (the failure no longer is the machine's newest).
    (own / "ipxe" / "install.ipxe").write_text("#!ipxe\nkernel {{ kernel_url }}\nboot\n")
    (own / "grub" / "install.cfg").write_text("set timeout=1\n")
    for path in (f"/ipxe?mac={mac}&arch=x86_64", f"/grub/grub.cfg-01-{mac}"):
        resp = await env.client.get(path)
        assert resp.status == 200, (path, resp.status, await resp.text())
    await env.service.enroller.recorder.flush()
    listed = await env.get("/api/v1/machines?last_event=1")
    assert listed["items"][0]["last_event"]["kind"] == "rendered", listed
    fixed = [e["message"] for e in await env.get(f"/api/v1/machines/{mac}/events")
             if e["kind"] == "rendered"]
    assert 1 <= len(fixed) <= 2 and all("rendered again" in str(m) for m in fixed), fixed
    ipxe = next(e for e in failed if "iPXE script" in str(e["message"]))
    message = str(ipxe["message"])
    assert "'ipxe/install.ipxe', line 3: 'kernel_urll' is undefined" in message, message
    assert f"template file {own / 'ipxe' / 'install.ipxe'}, line 3" in message, message
    assert f"netboot render {mac} ipxe" in message and "Fix:" in message
    data = ipxe["data"]
    assert isinstance(data, dict)
    assert (data["template"], data["line"]) == (str(own / "ipxe" / "install.ipxe"), 3)
    grub = [e for e in failed if "grub.cfg" in str(e["message"])]
    assert grub and "no_such_name" in str(grub[0]["message"])
    assert f"netboot render {mac} grub" in str(grub[0]["message"])
    # `netboot machines show`, as its own process.
    cfg_path = tmp_path / "a" / "netboot.yaml"
    shown = subprocess.run(
        [sys.executable, "-m", "netboot", "machines", "show", mac, "--json",
         "--config", str(cfg_path)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert shown.returncode == 0, shown.stderr
    kinds = [e["kind"] for e in json.loads(shown.stdout)["events"]]
    assert "render failed" in kinds, kinds
    shown = subprocess.run(
        [sys.executable, "-m", "netboot", "machines", "show", mac, "--config", str(cfg_path)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert "render failed" in shown.stdout and "kernel_urll" in shown.stdout, shown.stdout


@pytest.mark.parametrize("shell", ["busybox", "dash"])
async def test_a_device_whose_server_is_gone_registers_through_the_next_one_its_config_names(
        tmp_path: Path, shell: str) -> None:
    """The register command a served k3OS config carries, run by a real shell against real
    sockets: the URL of the server that rendered it (its base, here a port that refuses every
    connection, as a server whose process is gone) first, then server.peers' (a live
    netboot on the same inventory). The first refuses, the second takes the same body: the
    machine is registered from the device's address, its machine token kept in the token
    file. On main the config names the dead server
    alone: the device retries it and never registers (s48-ha)."""
    import asyncio
    import socket

    import aiohttp
    import yaml
    from aiohttp import web

    from netboot.config import load
    from netboot.model import Cluster, MacAddress, Machine, Profile, Role
    from netboot.service import build
    from tests.conftest import write_config
    from tests.device import device_shell

    argv, env = device_shell(tmp_path, shell)
    mac = "52:54:00:48:00:01"
    # A's port: bound and never listening, so every connection to it is refused (RST), and
    # no other process can take it while the test runs.
    dead = socket.socket()
    live = socket.socket()
    try:
        dead.bind(("127.0.0.1", 0))
        live.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}"
        live_url = f"http://127.0.0.1:{live.getsockname()[1]}"
        path = write_config(tmp_path / "cfg", http=f"  public_url: {dead_url}\n")
        path.write_text(path.read_text().replace(
            "  advertise: 192.0.2.10\n",
            f"  advertise: 192.0.2.10\n  peers: [{live_url}/]\n"))
        service = await build(load(path, env={}))
        runner = web.AppRunner(service.app)
        try:
            store = service.store
            await store.put_profile(Profile(name="p", kernel="vmlinuz"))
            await store.put_cluster(Cluster(name="edge", token="t", server_url="managed"))
            await store.create_machine(Machine(macs=(MacAddress.parse(mac),), hostname="s1",
                                               cluster="edge", role=Role.SERVER,
                                               profile="p"))
            await runner.setup()
            live.listen(16)
            await web.SockSite(runner, live).start()
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{live_url}/ipxe?mac={mac}&arch=x86_64") as resp:
                    script = await resp.text()
                token = script.split("?token=", 1)[1].split()[0]
                async with http.get(f"{live_url}/config/{mac.replace(':', '-')}"
                                    f"?token={token}") as resp:
                    assert resp.status == 200, await resp.text()
                    config = yaml.safe_load(await resp.text())
            command = config["run_cmd"][0]
            assert command.index(dead_url) < command.index(live_url), command
            root = tmp_path / "root"
            # As served, with the device's root in the test's directory and its waits short:
            # at most 3 tries 1 s apart, so that a device that never registers gives up.
            command = (command.replace("/var/lib/netboot", str(root))
                       .replace("n=360", "n=3")
                       .replace("sleep 10", "sleep 1"))
            proc = await asyncio.create_subprocess_exec(
                *argv, command, env=env, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            # communicate: until the pipe closes (bounded: 3 tries of 2 URLs, 1 s apart).
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
            machine = await store.machine_by("mac", mac)
            assert machine is not None
            events = await store.list_events(machine.id)
        finally:
            await runner.cleanup()
            await service.boot.drain()
            service.content.close()
            await service.store.close()
    finally:
        dead.close()
        live.close()
    assert proc.returncode == 0, out
    assert machine.state == MachineState.REGISTERED, (machine.state, out)
    registered = [e for e in events if e.kind == "registered"]
    assert len(registered) == 1 and registered[0].data["peer"] == "127.0.0.1", events
    assert (root / "registered").exists()
    kept = (root / "machine-token").read_text()
    assert kept and kept != token
    assert (root / "machine-token").stat().st_mode & 0o077 == 0


async def test_the_servers_a_register_command_names_follow_the_peers_told(env: Env) -> None:
    """Content.set_peers (netboot.inventory.peers: another server started, or one gone):
    the next config carries the new list, the one an installer's retry is given from what
    was kept (Content._config) and a machine's whose config is made from a frame another
    machine's made (_config_framed) alike; with none, the single server's command, one URL
    (s48-ha)."""
    from tests.conftest import call, install_token

    await env.seed()
    macs = ("52:54:00:00:48:01", "52:54:00:00:48:02", "52:54:00:00:48:03")
    paths = []
    for mac in macs:
        await env.post("/api/v1/machines", {"mac": mac}, status=201)
        token = install_token(await boot(env, mac))
        paths.append(f"/config/{mac.replace(':', '-')}?token={token}")

    async def fetch(path: str) -> str:
        r = await call(env, "GET", path, admin=False)
        assert r.status == 200, r.text
        return r.body.decode()

    base = env.service.base_url
    other = "http://198.51.100.7:8080"
    first = await fetch(paths[0])  # booting -> installing; a frame of its shape made
    assert f"{base}/api/v1/register" in first and "for u in" not in first
    kept = await fetch(paths[0])
    assert await fetch(paths[0]) == kept  # kept
    env.service.content.set_peers((other,))
    for text in (await fetch(paths[0]), await fetch(paths[1])):
        assert f"for u in {base}/api/v1/register {other}/api/v1/register; do" in text, text
    env.service.content.set_peers(())
    assert "for u in" not in await fetch(paths[2])
    assert await fetch(paths[0]) == kept


async def test_an_install_script_falls_back_to_the_other_servers_told(env: Env) -> None:
    """With other servers sharing the inventory (Content.set_peers), an install script's
    kernel and initrd fetches fail over to a label that chains each other server's
    boot.ipxe in turn, the last without ``||`` (its failure fails the script, as a failed
    kernel did before): an install asked again (a kept script) and first installs (one
    frame's) alike. The rest is the script as it was; told none again, each script is
    byte for byte what it was: a single server's script never changes (s50-ha)."""
    await env.seed()
    macs = ("52:54:00:00:50:01", "52:54:00:00:50:02", "52:54:00:00:50:03",
            "52:54:00:00:50:04")
    for mac in macs:
        await env.post("/api/v1/machines", {"mac": mac}, status=201)
    for mac in macs[:2]:
        await boot(env, mac)  # enrolled -> booting
    alone = [await boot(env, mac) for mac in macs[:2]]
    assert [await boot(env, mac) for mac in macs[:2]] == alone  # kept
    for text in alone:
        assert "||" not in text and "netboot-next" not in text and "imgfree" not in text
    base = env.service.base_url
    others = ("http://198.51.100.7:8080", "http://[2001:db8::7]:8080")
    env.service.content.set_peers(others)
    told = [await boot(env, mac) for mac in macs]  # two asked again, two first installs
    for mac, text in zip(macs, told, strict=True):
        lines = text.splitlines()
        kernel = next(ln for ln in lines if ln.startswith("kernel "))
        initrd = next(ln for ln in lines if ln.startswith("initrd "))
        assert kernel.endswith(" || goto netboot-next") and initrd.endswith(
            " || goto netboot-next"), text
        assert lines.index("boot") < lines.index(":netboot-next")
        after = lines[lines.index(":netboot-next") + 1:]
        assert [ln for ln in after if not ln.startswith(("#", "echo "))] == [
            "imgfree",
            f"chain --autofree --replace {others[0]}/boot.ipxe ||",
            f"chain --autofree --replace {others[1]}/boot.ipxe"], (mac, text)
        assert f"{base}/" not in "\n".join(after)
    for text, was in zip(told, alone, strict=False):
        # What was there is there unchanged (the same install: the same token, URLs).
        before = text[:text.index(":netboot-next")]
        assert before.replace(" || goto netboot-next", "") == was
    env.service.content.set_peers(())
    assert [await boot(env, mac) for mac in macs[:2]] == alone


@pytest.mark.parametrize("bad", ["http://198.51.100.7:8080/a b", "http://198.51.100.7:80${x}",
                                 "http://198.51.100.7:8080/#x", "http://198.51.100.7\t:80",
                                 "ftp://198.51.100.7"])
async def test_a_server_url_iPXE_would_not_read_as_one_word_is_left_out_of_install_scripts(
        env: Env, bad: str, caplog: pytest.LogCaptureFixture) -> None:
    """iPXE has no quoting (src/core/exec.c): a word ends at whitespace, ``${...}`` is a
    setting, a word starting with ``#`` a comment. A peer's URL with such characters (a
    hand-edited servers record) is never put in an install script (the next one is), and
    the log names it; with it alone the script is a single server's."""
    await env.seed()
    mac = "52:54:00:00:50:11"
    await env.post("/api/v1/machines", {"mac": mac}, status=201)
    await boot(env, mac)  # enrolled -> booting: the same script from here on
    alone = await boot(env, mac)
    good = "http://198.51.100.8:8080"
    env.service.content.set_peers((bad,))
    assert await boot(env, mac) == alone
    assert any(repr(bad) in r.getMessage() and "iPXE" in r.getMessage()
               for r in caplog.records), caplog.text
    env.service.content.set_peers((bad, good))
    text = await boot(env, mac)
    chains = [ln for ln in text.splitlines() if ln.startswith("chain ")]
    assert chains == [f"chain --autofree --replace {good}/boot.ipxe"], text
