"""
Run twistd with a cProfile profiler that signals switch on and off.

``python -m tests.bench.profiled STATS_FILE TWISTD_ARGS...``

SIGUSR1 starts profiling; SIGUSR2 stops it and writes the statistics to
STATS_FILE (atomically: a reader never sees half a file), so one workload
is profiled without quayfront's start-up.  The profiler times with the
process's CPU clock: twistd's own ``--profile`` uses the wall clock, and on
a busy machine a C{send()} that wakes another process and is preempted
would look expensive although quayfront did no work.
"""

from __future__ import annotations

import cProfile
import os
import signal
import sys
import time


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: python -m tests.bench.profiled STATS_FILE TWISTD_ARGS...")
    stats_path = sys.argv[1]
    sys.argv = ["twistd", *sys.argv[2:]]
    from twisted.scripts.twistd import run

    profiler = cProfile.Profile(time.process_time)

    def start(signum: int, frame: object) -> None:
        profiler.enable()

    def stop(signum: int, frame: object) -> None:
        profiler.disable()
        profiler.dump_stats(stats_path + ".part")
        os.replace(stats_path + ".part", stats_path)
        profiler.clear()

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    run()


if __name__ == "__main__":
    main()
