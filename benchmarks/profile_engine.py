"""Where a round's time goes: the shares of training, data, aggregation, records and state.

    python benchmarks/profile_engine.py                            # quickstart, sequential
    python benchmarks/profile_engine.py --scenario scenarios/thousand_clients.toml \\
        --set partition.num_clients=1000 --set engine.vectorize=true --rounds 10
    python benchmarks/profile_engine.py --step                     # one local SGD step, by op
    python benchmarks/profile_engine.py --scenario scenarios/thousand_clients.toml \
        --cohort 100 --threads 2                                   # one vmap cohort, alone
    python benchmarks/profile_engine.py --scenario scenarios/thousand_clients.toml \
        --cohort 100 --fold-ab              # folded layers vs vmap's own rules, interleaved
    python benchmarks/profile_engine.py --scenario scenarios/thousand_clients.toml \
        --cohort 100 --memory-ab            # engine.reuse_memory's malloc settings or not
    python benchmarks/profile_engine.py --scenario scenarios/thousand_clients.toml \
        --evaluation                        # personalized evaluation: cohorts vs one by one

Runs the scenario once to warm up (imports, first-touch data), then again with ``cProfile``
switched on only inside each round's training phase and aggregation, and reports the
cumulative time of the parts that matter, as shares of the rounds' training time.
cProfile slows Python code more than it slows PyTorch kernels, so Python-side shares read
a little high; ``py-spy record`` of
``fedsim run`` gives unbiased shares (benchmarks/RESULTS.md, "Profiles").
``--step`` prints ``torch.profiler``'s table for one client's local training steps.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (label, function names as pstats keys end: "file:line(name)" -> matched on "(name)" and
#: the file's tail) — the first match per label counts, cumulative time
PARTS = [
    ("train phase: sampling, messages, clients", "loop.py", "train_phase"),
    ("aggregation (strategy.aggregate_train)", "loop.py", "strategy_hook"),
    ("local SGD, sequential (train_local)", "train.py", "train_local"),
    ("local SGD, vectorized cohorts (train_cohort)", "vectorized.py", "train_cohort"),
    ("client data, first touch (generate / load)", "federated.py", "_materialize"),
    ("reply arrays to Flower records (state_to_record)", "arrays.py", "state_to_record"),
    ("global arrays into the model (load_record)", "arrays.py", "load_record"),
    ("client state store: get", "store.py", "get"),
    ("client state store: put", "store.py", "put"),
    ("Flower Message construction", "message.py", "__init__"),
]


def _profiled_rounds(prof: cProfile.Profile) -> None:
    """Profile only the rounds' training phases and aggregation (not evaluation, not
    checkpoints), by wrapping the round loop's two entry points."""
    import fedsim.server.loop as loop

    train_phase, strategy_hook = loop.RoundRunner.train_phase, loop.strategy_hook

    def profiled_train_phase(self, *args, **kwargs):
        prof.enable()
        try:
            return train_phase(self, *args, **kwargs)
        finally:
            prof.disable()

    def profiled_hook(strategy, hook, *args, **kwargs):
        if hook != "aggregate_train":
            return strategy_hook(strategy, hook, *args, **kwargs)
        prof.enable()
        try:
            return strategy_hook(strategy, hook, *args, **kwargs)
        finally:
            prof.disable()

    loop.RoundRunner.train_phase = profiled_train_phase
    loop.strategy_hook = profiled_hook


def profile_run(scenario: str, overrides: list[str]) -> None:
    import fedsim

    ov = [*overrides, "output.eval_every=1000000"]
    with tempfile.TemporaryDirectory(prefix="fedsim-profile-") as tmp:
        fedsim.run(scenario, ov, out=Path(tmp) / "warm", progress=lambda r: None)
        rounds: list[dict] = []
        prof = cProfile.Profile()
        _profiled_rounds(prof)
        t0 = time.perf_counter()
        fedsim.run(scenario, ov, out=Path(tmp) / "run", progress=rounds.append)
        wall = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    train = sum(r.get("train_seconds", 0.0) for r in rounds if r.get("round", 0) >= 1)
    updates = sum(r.get("updates", 0) for r in rounds)
    print(f"scenario {scenario} {' '.join(overrides)}")
    print(f"profiled run: {wall:.1f} s wall, {train:.1f} s in training phases, {updates} "
          f"updates ({updates / train:.1f}/s under the profiler)\n")
    print(f"{'part':<52} {'seconds':>8} {'share':>7}")
    for label, file_tail, name in PARTS:
        cum = sum(v[3] for (f, _, n), v in stats.items() if n == name and f.endswith(file_tail))
        if cum:
            print(f"{label:<52} {cum:8.2f} {100 * cum / train:6.1f}%")
    print("\nonly the training phases and aggregation are profiled (not evaluation or "
          "checkpoints); shares are of the rounds' train_seconds.\nThe warm-up run leaves "
          "every client's data cached, so first-touch data generation is not in these shares.")


def profile_step(scenario: str, overrides: list[str]) -> None:
    import torch
    from torch.profiler import profile

    from fedsim.client.runtime import shared_runtime
    from fedsim.client.train import train_local
    from fedsim.config import load_scenario
    from fedsim.rng import torch_generator

    torch.set_num_threads(1)
    sc = load_scenario(scenario, overrides)
    rt = shared_runtime(sc)
    cid = rt.data.participating[0]
    x, y = rt.data.client_train(cid)
    for _ in range(5):  # warm-up
        train_local(rt.model, x, y, sc.client, torch_generator(0, "profile", cid))
    with profile() as prof:
        for _ in range(10):
            train_local(rt.model, x, y, sc.client, torch_generator(0, "profile", cid))
    print(f"10 local updates of client {cid} ({len(x)} samples, {sc.client.epochs} epochs, "
          f"batch {sc.client.batch_size}), one torch thread")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def time_cohort(scenario: str, overrides: list[str], clients: int, threads: int,
                fold_ab: bool = False) -> None:
    """Milliseconds per client-step of one vectorized cohort of ``clients`` clients (the
    scenario's model; random data of each client's size; its batch size), on its own.
    ``fold_ab``: alternate the norm and pooling layers' folded paths (fedsim.models.batched)
    with vmap's own rules, 8 times each, and print both (this machine's speed drifts, so only
    interleaved timings compare)."""
    import torch

    import fedsim.models.batched as batched_module
    from fedsim.client.runtime import shared_runtime
    from fedsim.config import load_scenario
    from fedsim.engine.vectorized import CohortMember, train_cohort
    from fedsim.models.local_sgd import plan_batches
    from fedsim.models.norm import uses_batch_statistics

    torch.set_num_threads(threads)
    sc = load_scenario(scenario, overrides)
    rt = shared_runtime(sc)
    params = {k: v.detach().clone() for k, v in rt.model.named_parameters()}
    bufs = {k: v.detach().clone() for k, v in rt.model.named_buffers()}
    drop = uses_batch_statistics(sc.model.norm)
    members = []
    for i, cid in enumerate(rt.data.participating[:clients]):
        x, y = rt.data.client_train(cid)
        plan = plan_batches(len(x), sc.client, torch.Generator().manual_seed(i), drop)
        members.append(CohortMember(params, x, y, plan, bufs))
    steps = sum(len(m.batches) for m in members)

    model = batched_module.fold_for_cohort(rt.model)  # as the cohort backend builds it

    def ms_per_cohort(reps: int) -> float:
        train_cohort(model, members, sc.client)  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            train_cohort(model, members, sc.client)
        return 1e3 * (time.perf_counter() - t0) / reps

    head = f"cohort of {len(members)} clients, {steps} client-steps, {threads} torch thread(s)"
    if not fold_ab:
        ms = ms_per_cohort(5)
        print(f"{head}: {ms:.1f} ms per cohort, {ms / steps:.3f} ms per client-step, "
              f"{ms / len(members):.2f} ms per client update")
        return
    folding = batched_module.folding_vmap
    times: dict[str, list[float]] = {"folded layers": [], "vmap's own rules": []}
    for _ in range(8):
        for label in times:
            fold = label.startswith("folded")
            batched_module.folding_vmap = folding if fold else (lambda: None)
            times[label].append(ms_per_cohort(3))
    batched_module.folding_vmap = folding
    print(f"{head}, ms per cohort over 8 interleaved repeats:")
    for label, ms in times.items():
        print(f"  {label:18s} min {min(ms):7.1f}  median {sorted(ms)[4]:7.1f}")


def memory_ab(argv: list[str], pairs: int = 5) -> None:
    """``--cohort`` timed in fresh processes, alternately with glibc's own malloc thresholds
    and with ``engine.reuse_memory``'s (given to the child as fedsim.engine.memory's
    ``MALLOC_ENV``: a process that has set them cannot go back, so each arm needs its own)."""
    import os
    import re
    import subprocess

    from fedsim.engine.memory import MALLOC_ENV

    base = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    cmd = [sys.executable, __file__, *[a for a in argv if a != "--memory-ab"]]
    times: dict[str, list[float]] = {"glibc's own": [], "reuse_memory": []}
    for _ in range(pairs):
        for label in times:
            env = {**base, **(MALLOC_ENV if label == "reuse_memory" else {})}
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            times[label].append(float(re.search(r"([\d.]+) ms per cohort", out.stdout)[1]))
            print(f"  {label:14s} {times[label][-1]:7.1f} ms per cohort", flush=True)
    for label, ms in times.items():
        print(f"{label:14s} min {min(ms):7.1f}  median {sorted(ms)[len(ms) // 2]:7.1f}")


def time_evaluation(scenario: str, overrides: list[str], repeats: int = 5) -> None:
    """Seconds per personalized evaluation (participating clients through the in-process
    grid, holdout clients on the server) of the scenario's initial model, the clients'
    models built by its strategy's hooks (no client has trained, so every one is a cold
    start): ``engine.vectorize``'s cohorts and the one-by-one path, interleaved."""
    import torch

    from fedsim.arrays import model_to_record
    from fedsim.client.app import make_client_app
    from fedsim.client.runtime import ClientRuntime
    from fedsim.config import load_scenario
    from fedsim.context import RunContext
    from fedsim.engine.inprocess import InProcessGrid
    from fedsim.engine.ordered import ClientOrderedGrid
    from fedsim.engine.vectorized_eval import CohortEvaluator
    from fedsim.server.evaluate import Evaluator
    from fedsim.server.factory import make_strategy
    from fedsim.server.personalized import PersonalizedEvaluator, personal_hooks

    sc = load_scenario(scenario, overrides)
    torch.set_num_threads(sc.engine.threads)
    run = RunContext.build(sc)
    data, model = run.data, run.new_model()
    hooks = personal_hooks(make_strategy(sc, model))
    if not hooks:
        raise SystemExit(f"server.strategy = {sc.server.strategy!r} keeps no local arrays: "
                         "there is no personalized evaluation to time")
    arrays = model_to_record(model)
    evaluator = Evaluator(sc.output, sc.seed, data, model, torch.device("cpu"))
    paths = {}
    for label, vectorized in (("cohorts", True), ("one by one", False)):
        clients = ClientRuntime.for_run(run)
        grid = InProcessGrid(make_client_app(clients), sc.num_participating,
                             cohort_evaluator=CohortEvaluator(clients) if vectorized else None,
                             cohort_size=sc.engine.cohort_size)
        paths[label] = PersonalizedEvaluator(
            hooks, ClientOrderedGrid(grid, expected_nodes=sc.num_participating), evaluator,
            data, model, torch.device("cpu"),
            cohort_size=sc.engine.cohort_size if vectorized else None)
    results = {label: personal(arrays) for label, personal in paths.items()}  # warm-up
    times: dict[str, list[float]] = {label: [] for label in paths}
    for _ in range(repeats):
        for label, personal in paths.items():
            t0 = time.perf_counter()
            personal(arrays)
            times[label].append(time.perf_counter() - t0)
    n = len(paths["cohorts"].nodes) + len(paths["cohorts"].holdout)
    print(f"{Path(scenario).name} {' '.join(overrides)}: personalized evaluation of {n} "
          f"clients (hooks {', '.join(hooks)}), {sc.engine.threads} torch thread(s), "
          f"seconds over {repeats} interleaved repeats:")
    for label, sec in times.items():
        print(f"  {label:12s} min {min(sec):6.3f}  median {sorted(sec)[len(sec) // 2]:6.3f}")
    a, b = (results[k]["personalized_accuracy"]["mean"] for k in ("cohorts", "one by one"))
    print(f"  mean personalized accuracy: cohorts {a:.4f}, one by one {b:.4f}")


def main() -> None:
    # the repo root first: this folder holds strategies.py, which would shadow the
    # ``strategies`` package that registers fedbn & co.
    here = Path(__file__).resolve().parent
    sys.path[:] = [str(ROOT)] + [q for q in sys.path if Path(q or ".").resolve() != here]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default=str(ROOT / "scenarios" / "quickstart.toml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rounds", type=int)
    p.add_argument("--step", action="store_true", help="profile one client's local steps")
    p.add_argument("--cohort", type=int, metavar="K",
                   help="time one vectorized cohort of K clients on its own")
    p.add_argument("--threads", type=int, default=1, help="torch threads for --cohort")
    p.add_argument("--fold-ab", action="store_true",
                   help="with --cohort: folded layers vs vmap's own rules, interleaved")
    p.add_argument("--memory-ab", action="store_true",
                   help="with --cohort: engine.reuse_memory's malloc settings vs glibc's own, "
                   "in fresh processes")
    p.add_argument("--evaluation", action="store_true",
                   help="time personalized evaluation: cohorts vs one client at a time")
    args = p.parse_args()
    overrides = list(args.overrides) + ([f"server.rounds={args.rounds}"] if args.rounds else [])
    if args.evaluation:
        time_evaluation(args.scenario, overrides)
    elif args.cohort:
        if args.memory_ab:
            memory_ab(sys.argv[1:])
        else:
            time_cohort(args.scenario, overrides, args.cohort, args.threads, args.fold_ab)
    elif args.step:
        profile_step(args.scenario, overrides)
    else:
        profile_run(args.scenario, overrides)


if __name__ == "__main__":
    main()
