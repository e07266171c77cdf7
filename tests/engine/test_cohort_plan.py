"""Cohorts of equal work: the split of a kind's messages into cohorts that run side by side
(engine.workers threads, Ray cohort actors) evens out the clients' local work."""

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedsim.config import load_scenario
from fedsim.data.federated import build_federated_data
from fedsim.engine.cohort_plan import balanced_cohorts
from fedsim.engine.inprocess import InProcessGrid
from fedsim.engine.ray_cohorts import cohort_sizes


def loads(work, plan):
    return [sum(work[i] for i in cohort) for cohort in plan]


def test_every_message_lands_in_exactly_one_cohort_of_the_asked_size_in_order():
    rng = random.Random(0)
    for n, workers, cap in ((10, 2, 128), (37, 3, 5), (8, 2, 2), (5, 4, 128)):
        work = [rng.randint(1, 200) for _ in range(n)]
        sizes = cohort_sizes(n, workers, cap)
        plan = balanced_cohorts(work, sizes)
        assert [len(c) for c in plan] == sizes
        assert sorted(i for c in plan for i in c) == list(range(n))
        assert all(c == sorted(c) for c in plan)  # message order within a cohort
        assert balanced_cohorts(work, sizes) == plan  # depends on work and sizes alone


def test_skewed_work_is_evened_out_where_message_order_is_not():
    work = [9, 9, 9, 1, 1, 1]  # three big clients first, as a message order may have them
    plan = balanced_cohorts(work, [3, 3])
    assert plan == [[0, 2, 5], [1, 3, 4]]
    assert loads(work, plan) == [19, 11]  # the optimum: two of the three 9s share a cohort
    assert loads(work, [[0, 1, 2], [3, 4, 5]]) == [27, 3]  # the split in message order


def test_the_slowest_cohort_is_never_far_from_the_best_split():
    """Against every split of small cases (brute force): the heaviest cohort of the greedy
    split exceeds the best possible one by less than the largest client's work, on 60
    seeded random cases."""
    from itertools import combinations

    rng = random.Random(1)
    for _ in range(60):
        n = rng.randint(2, 9)
        work = [rng.choice([1, 2, 3, 5, 8, 13, 40]) for _ in range(n)]
        sizes = [n - n // 2, n // 2] if n > 1 else [1]
        best = min(max(sum(work[i] for i in a), sum(work) - sum(work[i] for i in a))
                   for a in combinations(range(n), sizes[0]))
        got = max(loads(work, balanced_cohorts(work, sizes)))
        assert best <= got < best + max(work)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="add up to 3 items"):
        balanced_cohorts([1, 2, 3], [2, 2])
    with pytest.raises(ValueError, match="must be positive"):
        balanced_cohorts([1, 2], [2, 0])


def test_work_estimate_is_a_lookup_for_datasets_and_none_for_generated_clients():
    digits = build_federated_data(load_scenario("scenarios/quickstart.toml"))
    estimate = digits.work_estimate()
    assert estimate is not None
    assert [estimate(c) for c in range(4)] == [digits.client_size(c) for c in range(4)]
    synthetic = build_federated_data(load_scenario("scenarios/thousand_clients.toml"))
    assert synthetic.work_estimate() is None  # drawing labels per sampled client costs


def test_grid_runs_cohorts_of_equal_work_when_the_work_is_known():
    """Six clients, cohorts of three: the grid hands the cohort trainer the balanced split
    (client work 9, 9, 9, 1, 1, 1), and message order without a work estimate."""
    def run(client_work):
        seen = []

        def trainer(msgs, contexts):
            seen.append(sorted(c.node_config["partition-id"] for c in contexts))
            return [Message(RecordDict({"arrays": m.content.array_records["arrays"],
                                        "metrics": MetricRecord({"num-examples": 1})}),
                            reply_to=m) for m in msgs]

        ids = [10, 11, 12, 13, 14, 15]  # node i + 1 is client ids[i]
        grid = InProcessGrid(None, 6, cohort_trainer=trainer, cohort_size=3, client_ids=ids,
                             client_work=client_work)
        strategy = FedAvg(fraction_train=1.0, min_train_nodes=6, min_available_nodes=6)
        arrays = ArrayRecord({"w": Array(np.zeros(1, dtype=np.float32))})
        msgs = sorted(strategy.configure_train(1, arrays, ConfigRecord(), grid),
                      key=lambda m: m.metadata.dst_node_id)
        replies = list(grid.send_and_receive(msgs))
        assert len(replies) == 6 and not any(r.has_error() for r in replies)
        return seen

    work = {10: 9, 11: 9, 12: 9, 13: 1, 14: 1, 15: 1}
    assert run(work.__getitem__) == [[0, 2, 5], [1, 3, 4]]
    assert run(None) == [[0, 1, 2], [3, 4, 5]]
