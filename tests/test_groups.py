"""Group selection: most specific wins; equally specific overlapping groups are refused."""

from __future__ import annotations

import pytest

from netboot.errors import Conflict
from netboot.groups import check_groups, select, selector_matches
from netboot.model import Group


def g(name: str, **selector: object) -> Group:
    return Group(name=name, selector={k: tuple(v) if isinstance(v, list) else (str(v),)
                                      for k, v in selector.items()})


def test_most_specific_wins() -> None:
    groups = [g("all"), g("x86", arch="x86_64"), g("x86-dell", arch="x86_64", manufacturer="Dell")]
    assert select(groups, {"arch": "x86_64", "manufacturer": "dell"}).name == "x86-dell"  # type: ignore[union-attr]
    assert select(groups, {"arch": "x86_64", "manufacturer": "HP"}).name == "x86"  # type: ignore[union-attr]
    assert select(groups, {"arch": "arm64"}).name == "all"  # type: ignore[union-attr]
    assert select(groups[1:], {"arch": "arm64"}) is None


def test_list_values_mean_any_of_and_globs() -> None:
    assert selector_matches({"product": ("A", "B")}, {"product": "b"})
    assert not selector_matches({"product": ("A", "B")}, {"product": "C"})
    assert selector_matches({"mac": ("52:54:00:*",)}, {"mac": "52:54:00:00:00:11"})
    assert not selector_matches({"serial": ("X",)}, {})


def test_equal_specificity_overlap_is_refused() -> None:
    with pytest.raises(Conflict, match="'a' and 'b'"):
        check_groups([g("a", arch="x86_64"), g("b", arch=["x86_64", "arm64"])])
    with pytest.raises(Conflict):
        # Different keys, same specificity: a request with both labels matches both.
        check_groups([g("a", arch="x86_64"), g("b", product="X")])
    with pytest.raises(Conflict):
        check_groups([g("a", mac="52:54:*"), g("b", mac="52:54:00:00:00:11")])


def test_disjoint_or_nested_groups_are_fine() -> None:
    check_groups([g("a", arch="x86_64"), g("b", arch="arm64"),
                  g("c", arch="x86_64", product="X"), g("all")])
