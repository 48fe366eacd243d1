"""Model values: what a MAC address accepts and refuses, in every spelling."""

from __future__ import annotations

import copy
import pickle
import sys
from dataclasses import (
    MISSING,
    FrozenInstanceError,
    dataclass,
    field,
    fields,
    make_dataclass,
    replace,
)

import pytest

from netboot import model
from netboot.errors import ValidationError
from netboot.identity import Identity, Resolution
from netboot.model import (
    Arch,
    BootAction,
    BootPlan,
    BootRequest,
    Event,
    Firmware,
    K3sJoin,
    LoaderChain,
    MacAddress,
    Machine,
    MachineState,
    Profile,
    Role,
    replace_machine,
    slot_init,
)


@pytest.mark.parametrize("text", [
    "aa:bb:cc:dd:ee:ff", "AA:BB:CC:DD:EE:FF", " aa-bb-cc-dd-ee-ff ", "aabb.ccdd.eeff",
    "aabbccddeeff", "01-aa-bb-cc-dd-ee-ff",
])
def test_mac_spellings(text: str) -> None:
    assert str(MacAddress.parse(text)) == "aa:bb:cc:dd:ee:ff"


@pytest.mark.parametrize("text", [
    "aa:bb:cc:dd:ee:fg", "aa:bb-cc:dd:ee:ff", "aa:bb:cc:dd:ee", "aa:bb:cc:dd:ee:ff:00",
    "aab:bc:cd:de:ef:f0", "a:bb:cc:dd:ee:fff", "", "::::::::::::::::",
    # Whitespace where the usual spellings' shortcut reads hex (bytes.fromhex skips it
    # between whole bytes): five bytes, or an odd digit.
    "aa:bb:cc:dd:  :ff", "aa:bb:cc:dd:ee: f", "aa-bb-\t\t-dd-ee-ff", "aa:bb:cc:dd:e :ff",
])
def test_mac_refused(text: str) -> None:
    with pytest.raises(ValidationError) as err:
        MacAddress.parse(text)
    assert err.value.field == "mac"


def test_a_mac_of_seventeen_characters_is_six_pairs_of_hex_digits_by_one_separator() -> None:
    # The usual spellings' shortcut (MacAddress.parse) takes what the general checks take
    # and refuses what they refuse: random texts of hex digits, separators, whitespace.
    import random
    import re

    pattern = re.compile(r"([0-9a-f]{2})([:.-])[0-9a-f]{2}(?:\2[0-9a-f]{2}){4}")
    rng = random.Random(33)
    alphabet = "0a9fF:-- :.\tg\n"
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(17))
        if rng.random() < 0.5:  # mostly a MAC, a character or two changed
            chars = list("02:ab:cd:ef:00:9f" if rng.random() < 0.5 else "02-ab-cd-ef-00-9f")
            for _ in range(rng.randint(0, 2)):
                chars[rng.randrange(17)] = rng.choice(alphabet)
            text = "".join(chars)
        lowered = text.strip().lower()
        want = (bytes.fromhex(lowered.replace(lowered[2], ""))
                if len(lowered) == 17 and pattern.fullmatch(lowered) else None)
        if want is None and len(lowered) == 17:
            with pytest.raises(ValidationError):
                MacAddress.parse(text)
        elif want is not None:
            got = MacAddress.parse(text)
            assert got == want and type(got) is MacAddress, text


def test_a_mac_is_one_object_equal_to_and_hashed_as_its_bytes() -> None:
    # A MacAddress is its six bytes (issue 10: one object per MAC in the view, not a
    # dataclass and its bytes); what the view, DHCP and TFTP paths rely on stays as it was.
    six = bytes.fromhex("0200000000ff")
    mac = MacAddress(six)
    assert mac.raw is mac and type(mac) is MacAddress
    assert sys.getsizeof(mac) <= sys.getsizeof(six) + 16  # no second object behind it
    assert mac == MacAddress.parse("02-00-00-00-00-FF") == six
    assert hash(mac) == hash(six) and {six: 1}[mac] == 1 and {mac: 1}[six] == 1
    assert mac != MacAddress(bytes(6)) and mac != str(mac)
    assert (str(mac), f"{mac}", mac.hexhyp, mac.hexraw, mac.suffix, mac.oui) == (
        "02:00:00:00:00:ff", "02:00:00:00:00:ff", "02-00-00-00-00-ff", "0200000000ff",
        "0000ff", "02:00:00")
    assert repr(mac) == "MacAddress(raw=b'\\x02\\x00\\x00\\x00\\x00\\xff')"
    again = pickle.loads(pickle.dumps(mac))
    assert type(again) is MacAddress and again == mac
    assert copy.deepcopy(mac) == mac and type(copy.copy(mac)) is MacAddress
    with pytest.raises(AttributeError):
        mac.raw = bytes(6)  # type: ignore[misc]
    for wrong in (b"\x02" * 5, b"\x02" * 7, 6, "abcdef"):
        with pytest.raises(ValidationError) as err:
            MacAddress(wrong)  # type: ignore[arg-type]
        assert err.value.field == "mac"


def test_replace_machine_gives_what_dataclasses_replace_gives() -> None:
    """The install path's copy of a machine (lifecycle.advance, the store's sealing) is the
    value dataclasses.replace makes, for every field; an unknown field is refused alike."""
    machine = Machine(macs=(MacAddress.parse("02:00:00:00:00:01"),), hostname="edge-1",
                      serial="SN1", labels={"rack": "r1"}, cluster="edge", role=Role.AGENT,
                      facts={"product": "x"}, install_token="t", created=1.0, updated=2.0)
    values = {f.name: getattr(Machine(id="m-000000000002", state=MachineState.BOOTING,
                                      hostname="other", uuid="u", asset="a", profile="p",
                                      loader=LoaderChain.SHIM_GRUB, arch=Arch.ARM64,
                                      firmware=Firmware.UEFI, ipv4="192.0.2.7",
                                      fixed_ipv4="192.0.2.8", token_hash="h",
                                      token_expires=9.0, install_token="t2", created=3.0,
                                      updated=4.0), f.name)
              for f in fields(Machine)}
    for name, value in values.items():
        made = replace_machine(machine, **{name: value})
        assert made == replace(machine, **{name: value})
        # Of the layout replace gives (model._two_layouts).
        assert type(made) is type(replace(machine, **{name: value})) and made is not machine
        assert isinstance(made, Machine)
    everything = replace_machine(machine, **values)
    assert everything == replace(machine, **values) == Machine(**values)
    assert replace_machine(machine) == machine
    with pytest.raises(TypeError, match="Machine has no field 'colour'"):
        replace_machine(machine, colour="blue")
    with pytest.raises(TypeError):  # the machine is given by position only
        replace_machine(machine=machine)  # type: ignore[call-arg]
    for by_position in (("h",), ("m-1", "h")):  # and only the machine
        with pytest.raises(TypeError, match="1 positional argument"):
            replace_machine(machine, *by_position)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="Machine has no field '_by_position_'"):
        replace_machine(machine, _by_position_="h")
    # Not one of Machine's layouts (a subclass, say): dataclasses.replace itself decides.
    other = Profile(name="p", kernel="k")
    copied = replace_machine(other, kernel="k2")  # type: ignore[arg-type]
    assert copied == replace(other, kernel="k2")
    with pytest.raises(TypeError):
        replace_machine(other, colour="blue")  # type: ignore[arg-type]
    # Back to a field's first value: the compact layout again, as replace gives it.
    assert type(replace_machine(everything, **{f.name: getattr(machine, f.name)
                                               for f in fields(Machine)})) is type(machine)
    with pytest.raises(TypeError):
        replace(machine, colour="blue")


def test_a_machine_changer_gives_what_replace_machine_gives() -> None:
    """A changer of a set of fields by position (model.machine_changer: a first install's
    copy, a config's state step) makes replace_machine's value of the same changes, for any
    set of fields in any order, from either layout to either, holding the very objects
    given; a non-field, a field named twice or none is refused where it is made."""
    import random

    from netboot import boot

    rng = random.Random(40)
    names = [f.name for f in fields(Machine)]
    compact = Machine(macs=(MacAddress.parse("02:00:00:00:00:01"),), hostname="edge-1",
                      serial="SN1", labels={"rack": "r1"}, cluster="edge", role=Role.AGENT,
                      created=1.0, updated=2.0)
    whole = replace_machine(compact, facts={"product": "x"}, install_token="t", arch=Arch.X86_64)
    other = Machine(id="m-000000000002", state=MachineState.BOOTING, hostname="other",
                    uuid="u", asset="a", profile="p", loader=LoaderChain.SHIM_GRUB,
                    arch=Arch.ARM64, firmware=Firmware.UEFI, ipv4="192.0.2.7",
                    fixed_ipv4="192.0.2.8", facts={"remote_addr": "192.0.2.9"}, token_hash="h",
                    token_expires=9.0, install_token="t2", secret_hash="s", state_since=3.5,
                    created=3.0, updated=4.0)
    # The seldom-set fields' first values too: a copy may go back to the compact layout.
    first = {f.name: getattr(compact, f.name) for f in fields(Machine)}
    kept = {"state": boot._install_copy.__name__, "restate": model.restate.__name__}
    assert kept == {"state": "change_state_updated_state_since_facts_uuid_serial_asset_arch_"
                             "firmware_token_hash_install_token_token_expires_cluster_role",
                    "restate": "change_state_updated_state_since"}
    changers = [(("state", "updated", "state_since", "facts", "uuid", "serial", "asset",
                  "arch", "firmware", "token_hash", "install_token", "token_expires",
                  "cluster", "role"), boot._install_copy),
                (("state", "updated", "state_since"), model.restate)]
    for _ in range(300):
        chosen = tuple(rng.sample(names, rng.randint(1, len(names))))
        changers.append((chosen, model.machine_changer(*chosen)))
    for chosen, change in changers:
        for machine in (compact, whole, other):
            given = tuple(getattr(rng.choice((other, compact, whole)), n) if rng.random() < 0.8
                          else first[n] for n in chosen)
            made = change(machine, *given)
            want = replace_machine(machine, **dict(zip(chosen, given, strict=True)))
            assert made == want and type(made) is type(want), chosen
            assert all(getattr(made, n) is getattr(want, n) for n in names), chosen
            assert made is not machine
    # Not one of Machine's layouts: replace_machine (dataclasses.replace) decides.
    profile = Profile(name="p", kernel="k")
    with pytest.raises(TypeError):
        model.restate(profile, MachineState.BOOTING, 1.0, 1.0)  # type: ignore[arg-type]
    for wrong in ((), ("colour",), ("state", "state"), ("state", "kernel")):
        with pytest.raises(TypeError, match="not a set of Machine's fields"):
            model.machine_changer(*wrong)
    with pytest.raises(TypeError):  # by position only
        model.restate(compact, state=MachineState.BOOTING, updated=1.0,  # type: ignore[call-arg]
                      state_since=1.0)


def _as_dataclasses_writes_it(cls: type) -> type:
    """A frozen slotted dataclass with ``cls``'s fields, its ``__init__`` dataclasses' own."""
    made = []
    for f in fields(cls):
        if f.default is not MISSING:
            made.append((f.name, f.type, field(default=f.default)))
        elif f.default_factory is not MISSING:
            made.append((f.name, f.type, field(default_factory=f.default_factory)))
        else:
            made.append((f.name, f.type))
    return make_dataclass(cls.__name__, made, frozen=True, slots=True)


def _values(value: object) -> tuple[object, ...]:
    return tuple(getattr(value, f.name) for f in fields(value))  # type: ignore[arg-type]


@pytest.mark.parametrize(("cls", "calls"), [
    (Event, [(("m-1", 1.0, "k"), {}), (("m-1", 1.0, "k", "msg"), {"data": {"a": 1}}),
             ((), {"machine": "m", "time": 2.0, "kind": "x", "message": "y"})]),
    (BootRequest, [((MacAddress.parse("02:00:00:00:00:01"),), {}),
                   ((), {"mac": MacAddress.parse("02:00:00:00:00:01"), "arch": Arch.X86_64,
                         "firmware": Firmware.IPXE, "serial": "s", "via": "dhcp"})]),
    (K3sJoin, [((Role.AGENT, None, True, "t"), {}),
               ((Role.SERVER, "https://x:6443", False, "t", {"l": "v"}, ("a",), "n", ("s",)),
                {})]),
    (BootPlan, [((BootAction.INSTALL, MacAddress.parse("02:00:00:00:00:01"), "why"), {}),
                ((BootAction.HOLD, MacAddress.parse("02:00:00:00:00:01"), "why", 5),
                 {"token": "tok", "command": "c", "group": "g"})]),
    (Identity, [((), {}), (((MacAddress.parse("02:00:00:00:00:01"),), "u", None, "a"), {})]),
    (Resolution, [((None,), {}), ((None, "mac"), {"absorb": (), "disagree": ()})]),
])
def test_a_values_init_sets_what_the_dataclass_init_sets(
        cls: type, calls: list[tuple[tuple[object, ...], dict[str, object]]]) -> None:
    """The hot values' ``__init__`` (model.slot_init) against dataclasses' own: the same
    fields from the same arguments, defaults and factories (a fresh dict each), and the same
    refusals of a missing or unknown argument."""
    reference = _as_dataclasses_writes_it(cls)
    for args, kwargs in calls:
        got, want = cls(*args, **kwargs), reference(*args, **kwargs)
        assert _values(got) == _values(want)
        assert got == cls(*args, **kwargs) and hash(repr(got))
    factories = [f.name for f in fields(cls) if f.default_factory is not MISSING]
    if factories:
        args, kwargs = calls[0]
        one, two = cls(*args, **kwargs), cls(*args, **kwargs)
        for name in factories:
            assert getattr(one, name) == getattr(reference(*args, **kwargs), name)
            assert getattr(one, name) is not getattr(two, name)
    if any(f.default is MISSING and f.default_factory is MISSING for f in fields(cls)):
        with pytest.raises(TypeError):
            cls()
    with pytest.raises(TypeError):
        cls(*calls[0][0], **calls[0][1], no_such_field=1)


def test_a_values_init_is_refused_where_dataclasses_would_do_more() -> None:
    @dataclass(frozen=True, slots=True)
    class Checked:
        a: int

        def __post_init__(self) -> None:
            raise ValueError

    @dataclass(frozen=True, slots=True)
    class KeywordOnly:
        a: int = field(kw_only=True)

    for cls in (Checked, KeywordOnly):
        with pytest.raises(TypeError):
            slot_init(cls)


def test_a_machine_without_its_seldom_set_fields_is_the_compact_layout() -> None:
    """A machine whose seldom-set fields (model._SELDOM_SET: its firmware, address, install
    token...) are all None takes no slot for them: issue 10's 100,000 machines enrolled and
    not yet booted, ~6 MiB less. Every way of making one gives the layout its values call
    for, so that equal values compare equal; each layout is frozen and reads every field."""
    from netboot.model import _SELDOM_SET, NO_ENTRIES, machine_of_values

    plain = Machine(macs=(MacAddress.parse("02:00:00:00:00:01"),), hostname="edge-1",
                    uuid="u", serial="SN1", cluster="edge", role=Role.AGENT, profile="p",
                    facts=NO_ENTRIES, created=1.0, updated=1.0)
    values = [getattr(plain, f.name) for f in fields(Machine)]
    compact = type(plain)
    assert compact is type(machine_of_values(values)) is type(replace(plain))
    assert all(getattr(plain, name) is first for name, first in _SELDOM_SET.items())
    # Any empty facts: read back as the shared empty mapping, equal to them.
    empty = Machine(**{**dict(zip([f.name for f in fields(Machine)], values, strict=True)),
                       "facts": {}})
    assert type(empty) is compact and empty == plain and empty.facts is NO_ENTRIES
    for name, value in (("asset", "a"), ("loader", LoaderChain.IPXE), ("arch", Arch.X86_64),
                        ("firmware", Firmware.UEFI), ("ipv4", "192.0.2.1"),
                        ("fixed_ipv4", "192.0.2.2"), ("facts", {"product": "x"}),
                        ("token_hash", "h"), ("token_expires", 1.0), ("install_token", "t")):
        assert name in _SELDOM_SET
        made = [replace(plain, **{name: value}), replace_machine(plain, **{name: value}),
                Machine(**{**{f.name: getattr(plain, f.name) for f in fields(Machine)},
                           name: value}),
                machine_of_values([value if f.name == name else getattr(plain, f.name)
                                   for f in fields(Machine)])]
        for machine in made:
            assert type(machine) is not compact and isinstance(machine, Machine)
            assert isinstance(machine, compact) and getattr(machine, name) == value
            assert machine == made[0]
            assert sys.getsizeof(machine) > sys.getsizeof(plain)
            with pytest.raises(FrozenInstanceError):
                setattr(machine, name, _SELDOM_SET[name])
            back = replace(machine, **{name: _SELDOM_SET[name]})
            assert back == plain and type(back) is compact
    for machine in (plain, replace(plain, arch=Arch.X86)):  # pickled and copied by value
        for again in (copy.copy(machine), copy.deepcopy(machine),
                      pickle.loads(pickle.dumps(machine))):
            assert again == machine and type(again) is type(machine)
    with pytest.raises(FrozenInstanceError):
        plain.asset = "a"  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        plain.hostname = "x"  # type: ignore[misc]
    assert repr(plain).startswith("Machine(macs=") and "asset=None" in repr(plain)


def test_a_value_filled_in_its_twin_comes_out_of_its_own_class_and_frozen() -> None:
    """Machines and the slot_init values are filled as a twin class of their layout that
    takes plain stores, then given their own class (model._twin): what every constructor
    gives is of the class itself (no twin escapes), refuses every field's assignment and
    deletion and reads back what it was given; a machine copies as itself. An instance of a
    subclass keeps its class (its fields set by their descriptors)."""
    from netboot.model import _CompactMachine, _WholeMachine, boot_request_of_values

    mac = MacAddress.parse("02:00:00:00:00:01")
    plain = Machine(macs=(mac,), hostname="edge-1", created=1.0, updated=2.0)
    booted = replace_machine(plain, state=MachineState.BOOTING, arch=Arch.X86_64,
                             install_token="t", updated=3.0)
    request = BootRequest(mac, Arch.X86_64, Firmware.IPXE, serial="s")
    made: list[object] = [
        plain, booted, replace(booted, hostname="b"), copy.copy(booted),
        Event("m-1", 1.0, "kind", "msg", {"a": "1"}),
        BootPlan(BootAction.INSTALL, mac, "why", machine=booted, token="tok"),
        K3sJoin(Role.AGENT, None, True, "t", {"l": "v"}), request,
        boot_request_of_values(tuple(getattr(request, f.name) for f in fields(request))),
        Identity((mac,), "u"), Resolution(None, "mac")]
    assert type(plain) is _CompactMachine and type(booted) is _WholeMachine
    assert booted.arch == Arch.X86_64 and booted.install_token == "t" and booted.updated == 3.0
    for value in made:
        kind = type(value)
        assert kind in (_CompactMachine, _WholeMachine, Event, BootPlan, K3sJoin, BootRequest,
                        Identity, Resolution)
        for f in fields(value):  # type: ignore[arg-type]
            with pytest.raises(FrozenInstanceError):
                setattr(value, f.name, None)
            with pytest.raises(FrozenInstanceError):
                delattr(value, f.name)
    for machine in made[:4]:  # a Machine's copy is its values', remade (Machine.__reduce__)
        assert machine == copy.copy(machine) and type(copy.deepcopy(machine)) is type(machine)
    assert made[-1] == Resolution(None, "mac") and made[7] == made[8]

    @dataclass(frozen=True, slots=True)
    class Point:
        x: int
        y: int = 0
        tags: dict[str, str] = field(default_factory=dict)

    class Named(Point):
        __slots__ = ()

    slot_init(Point)
    for cls in (Point, Named):
        one = cls(1, tags={"a": "b"})
        assert type(one) is cls and (one.x, one.y, one.tags) == (1, 0, {"a": "b"})
        assert cls(2).tags == {} and cls(2).tags is not cls(2).tags
        with pytest.raises(FrozenInstanceError):
            one.x = 2  # type: ignore[misc]


def test_a_value_made_by_position_is_the_class_calls_value() -> None:
    """The makers of the hot values by position (model.by_position: one Python call, no
    class call) give what the class called with the same values gives: of the class itself
    (no twin escapes), equal, with the same repr, every field read back as the very
    object given (an equal float in a compiled build), frozen; a value short or over
    refused."""
    from netboot.identity import identity_of, resolution_of
    from netboot.inventory.base import Batch, batch_of
    from netboot.model import by_position, event_of, join_of, plan_of
    from netboot.servers.fasthttp import Reply, reply_of

    mac = MacAddress.parse("02:00:00:00:00:01")
    machine = Machine(macs=(mac,), hostname="edge-1", created=1.0, updated=2.0)
    event = Event("m-1", 1.5, "install-plan", "install profile p", {"via": "http"})
    join = K3sJoin(Role.SERVER, "https://s:6443", False, "t", {"l": "v"}, ("a=b:NoSchedule",),
                   "node-1", ("s.example",))
    cases: list[tuple[type, object, tuple[object, ...]]] = [
        (Event, event_of, ("m-1", 1.5, "install-plan", "install profile p", {"via": "http"},
                           '{"via":"http"}')),
        (K3sJoin, join_of, (Role.SERVER, "https://s:6443", False, "t", {"l": "v"},
                            ("a=b:NoSchedule",), "node-1", ("s.example",))),
        (BootPlan, plan_of, (BootAction.INSTALL, mac, "why", 0, machine, "g", None, None, join,
                             "tok", None)),
        (BootPlan, plan_of, (BootAction.HOLD, mac, "held", 5, None, None, None, None, None, None,
                             "netboot machines approve x")),
        (Batch, batch_of, ((), (), (machine,), (event,), {machine.id: MachineState.ENROLLED},
                           {machine.id: 2.0}, (), {machine.id: machine},
                           frozenset({machine.id}))),
        (Identity, identity_of, ((mac,), "u", None, "a")),
        (Resolution, resolution_of, (machine, "mac", (), ())),
        (Resolution, resolution_of, (None, None, (), ())),
        (Reply, reply_of, (200, b"#!ipxe\n", "text/plain; charset=utf-8",
                           (("Cache-Control", "no-store"),))),
    ]
    for cls, maker, values in cases:
        assert len(values) == len(fields(cls))  # type: ignore[arg-type]
        made, called = maker(*values), cls(*values)  # type: ignore[operator]
        assert type(made) is cls and made == called and repr(made) == repr(called)
        for f, value in zip(fields(cls), values, strict=True):  # type: ignore[arg-type]
            got = getattr(made, f.name)
            # The very object (a compiled build's native class keeps a float unboxed:
            # an equal one of its type read back).
            assert got is value or (type(got) is type(value) is float and got == value)
            with pytest.raises(FrozenInstanceError):
                setattr(made, f.name, None)
        if maker is not cls:  # a generated maker (the class itself in a compiled build)
            with pytest.raises(TypeError):
                maker(*values[:-1])  # type: ignore[operator]
        with pytest.raises(TypeError):
            maker(*values, None)  # type: ignore[operator]
    assert Identity.of_request(BootRequest(mac, Arch.X86_64, Firmware.IPXE)) == Identity((mac,))

    @dataclass(frozen=True, slots=True)
    class Point:
        x: int
        y: int = 0

    slot_init(Point)
    point = by_position(Point)(1, 2)
    assert type(point) is Point and point == Point(1, 2)


@pytest.mark.parametrize(("url", "local", "expected"), [
    # A loopback host is the address the client reached (s36-user: a host without a
    # default route and no --advertise advertises 127.0.0.1).
    ("http://127.0.0.1:8080", "192.0.2.10", "http://192.0.2.10:8080"),
    ("http://127.0.0.1:8080/boot.ipxe?x=1", "198.51.100.10",
     "http://198.51.100.10:8080/boot.ipxe?x=1"),
    ("https://localhost:8443", "192.0.2.10", "https://192.0.2.10:8443"),
    ("http://127.0.1.1", "192.0.2.10", "http://192.0.2.10"),
    ("http://[::1]:8080", "2001:db8::10", "http://[2001:db8::10]:8080"),
    ("http://127.0.0.1:8080", "::ffff:192.0.2.10", "http://192.0.2.10:8080"),
    ("http://127.0.0.1:8080", "fe80::1%eth0", "http://[fe80::1]:8080"),
    # Anything else is the operator's choice, kept.
    ("http://192.0.2.10:8080", "198.51.100.10", "http://192.0.2.10:8080"),
    ("https://netboot.example", "198.51.100.10", "https://netboot.example"),
    ("http://127.0.0.1:8080", "127.0.0.1", "http://127.0.0.1:8080"),  # this host's client
    ("http://127.0.0.1:8080", "0.0.0.0", "http://127.0.0.1:8080"),
    ("http://127.0.0.1:8080", None, "http://127.0.0.1:8080"),
    ("http://127.0.0.1:8080", "not an address", "http://127.0.0.1:8080"),
    ("", "192.0.2.10", ""),
])
def test_a_loopback_url_is_the_address_the_client_reached(
        url: str, local: str | None, expected: str) -> None:
    from netboot.model import loopback_url, reached_url

    assert reached_url(url, local) == expected
    assert loopback_url(url) == (url != expected or url.startswith("http://127.0.0.1"))


@pytest.mark.parametrize(("url", "local", "expected"), [
    # The stand-in host (the first of several named interfaces' address, none given) is
    # the address the client reached, as dnsmasq's answers name the receiving interface's.
    ("http://192.0.2.10:8080/ipxe", "198.51.100.10", "http://198.51.100.10:8080/ipxe"),
    ("https://192.0.2.10:8443", "198.51.100.10", "https://198.51.100.10:8443"),
    ("http://192.0.2.10:8080", "192.0.2.10", "http://192.0.2.10:8080"),
    ("http://192.0.2.10:8080", "127.0.0.1", "http://192.0.2.10:8080"),  # this host's client
    ("http://192.0.2.10:8080", None, "http://192.0.2.10:8080"),
    # Another host, or one that only begins like it, is kept.
    ("http://192.0.2.100:8080", "198.51.100.10", "http://192.0.2.100:8080"),
    ("https://netboot.example", "198.51.100.10", "https://netboot.example"),
])
def test_the_stand_in_host_is_the_address_the_client_reached(
        url: str, local: str | None, expected: str) -> None:
    from netboot.model import reached_url, stands_in

    assert reached_url(url, local, "192.0.2.10") == expected
    assert reached_url(url, local) == url  # without a stand-in, kept
    assert stands_in(url, "192.0.2.10") == url.startswith(("http://192.0.2.10:",
                                                           "https://192.0.2.10:"))
    assert not stands_in(url, "")


@pytest.mark.parametrize(("agent_token", "secret"), [
    # netboot's secure form for agents (core._managed_join with a CA), k3s's parse of it.
    ("K10" + "ab" * 32 + "::node:" + "5e" * 16, "5e" * 16),
    ("f00d" * 8, "f00d" * 8),  # the bare secret (a cluster without a CA)
    ("", ""),  # none: agents join with the cluster's token
])
def test_a_clusters_agent_secret_is_the_password_k3s_servers_are_given(
        agent_token: str, secret: str) -> None:
    """The one parser of the agent token that a server's config (``agent-token``), the
    template check and the render's masking all use; k3s's token parse agrees on every form
    netboot stores (core.token_secret)."""
    from netboot.core import token_secret
    from netboot.model import Cluster

    cluster = Cluster("edge", token="t" * 32, agent_token=agent_token)
    assert cluster.agent_secret == secret == token_secret(agent_token)
    assert secret not in repr(cluster) or not secret
