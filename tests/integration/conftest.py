"""
Fixtures for the integration tests: real docker-registry, quayfront and
HAProxy processes on 127.0.0.1, on free ports, stopped by PID at teardown.

A missing program fails the test that needs it (``make deps`` installs
them); nothing is skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.integration import harness
from tests.integration.harness import Process


#: Runs after every other test of the session (see below).
LAST_TEST = "test_zz_no_traceback_in_quayfront_output"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Move the session-wide output check behind every other test."""
    last = [item for item in items if item.name == LAST_TEST]
    if last:
        items[:] = [item for item in items if item.name != LAST_TEST] + last


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("integration")


@pytest.fixture(scope="session")
def dev_cert(session_dir: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key for localhost, 127.0.0.1 and ::1."""
    return harness.make_cert(session_dir / "cert")


@pytest.fixture(scope="session")
def quayfront_instances() -> list[Process]:
    """Every quayfront process the session started, for the final output checks."""
    return []


@pytest.fixture(scope="session")
def registry(session_dir: Path) -> Iterator[Process]:
    """A docker-registry shared by the session, filesystem storage in tmp."""
    proc = harness.start_registry(session_dir / "registry")
    yield proc
    proc.stop()
    harness.remove_registry_storage(proc)


@pytest.fixture(scope="session")
def quayfront(session_dir: Path, registry: Process, dev_cert: tuple[Path, Path],
              quayfront_instances: list[Process]) -> Iterator[Process]:
    """quayfront in front of the session registry."""
    cert, key = dev_cert
    proc = harness.start_quayfront(
        session_dir / "quayfront", f"http://127.0.0.1:{registry.ports['http']}", cert, key,
        extra=harness.QUAYFRONT_TEST_ARGS,
    )
    quayfront_instances.append(proc)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def haproxy(session_dir: Path, quayfront: Process) -> Iterator[Process]:
    """HAProxy in TCP mode: port ``v2`` sends PROXY v2, ``v1`` sends v1, both to quayfront."""
    proc = harness.start_haproxy(session_dir / "haproxy", quayfront.ports["proxy"])
    yield proc
    proc.stop()


@pytest.fixture
def start_registry(tmp_path: Path) -> Iterator[Callable[[], Process]]:
    """Start a registry of the test's own (e.g. one that the test kills)."""
    started: list[Process] = []

    def start() -> Process:
        proc = harness.start_registry(tmp_path / f"registry{len(started)}")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
        harness.remove_registry_storage(proc)


@pytest.fixture
def start_quayfront(tmp_path: Path, dev_cert: tuple[Path, Path],
                    quayfront_instances: list[Process]) -> Iterator[Callable[..., Process]]:
    """Start a quayfront of the test's own in front of ``upstream``."""
    started: list[Process] = []

    def start(upstream: str, extra: tuple[str, ...] = ()) -> Process:
        cert, key = dev_cert
        name = f"quayfront{len(started)}"
        proc = harness.start_quayfront(
            tmp_path / name, upstream, cert, key,
            extra=(*harness.QUAYFRONT_TEST_ARGS, *extra), name=name,
        )
        started.append(proc)
        quayfront_instances.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def echo_upstream(tmp_path: Path) -> Iterator[Process]:
    """An HTTP server on 127.0.0.1 that answers with the request's headers as JSON."""
    proc = harness.start_echo_upstream(tmp_path / "echo")
    yield proc
    proc.stop()


#: What quayfront (under twistd) prints for an error nobody handled.
UNHANDLED_IN_OUTPUT = ("Unhandled error in Deferred", "Unhandled Error",
                       "Traceback (most recent call last)")


@pytest.fixture(autouse=True)
def fail_on_unhandled_errors_in_quayfront(request: pytest.FixtureRequest,
                                          quayfront_instances: list[Process]) -> Iterator[None]:
    """
    Fail a test during which a quayfront process printed an unhandled
    error: only what each process wrote while the test ran counts (all of
    it for the processes the test started, which have stopped by now).
    """
    seen = {id(proc): len(proc.output()) for proc in quayfront_instances}
    yield
    found = []
    for proc in quayfront_instances:
        output = proc.output()[seen.get(id(proc), 0):]
        for marker in UNHANDLED_IN_OUTPUT:
            at = output.find(marker)
            if at >= 0:
                found.append(f"{proc.name} ({proc.stdout_path}):\n"
                             f"{output[max(0, at - 2000):at + 3000]}")
                break
    if found and request.node.get_closest_marker("unhandled_errors_expected") is None:
        pytest.fail("unhandled error(s) in quayfront output during the test:\n"
                    + "\n\n".join(found), pytrace=False)
