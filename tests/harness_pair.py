"""Two tests run in this order by tests/test_harness.py's child pytest (never collected by a
plain run: the name is not test_*): the first's service, built by ``make_env``, renders a
script (its renderer's inotify watch starts); the second, after the first's teardown, finds
that watch closed and that service collectable."""

from __future__ import annotations

import gc
import weakref
from typing import Any

from tests.conftest import Env, boot

# The first test's service and its renderer's freshness (which holds the inotify watch), by
# weak reference: the second test must not be what keeps them.
_LEFT: list[weakref.ref[Any]] = []


async def test_a_service_renders(env: Env) -> None:
    await env.seed()
    await boot(env, "52-54-00-00-41-01")
    fresh = env.service.content._render._fresh
    assert fresh._watch is not None  # the watch this pair is about
    _LEFT.extend((weakref.ref(env.service), weakref.ref(fresh)))


def test_then_its_inotify_instance_is_given_back_and_the_service_is_garbage() -> None:
    service, fresh = (ref() for ref in _LEFT)
    assert fresh is None or fresh._watch is None, "make_env left the renderer's watch open"
    del service, fresh
    gc.collect()
    assert _LEFT[0]() is None, [type(r).__qualname__ for r in gc.get_referrers(_LEFT[0]())]
