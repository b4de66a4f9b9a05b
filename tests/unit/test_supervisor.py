"""
The supervisor of the worker processes: its decisions (restart, backoff,
give up, signal fan-out, one exit status) with an injected spawner and clock.
"""

from __future__ import annotations

import signal

from twisted.internet.testing import MemoryReactorClock

from quayfront.supervisor import (
    Exit,
    ExitStatus,
    SignalWorkers,
    SpawnWorker,
    SpawnWorkerLater,
    SupervisorMachine,
    SupervisorPolicy,
    SupervisorService,
)

KILLED = ExitStatus(signal=signal.SIGKILL)


class FakeSpawner:
    """Hands out pids from 100 up and records kills; exits are reported by the test."""

    def __init__(self) -> None:
        self.next_pid = 100
        self.spawned: list[tuple[int, int]] = []
        self.kills: list[tuple[int, int]] = []
        self.watchers: dict[int, object] = {}
        self.fail_next = False

    def spawn(self, index: int) -> int:
        if self.fail_next:
            self.fail_next = False
            raise OSError(11, "Resource temporarily unavailable")
        pid = self.next_pid
        self.next_pid += 1
        self.spawned.append((index, pid))
        return pid

    def kill(self, pid: int, signum: int) -> None:
        self.kills.append((pid, signum))

    def watch(self, pid: int, exited) -> None:
        self.watchers[pid] = exited

    def end(self, pid: int, status: ExitStatus) -> None:
        self.watchers.pop(pid)(pid, status)

    def living(self) -> list[int]:
        return sorted(self.watchers)


def make_service(workers: int = 2, **policy):
    clock = MemoryReactorClock()
    spawner = FakeSpawner()
    exits: list[int] = []
    service = SupervisorService(
        SupervisorMachine(SupervisorPolicy(workers, **policy)), spawner, clock, exits.append
    )
    service.startService()
    return service, spawner, clock, exits


def test_starts_every_worker() -> None:
    """Starting spawns one process per configured worker."""
    service, spawner, _, _ = make_service(3)
    assert [index for index, _ in spawner.spawned] == [0, 1, 2]
    assert service.machine.alive() == {0: 100, 1: 101, 2: 102}


def test_a_worker_that_dies_is_restarted_after_the_base_delay() -> None:
    """A worker that ran past the grace period is restarted after the base delay, in its slot."""
    service, spawner, clock, exits = make_service(2, base_delay_s=0.1, startup_grace_s=5)
    clock.advance(60)
    spawner.end(100, KILLED)
    assert service.machine.alive() == {1: 101}
    clock.advance(0.09)
    assert len(spawner.spawned) == 2
    clock.advance(0.02)
    assert spawner.spawned[-1] == (0, 102)
    assert service.machine.alive() == {0: 102, 1: 101}
    assert service.machine.restarts == 1
    assert exits == []


def test_deaths_at_start_back_off_exponentially_up_to_the_bound() -> None:
    """Each consecutive death at start doubles the delay, never beyond max_delay_s."""
    machine = SupervisorMachine(
        SupervisorPolicy(1, base_delay_s=1, max_delay_s=4, startup_grace_s=5, max_start_failures=10)
    )
    now = 0.0
    machine.start(now)
    delays = []
    pid = 1
    machine.worker_started(0, pid, now)
    for _ in range(5):
        actions = machine.worker_exited(pid, ExitStatus(code=1), now + 1)
        (action,) = actions
        assert isinstance(action, SpawnWorkerLater)
        delays.append(action.delay_s)
        now += 1 + action.delay_s
        assert machine.restart_due(0, now) == [SpawnWorker(0)]
        pid += 1
        machine.worker_started(0, pid, now)
    assert delays == [1, 2, 4, 4, 4]


def test_backoff_resets_after_a_worker_survives_its_start() -> None:
    """A worker that lived past the grace period restarts after the base delay again."""
    machine = SupervisorMachine(SupervisorPolicy(1, base_delay_s=1, startup_grace_s=5))
    machine.start(0)
    machine.worker_started(0, 1, 0)
    assert machine.worker_exited(1, ExitStatus(code=1), 1) == [SpawnWorkerLater(0, 1)]
    machine.restart_due(0, 2)
    machine.worker_started(0, 2, 2)
    assert machine.worker_exited(2, ExitStatus(code=1), 3) == [SpawnWorkerLater(0, 2)]
    machine.restart_due(0, 5)
    machine.worker_started(0, 3, 5)
    assert machine.worker_exited(3, ExitStatus(code=1), 100) == [SpawnWorkerLater(0, 1)]


def test_gives_up_and_exits_non_zero_when_workers_keep_dying_at_start() -> None:
    """After max_start_failures deaths at start in a row, every worker is stopped and the exit status is 1."""
    service, spawner, clock, exits = make_service(
        2, base_delay_s=0.1, max_delay_s=1, startup_grace_s=5, max_start_failures=3
    )
    for _ in range(2):
        pid = max(pid for index, pid in spawner.spawned if index == 0)
        spawner.end(pid, ExitStatus(code=2))
        clock.advance(1)
    assert exits == []
    pid = max(pid for index, pid in spawner.spawned if index == 0)
    spawner.end(pid, ExitStatus(code=2))
    # The survivor is asked to drain; nothing more is spawned.
    assert spawner.kills == [(101, signal.SIGTERM)]
    spawned = len(spawner.spawned)
    clock.advance(60)
    assert len(spawner.spawned) == spawned
    assert exits == []
    spawner.end(101, ExitStatus(code=0))
    assert exits == [1]


def test_a_failed_spawn_counts_as_a_death_at_start() -> None:
    """fork refusing is retried with backoff like a worker dying at start."""
    clock = MemoryReactorClock()
    spawner = FakeSpawner()
    spawner.fail_next = True
    service = SupervisorService(
        SupervisorMachine(SupervisorPolicy(1, base_delay_s=0.5)), spawner, clock, lambda s: None
    )
    service.startService()
    assert spawner.spawned == []
    clock.advance(0.5)
    assert spawner.spawned == [(0, 100)]


def test_sighup_and_sigusr1_go_to_every_living_worker() -> None:
    """SIGHUP and SIGUSR1 are forwarded to each living worker, once."""
    service, spawner, clock, _ = make_service(3)
    clock.advance(60)
    spawner.end(101, KILLED)
    service.signal(signal.SIGHUP)
    service.signal(signal.SIGUSR1)
    assert spawner.kills == [
        (100, signal.SIGHUP),
        (102, signal.SIGHUP),
        (100, signal.SIGUSR1),
        (102, signal.SIGUSR1),
    ]


def test_stop_drains_every_worker_and_fires_when_the_last_has_exited() -> None:
    """stopService sends SIGTERM to all, restarts stop, and the exit status is 0 when all drained cleanly."""
    service, spawner, clock, exits = make_service(2)
    stopped = service.stopService()
    assert spawner.kills == [(100, signal.SIGTERM), (101, signal.SIGTERM)]
    spawner.end(100, ExitStatus(code=0))
    assert not stopped.called
    clock.advance(60)
    assert len(spawner.spawned) == 2
    spawner.end(101, ExitStatus(code=0))
    assert stopped.called
    assert exits == [0]


def test_one_failed_drain_makes_the_whole_exit_status_non_zero() -> None:
    """A worker that ends its drain with a non-zero status or a signal makes the exit status 1."""
    service, spawner, _, exits = make_service(2)
    service.stopService()
    spawner.end(100, ExitStatus(code=0))
    spawner.end(101, ExitStatus(signal=signal.SIGKILL))
    assert exits == [1]


def test_stop_cancels_a_pending_restart() -> None:
    """A worker waiting for its restart delay is not started once quayfront stops."""
    service, spawner, clock, exits = make_service(2, base_delay_s=5)
    clock.advance(60)
    spawner.end(100, KILLED)
    stopped = service.stopService()
    spawner.end(101, ExitStatus(code=0))
    assert stopped.called
    clock.advance(10)
    assert len(spawner.spawned) == 2
    assert exits == [0]


def test_sigterm_event_is_a_stop() -> None:
    """The machine treats SIGTERM like stop: fan-out once, then Exit when all are gone."""
    machine = SupervisorMachine(SupervisorPolicy(1))
    machine.start(0)
    machine.worker_started(0, 7, 0)
    assert machine.signal_received(signal.SIGTERM, 1) == [SignalWorkers(signal.SIGTERM, (7,))]
    assert machine.signal_received(signal.SIGHUP, 1) == []
    assert machine.worker_exited(7, ExitStatus(code=0), 2) == [Exit(0)]


def test_exit_status_descriptions() -> None:
    """The log line names the exit code or the signal."""
    assert str(ExitStatus(code=3)) == "exit status 3"
    assert str(ExitStatus(signal=signal.SIGKILL)) == "killed by SIGKILL"
    assert ExitStatus.from_wait_status(9) == ExitStatus(signal=9)
    assert ExitStatus.from_wait_status(2 << 8) == ExitStatus(code=2)
