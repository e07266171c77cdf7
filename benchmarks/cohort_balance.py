"""How much the equal-work cohort split (fedsim.engine.cohort_plan) evens out a scenario's
rounds: the heavier cohort's local steps, summed over the rounds, with the messages split in
client order versus balanced.

    python benchmarks/cohort_balance.py                         # quickstart, 2 cohorts
    python benchmarks/cohort_balance.py --scenario scenarios/label_skew.toml --cohorts 4

A count, not a timing: local steps = epochs × ⌈training samples / batch size⌉ per client,
for the clients the engines sample in each round (the same seeded draw as the bare loop in
engine_throughput.py). Dataset-backed scenarios only (client sizes are a lookup there).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.append(str(Path(__file__).resolve().parents[1]))

from fedsim.config import load_scenario  # noqa: E402
from fedsim.data.federated import build_federated_data  # noqa: E402
from fedsim.engine.cohort_plan import balanced_cohorts  # noqa: E402
from fedsim.engine.ray_cohorts import cohort_sizes  # noqa: E402
from fedsim.rng import derive_seed  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="scenarios/quickstart.toml")
    p.add_argument("--cohorts", type=int, default=2, help="cohorts per round (actors)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    sc = load_scenario(args.scenario, args.overrides)
    data = build_federated_data(sc)
    ids = list(data.participating)
    k = sc.server.clients_per_round
    sizes = cohort_sizes(k, args.cohorts, max(1, math.ceil(k / args.cohorts)))
    in_order = balanced = 0
    for rnd in range(1, sc.server.rounds + 1):
        random.seed(derive_seed(sc.seed, "sample-train", rnd))
        chosen = sorted(random.sample(ids, k))
        steps = [sc.client.epochs * math.ceil(data.client_size(c) / sc.client.batch_size)
                 for c in chosen]
        start, loads = 0, []
        for n in sizes:
            loads.append(sum(steps[start : start + n]))
            start += n
        in_order += max(loads)
        balanced += max(sum(steps[i] for i in g) for g in balanced_cohorts(steps, sizes))
    print(f"{args.scenario}: {sc.server.rounds} rounds, cohorts of {sizes}; heavier cohort's "
          f"local steps summed: in client order {in_order}, balanced {balanced} "
          f"({balanced / in_order - 1:+.1%})")


if __name__ == "__main__":
    main()
