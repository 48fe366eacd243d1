"""Group selection: request labels → the most specific matching group.

Ties are an error when groups are loaded, never a coin toss at boot time (DESIGN.md §2): two
groups of equal specificity conflict when some request could match both, that is when every key
they share has at least one value in common.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence

from netboot.errors import Conflict
from netboot.model import Group, Machine


def _norm(value: str) -> str:
    return value.strip().lower()


def selector_matches(selector: Mapping[str, Sequence[str]], labels: Mapping[str, str]) -> bool:
    """Every selector key must be present and equal (case-insensitive) to one of its values.

    A value may be a shell-style glob (``52:54:00:*``), as matchbox selectors cannot, because
    factory floors enroll by MAC prefix and product families.
    """
    for key, values in selector.items():
        have = labels.get(key)
        if have is None:
            return False
        have_n = _norm(have)
        if not any(fnmatch.fnmatchcase(have_n, _norm(v)) for v in values):
            return False
    return True


def _may_overlap(a: Group, b: Group) -> bool:
    for key in set(a.selector) & set(b.selector):
        av = {_norm(v) for v in a.selector[key]}
        bv = {_norm(v) for v in b.selector[key]}
        globbed = any(any(c in v for c in "*?[") for v in av | bv)
        if not globbed and not (av & bv):
            return False
    return True


def check_groups(groups: Iterable[Group]) -> None:
    """Raise Conflict naming two equally specific groups that can match one request."""
    items = list(groups)
    for i, a in enumerate(items):
        for b in items[i + 1:]:
            if a.specificity == b.specificity and _may_overlap(a, b):
                raise Conflict(
                    f"groups {a.name!r} and {b.name!r} are equally specific "
                    f"({a.specificity} selector keys) and can match the same machine; "
                    "add a selector key to one of them or make their values disjoint",
                    field="selector",
                )


def machine_labels(machine: Machine,
                   reported: Mapping[str, str] | None = None) -> dict[str, str]:
    """What selectors match a known machine on: its labels and firmware facts, then what its
    boot request ``reported``, then its identities, which nothing reported may override."""
    labels = dict(machine.labels)
    labels.update({k: v for k, v in machine.facts.items() if v})
    if reported is not None:
        labels.update(reported)
    # A selector on "mac" sees the machine's first NIC whichever port it booted from, so that
    # what a machine installs does not depend on the cable; one enrolled by serial has none.
    if machine.mac is not None:
        labels["mac"] = str(machine.mac)
    else:
        labels.pop("mac", None)
    for key in ("uuid", "serial", "asset", "hostname"):
        if getattr(machine, key):
            labels[key] = getattr(machine, key)
    if machine.arch:
        labels.setdefault("arch", str(machine.arch))
    if machine.firmware:
        labels.setdefault("firmware", str(machine.firmware))
    return labels


def select(groups: Iterable[Group], labels: Mapping[str, str]) -> Group | None:
    best: Group | None = None
    for group in groups:
        if selector_matches(group.selector, labels) and (
            best is None or group.specificity > best.specificity
        ):
            best = group
    return best
