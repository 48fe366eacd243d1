"""The secrets inside stored values, sealed on write and opened on read (every store on disk).

A cluster's join token, agent token and k3s CA key, and a machine's install token while its
install is under way (it opens the machine's config, which carries the join token), are sealed
with the injected :class:`~netboot.inventory.base.Sealer`, each bound to the cluster or
machine it belongs to: the database file, its logs and its backups never hold them in clear.
Callers see plain values. Without a sealer (tests, ``--memory``) values pass through unchanged.
"""

from __future__ import annotations

import collections
from typing import Any

from netboot.inventory import codec
from netboot.inventory.base import Sealer
from netboot.model import Cluster, Machine, MachineState, replace_machine


def install_token_context(machine_id: str) -> str:
    return f"install token of machine {machine_id}"


def join_token_context(cluster: str) -> str:
    # Authenticated with the sealed token: a token copied to another cluster's row won't open.
    return f"join token of cluster {cluster!r}"


def ca_key_context(cluster: str) -> str:
    # As the join token's: bound to its cluster.
    return f"k3s CA key of cluster {cluster!r}"


def agent_token_context(cluster: str) -> str:
    # As the join token's: bound to its cluster.
    return f"agent token of cluster {cluster!r}"


# The secrets of a cluster's stored form, each with the context it is sealed under.
_CLUSTER_SECRETS = (("token", join_token_context), ("ca_key", ca_key_context),
                    ("agent_token", agent_token_context))


# Machines whose install token's sealed form is kept (Sealed.sealed_token, open_machine): a
# storm's installs under way, each updated a few times (booting, installing, its events'
# facts). A storm's first config comes a minute or two after its install script: 4,096 kept
# the sealed forms of the last second of a storm's installs (~4,500 a second), and every
# config of a larger storm sealed its token anew (~18,500 of a first config's ~484,000 loop
# instructions, session 27). Each kept form costs ~340 bytes (its tuple, its text, the
# ordered dict's slot and link; the id and the token are the machine's own strings): ~45 MB
# at most, ~34 MB with a storm of 100,000 machines' installs under way.
_KEPT_SEALS = 1 << 17

# The states of a machine whose install is under way: its token (minted with its install
# script) is written again at each of its updates until it registers, whose machine token
# (the same field, sealed alike) is written again only at its later boots' reports. Only
# these machines' sealed forms are kept: a registered machine's two (its spent install
# token's, its machine token's) were kept until the bound pushed them out, 2 a machine
# after a storm (~0.7 MB for 1,000; ~45 MB at the bound), and the view's load kept one for
# every registered machine of the fleet (s41-mem).
# (A tuple: ``in`` finds a member by identity, where a frozenset hashes the enum first.)
_UNDER_WAY = (MachineState.BOOTING, MachineState.INSTALLING, MachineState.INSTALLED)


class Sealed:
    def __init__(self, sealer: Sealer | None) -> None:
        self.sealer = sealer
        # machine id -> (its token in clear, that token's sealed form), oldest first; one a
        # machine, of those whose install is under way (_UNDER_WAY). An OrderedDict, not a
        # dict: dropping a plain dict's first key (next(iter(...))) walks every slot freed
        # since it was last resized, ~1 µs of the event loop per first install once full.
        self._seals: collections.OrderedDict[str, tuple[str, str]] = \
            collections.OrderedDict()

    def seal_machine(self, machine: Machine) -> Machine:
        sealed = self.sealed_token(machine)
        return machine if sealed is None else replace_machine(machine, install_token=sealed)

    def sealed_token(self, machine: Machine) -> str | None:
        """What a store writes in place of ``machine``'s install token; None when the token
        is written as it is (none, no sealer, or sealed already). For a writer that encodes
        the machine with it (SQLite's rows) instead of a sealed copy of the machine."""
        token = machine.install_token
        sealer = self.sealer
        if sealer is None:
            return None
        if machine.state not in _UNDER_WAY:
            # Registered (its machine token, written again only at its later boots'
            # reports), failed, enrolled again: nothing kept, its install's form let go.
            self._seals.pop(machine.id, None)
            if not token or sealer.is_sealed(token):
                return None
            return sealer.seal(token, context=install_token_context(machine.id))
        if not token or sealer.is_sealed(token):
            return None
        # A machine's token is sealed once and that text written again at each update of
        # the machine while its install is under way (booting -> installing, facts): a new
        # nonce each time was ~3 µs of the event loop per update and said nothing new. The
        # same clear text under the same context and key gives the same sealed text, which
        # reveals only that the token did not change, as the row itself does.
        seals = self._seals
        kept = seals.get(machine.id)
        if kept is not None:
            if kept[0] == token:
                return kept[1]
            del seals[machine.id]  # its earlier token's (a reinstall): one a machine
        elif len(seals) >= _KEPT_SEALS:  # (not _keep: a first install's path)
            seals.popitem(last=False)
        sealed = sealer.seal(token, context=install_token_context(machine.id))
        seals[machine.id] = (token, sealed)
        return sealed

    def open_machine(self, machine: Machine | None, *, keep: bool = False) -> Machine | None:
        """``machine`` as read, its install token opened. ``keep``: its sealed form is kept
        as :meth:`sealed_token` keeps those it makes (its install under way), so that the
        machine written again with that token (its config fetched: booting -> installing)
        writes that text again, not a new seal; for the event loop's reads (the view's
        load) only, not a thread's."""
        if machine is None or self.sealer is None or not machine.install_token:
            return machine
        sealed = machine.install_token
        token = self.sealer.unseal(sealed, context=install_token_context(machine.id))
        # (A value from before sealing is not kept: the start-up migration seals it.)
        if keep and token != sealed and machine.state in _UNDER_WAY:
            self._keep(machine.id, token, sealed)
        return replace_machine(machine, install_token=token)

    def _keep(self, machine_id: str, token: str, sealed: str) -> None:
        seals = self._seals
        if machine_id in seals:
            seals.move_to_end(machine_id)
        elif len(seals) >= _KEPT_SEALS:
            seals.popitem(last=False)
        seals[machine_id] = (token, sealed)

    def as_read(self, stored: Machine, sealed: Machine, given: Machine) -> Machine | None:
        """What a read gives back of ``stored``, the stored form (codec.stored_machine) of
        ``sealed = seal_machine(given)``, without decoding or unsealing: ``given`` itself
        when it was in stored form already, its token in clear. None when ``given`` came
        with its token sealed already (a copied row): only a read can tell what it opens
        to, if anything."""
        token = given.install_token
        if self.sealer is not None and token and self.sealer.is_sealed(token):
            return None
        if stored is sealed:
            return given  # in stored form: only its token was sealed, if any
        # Normalised on the way in: as stored, with the token given in clear.
        return stored if sealed is given else codec.stored_machine(given)

    def cluster_data(self, cluster: Cluster) -> dict[str, Any]:
        """The stored form of ``cluster``: checked, its join token sealed."""
        data = codec.cluster_to_dict(cluster)
        codec.cluster_from_dict(data)
        if self.sealer is not None:
            for key, context in _CLUSTER_SECRETS:
                if data.get(key):
                    data[key] = self.sealer.seal(data[key], context=context(cluster.name))
        return data

    def open_cluster(self, data: Any) -> Cluster:
        if self.sealer is not None and isinstance(data, dict):
            name = str(data.get("name"))
            for key, context in _CLUSTER_SECRETS:
                if data.get(key):
                    data[key] = self.sealer.unseal(str(data[key]), context=context(name))
        return codec.cluster_from_dict(data)
