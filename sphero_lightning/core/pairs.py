"""Which slices are registered to which: the pair graph, and where a block's pairs find their slices.

With one neighbour the pairs are the chain of consecutive usable slices (a damaged slice is bridged over). With
``K`` neighbours each slice is also registered to the ``K - 1`` usable slices before that: redundant pairs that let
the solve (:mod:`.solve`) outvote a pair with no true answer. Pairs are ordered by their moving slice, nearest fixed
slice first, so a block of consecutive pairs needs a run of consecutive slices (its moving slices and ``K`` before
them) and the chain's pairs keep their order.
"""

from __future__ import annotations

import itertools


def pair_graph(good: list[int], neighbours: int = 1) -> list[tuple[int, int]]:
    """``(fixed, moving)`` pairs of the usable slices ``good`` (ascending), each slice registered to the ``neighbours``
    usable slices before it.

    >>> pair_graph([0, 1, 2, 4], 2)
    [(0, 1), (1, 2), (0, 2), (2, 4), (1, 4)]
    """
    if neighbours < 1:
        raise ValueError(f"neighbours must be >= 1, got {neighbours}")
    return [(good[m - k], good[m]) for m in range(1, len(good)) for k in range(1, min(neighbours, m) + 1)]


def block_layout(pairs: list[tuple[int, int]]) -> tuple[list[int], list[int], list[int]]:
    """The slices a block of ``pairs`` reads (ascending, each once) and, per pair, the positions of its fixed and
    moving slice among them.

    >>> block_layout([(1, 2), (0, 2), (2, 4)])
    ([0, 1, 2, 4], [1, 0, 2], [2, 2, 3])
    """
    slices = sorted({z for pair in pairs for z in pair})
    at = {z: q for q, z in enumerate(slices)}
    return slices, [at[i] for i, _ in pairs], [at[j] for _, j in pairs]


def blocks(n_pairs: int, segments: list[int], size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` pair indices of every block of ``size`` pairs; ``segments``: the first pair of each run of
    pairs that starts a block of its own (pairs added after the others were fitted never join an earlier block).

    >>> blocks(10, [0, 7], 4)
    [(0, 4), (4, 7), (7, 10)]
    """
    bounds = [*segments, n_pairs]
    return [(lo + k, min(lo + k + size, hi)) for lo, hi in itertools.pairwise(bounds) for k in range(0, hi - lo, size)]
