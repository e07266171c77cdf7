"""How a kind's messages are split into cohorts of equal work.

Cohorts run side by side (on ``engine.workers`` threads, on Ray cohort actors), so a round
lasts as long as its slowest cohort; with clients of very different sizes (a Dirichlet or
quantity partition) a split in message order can leave one lane with most of the local
steps. :func:`balanced_cohorts` evens the work out, deterministically.
"""

from __future__ import annotations

from collections.abc import Sequence


def balanced_cohorts(work: Sequence[float], sizes: Sequence[int]) -> list[list[int]]:
    """Indices ``0..len(work)-1`` split into ``len(sizes)`` cohorts of exactly ``sizes``
    members, the cohorts' total ``work`` as equal as the greedy rule makes it.

    Largest work first, each item to the cohort with the least work so far that still has
    room (ties: the lower index, for items and cohorts alike), so the split depends only on
    ``work`` and ``sizes``; each cohort lists its items in ascending order.
    """
    if sum(sizes) != len(work) or min(sizes, default=1) < 1:
        raise ValueError(f"cohort sizes {list(sizes)} must be positive and add up to "
                         f"{len(work)} items")
    load = [0.0] * len(sizes)
    members: list[list[int]] = [[] for _ in sizes]
    for i in sorted(range(len(work)), key=lambda i: (-work[i], i)):
        k = min((k for k in range(len(sizes)) if len(members[k]) < sizes[k]),
                key=lambda k: (load[k], k))
        members[k].append(i)
        load[k] += work[i]
    return [sorted(m) for m in members]
