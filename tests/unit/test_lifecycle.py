"""
The lifecycle: drain phases on an injected clock, signals, log reopening,
config re-reading, and the twistd options (--check, --version, the default
config file, where a bad value came from).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from quayfront.accesslog import AccessLog, AccessLogEntry, access_log_problem
from quayfront.config import Config, HTTPConfig, ListenAddress
from quayfront.lifecycle import DrainController, Reopener, StopSignals, bind_problem, changed_keys
from quayfront.tap import (
    CHECK_ERROR_EXIT,
    CONFIG_PATH_VARIABLE,
    DEFAULT_CONFIG_PATH,
    STARTUP_ERROR_EXIT,
    Options,
    default_config_path,
)
from tests.unit.certs import make_certificate, write_pair
from tests.unit.test_forward import connect, make_site, response


class FakeListener(Service):
    """A listener whose closing the test completes."""

    def __init__(self) -> None:
        self.closing: Deferred | None = None

    def stopService(self) -> Deferred:
        super().stopService()
        self.closing = Deferred()
        return self.closing


class RecordingService(Service):
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def stopService(self) -> None:
        super().stopService()
        self.events.append("access log closed")


def controller(delay_s: float = 10.0, timeout_s: float = 30.0):
    site, agent, log, clock = make_site()
    drain = DrainController(site, clock, delay_s=delay_s, timeout_s=timeout_s)
    listener = FakeListener()
    drain.add_listener(listener)
    phases: list[tuple[str, int]] = []
    drain.observe(lambda phase, in_flight: phases.append((phase, in_flight)))
    drain.startService()
    return drain, site, agent, clock, listener, phases


def finish_response(agent, index: int = 0) -> None:
    r = response(200, {}, 0)
    agent.requests[index]["d"].callback(r)
    r._bodyDataFinished(Failure(ResponseDone()))


def test_phases_in_order_with_counts() -> None:
    """delay (health 503, listeners open), closing, finishing, done: observers see each with the count."""
    drain, site, agent, clock, listener, phases = controller()
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/blob HTTP/1.1\r\nHost: h\r\n\r\n")
    stopped = drain.stopService()
    assert phases == [("delay", 1)]
    assert site.draining
    assert listener.running, "listeners keep accepting during the delay"
    clock.advance(9.9)
    assert phases == [("delay", 1)]
    clock.advance(0.1)
    assert phases[-1] == ("closing", 1)
    assert not listener.running
    listener.closing.callback(None)
    assert phases[-1] == ("finishing", 1)
    finish_response(agent)
    assert not stopped.called
    channel.connectionLost(Failure(ResponseDone()))
    assert phases[-1] == ("done", 0)
    assert [p for p, _ in phases] == ["delay", "closing", "finishing", "done"]
    assert stopped.called


def test_second_signal_skips_the_delay() -> None:
    """A second SIGTERM or SIGINT closes the listeners at once; the first only stops the reactor."""
    drain, site, _, clock, listener, phases = controller(delay_s=300)

    class Reactor:
        stops = 0

        def stop(self) -> None:
            self.stops += 1

    reactor = Reactor()
    signals = StopSignals(reactor, drain)
    signals.received("SIGTERM")
    assert reactor.stops == 1
    drain.stopService()
    assert phases == [("delay", 0)]
    signals.received("SIGINT")
    assert reactor.stops == 1
    assert phases[-1] == ("closing", 0)
    assert not clock.getDelayedCalls()


def test_finished_only_when_the_connection_is_closed() -> None:
    """A response handed to the transport is not finished: its connection must close first."""
    drain, site, agent, clock, listener, phases = controller(delay_s=0)
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/blob HTTP/1.1\r\nHost: h\r\n\r\n")
    stopped = drain.stopService()
    listener.closing.callback(None)
    finish_response(agent)
    assert site.in_flight == 0
    assert client.disconnecting
    assert phases[-1][0] == "finishing"
    assert not stopped.called
    channel.connectionLost(Failure(ResponseDone()))
    assert stopped.called


def test_response_under_way_closes_its_keepalive_connection() -> None:
    """A response that started before SIGTERM closes its connection when it ends."""
    drain, site, agent, clock, listener, phases = controller(delay_s=0)
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/blob HTTP/1.1\r\nHost: h\r\n\r\n")
    r = response(200, {b"Content-Length": [b"3"]}, 3)
    agent.requests[0]["d"].callback(r)
    r._bodyDataReceived(b"ab")
    assert b"Connection: close" not in client.value()
    drain.stopService()
    r._bodyDataReceived(b"c")
    r._bodyDataFinished(Failure(ResponseDone()))
    assert client.disconnecting


def test_idle_keepalive_connections_close_when_listeners_have_closed() -> None:
    """Idle kept-alive connections are closed (after flushing) once the listeners are closed."""
    drain, site, agent, clock, listener, phases = controller(delay_s=5)
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    finish_response(agent)
    assert not client.disconnecting
    stopped = drain.stopService()
    clock.advance(5)
    assert not client.disconnecting
    listener.closing.callback(None)
    assert client.disconnecting
    channel.connectionLost(Failure(ResponseDone()))
    assert stopped.called


def test_timeout_cuts_off_and_finishes() -> None:
    """A connection that never closes holds the drain for drain_timeout_s at most."""
    drain, site, agent, clock, listener, phases = controller(delay_s=0, timeout_s=30)
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/stuck HTTP/1.1\r\nHost: h\r\n\r\n")
    stopped = drain.stopService()
    listener.closing.callback(None)
    clock.advance(29.9)
    assert not stopped.called
    clock.advance(0.1)
    assert stopped.called
    assert phases[-1] == ("done", 1)


def test_exchanges_still_under_way_are_cut_off_before_the_drain_ends() -> None:
    """The model's drain deadline: a stuck exchange is aborted a little before drain_timeout_s and logged."""
    from quayfront.lifecycle import cut_off_lead_s

    drain, site, agent, clock, listener, phases = controller(delay_s=0, timeout_s=30)
    log = site.access_log
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/stuck HTTP/1.1\r\nHost: h\r\n\r\n")
    stopped = drain.stopService()
    listener.closing.callback(None)
    assert cut_off_lead_s(30) == 1.0 and cut_off_lead_s(5) == 0.5
    clock.advance(28.9)
    assert not client.disconnected and not stopped.called
    clock.advance(0.1)
    assert client.disconnected, "cut off at drain_timeout_s - lead"
    assert agent.requests[0]["d"].called, "the upstream request is cancelled"
    # The aborted connection closes: its line is logged, and the drain ends
    # early, the access log still open.
    channel.connectionLost(Failure(ResponseDone()))
    assert [(e.status, e.outcome) for e in log.entries] == [(499, "drain-timeout")]
    assert stopped.called and phases[-1] == ("done", 0)


def test_access_log_outlives_the_drain() -> None:
    """The access log is stopped after the requests of the drain are finished, not at SIGTERM."""
    drain, site, agent, clock, listener, phases = controller(delay_s=0)
    events: list[str] = []
    RecordingService(events).setServiceParent(drain)
    drain.observe(lambda phase, _: events.append(phase))
    channel, _ = connect(site)
    channel.dataReceived(b"GET /v2/blob HTTP/1.1\r\nHost: h\r\n\r\n")
    drain.stopService()
    listener.closing.callback(None)
    assert "access log closed" not in events
    finish_response(agent)
    channel.connectionLost(Failure(ResponseDone()))
    assert events[-2:] == ["access log closed", "done"]


@pytest.mark.unhandled_errors_expected
def test_an_observer_error_does_not_stop_the_drain() -> None:
    """A failing observer is logged (as a failure: a bug); the drain goes on."""
    drain, site, agent, clock, listener, phases = controller(delay_s=0)

    def broken(phase: str, in_flight: int) -> None:
        raise RuntimeError("observer bug")

    drain.observe(broken)
    stopped = drain.stopService()
    listener.closing.callback(None)
    assert stopped.called
    assert [p for p, _ in phases] == ["delay", "closing", "finishing", "done"]


# --------------------------------------------------------------------------
# Access log reopening, config re-reading


def entry() -> AccessLogEntry:
    return AccessLogEntry(
        timestamp=0.0, socket_peer="10.0.0.1", client="203.0.113.9", method=b"GET",
        uri=b"/v2/", protocol=b"HTTP/1.1", status=200, body_bytes_sent=0, referer=None,
        user_agent=None, request_time_s=0.0, request_length=10, upstream_response_time_s=None,
    )


def test_reopen_moves_new_lines_to_the_new_file(tmp_path: Path) -> None:
    """After mv and reopen, new lines go to a new file at the configured path."""
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.startService()
    log.write(entry())
    path.rename(tmp_path / "access.log.1")
    assert log.reopen("SIGUSR1")
    log.write(entry())
    log.stopService()
    assert len((tmp_path / "access.log.1").read_text().splitlines()) == 1
    assert len(path.read_text().splitlines()) == 1


def test_failed_reopen_keeps_the_open_file(tmp_path: Path) -> None:
    """A reopen that cannot open the path keeps writing to the file already open."""
    directory = tmp_path / "logs"
    directory.mkdir()
    log = AccessLog(str(directory / "access.log"))
    log.startService()
    (directory / "access.log").rename(tmp_path / "moved.log")
    directory.rmdir()
    assert not log.reopen("SIGHUP")
    log.write(entry())
    log.stopService()
    assert len((tmp_path / "moved.log").read_text().splitlines()) == 1


def test_changed_keys_are_named() -> None:
    """The keys whose values differ are listed, dotted."""
    edited = Config(http=HTTPConfig(drain_delay_s=1.0))
    assert changed_keys(Config(), edited) == ["http.drain_delay_s"]
    assert changed_keys(Config(), Config()) == []


def test_sighup_reopens_and_names_keys_needing_restart(tmp_path: Path) -> None:
    """SIGHUP reopens the access log and re-reads the config, naming edited keys."""
    reopened: list[str] = []

    class Log:
        def reopen(self, why: str) -> bool:
            reopened.append(why)
            return True

    reopener = Reopener(None, Log(), Config(), lambda: Config(http=HTTPConfig(idle_timeout_s=5.0)))
    messages: list[str] = []
    from twisted.logger import formatEvent, globalLogPublisher

    observer = lambda event: messages.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        reopener.on_sighup()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert reopened == ["SIGHUP"]
    assert any("http.idle_timeout_s" in m and "restart" in m for m in messages), messages


# --------------------------------------------------------------------------
# Access log path checks


def test_access_log_path_problems(tmp_path: Path) -> None:
    """Missing directory, a directory, unwritable file or directory: each has its reason."""
    assert access_log_problem("-") is None
    assert access_log_problem(str(tmp_path / "a.log")) is None
    assert "does not exist" in access_log_problem(str(tmp_path / "missing" / "a.log"))
    assert "is a directory" in access_log_problem(str(tmp_path))
    nobody = 65534
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o755)
    assert "not writable" in access_log_problem(str(locked / "a.log"), uid=nobody, gid=nobody)
    existing = locked / "b.log"
    existing.write_text("")
    existing.chmod(0o644)
    assert "not writable" in access_log_problem(str(existing), uid=nobody, gid=nobody)
    existing.chmod(0o666)
    assert access_log_problem(str(existing), uid=nobody, gid=nobody) is None
    assert access_log_problem(str(locked / "a.log"), uid=0, gid=0) is None


def test_bind_problem_names_a_port_in_use() -> None:
    """A port someone listens on is reported with the system's reason."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert bind_problem(ListenAddress("127.0.0.1", port)) == "Address already in use"


# --------------------------------------------------------------------------
# Options


@pytest.fixture
def pair(tmp_path: Path) -> tuple[str, str]:
    cert, key = write_pair(tmp_path, *make_certificate(), stem="good")
    return str(cert), str(key)


def parse(*args: str) -> Options:
    options = Options()
    # The default PROXY listener (0.0.0.0) must name its load balancers.
    options.parseOptions([*args, "--proxy-trusted", "10.0.0.0/8"])
    return options


@pytest.fixture(autouse=True)
def no_default_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_PATH_VARIABLE, "")


def test_check_prints_ok(pair, capsys, tmp_path: Path) -> None:
    """--check on a good config prints FILE: OK and exits 0."""
    config = tmp_path / "q.toml"
    config.write_text(f'[tls]\ncert = "{pair[0]}"\nkey = "{pair[1]}"\n')
    with pytest.raises(SystemExit) as exit:
        parse("--check", "--config", str(config))
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"{config}: OK\n"


@pytest.mark.parametrize(
    "toml, args, expected",
    [
        ("[http]\ndrain_delay = 1\n", (), "{config}: http.drain_delay: unknown key"),
        ("[http]\ndrain_delay_s = -1\n", (), "{config}: http.drain_delay_s: must not be negative"),
        ("[http\n", (), "{config}: -: not valid TOML"),
        ("", ("--cert", "/nonexistent.pem"), "--cert: tls.cert: cannot read /nonexistent.pem"),
        ('[access_log]\npath = "/nonexistent/a.log"\n', (),
         "{config}: access_log.path: directory /nonexistent does not exist"),
        ("", ("--drain-delay", "-2"), "--drain-delay: http.drain_delay_s: must not be negative"),
    ],
)
def test_check_reports_the_source_and_exits_2(pair, capsys, tmp_path, toml, args, expected) -> None:
    """--check prints the error line naming the file or option that set the value, and exits 2."""
    config = tmp_path / "q.toml"
    config.write_text(f'[tls]\ncert = "{pair[0]}"\nkey = "{pair[1]}"\n' + toml)
    with pytest.raises(SystemExit) as exit:
        parse("--check", "--config", str(config), *args)
    assert exit.value.code == CHECK_ERROR_EXIT
    err = capsys.readouterr().err
    assert err.startswith("quayfront: " + expected.format(config=config)), err
    assert len(err.splitlines()) == 1, err


def test_default_certificate_error_blames_the_default(capsys, monkeypatch) -> None:
    """Without a file, a bad certificate is the built-in default's, not the command line's."""
    import quayfront.tap
    from quayfront.config import ConfigError

    def unreadable(config, source):
        raise ConfigError(source, "tls.cert", f"cannot read {config.cert}: No such file")

    # Whatever this machine has under /etc/quayfront/tls.
    monkeypatch.setattr(quayfront.tap, "load_server_tls", unreadable)
    with pytest.raises(SystemExit) as exit:
        parse()
    assert exit.value.code == STARTUP_ERROR_EXIT
    assert capsys.readouterr().err == (
        f"quayfront: built-in default: tls.cert: cannot read {Config().tls.cert}: No such file\n"
    )


def test_version(capsys) -> None:
    """--version names quayfront's version and Twisted's."""
    import twisted

    import quayfront

    with pytest.raises(SystemExit) as exit:
        parse("--version")
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert f"quayfront {quayfront.__version__}" in out
    assert f"Twisted {twisted.__version__}" in out


def test_default_config_path(tmp_path: Path) -> None:
    """$QUAYFRONT_CONFIG names the default file (empty: none); else the /etc file when present."""
    assert default_config_path({CONFIG_PATH_VARIABLE: str(tmp_path / "q.toml")}) == str(
        tmp_path / "q.toml"
    )
    assert default_config_path({CONFIG_PATH_VARIABLE: ""}) is None
    expected = DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None
    assert default_config_path({}) == expected


def test_default_config_file_is_read(pair, monkeypatch, tmp_path: Path) -> None:
    """Without --config the default file is read, and options still override it."""
    config = tmp_path / "q.toml"
    config.write_text(
        f'[tls]\ncert = "{pair[0]}"\nkey = "{pair[1]}"\n[http]\ndrain_delay_s = 3.0\n'
        "idle_timeout_s = 7.0\n"
    )
    monkeypatch.setenv(CONFIG_PATH_VARIABLE, str(config))
    options = parse("--drain-delay", "0")
    assert options.config.http.drain_delay_s == 0.0
    assert options.config.http.idle_timeout_s == 7.0
    assert options.source_of("http.drain_delay_s") == "--drain-delay"
    assert options.source_of("http.idle_timeout_s") == str(config)
    assert options.source_of("http.drain_timeout_s") == "built-in default"


def test_help_points_to_the_example_config() -> None:
    """--help names the shipped example configuration, which exists."""
    import quayfront.tap

    text = str(Options())
    assert "quayfront.toml" in text
    assert os.path.exists(quayfront.tap.example_config_path())


def test_access_log_checked_for_the_twistd_user(pair, capsys, tmp_path: Path) -> None:
    """With twistd -u, the access log must be writable by that user, checked before the drop."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    options = Options()
    options.parent = {"uid": 65534, "gid": 65534, "nodaemon": True}
    with pytest.raises(SystemExit) as exit:
        options.parseOptions(
            ["--cert", pair[0], "--key", pair[1], "--access-log", str(locked / "a.log"),
             "--proxy-trusted", "10.0.0.0/8"]
        )
    assert exit.value.code == STARTUP_ERROR_EXIT
    err = capsys.readouterr().err
    assert err.startswith("quayfront: --access-log: access_log.path: cannot create")
    assert "uid 65534" in err


# --------------------------------------------------------------------------
# Startup errors


class FailingListener(Service):
    def privilegedStartService(self) -> None:
        from quayfront.config import ConfigError

        raise ConfigError("-", "proxy_listener.address", "cannot listen on 0.0.0.0:8443: in use")


def test_root_hands_startup_errors_to_its_reporter() -> None:
    """A ConfigError while listening goes to on_startup_error; without one it is raised."""
    from quayfront.config import ConfigError
    from quayfront.lifecycle import Root

    root = Root()
    FailingListener().setServiceParent(root)
    with pytest.raises(ConfigError):
        root.privilegedStartService()
    reported: list[Exception] = []
    root.on_startup_error = reported.append
    root.privilegedStartService()
    [error] = reported
    assert error.key == "proxy_listener.address"


def test_startup_failure_in_the_foreground_is_one_line_and_exit_1(tmp_path: Path, capsys) -> None:
    """In the foreground the line goes to standard error, the pid file is removed, exit status 1."""
    from quayfront.config import ConfigError
    from quayfront.lifecycle import StartupFailure

    pidfile = tmp_path / "twistd.pid"
    pidfile.write_text("1")
    failure = StartupFailure(
        lambda e: f"--proxy-listen: {e.key}: {e.reason}", {"pidfile": str(pidfile)}, None, 1
    )
    import sys

    written: list[str] = []

    class Err:
        def write(self, text: str) -> None:
            written.append(text)

        def flush(self) -> None:
            pass

    real, sys.__stderr__ = sys.__stderr__, Err()
    try:
        with pytest.raises(SystemExit) as exit:
            failure(ConfigError("-", "proxy_listener.address", "cannot listen on x: in use"))
    finally:
        sys.__stderr__ = real
    assert exit.value.code == 1
    assert written == ["quayfront: --proxy-listen: proxy_listener.address: cannot listen on x: in use\n"]
    assert not pidfile.exists()


def test_listeners_on_one_port_conflict() -> None:
    """Two listeners on one port (same host, or a wildcard) are a configuration error."""
    from quayfront.config import MetricsConfig, ProxyListenerConfig, TLSListenerConfig
    from quayfront.lifecycle import listener_conflict

    assert listener_conflict(Config()) is None
    same = Config(
        proxy_listener=ProxyListenerConfig(address=ListenAddress("127.0.0.1", 9000)),
        tls_listener=TLSListenerConfig(address=ListenAddress("0.0.0.0", 9000)),
    )
    assert listener_conflict(same) == (
        "tls_listener.address",
        "0.0.0.0:9000 is also taken by proxy_listener.address (127.0.0.1:9000)",
    )
    other_hosts = Config(
        proxy_listener=ProxyListenerConfig(address=ListenAddress("127.0.0.1", 9000)),
        metrics=MetricsConfig(address=ListenAddress("127.0.0.2", 9000)),
    )
    assert listener_conflict(other_hosts) is None


def test_daemonised_startup_failure_reaches_the_terminal_and_twistds_parent(tmp_path: Path) -> None:
    """Daemonised, the line goes to the saved terminal, twistd's parent hears of it, status 1."""
    from quayfront.config import ConfigError
    from quayfront.lifecycle import StartupFailure

    terminal_r, terminal_w = os.pipe()
    status_r, status_w = os.pipe()
    pidfile = tmp_path / "twistd.pid"
    pidfile.write_text("1")
    child = os.fork()
    if child == 0:  # the daemon
        try:
            os.close(terminal_r)
            os.close(status_r)
            failure = StartupFailure(
                lambda e: f"--listen: {e.key}: {e.reason}",
                {"pidfile": str(pidfile), "statusPipe": status_w},
                terminal_w,
                1,
            )
            failure(ConfigError("-", "tls_listener.address", "cannot listen on x: in use"))
        finally:
            os._exit(99)
    os.close(terminal_w)
    os.close(status_w)
    _, status = os.waitpid(child, 0)
    with os.fdopen(terminal_r, "rb") as terminal, os.fdopen(status_r, "rb") as pipe:
        line = terminal.read()
        told = pipe.read()
    assert os.waitstatus_to_exitcode(status) == 1
    assert line == b"quayfront: --listen: tls_listener.address: cannot listen on x: in use\n"
    assert told.startswith(b"1 ")
    assert not pidfile.exists()


def test_sighup_applies_live_keys_and_names_the_rest() -> None:
    """Keys with a live setter are applied at once; only the others are named for a restart."""
    applied: list[float] = []

    class Log:
        def reopen(self, why: str) -> bool:
            return True

    edited = Config(http=HTTPConfig(drain_delay_s=2.0, idle_timeout_s=5.0))
    reopener = Reopener(None, Log(), Config(), lambda: edited,
                        live={"http.drain_delay_s": applied.append})
    messages: list[str] = []
    from twisted.logger import formatEvent, globalLogPublisher

    observer = lambda event: messages.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        reopener.on_sighup()
        reopener.on_sighup()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert applied == [2.0]
    restart = [m for m in messages if "after a restart" in m]
    assert len(restart) == 2 and all("http.idle_timeout_s" in m for m in restart)
    assert not any("drain_delay_s" in m for m in restart)
