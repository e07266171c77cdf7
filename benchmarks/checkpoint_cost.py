"""How long a checkpoint takes and how big it is (benchmarks/RESULTS.md, "Checkpoints").

    python benchmarks/checkpoint_cost.py            # all three measurements
    python benchmarks/checkpoint_cost.py --quick    # fewer rounds / clients, for a smoke test

1. ``scenarios/quickstart.toml`` as shipped (20 clients, 10 rounds, a checkpoint per round):
   the mean checkpoint time and size, from the run's own ``summary.json``.
2. A 10,000-client synthetic run (100 clients per round, BatchNorm CNN). With
   ``strategy = "fedavg"`` clients keep no state, so its checkpoint is the global model and
   the strategy only; it measures the end-to-end cost inside a real run.
3. The same federation with FedBN-like client state: every one of the 10,000 clients holds
   its own BatchNorm layers (weights, biases, running statistics, as an ArrayRecord in its
   Flower ``Context.state``) — the worst case of a FedBN run that has seen every client. The
   state is built directly and put through the client-state journal: a full generation,
   one round's incremental checkpoint (100 changed clients) and the read-back of a resume.
4. ``scenarios/thousand_clients.toml`` as shipped (FedBN, 10,000 clients, 20 rounds): the
   mean checkpoint time and size inside the real run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fedsim  # noqa: E402
from fedsim.arrays import model_to_record  # noqa: E402
from fedsim.checkpoint import encode_checkpoint, read_checkpoint, write_checkpoint  # noqa: E402
from fedsim.context import build_global_model  # noqa: E402
from fedsim.data.federated import build_federated_data  # noqa: E402
from fedsim.engine.store import encode_state  # noqa: E402
from fedsim.models.norm import norm_keys  # noqa: E402
from fedsim.state_journal import StateJournal  # noqa: E402

THOUSANDS = ["name=ten_thousand_clients", "data.name=synthetic", "partition.kind=dirichlet",
             "partition.num_clients=10000", "partition.holdout_clients=0.0",
             "server.clients_per_round=100", "model.norm=bn", "server.strategy=fedavg",
             "output.eval_clients=200", "engine.kind=inprocess"]


def from_run(scenario: str, overrides: list[str], out: Path) -> dict:
    t0 = time.perf_counter()
    result = fedsim.run(scenario, overrides, out=out, overwrite=True)
    ck = result.summary["timing"]["checkpoints"]
    return {"run_seconds": time.perf_counter() - t0, "checkpoints": ck["count"],
            "mean_checkpoint_seconds": ck["seconds"] / max(ck["count"], 1),
            "checkpoint_bytes": ck["last_bytes"]}


def fedbn_state(num_clients: int, per_round: int, out: Path) -> dict:
    """Checkpoint costs with every one of ``num_clients`` clients holding FedBN-like state,
    through the client-state journal: a full generation (the first checkpoint, or a
    compaction), one round's incremental append (``per_round`` changed clients), and the
    read-back a ``--resume`` does."""
    scn = fedsim.load_scenario("scenarios/quickstart.toml", THOUSANDS)
    model = build_global_model(scn, build_federated_data(scn))
    local = norm_keys(model)  # model.norm=bn: the BN layers' parameters and buffers
    per_client = model_to_record(model, local)
    raw = {nid: encode_state(RecordDict({"fedbn": ArrayRecord(dict(per_client.items()))}))
           for nid in range(1, num_clients + 1)}
    arrays = model_to_record(model)
    t0 = time.perf_counter()
    journal = StateJournal(out, 0)
    full_bytes = journal.append(sorted(raw.items()))
    t1 = time.perf_counter()
    journal.append([(nid, raw[nid]) for nid in range(1, per_round + 1)])
    meta = {"rounds_lines": 0, "client_journal": {"file": journal.name, "bytes": journal.size,
                                                  "clients": num_clients}}
    path = write_checkpoint(out, encode_checkpoint(1, arrays, FedAvg(), None, meta))
    t2 = time.perf_counter()
    back = read_checkpoint(path)
    t3 = time.perf_counter()
    journal.close()
    assert len(back.clients) == num_clients
    return {"clients_with_state": num_clients, "local_arrays_per_client": len(local),
            "full_generation_seconds": t1 - t0, "full_generation_bytes": full_bytes,
            "incremental_checkpoint_seconds": t2 - t1, "changed_clients": per_round,
            "checkpoint_file_bytes": path.stat().st_size, "resume_read_seconds": t3 - t2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"torch_threads": 1}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        quick = ["server.rounds=2"] if args.quick else []
        results["quickstart"] = from_run("scenarios/quickstart.toml", quick, tmp / "qs")
        rounds = ["server.rounds=2"]
        big = THOUSANDS + (["partition.num_clients=1000"] if args.quick else [])
        results["10k_fedavg"] = from_run("scenarios/quickstart.toml", big + rounds, tmp / "10k")
        (tmp / "fedbn").mkdir()
        results["10k_fedbn_state"] = fedbn_state(1000 if args.quick else 10000, 100,
                                                 tmp / "fedbn")
        results["thousand_clients_fedbn"] = from_run(
            "scenarios/thousand_clients.toml",
            ["server.rounds=5"] if args.quick else [], tmp / "tc")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
