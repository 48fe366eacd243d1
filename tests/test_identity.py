"""Identity: placeholders firmware reports, claims, and which machine wins when they disagree."""

from __future__ import annotations

import re
import traceback

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from netboot import identity
from netboot.errors import ValidationError
from netboot.identity import Identity
from netboot.inventory.memory import MemoryStore
from netboot.model import BootRequest, MacAddress, Machine, MachineState
from tests.conftest import Env, EnvFactory

NIC1 = MacAddress.parse("52:54:00:00:01:01")
NIC2 = MacAddress.parse("52:54:00:00:01:02")


@pytest.mark.parametrize("value", [
    "", "   ", "To be filled by O.E.M.", "To Be Filled By O.E.M.", "Default string",
    "DEFAULT STRING", "System Serial Number", "0123456789", "0", "00000000", "Not Specified",
    "None", "N/A", "XXXXXXXXXX", "FFFFFFFF", "Chassis Serial Number", "No Asset Tag",
])
def test_placeholders_are_junk(value: str) -> None:
    assert identity.is_junk(value)
    assert identity.clean_text(value) is None
    with pytest.raises(ValidationError) as err:
        identity.enrolled_value("serial", value)
    assert err.value.field == "serial"


@given(st.text(alphabet="0fFxXaZ19 .\t\u00a0\u2028Ä\uff11-/", max_size=8) | st.text(max_size=8))
@example(" ")
@example("0 0")
@example("x.X")
@example("To be filled by O.E.M.")
def test_junk_is_told_as_by_removing_spaces_and_dots_first(value: str) -> None:
    # is_junk skips its regular expression for text of letters and digits only (every
    # serial of a bulk import): the same answer as removing spaces and dots from any text.
    key = re.sub(r"[\s.]", "", value).lower()
    expected = (key in identity._JUNK or not key.strip("0") or not key.strip("f")
                or not key.strip("x"))
    assert identity.is_junk(value) == expected


@pytest.mark.parametrize("value", ["SN-1", "CZ2048XYZ", "0a1b2c3d", "J0001", "A 7"])
def test_real_serials_are_kept(value: str) -> None:
    assert not identity.is_junk(value)
    assert identity.clean_text(f" {value} ") == value


@pytest.mark.parametrize(("text", "expected"), [
    ("4C4C4544-0042-3510-8052-B2C04F4E3032", "4c4c4544-0042-3510-8052-b2c04f4e3032"),
    ("00000000-0000-0000-0000-000000000000", None),
    ("FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF", None),
    ("03000200-0400-0500-0006-000700080009", "03000200-0400-0500-0006-000700080009"),
    ("not-a-uuid", None), ("", None), (None, None),
    # Canonical already (what the DHCP codec makes of option 97): the same answers.
    ("4c4c4544-0042-3510-8052-b2c04f4e3032", "4c4c4544-0042-3510-8052-b2c04f4e3032"),
    ("00000000-0000-0000-0000-000000000000", None),
    ("ffffffff-ffff-ffff-ffff-ffffffffffff", None),
    ("5a5a5a5a-5a5a-5a5a-5a5a-5a5a5a5a5a5a", None),  # one byte throughout: a placeholder
    ("5a5a5a5a-5a5a-5a5a-5a5a-5a5a5a5a5a5b", "5a5a5a5a-5a5a-5a5a-5a5a-5a5a5a5a5a5b"),
    ("{4c4c4544-0042-3510-8052-b2c04f4e3032}", "4c4c4544-0042-3510-8052-b2c04f4e3032"),
])
def test_clean_uuid(text: str | None, expected: str | None) -> None:
    assert identity.clean_uuid(text) == expected


def test_enrolled_uuid_is_normalised_and_placeholders_refused() -> None:
    assert identity.enrolled_value("uuid", "4C4C4544-0042-3510-8052-B2C04F4E3032") \
        == "4c4c4544-0042-3510-8052-b2c04f4e3032"
    for bad in ("nope", "00000000-0000-0000-0000-000000000000"):
        with pytest.raises(ValidationError) as err:
            identity.enrolled_value("uuid", bad)
        assert err.value.field == "uuid"


def test_claims_in_precedence_order_without_placeholders() -> None:
    m = Machine(macs=(NIC1, NIC2), uuid="00000000-0000-0000-0000-000000000000",
                serial="SN-1", asset="Default string")
    assert identity.claims(m) == [("mac", str(NIC1)), ("mac", str(NIC2)), ("serial", "SN-1")]
    with pytest.raises(ValidationError) as err:
        identity.require(Machine(serial="To be filled by O.E.M."))
    assert err.value.field == "mac"


def test_request_identity_ignores_placeholders_and_the_no_nic_stand_in() -> None:
    req = BootRequest(mac=NIC1, serial="Default string", asset="A-1",
                      uuid="ffffffff-ffff-ffff-ffff-ffffffffffff")
    assert Identity.of_request(req).claims() == [("mac", str(NIC1)), ("asset", "A-1")]
    dry = identity.request_for(Machine(serial="SN-9"))
    assert dry.mac == identity.NO_NIC and Identity.of_request(dry).claims() == [
        ("serial", "SN-9")]



def test_a_request_from_the_all_zero_address_claims_no_mac_as_the_no_nic_stand_in() -> None:
    """The all-zero address parsed from a request is another object than ``NO_NIC``, equal
    to it: claimed as no NIC all the same (setup.py's mypyc build compared the two by
    identity: model.equal)."""
    zero = MacAddress(bytes(6))
    assert zero is not identity.NO_NIC
    assert Identity.of_request(BootRequest(mac=zero, serial="SN-9")).claims() == [
        ("serial", "SN-9")]

_TEXTS = st.sampled_from([None, "", "SN-1", " padded ", "To be filled by O.E.M.", "0000",
                          "4C4C4544-0042-3510-8048-B2C04F565931", "not a uuid",
                          "00000000-0000-0000-0000-000000000000",
                          "{4c4c4544-0042-3510-8048-b2c04f565931}"])


@given(macs=st.lists(st.binary(min_size=6, max_size=6), max_size=3, unique=True),
       uuid=_TEXTS, serial=_TEXTS, asset=_TEXTS)
def test_every_spelling_of_the_claims_is_one_walk(macs: list[bytes], uuid: str | None,
                                                  serial: str | None, asset: str | None,
                                                  ) -> None:
    """What a store looks up (claims: MACs as text), what a held index is asked
    (lookup_keys: MACs by their bytes) and who an import finds holding each identifier
    (enroll._claims_of) are the same identifiers, in the same order."""
    from netboot.enroll import _claims_of

    machine = Machine(macs=tuple(MacAddress(raw) for raw in macs), uuid=uuid, serial=serial,
                      asset=asset)
    ident = Identity.of_machine(machine)
    claims = identity.claims(machine)
    assert ident.claims() == claims
    keys = ident.lookup_keys()
    assert [(k, str(MacAddress(v)) if isinstance(v, bytes) else v) for k, v in keys] == claims
    assert all(isinstance(v, bytes) == (k == "mac") for k, v in keys)
    held = _claims_of([machine])
    assert sorted((k, v) for k, by in held.items() for v in by) == sorted(keys)
    assert all(holder == machine.id for by in held.values() for holder in by.values())


def m(state: MachineState = MachineState.ENROLLED, **kw: object) -> Machine:
    return Machine(state=state, **kw)  # type: ignore[arg-type]


def test_choose_mac_then_uuid_then_serial_then_asset() -> None:
    a, b, c, d = m(), m(), m(), m()
    found = [("mac", "x", a), ("uuid", "x", b), ("serial", "x", c), ("asset", "x", d)]
    for i, expected in enumerate((a, b, c, d)):
        res = identity.choose(found[i:])
        assert res.machine is expected and res.matched_by == found[i][0]
        assert {o.id for _, o in res.disagree} == {o.id for _, _, o in found[i + 1:]}
        assert res.absorb == ()


def test_choose_enrolled_beats_discovered_and_absorbs_it() -> None:
    found_by_mac = m(MachineState.DISCOVERED)
    by_serial = m(MachineState.INSTALLED)
    res = identity.choose([("mac", "x", found_by_mac), ("serial", "x", by_serial)])
    assert res.machine is by_serial and res.matched_by == "serial"
    assert res.absorb == (found_by_mac,) and res.disagree == ()


def test_choose_among_discovered_takes_the_first() -> None:
    d1, d2 = m(MachineState.DISCOVERED), m(MachineState.DISCOVERED)
    res = identity.choose([("mac", "x", d1), ("uuid", "x", d2)])
    assert res.machine is d1 and res.absorb == (d2,)
    assert identity.choose([]).machine is None


def test_one_machine_matched_twice_is_one_match() -> None:
    one = m()
    res = identity.choose([("mac", "x", one), ("serial", "x", one)])
    assert res.machine is one and res.absorb == () and res.disagree == ()


def test_merge_keeps_what_both_knew_the_target_wins() -> None:
    target = Machine(macs=(NIC2,), serial="SN-1", facts={"product": "box"}, labels={"a": "1"})
    found = Machine(macs=(NIC1,), state=MachineState.DISCOVERED, uuid="u",
                    facts={"product": "old", "remote_addr": "192.0.2.5"}, labels={"a": "2"})
    merged = identity.merge(target, [found], 5.0)
    assert merged.id == target.id and merged.macs == (NIC2, NIC1)
    assert merged.uuid == "u" and merged.serial == "SN-1" and merged.updated == 5.0
    assert merged.facts == {"product": "box", "remote_addr": "192.0.2.5"}
    assert merged.labels == {"a": "1"}


async def test_by_ref_takes_a_mac_or_an_id() -> None:
    store = MemoryStore()
    await store.open()
    two = Machine(macs=(NIC1, NIC2))
    await store.create_machine(two)
    for ref in (str(NIC2), NIC2.hexhyp.upper(), two.id, f" {two.id} "):
        assert await identity.by_ref(store, ref) == two
    assert await identity.by_ref(store, "m-000000000000") is None
    with pytest.raises(ValidationError) as err:
        await identity.by_ref(store, "not-a-mac")
    assert err.value.field == "mac"


def test_a_uuid_that_does_not_parse_is_refused_without_the_parse_error_chained() -> None:
    # The same in both builds: a mypyc build (setup.py) drops "raise ... from None", so the
    # refusal is raised after the parse's except block, not suppressed by "from None".
    with pytest.raises(ValidationError) as refused:
        identity.enrolled_value("uuid", "not-a-uuid")
    shown = "".join(traceback.format_exception(refused.value))
    assert "badly formed" not in shown and "During handling" not in shown, shown


@pytest.mark.parametrize(("text", "told"), [
    ("53:54:00:12:34:56", "is a multicast address"), ("01:00:5e:00:00:01", "multicast"),
    ("ff:ff:ff:ff:ff:ff", "is the broadcast address"), ("00:00:00:00:00:00", "all-zero"),
    ("52:54:00:12:34:56", None), ("02:00:00:00:00:00", None), ("00:00:00:00:00:01", None),
])
def test_an_enrolled_mac_is_one_a_nic_can_have(text: str, told: str | None) -> None:
    """A group address (first byte odd) or all zeros never matched a boot (s35-user)."""
    mac = MacAddress.parse(text)
    if told is None:
        assert identity.enrolled_mac(mac, "mac") is mac
        return
    with pytest.raises(ValidationError, match=told) as err:
        identity.enrolled_mac(mac, "macs")
    assert err.value.field == "macs" and text in err.value.message


# --- what a host sending a machine's UUID gets (README "Machines and their identity") -----

STRANGER = "02-46-00-00-50-99"  # a made-up MAC (locally administered)
FLOOR_UUID = "8d3a0c51-3b6b-4f0e-9d4c-52e5c1a2b3c5"


async def test_a_host_sending_a_uuid_only_machines_uuid_to_ipxe_gets_no_install(
        env: Env) -> None:
    """A machine enrolled by its UUID alone (a vendor's manifest lists it), before its first
    boot: a host on the VLAN asks ``/ipxe`` as boot.ipxe does with a made-up MAC and that UUID.
    Before session 50 it was answered the machine's install script, whose token fetched the
    machine's config with the cluster's join token (k3s-secret-token). Now its MAC is attached
    and held, with the command that lists it; no token exists to fetch a config with. Once an
    operator lists the NIC (PATCH macs), the next ask installs and its config is served."""
    from tests.conftest import boot, call, install_token

    await env.seed()
    made = await env.post("/api/v1/machines", {"uuid": FLOOR_UUID, "hostname": "floor-3",
                                               "cluster": "edge", "profile": "k3os"},
                          status=201)
    script = await boot(env, STRANGER, uuid=FLOOR_UUID)
    assert "token=" not in script and "is held" in script, script
    command = f"netboot machines set {made['id']} --add-mac {STRANGER.replace('-', ':')}"
    assert f"to install it, run: {command}" in script, script
    again = await boot(env, STRANGER, uuid=FLOOR_UUID)  # its retry loop: the same
    assert "token=" not in again and command in again, again
    machine = await env.get(f"/api/v1/machines/{made['id']}")
    assert machine["macs"] == [STRANGER.replace("-", ":")]
    assert machine["state"] == "enrolled" and machine["facts"]["unlisted_nics"] == \
        STRANGER.replace("-", ":")
    # No token was made: a config asked with anything is refused.
    refused = await call(env, "GET", f"/config/{STRANGER}?token=x", admin=False)
    assert refused.status in (401, 403, 404) and b"k3s-secret-token" not in refused.body

    # The operator lists the NIC (it is the machine's: its console showed the command).
    r = await call(env, "PATCH", f"/api/v1/machines/{made['id']}",
                   json_body={"macs": [STRANGER]})
    assert r.status == 200, r.body
    token = install_token(await boot(env, STRANGER, uuid=FLOOR_UUID))
    config = await call(env, "GET", f"/config/{STRANGER}?token={token}", admin=False)
    assert config.status == 200 and b"k3s-secret-token" in config.body, config.body


async def test_enroll_trust_first_nic_gives_a_uuid_only_machines_first_nic_its_install(
        make_env: EnvFactory) -> None:
    """``enroll.trust_first_nic: true`` (a factory floor whose VLAN is closed): the first NIC
    that reports a MAC-less machine's UUID installs at once, as before session 50; a second
    NIC reporting it is still held (the machine has a NIC by then)."""
    from tests.conftest import boot, install_token

    env = await make_env("enroll:\n  trust_first_nic: true\n")
    await env.seed()
    made = await env.post("/api/v1/machines", {"uuid": FLOOR_UUID, "hostname": "floor-4",
                                               "cluster": "edge", "profile": "k3os"},
                          status=201)
    assert install_token(await boot(env, STRANGER, uuid=FLOOR_UUID))
    second = await boot(env, "02-46-00-00-50-98", uuid=FLOOR_UUID)
    assert "token=" not in second and f"set {made['id']} --add-mac 02:46:00:00:50:98" in \
        second, second
    machine = await env.get(f"/api/v1/machines/{made['id']}")
    assert machine["facts"]["unlisted_nics"] == "02:46:00:00:50:98"


async def test_a_host_asking_u_boots_file_of_a_uuid_only_machine_takes_nothing(
        env: Env) -> None:
    """U-Boot asks ``pxelinux.cfg/<its UUID>`` over TFTP first, and any host can ask that
    name. For a machine enrolled by its UUID alone it was the install plan: a token issued
    to nobody's NIC (00:00:00:00:00:00), the machine moved to booting with its install
    served to that host, so the device's own install was then held ("served to another
    address"). Now the name is not found (U-Boot asks ``01-<mac>`` next) and nothing is
    written; held if asked of the boot path directly."""
    from netboot.errors import NotFound
    from netboot.model import Arch, BootAction, Firmware

    await env.seed()
    made = await env.post("/api/v1/machines", {"uuid": FLOOR_UUID, "hostname": "floor-6",
                                               "cluster": "edge", "profile": "k3os"},
                          status=201)
    with pytest.raises(NotFound):
        await env.service.content.tftp_open(f"pxelinux.cfg/{FLOOR_UUID}", ("192.0.2.99", 2000))
    machine = await env.get(f"/api/v1/machines/{made['id']}")
    assert machine["state"] == "enrolled" and "install_peer" not in machine["facts"], machine
    stored = await env.service.store.get_machine(made["id"])
    assert stored is not None
    plan = await env.service.boot.plan(identity.request_for(
        stored, via="tftp", remote_addr="192.0.2.99", firmware=Firmware.UBOOT,
        arch=Arch.ARM64))
    assert plan.action == BootAction.HOLD and plan.token is None, plan
