"""Strategies side by side: accuracy (global and personalized) and seconds, two kinds of skew.

Runs every built-in strategy (and FedAvg under central DP) on ``scenarios/feature_skew.toml``
and ``scenarios/label_skew.toml`` (digits, 20 clients, BatchNorm CNN) with the same seed and
prints a markdown table; ``--out FILE`` also writes it. From the repository root::

    python benchmarks/strategies.py                        # full table (about 15 min on 2 cores)
    python benchmarks/strategies.py --rounds 3 --only fedavg,fedbn   # a quick look

"Personalized" is each client's own model on its local test split: the global model plus
the client's local layers for FedBN / SiloBN (``final.personalized_accuracy``), the global
model itself for strategies without local state (``final.client_accuracy``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fedsim  # noqa: E402

SCENARIOS = {
    "feature skew": "scenarios/feature_skew.toml",
    "label skew": "scenarios/label_skew.toml",
}

# name shown → overrides on top of the scenario
STRATEGIES = {
    "fedavg": ["server.strategy=fedavg"],
    "fedprox": ["server.strategy=fedprox", "server.params.proximal_mu=0.1"],
    "fedprox-mu1": ["server.strategy=fedprox", "server.params.proximal_mu=1.0"],
    "fedbn": ["server.strategy=fedbn"],
    "silobn": ["server.strategy=silobn"],
    "scaffold": ["server.strategy=scaffold"],
    "fixbn": ["server.strategy=fixbn", "server.params.warmup=5"],
    "fedavg+dp": ["server.strategy=fedavg", "server.dp.kind=fixed",
                  "server.dp.noise_multiplier=0.1", "server.dp.clipping_norm=2.0"],
}


def run_one(path: str, overrides: list[str], out: Path) -> dict:
    t0 = time.perf_counter()
    result = fedsim.run(path, overrides, out=out, overwrite=True)
    seconds = time.perf_counter() - t0
    final = result.summary["final"]
    personal = final.get("personalized_accuracy") or final["client_accuracy"]
    return {
        "global": final["global_test_accuracy"],
        "personalized": personal["mean"],
        "personalized_p10": personal["p10"],
        "own_model": "personalized_accuracy" in final,
        "seconds": seconds,
        "train_seconds": result.summary["timing"]["train_seconds"],
        "dp": result.summary.get("dp"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="override server.rounds")
    parser.add_argument("--only", default="", help="comma-separated strategy names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="also write the markdown table here")
    parser.add_argument("--json", default="", help="also write raw results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = [n for n in args.only.split(",") if n] or list(STRATEGIES)
    base = [f"seed={args.seed}"] + ([f"server.rounds={args.rounds}"] if args.rounds else [])
    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in SCENARIOS.items():
            for name in names:
                res = run_one(path, base + STRATEGIES[name], Path(tmp) / f"{label}-{name}")
                raw[f"{label}/{name}"] = res
                star = "" if res["own_model"] else "†"
                rows.append(f"| {label} | {name} | {res['global']:.3f} | "
                            f"{res['personalized']:.3f}{star} | {res['personalized_p10']:.3f} | "
                            f"{res['seconds']:.1f} | {res['train_seconds']:.1f} |")
                print(rows[-1], flush=True)
    header = ("| scenario | strategy | global test acc | personalized acc (mean) | "
              "personalized p10 | seconds (total) | seconds (training) |\n"
              "|---|---|---|---|---|---|---|")
    table = "\n".join([header, *rows])
    note = ("† no local state: the global model on each client's local test split "
            "(`final.client_accuracy`). Seconds (total): the whole `fedsim.run`, evaluation "
            "included (personalized strategies also evaluate every client each round); seconds "
            "(training): `timing.train_seconds` (sampling, client updates, aggregation).")
    print("\n" + table + "\n\n" + note)
    if args.out:
        Path(args.out).write_text(table + "\n\n" + note + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2) + "\n")


if __name__ == "__main__":
    main()
