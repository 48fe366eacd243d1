"""The machine lifecycle: every allowed and every refused (state, event) pair, the product's
rules read off the table, the one-writer rule, and what the API and CLI answer when a step is
refused."""

from __future__ import annotations

import ast
import itertools
import traceback
from pathlib import Path
from typing import Any

import pytest

from netboot.cli import main
from netboot.errors import Conflict, TransitionRefused
from netboot.lifecycle import (
    JOINED,
    STATES,
    TRANSITIONS,
    WAY_ON,
    Trigger,
    advance,
    allowed,
    allows,
    apply,
    check_move,
    first_state,
)
from netboot.model import MacAddress, Machine, MachineState, Role
from tests.conftest import Env, Reply, boot, call, install_token, write_config

S = MachineState
MAC = "52:54:00:12:34:56"
HEXHYP = "52-54-00-12-34-56"

ALLOWED = sorted(TRANSITIONS.items(), key=lambda kv: (str(kv[0][0]), kv[0][1]))
REFUSED = [(state, trigger) for state, trigger in itertools.product(STATES, Trigger)
           if (state, trigger) not in TRANSITIONS]


def pair_id(value: Any) -> str:
    return str(value) if value is not None else "new"


# --- the table, pair by pair -----------------------------------------------------------------


def test_the_walk_covers_the_whole_product() -> None:
    assert len(ALLOWED) + len(REFUSED) == len(STATES) * len(Trigger)
    assert set(STATES) == {None, *MachineState}


@pytest.mark.parametrize(("pair", "after"), ALLOWED, ids=[
    f"{pair_id(s)}+{t}" for (s, t), _ in ALLOWED])
def test_every_allowed_step(pair: tuple[MachineState | None, Trigger], after: MachineState,
                            ) -> None:
    state, trigger = pair
    assert allows(state, trigger) and trigger in allowed(state)
    assert apply(state, trigger) == after
    if state is None:
        assert first_state(trigger) == after
        return
    machine = Machine(macs=(MacAddress.parse(MAC),), state=state, updated=1.0)
    moved = advance(machine, trigger, 2.0)
    assert moved.state == after
    # A real change is stamped; a repeat that changes nothing is the same machine, unstamped.
    assert moved.updated == (2.0 if after != state else 1.0)
    assert advance(machine, trigger, 3.0, hostname="h").updated == 3.0


@pytest.mark.parametrize(("state", "trigger"), REFUSED, ids=[
    f"{pair_id(s)}+{t}" for s, t in REFUSED])
def test_every_refused_step(state: MachineState | None, trigger: Trigger) -> None:
    assert not allows(state, trigger) and trigger not in allowed(state)
    with pytest.raises(TransitionRefused) as info:
        apply(state, trigger, subject=MAC)
    exc = info.value
    assert isinstance(exc, Conflict)  # the API's 409
    assert (exc.state, exc.event) == (state, trigger)
    text = str(exc)
    assert text.startswith(MAC)
    assert (f"is {state};" if state is not None else "is not in the inventory;") in text
    assert f"'{trigger}' is not allowed" in text
    where = "there" if state is None else f"in {state}"
    assert text.endswith(f"(steps allowed {where}: {', '.join(allowed(state)) or 'nothing'})")
    assert f": {WAY_ON[state].format(ref=MAC)} (" in text  # the operator's way on from it
    if state is not None:
        machine = Machine(macs=(MacAddress.parse(MAC),), state=state, updated=1.0)
        with pytest.raises(TransitionRefused) as refused:
            advance(machine, trigger, 2.0, hostname="changed")
        # advance() names the machine by its ref, made only for the refusal: its MAC, or
        # its id where it has none.
        assert str(refused.value) == text
        nameless = Machine(macs=(), state=state, updated=1.0)
        with pytest.raises(TransitionRefused) as refused:
            advance(nameless, trigger, 2.0)
        assert str(refused.value).startswith(f"{nameless.id} is ")


def test_message_reads_as_an_answer() -> None:
    with pytest.raises(TransitionRefused) as info:
        apply(S.INSTALLED, Trigger.INSTALLING, subject=MAC)
    assert str(info.value) == (
        f"{MAC} is installed; 'installing' is not allowed: it is installed and boots its "
        "disk: to install it again, or to give it another cluster or role, ask for a "
        f"reinstall first (netboot machines reinstall {MAC}, POST /api/v1/machines/{MAC}/"
        "reinstall) (steps allowed in installed: installed, register, reinstall)")


def test_advance_does_not_take_a_state() -> None:
    machine = Machine(macs=(MacAddress.parse(MAC),), state=S.ENROLLED)
    with pytest.raises(TypeError):
        advance(machine, Trigger.INSTALL_PLAN, 1.0, state=S.REGISTERED)


# --- the product's rules, read off the table -------------------------------------------------


def reachable(start: MachineState | None) -> set[MachineState]:
    seen: set[MachineState] = set()
    todo = [start]
    while todo:
        state = todo.pop()
        for trigger in allowed(state):
            after = apply(state, trigger)
            if after not in seen:
                seen.add(after)
                todo.append(after)
    return seen


def test_every_state_is_reachable_and_every_machine_can_end_registered() -> None:
    assert reachable(None) == set(MachineState)
    for state in MachineState:
        assert S.REGISTERED in reachable(state), state


def test_one_shot_install() -> None:
    """Installed and registered machines never go back to installing by themselves."""
    for state in (S.INSTALLED, S.REGISTERED):
        for trigger in allowed(state):
            after = apply(state, trigger)
            assert after in (S.INSTALLED, S.REGISTERED) or trigger == Trigger.REINSTALL
        assert not allows(state, Trigger.INSTALL_PLAN)


def test_failed_holds_until_reinstall() -> None:
    assert set(allowed(S.FAILED)) == {Trigger.FAILED, Trigger.REINSTALL}
    assert apply(S.FAILED, Trigger.FAILED) == S.FAILED


def test_only_an_install_plan_leads_to_booting_and_only_an_operator_to_reinstall() -> None:
    for (before, trigger), after in TRANSITIONS.items():
        if after == S.BOOTING and before != S.BOOTING:
            assert trigger == Trigger.INSTALL_PLAN
        if after == S.REINSTALL:
            assert trigger == Trigger.REINSTALL


def test_an_install_under_way_is_never_restarted_by_a_script_request() -> None:
    """Only enrolled and reinstall machines get a new install (and token); booting and
    installing ones asking again keep their state and their install."""
    assert {s for (s, t) in TRANSITIONS if t == Trigger.INSTALL_PLAN} == {S.ENROLLED,
                                                                          S.REINSTALL}
    for state in (S.BOOTING, S.INSTALLING):
        assert apply(state, Trigger.INSTALL_AGAIN) == state
        assert not allows(state, Trigger.INSTALL_PLAN)


def test_config_and_registration_only_during_an_install() -> None:
    assert {s for (s, t) in TRANSITIONS if t == Trigger.CONFIG_FETCHED} == {S.BOOTING,
                                                                            S.INSTALLING}
    assert not allows(S.REGISTERED, Trigger.REGISTER)


def test_discovered_needs_enrolment_first() -> None:
    assert set(allowed(S.DISCOVERED)) == {Trigger.ENROLL, Trigger.APPROVE, Trigger.AUTO_ENROLL}
    assert {first_state(Trigger.DISCOVER), first_state(Trigger.ENROLL)} == {S.DISCOVERED,
                                                                            S.ENROLLED}


# --- one writer --------------------------------------------------------------------------------


PKG = Path(__file__).resolve().parent.parent / "netboot"


def test_nothing_but_the_lifecycle_writes_a_state() -> None:
    """``replace(..., state=...)`` and ``Machine(state=...)`` only with a value straight from
    the table (a ``lifecycle.`` call). The inventory's codec decodes stored states, which is
    reading, not writing."""
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel in ("lifecycle.py", "inventory/codec.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(
                node.func, "attr", "")
            for kw in node.keywords:
                if kw.arg != "state" or name not in ("replace", "Machine"):
                    continue
                value = kw.value
                from_table = (isinstance(value, ast.Call)
                              and isinstance(value.func, ast.Attribute)
                              and isinstance(value.func.value, ast.Name)
                              and value.func.value.id == "lifecycle")
                if not from_table:
                    bad.append(f"{rel}:{node.lineno}")
    assert not bad, f"state written outside netboot.lifecycle: {bad}"


# --- at the edges: 409 naming the state, 400 for a state in a body ----------------------------


def refused(reply: Reply, state: str) -> dict[str, Any]:
    assert reply.status == 409, (reply.status, reply.text)
    body: dict[str, Any] = reply.json()
    assert body["state"] == state and f"is {state};" in body["error"], body
    return body


async def device(env: Env, token: str, kind: str) -> Reply:
    return await call(env, "POST", f"/api/v1/machines/{HEXHYP}/events",
                      json_body={"kind": kind}, headers={"Authorization": f"Bearer {token}"},
                      admin=False)


async def state_of(env: Env) -> str:
    out: str = (await env.get(f"/api/v1/machines/{MAC}"))["state"]
    return out


async def test_api_refuses_illegal_steps_with_409_naming_the_state(env: Env) -> None:
    await env.seed()
    await boot(env, MAC)  # discovered (policy ignore records it)
    body = refused(await call(env, "POST", f"/api/v1/machines/{MAC}/reinstall"), "discovered")
    assert body["event"] == "reinstall" and "approve" in body["error"]
    assert (await call(env, "POST", f"/api/v1/machines/{MAC}/approve", json_body={})).status \
        == 200
    token = install_token(await boot(env, MAC))
    assert await state_of(env) == "booting"
    refused(await call(env, "POST", f"/api/v1/machines/{MAC}/approve", json_body={}), "booting")
    assert (await device(env, token, "installed")).status == 201
    body = refused(await device(env, token, "installing"), "installed")
    assert "'installing' is not allowed" in body["error"] and "reinstall" in body["error"]
    refused(await device(env, token, "failed"), "installed")
    assert (await device(env, token, "installed")).status == 201  # a retried report is fine
    assert (await device(env, token, "progress")).status == 201  # not a step: recorded only
    assert await state_of(env) == "installed"
    # The refused reports left no trace but the refusal: the machine's story stays true.
    kinds = [e["kind"] for e in await env.get(f"/api/v1/machines/{MAC}/events")]
    assert kinds.count("installing") == 0 and kinds.count("failed") == 0


async def test_failed_machine_gets_neither_config_nor_registration(env: Env) -> None:
    await env.seed()
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    token = install_token(await boot(env, MAC))
    assert (await device(env, token, "failed")).status == 201
    refused(await call(env, "GET", f"/config/{HEXHYP}?token={token}", admin=False), "failed")
    r = await call(env, "POST", "/api/v1/register", admin=False,
                   json_body={"mac": MAC, "token": token, "addresses": ["192.0.2.7"]})
    refused(r, "failed")
    assert await state_of(env) == "failed"
    assert (await call(env, "POST", f"/api/v1/machines/{MAC}/reinstall")).status == 200
    assert await state_of(env) == "reinstall"


@pytest.mark.parametrize("method", ["POST", "PATCH"])
@pytest.mark.parametrize("value", ["installed", "enrolled", "registered", None, "melted"])
async def test_api_cannot_set_a_state(env: Env, method: str, value: Any) -> None:
    await env.seed()
    if method == "PATCH":
        await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    path = "/api/v1/machines" + (f"/{MAC}" if method == "PATCH" else "")
    r = await call(env, method, path, json_body={"mac": MAC, "state": value})
    assert r.status == 400, r.text
    assert r.json()["field"] == "state"
    assert "approve" in r.json()["error"] and "reinstall" in r.json()["error"]
    after = await env.get("/api/v1/machines")
    assert [m["state"] for m in after["items"]] == (["enrolled"] if method == "PATCH" else [])


def test_cli_names_the_state_it_refuses(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(write_config(tmp_path))
    assert main(["machines", "add", MAC, "--config", cfg]) == 0
    assert main(["machines", "reinstall", MAC, "--config", cfg]) == 0
    capsys.readouterr()
    rc = main(["machines", "approve", MAC, "--config", cfg])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.strip() == (
        f"netboot: {MAC} is reinstall; 'approve' is not allowed: a reinstall is asked and its "
        "next network boot installs it; to change its cluster, role or profile first: netboot "
        f"machines set {MAC} (PATCH /api/v1/machines/{MAC}) (steps allowed in reinstall: "
        "install-plan, installed, reinstall)")


def test_a_refused_transition_does_not_chain_the_table_lookup_into_its_traceback() -> None:
    # The same in both builds: a mypyc build (setup.py) drops "raise ... from None", so the
    # refusal is raised outside the lookup's except block, not suppressed by "from None".
    with pytest.raises(TransitionRefused) as refused:
        apply(None, Trigger.REGISTER)  # not in the inventory: nothing to register
    shown = "".join(traceback.format_exception(refused.value))
    assert "KeyError" not in shown and "During handling" not in shown, shown


@pytest.mark.parametrize("state", list(MachineState), ids=str)
def test_a_machine_keeps_the_cluster_and_role_it_joined_until_a_reinstall(
        state: MachineState) -> None:
    """Booting to registered, it holds or runs its cluster's join: another cluster or role is
    refused naming the field and the reinstall that ends the join (s36-journey); in any
    other state the next install takes it."""
    machine = Machine(macs=(MacAddress.parse(MAC),), state=state, cluster="edge",
                      role=Role.SERVER)
    check_move(machine, "edge", Role.SERVER)  # no change is never refused
    for cluster, role, field in (("far", Role.SERVER, "cluster"), (None, Role.SERVER, "cluster"),
                                 ("edge", Role.AGENT, "role"), ("far", Role.AGENT, "cluster")):
        if state not in JOINED:
            check_move(machine, cluster, role)
            continue
        with pytest.raises(Conflict) as refused:
            check_move(machine, cluster, role)
        assert refused.value.field == field
        assert f"netboot machines reinstall {MAC}" in str(refused.value)
    assert {S.BOOTING, S.INSTALLING, S.INSTALLED, S.REGISTERED} == JOINED


async def test_an_operator_marks_an_enrolled_machine_installed_and_it_boots_its_disk(
        env: Env) -> None:
    """After a restored backup, a machine that installed since is enrolled again: an
    operator's installed report (its token is OPERATE's) takes it to installed, and its next
    network boot is the local disk, not an install that wipes it. Nobody else can: an
    enrolled machine holds no install token, so a stranger's report is refused unread."""
    await env.seed()
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    stranger = await call(env, "POST", f"/api/v1/machines/{HEXHYP}/events",
                          json_body={"kind": "installed"}, admin=False)
    assert stranger.status in (401, 403), stranger.text
    assert await state_of(env) == "enrolled"
    r = await call(env, "POST", f"/api/v1/machines/{HEXHYP}/events",
                   json_body={"kind": "installed", "message": "installed before the restore"})
    assert r.status == 201, r.text
    assert await state_of(env) == "installed"
    script = await boot(env, MAC)
    assert "sanboot" in script or "exit" in script, script
    assert "kernel " not in script and "token=" not in script, script
    kinds = [e["kind"] for e in await env.get(f"/api/v1/machines/{MAC}/events")]
    assert "install-plan" not in kinds and kinds[-1] in ("installed", "local-boot"), kinds
