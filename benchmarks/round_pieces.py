"""The host cost of a client update, per piece: per-client work, data generation and the
driver's serial share, in microseconds per client update, on the in-process vectorized
engine (every client still with its own Flower message, reply, hooks and state).

    python benchmarks/round_pieces.py                          # thousand_clients (synthetic)
    python benchmarks/round_pieces.py --dataset mnist5k        # the same shape on mnist5k
    python benchmarks/round_pieces.py --set model.arch=mlp --json
    python benchmarks/round_pieces.py --set model.arch=mlp --against /tmp/before --repeat 5

It runs the scenario in this process (``engine.kind = "inprocess"``, ``engine.vectorize =
true``, no evaluation but the last round's) with timers around the pieces. Each piece is
timed twice: CPU time of this thread (``time.thread_time``: with ``engine.threads = 1``
every piece runs on this thread, and time other processes take from a shared machine does
not count) and wall time (``time.perf_counter``; it also counts waiting, e.g. a checkpoint's
``fsync``). The reported figures are CPU time; ``*_wall`` keys give the wall time.

Pieces, each divided by the number of client updates (train messages answered):

``vmap_us``         the cohort's local SGD steps (the stacked ``vmap`` arithmetic; stacking
                    the members' arrays and data before them is host work);
``data_us``         generating or slicing the clients' data (synthetic generation, domain
                    transforms, local splits) inside the train cohorts, one client at a
                    time or a cohort at once (``--set data.generator=2``);
``client_host_us``  the rest of the train cohorts: the clients' Contexts with their stored
                    state decoded and encoded again, decoding messages, the hooks, start
                    arrays, batch plans, stacking, replies (``answer_cohort``, what a Ray
                    cohort actor runs; a tree without it: the cohort trainer alone);
``driver_us``       the round loop minus the cohorts and evaluation: sampling and
                    configuring clients, the grid (message ids, the client-state store's
                    bytes), screening and aggregating replies, the round record and the
                    checkpoint. On the Ray-cohort engine this part stays on the driver,
                    serial.

``driver_parts`` splits part of the driver's share (CPU): the checkpoint, the round record,
screening replies, FedAvg's ``configure_train``/``aggregate_train``, pushing messages.

``amdahl_16`` projects the Ray-cohort engine's speed-up over in-process at 16 actors from
these shares (Amdahl's law): with ``s = driver_us`` serial and ``p = client_host_us +
data_us + vmap_us`` spread over ``n`` actors, a client update costs ``s + p`` in-process
and ``s + p / n`` with ``n`` actors, so the speed-up is ``(s + p) / (s + p / n)``, at most
``1 + p / s``. It leaves out what only Ray adds (pickling cohorts, the actors' own
per-task overhead), so it is an upper bound.

To compare two trees (before/after a change), ``--against DIR`` runs this script
``--repeat`` times on each tree, alternating (``PYTHONPATH=DIR``, then this repository),
and prints the median of each figure and the ratio of the medians; ``DIR`` is for example
a ``git worktree`` of the earlier commit. This machine's timings drift between runs far
more than within one, so compare only figures from one alternating session.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the dataset-backed variant of thousand_clients: mnist5k's 5,000 images over 125 clients
#: (40 samples each, as the synthetic clients), 100 of them per round
DATASETS = {
    "synthetic": [],
    "mnist5k": ["data.name=mnist5k", "partition.num_clients=125"],
}

#: where each piece lives, in this tree or an earlier one: (module, attribute path); the
#: first that exists is timed
VMAP_AT = [("fedsim.engine.vectorized", "CohortBackend.run"),
           ("fedsim.engine.vectorized", "_CohortRun.sgd_steps")]  # the steps alone, either way
DATA_AT = [("fedsim.data.federated", "FederatedData._materialize"),
           ("fedsim.data.federated", "FederatedData.prefetch")]

#: parts of the driver's share, reported beside it (``driver_parts``, µs per update): (module,
#: attribute path, label); those that exist in the tree are timed
DRIVER_PARTS = [
    ("fedsim.checkpoint", "Checkpointer.__call__", "checkpoint"),
    ("fedsim.sinks.folder", "RunFolder.on_round", "round_record"),
    ("fedsim.report.record", "RunRecorder.on_round", "round_record"),
    ("fedsim.server.loop", "_nonfinite", "screening"),
    ("fedsim.server.loop", "_arrays_finite", "screening"),
    ("flwr.serverapp.strategy", "FedAvg.configure_train", "configure_train"),
    ("flwr.serverapp.strategy", "FedAvg.aggregate_train", "aggregate_train"),
    ("fedsim.engine.inprocess", "InProcessGrid.push_messages", "grid_push"),
]


class Clock:
    """CPU (this thread) and wall seconds of wrapped callables. A piece marked ``exclude``
    is subtracted from the ``net`` pieces around it (once, however deeply such pieces
    nest); ``inside`` pieces count only while a given piece is running."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.depth: dict[str, int] = defaultdict(int)
        self._excluded = [0.0, 0.0]
        self._exclusive_depth = 0

    def wrap(self, owner, name: str, label: str, *, exclude: bool = False,
             net: bool = False, inside: str | None = None) -> None:
        f = getattr(owner, name)

        def timed(*a, **k):
            if inside is not None and not self.depth[inside]:
                return f(*a, **k)
            outer = exclude and self._exclusive_depth == 0
            if exclude:
                self._exclusive_depth += 1
            before = list(self._excluded)
            self.depth[label] += 1
            c, w = time.thread_time(), time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                dc, dw = time.thread_time() - c, time.perf_counter() - w
                self.depth[label] -= 1
                if exclude:
                    self._exclusive_depth -= 1
                if net:
                    dc -= self._excluded[0] - before[0]
                    dw -= self._excluded[1] - before[1]
                self.cpu[label] += dc
                self.wall[label] += dw
                self.calls[label] += 1
                if outer:
                    self._excluded[0] += dc
                    self._excluded[1] += dw

        setattr(owner, name, timed)


def _resolve(candidates):
    for module, path in candidates:
        try:
            owner = importlib.import_module(module)
        except ImportError:
            continue
        *parents, name = path.split(".")
        for part in parents:
            owner = getattr(owner, part, None)
        if owner is not None and hasattr(owner, name):
            return owner, name
    raise SystemExit(f"none of {candidates} exists in this tree")


def _existing(candidates):
    found = []
    for module, path in candidates:
        try:
            found.append(_resolve([(module, path)]))
        except SystemExit:
            continue
    return found


def measure(scenario: str, rounds: int, overrides: list[str]) -> dict:
    """Run ``scenario`` with the timers; the figures per client update."""
    import fedsim
    import fedsim.engine.inprocess as inprocess
    import fedsim.engine.vectorized as vectorized
    import fedsim.engine.vectorized_eval as vectorized_eval
    import fedsim.server.loop as loop

    clock = Clock()
    updates = [0]
    trainer_call = vectorized.CohortTrainer.__call__

    def counted(self, msgs, contexts):
        updates[0] += len(msgs)
        return trainer_call(self, msgs, contexts)

    vectorized.CohortTrainer.__call__ = counted
    if hasattr(inprocess, "answer_cohort"):  # a cohort with its clients' Contexts and states
        _wrap_cohorts(clock, inprocess, vectorized.CohortTrainer,
                      vectorized_eval.CohortEvaluator)
    else:  # an earlier tree: the grid built Contexts and stored states outside the handler
        clock.wrap(vectorized.CohortTrainer, "__call__", "cohort", exclude=True)
        clock.wrap(vectorized_eval.CohortEvaluator, "__call__", "cohort_eval", exclude=True)
    clock.wrap(*_resolve(VMAP_AT), "vmap", inside="cohort")
    for owner, name in _existing(DATA_AT):  # each that exists: none calls another
        clock.wrap(owner, name, "data", inside="cohort")
    parts = []
    for module, path, label in DRIVER_PARTS:
        for owner, name in _existing([(module, path)]):
            clock.wrap(owner, name, label, inside="driver")
            parts.append(label)
    run_rounds = loop.run_rounds

    def rounds_with_timed_evaluation(strategy, grid, arrays, scenario, evaluate, *a, **k):
        holder = type("Evaluate", (), {"__call__": staticmethod(evaluate)})
        clock.wrap(holder, "__call__", "evaluate", exclude=True)
        return run_rounds(strategy, grid, arrays, scenario, holder.__call__, *a, **k)

    holder = type("Loop", (), {"run_rounds": staticmethod(rounds_with_timed_evaluation)})
    clock.wrap(holder, "run_rounds", "driver", net=True)
    import fedsim.runner  # noqa: F401  the modules that import run_rounds by name
    for module in list(sys.modules.values()):  # every module that imported it by name
        if getattr(module, "run_rounds", None) is run_rounds:
            module.run_rounds = holder.run_rounds
    sets = overrides + [f"server.rounds={rounds}", "engine.kind=inprocess",
                        "engine.vectorize=true", "engine.threads=1",
                        "output.eval_every=1000000"]
    with tempfile.TemporaryDirectory(prefix="fedsim-pieces-") as out:
        t0 = time.perf_counter()
        fedsim.run(scenario, sets, out=out, overwrite=True)
        wall = time.perf_counter() - t0
    n = max(1, updates[0])
    res: dict = {}
    for suffix, table in (("", clock.cpu), ("_wall", clock.wall)):
        vmap, data = table["vmap"], table["data"]
        res[f"client_host_us{suffix}"] = 1e6 * (table["cohort"] - vmap - data) / n
        res[f"data_us{suffix}"] = 1e6 * data / n
        res[f"driver_us{suffix}"] = 1e6 * table["driver"] / n
        res[f"vmap_us{suffix}"] = 1e6 * vmap / n
    res["amdahl_16"] = amdahl(res["driver_us"], res["client_host_us"] + res["data_us"]
                              + res["vmap_us"], 16)
    res["driver_parts"] = {k: 1e6 * clock.cpu[k] / n for k in dict.fromkeys(parts)}
    res.update(updates=updates[0], rounds=rounds, run_wall_s=wall,
               load_1min=os.getloadavg()[0])
    return res


def _wrap_cohorts(clock: Clock, inprocess, trainer: type, evaluator: type) -> None:
    """Time ``answer_cohort`` (a cohort with its clients' Contexts and state bytes: what a
    Ray cohort actor runs) as ``cohort`` for train cohorts and ``cohort_eval`` for
    evaluation cohorts; other kinds stay in the driver's share."""
    answer = inprocess.answer_cohort
    pieces = type("Cohorts", (), {"train": staticmethod(answer),
                                  "evaluate": staticmethod(answer)})
    clock.wrap(pieces, "train", "cohort", exclude=True)
    clock.wrap(pieces, "evaluate", "cohort_eval", exclude=True)

    def by_kind(handler, *a, **k):
        if isinstance(handler, trainer):
            return pieces.train(handler, *a, **k)
        if isinstance(handler, evaluator):
            return pieces.evaluate(handler, *a, **k)
        return answer(handler, *a, **k)

    inprocess.answer_cohort = by_kind


def amdahl(serial: float, parallel: float, n: int) -> float:
    """Amdahl's speed-up of ``n`` workers over one: ``(s + p) / (s + p / n)``."""
    return (serial + parallel) / (serial + parallel / n)


def compare(args: argparse.Namespace, rest: list[str]) -> None:
    """Alternate runs of this script on ``args.against`` and on this tree; medians."""
    trees = {"before": str(Path(args.against).resolve()), "after": str(ROOT)}
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    for _ in range(args.repeat):
        for label, tree in trees.items():
            out = subprocess.run([sys.executable, __file__, "--json", *rest],
                                 env={**os.environ, "PYTHONPATH": tree}, cwd=tree,
                                 capture_output=True, text=True, check=True).stdout
            runs[label].append(json.loads(out.strip().splitlines()[-1]))
    keys = [k for k in runs["after"][0] if isinstance(runs["after"][0][k], float)]
    med = {label: {k: statistics.median(r[k] for r in rs) for k in keys}
           for label, rs in runs.items()}
    if args.json:
        print(json.dumps({"median": med, "runs": runs}))
        return
    print(f"{args.repeat} alternating runs each, medians; {' '.join(rest)}")
    print(f"  {'':<22}{'before':>12}{'after':>12}{'after/before':>14}")
    for k in keys:
        b, a = med["before"][k], med["after"][k]
        print(f"  {k:<22}{b:12.1f}{a:12.1f}{a / b if b else float('nan'):14.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="scenarios/thousand_clients.toml")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="synthetic",
                   help="synthetic clients, or the federation on a dataset (mnist5k)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true")
    p.add_argument("--against", metavar="DIR", help="compare with the tree in DIR")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    if args.against:
        rest = ["--scenario", args.scenario, "--dataset", args.dataset,
                "--rounds", str(args.rounds), *(f"--set={o}" for o in args.overrides)]
        compare(args, rest)
        return
    # fedsim and the ``strategies`` package from PYTHONPATH first, else this repository; never
    # this folder, whose strategies.py would shadow the package
    here = Path(__file__).resolve().parent
    sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != here] + [str(ROOT)]
    res = measure(args.scenario, args.rounds, DATASETS[args.dataset] + args.overrides)
    if args.json:
        print(json.dumps(res))
        return
    print(f"{args.scenario} ({args.dataset}), {args.rounds} rounds, {res['updates']} client "
          f"updates {' '.join(args.overrides)}; load {res['load_1min']:.1f}")
    print(f"  {'µs per client update':<22}{'CPU':>10}{'wall':>10}")
    for k in ("client_host_us", "data_us", "driver_us", "vmap_us"):
        print(f"  {k:<22}{res[k]:10.1f}{res[k + '_wall']:10.1f}")
    print("  driver_us, of which (CPU): " + ", ".join(
        f"{k} {v:.1f}" for k, v in res["driver_parts"].items()))
    print(f"  amdahl_16: Ray cohorts at 16 actors ≈ {res['amdahl_16']:.1f}x in-process "
          "(upper bound)")


if __name__ == "__main__":
    main()
