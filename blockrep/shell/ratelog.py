"""Rate-limited logging for errors that can repeat per request (a failing disk answers
thousands of requests a second; the log gets a few lines and a count, not one line each).

Owns: one budget per message kind: `burst` lines per `interval` seconds, then silence; the
first line after a silent stretch says how many were suppressed. Must not: drop the first
occurrence of a kind, or cost anything while nothing fails.
"""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval: float = 10.0, burst: int = 5,
                 clock=time.monotonic):
        self.logger = logger
        self.interval = interval
        self.burst = burst
        self.clock = clock
        self._kinds: dict[str, list] = {}  # kind -> [window start, lines in window, suppressed]

    def log(self, level: int, kind: str, msg: str, *args) -> bool:
        """Log `msg % args` unless `kind` used up its budget; True when it was logged."""
        now = self.clock()
        st = self._kinds.get(kind)
        if st is None or now - st[0] >= self.interval:
            suppressed = st[2] if st is not None else 0
            st = self._kinds[kind] = [now, 0, 0]
            if suppressed:
                self.logger.log(level, "%s: %d similar message(s) suppressed in the last "
                                "%.0f s", kind, suppressed, self.interval)
        if st[1] >= self.burst:
            st[2] += 1
            return False
        st[1] += 1
        if st[1] == self.burst:
            msg += " (further %s messages suppressed for %.0f s)"
            args = (*args, kind, self.interval)
        self.logger.log(level, msg, *args)
        return True

    def error(self, kind: str, msg: str, *args) -> bool:
        return self.log(logging.ERROR, kind, msg, *args)

    def warning(self, kind: str, msg: str, *args) -> bool:
        return self.log(logging.WARNING, kind, msg, *args)
