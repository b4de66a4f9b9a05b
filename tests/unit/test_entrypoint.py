"""
The container entrypoint: QUAYFRONT_* variables become command-line
options; an unknown one is an error.
"""

from __future__ import annotations

import pytest

from quayfront.entrypoint import (
    DEFAULT_CONFIG,
    EntrypointError,
    main,
    option_arguments,
    option_names,
    twistd_argv,
)


def test_every_option_has_a_variable() -> None:
    """The variables follow the options of twistd quayfront, so a new option needs no change here."""
    names = option_names()
    for name in ("config", "proxy-listen", "listen", "upstream", "cert", "key", "access-log",
                 "proxy-trusted", "metrics-listen"):
        assert name in names


def test_defaults_config_file_and_access_log_to_stdout() -> None:
    """Without variables: the packaged configuration, the access log on standard output."""
    assert option_arguments({"PATH": "/bin"}, option_names()) == [
        "--config", DEFAULT_CONFIG, "--access-log", "-",
    ]


def test_variables_become_options() -> None:
    """QUAYFRONT_PROXY_LISTEN is --proxy-listen, and so on; other variables are ignored."""
    arguments = option_arguments(
        {
            "QUAYFRONT_CONFIG": "/config/q.toml",
            "QUAYFRONT_UPSTREAM": "http://127.0.0.1:5000",
            "QUAYFRONT_PROXY_LISTEN": "0.0.0.0:8443",
            "QUAYFRONT_ACCESS_LOG": "/tmp/access.log",
            "HOME": "/tmp",
        },
        option_names(),
    )
    assert arguments == [
        "--config", "/config/q.toml",
        "--access-log", "/tmp/access.log",
        "--proxy-listen", "0.0.0.0:8443",
        "--upstream", "http://127.0.0.1:5000",
    ]


def test_unknown_variable_is_an_error() -> None:
    """A misspelt QUAYFRONT_* variable is named, with the list of valid ones."""
    with pytest.raises(EntrypointError) as e:
        option_arguments({"QUAYFRONT_UPSTREAMS": "x", "QUAYFRONT_CERT": "c"}, option_names())
    assert str(e.value).startswith("unknown variable QUAYFRONT_UPSTREAMS; the QUAYFRONT_*")
    valid = str(e.value).split("are: ", 1)[1].split(", ")
    assert "QUAYFRONT_UPSTREAM" in valid and "QUAYFRONT_PROXY_LISTEN" in valid


def test_main_exits_2_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    """The entrypoint does not start anything on an unknown variable."""
    assert main([], {"QUAYFRONT_LISTEN_PORT": "1"}) == 2
    assert "quayfront-entrypoint: unknown variable QUAYFRONT_LISTEN_PORT" in capsys.readouterr().err


def test_twistd_runs_in_the_foreground_without_pid_file() -> None:
    """twistd is PID 1's replacement: --nodaemon, no pid file."""
    argv = twistd_argv(["--config", "c"])
    assert argv[0].endswith("twistd")
    assert argv[1:] == ["--nodaemon", "--pidfile=", "quayfront", "--config", "c"]
