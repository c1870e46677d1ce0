"""The output side on dask: one task per output chunk (or shard), threads or a dask cluster, resumable writes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import CONFIG, fit

from sphero_lightning.commands.apply import apply_registration
from sphero_lightning.core import windows
from sphero_lightning.core.synthetic import em_like_image, make_stack
from sphero_lightning.core.warping import warp
from sphero_lightning.storage.stacks import write_zarr
from sphero_lightning.storage.writing import to_dtype, warp_stack

OUT = "images/registered/50-4-4"


def large_image(size: int, seed: int) -> np.ndarray:
    """An EM-like image of ``size`` px, upsampled 2x from one of half the size (the procedural generator takes 18 s
    at 1024 px)."""
    half = torch.from_numpy(em_like_image(size // 2, seed=seed).astype(np.float32))[None, None]
    return torch.nn.functional.interpolate(half, scale_factor=2, mode="bicubic", align_corners=False)[0, 0].numpy()


def whole_slice_reference(stack: np.ndarray, composed: np.ndarray, box: list[int], mode: str = "bspline") -> np.ndarray:
    """What the writer computes, slice by slice on whole slices (the writer before it worked in chunks)."""
    up, down, left, right = box
    theta = torch.from_numpy(np.asarray(composed, dtype=np.float64))
    warped = warp(torch.from_numpy(stack[1:].astype(np.float32))[:, None], theta.float(), out_shape=(down - up, right - left),
                  mode=mode, offset=(up, left), full_shape=stack.shape[1:])[:, 0].numpy()
    return np.concatenate([stack[:1, up:down, left:right], to_dtype(warped, stack.dtype)])


@pytest.fixture(scope="module")
def stack_root(tmp_path_factory):
    s = make_stack(em_like_image(256, seed=5), 6, (96, 112), seed=2, max_shift=3.0, max_rot_deg=1.0)
    root = tmp_path_factory.mktemp("dask") / "s.zarr"
    write_zarr(s.stack, root, truth=s.composed)
    return root, s.stack


@pytest.mark.parametrize("layout", [[], ["--output.chunks", "[2, 40, 48]"],
                                    ["--output.chunks", "[1, 32, 32]", "--output.shards", "[2, 64, 64]"]])
def test_fit_output_equals_the_whole_slice_computation(stack_root, tmp_path, layout, monkeypatch):
    monkeypatch.setattr(windows, "CANVAS_FILL", float("nan"))  # a read outside a task's source region would show
    root, stack = stack_root
    out_root = tmp_path / "out.zarr"
    fit(root, "--data.output_root", str(out_root), *layout)
    out = zarr.open_array(str(out_root), path=OUT, mode="r")
    if layout:
        assert list(out.chunks) == [int(v) for v in layout[1].strip("[]").split(",")]
    assert not (out_root / "images" / "registered" / "tmp-50-4-4-partial-written").exists()
    ref = whole_slice_reference(stack, out.attrs["composed_transforms"], out.attrs["crop_box"])
    np.testing.assert_array_equal(out[:], ref)


def test_long_slices_in_chunks_read_bands_and_equal_whole_slices(tmp_path, monkeypatch):
    """Slices longer than DENSE_MAX on both sides: a task per row of chunks, each reading a band of the source."""
    monkeypatch.setattr(windows, "CANVAS_FILL", float("nan"))
    rng = np.random.default_rng(1)
    base = np.clip(large_image(1024, seed=1)[:800, :840], 0, 255)
    stack = np.stack([np.roll(base, (k, -k), (0, 1)) for k in range(3)]).astype(np.uint8)
    src = zarr.create_array(str(tmp_path / "src.zarr"), shape=stack.shape, chunks=(1, 800, 840), dtype=stack.dtype)
    src[:] = stack
    composed = torch.tensor([[[1.0, 0.004, 0.01], [-0.004, 1.0, -0.02]]] * 2, dtype=torch.float64)
    composed[:, :, 2] += torch.from_numpy(rng.normal(0, 0.005, (2, 2)))
    box = [9, 790, 12, 825]
    reads = []
    original = zarr.Array.__getitem__

    def counting(self, key):
        if self.path == "" and self.shape == stack.shape:
            reads.append(key)
        return original(self, key)

    monkeypatch.setattr(zarr.Array, "__getitem__", counting)
    for mode in ("bspline", "bilinear", "nearest"):
        reads.clear()
        out = zarr.create_array(str(tmp_path / f"{mode}.zarr"), shape=(3, 781, 813), chunks=(1, 392, 408), dtype=stack.dtype)
        timings = warp_stack(src, out, composed, box, mode, num_workers=2)
        assert timings.units == 3 * 2  # a row of chunks per task
        ref = whole_slice_reference(stack, composed.numpy(), box, mode) if mode != "nearest" else None
        if ref is not None:
            np.testing.assert_array_equal(out[:], ref)
        rows = [k[1].stop - k[1].start for k in reads if isinstance(k, tuple) and isinstance(k[1], slice)]
        assert rows and max(rows) < 800  # no task read a whole slice
    monkeypatch.undo()


def test_apply_equals_the_fit_output(stack_root, tmp_path):
    root, _ = stack_root
    out_root = tmp_path / "o.zarr"
    fit(root, "--data.output_root", str(out_root))
    shutil.copytree(root / "images" / "50-4-4", out_root / "images" / "50-4-4")
    dst = apply_registration(str(out_root), "images/50-4-4", OUT, dst="images/applied/x", progress=False, num_workers=3)
    np.testing.assert_array_equal(zarr.open_array(str(out_root), path=dst)[:], zarr.open_array(str(out_root), path=OUT)[:])


def test_a_dask_cluster_by_address_writes_what_threads_write(stack_root, tmp_path):
    """A LocalCluster with 2 worker processes: sphero fit's writer and sphero apply against it by address."""
    distributed = pytest.importorskip("distributed")  # a declared dependency: present in CI
    root, _ = stack_root
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        outs = {}
        for name, extra in (("threads", []), ("cluster", ["--output.scheduler", address])):
            out_root = tmp_path / f"{name}.zarr"
            fit(root, "--data.output_root", str(out_root), "--output.chunks", "[2, 48, 56]", *extra)
            outs[name] = zarr.open_array(str(out_root), path=OUT)[:]
        np.testing.assert_array_equal(outs["threads"], outs["cluster"])
        with distributed.Client(address) as client:  # the workers did the writing: both ran tasks
            done = client.run(lambda dask_worker: dask_worker.state.transition_counter)
            assert len(done) == 2 and all(n > 0 for n in done.values()), done
        shutil.copytree(root / "images" / "50-4-4", tmp_path / "threads.zarr" / "images" / "50-4-4")
        applied = apply_registration(str(tmp_path / "threads.zarr"), "images/50-4-4", OUT, dst="images/again/x",
                                     progress=False, scheduler=address, interpolation="bilinear")
        local = apply_registration(str(tmp_path / "threads.zarr"), "images/50-4-4", OUT, dst="images/again/y",
                                   progress=False, interpolation="bilinear")
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "threads.zarr"), path=applied)[:],
                                      zarr.open_array(str(tmp_path / "threads.zarr"), path=local)[:])


def test_a_bad_scheduler_is_one_line(stack_root, tmp_path):
    root, _ = stack_root
    proc = subprocess.run([sys.executable, "-m", "sphero_lightning", "fit", "--config", CONFIG, "--data.root", str(root),
                           "--data.array", "images/50-4-4", "--data.output_root", str(tmp_path / "x.zarr"),
                           "--output.scheduler", "localhost:1"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "tcp://" in proc.stderr, proc.stderr


def _flags(out_root: Path) -> int:
    d = out_root / "images" / "registered" / "tmp-50-4-4-partial-written" / "c"
    return len(list(d.iterdir())) if d.exists() else 0


def test_a_killed_write_resumes_with_only_the_rest(tmp_path):
    """SIGKILL once half of the output chunks are written; the same command writes only the others, and the output
    equals an uninterrupted run's."""
    s = make_stack(large_image(1024, seed=7), 3, (800, 800), seed=3, max_shift=2.0, max_rot_deg=0.5)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root, truth=s.composed)
    args = [sys.executable, "-m", "sphero_lightning", "fit", "--config", CONFIG, "--data.root", str(root),
            "--data.array", "images/50-4-4", "--output.chunks", "[1, 100, 100]", "--output.num_workers", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    killed = tmp_path / "killed.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*args, "--data.output_root", str(killed)], stderr=subprocess.PIPE, text=True, env=env)
    total = None
    while proc.poll() is None:
        n = _flags(killed)
        written = killed / "images" / "registered" / "tmp-50-4-4-partial-written" / "zarr.json"
        if total is None and written.exists():
            total = zarr.open_array(str(killed), path="images/registered/tmp-50-4-4-partial-written").shape[0]
        if total and n >= total // 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before half its chunks were written: {proc.stderr.read()}"
    before = _flags(killed)
    assert total // 2 <= before < total
    again = subprocess.run([*args, "--data.output_root", str(killed)], capture_output=True, text=True, env=env, check=False)
    assert again.returncode == 0, again.stderr
    assert f"resuming an interrupted write: {before} of {total} parts of the output (rows of chunks or whole slices) are already written" in again.stderr
    out = zarr.open_array(str(killed), path=OUT)
    ref = whole_slice_reference(s.stack, out.attrs["composed_transforms"], out.attrs["crop_box"])
    np.testing.assert_array_equal(out[:], ref)  # what an uninterrupted run writes (test_fit_output_equals_...)
    assert not (killed / "images" / "registered" / "tmp-50-4-4-partial-written").exists()
