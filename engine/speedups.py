"""Chooses, for each hot path, the compiled module built from ``_speedups/`` or its pure twin.

Every compiled module ``engine._compiled.NAME`` has a pure-Python twin with the same interface
(``TWINS``). The compiled one is used when it was built, unless ``TERN_PURE=1`` forces the twins.
Trusts only the environment variable.
"""

import importlib
import os
from types import ModuleType

TWINS = {
    "reader": "engine.smtp.reader",
    "scheduler": "engine.qmgr.scheduler",
    "grammar": "engine.smtp.grammar",
}


def pure_forced() -> bool:
    return os.environ.get("TERN_PURE", "") not in ("", "0")


def load(name: str, *, pure: bool | None = None) -> ModuleType:
    """The module serving hot path ``name``: compiled when available and allowed."""
    if not (pure_forced() if pure is None else pure):
        try:
            return importlib.import_module(f"engine._compiled.{name}")
        except ImportError:
            pass
    return importlib.import_module(TWINS[name])


def load_exact(name: str, implementation: str) -> ModuleType:
    """Exactly the named implementation ("compiled" or "pure") of hot path ``name``, for tests
    and benchmarks that compare the twins. ImportError when the compiled one was not built."""
    if implementation == "pure":
        return importlib.import_module(TWINS[name])
    return importlib.import_module(f"engine._compiled.{name}")


def implementations() -> dict[str, str]:
    """For ``tern version``: which implementation each hot path uses ("compiled" or "pure")."""
    return {
        name: "compiled" if load(name).__name__.startswith("engine._compiled.") else "pure"
        for name in TWINS
    }


Reader = load("reader").Reader
