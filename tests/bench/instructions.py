"""
Instructions per proxied small GET, counted by callgrind: steadier than CPU
time on a shared machine (repeated runs agree within about 0.3 %).

quayfront (1 worker, the bench configuration, every feature on) runs under
C{valgrind --tool=callgrind --instr-atstart=no} behind HAProxy, with the
same nginx null upstream as C{make bench}.  After a warm-up, counting is
switched on; quayfront's idle work (its timers) is counted for a while with
no load, then wrk sends GET /small over one keep-alive connection.  The
result is the instructions counted under load, less the idle rate times the
load's duration, per request.  A garbage collection that happens to run
while counting is reported separately (it is rare since requests leave no
reference cycles, and one full collection would add its whole cost to a
few hundred requests)::

    python -m tests.bench.instructions [SECONDS]

Needs valgrind (C{apt-get install valgrind}) besides what C{make bench}
needs.  Under callgrind quayfront runs about 50 times slower: a run takes
about two minutes.
"""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.integration import harness

from . import fronts, rig

IDLE_S = 8
LOAD_S = 15
#: Startup and the first handshakes under callgrind take far longer.
SLOW_START_S = 120


def _dump(pid: int, out: Path) -> tuple[int, Path]:
    """Ask callgrind for a dump; its instruction total and file."""
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    files = sorted(glob.glob(f"{out}.{pid}.*"), key=lambda name: int(name.rsplit(".", 1)[1]))
    total = 0
    with open(files[-1], errors="replace") as dump:
        for line in dump:
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total, Path(files[-1])


def _collector_instructions(dump: Path) -> int:
    """Instructions spent in CPython's garbage collector in C{dump}."""
    annotated = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", str(dump)],
        check=True, capture_output=True, text=True,
    ).stdout
    found = [int(m.group(1).replace(",", "")) for m in
             re.finditer(r"^\s*([\d,]+) .*gc_collect_main", annotated, re.MULTILINE)]
    return max(found, default=0)


def main() -> None:
    load_s = int(sys.argv[1]) if len(sys.argv) > 1 else LOAD_S
    for binary in ("valgrind", "callgrind_control", "callgrind_annotate"):
        harness.require_binary(binary)
    work = Path(tempfile.mkdtemp(prefix="quayfront-instructions-"))
    out = work / "callgrind.out"
    under_callgrind = harness.twistd_command()
    harness.twistd_command = lambda: [
        "valgrind", "--tool=callgrind", "--instr-atstart=no",
        f"--callgrind-out-file={out}.%p", *under_callgrind,
    ]
    waiting = rig.wait_for
    rig.wait_for = lambda condition, timeout_s, **kw: waiting(
        condition, max(timeout_s, SLOW_START_S), **kw)
    datadir = fronts.make_datadir()
    started = []
    try:
        cert, key = fronts.make_cert(work)
        (upstream_port,) = harness.free_ports(1)
        values = {"WORKDIR": str(work), "DATADIR": str(datadir), "CERT": str(cert),
                  "KEY": str(key), "UPSTREAM_PORT": str(upstream_port), "PROXY_PORT": "0"}
        started.append(fronts.start_nginx("upstream-nginx", "nginx-upstream.conf.template",
                                          values, work, upstream_port))
        front = rig.start_quayfront(work / "q", "quayfront", upstream_port, cert, key, "1")
        started.append(front)
        balancer = rig.start_balancer(work / "haproxy", front.port)
        started.append(balancer)
        port = rig.Subject("quayfront", front, balancer, "1").port
        rig.run_wrk(port, 5, 4)
        pid = front.all_pids[0]
        subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True,
                       capture_output=True)
        _dump(pid, out)
        idle_started = time.monotonic()
        time.sleep(IDLE_S)  # quayfront's idle work is what is measured here
        idle, _ = _dump(pid, out)
        idle_per_s = idle / (time.monotonic() - idle_started)
        load_started = time.monotonic()
        run = rig.run_wrk(port, load_s, 1)
        total, dump = _dump(pid, out)
        load_elapsed = time.monotonic() - load_started
        subprocess.run(["callgrind_control", "-i", "off", str(pid)], check=True,
                       capture_output=True)
        collector = _collector_instructions(dump)
        net = (total - idle_per_s * load_elapsed) / run.requests
        print(f"{run.requests} requests over one keep-alive connection in {load_s} s")
        print(f"instructions per request: {net / 1e6:.3f} M "
              f"(idle {idle_per_s / 1e6:.2f} M/s subtracted)")
        print(f"  of which garbage collection: {collector / run.requests / 1e6:.3f} M")
    finally:
        for process in reversed(started):
            process.stop()
        shutil.rmtree(datadir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
