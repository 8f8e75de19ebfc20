"""Per-client connection and event counters, the job of Postfix's anvil(8) server.

One Anvil per worker, shared by every listener: it counts each client address's concurrent
sessions and its events (connections, messages, recipients, failed AUTHs …) within fixed time
windows of ``time_unit`` seconds, as anvil does with ``anvil_rate_time_unit``. It only counts;
smtpd compares the counts with its limits and chooses the reply. Pure: the clock is injected.
"""

import time
from collections.abc import Callable

SWEEP_EVERY = 4096  # counter updates between sweeps of expired windows (bounded memory)


class Anvil:
    def __init__(self, time_unit: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.time_unit = time_unit
        self._clock = clock
        self._sessions: dict[str, int] = {}  # client address → concurrent sessions
        self._windows: dict[tuple[str, str], list] = {}  # (event, address) → [start, count]
        self._updates = 0

    def connect(self, client: str) -> tuple[int, int]:
        """A session begins: (concurrent sessions, connections in this window), both
        counting this one."""
        sessions = self._sessions.get(client, 0) + 1
        self._sessions[client] = sessions
        return sessions, self.count("connection", client)

    def disconnect(self, client: str) -> None:
        """A session counted by connect() ended."""
        sessions = self._sessions.get(client, 0) - 1
        if sessions > 0:
            self._sessions[client] = sessions
        else:
            self._sessions.pop(client, None)

    def sessions(self, client: str) -> int:
        return self._sessions.get(client, 0)

    def count(self, event: str, client: str, n: int = 1) -> int:
        """Add ``n`` events of this kind for this client; their number in the current window
        (a window opens at the first event and lasts ``time_unit``, as anvil's)."""
        now = self._clock()
        key = (event, client)
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.time_unit:
            window = self._windows[key] = [now, 0]
        window[1] += n
        self._updates += 1
        if self._updates >= SWEEP_EVERY:
            self._sweep(now)
        return window[1]

    def peek(self, event: str, client: str) -> int:
        """The events counted in the current window, without adding one."""
        window = self._windows.get((event, client))
        if window is None or self._clock() - window[0] >= self.time_unit:
            return 0
        return window[1]

    def _sweep(self, now: float) -> None:
        self._updates = 0
        expired = [key for key, (start, _) in self._windows.items()
                   if now - start >= self.time_unit]
        for key in expired:
            del self._windows[key]

    def __len__(self) -> int:
        """Entries held (sessions and open windows): what bounds its memory."""
        return len(self._sessions) + len(self._windows)
