"""Queue IDs: short, unique within a shard, and ordered by arrival.

Microseconds since the epoch in Postfix's long-queue-ID alphabet (no vowels, so no words), a
shard letter, and a guard against two IDs in the same microsecond. Trusts only the clock.
"""

import time

ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz"


def _encode(number: int) -> str:
    base = len(ALPHABET)
    digits = []
    while number:
        number, digit = divmod(number, base)
        digits.append(ALPHABET[digit])
    return "".join(reversed(digits)) or "0"


class QueueIdGenerator:
    """Issues IDs for one shard; strictly increasing even if the clock stalls or steps back."""

    def __init__(self, shard: int = 0, clock=time.time_ns) -> None:
        self._shard = ALPHABET[shard % len(ALPHABET)]
        self._clock = clock
        self._last = 0

    def __call__(self) -> str:
        now = self._clock() // 1000
        self._last = now if now > self._last else self._last + 1
        return _encode(self._last) + self._shard
