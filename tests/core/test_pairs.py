"""core/pairs.py: the pair graph (which pairs a stack fits) and its blocks."""

from __future__ import annotations

import pytest

from sphero_lightning.core.pairs import block_layout, blocks, pair_graph


def test_pair_graph_blocks_and_layout():
    assert pair_graph([0, 1, 2, 3], 1) == [(0, 1), (1, 2), (2, 3)]
    assert pair_graph([0, 1, 2, 4], 2) == [(0, 1), (1, 2), (0, 2), (2, 4), (1, 4)]  # slice 3 damaged: bridged
    assert block_layout([(1, 2), (0, 2), (2, 4)]) == ([0, 1, 2, 4], [1, 0, 2], [2, 2, 3])
    assert blocks(10, [0, 7], 4) == [(0, 4), (4, 7), (7, 10)]  # pairs added later start a block of their own
    with pytest.raises(ValueError):
        pair_graph([0, 1], 0)
