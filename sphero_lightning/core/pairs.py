"""Which slices are registered to which: the pair graph, and where a block's pairs find their slices.

With one neighbour the pairs are the chain of consecutive usable slices (a damaged slice is bridged over). With
``K`` neighbours each slice is also registered to the ``K - 1`` usable slices before that: redundant pairs that let
the solve (:mod:`.solve`) outvote a pair with no true answer. Pairs are ordered by their moving slice, nearest fixed
slice first, so a block of consecutive pairs needs a run of consecutive slices (its moving slices and ``K`` before
them) and the chain's pairs keep their order.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from .settings import SOLVE


def pair_graph(good: list[int], neighbours: int = SOLVE.neighbours) -> list[tuple[int, int]]:
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


@dataclass
class StackPairs:
    """Every pair a stack's fit has, in order: the pair graph of the usable slices, then the bridging pairs added once
    those were fitted; per pair the multiple of the finest pyramid factor it is fitted down to (``stop``: 1 for
    consecutive usable slices, ``coarse_factor`` for pairs further apart, 1 for bridges); ``segments``: the first pair
    of each run that starts a block of its own.

    >>> sp = StackPairs.of([0, 1, 2, 4], neighbours=2, coarse_factor=4.0)
    >>> sp.pairs, sp.stop
    ([(0, 1), (1, 2), (0, 2), (2, 4), (1, 4)], [1.0, 1.0, 4.0, 1.0, 4.0])
    >>> sp.add([(0, 4)]); sp.blocks(4)
    [(0, 4), (4, 5), (5, 6)]
    """

    pairs: list[tuple[int, int]]
    stop: list[float]
    segments: list[int] = field(default_factory=lambda: [0])

    @classmethod
    def of(cls, good: list[int], neighbours: int = SOLVE.neighbours, coarse_factor: float = SOLVE.coarse_factor) -> StackPairs:
        """The pairs of the usable slices ``good`` (:func:`pair_graph`), pairs further apart stopping at ``coarse_factor``."""
        pairs = pair_graph(good, neighbours)
        at = {z: q for q, z in enumerate(good)}
        return cls(pairs, [1.0 if at[j] - at[i] == 1 else float(coarse_factor) for i, j in pairs])

    def add(self, pairs: list[tuple[int, int]]) -> None:
        """Pairs fitted after the others (bridges, at full resolution): they start a block of their own."""
        self.segments.append(len(self.pairs))
        self.pairs.extend(pairs)
        self.stop.extend([1.0] * len(pairs))

    def blocks(self, size: int) -> list[tuple[int, int]]:
        """``(start, stop)`` pair indices of every block of ``size`` pairs (:func:`blocks`)."""
        return blocks(len(self.pairs), self.segments, size)
