"""Log lines a publisher or a server can repeat without end, bounded per minute.

A bad event, a publisher's wrong feedback, a NATS error answering every reconnect: each wrote a
line, so whoever sent them decided how fast the log grew. The metrics count every one; the log
says the first few of each kind a minute, and how many it left out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

WINDOW_S = 60.0
MAX_KEYS = 1_024  # keys may be a server's error texts: past this, the windows start again


class LogThrottle:
    """`allow(key)`: None when this line is left out; else how many lines of `key` were left out
    before it (0 at first), to be told with it.

    >>> now = [0.0]
    >>> throttle = LogThrottle(per_window=2, clock=lambda: now[0])
    >>> [throttle.allow("dlq") for _ in range(4)]
    [0, 0, None, None]
    >>> now[0] = 60.0
    >>> throttle.allow("dlq"), throttle.allow("other")
    (2, 0)
    """

    def __init__(self, per_window: int = 1, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_window, self.window_s, self.clock = per_window, window_s, clock
        self._windows: dict[Hashable, list[float]] = {}  # key -> [window start, allowed, left out]

    def allow(self, key: Hashable) -> int | None:
        now = self.clock()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.window_s:
            left_out = int(window[2]) if window is not None else 0
            if window is None and len(self._windows) >= MAX_KEYS:
                self._windows.clear()
            self._windows[key] = [now, 1, 0]
            return left_out
        if window[1] < self.per_window:
            window[1] += 1
            return 0
        window[2] += 1
        return None

    def clear(self) -> int:
        """Forgets every key, for lines that start afresh (a new outage's); returns how many lines were left
        out and not told yet, to be told in their place.

        >>> throttle = LogThrottle()
        >>> [throttle.allow("refused") for _ in range(3)], throttle.clear(), throttle.allow("refused")
        ([0, None, None], 2, 0)
        """
        left_out = sum(int(window[2]) for window in self._windows.values())
        self._windows.clear()
        return left_out


def since_last_line(left_out: int | None, one: str = "", many: str = "") -> str:
    """What a line says of those `LogThrottle.allow` left out before it (`one` of them, or `many`): nothing
    when it left out none.

    >>> since_last_line(0, "retry", "retries"), since_last_line(1, "retry", "retries"), since_last_line(3)
    ('', ' (1 more retry since the last line)', ' (3 more since the last line)')
    """
    if not left_out:
        return ""
    noun = one if left_out == 1 else many
    return f" ({left_out} more{' ' + noun if noun else ''} since the last line)"


def counted(n: int, one: str, many: str) -> str:
    """`n` with its noun, for the lines that close a stretch of failures: 'after 1 tries that failed' read so.

    >>> counted(1, "try", "tries"), counted(6, "try", "tries")
    ('1 try', '6 tries')
    """
    return f"{n:,} {one if n == 1 else many}"
