"""
``python -m tests.bench``: run the benchmarks, print the report and write it
to run/bench-report.txt.

Environment (all optional):

  BENCH_ONLY                     "parse", "fronts", "profile" or "scaling": one part only
  BENCH_SCALING_BYTES            transfer size of the scaling part (default 256 MiB)
  BENCH_HELD_CONNECTIONS         idle connections for memory per connection (400)
  BENCH_FRESH_REQUESTS           new-connection requests per client (300)
  BENCH_BYTES                    download/upload size (default 1 GiB)
  BENCH_ROUNDS                   rounds of every front measurement (3)
  BENCH_SMALL_REQUESTS           sequential requests on one connection (2000)
  BENCH_CONNECTIONS              concurrent connections (4) ...
  BENCH_REQUESTS_PER_CONNECTION  ... each making this many requests (1000)
  BENCH_PARSER_REPEATS           timeit repeats for the parse/handshake part (5)
  BENCH_PROFILE=1                also profile quayfront (cProfile) per workload
"""

from __future__ import annotations

import datetime
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

from . import fronts, parsecost, scaling

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_DIR = REPO_ROOT / "run"
REPORT = RUN_DIR / "bench-report.txt"
#: Above this load average (per core) before the run, the report warns.
BUSY_LOAD_PER_CORE = 0.3


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _revision() -> str:
    """The commit measured, and whether quayfront/ had uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "quayfront"],
                               cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown revision"
    return f"commit {commit or '?'}" + (" + uncommitted changes in quayfront/" if dirty else "")


def _header() -> list[str]:
    import OpenSSL
    from OpenSSL import SSL

    cores = os.cpu_count() or 1
    lines = [
        f"quayfront benchmarks: {_revision()}",
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {cores} cores, {_cpu_model()}",
        f"Python {platform.python_version()}, pyOpenSSL {OpenSSL.__version__} "
        f"({SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()})",
        f"load average before: {_load()}",
    ]
    if os.getloadavg()[0] > BUSY_LOAD_PER_CORE * cores:
        lines.append("WARNING: the machine was busy when the run started; numbers are noisy.")
    return lines


def _stop_on_sigterm(signum, frame) -> None:
    # Unwind through every finally block, which stops the processes started.
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    signal.signal(signal.SIGHUP, _stop_on_sigterm)
    only = os.environ.get("BENCH_ONLY", "")
    if only not in ("", "parse", "fronts", "profile", "scaling"):
        sys.exit(f"BENCH_ONLY must be 'parse', 'fronts', 'profile' or 'scaling', not {only!r}")
    sections = ["\n".join(_header())]
    if only in ("", "parse"):
        print("running: PROXY parse vs TLS handshake ...", file=sys.stderr, flush=True)
        sections.append(parsecost.run())
    if only in ("", "fronts", "profile"):
        comparison = only != "profile"
        profile = fronts.PROFILE or only == "profile"
        if comparison:
            print("running: quayfront vs nginx (1-3 minutes) ...", file=sys.stderr, flush=True)
        if profile:
            print("running: quayfront under cProfile ...", file=sys.stderr, flush=True)
        sections.append(fronts.run(RUN_DIR / "bench", comparison=comparison, profile=profile))
    if only in ("", "scaling"):
        print("running: workers, quayfront and nginx, 1 and auto (3-6 minutes) ...",
              file=sys.stderr, flush=True)
        sections.append(scaling.run(RUN_DIR / "bench-scaling"))
    sections.append(f"load average after: {_load()}")
    report = "\n\n".join(sections) + "\n"
    print(report)
    RUN_DIR.mkdir(exist_ok=True)
    REPORT.write_text(report)
    print(f"(written to {REPORT.relative_to(REPO_ROOT)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
