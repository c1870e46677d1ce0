"""What one run takes from its process, given back when it ends, however it ends (return, error, Ctrl-C).

A run (``sphero fit``, in its own process or called in-process, and ``register_stack``) is a ``with RunScope():``
block. Inside it the run holds a core slot among the ``sphero`` runs of the machine (:class:`~..threads.CoreShare`)
and sets torch's intra-op threads to its share before every block (:meth:`RunScope.share_cores`); it may start
zarr's I/O threads, cache filter matrices on a GPU and take its output's lock (:meth:`RunScope.on_exit`). On
leaving the block all of that is given back: the slot, torch's thread count as the caller had it, zarr's threads
where they were not running before the run (and no other run is going on), the cached device tensors, the locks this
run took (only those) and the SIGINT handler (Lightning leaves Ctrl-C ignored after catching one). The run that is going on is found with :func:`current_run` (a context variable:
two runs in two threads of one process each see their own).

>>> import torch
>>> before = torch.get_num_threads()
>>> with RunScope() as run:
...     _ = run.share_cores()
>>> torch.get_num_threads() == before and current_run() is None
True
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import ClassVar, Self

from ..threads import CoreShare

_CURRENT: ContextVar[RunScope | None] = ContextVar("sphero_run", default=None)


def current_run() -> RunScope | None:
    """The run this code is part of, or None outside any (a Trainer driven by hand)."""
    return _CURRENT.get()


def _zarr_io_running() -> bool:
    sync = sys.modules.get("zarr.core.sync")
    return sync is not None and getattr(sync, "iothread", [None])[0] is not None


class RunScope:
    """One run's hold on the process (see the module's description); a context manager."""

    #: Runs going on in this process now (zarr's threads are stopped by the last one to end, only).
    _active: ClassVar[set[int]] = set()
    _active_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self._cleanups: list[Callable[[], None]] = []
        self._token: Token | None = None
        self.cores: CoreShare | None = None

    def __enter__(self) -> Self:
        import torch

        self.torch_threads = torch.get_num_threads()
        # Lightning answers Ctrl-C by ignoring SIGINT for good (its graceful shutdown): the caller's handler comes back
        self.sigint = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
        self.zarr_io_before = _zarr_io_running()
        self.cores = CoreShare()
        with RunScope._active_lock:
            RunScope._active.add(id(self))
        self._token = _CURRENT.set(self)
        return self

    def share_cores(self) -> int:
        """Set torch's intra-op threads to this run's share of the cores (cheap: called before every block, as other
        runs start and end); returns the number."""
        import torch

        n = self.cores.threads() if self.cores is not None else torch.get_num_threads()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return n

    def on_exit(self, cleanup: Callable[[], None]) -> None:
        """Call ``cleanup`` when the run ends, however it ends (last registered, first called); e.g. a lock's release."""
        self._cleanups.append(cleanup)

    def __exit__(self, *exc: object) -> None:
        import torch

        from ..core.interpolation import drop_device_matrices

        try:
            while self._cleanups:
                cleanup = self._cleanups.pop()
                try:
                    cleanup()
                except Exception as err:  # noqa: BLE001 - one failed release must not keep the others
                    print(f"sphero: warning: at the end of the run: {type(err).__name__}: {err}", file=sys.stderr)
        finally:
            if self.cores is not None:
                self.cores.close()
            torch.set_num_threads(self.torch_threads)
            if self.sigint is not None and signal.getsignal(signal.SIGINT) is not self.sigint:
                signal.signal(signal.SIGINT, self.sigint)
            drop_device_matrices()
            with RunScope._active_lock:
                RunScope._active.discard(id(self))
                last = not RunScope._active
            if last and not self.zarr_io_before and _zarr_io_running():
                from zarr.core.sync import cleanup_resources

                cleanup_resources()  # zarr starts them again on its next use
            if self._token is not None:
                _CURRENT.reset(self._token)
                self._token = None
