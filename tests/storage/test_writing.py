"""storage/writing.py: the output side. Output chunks and shards, strips of rows and threads give the whole-slice result
bit for bit; long slices are read in bands; a killed write resumes with only the rest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from sphero_lightning.core import windows
from sphero_lightning.core.synthetic import em_like_image, make_stack
from sphero_lightning.core.warping import warp
from sphero_lightning.errors import SpheroError
from sphero_lightning.storage.stacks import write_zarr
from sphero_lightning.storage.writing import output_layout, to_dtype, warp_stack
from sphero_lightning.training.writer import RegistrationWriter
from tests.conftest import CONFIG, OUT


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


def _flags(out_root: Path) -> int:
    d = out_root / "images" / "registered" / "tmp-50-4-4-partial-written" / "c"
    return len(list(d.iterdir())) if d.exists() else 0


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


def test_output_layout_checks_shapes():
    assert output_layout((1, 512, 512), (10, 300, 400)) == ((1, 300, 400), None)
    assert output_layout((1, 64, 64), (10, 300, 400), [2, 128, 128], [4, 256, 256]) == ((2, 128, 128), (4, 256, 256))
    with pytest.raises(SpheroError, match="whole multiples"):
        RegistrationWriter(chunks=[1, 64, 64], shards=[1, 100, 128])
    with pytest.raises(SpheroError, match="three positive"):
        RegistrationWriter(chunks=[0, 64, 64])
    with pytest.raises(SpheroError, match="num_workers"):
        RegistrationWriter(num_workers=0)


def test_writer_strips_chunks_and_threads_do_not_change_the_output(tmp_path, monkeypatch):
    """Warping in strips of rows, in chunks of the output, by several threads, gives exactly the whole-slice result."""
    import torch

    from sphero_lightning.core import windows
    from sphero_lightning.core.synthetic import em_like_image
    from sphero_lightning.core.warping import warp
    from sphero_lightning.storage import writing as output

    monkeypatch.setattr(windows, "CANVAS_FILL", float("nan"))  # a read outside a task's region would show
    rng = np.random.default_rng(0)
    stack = np.stack([em_like_image(96, seed=k)[:80, :90] for k in range(4)]).astype(np.uint16) * 200
    src = zarr.create_array(str(tmp_path / "src.zarr"), shape=stack.shape, chunks=(1, 80, 90), dtype=stack.dtype)
    src[:] = stack
    theta = torch.tensor([[[1.0, 0.01, 0.02], [-0.01, 1.0, -0.03]]] * 3, dtype=torch.float64)
    theta[:, :, 2] += torch.from_numpy(rng.normal(0, 0.01, (3, 2)))
    box = [3, 75, 4, 84]
    whole = output.to_dtype(warp(torch.from_numpy(stack[1:].astype(np.float32))[:, None], theta.float(), out_shape=(72, 80),
                                 offset=(3, 4), full_shape=(80, 90))[:, 0].numpy(), stack.dtype)
    for mode in ("bspline", "bicubic"):
        outs = []
        for strip, workers, chunks in ((1 << 18, 1, (1, 72, 80)), (7 * 80, 3, (1, 72, 80)), (1 << 18, 2, (3, 40, 50))):
            monkeypatch.setattr(output, "_STRIP_PIXELS", strip)
            out = zarr.create_array(str(tmp_path / f"o{mode}{strip}{chunks[0]}.zarr"), shape=(4, 72, 80), chunks=chunks,
                                    dtype=stack.dtype)
            output.warp_stack(src, out, theta, box, mode, num_workers=workers)
            outs.append(out[:])
        np.testing.assert_array_equal(outs[0], outs[1])
        np.testing.assert_array_equal(outs[0], outs[2])
        np.testing.assert_array_equal(outs[0][0], stack[0, 3:75, 4:84])
        if mode == "bspline":
            np.testing.assert_array_equal(outs[0][1:], whole)


def test_the_compiled_warp_is_the_torch_warp_to_rounding_whatever_the_chunks_and_threads(tmp_path, monkeypatch):
    """The compiled warp (stacks big enough for numba, as the fit decides): one output whatever the chunks, threads and
    scheduler; the torch warp's within one grey level on a handful of pixels, and to float32 rounding on a float
    stack, including pixels sampled outside the slice (no crop); slices longer than DENSE_MAX (sampled from the torch
    prefilter's window canvas) likewise."""
    from sphero_lightning.core import kernels
    from sphero_lightning.storage import writing as output

    if not kernels.available():
        pytest.skip("numba is a dependency; SPHERO_KERNELS=torch turned it off")
    assert output.compiled_warp("bspline", "cpu", 100, (512, 512), np.uint8)
    assert not output.compiled_warp("bspline", "cpu", 4, (96, 96), np.uint8)  # numba's start is not worth it
    assert not output.compiled_warp("bicubic", "cpu", 100, (512, 512), np.uint8)
    assert not output.compiled_warp("bspline", "cpu", 100, (512, 512), np.float64)
    monkeypatch.setattr(windows, "CANVAS_FILL", float("nan"))  # a read outside a task's region would show
    rng = np.random.default_rng(1)
    for shape, dtype, box in (((80, 90), np.uint16, [3, 75, 4, 84]), ((80, 90), np.float32, [0, 80, 0, 90]),
                              ((40, 800), np.uint8, [2, 38, 10, 790])):
        tiles = np.stack([large_image(800, seed=k)[:shape[0], :shape[1]] for k in range(4)])
        stack = (tiles * (200 if dtype == np.uint16 else 1)).astype(dtype)
        src = zarr.create_array(str(tmp_path / f"src{dtype.__name__}{shape[1]}.zarr"), shape=stack.shape,
                                chunks=(1, *shape), dtype=stack.dtype)
        src[:] = stack
        theta = torch.tensor([[[1.0, 0.01, 0.02], [-0.01, 1.0, -0.03]]] * 3, dtype=torch.float64)
        theta[:, :, 2] += torch.from_numpy(rng.normal(0, 0.01, (3, 2)))
        out_shape = (4, box[1] - box[0], box[3] - box[2])
        outs = {}
        for compiled in (True, False):
            monkeypatch.setattr(output, "compiled_warp", lambda *a, c=compiled: c)
            layouts = [((1, *out_shape[1:]), 1, "threads"), ((1, *out_shape[1:]), 3, "threads"),
                       ((3, 20, 50), 2, "threads"), ((2, 17, 200), 1, "synchronous")] if compiled else [((1, *out_shape[1:]), 1, "threads")]
            for k, (chunks, workers, scheduler) in enumerate(layouts):
                out = zarr.create_array(str(tmp_path / f"o{dtype.__name__}{shape[1]}{compiled}{k}.zarr"), shape=out_shape,
                                        chunks=chunks, dtype=stack.dtype)
                output.warp_stack(src, out, theta, box, "bspline", num_workers=workers, scheduler=scheduler)
                outs.setdefault(compiled, []).append(out[:])
        for other in outs[True][1:]:
            np.testing.assert_array_equal(outs[True][0], other)
        fast, slow = outs[True][0].astype(np.float64), outs[False][0].astype(np.float64)
        np.testing.assert_array_equal(fast[0], slow[0])
        if dtype == np.float32:
            assert np.abs(fast - slow).max() < 1e-4 * np.abs(slow).max()
        else:
            # values near 40000 carry ~0.004 of float32 rounding in the torch warp: more of them flip there
            assert np.abs(fast - slow).max() <= 1 and (fast != slow).mean() < (1e-2 if dtype == np.uint16 else 1e-3)


def test_small_slices_go_several_to_a_task_with_the_same_bytes(tmp_path, monkeypatch, base_image):
    """Whole-slice tasks of small slices hold several slices (storage.slices.group_depth: one Zarr read and one write a
    task); the output is the one-slice-a-task output bit for bit, and a task's flag covers all its slices."""
    from sphero_lightning.storage import slices, writing

    assert writing.unit_shape((40, 361, 363), (1, 361, 363), (384, 384)) == (5, 361, 363)  # >= 8 tasks
    assert writing.unit_shape((400, 361, 363), (1, 361, 363), (384, 384)) == (7, 361, 363)  # <= 1 Mpx of source
    assert writing.unit_shape((40, 900, 363), (1, 900, 363), (1000, 384)) == (2, 900, 363)
    assert writing.unit_shape((4, 361, 363), (1, 361, 363), (384, 384)) == (1, 361, 363)
    s = make_stack(base_image, 24, (80, 80), seed=2, dtype="uint8")
    src = zarr.create_array(str(tmp_path / "src.zarr"), shape=s.stack.shape, chunks=(1, 80, 80), dtype="uint8")
    src[:] = s.stack
    composed = torch.from_numpy(s.composed)
    outs = {}
    for group, units in ((True, 8), (False, 24)):
        if not group:
            monkeypatch.setattr(slices, "GROUP_PIXELS", 1)
        out = zarr.create_array(str(tmp_path / f"o{group}.zarr"), shape=(24, 70, 72), chunks=(1, 70, 72), dtype="uint8")
        flags = zarr.create_array(str(tmp_path / f"f{group}.zarr"), shape=(units,), chunks=(1,), dtype="uint8")
        result = warp_stack(src, out, composed, [5, 75, 4, 76], "bspline", written=flags, num_workers=3)
        assert result.units == units and flags[:].all()
        outs[group] = out[:]
    np.testing.assert_array_equal(outs[True], outs[False])
