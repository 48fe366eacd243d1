"""The system CA loads held back while serve's wiring is imported, and done afterwards."""

from __future__ import annotations

import ssl
import threading

from netboot.cacerts import deferred_system_cas


def test_held_contexts_get_the_system_cas_once_loaded() -> None:
    original = ssl.SSLContext.set_default_verify_paths
    fresh = ssl.create_default_context()
    with deferred_system_cas() as held:
        verified = ssl.create_default_context()  # as aiohttp's connector makes its two
        unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        unverified.set_default_verify_paths()
    assert ssl.SSLContext.set_default_verify_paths is original
    outside = ssl.create_default_context()
    assert len(held) == 2
    assert verified.cert_store_stats()["x509_ca"] == 0  # nothing read yet
    assert outside.cert_store_stats() == fresh.cert_store_stats()
    held.load()
    assert verified.cert_store_stats() == fresh.cert_store_stats()
    assert unverified.cert_store_stats() == fresh.cert_store_stats()
    held.load()  # once: nothing is held any more
    assert len(held) == 0


def test_other_threads_read_the_cas_while_the_block_runs() -> None:
    """serve imports aiohttp in a thread while its event loop runs: a context the loop's
    thread makes meanwhile (a PostgreSQL connection's) gets its CAs as always."""
    fresh = ssl.create_default_context()
    made: list[ssl.SSLContext] = []
    with deferred_system_cas() as held:
        other = threading.Thread(target=lambda: made.append(ssl.create_default_context()))
        other.start()
        other.join(30)
    assert len(held) == 0 and made[0].cert_store_stats() == fresh.cert_store_stats()


def test_the_method_is_restored_when_the_block_fails() -> None:
    original = ssl.SSLContext.set_default_verify_paths
    try:
        with deferred_system_cas():
            raise ImportError("a wiring import failed")
    except ImportError:
        pass
    assert ssl.SSLContext.set_default_verify_paths is original
