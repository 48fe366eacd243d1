"""tests/conftest.py's RsaKeys: the keys the tests' services make, made once and given out
again, never the same key twice in a row nor within any 16 asked for one after another."""

from __future__ import annotations

import itertools
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import RsaKeys


def test_any_sixteen_keys_asked_one_after_another_are_distinct() -> None:
    made = itertools.count()

    def make(public_exponent: int, key_size: int) -> Any:
        return (public_exponent, key_size, next(made))

    keys = RsaKeys(make)
    got = [keys(public_exponent=65537, key_size=2048) for _ in range(50)]
    assert next(made) == 16  # made once each, then given out again in turn
    assert all(len(set(got[i:i + 16])) == 16 for i in range(len(got) - 15))
    assert all(key[:2] == (65537, 2048) for key in got)
    # Other parameters: keys of their own, never one of another size.
    other = keys(public_exponent=65537, key_size=3072)
    assert other[:2] == (65537, 3072) and other[2] == 17


def test_the_tests_keys_are_rsa_keys_of_the_size_asked_for() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    again = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert key.private_numbers().public_numbers.e == 65537
    assert again.private_numbers() != key.private_numbers()
