"""netboot.inventory.sealed: a machine's install token sealed on its way to the store."""

from __future__ import annotations

import pytest

from netboot.errors import StoreError
from netboot.inventory import sealed as sealed_module
from netboot.inventory.sealed import Sealed, install_token_context
from netboot.model import Machine, MachineState, replace_machine
from netboot.sealing import Sealer


def _machine(mid: str, token: str) -> Machine:
    return Machine(id=mid, state=MachineState.BOOTING, install_token=token)


def test_a_machines_token_is_sealed_once_and_written_again_at_its_next_updates() -> None:
    sealer = Sealer.generate()
    sealed = Sealed(sealer)
    booting = _machine("m-000000000001", "t" * 43)
    first = sealed.seal_machine(booting)
    again = sealed.seal_machine(replace_machine(booting, state=MachineState.INSTALLING))
    assert first.install_token != booting.install_token
    assert sealer.is_sealed(first.install_token or "")
    # The same text: a fresh nonce at each update said nothing new (~3 µs each).
    assert again.install_token == first.install_token
    assert again.state is MachineState.INSTALLING
    assert sealer.unseal(again.install_token or "",
                         context=install_token_context(booting.id)) == "t" * 43


def test_a_token_is_sealed_to_its_machine_and_a_new_token_sealed_anew() -> None:
    sealer = Sealer.generate()
    sealed = Sealed(sealer)
    one = sealed.seal_machine(_machine("m-000000000001", "same-token"))
    other = sealed.seal_machine(_machine("m-000000000002", "same-token"))
    assert one.install_token != other.install_token
    with pytest.raises(StoreError, match="damaged"):  # bound to its own machine
        sealer.unseal(other.install_token or "",
                      context=install_token_context("m-000000000001"))
    renewed = sealed.seal_machine(_machine("m-000000000001", "new-token"))
    assert renewed.install_token != one.install_token
    assert sealer.unseal(renewed.install_token or "",
                         context=install_token_context("m-000000000001")) == "new-token"


def test_a_token_opened_from_a_read_is_written_again_as_it_was_read() -> None:
    """A machine read (the view's load: ``keep``) and written again with its token writes
    the sealed text it was read with, not a new seal; a read that does not keep it, or a
    new token, is sealed anew."""
    sealer = Sealer.generate()
    booting = _machine("m-000000000001", "t" * 43)
    stored = Sealed(sealer).seal_machine(booting)  # as another process wrote it
    sealed = Sealed(sealer)
    read = sealed.open_machine(stored, keep=True)
    assert read == booting
    installing = replace_machine(read, state=MachineState.INSTALLING)
    assert sealed.sealed_token(installing) == stored.install_token
    assert sealed.seal_machine(installing).install_token == stored.install_token
    other = Sealed(sealer)
    assert other.open_machine(stored) == booting
    assert other.sealed_token(installing) != stored.install_token  # not kept: sealed anew
    renewed = sealed.sealed_token(replace_machine(read, install_token="u" * 43))
    assert renewed is not None and renewed != stored.install_token
    assert sealer.unseal(renewed, context=install_token_context(booting.id)) == "u" * 43
    # A token from before sealing (no prefix: the start-up migration seals it) is not kept.
    before = _machine("m-000000000002", "v" * 43)
    assert sealed.open_machine(before, keep=True) == before
    assert sealed.sealed_token(before) != before.install_token


def test_the_sealed_forms_kept_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sealed_module, "_KEPT_SEALS", 8)
    sealer = Sealer.generate()
    sealed = Sealed(sealer)
    first = sealed.seal_machine(_machine("m-000000000000", "tok"))
    for i in range(1, 20):
        sealed.seal_machine(_machine(f"m-{i:012x}", "tok"))
    assert len(sealed._seals) == 8
    # The oldest was let go: sealed again, with a new nonce, still opening to its token.
    redone = sealed.seal_machine(_machine("m-000000000000", "tok"))
    assert redone.install_token != first.install_token
    assert sealer.unseal(redone.install_token or "",
                         context=install_token_context("m-000000000000")) == "tok"


def test_without_a_sealer_or_with_a_sealed_token_a_machine_passes_unchanged() -> None:
    plain = _machine("m-000000000001", "clear")
    assert Sealed(None).seal_machine(plain) is plain
    sealer = Sealer.generate()
    already = replace_machine(plain, install_token=sealer.seal(
        "clear", context=install_token_context(plain.id)))
    assert Sealed(sealer).seal_machine(already) is already


def test_only_an_install_under_way_keeps_its_sealed_form() -> None:
    """The sealed form is kept while the install is under way (booting, installing,
    installed: each update writes that text again), one a machine; the registration's write
    (its machine token in the same field) lets it go and keeps none: a storm's registered
    machines kept two each (their spent install token's, their machine token's) until the
    bound pushed them out, ~0.7 MB a 1,000-device storm, ~45 MB at the bound (s41-mem)."""
    sealer = Sealer.generate()
    sealed = Sealed(sealer)
    booting = _machine("m-000000000001", "t" * 43)
    first = sealed.sealed_token(booting)
    for state in (MachineState.INSTALLING, MachineState.INSTALLED):
        assert sealed.sealed_token(replace_machine(booting, state=state)) == first
    assert len(sealed._seals) == 1
    registered = replace_machine(booting, state=MachineState.REGISTERED,
                                 install_token="m" * 43)
    token = sealed.sealed_token(registered)
    assert token is not None and len(sealed._seals) == 0
    assert sealer.unseal(token, context=install_token_context(booting.id)) == "m" * 43
    # Its later writes (a later boot's report) seal anew, still to its machine.
    later = sealed.sealed_token(replace_machine(registered, hostname="n1"))
    assert later is not None and later != token and len(sealed._seals) == 0
    assert sealer.unseal(later, context=install_token_context(booting.id)) == "m" * 43
    # A reinstall's new token replaces its machine's form: one a machine, never two.
    again = replace_machine(booting, install_token="u" * 43)
    renewed = sealed.sealed_token(again)
    assert renewed != first and len(sealed._seals) == 1
    assert sealed.sealed_token(replace_machine(again, state=MachineState.INSTALLING)) == renewed
    # Failed, or its token cleared (a claim): let go too.
    sealed.sealed_token(replace_machine(again, state=MachineState.FAILED))
    assert len(sealed._seals) == 0


def test_the_views_load_keeps_the_sealed_forms_of_installs_under_way_only() -> None:
    """The view's load (``keep``) of a fleet whose machines registered keeps nothing: each
    registered machine's machine token is sealed in the same field, and kept it cost ~340
    bytes a machine, up to ~45 MB (131,072) in a restarted server's resident memory."""
    sealer = Sealer.generate()
    writer = Sealed(sealer)
    rows = [writer.seal_machine(replace_machine(_machine(f"m-{i:012x}", f"tok{i}"),
                                                state=state))
            for i, state in enumerate((MachineState.BOOTING, MachineState.REGISTERED,
                                       MachineState.INSTALLED, MachineState.FAILED))]
    sealed = Sealed(sealer)
    read = [sealed.open_machine(row, keep=True) for row in rows]
    assert [m.install_token for m in read if m is not None] == ["tok0", "tok1", "tok2", "tok3"]
    assert len(sealed._seals) == 2  # the booting and the installed machine's
    for row, machine in zip(rows[::2], read[::2], strict=True):
        assert machine is not None and sealed.sealed_token(machine) == row.install_token
