"""The population as a rule: holdout ids, participating clients by position, the keyed
permutation, and the dataset-backed partitions' unchanged (original) holdout rule."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fedsim
from fedsim.config import DataConfig, PartitionConfig, Scenario, ServerConfig
from fedsim.data import build_federated_data
from fedsim.data.federated import _build
from fedsim.data.population import (
    HOLDOUT_RULES,
    Complement,
    KeyedPermutation,
    SortedIds,
    make_population,
)
from fedsim.rng import numpy_rng

ROOT = Path(__file__).resolve().parents[2]
SYNTH = DataConfig(name="synthetic", samples_per_client=12, test_samples=20)


def _scenario(seed=0, data=None, **partition) -> Scenario:
    return Scenario(seed=seed, data=data or DataConfig(), partition=PartitionConfig(**partition),
                    server=ServerConfig(clients_per_round=1))


def _fresh(scenario: Scenario):
    """Bypass the per-process cache, as a new process would."""
    return _build.__wrapped__(scenario.seed, scenario.data, scenario.partition)


def _old_rule(seed: int, n: int, h: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """fedsim's holdout rule before issue 20, verbatim: (holdout, participating) tuples."""
    chosen = numpy_rng(seed, "holdout").permutation(n)
    holdout = tuple(sorted(int(c) for c in chosen[:h]))
    held = set(holdout)
    return holdout, tuple(c for c in range(n) if c not in held)


# --------------------------------------------------------------------- keyed permutation

@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 64, 65, 1000, 4097])
def test_keyed_permutation_is_a_bijection_with_its_inverse(n):
    pi = KeyedPermutation(7, n)
    image = pi(np.arange(n))
    assert sorted(image.tolist()) == list(range(n))
    assert pi.inverse(image).tolist() == list(range(n))


def test_keyed_permutation_depends_on_the_seed_and_refuses_outside_values():
    a, b = KeyedPermutation(0, 1000)(np.arange(1000)), KeyedPermutation(1, 1000)(np.arange(1000))
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="error: permutation inputs must lie in 0..999"):
        KeyedPermutation(0, 1000)(np.array([1000]))


# --------------------------------------------------------------------- population

@pytest.mark.parametrize("rule", sorted(HOLDOUT_RULES))
@pytest.mark.parametrize(("n", "h"), [(1, 0), (10, 3), (20, 5), (7, 6), (1000, 100), (997, 0)])
def test_population_positions_and_membership_match_a_brute_force_list(rule, n, h):
    pop = make_population(rule, 3, n, h)
    hold, part = list(pop.holdout), list(pop.participating)
    assert len(hold) == len(pop.holdout) == h and len(part) == len(pop.participating) == n - h
    assert hold == sorted(hold) and part == sorted(part)
    assert sorted(hold + part) == list(range(n))
    assert all(type(c) is int for c in hold + part)
    assert [pop.participating[i] for i in range(len(part))] == part
    assert all(pop.participating.index(c) == i for i, c in enumerate(part))
    assert [c for c in range(n) if pop.is_holdout(c)] == hold
    assert [c for c in range(-2, n + 2) if c in pop.participating] == part
    assert np.asarray(pop.participating).tolist() == part
    assert np.asarray(pop.holdout).tolist() == hold
    assert pop.participating[-1] == part[-1] and pop.participating[1:4] == part[1:4]
    assert pop.participating == tuple(part) and pop.holdout == tuple(hold)


def test_keyed_rule_holds_out_the_clients_the_permutation_ranks_first():
    """``cid`` is held out exactly when ``pi(cid) < H``: a function of (seed, cid) alone."""
    n, h = 5000, 123
    pop = make_population("keyed", 11, n, h)
    ranks = KeyedPermutation(11, n)(np.arange(n))
    assert np.flatnonzero(ranks < h).tolist() == list(pop.holdout)


def test_population_at_ten_million_clients_holds_only_its_holdout_ids():
    pop = make_population("keyed", 0, 10_000_000, 100_000)
    assert pop.holdout.ids.nbytes == 800_000 and pop.participating._gaps.nbytes == 800_000
    i = 5_000_000
    cid = pop.participating[i]
    below = int(np.searchsorted(pop.holdout.ids, cid))  # holdout ids below cid
    assert cid == i + below and not pop.is_holdout(cid)
    assert pop.participating.index(cid) == i


def test_sequences_refuse_bad_input():
    with pytest.raises(ValueError, match="error: SortedIds needs a 1-d array of increasing"):
        SortedIds(np.array([3, 1]))
    with pytest.raises(ValueError, match="error: excluded client ids must lie in 0..4"):
        Complement(5, SortedIds(np.array([5])))
    with pytest.raises(ValueError, match="error: unknown holdout rule 'x'; use one of"):
        make_population("x", 0, 10, 1)
    with pytest.raises(ValueError, match="error: 11 holdout clients of 10"):
        make_population("keyed", 0, 10, 11)
    with pytest.raises(IndexError, match="position 9 is outside 0..8"):
        make_population("keyed", 0, 10, 1).participating[9]
    with pytest.raises(ValueError, match="client 4 is not in this sequence"):
        SortedIds(np.array([1, 2])).index(4)


# ------------------------------------------------------- FederatedData's two rules

@pytest.mark.parametrize(("n", "frac"), [(20, 0.25), (50, 0.1), (7, 0.0)])
def test_dataset_backed_holdout_is_the_original_permutation_rule(n, frac):
    """Digits (and every loaded dataset) keep the exact pre-issue-20 holdout and node order,
    so their runs (sampled clients per round, final model) are unchanged."""
    fd = build_federated_data(_scenario(num_clients=n, holdout_clients=frac))
    holdout, participating = _old_rule(0, n, fd.partition.num_holdout)
    assert tuple(fd.holdout) == holdout and tuple(fd.participating) == participating


def test_shipped_dataset_scenario_keeps_its_holdout():
    scenario = fedsim.load_scenario(ROOT / "scenarios" / "quickstart.toml")
    fd = build_federated_data(scenario)
    holdout, participating = _old_rule(scenario.seed, scenario.partition.num_clients,
                                       scenario.partition.num_holdout)
    assert len(holdout) > 0
    assert tuple(fd.holdout) == holdout and tuple(fd.participating) == participating


def test_synthetic_holdout_is_keyed_per_client():
    s = _scenario(data=SYNTH, num_clients=3000, holdout_clients=0.1, kind="dirichlet")
    fd = _fresh(s)
    ranks = KeyedPermutation(0, 3000)(np.arange(3000))
    assert list(fd.holdout) == np.flatnonzero(ranks < 300).tolist()
    assert len(fd.participating) == 2700


def test_synthetic_client_is_the_same_drawn_first_or_last():
    s = _scenario(data=SYNTH, num_clients=100_000, holdout_clients=0.01, kind="dirichlet",
                  alpha=0.3)
    first = _fresh(s)
    cid = first.participating[-1]
    want_train, want_test = first.client_train(cid), first.client_test(cid)
    last = _fresh(s)
    for other in (0, 1, 50_000, *last.holdout[:3]):  # other clients first, holdout too
        last.client_train(other)
    torch.testing.assert_close(last.client_train(cid), want_train, rtol=0, atol=0)
    torch.testing.assert_close(last.client_test(cid), want_test, rtol=0, atol=0)


PROBE = """
import hashlib, json, sys
from fedsim.config import DataConfig, PartitionConfig, Scenario, ServerConfig
from fedsim.data import build_federated_data
s = Scenario(seed=0, data=DataConfig(name="synthetic", samples_per_client=12, test_samples=20),
             partition=PartitionConfig(num_clients=100_000, holdout_clients=0.01,
                                       kind="dirichlet", alpha=0.3),
             server=ServerConfig(clients_per_round=1))
fd = build_federated_data(s)
cid = int(sys.argv[1])
x, y = fd.client_train(cid)
print(json.dumps({"holdout": hashlib.sha256(bytes(memoryview(fd.holdout.ids))).hexdigest(),
                  "participant": fd.participating[int(sys.argv[2])],
                  "x": hashlib.sha256(x.numpy().tobytes()).hexdigest(), "y": y.tolist()}))
"""


def test_synthetic_population_is_the_same_in_a_fresh_process():
    s = _scenario(data=SYNTH, num_clients=100_000, holdout_clients=0.01, kind="dirichlet",
                  alpha=0.3)
    fd = _fresh(s)
    cid, pos = 99_998, 54_321
    x, y = fd.client_train(cid)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(cid), str(pos)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"holdout": hashlib.sha256(bytes(memoryview(fd.holdout.ids))).hexdigest(),
                   "participant": fd.participating[pos],
                   "x": hashlib.sha256(x.numpy().tobytes()).hexdigest(), "y": y.tolist()}
