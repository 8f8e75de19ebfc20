"""engine.smtpd.anvil: per-client counters in fixed windows, with an injected clock."""

from engine.smtpd import anvil as anvil_module
from engine.smtpd.anvil import Anvil


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_concurrent_sessions_per_client():
    anvil = Anvil(clock=Clock())
    assert anvil.connect("192.0.2.1") == (1, 1)
    assert anvil.connect("192.0.2.1") == (2, 2)
    assert anvil.connect("192.0.2.2") == (1, 1)
    anvil.disconnect("192.0.2.1")
    assert anvil.sessions("192.0.2.1") == 1
    anvil.disconnect("192.0.2.1")
    assert anvil.sessions("192.0.2.1") == 0
    anvil.disconnect("192.0.2.1")  # an extra disconnect never goes negative
    assert anvil.sessions("192.0.2.1") == 0


def test_events_count_within_a_window_then_start_again():
    clock = Clock()
    anvil = Anvil(time_unit=60, clock=clock)
    assert [anvil.count("rcpt", "a") for _ in range(3)] == [1, 2, 3]
    assert anvil.count("rcpt", "a", n=5) == 8
    assert anvil.count("message", "a") == 1  # each event kind has its own window
    clock.now += 59.9
    assert anvil.peek("rcpt", "a") == 8
    clock.now += 0.1
    assert anvil.peek("rcpt", "a") == 0
    assert anvil.count("rcpt", "a") == 1


def test_expired_windows_are_swept(monkeypatch):
    monkeypatch.setattr(anvil_module, "SWEEP_EVERY", 10)
    clock = Clock()
    anvil = Anvil(time_unit=1, clock=clock)
    for i in range(9):
        anvil.count("connection", f"client{i}")
    clock.now += 5
    anvil.count("connection", "late")  # the tenth update sweeps the expired nine
    assert len(anvil) == 1
