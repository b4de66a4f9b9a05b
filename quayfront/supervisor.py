"""
The supervisor of the worker processes: its decisions as a sans-IO state
machine (events in, actions out), and a thin Twisted adapter that carries
the actions out with an injected process spawner and clock.

Events: a worker started (with its pid), a worker exited (with its status),
a restart timer fired, a signal arrived, the service stops.  Actions: spawn
worker I now, spawn worker I after a delay, signal every living worker, exit
with a status.

The rules:
  - a worker that exits while quayfront runs is started again, after a
    delay that doubles with each consecutive death at start (a worker that
    dies within C{startup_grace_s} of being started) up to C{max_delay_s};
    a worker that lived longer restarts after C{base_delay_s};
  - when one worker slot dies at start C{max_start_failures} times in a row,
    quayfront gives up: every worker is stopped and the main process exits
    non-zero (a broken deployment should fail visibly, not spin);
  - SIGHUP and SIGUSR1 go to every living worker; SIGTERM (the service
    stopping) goes to every living worker, restarts stop, and the main
    process exits once every worker has, with status 0 only when every
    worker's drain ended with status 0.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

# --------------------------------------------------------------------------
# Events' payload and actions


@dataclass(frozen=True)
class ExitStatus:
    """
    How a process ended: an exit code, or the signal that killed it.
    """

    code: int | None = None
    signal: int | None = None

    @classmethod
    def from_wait_status(cls, status: int) -> "ExitStatus":
        if os.WIFSIGNALED(status):
            return cls(signal=os.WTERMSIG(status))
        return cls(code=os.WEXITSTATUS(status))

    @property
    def ok(self) -> bool:
        return self.code == 0 and self.signal is None

    def __str__(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"killed by {name}"
        return f"exit status {self.code}"


@dataclass(frozen=True)
class SpawnWorker:
    index: int


@dataclass(frozen=True)
class SpawnWorkerLater:
    index: int
    delay_s: float


@dataclass(frozen=True)
class SignalWorkers:
    signum: int
    pids: tuple[int, ...]


@dataclass(frozen=True)
class GiveUp:
    """
    Logged once: why quayfront stops on its own.
    """

    index: int
    failures: int


@dataclass(frozen=True)
class Exit:
    status: int


Action = SpawnWorker | SpawnWorkerLater | SignalWorkers | GiveUp | Exit


@dataclass(frozen=True)
class SupervisorPolicy:
    workers: int
    base_delay_s: float = 0.1
    max_delay_s: float = 30.0
    # A worker that exits sooner than this after its start died at start.
    startup_grace_s: float = 5.0
    max_start_failures: int = 5


@dataclass
class _Slot:
    pid: int | None = None
    started_at: float = 0.0
    start_failures: int = 0
    restart_pending: bool = False


@dataclass
class SupervisorMachine:
    """
    The supervisor's decisions; no I/O, no clock of its own (every event
    carries C{now}).
    """

    policy: SupervisorPolicy
    stopping: bool = False
    exit_status: int = 0
    restarts: int = 0
    _slots: list[_Slot] = field(default_factory=list)
    _exited: bool = False

    def __post_init__(self) -> None:
        self._slots = [_Slot() for _ in range(self.policy.workers)]

    # Queries

    def alive(self) -> dict[int, int]:
        """Slot -> pid of every living worker."""
        return {i: s.pid for i, s in enumerate(self._slots) if s.pid is not None}

    def index_of(self, pid: int) -> int | None:
        for index, slot in enumerate(self._slots):
            if slot.pid == pid:
                return index
        return None

    # Events

    def start(self, now: float) -> list[Action]:
        return [SpawnWorker(index) for index in range(self.policy.workers)]

    def worker_started(self, index: int, pid: int, now: float) -> list[Action]:
        slot = self._slots[index]
        slot.pid = pid
        slot.started_at = now
        slot.restart_pending = False
        return []

    def spawn_failed(self, index: int, now: float) -> list[Action]:
        """
        The spawner itself failed (fork refused): counts as a death at start.
        """
        slot = self._slots[index]
        slot.started_at = now
        slot.pid = -1
        return self.worker_exited(-1, ExitStatus(code=1), now)

    def worker_exited(self, pid: int, status: ExitStatus, now: float) -> list[Action]:
        index = self.index_of(pid)
        if index is None:
            return []
        slot = self._slots[index]
        slot.pid = None
        if self.stopping:
            if not status.ok:
                self.exit_status = 1
            return self._exit_when_all_gone()
        if now - slot.started_at < self.policy.startup_grace_s:
            slot.start_failures += 1
        else:
            slot.start_failures = 0
        if slot.start_failures >= self.policy.max_start_failures:
            self.stopping = True
            self.exit_status = 1
            actions: list[Action] = [GiveUp(index, slot.start_failures)]
            actions += self._signal(signal.SIGTERM)
            return actions + self._exit_when_all_gone()
        delay = min(
            self.policy.max_delay_s,
            self.policy.base_delay_s * 2 ** max(0, slot.start_failures - 1)
            if slot.start_failures
            else self.policy.base_delay_s,
        )
        slot.restart_pending = True
        return [SpawnWorkerLater(index, delay)]

    def restart_due(self, index: int, now: float) -> list[Action]:
        slot = self._slots[index]
        if self.stopping or not slot.restart_pending or slot.pid is not None:
            return []
        slot.restart_pending = False
        self.restarts += 1
        return [SpawnWorker(index)]

    def signal_received(self, signum: int, now: float) -> list[Action]:
        """
        SIGHUP and SIGUSR1 fan out; SIGTERM and SIGINT stop everything.
        """
        if signum in (signal.SIGTERM, signal.SIGINT):
            return self.stop(now)
        if self.stopping:
            return []
        return self._signal(signum)

    def stop(self, now: float) -> list[Action]:
        if self.stopping:
            return self._exit_when_all_gone()
        self.stopping = True
        for slot in self._slots:
            slot.restart_pending = False
        return self._signal(signal.SIGTERM) + self._exit_when_all_gone()

    def _signal(self, signum: int) -> list[Action]:
        pids = tuple(pid for pid in self.alive().values() if pid > 0)
        return [SignalWorkers(signum, pids)] if pids else []

    def _exit_when_all_gone(self) -> list[Action]:
        if self._exited or self.alive():
            return []
        self._exited = True
        return [Exit(self.exit_status)]


# --------------------------------------------------------------------------
# The Twisted adapter


class WorkerSpawner(Protocol):
    def spawn(self, index: int) -> int:
        """Start worker C{index}; return its pid (raises OSError on failure)."""

    def kill(self, pid: int, signum: int) -> None:
        ...

    def watch(self, pid: int, exited: Callable[[int, ExitStatus], None]) -> None:
        """Call C{exited(pid, status)} once the process has ended."""


class SupervisorService(Service):
    """
    Carries out a L{SupervisorMachine}'s actions: spawns through
    C{spawner}, waits with C{clock}, and calls C{on_exit(status)} when the
    machine decides the main process must end.

    Its C{stopService} (twistd's SIGTERM) drains every worker and fires when
    the last one has exited.
    """

    _log = Logger()

    def __init__(
        self,
        machine: SupervisorMachine,
        spawner: WorkerSpawner,
        clock: IReactorTime,
        on_exit: Callable[[int], None],
        on_worker_exit: Callable[[int, int, ExitStatus], None] = lambda i, pid, s: None,
    ) -> None:
        self.machine = machine
        self._spawner = spawner
        self._clock = clock
        self._on_exit = on_exit
        self._on_worker_exit = on_worker_exit
        self._timers: dict[int, IDelayedCall] = {}
        self._all_gone: Deferred | None = None
        self._done = False

    def startService(self) -> None:
        super().startService()
        self._carry_out(self.machine.start(self._clock.seconds()))

    def stopService(self) -> Deferred:
        super().stopService()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        if self._done:
            return succeed(None)
        self._all_gone = Deferred()
        self._carry_out(self.machine.stop(self._clock.seconds()))
        return self._all_gone if not self._done else succeed(None)

    def signal(self, signum: int) -> None:
        self._carry_out(self.machine.signal_received(signum, self._clock.seconds()))

    def forward(self, signum: int) -> None:
        """Send C{signum} to every living worker, whatever the state."""
        pids = tuple(pid for pid in self.machine.alive().values() if pid > 0)
        self._carry_out([SignalWorkers(signum, pids)] if pids else [])

    def _exited(self, pid: int, status: ExitStatus) -> None:
        index = self.machine.index_of(pid)
        if index is not None and not self.machine.stopping:
            self._log.warn(
                "worker {index} (pid {pid}) ended: {status}; restarting it",
                index=index,
                pid=pid,
                status=str(status),
            )
        elif index is not None:
            self._log.info(
                "worker {index} (pid {pid}) ended: {status}", index=index, pid=pid, status=str(status)
            )
        if index is not None:
            self._on_worker_exit(index, pid, status)
        self._carry_out(self.machine.worker_exited(pid, status, self._clock.seconds()))

    def _restart(self, index: int) -> None:
        self._timers.pop(index, None)
        self._carry_out(self.machine.restart_due(index, self._clock.seconds()))

    def _carry_out(self, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, SpawnWorker):
                try:
                    pid = self._spawner.spawn(action.index)
                except OSError as e:
                    self._log.error(
                        "cannot start worker {index}: {error}", index=action.index, error=str(e)
                    )
                    self._carry_out(self.machine.spawn_failed(action.index, self._clock.seconds()))
                    continue
                self._carry_out(
                    self.machine.worker_started(action.index, pid, self._clock.seconds())
                )
                self._spawner.watch(pid, self._exited)
            elif isinstance(action, SpawnWorkerLater):
                self._timers[action.index] = self._clock.callLater(
                    action.delay_s, self._restart, action.index
                )
            elif isinstance(action, SignalWorkers):
                for pid in action.pids:
                    try:
                        self._spawner.kill(pid, action.signum)
                    except ProcessLookupError:
                        pass
            elif isinstance(action, GiveUp):
                self._log.error(
                    "worker {index} died at start {failures} times in a row; giving up",
                    index=action.index,
                    failures=action.failures,
                )
            elif isinstance(action, Exit):
                self._done = True
                if self._all_gone is not None:
                    gone, self._all_gone = self._all_gone, None
                    gone.callback(None)
                self._on_exit(action.status)
