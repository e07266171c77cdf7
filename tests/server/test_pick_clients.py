"""``pick_clients``: the evaluated clients, fixed by the seed, at O(sample) cost."""

import numpy as np
import pytest

from fedsim.rng import numpy_rng
from fedsim.server.evaluate import pick_clients


def _by_ids(ids, limit, seed, purpose):
    """The draw as it was made before issue 20: over an array of every id."""
    rng = numpy_rng(seed, "eval-clients", purpose)
    return sorted(int(i) for i in rng.choice(np.asarray(ids), size=limit, replace=False))


@pytest.mark.parametrize("n", [201, 5_000, 300_000])
@pytest.mark.parametrize("limit", [1, 200])
def test_drawing_positions_picks_what_drawing_ids_picked(n, limit):
    ids = tuple(range(3, 3 * n + 3, 3))
    assert pick_clients(ids, limit, 7, "holdout") == _by_ids(ids, limit, 7, "holdout")


def test_small_populations_are_evaluated_whole_and_large_ones_lazily():
    assert pick_clients((4, 9), 200, 0, "participating") == [4, 9]

    class Population:  # a million ids nobody may list: only len and indexing
        def __len__(self):
            return 1_000_000

        def __getitem__(self, i):
            return 2 * int(i)

        def __iter__(self):
            raise AssertionError("pick_clients walked the whole population")

    picked = pick_clients(Population(), 200, 0, "participating")
    assert len(set(picked)) == 200 and picked == sorted(picked)
    assert picked == [2 * i for i in pick_clients(range(1_000_000), 200, 0, "participating")]
