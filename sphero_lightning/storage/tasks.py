"""Running many independent tasks: threads on this machine, or a dask cluster by address.

Every bulk loop over slices or chunks (writing the registered stack, ``sphero apply``, ``sphero ingest``, the
damaged-slice scan) runs here, with one progress display. Tasks are small functions of small arguments (array
paths, a few matrices); their results are small too, so memory holds only the tasks in flight.

``scheduler``: ``"threads"`` (a pool of ``num_workers`` threads of our own, tasks in order), ``"synchronous"`` (one
after the other, in this thread: for debugging), or the address of a dask distributed scheduler
(``tcp://host:8786``; e.g. a dask-jobqueue cluster's ``cluster.scheduler_address``), whose workers run the tasks.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

from ..core.settings import OUTPUT
from ..errors import SpheroError

#: Schedulers on this machine; anything else must be a distributed scheduler's address.
LOCAL = ("threads", "synchronous")


def is_distributed(scheduler: str) -> bool:
    return scheduler not in LOCAL


def check_scheduler(scheduler: str, option: str) -> None:
    """A one-line error now for a scheduler that is neither local nor an address."""
    if scheduler in LOCAL or "://" in scheduler:
        return
    raise SpheroError(f"{option} {scheduler!r} is not a scheduler: give threads, synchronous, or a dask scheduler's "
                      "address such as tcp://10.0.0.5:8786")


class LineProgress:
    """Progress for a log file (stderr is not a terminal, where tqdm's carriage returns pile up in one line): a plain
    line at most every ``every_s`` seconds, and a last one at the end if any was printed. tqdm's interface, as used."""

    def __init__(self, total: float, desc: str, unit: str, initial: float = 0, every_s: float = 30.0) -> None:
        self.total, self.desc, self.unit, self.n, self.every_s = total, desc, unit, initial, every_s
        self.t0 = self.last = time.monotonic()
        self.start, self.printed, self.postfix = initial, False, ""

    def _line(self) -> None:
        done, elapsed = self.n - self.start, time.monotonic() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        left = f", ~{(self.total - self.n) / rate:.0f} s left" if rate > 0 and self.n < self.total else ""
        total = f"{self.total:g}" if self.total else "?"
        pct = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
        print(f"sphero: {self.desc}: {self.n:g}/{total} {self.unit}s{pct}, {rate:.2f} {self.unit}/s{left}"
              f"{', ' + self.postfix if self.postfix else ''}", file=sys.stderr, flush=True)
        self.printed, self.last = True, time.monotonic()

    def update(self, n: float = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every_s:
            self._line()

    def set_postfix(self, **kwargs: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in kwargs.items())

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if self.printed:
            self.postfix = ""
            self._line()


def progress_bar(total: float, desc: str, unit: str, initial: float = 0, mininterval: float = 0.1) -> Any:
    """tqdm's bar on a terminal or in a notebook (redrawn at most every ``mininterval`` s); elsewhere (a log file, a
    pipe) :class:`LineProgress`. ``SPHERO_PROGRESS=bar`` or ``lines`` chooses."""
    choice = os.environ.get("SPHERO_PROGRESS", "").strip().lower()
    interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
    if choice == "lines" or (choice != "bar" and not interactive):
        return LineProgress(total, desc, unit, initial)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, mininterval=mininterval)


def _bar(progress: bool, desc: str, total: float, unit: str) -> Any:
    return progress_bar(total, desc, unit) if progress else None


def run_tasks(fn: Callable[..., Any], args: Sequence[tuple], *, scheduler: str = OUTPUT.scheduler, num_workers: int = OUTPUT.num_workers,
              progress: bool = False, desc: str = "", unit: str = "task", weights: Sequence[float] | None = None) -> list:
    """``[fn(*a) for a in args]``, in parallel; results in order. The progress bar advances by ``weights``
    (default 1 per task). The first task that fails stops the run and its exception is raised here."""
    weights = list(weights) if weights is not None else [1] * len(args)
    if all(float(w).is_integer() for w in weights):  # whole slices: the bar counts 16/16, not 16.0/16.0
        weights = [int(w) for w in weights]
    bar = _bar(progress, desc, sum(weights), unit)
    try:
        if not args:
            return []
        if is_distributed(scheduler):
            return _run_distributed(fn, args, scheduler, bar, weights)
        return _run_local(fn, args, scheduler, num_workers, bar, weights)
    finally:
        if bar is not None:
            bar.close()


def _run_local(fn: Callable[..., Any], args: Sequence[tuple], scheduler: str, num_workers: int, bar: Any,
               weights: list[float]) -> list:
    """The tasks on this machine, in order, at most ``num_workers`` at a time (and as many more queued: memory stays a
    few tasks' worth), on a pool of our own shut down when done (a pool that outlived the run kept threads that ran
    torch, each with an OpenMP thread team; once a process holds more such threads than it has cores, GNU OpenMP stops
    spinning between parallel regions and every later fit in the process ran 2.5x slower). No dask: importing it
    costs a fresh process ~0.3 s, and this needs none of it."""
    results: list[Any] = [None] * len(args)
    if scheduler == "synchronous":
        for i, a in enumerate(args):
            results[i] = fn(*a)
            if bar is not None:
                bar.update(weights[i])
        return results
    workers = max(1, int(num_workers))
    order = iter(range(len(args)))
    with ThreadPoolExecutor(workers, thread_name_prefix="sphero-write") as pool:
        pending = {pool.submit(fn, *args[i]): i for i in itertools.islice(order, 2 * workers)}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    i = pending.pop(future)
                    results[i] = future.result()  # the first failure is raised here
                    if bar is not None:
                        bar.update(weights[i])
                    nxt = next(order, None)
                    if nxt is not None:
                        pending[pool.submit(fn, *args[nxt])] = nxt
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return results


def _run_distributed(fn: Callable[..., Any], args: Sequence[tuple], address: str, bar: Any, weights: list[float]) -> list:
    try:
        from distributed import Client, as_completed
    except ImportError:  # pragma: no cover - distributed is a dependency
        raise SpheroError("a dask scheduler address needs the 'distributed' package: pip install distributed") from None
    try:
        client = Client(address, timeout=30)
    except OSError as exc:
        raise SpheroError(f"cannot reach the dask scheduler at {address!r} ({exc}); start it (dask scheduler, or a "
                          "dask-jobqueue cluster) or use --output.scheduler threads") from None
    try:
        futures = [client.submit(fn, *a, pure=False, key=f"sphero-{i}-{id(args)}") for i, a in enumerate(args)]
        index = {f.key: i for i, f in enumerate(futures)}
        for f in as_completed(futures):
            f.result()  # raises the task's exception here
            if bar is not None:
                bar.update(weights[index[f.key]])
        return client.gather(futures)
    finally:
        client.close()
