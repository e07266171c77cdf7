"""Wall time and peak summed RSS of a command and every process below it (Ray's raylet, GCS
and workers, the Deployment Engine's SuperLink and SuperNodes), sampled from /proc.

``/usr/bin/time``'s maximum RSS is that of the largest single process; an engine that runs
clients in other processes needs the sum. RSS counts shared pages in every process that maps
them, so the sum is an upper bound. Run from the repository root::

    python benchmarks/tree_rss.py [--every 0.5] -- fedsim run scenarios/... --quiet

It prints one JSON line: ``{"rc", "wall_s", "peak_mb", "peak_processes"}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # fedsim.engine.processes

from fedsim.engine.processes import descendants  # noqa: E402


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    t0 = time.perf_counter()
    child = subprocess.Popen(command)
    peak_kb = peak_n = 0
    while child.poll() is None:
        pids = {child.pid} | {p.pid for p in descendants([child.pid])}
        total = sum(rss_kb(pid) for pid in pids)
        if total > peak_kb:
            peak_kb, peak_n = total, len(pids)
        time.sleep(args.every)
    print(json.dumps({"rc": child.returncode, "wall_s": round(time.perf_counter() - t0, 1),
                      "peak_mb": round(peak_kb / 1024), "peak_processes": peak_n}))
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
