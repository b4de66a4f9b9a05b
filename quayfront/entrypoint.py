"""
C{quayfront-entrypoint}: the container image's entry point.

The effective configuration is the TOML file C{QUAYFRONT_CONFIG} (default
C{/etc/quayfront/quayfront.toml}) plus one environment variable per
command-line option of C{twistd quayfront}, named after it:
C{--proxy-listen} is C{QUAYFRONT_PROXY_LISTEN}, C{--upstream} is
C{QUAYFRONT_UPSTREAM}, and so on.  A C{QUAYFRONT_*} variable that names no
option is an error (a misspelt override must not be ignored).  The access log
goes to standard output unless C{QUAYFRONT_ACCESS_LOG} says otherwise.

The configuration is checked first (C{--check}: certificates readable and
matching, every key valid), then C{twistd} replaces this process, so
quayfront is PID 1 and receives C{SIGTERM} from C{docker stop} itself.

C{quayfront-entrypoint --healthcheck} is the image's C{HEALTHCHECK}: it
asks the plain TLS listener of the same effective configuration for the
health resource and exits 0 on 200.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
from typing import Mapping, Sequence

PREFIX = "QUAYFRONT_"
DEFAULT_CONFIG = "/etc/quayfront/quayfront.toml"
#: Seconds the health check waits for the whole answer.
HEALTHCHECK_TIMEOUT_S = 5.0


class EntrypointError(Exception):
    """
    The environment does not describe a configuration.
    """


def option_names() -> list[str]:
    """
    The value-taking options of C{twistd quayfront} (C{--config} included).
    """
    from quayfront.tap import Options

    return [name for name, *_ in Options.optParameters]


def option_arguments(environ: Mapping[str, str], options: Sequence[str]) -> list[str]:
    """
    The C{twistd quayfront} arguments the C{QUAYFRONT_*} variables ask for.

    @raise EntrypointError: naming every C{QUAYFRONT_*} variable that is
        not an option.
    """
    by_variable = {PREFIX + name.upper().replace("-", "_"): name for name in options}
    unknown = sorted(v for v in environ if v.startswith(PREFIX) and v not in by_variable)
    if unknown:
        raise EntrypointError(
            f"unknown variable{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; the"
            f" QUAYFRONT_* variables are: {', '.join(sorted(by_variable))}"
        )
    arguments = ["--config", environ.get(PREFIX + "CONFIG") or DEFAULT_CONFIG]
    if "access-log" in options and PREFIX + "ACCESS_LOG" not in environ:
        arguments += ["--access-log", "-"]
    for variable, name in sorted(by_variable.items()):
        if variable in environ and name != "config":
            arguments += [f"--{name}", environ[variable]]
    return arguments


def twistd_argv(arguments: Sequence[str]) -> list[str]:
    """
    The command that serves: C{twistd} in the foreground, no pid file
    (PID 1 needs none, and the root filesystem may be read-only).
    """
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    if not os.access(twistd, os.X_OK):
        twistd = shutil.which("twistd") or "twistd"
    return [twistd, "--nodaemon", "--pidfile=", "quayfront", *arguments]


def healthcheck(arguments: Sequence[str]) -> int:
    """
    GET the health resource on the effective plain TLS listener; 0 on 200.
    """
    from quayfront.tap import Options

    options = Options()
    options.parseOptions(list(arguments))
    config = options.config
    address = config.tls_listener.address
    host = address.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    path = config.health.paths[-1] if config.health.paths else "/health/instance"
    context = ssl.create_default_context()
    # The health check asks its own process; the name on the certificate is
    # the service's, not 127.0.0.1.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, address.port), timeout=HEALTHCHECK_TIMEOUT_S) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(
                    f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
                )
                head = tls.recv(64)
    except OSError as e:
        print(f"quayfront-healthcheck: {host}:{address.port}: {e}", file=sys.stderr)
        return 1
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    print(f"quayfront-healthcheck: {path}: {status_line}")
    return 0 if status_line.startswith("HTTP/1.1 200") else 1


def main(argv: Sequence[str] = sys.argv[1:], environ: Mapping[str, str] = os.environ) -> int:
    try:
        arguments = option_arguments(environ, option_names())
    except EntrypointError as e:
        print(f"quayfront-entrypoint: {e}", file=sys.stderr)
        return 2
    if list(argv) == ["--healthcheck"]:
        return healthcheck(arguments)
    if argv:
        # Anything else is run as given (a shell for debugging, say).
        os.execvp(argv[0], list(argv))
    # The check, then the server in place of this process.
    check = subprocess.run([*twistd_argv(arguments), "--check"], stdin=subprocess.DEVNULL)
    if check.returncode != 0:
        print(
            f"quayfront-entrypoint: the configuration check failed (exit {check.returncode});"
            " not starting",
            file=sys.stderr,
        )
        return check.returncode
    argv = twistd_argv(arguments)
    sys.stdout.flush()
    os.execv(argv[0], argv)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
