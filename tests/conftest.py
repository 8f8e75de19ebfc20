"""Shared fixtures. Peer servers (DNS, SMTP sink) live in peers.py; twin selection is here."""

import os

import pytest

from engine import speedups


@pytest.fixture(params=["compiled", "pure"])
def impl(request):
    """Run a twin-sensitive test against both implementations of a hot path.

    ``impl("reader")`` returns the module; the compiled case is skipped when it was not built.
    """
    return lambda name: load_or_skip(name, request.param)


def load_or_skip(name, implementation):
    """CI sets TERN_REQUIRE_COMPILED=1: there a missing compiled twin fails instead of skipping."""
    try:
        return speedups.load_exact(name, implementation)
    except ImportError:
        if os.environ.get("TERN_REQUIRE_COMPILED") == "1":
            raise
        pytest.skip(f"{implementation} {name} not built")


from peers import dns_server, dnssec_server, smtp_sink  # noqa: E402, F401
from tern_process import tern  # noqa: E402, F401 - fixture: tern serve as a real process
