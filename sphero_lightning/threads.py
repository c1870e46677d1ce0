"""CPU threads: use the cores that are there, and share them when several ``sphero`` runs go on at once.

Each run (a ``sphero fit`` process, every DDP rank, a ``register_stack`` call) holds one slot file under
``<tmp>/sphero-cores-<uid>/`` with an exclusive ``flock`` for as long as it runs (:class:`CoreShare`, a context
manager; the lock goes with the process however it ends). Before every block a run counts the slots in use and takes
``max(1, cores // runs)`` torch threads, so two runs started at once on one machine share its cores instead of
oversubscribing them (OpenMP threads of two processes spinning on the same cores slowed each 4x here); a run that has
ended holds no slot, so it slows nobody. Set ``SPHERO_NUM_THREADS`` (or ``OMP_NUM_THREADS``) to fix the number yourself.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from pathlib import Path
from typing import Self

#: Slot files looked at (processes beyond this many share as if there were this many).
MAX_SLOTS = 256


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under SLURM or taskset), else the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def user_threads() -> int | None:
    """A thread count the user fixed (``SPHERO_NUM_THREADS``, else ``OMP_NUM_THREADS``), or None."""
    for key in ("SPHERO_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(key, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


class CoreShare:
    """This run's slot among the ``sphero`` runs of this user on this machine, taken at construction; a context
    manager that closes it on leaving (or call :meth:`close`).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d, CoreShare(d) as share:
    ...     share.processes()
    1
    """

    def __init__(self, folder: str | Path | None = None) -> None:
        import fcntl

        self.folder = Path(folder or Path(tempfile.gettempdir()) / f"sphero-cores-{os.getuid()}")
        self.fd: int | None = None
        self.slot: int | None = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for i in range(MAX_SLOTS):
                fd = os.open(self.folder / f"slot-{i:03d}", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    continue
                self.fd, self.slot = fd, i
                break
        except OSError:  # no writable temporary folder: behave as the only process
            self.fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def processes(self) -> int:
        """``sphero`` runs holding a slot now (this one included; at least 1)."""
        import fcntl

        if self.fd is None:
            return 1
        n = 0
        for path in self.folder.glob("slot-*"):
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)  # free
            except OSError:
                n += 1  # held by a live run (ours included: flock locks are per open file description)
            finally:
                os.close(fd)
        return max(1, n)

    def threads(self) -> int:
        """Threads for this run: the user's number, or an equal share of the cores."""
        return user_threads() or max(1, available_cores() // self.processes())

    def close(self) -> None:
        """Give the slot back (idempotent)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc): keeps the resident size flat over thousands of blocks
    instead of creeping up with allocator fragmentation. A no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def launch_rank() -> int:
    """This process's global rank as its launcher set it (torchrun, SLURM, Lightning's DDP launcher); 0 alone."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``; elsewhere physical memory / 2)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def seconds_since_start() -> float | None:
    """Wall seconds since this process started (Linux: ``/proc``), start-up and imports included; None elsewhere."""
    try:
        start_ticks = float(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
