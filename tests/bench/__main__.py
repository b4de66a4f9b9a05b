"""
``python -m tests.bench``: run the benchmarks, print the report and write it
to run/bench-report.txt.

Parts (BENCH_ONLY selects some, comma-separated; the default runs
"parse,scaling,layers", about 10 minutes on 2 cores):

  parse     PROXY header parse cost against a TLS handshake (parsecost.py)
  fronts    issue 11: quayfront (1 worker, every feature on) beside nginx
            (1 worker) as the same PROXY v2 + TLS front behind HAProxy (rig.py)
  scaling   the same run with 1 worker and auto for both fronts: issue 11's
            figures and issue 12's (rig.py); includes "fronts"
  layers    below HTTP, one reactor change at a time (layers.py)
  spread    how two workers share new connections, shared socket vs
            SO_REUSEPORT (scaling.py)
  profile   quayfront under cProfile per workload (fronts.py)
  held      memory per held idle TLS connection only, quayfront and nginx
            (1 worker each), about a minute (held.py)

Environment (all optional):

  BENCH_ONLY                     parts to run (see above)
  BENCH_RIG_CONNECTIONS          wrk's keep-alive connections (32)
  BENCH_RIG_SECONDS              seconds of each wrk run (5)
  BENCH_ROUNDS                   rounds of every measurement (3)
  BENCH_TRANSFER_ROUNDS          rounds of the rig's transfers (5, at least BENCH_ROUNDS)
  BENCH_BYTES                    download/upload size (rig: 512 MiB, profile: 1 GiB)
  BENCH_HELD_CONNECTIONS         idle connections for memory per connection (400)
  BENCH_HELD_ROUNDS              rounds of the held-connection part (3)
  BENCH_FRESH_REQUESTS           new-connection requests per client, spread (300)
  BENCH_SMALL_REQUESTS           sequential requests on one connection, profile (2000)
  BENCH_PARSER_REPEATS           timeit repeats for the parse/handshake part (5)
"""

from __future__ import annotations

import datetime
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

from . import fronts, held, layers, parsecost, rig, scaling

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_DIR = REPO_ROOT / "run"
REPORT = RUN_DIR / "bench-report.txt"
PARTS = ("parse", "fronts", "scaling", "layers", "spread", "profile", "held")
DEFAULT_PARTS = ("parse", "scaling", "layers")
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
    parts = [p.strip() for p in os.environ.get("BENCH_ONLY", "").split(",") if p.strip()]
    parts = parts or list(DEFAULT_PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        sys.exit(f"BENCH_ONLY: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    sections = ["\n".join(_header())]
    if "parse" in parts:
        print("running: PROXY parse vs TLS handshake ...", file=sys.stderr, flush=True)
        sections.append(parsecost.run())
    if "scaling" in parts or "fronts" in parts:
        scale = "scaling" in parts
        print(f"running: quayfront vs nginx, {'1 and auto workers' if scale else '1 worker'}"
              f" ({'5-7' if scale else '2-4'} minutes) ...", file=sys.stderr, flush=True)
        sections.append(rig.run(RUN_DIR / "bench", scaling=scale))
    if "layers" in parts:
        print("running: below HTTP, reactor variants (2-3 minutes) ...", file=sys.stderr,
              flush=True)
        sections.append(layers.run(RUN_DIR / "bench-layers"))
    if "spread" in parts:
        print("running: two workers, shared socket vs SO_REUSEPORT ...", file=sys.stderr,
              flush=True)
        sections.append(scaling.run(RUN_DIR / "bench-spread"))
    if "profile" in parts:
        print("running: quayfront under cProfile ...", file=sys.stderr, flush=True)
        sections.append(fronts.run(RUN_DIR / "bench-profile"))
    if "held" in parts:
        print("running: memory per held connection, quayfront vs nginx ...", file=sys.stderr,
              flush=True)
        sections.append(held.run(RUN_DIR / "bench-held"))
    sections.append(f"load average after: {_load()}")
    report = "\n\n".join(sections) + "\n"
    print(report)
    RUN_DIR.mkdir(exist_ok=True)
    REPORT.write_text(report)
    print(f"(written to {REPORT.relative_to(REPO_ROOT)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
