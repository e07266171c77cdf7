"""Where the CPU goes in a Ray cohort run: milliseconds of CPU per round for every thread of
the driver, of each cohort actor and of Ray's own daemons, read from ``/proc`` over a
window in the middle of the run (Linux only).

    python benchmarks/ray_cpu_share.py                              # thousand_clients, CNN
    python benchmarks/ray_cpu_share.py --set model.arch=mlp
    python benchmarks/ray_cpu_share.py --scenario scenarios/quickstart.toml --rounds 60

The run is an ordinary ``fedsim run`` in a subprocess (``engine.kind = "ray"``,
``engine.vectorize = true``, ``engine.ray_workers = 2``, no evaluation until the end); the
window starts once ``--skip`` rounds are recorded (start-up left out) and ends ``--window``
seconds later. On two cores, the actors' main threads, the driver's main thread and the
rest (Ray's I/O threads and daemons) compete for the same two CPUs: their sum against
the window's wall time says how busy the machine was, and the driver's share is serial.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _threads(pids: list[int]) -> dict[tuple[int, int], tuple[str, str, int]]:
    """(pid, tid) -> (process name, thread name, CPU ticks) for every thread of ``pids``."""
    out = {}
    for pid in pids:
        try:
            process = _name(Path(f"/proc/{pid}/stat").read_text())
            for tid in os.listdir(f"/proc/{pid}/task"):
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                out[(pid, int(tid))] = (process, _name(stat), int(fields[11]) + int(fields[12]))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def _name(stat: str) -> str:
    return stat[stat.index("(") + 1:stat.rindex(")")]


def _tree(root: int) -> list[int]:
    """``root`` and every process below it (Ray's daemons in their own session included)."""
    from fedsim.engine.processes import descendants

    return [root, *(proc.pid for proc in descendants([root]))]


def _rounds(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="scenarios/thousand_clients.toml")
    p.add_argument("--rounds", type=int, default=80)
    p.add_argument("--skip", type=int, default=10, help="rounds before the window starts")
    p.add_argument("--window", type=float, default=2.0, help="seconds")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedsim-raycpu-") as tmp:
        out = Path(tmp) / "run"
        sets = [*args.overrides, f"server.rounds={args.rounds}", "output.eval_every=1000000",
                "engine.kind=ray", "engine.vectorize=true", "engine.ray_workers=2"]
        cmd = [sys.executable, "-m", "fedsim.cli", "run", args.scenario, "--out", str(out),
               "--quiet", *[a for s in sets for a in ("--set", s)]]
        proc = subprocess.Popen(cmd, cwd=ROOT)
        rounds = out / "rounds.jsonl"
        while _rounds(rounds) < args.skip and proc.poll() is None:
            time.sleep(0.005)
        before, r0, t0 = _threads(_tree(proc.pid)), _rounds(rounds), time.perf_counter()
        time.sleep(args.window)
        after, r1, t1 = _threads(_tree(proc.pid)), _rounds(rounds), time.perf_counter()
        proc.wait()
    if proc.returncode or r1 <= r0:
        sys.exit(f"error: the run ended (exit {proc.returncode}) before the window closed; "
                 "raise --rounds or lower --skip/--window")
    tick = 1000.0 / os.sysconf("SC_CLK_TCK") / (r1 - r0)  # ms of CPU per round per tick
    rows = sorted(((ticks - before.get(key, (0, 0, 0))[2]) * tick, key[0], proc_name, name)
                  for key, (proc_name, name, ticks) in after.items())
    wall = 1000.0 * (t1 - t0) / (r1 - r0)
    print(f"{args.scenario} {' '.join(args.overrides)}: {r1 - r0} rounds in {t1 - t0:.2f} s, "
          f"{wall:.1f} ms per round; CPU ms per round (driver pid {proc.pid}):")
    for ms, pid, proc_name, name in reversed(rows):
        if ms > 0:
            print(f"  {ms:7.1f}  pid {pid:<8} {proc_name:<20} thread {name}")
    print(f"  {sum(r[0] for r in rows):7.1f}  in all, against {2 * wall:.1f} on two cores")


if __name__ == "__main__":
    main()
