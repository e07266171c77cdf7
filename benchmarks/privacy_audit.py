"""One-run privacy audits against their targets: without DP the audit's ε is large (> 5); at
accountant ε = 8 it is positive and at most 8; at ε = 1 it is at most 1.

Two audits, each in three runs (no DP, ε = 8, ε = 1), every run on ``scenarios/quickstart.toml``
(digits, CNN + GroupNorm) with the same seed:

- **client level** (``[server.dp]``, Poisson sampling so the accountant's mechanism is the
  canaries' own): ``privacy.canary_clients.count`` canary clients; the report gives Andrew et al.'s
  estimate (all iterates and final model) and Steinke et al.'s one-run lower bound (95%);
- **sample level** (``[client.dp]``, DP-SGD): ``privacy.canary_samples.count`` gradient canaries,
  Steinke et al.'s lower bound from the clients' uploads. "No DP" is DP-SGD with a noise
  multiplier of 0.3 (its accountant says ε in the hundreds; smaller σ makes dp-accounting's
  PLD accountant, which every client runs after each round, very slow: 24 s a call at 0.05).

From the repository root::

    python benchmarks/privacy_audit.py                  # both audits (minutes on 2 cores)
    python benchmarks/privacy_audit.py --only client --canaries 500 --rounds 10 --width 8  # quick
    python benchmarks/privacy_audit.py --out results/privacy_audit.json

It prints one markdown table and, with ``--out``, writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fedsim  # noqa: E402
from fedsim.files import write_json  # noqa: E402

SCENARIO = "scenarios/quickstart.toml"
#: the federation both audits run on: 100 clients, 10 a round (q = 0.1)
CLIENT_LEVEL = ["partition.kind=iid", "partition.num_clients=100", "partition.holdout_clients=0",
                "server.clients_per_round=10", "client.epochs=1", "output.eval_every=1000"]
#: DP-SGD is slow on a CPU: 10 clients, all of them every round
SAMPLE_LEVEL = ["partition.kind=iid", "partition.num_clients=10", "partition.holdout_clients=0",
                "server.clients_per_round=10", "model.width=8", "client.epochs=1",
                "output.eval_every=1000"]
SETTINGS = {"no DP": None, "ε = 8": 8.0, "ε = 1": 1.0}


def client_level(target: float | None, canaries: int, rounds: int, width: int) -> list[str]:
    """A wider model separates canaries better: a direction independent of the model has
    cosine ≈ N(0, 1/d) with it (d = 6,186 parameters at width 16, 1,946 at width 8)."""
    sets = [*CLIENT_LEVEL, f"server.rounds={rounds}", 'privacy.audits=["canary_clients"]',
            f"privacy.canary_clients.count={canaries}", f"model.width={width}"]
    if target is not None:
        sets += ["server.dp.kind=fixed", "server.dp.sampling=poisson",
                 f"server.dp.target_epsilon={target}"]
    return sets


def sample_level(target: float | None, canaries: int, rounds: int, width: int = 8
                 ) -> list[str]:
    sets = [*SAMPLE_LEVEL, f"server.rounds={rounds}", 'privacy.audits=["canary_samples"]',
            f"privacy.canary_samples.count={canaries}"]
    return sets + ([f"client.dp.target_epsilon={target}"] if target is not None
                   else ["client.dp.noise_multiplier=0.3"])


def _num(x) -> str:
    return "–" if x is None else f"{x:.3g}"


def run_cell(audit: str, name: str, target: float | None, canaries: int, rounds: int,
             width: int, out: Path) -> dict:
    sets = (client_level if audit == "client" else sample_level)(target, canaries, rounds,
                                                                  width)
    t0 = time.perf_counter()
    result = fedsim.run(SCENARIO, sets, out=out, overwrite=True)
    seconds = time.perf_counter() - t0
    privacy = result.summary["privacy"]
    row = {"audit": audit, "setting": name, "target_epsilon": target, "seconds": seconds,
           "canaries": canaries, "rounds": rounds, "overrides": sets,
           "accuracy": result.summary["final"]["global_test_accuracy"]}
    if audit == "client":
        a = privacy["canary_audit"]
        row.update(accountant=(a["accountant"] or {}).get("epsilon"),
                   canary_epsilon=a["canary_epsilon"],
                   lower_bound=a["all_iterates"]["lower_bound"]["epsilon_lower_bound"],
                   lower_bound_final=a["final_model"]["lower_bound"]["epsilon_lower_bound"],
                   estimate=a["all_iterates"]["estimate"]["epsilon_estimate"],
                   estimate_final=a["final_model"]["estimate"]["epsilon_estimate"])
    else:
        a = privacy["sample_canary_audit"]
        row.update(accountant=(a["accountant"] or {}).get("epsilon"),
                   lower_bound=a["lower_bound"]["epsilon_lower_bound"])
    return row


def table(rows: list[dict]) -> str:
    lines = ["| audit | setting | accountant ε | lower bound (95%; client level: all iterates, "
             "sample level: uploads) | lower bound (final model) | estimate (all iterates) | "
             "estimate (final model) | accuracy | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['audit']} | {r['setting']} | {_num(r['accountant'])} | "
                     f"{_num(r['lower_bound'])} | {_num(r.get('lower_bound_final'))} | "
                     f"{_num(r.get('estimate'))} | {_num(r.get('estimate_final'))} | "
                     f"{_num(r['accuracy'])} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["client", "sample"], default=None)
    parser.add_argument("--canaries", type=int, default=2000, help="client-level canaries")
    parser.add_argument("--rounds", type=int, default=40, help="client-level rounds")
    parser.add_argument("--width", type=int, default=16, help="client-level model width")
    parser.add_argument("--sample-canaries", type=int, default=1000)
    parser.add_argument("--sample-rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for audit in ("client", "sample"):
            if args.only not in (None, audit):
                continue
            count = args.canaries if audit == "client" else args.sample_canaries
            rounds = args.rounds if audit == "client" else args.sample_rounds
            for name, target in SETTINGS.items():
                rows.append(run_cell(audit, name, target, count, rounds, args.width,
                                     Path(tmp) / f"{audit}-{target}"))
                print(f"{audit} {name}: done in {rows[-1]['seconds']:.0f} s", file=sys.stderr)
    print(table(rows))
    if args.out is not None:
        write_json(args.out, rows, indent=1)


if __name__ == "__main__":
    main()
