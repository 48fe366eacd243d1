"""Model values: what a MAC address accepts and refuses, in every spelling."""

from __future__ import annotations

import pytest

from netboot.errors import ValidationError
from netboot.model import MacAddress


@pytest.mark.parametrize("text", [
    "aa:bb:cc:dd:ee:ff", "AA:BB:CC:DD:EE:FF", " aa-bb-cc-dd-ee-ff ", "aabb.ccdd.eeff",
    "aabbccddeeff", "01-aa-bb-cc-dd-ee-ff",
])
def test_mac_spellings(text: str) -> None:
    assert str(MacAddress.parse(text)) == "aa:bb:cc:dd:ee:ff"


@pytest.mark.parametrize("text", [
    "aa:bb:cc:dd:ee:fg", "aa:bb-cc:dd:ee:ff", "aa:bb:cc:dd:ee", "aa:bb:cc:dd:ee:ff:00",
    "aab:bc:cd:de:ef:f0", "a:bb:cc:dd:ee:fff", "", "::::::::::::::::",
])
def test_mac_refused(text: str) -> None:
    with pytest.raises(ValidationError) as err:
        MacAddress.parse(text)
    assert err.value.field == "mac"
