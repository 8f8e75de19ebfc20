"""Shared fixtures. Peer servers (DNS, SMTP sink) live in peers.py; twin selection is here."""

import pytest

from engine import speedups


@pytest.fixture(params=["compiled", "pure"])
def impl(request):
    """Run a twin-sensitive test against both implementations of a hot path.

    ``impl("reader")`` returns the module; the compiled case is skipped when it was not built.
    """
    pure = request.param == "pure"

    def load(name):
        module = speedups.load(name, pure=pure)
        if not pure and not module.__name__.startswith("engine._compiled."):
            pytest.skip(f"compiled {name} not built")
        return module

    return load


from peers import dns_server, smtp_sink  # noqa: E402, F401
from tern_process import tern  # noqa: E402, F401 - fixture: tern serve as a real process
