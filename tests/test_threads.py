"""sphero_lightning/threads.py: cores shared between sphero processes, and no thread left behind by repeated fits."""

from __future__ import annotations

import subprocess
import sys

from sphero_lightning import threads

#: Threads of the libraries, started on first use and reused by every later call for the life of the process: zarr's
#: I/O event loop and its executor, tqdm's monitor.
LIBRARY_THREADS = ("zarr_io", "asyncio_", "tqdm_monitor")


def test_processes_share_the_cores(tmp_path, monkeypatch):
    monkeypatch.delenv("SPHERO_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    a = threads.CoreShare(tmp_path)
    assert a.processes() == 1 and a.threads() == 8
    b = threads.CoreShare(tmp_path)  # a second process (its own open file: its own lock)
    c = threads.CoreShare(tmp_path)
    assert a.slot != b.slot != c.slot
    assert a.processes() == b.processes() == 3 and a.threads() == 2  # 8 // 3
    b.close()
    c.close()
    assert a.processes() == 1 and a.threads() == 8  # freed slots count no more
    d = threads.CoreShare(tmp_path)
    assert d.slot == 1  # a freed slot is reused
    monkeypatch.setenv("SPHERO_NUM_THREADS", "3")
    assert a.threads() == 3  # the user's number wins
    a.close()
    d.close()


def test_a_killed_process_frees_its_share(tmp_path):
    code = f"from sphero_lightning.threads import CoreShare; s = CoreShare({str(tmp_path)!r}); print(s.slot, flush=True); import time; time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "0"
        mine = threads.CoreShare(tmp_path)
        assert mine.processes() == 2
    finally:
        p.kill()
        p.wait()
    assert mine.processes() == 1
    mine.close()


def test_repeated_fits_leave_no_thread_behind(tmp_path):
    """Issue 24: every run left its block reader's thread alive, and the writer ran on dask's process-wide pool, whose
    threads (each with the OpenMP team torch gave it) made every later fit in the process 2.5x slower. After each of
    three ``sphero fit`` runs and two ``register_stack`` calls in one process, the only threads alive besides the
    main one are the libraries' own (zarr's executor grows on demand up to its own bound, so their number varies)."""
    code = f"""
import threading, numpy as np
from pathlib import Path
from sphero_lightning import register_stack
from sphero_lightning.commands.main import main
from sphero_lightning.core.synthetic import em_like_image, make_stack
from sphero_lightning.storage.stacks import write_zarr
stack = make_stack(em_like_image(256, seed=1), 4, (96, 96), seed=2).stack
before = sorted(t.name for t in threading.enumerate())
print("before", " ".join(before))
for k in range(3):
    root = Path({str(tmp_path)!r}) / f"s{{k}}.zarr"
    write_zarr(stack, root)
    main(["fit", "--data.root", str(root), "--data.array", "images/50-4-4",
          "--trainer.logger.init_args.save_dir", {str(tmp_path / "logs")!r}])
    print("fit", " ".join(sorted(t.name for t in threading.enumerate())), flush=True)
for k in range(2):
    register_stack(stack)
    print("api", " ".join(sorted(t.name for t in threading.enumerate())), flush=True)
"""
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln.split() for ln in r.stdout.splitlines() if ln.startswith(("before", "fit", "api"))]
    assert [ln[0] for ln in lines] == ["before", "fit", "fit", "fit", "api", "api"], r.stdout
    assert lines[0][1:] == ["MainThread"], lines[0]
    for ln in lines[1:]:
        left = [name for name in ln[1:] if name != "MainThread"]
        assert all(name.startswith(LIBRARY_THREADS) for name in left), ln
