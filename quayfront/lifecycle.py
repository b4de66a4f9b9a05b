"""
Graceful shutdown: on SIGTERM the listeners stop accepting while requests in
flight finish, for at most C{drain_timeout_s}.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure


class DrainService(Service):
    """
    Its C{stopService} waits for the site to drain.  twistd stops every
    service at once, so the listeners close while this one waits.
    """

    _log = Logger()

    def __init__(self, site, clock: IReactorTime, timeout_s: float) -> None:
        self._site = site
        self._clock = clock
        self._timeout_s = timeout_s

    def stopService(self) -> Deferred | None:
        super().stopService()
        drained = self._site.drain()
        if drained.called:
            return drained
        self._log.info(
            "draining: waiting up to {timeout}s for {count} requests in flight",
            timeout=self._timeout_s,
            count=self._site.in_flight,
        )
        drained.addTimeout(self._timeout_s, self._clock)

        def report(result):
            if isinstance(result, Failure):
                self._log.warn(
                    "drain timeout: {count} requests still in flight are cut off",
                    count=self._site.in_flight,
                )
            else:
                self._log.info("drained: no request in flight")

        return drained.addBoth(report)
