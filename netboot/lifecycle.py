"""The machine lifecycle: every state, every event, one table. Nothing else writes a state.

A machine's state changes only because something happened to it: its firmware was seen, an
operator approved it, iPXE was handed an install script, the installer fetched its config or
reported progress, the installed OS registered, an operator asked for a reinstall. Each of
those is a :class:`Trigger`; :data:`TRANSITIONS` says, for each (state, trigger), the state it
leads to. A pair missing from the table is refused with :class:`~netboot.errors.
TransitionRefused` (a Conflict: 409 in the API), naming the current state and what it allows.
As in h11's ``_state.py``, the rules are data, so a test can walk every pair.

The rows below read as the product's rules:

* ``None`` is "not in the inventory": firmware seen → discovered; enrolled by an operator
  (API, CLI, import) → enrolled.
* discovered → enrolled by approval, an auto-enroll rule or an import naming it.
* enrolled / reinstall → booting when an install script is issued: the only step that mints
  an install token. A booting or installing machine that asks again (it rebooted mid-install)
  gets the same install and the same token, and its state does not move: the request is
  unauthenticated, and anyone on the network could otherwise restart an install in progress.
* booting → installing when its config is fetched or the installer says so; → installed or
  failed as the installer reports; → registered when the installed OS registers (an installer
  that reports nothing is proven installed by its registration).
* The config (it carries the cluster join token) is fetched only during an install: installed
  and registered machines refuse it.
* enrolled (or reinstall) → installed on an operator's word (``netboot machines
  mark-installed``, or the report with an operator token): one installed since a restored
  backup, or by other means.
* installed / registered boot the local disk (one-shot install: nothing sends them back to
  install but an explicit reinstall). A repeated ``installed`` report leaves it where it is;
  a second registration is refused (its token is spent): a reinstall issues a new one.
* failed holds until reinstall, so a broken install does not loop.
* reinstall can be asked for any enrolled machine, from any state but discovered.
* A booting, installing, installed or registered machine holds or runs its cluster's join
  (a token for it, a config naming it, k3s installed with it): it keeps its cluster and
  role until a reinstall (:func:`check_move`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from netboot.errors import Conflict, TransitionRefused
from netboot.model import Machine, MachineState, Role, replace_machine, restate


class Trigger(enum.StrEnum):
    """What happened to a machine (the value is the word used in messages)."""

    DISCOVER = "discover"  # its firmware asked for a boot and nobody knew it
    ENROLL = "enroll"  # an operator added it (API, CLI, bulk import)
    APPROVE = "approve"  # an operator approved a discovered machine
    AUTO_ENROLL = "auto-enroll"  # a discovery rule selected it
    INSTALL_PLAN = "install-plan"  # iPXE/pxelinux got an install script with a fresh token
    INSTALL_AGAIN = "install-again"  # asked again mid-install: the same script and token
    CONFIG_FETCHED = "config-fetched"  # the installer fetched its per-machine config
    INSTALLING = "installing"  # installer progress report
    INSTALLED = "installed"  # installer progress report
    FAILED = "failed"  # installer progress report
    REGISTER = "register"  # the installed OS registered with its install token
    REINSTALL = "reinstall"  # an operator asked for a fresh install


_S = MachineState
_T = Trigger

# (state before, what happened) → state after. ``None``: the machine is not in the inventory.
TRANSITIONS: Mapping[tuple[MachineState | None, Trigger], MachineState] = MappingProxyType({
    (None, _T.DISCOVER): _S.DISCOVERED,
    (None, _T.ENROLL): _S.ENROLLED,

    (_S.DISCOVERED, _T.ENROLL): _S.ENROLLED,
    (_S.DISCOVERED, _T.APPROVE): _S.ENROLLED,
    (_S.DISCOVERED, _T.AUTO_ENROLL): _S.ENROLLED,

    (_S.ENROLLED, _T.APPROVE): _S.ENROLLED,  # change cluster, role or profile before it first boots
    (_S.ENROLLED, _T.INSTALL_PLAN): _S.BOOTING,
    (_S.ENROLLED, _T.REINSTALL): _S.REINSTALL,
    # An operator's word only: an enrolled machine holds no install token, so no installer
    # can report it. A machine that installed after the backup a restore brought back (its
    # disk would be wiped at its next network boot), or one installed by other means
    # (matchbox's and Tinkerbell's allowPXE: false): `netboot machines mark-installed`.
    (_S.ENROLLED, _T.INSTALLED): _S.INSTALLED,

    (_S.BOOTING, _T.INSTALL_AGAIN): _S.BOOTING,
    (_S.BOOTING, _T.CONFIG_FETCHED): _S.INSTALLING,
    (_S.BOOTING, _T.INSTALLING): _S.INSTALLING,
    (_S.BOOTING, _T.INSTALLED): _S.INSTALLED,
    (_S.BOOTING, _T.FAILED): _S.FAILED,
    (_S.BOOTING, _T.REGISTER): _S.REGISTERED,
    (_S.BOOTING, _T.REINSTALL): _S.REINSTALL,

    (_S.INSTALLING, _T.INSTALL_AGAIN): _S.INSTALLING,
    (_S.INSTALLING, _T.CONFIG_FETCHED): _S.INSTALLING,
    (_S.INSTALLING, _T.INSTALLING): _S.INSTALLING,
    (_S.INSTALLING, _T.INSTALLED): _S.INSTALLED,
    (_S.INSTALLING, _T.FAILED): _S.FAILED,
    (_S.INSTALLING, _T.REGISTER): _S.REGISTERED,
    (_S.INSTALLING, _T.REINSTALL): _S.REINSTALL,

    (_S.INSTALLED, _T.INSTALLED): _S.INSTALLED,
    (_S.INSTALLED, _T.REGISTER): _S.REGISTERED,
    (_S.INSTALLED, _T.REINSTALL): _S.REINSTALL,

    (_S.REGISTERED, _T.REINSTALL): _S.REINSTALL,

    (_S.FAILED, _T.FAILED): _S.FAILED,
    (_S.FAILED, _T.REINSTALL): _S.REINSTALL,

    (_S.REINSTALL, _T.INSTALL_PLAN): _S.BOOTING,
    (_S.REINSTALL, _T.REINSTALL): _S.REINSTALL,
    # The operator's word again (a reinstall voids the install token: no installer reports
    # here): one in reinstall when the backup was taken, reinstalled since, which the
    # restore's warning counts; or a reinstall asked by mistake, taken back.
    (_S.REINSTALL, _T.INSTALLED): _S.INSTALLED,
})

STATES: tuple[MachineState | None, ...] = (None, *MachineState)

_REINSTALL = "netboot machines reinstall {ref}, POST /api/v1/machines/{ref}/reinstall"
_UNDER_WAY = ("its install is under way: wait for it to register, or begin it again "
              f"({_REINSTALL})")
_INSTALLED = ("it is installed and boots its disk: to install it again, or to give it another "
              f"cluster or role, ask for a reinstall first ({_REINSTALL})")

# What an operator does from each state, said with a refusal (TransitionRefused's fix):
# the steps a state allows are mostly a device's (install-plan, register), not an
# operator's way on. ``{ref}``: the machine as the refusal names it.
WAY_ON: Mapping[MachineState | None, str] = MappingProxyType({
    None: "add it first (netboot machines add, POST /api/v1/machines)",
    _S.DISCOVERED: ("approve it first (netboot machines approve {ref}, "
                    "POST /api/v1/machines/{ref}/approve)"),
    _S.ENROLLED: ("it is enrolled and installs at its next network boot (netboot explain "
                  "{ref}); to change its cluster, role or profile: netboot machines set {ref}"),
    _S.BOOTING: _UNDER_WAY,
    _S.INSTALLING: _UNDER_WAY,
    _S.INSTALLED: _INSTALLED,
    _S.REGISTERED: _INSTALLED,
    _S.FAILED: f"its install failed (netboot events {{ref}} says why): try again ({_REINSTALL})",
    _S.REINSTALL: ("a reinstall is asked and its next network boot installs it; to change "
                   "its cluster, role or profile first: netboot machines set {ref} "
                   "(PATCH /api/v1/machines/{ref})"),
})


def allowed(state: MachineState | None) -> tuple[Trigger, ...]:
    """The triggers the table accepts in ``state``, in declaration order."""
    return tuple(t for t in Trigger if (state, t) in TRANSITIONS)


def allows(state: MachineState | None, trigger: Trigger) -> bool:
    return (state, trigger) in TRANSITIONS


def apply(state: MachineState | None, trigger: Trigger, *,
          subject: str | Machine = "the machine") -> MachineState:
    """The state after ``trigger`` in ``state``; raises TransitionRefused if the table has no
    such edge, naming ``subject`` (a machine by its ref). Pure: no store, no clock."""
    # Raised outside any except block: a mypyc build (setup.py) drops "from None" and would
    # chain the KeyError into the refusal's traceback.
    after = TRANSITIONS.get((state, trigger))
    if after is None:
        # A machine named only here: its ref (its MAC's text) made for every step was ~600
        # of a first install's loop instructions, for a message never made (session 26).
        ref = subject if isinstance(subject, str) else subject.ref
        raise TransitionRefused(ref, state, trigger, allowed(state),
                                WAY_ON[state].format(ref=ref))
    return after


def advance(machine: Machine, trigger: Trigger, now: float, **changes: Any) -> Machine:
    """``machine`` after ``trigger``: the new state, any other field ``changes`` made in the
    same step (a new token, the address it registered from), and ``updated`` set to ``now``.

    A step that changes nothing (a repeated report) returns ``machine`` itself, ``updated``
    untouched: it feeds cloud-init's instance id, which must not move when a seed is re-read.
    """
    if "state" in changes or "updated" in changes:
        raise TypeError("advance() sets state and updated itself")
    state = apply(machine.state, trigger, subject=machine)
    if state == machine.state and all(getattr(machine, k, changes) == v
                                      for k, v in changes.items()):  # unknown: replace says
        return machine
    # One copy, not one to compare and another to stamp: a storm advances three times per
    # device, and copying a machine was most of what a report cost. A new state's time is
    # the update's own float (no object more; the codec writes it from that text).
    if state is not machine.state:
        # Boxed once: a compiled build (setup.py) holds a float argument as a double and
        # made an object for each keyword, two floats where one is meant.
        stamp: Any = now
        return replace_machine(machine, state=state, updated=stamp, state_since=stamp,
                               **changes)
    return replace_machine(machine, state=state, updated=now, **changes)


def moved(machine: Machine, trigger: Trigger, now: float) -> Machine:
    """:func:`advance` of a step that changes nothing but the state (a config fetched):
    no ``**changes`` to spread (~3,000 loop instructions a first config: s39-http1st), the
    same answer: ``machine`` itself where the state stays, else its copy stamped."""
    state = apply(machine.state, trigger, subject=machine)
    if state == machine.state:
        return machine
    stamp: Any = now  # boxed once, as advance's
    # By position (model.machine_changer): replace_machine's keywords were ~3,500 of a first
    # config's loop instructions (s40-http1st).
    return restate(machine, state, stamp, stamp)


def since(machine: Machine, state: MachineState, stamp: float) -> float | None:
    """The ``state_since`` of ``machine``'s copy in ``state`` stamped ``stamp``, for a step
    written out beside :func:`advance` (boot's install plan): the stamp where the state
    changes, as advance sets it, else the machine's own."""
    return stamp if state is not machine.state else machine.state_since


def first_state(trigger: Trigger, *, subject: str = "the machine") -> MachineState:
    """The state a machine is created in (discovered by its firmware, or enrolled)."""
    return apply(None, trigger, subject=subject)


# The states in which a machine holds its cluster's join (an install token for it, a config
# that names the cluster's server and token) or runs it (k3s installed with them): the
# cluster and role it has are the ones it joined, and its cluster's endpoint, DNS name and
# servers are reckoned from them.
JOINED: frozenset[MachineState] = frozenset({_S.BOOTING, _S.INSTALLING, _S.INSTALLED,
                                              _S.REGISTERED})


def check_move(machine: Machine, cluster: str | None, role: Role | None) -> None:
    """Refuse (a Conflict naming the field) to give ``machine`` another cluster or role
    while it is in :data:`JOINED`: a registered server moved to another cluster would be
    that cluster's endpoint at once while it runs the old one's k3s with the old token (the
    new cluster's nodes sent to it, its own still counting it), until it installs again.
    A reinstall first ends the join (its token void, out of the old cluster's servers);
    then the move is taken and the next install joins the new cluster (session 36)."""
    if machine.state not in JOINED:
        return
    field = ("cluster" if cluster != machine.cluster
             else "role" if role != machine.role else None)
    if field is None:
        return
    raise Conflict(
        f"{machine.ref} is {machine.state}: it joined cluster {machine.cluster or '(none)'} "
        f"as {machine.role or '(no role)'} and stays in it until it installs again; ask for "
        f"that first (netboot machines reinstall {machine.ref}), then change its {field}",
        field=field)
