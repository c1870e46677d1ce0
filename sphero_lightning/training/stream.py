"""The block reader: one block of slices per epoch, the next read in the background while the current one is fitted."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import lightning as L
from torch.utils.data import IterableDataset


@dataclass
class ReadTimes:
    """Where a fit's reading went (seconds): ``read_s`` reading blocks (in the background), ``wait_s`` the fit waiting
    for a block that was not read yet."""

    read_s: float = 0.0
    wait_s: float = 0.0


class BlockStream(IterableDataset):
    """Per epoch: this rank's slices of the epoch's block once, then step tokens until the epoch ends.

    The next block is read in a background thread while the current one is fitted.
    """

    def __init__(self, dm: Any, trainer: L.Trainer) -> None:
        super().__init__()
        self.dm, self.trainer = dm, trainer
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sphero-prefetch")
        self.pending: dict[int, Future] = {}
        self.times = ReadTimes()

    def _read(self, block: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        item = self.dm.read_rank_block(block, self.trainer.global_rank, self.trainer.world_size)
        self.times.read_s += time.perf_counter() - t0
        return item

    def _fetch(self, block: int) -> Future:
        if block in self.dm.skip_blocks:  # finished in an earlier run: nothing to read
            f: Future = Future()
            f.set_result({"skip": True})
            return f
        if block not in self.pending:
            self.pending[block] = self.pool.submit(self._read, block)
        return self.pending[block]

    def __iter__(self) -> Iterator[Any]:
        epoch = self.trainer.current_epoch
        t0 = time.perf_counter()
        item = self._fetch(epoch).result()
        self.times.wait_s += time.perf_counter() - t0
        self.pending.pop(epoch, None)
        if epoch + 1 < self.dm.n_blocks(self.trainer.world_size):
            self._fetch(epoch + 1)
        yield item
        token = 0
        while True:
            token += 1
            yield token

    def close(self) -> None:
        """Stop the reader thread (a block still being read ahead is dropped): nothing of the run stays behind in the
        process (a notebook that fits again and again would otherwise keep one idle thread per run)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()
