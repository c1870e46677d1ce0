"""Issue 34: a run leaves the process as it found it (core slot, torch's threads, threads, locks, SIGINT), however it
ends, and what it keeps is bounded by the block and the slice, not by the depth of the stack."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from sphero_lightning import register_stack
from sphero_lightning.core import fit as core_fit
from sphero_lightning.core.synthetic import continuous_volume, em_like_image, make_stack
from sphero_lightning.errors import SpheroError
from sphero_lightning.storage.stacks import write_zarr
from sphero_lightning.threads import CoreShare
from sphero_lightning.training.data import ZarrPairDataModule
from sphero_lightning.training.scope import RunScope, current_run


@pytest.fixture(scope="module")
def small_stack() -> np.ndarray:
    return make_stack(em_like_image(192, seed=4), 6, (96, 96), seed=5).stack


def _threads_settled(before: set[str], timeout: float = 2.0) -> set[str]:
    """Names of the threads alive now (waiting briefly for threads that are shutting down)."""
    end = time.monotonic() + timeout
    while True:
        now = {t.name for t in threading.enumerate()}
        if now == before or time.monotonic() > end:
            return now
        time.sleep(0.02)


def _runs_holding_slots() -> int:
    with CoreShare() as probe:
        return probe.processes() - 1  # not counting the probe itself


def _state() -> tuple[int, set[str], int, object]:
    return torch.get_num_threads(), {t.name for t in threading.enumerate()}, _runs_holding_slots(), signal.getsignal(signal.SIGINT)


def _fail_at_step(monkeypatch, exc: BaseException, after: int = 3) -> None:
    calls = {"n": 0}
    original = core_fit.BlockFit.step

    def step(self):
        calls["n"] += 1
        if calls["n"] > after:
            raise exc
        return original(self)

    monkeypatch.setattr(core_fit.BlockFit, "step", step)


def test_register_stack_gives_back_the_slot_the_threads_and_torchs_thread_count(small_stack):
    """A notebook that called register_stack once kept its core slot for good (every later sphero fit on the machine
    took half the cores), and torch's thread count changed to the run's share and stayed so."""
    torch.set_num_threads(1)  # the caller's choice; a run alone on this machine takes every core while it runs
    try:
        threads_before, names_before, slots_before, sigint_before = _state()
        seen = {}
        original = RunScope.share_cores

        def spy(self):
            seen["run"] = original(self)
            return seen["run"]

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(RunScope, "share_cores", spy)
            register_stack(small_stack)
        assert seen["run"] >= 1
        assert torch.get_num_threads() == threads_before == 1
        assert _threads_settled(names_before) == names_before
        assert _runs_holding_slots() == slots_before
        assert signal.getsignal(signal.SIGINT) is sigint_before
        assert current_run() is None
    finally:
        torch.set_num_threads(os.cpu_count() or 1)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_register_stack_gives_everything_back_when_it_fails(small_stack, monkeypatch, exc):
    """An exception inside the fit, or Ctrl-C (which Lightning turns into SIGINT ignored and sys.exit(1)): the same
    state afterwards as before, and Ctrl-C reaches the notebook as KeyboardInterrupt with Ctrl-C working again."""
    before = _state()
    _fail_at_step(monkeypatch, exc)
    with pytest.raises(type(exc)):
        register_stack(small_stack, options={"data.pairs_per_block": 2})
    threads, _, slots, sigint = _state()
    assert threads == before[0] and slots == before[2] and sigint is before[3]
    assert _threads_settled(before[1]) == before[1]
    assert current_run() is None


def test_finished_blocks_are_freed_without_the_cycle_collector(small_stack, monkeypatch):
    """Each block's fit (its images at every level, its solver) was kept alive by a reference cycle (the solver held a
    bound method of the fit) until Python's cycle collector ran, which it rarely does in a fit: ~5 MB per 512 px slice
    piled up over the stack. With the collector off, no block's fit outlives its block."""
    made: list[weakref.ref] = []
    original = core_fit.BlockFit.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(core_fit.BlockFit, "__init__", init)
    gc.collect()
    gc.disable()
    try:
        register_stack(small_stack, options={"data.pairs_per_block": 2})
        assert len(made) >= 4
        assert [r() is None for r in made] == [True] * len(made)
    finally:
        gc.enable()


def _peak_mb(code: str, cwd: Path, env: dict[str, str] | None = None) -> float:
    """Peak RSS (MB) of a fresh process running ``code`` (with ``env`` added to the environment): its own high-water
    mark (VmHWM; wait4's ru_maxrss would count this test process's memory at the fork too)."""
    hwm = ("import atexit\natexit.register(lambda: print('VmHWM', [ln.split()[1] for ln in open('/proc/self/status') "
           "if ln.startswith('VmHWM')][0], flush=True))\n")
    r = subprocess.run([sys.executable, "-c", hwm + code], cwd=cwd, capture_output=True, text=True, check=False,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr[-2000:]
    return int(next(ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("VmHWM"))) / 1024


def test_peak_memory_does_not_grow_with_the_depth_of_the_stack(tmp_path):
    """register_stack on a Zarr array (read where it is, not copied), 8 and 48 slices of a continuous 256 px volume
    in blocks of 8 pairs, each in a fresh process: measured +10 MB (was +62 MB, a block's working memory per block).
    Both on the torch evaluation: the deeper stack would otherwise take the compiled one (core/kernels.py), whose
    compiler's one-off ~80 MB does not depend on the depth (benchmarks/memory_depth.py compares 100 and 1000 slices,
    both compiled)."""
    peaks = []
    for n in (8, 48):
        root = tmp_path / f"c{n}.zarr"
        write_zarr(continuous_volume(n, 256, seed=0).stack, root)
        peaks.append(_peak_mb("import zarr\nfrom sphero_lightning import register_stack\n"
                              f"register_stack(zarr.open_array({str(root)!r}, path='images/50-4-4', mode='r'), "
                              "options={'data.pairs_per_block': 8})", tmp_path, env={"SPHERO_KERNELS": "torch"}))
    assert peaks[1] - peaks[0] < 30, peaks


def _module(root: Path, dst: str = "images/registered") -> ZarrPairDataModule:
    return ZarrPairDataModule(str(root), "images/50-4-4", dst_group=dst)


def _held(lock_path: Path) -> bool:
    """Whether someone holds the lock file (a probe from a new open file: what another run would see)."""
    import fcntl

    if not lock_path.exists():
        return False
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def test_two_runs_in_one_process_each_take_and_release_their_own_lock(tmp_path, small_stack):
    """Two runs of one process on two outputs: each holds its own lock, and one that ends (here by an error) releases
    its lock only; the other's stays held. (release_all used to drop every lock of the process.)"""
    root = tmp_path / "s.zarr"
    write_zarr(small_stack, root)
    a, b = _module(root, "out/a"), _module(root, "out/b")
    with RunScope():
        a.prepare_data()
        assert _held(a.lock_path)
        with pytest.raises(RuntimeError), RunScope():
            b.prepare_data()
            assert _held(b.lock_path) and _held(a.lock_path)
            raise RuntimeError("the second run fails")
        assert not _held(b.lock_path)
        assert _held(a.lock_path)  # the first run's lock is untouched
    assert not _held(a.lock_path) and not a.lock_path.exists()


def test_a_second_run_in_the_same_process_cannot_take_a_held_output(tmp_path, small_stack):
    """Two runs of one process on the same output: the second is refused (it used to share the lock silently),
    naming this process; once the first has ended, the next run takes the lock and releases it in turn."""
    root = tmp_path / "s.zarr"
    write_zarr(small_stack, root)
    first, second = _module(root), _module(root)
    with RunScope():
        first.prepare_data()
        with RunScope(), pytest.raises(SpheroError, match="another run in this process"):
            second.prepare_data()
        assert _held(first.lock_path)
    assert not _held(first.lock_path)
    third = _module(root)
    with RunScope():
        third.prepare_data()
        assert _held(third.lock_path)
    assert not _held(third.lock_path)


def test_sphero_fit_twice_in_one_process_leaves_no_lock_and_no_slot(tmp_path, small_stack):
    from tests.conftest import fit

    root = tmp_path / "s.zarr"
    write_zarr(small_stack, root)
    slots = _runs_holding_slots()
    fit(root, "--model.transformation", "rigid")
    fit(root, "--model.transformation", "rigid", "--data.overwrite", "true")
    lock = root / "images/registered/tmp-50-4-4-journal/lock"
    assert not lock.exists() and not _held(lock)
    assert _runs_holding_slots() == slots
    assert zarr.open_array(str(root), path="images/registered/50-4-4", mode="r").shape[0] == 6
