"""On the GPU the cohort (vectorized) backend and the sequential one compute the same local
training, whole runs of the two in-process engines end at the same model, and a run on the
GPU follows the CPU's run (same batches, same noise: random draws stay on CPU generators)."""

import copy

import pytest
import torch
from cohort_setup import seeded_model  # tests/cohort_setup.py

import fedsim
from fedsim.client.train import plan_batches, train_local
from fedsim.config import ClientConfig
from fedsim.engine.vectorized import CohortMember, train_cohort
from fedsim.models import uses_batch_statistics
from fedsim.models.batched import fold_for_cohort
from fedsim.rng import torch_generator

CFG = ClientConfig(epochs=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=1e-3)
SIZES = (13, 8, 21, 3)  # a partial last batch, an exact one, several, a short one
EPS32 = torch.finfo(torch.float32).eps


def clients():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
            for n in SIZES]


def trained_state(model, x, y, cid, drop, device, dtype):
    """``train_local`` on a copy of ``model`` on ``device`` in ``dtype``; its float state in
    float64 on the CPU."""
    m = copy.deepcopy(model).to(device=device, dtype=dtype)
    train_local(m, x.to(device=device, dtype=dtype), y.to(device), CFG,
                torch_generator(0, "t", cid), drop_singleton=drop)
    return {k: v.detach().to("cpu", torch.float64) for k, v in m.state_dict().items()
            if v.is_floating_point()}


@pytest.mark.parametrize("arch,norm", [("cnn", "bn"), ("cnn", "gn"), ("mlp", "ln"),
                                       ("resnet", "bn")])
def test_both_backends_on_device_are_as_close_to_float64_as_float32_is_on_the_cpu(
        arch, norm, device):
    """Four clients, two epochs with momentum and weight decay: every parameter and running
    statistic the sequential and the cohort backend reach on the device is within a small
    multiple of float32 rounding, as measured on the CPU (float32 vs float64 run of the same
    training), of the float64 CPU result."""
    model, start, bufs = seeded_model(arch, norm)
    drop = uses_batch_statistics(norm)
    members, refs = [], []
    for cid, (x, y) in enumerate(clients()):
        plan = plan_batches(len(x), CFG, torch_generator(0, "t", cid), drop_singleton=drop)
        members.append(CohortMember(start, x.to(device), y.to(device), plan, bufs))
        refs.append({name: trained_state(model, x, y, cid, drop, dev, dtype)
                     for name, dev, dtype in (("cpu32", "cpu", torch.float32),
                                              ("cpu64", "cpu", torch.float64),
                                              ("seq", device, torch.float32))})
    cohort = fold_for_cohort(copy.deepcopy(model).to(device))
    finals, results = train_cohort(cohort, members, CFG)
    assert all(r.steps > 0 for r in results)
    for ref, final in zip(refs, finals):
        got_cohort = {k: final[k].detach().to("cpu", torch.float64) for k in ref["cpu64"]}
        for name, want in ref["cpu64"].items():
            err32 = (ref["cpu32"][name] - want).abs().max().item()
            bound = 16 * err32 + 8 * EPS32 * max(want.abs().max().item(), 1e-3)
            for backend, got in (("sequential", ref["seq"]), ("cohort", got_cohort)):
                gap = (got[name] - want).abs().max().item()
                assert gap <= bound, (backend, name, gap, err32)


TINY = ["server.rounds=2", "partition.num_clients=6", "server.clients_per_round=4",
        "partition.holdout_clients=0.0", "model.width=8", "output.eval_clients=2"]


@pytest.mark.parametrize("strategy", ["fedavg", "fedbn"])
def test_vectorized_run_matches_sequential_run_on_device(tmp_path, on_device, strategy):
    """Whole runs with BN; with FedBN every client keeps its BN layers in Context.state.
    The bound is the CPU test's (tests/engine/test_vectorized.py): ~100 SGD steps per client
    with batch statistics let summation-order differences grow to ~3e-4."""
    tiny = TINY + ["model.norm=bn", f"server.strategy={strategy}"] + on_device
    a = fedsim.run("scenarios/quickstart.toml", tiny, out=tmp_path / "seq")
    b = fedsim.run("scenarios/quickstart.toml", tiny + ["engine.vectorize=true",
                                                        "engine.cohort_size=3"],
                   out=tmp_path / "vec")
    sa = torch.load(a.path / "model.pt", weights_only=True, map_location="cpu")
    sb = torch.load(b.path / "model.pt", weights_only=True, map_location="cpu")
    assert set(sa) == set(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-3, atol=1e-3)
    assert a.summary["timing"]["client_updates"] == b.summary["timing"]["client_updates"] == 8


SHORT = ["server.rounds=2", "partition.num_clients=6", "server.clients_per_round=3",
         "partition.holdout_clients=0.0", "model.width=8", "client.epochs=1", "model.norm=ln"]


@pytest.mark.parametrize("extra", [[], ["client.dp.noise_multiplier=1.0",
                                        "client.dp.max_grad_norm=1.0"]],
                         ids=["sgd", "dpsgd"])
def test_a_seed_gives_the_same_run_on_the_device_as_on_the_cpu(tmp_path, on_device, extra):
    """Batches (and DP-SGD's Poisson sampling and noise) are drawn from CPU generators, so a
    short run on the device follows the CPU run to float rounding (~1e-6 after ~10 steps).
    Other batches or other noise would move parameters by ~1e-2 (lr 0.05 per step; DP-SGD's
    noise std lr·σ·C/batch ≈ 3e-3 per step), far above the 1e-4 bound."""
    args = SHORT + extra
    cpu = fedsim.run("scenarios/quickstart.toml", args + ["engine.device=cpu"],
                     out=tmp_path / "cpu")
    dev = fedsim.run("scenarios/quickstart.toml", args + on_device, out=tmp_path / "dev")
    sc = torch.load(cpu.path / "model.pt", weights_only=True, map_location="cpu")
    sd = torch.load(dev.path / "model.pt", weights_only=True, map_location="cpu")
    for k in sc:
        torch.testing.assert_close(sd[k], sc[k], rtol=1e-4, atol=1e-4)
    assert cpu.summary["timing"]["client_updates"] == dev.summary["timing"]["client_updates"]
