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
import os
import subprocess
import sys
import time
from pathlib import Path


def descendants(root: int) -> set[int]:
    """Pids below ``root`` (children, their children, ...), from /proc (no imports of fedsim,
    whose torch would add its own memory and CPU to the machine being measured)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                raw = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


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
        pids = {child.pid} | descendants(child.pid)
        total = sum(rss_kb(pid) for pid in pids)
        if total > peak_kb:
            peak_kb, peak_n = total, len(pids)
        time.sleep(args.every)
    print(json.dumps({"rc": child.returncode, "wall_s": round(time.perf_counter() - t0, 1),
                      "peak_mb": round(peak_kb / 1024), "peak_processes": peak_n}))
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
