"""The checkpoint schedule: which completed-step counts get a checkpoint.

A checkpoint at c holds the state after c completed steps (c = 0 is the state before the first
step). The schedule is every `every` steps, optionally also at log-spaced counts 1, 2, 4, 8, ...,
and always at the first (0) and the last (total) count.
"""

from __future__ import annotations


def checkpoint_counts(total: int, every: int, log_spaced: bool = False) -> list[int]:
    if total < 0 or every < 1:
        raise ValueError(f"checkpoint schedule needs total >= 0 and every >= 1, got {total}, {every}")
    counts = {0, total}
    counts.update(range(every, total + 1, every))
    if log_spaced:
        c = 1
        while c < total:
            counts.add(c)
            c *= 2
    return sorted(counts)
