"""Shared fixtures. Peer servers (DNS, SMTP sink) live in peers.py; twin selection is here."""

import pytest

from engine import speedups


@pytest.fixture(params=["compiled", "pure"])
def impl(request):
    """Run a twin-sensitive test against both implementations of a hot path.

    ``impl("reader")`` returns the module; the compiled case is skipped when it was not built.
    """
    return lambda name: load_or_skip(name, request.param)


def load_or_skip(name, implementation):
    try:
        return speedups.load_exact(name, implementation)
    except ImportError:
        pytest.skip(f"{implementation} {name} not built")


from peers import dns_server, smtp_sink  # noqa: E402, F401
from tern_process import tern  # noqa: E402, F401 - fixture: tern serve as a real process
