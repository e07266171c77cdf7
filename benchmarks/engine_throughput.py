"""Client updates per second on one scenario: Flower's Ray engine, fedsim's in-process engine
(sequential and vectorized) and a bare PyTorch loop with no framework at all (the floor).

    python benchmarks/engine_throughput.py                       # scenarios/quickstart.toml
    python benchmarks/engine_throughput.py --scenario scenarios/thousand_clients.toml \\
        --set partition.num_clients=1000 --rounds 6 --repeat 3
    python benchmarks/engine_throughput.py --threads 1,2 --engines inprocess,bare,vectorized
    python benchmarks/engine_throughput.py --json  # {"ray": …, "inprocess": …, "vectorized": …,
                                                   #  "bare": …, "inprocess_parallel": …,
                                                   #  "vectorized_parallel": …,
                                                   #  "threads": {engine: best count}}

``inprocess`` trains one client at a time on one core; ``inprocess_parallel`` uses
``--workers`` threads (default: one per core), the same cores Ray's actors get;
``vectorized`` trains each round's clients as ``vmap`` cohorts on ``--threads`` torch
threads, ``vectorized_parallel`` the same with one torch thread per core (``--workers``);
``ray_cohorts`` runs the same cohorts on ``--ray-workers`` Ray actors (``engine.kind = "ray"``
with ``engine.vectorize``), ``--ray-cpus`` CPUs each. Every engine's peak resident memory is
reported, summed over all of its processes (a local Ray's daemons and actors included):
each process's own peak, added up (:class:`PeakMemory`).
Every engine runs the same scenario in its own subprocess with the same seed, so the same
clients train on the same batches in every round. Throughput is client updates per second
of training-phase time (sampling, local training, aggregation; no evaluation) over rounds
2..N, so one-off start-up work (Ray actors, imports, first-touch data) is left out for all
engines alike; the first round is reported separately. For the engines that run in one
process (in-process, vectorized, bare) it also reports process CPU milliseconds per update
(rounds 2..N-1), which other jobs on a shared machine disturb far less than wall time:
the overhead ratio against the bare loop is best read from that column; its "best round"
(the least CPU per update of any one round, over the repeats) is the least disturbed of all,
since other jobs only ever add CPU time. The CPU columns include what a run does between
rounds (checkpoints), which the bare loop does not do.

Fairness settings: the in-process engine and the bare loop use ``--threads`` torch threads
(default 1). Several counts (``--threads 1,2``) run every engine at every count, interleaved;
the report gives the ratios between engines at the same count (what an engine adds to the
same work) and each engine at its best count (the fastest way to run it here; ``--json``
reports each engine's median at that count, and the counts). Ray gets ``--ray-cpus`` CPUs
per client actor (default 1: one actor per core, each with one thread, its best setting on
a 2-core machine; benchmarks/RESULTS.md, "Every engine against Flower's Ray engine") and
``vectorized_parallel`` ``--workers`` threads, whatever ``--threads`` says: they run once,
at the first count.
Every engine, the bare loop and Ray's workers included, runs with the scenario's
``engine.reuse_memory`` malloc settings (fedsim.engine.memory).

The bare loop is what a user would write by hand: for each sampled client, load the global
state dict, run minibatch SGD over the same batches, add its state dict into a running
weighted sum; no messages, no records, no serialization (with ``fedbn``, each client's norm
layers are kept in a plain dict and left out of the sum). Its final model is compared with
the in-process engine's as a check that both did the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
ENGINES = ("ray", "inprocess", "inprocess_parallel", "vectorized", "vectorized_parallel",
           "ray_cohorts", "bare")
#: engines whose thread count is their own setting (``--ray-cpus``, ``--workers``), not
#: ``--threads``: measured once, at the first count
OWN_THREADS = ("ray", "vectorized_parallel", "ray_cohorts")


def _counts(text: str) -> list[int]:
    """``--threads``: one count or several, comma-separated (``1,2``)."""
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a thread count: give positive integers, e.g. 2 or 1,2")
    return list(dict.fromkeys(counts))


# --------------------------------------------------------------------------- workers


def _steady(rounds: list[dict], cpu: dict[int, float] | None = None) -> dict:
    """Updates/s over rounds 2..N; with ``cpu`` (round -> process CPU seconds), CPU ms per
    update over rounds 2..N-1 (the last round also evaluates)."""
    trained = [r for r in rounds if r.get("round", 0) >= 1]
    later = trained[1:] or trained
    updates = sum(r["updates"] for r in later)
    seconds = sum(r["train_seconds"] for r in later)
    out = {
        "updates_per_s": updates / seconds if seconds > 0 else None,
        "updates": updates,
        "seconds": seconds,
        "first_round_seconds": trained[0]["train_seconds"] if trained else None,
        "round_seconds": [r["train_seconds"] for r in trained],
    }
    middle = [r for r in trained[1:-1] if cpu and r["round"] in cpu and r["updates"]]
    if middle:
        out["cpu_ms_per_update"] = 1e3 * sum(cpu[r["round"]] for r in middle) / sum(
            r["updates"] for r in middle)
        # the least disturbed round: other jobs only ever add CPU time (cache, SMT sharing)
        out["cpu_ms_per_update_best"] = min(1e3 * cpu[r["round"]] / r["updates"]
                                            for r in middle)
    return out


def _cpu_marks() -> tuple[list, callable]:
    """A progress callback recording process CPU time at each round's end."""
    marks: list[tuple[int, float]] = []
    return marks, lambda rec: marks.append((rec["round"], time.process_time()))


def _per_round(marks: list[tuple[int, float]]) -> dict[int, float]:
    return {r: t - t0 for (_, t0), (r, t) in zip(marks, marks[1:])}


def run_fedsim(engine: str, scenario_path: str, overrides: list[str], threads: int,
               ray_cpus: float, workers: int, out: Path, ray_workers: int = 2) -> dict:
    """One fedsim run on ``engine``; throughput from its rounds.jsonl."""
    import fedsim
    from fedsim.errors import ScenarioError

    extra = {
        "inprocess": ["engine.kind=inprocess", f"engine.threads={threads}",
                      "engine.vectorize=false", "engine.workers=1"],
        "inprocess_parallel": ["engine.kind=inprocess", f"engine.threads={threads}",
                               "engine.vectorize=false", f"engine.workers={workers}"],
        "vectorized": ["engine.kind=inprocess", f"engine.threads={threads}",
                       "engine.vectorize=true", "engine.workers=1"],
        # a cohort's kernels are large enough for intra-op threads: one per core
        "vectorized_parallel": ["engine.kind=inprocess", f"engine.threads={workers}",
                                "engine.vectorize=true", "engine.workers=1"],
        "ray": ["engine.kind=ray", f"engine.ray_num_cpus={ray_cpus}", "engine.vectorize=false"],
        # vectorized cohorts on --ray-workers actors, --ray-cpus each; the driver (grid,
        # strategy, state store) keeps the scenario's engine.threads
        "ray_cohorts": ["engine.kind=ray", "engine.vectorize=true",
                        f"engine.ray_num_cpus={ray_cpus}", f"engine.ray_workers={ray_workers}"],
    }[engine]
    marks, progress = _cpu_marks()
    try:
        result = fedsim.run(scenario_path, overrides + extra, out=out, overwrite=True,
                            progress=progress)
    except ScenarioError as exc:
        return {"updates_per_s": None, "skipped": str(exc)}
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    # Ray's work is in other processes
    cpu = _per_round(marks) if engine not in ("ray", "ray_cohorts") else None
    return {**_steady(rounds, cpu), "model": str(out / "model.pt"),
            "accuracy": result.summary["final"]["global_test_accuracy"]}


def run_bare(scenario_path: str, overrides: list[str], threads: int, out: Path) -> dict:
    """The floor: the same local SGD and FedAvg as a plain PyTorch loop."""
    import torch

    from fedsim.client.hooks import norm_keys
    from fedsim.config import load_scenario
    from fedsim.context import build_global_model
    from fedsim.data.federated import build_federated_data
    from fedsim.device import resolve_device
    from fedsim.engine.memory import reused_memory

    torch.set_num_threads(threads)
    sc = load_scenario(scenario_path, overrides)
    if sc.server.strategy not in ("fedavg", "fedbn"):
        return {"updates_per_s": None,
                "skipped": f"the bare loop implements fedavg and fedbn, not {sc.server.strategy}"}
    data = build_federated_data(sc)
    device = resolve_device(sc.engine.device)  # the engines' device (CUDA under engine.device)
    model = build_global_model(sc, data).to(device)
    glob = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # FedBN (Li et al. 2021): norm layers stay with each client, the server averages the rest
    local_keys = set(norm_keys(model)) if sc.server.strategy == "fedbn" else set()
    local: dict[int, dict[str, torch.Tensor]] = {}  # client -> its own norm layers
    ids = list(data.participating)
    rounds = []
    cpu = {}
    with reused_memory(sc.engine.reuse_memory):  # the engines' malloc settings, for fairness
        _bare_rounds(sc, data, model, glob, local_keys, local, ids, rounds, cpu)
    torch.save({k: v.cpu() for k, v in glob.items()}, out / "bare_model.pt")
    return {**_steady(rounds, cpu), "model": str(out / "bare_model.pt")}


def _bare_rounds(sc, data, model, glob, local_keys, local, ids, rounds, cpu) -> None:
    """Every round of the bare loop, in place on ``glob``, ``local``, ``rounds`` and ``cpu``."""
    import torch
    import torch.nn.functional as F

    from fedsim.models.norm import uses_batch_statistics
    from fedsim.rng import derive_seed, torch_generator

    cfg = sc.client
    device = next(model.parameters()).device
    drop_singleton = uses_batch_statistics(sc.model.norm)
    for rnd in range(1, sc.server.rounds + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        random.seed(derive_seed(sc.seed, "sample-train", rnd))  # the engines' sampling
        chosen = random.sample(ids, sc.server.clients_per_round)
        sizes = [data.client_size(c) for c in chosen]
        total = sum(sizes)
        acc: dict[str, torch.Tensor] = {}
        for cid, n in zip(chosen, sizes):
            model.load_state_dict({**glob, **local.get(cid, {})})
            x, y = data.client_train(cid)
            x, y = x.to(device), y.to(device)
            gen = torch_generator(sc.seed, "client-train", rnd, cid)
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                  weight_decay=cfg.weight_decay)
            model.train()
            # device accumulators: no synchronisation per step (as the engines)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            for _ in range(cfg.epochs):
                order = torch.randperm(len(x), generator=gen).to(device)  # CPU draw
                for start in range(0, len(x), cfg.batch_size):
                    idx = order[start : start + cfg.batch_size]
                    if drop_singleton and len(idx) == 1 and len(x) > 1:
                        continue
                    logits = model(x[idx])
                    loss = F.cross_entropy(logits, y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    loss_sum += loss.detach().double() * len(idx)
                    correct += (logits.detach().argmax(1) == y[idx]).sum()
            w = n / total  # running weighted sum, as Flower's FedAvg weights (float32 arrays)
            for k, v in model.state_dict().items():
                if k in local_keys:
                    local.setdefault(cid, {})[k] = v.detach().clone()
                    continue
                term = v.detach() * w if v.is_floating_point() else v.double() * w
                acc[k] = term if k not in acc else acc[k] + term
        glob.update({k: (v.round().to(glob[k].dtype) if not glob[k].is_floating_point() else v)
                     for k, v in acc.items()})
        if device.type == "cuda":  # the round's kernels finish inside its time
            torch.cuda.synchronize(device)
        rounds.append({"round": rnd, "updates": len(chosen),
                       "train_seconds": time.perf_counter() - t0})
        cpu[rnd] = time.process_time() - c0


def worker(args: argparse.Namespace) -> None:
    # the repo root first: this folder holds strategies.py, which would shadow the
    # ``strategies`` package that registers fedbn & co.
    sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(args.overrides)
    threads = args.threads[0]  # the driver passes one count per run
    with PeakMemory() as peak:
        if args.engine == "bare":
            res = run_bare(args.scenario, overrides, threads, out)
        else:
            res = run_fedsim(args.engine, args.scenario, overrides, threads, args.ray_cpus,
                             args.workers, out / args.engine, args.ray_workers)
    res.update(peak.result())
    print("RESULT " + json.dumps(res))


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class PeakMemory:
    """Peak resident memory of this process and of every process below it (Ray's own
    processes and its workers): the sum of each process's own peak (``VmHWM``, which the
    kernel keeps), read every ``interval`` seconds and once more at the end, and this
    process's own peak. The sum of the processes' peaks bounds the peak of their sum from
    above (the processes need not peak at the same moment); a process that starts and ends
    between two reads is missed. Reads are rare on purpose: each reads ``/proc`` for every
    process on the machine, and at every 0.2 s that slowed a Ray run's actors by 10-30%
    (benchmarks/RESULTS.md, "Watching Ray's processes"). Linux only (/proc);
    elsewhere, zeros."""

    def __init__(self, interval: float = 2.0) -> None:
        import threading

        self.interval = interval
        self.peaks: dict[tuple[int, str], int] = {}  # (pid, start time) -> VmHWM, KiB
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def read(self) -> None:
        from fedsim.engine.processes import descendants, find_proc

        procs = [find_proc(os.getpid())] + list(descendants([os.getpid()]))
        for p in procs:
            if p is not None and (kib := _rss_kib(p.pid, "VmHWM")):
                self.peaks[p] = max(self.peaks.get(p, 0), kib)

    def _sample(self) -> None:
        while True:
            self.read()
            if self._done.wait(self.interval):
                return

    @property
    def peak_kib(self) -> int:
        return sum(self.peaks.values())

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.read()

    def result(self) -> dict:
        return {"peak_rss_mb_all": self.peak_kib / 1024,
                "peak_rss_mb_driver": _rss_kib(os.getpid(), "VmHWM") / 1024}


# --------------------------------------------------------------------------- driver


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import flwr
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "flwr": flwr.__version__,
            "cuda": torch.cuda.is_available()}


def measure(engine: str, threads: int, args: argparse.Namespace, overrides: list[str],
            tmp: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--scenario", args.scenario,
           "--out", str(tmp), "--threads", str(threads), "--ray-cpus", str(args.ray_cpus),
           "--workers", str(args.workers), "--ray-workers", str(args.ray_workers)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{engine} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def max_diff(path_a: str | None, path_b: str | None) -> float | None:
    import torch

    if not path_a or not path_b:
        return None
    a = torch.load(path_a, weights_only=True)
    b = torch.load(path_b, weights_only=True)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="scenarios/quickstart.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rounds", type=int, help="server.rounds (default: the scenario's)")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--repeat", type=int, default=1, help="interleaved repetitions")
    p.add_argument("--threads", type=_counts, default=[1], metavar="T[,T...]",
                   help="torch threads (in-process, bare); several: each engine at each count")
    p.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs per Ray client actor")
    p.add_argument("--ray-workers", type=int, default=2,
                   help="engine.ray_workers for ray_cohorts (vectorized cohorts on Ray actors)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="engine.workers for inprocess_parallel (default: one per core)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per engine run")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.engine = args.worker
        return worker(args)

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        p.error(f"unknown engines {sorted(unknown)}; choose from {', '.join(ENGINES)}")
    overrides = list(args.overrides)
    if args.rounds:
        overrides.append(f"server.rounds={args.rounds}")
    overrides.append("output.eval_every=1000000")  # evaluate once, at the end, everywhere
    runs: list[dict[tuple[str, int], dict]] = []
    load = [os.getloadavg()[0]]
    units = [(e, t) for t in args.threads for e in engines
             if not (e in OWN_THREADS and t != args.threads[0])]
    with tempfile.TemporaryDirectory(prefix="fedsim-bench-") as tmp:
        for rep in range(args.repeat):  # interleaved: every (engine, threads) once per repeat
            got = {}
            for engine, t in units:
                got[engine, t] = measure(engine, t, args, overrides, Path(tmp) / f"{rep}-{t}")
                load.append(os.getloadavg()[0])
            for t in args.threads:
                if ("inprocess", t) in got and ("bare", t) in got:
                    got["bare", t]["max_param_diff_vs_inprocess"] = max_diff(
                        got["inprocess", t].get("model"), got["bare", t].get("model"))
            runs.append(got)
    report(args, engines, runs, load)


def _ratio(a, b):
    return a / b if a and b else None


def _median(values: list) -> float | None:
    values = [v for v in values if v]
    return statistics.median(values) if values else None


def _per_run(runs, a, b, key) -> list[float]:
    """``a``'s ``key`` over ``b``'s in each run (interleaved repeats), where both have it."""
    out = []
    for r in runs:
        if a in r and b in r:
            x = _ratio(r[a].get(key), r[b].get(key))
            if x:
                out.append(x)
    return out


def best_threads(runs, units) -> dict[str, int]:
    """Each engine's thread count with the highest median updates/s."""
    best: dict[str, tuple[float, int]] = {}
    for e, t in units:
        m = _median([r[e, t].get("updates_per_s") for r in runs if (e, t) in r])
        if m and (e not in best or m > best[e][0]):
            best[e] = (m, t)
    return {e: t for e, (_, t) in best.items()}


def report(args, engines, runs, load) -> None:
    units = [u for u in runs[0]] if runs else []
    best = best_threads(runs, units)
    if args.json:
        print(json.dumps({**{e: _median([r[e, best[e]].get("updates_per_s") for r in runs])
                             if e in best else None for e in ENGINES},
                          "threads": best}))
        return
    info = machine()
    print(f"scenario {args.scenario} {' '.join(args.overrides)}"
          f"{' rounds=' + str(args.rounds) if args.rounds else ''}")
    print(f"machine: {info['cpu']}, {info['cores']} cores, python {info['python']}, "
          f"torch {info['torch']}, flwr {info['flwr']}, CUDA {info['cuda']}; "
          f"load average during the runs {min(load):.1f}–{max(load):.1f}")
    print(f"torch threads {','.join(map(str, args.threads))} (in-process, bare); "
          f"inprocess_parallel: {args.workers} workers; vectorized_parallel: {args.workers} "
          f"threads; Ray: {args.ray_cpus} CPU per client actor; updates/s over rounds 2..N; "
          f"{len(runs)} interleaved repeat(s)\n")
    print(f"{'engine':<19} {'threads':>7} {'updates/s':>10} {'runs':>24} {'1st round s':>12} "
          f"{'CPU ms/update':>14} {'best round':>10}")
    for e, t in units:
        got = [r[e, t] for r in runs]
        vals = [g.get("updates_per_s") for g in got]
        med = _median(vals)
        f1 = _median([g.get("first_round_seconds") for g in got])
        c = _median([g.get("cpu_ms_per_update") for g in got])
        cb = min((g["cpu_ms_per_update_best"] for g in got if g.get("cpu_ms_per_update_best")),
                 default=None)
        shown = " ".join(f"{v:.1f}" if v else "–" for v in vals)
        tt = args.workers if e == "vectorized_parallel" else t
        print(f"{e:<19} {tt!s:>7} {f'{med:.1f}' if med else 'n/a':>10} {shown:>24} "
              f"{'–' if f1 is None else round(f1, 2)!s:>12} {f'{c:.1f}' if c else '–':>14} "
              f"{f'{cb:.1f}' if cb else '–':>10}")
        for g in got:
            if g.get("skipped"):
                print(f"  {e}: not applicable: {g['skipped']}")
                break
    pairs = [("inprocess", "ray", "in-process / Ray"),
             ("inprocess_parallel", "ray", "in-process parallel / Ray (same cores)"),
             ("vectorized", "ray", "vectorized / Ray"),
             ("vectorized_parallel", "ray", "vectorized parallel / Ray (same cores)"),
             ("inprocess", "bare", "in-process / bare"),
             ("vectorized", "bare", "vectorized / bare"),
             ("ray_cohorts", "vectorized", "Ray cohorts / vectorized"),
             ("ray_cohorts", "bare", "Ray cohorts / bare")]
    cpu_pairs = [("inprocess", "bare", "in-process / bare, CPU per update"),
                 ("vectorized", "bare", "vectorized / bare, CPU per update")]
    for t in args.threads:  # same thread count: what the engine adds to the same work
        print(f"\nratios at {t} torch thread(s), per run (updates/s; CPU ms per update, "
              "less sensitive to other load: 1.11 there is 0.9 in updates/s)")
        for a, b, label in pairs:
            ua = (a, args.threads[0] if a in OWN_THREADS else t)
            ub = (b, args.threads[0] if b in OWN_THREADS else t)
            got = _per_run(runs, ua, ub, "updates_per_s")
            if ua in units and ub in units:
                print(f"  {label:<40} {' '.join(f'{x:.2f}' for x in got) or 'n/a'}")
        for a, b, label in cpu_pairs:
            if (a, t) in units and (b, t) in units:
                got = _per_run(runs, (a, t), (b, t), "cpu_ms_per_update")
                best_round = _per_run(runs, (a, t), (b, t), "cpu_ms_per_update_best")
                print(f"  {label:<40} {' '.join(f'{x:.2f}' for x in got) or 'n/a'}"
                      f"  (best rounds: {' '.join(f'{x:.2f}' for x in best_round) or 'n/a'})")
    if len(args.threads) > 1 and best:
        print("\neach engine at its best thread count (highest median updates/s):")
        for e in engines:
            if e in best:
                med = _median([r[e, best[e]].get("updates_per_s") for r in runs])
                print(f"  {e:<19} {best[e]} thread(s)  {med:.1f} updates/s")
        if "bare" in best:
            for e in engines:
                if e != "bare" and e in best:
                    got = _per_run(runs, (e, best[e]), ("bare", best["bare"]), "updates_per_s")
                    print(f"  {e} @{best[e]} / bare @{best['bare']}: "
                          f"{' '.join(f'{x:.2f}' for x in got) or 'n/a'} per run")
    print("\npeak resident memory, MB (median over runs): all processes of the run (this "
          "process and every one below it: a local Ray's daemons and actors; the sum of each "
          "process's own peak), and the driver")
    for e, t in units:
        got = [r[e, t] for r in runs]
        every = _median([g.get("peak_rss_mb_all") for g in got])
        driver = _median([g.get("peak_rss_mb_driver") for g in got])
        if every:
            print(f"  {e:<19} {t!s:>3} thread(s)  all {every:7.0f}  driver {driver:7.0f}")
    diffs = [r[u].get("max_param_diff_vs_inprocess") for r in runs for u in r if u[0] == "bare"]
    if any(d is not None for d in diffs):
        print(f"\nbare vs in-process final model, max |Δ|: "
              f"{max(d for d in diffs if d is not None):.2e} (same clients, batches, FedAvg)")


if __name__ == "__main__":
    main()
