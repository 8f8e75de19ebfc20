"""State derived from one Config object and kept while that object lives.

A process has one Config (and one per [transport.NAME] table); what is built from it once —
an opened lookup table, a policy finder, a copy with other names — is kept here, keyed by the
object's identity (Config is a mutable dataclass, so not hashable). The cache stays small:
tests make many Configs, so past a few it starts again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from engine.config.settings import Config

T = TypeVar("T")
_KEPT = 16  # more Configs than a process has; fewer than a test run makes


def per_config(build: Callable[[Config], T]) -> Callable[[Config], T]:
    """``build(config)`` once per Config object: a decorator."""
    kept: dict[int, tuple[Config, T]] = {}

    @functools.wraps(build)
    def derived(config: Config) -> T:
        entry = kept.get(id(config))
        if entry is None or entry[0] is not config:  # an id may be reused after a Config dies
            if len(kept) > _KEPT:
                kept.clear()
            entry = (config, build(config))
            kept[id(config)] = entry
        return entry[1]

    return derived
