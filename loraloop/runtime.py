"""Small pieces every long-running loraloop process shares: stop signals, rate-limited logs, closing clients."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable

LOG_EVERY_S = 30.0  # default rate limit of a repeated error line


class RateLimitedLog:
    """One log line per ``every_s`` seconds at most, then the count of the ones suppressed.

    A dead broker or Redis fails every batch; its log line should not.
    """

    def __init__(self, logger: logging.Logger, every_s: float = LOG_EVERY_S) -> None:
        self.logger, self.every_s = logger, every_s
        self._last, self._suppressed = -float("inf"), 0

    def __call__(self, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += f" ({self._suppressed} similar messages suppressed)"
        self._last, self._suppressed = now, 0
        self.logger.log(level, msg, *args)


def stop_on_signals(stop: threading.Event, logger: logging.Logger, what: str) -> None:
    """SIGTERM / SIGINT set ``stop`` (the process finishes ``what`` and exits); a second one aborts."""
    def handle(signum: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        logger.info("%s received: %s", signal.Signals(signum).name, what)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)


def close_quietly(clients: Iterable[object | None], logger: logging.Logger) -> None:
    """Close each client; a broken one must not stop the process that drops it."""
    for client in clients:
        if client is None:
            continue
        try:
            client.close()
        except Exception:  # noqa: BLE001 - closing is best effort by design
            logger.debug("closing %r failed", client, exc_info=True)


class CachedProbe:
    """A readiness check answered from cache for ``ttl_s``: a scrape every second must not ping the broker each time."""

    def __init__(self, check: Callable[[], object], ttl_s: float = 2.0) -> None:
        self.check, self.ttl_s = check, ttl_s
        self._at, self._ok = -float("inf"), False

    def __call__(self) -> bool:
        if time.monotonic() - self._at > self.ttl_s:
            try:
                self._ok = bool(self.check())
            except Exception:  # noqa: BLE001 - a probe must answer, whatever the client raises
                self._ok = False
            self._at = time.monotonic()
        return self._ok
