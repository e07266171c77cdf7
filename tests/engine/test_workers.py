"""Concurrent in-process workers: the same global model, bit for bit, as one worker."""

import torch

import fedsim
from fedsim.sinks.progress import round_stats

TINY = ["server.rounds=2", "partition.num_clients=8", "server.clients_per_round=5",
        "partition.holdout_clients=0.0", "model.width=8", "output.eval_clients=2",
        "engine.threads=1"]


def one_and_two_workers(tmp_path, overrides):
    """The same run on one worker and on two: (one, two), after checking that their global
    models are equal bit for bit and their final metrics equal."""
    one = fedsim.run("scenarios/quickstart.toml", overrides, out=tmp_path / "w1")
    two = fedsim.run("scenarios/quickstart.toml", overrides + ["engine.workers=2"],
                     out=tmp_path / "w2")
    a = torch.load(one.path / "model.pt", weights_only=True)
    b = torch.load(two.path / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert one.summary["final"] == two.summary["final"]
    return one, two


def test_two_workers_give_the_same_model_as_one(tmp_path):
    one_and_two_workers(tmp_path, TINY)


def test_progress_line_does_not_grow_with_the_federation():
    rec = {"round": 3, "updates": 100, "clients": list(range(100)), "train_loss": 1.23456,
           "failures": [{"node": 1, "reason": "x"}]}
    small = round_stats(rec, 300, 10.0, 290, [0.5])
    large = round_stats(rec, 30_000, 10.0, 9_990, [0.5])
    assert "100 clients (1 failed)" in small and "3000.0 clients/s" in large
    assert "30,000 updates by 9,990 clients" in large and "acc 0.500" in large
    assert len(large) - len(small) <= 8  # digits and separators, nothing per client


def test_vectorized_cohorts_on_two_workers_equal_one(tmp_path):
    """Train and evaluate cohorts (FedBN: personalized evaluation with cold starts and
    saved layers) split over two worker threads, each with its own model copy."""
    tiny = TINY + ["model.norm=bn", "server.strategy=fedbn", "engine.vectorize=true",
                   "engine.cohort_size=2", "output.eval_clients=6", "output.eval_every=1"]
    one, _ = one_and_two_workers(tmp_path, tiny)
    assert one.summary["final"]["personalized_accuracy"]["n"] == 6


def test_worker_models_are_copied_before_any_worker_runs():
    """Worker 1 asks for its model while worker 0's cohort is inside ``functional_call``
    (batched tensors swapped into the shared base model): it must get a clean copy made
    when the runtime was built, not a deep copy of the model in that state."""
    from torch.func import functional_call, vmap

    from fedsim.client.runtime import WORKER_SLOT, shared_runtime
    from fedsim.config import load_scenario

    # (a seed no other test uses: a runtime of its own, not one that earlier runs trained)
    scenario = load_scenario("scenarios/quickstart.toml", TINY + ["engine.workers=2",
                                                                 "seed=8061"])
    rt = shared_runtime(scenario)
    seen = []

    def ask_as_worker_1(module, inputs):
        token = WORKER_SLOT.set(1)
        try:
            seen.append(rt.model)
        finally:
            WORKER_SLOT.reset(token)

    handle = rt.base_model.register_forward_pre_hook(ask_as_worker_1)
    try:
        params = {n: torch.stack([p.detach()] * 2) for n, p in rt.base_model.named_parameters()}
        x = torch.zeros(2, 3, 1, 8, 8)
        vmap(lambda p, xb: functional_call(rt.base_model, p, (xb,)))(params, x)
    finally:
        handle.remove()
    copy_1 = seen[0]
    assert copy_1 is not rt.base_model
    for (name, a), b in zip(copy_1.named_parameters(), rt.base_model.parameters()):
        assert a.detach().numpy().shape == tuple(b.shape), name  # real storage, not batched
        assert torch.equal(a, b), name
