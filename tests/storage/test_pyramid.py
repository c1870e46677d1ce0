"""Downsampled levels written in the same pass as the output (issue 28): each writing task reduces the box it has just
warped, in memory; the levels equal the second pass's (``write_levels``) bit for bit, resume with the output, and a
layout whose tasks start off a multiple of ``2^(levels-1)`` falls back to the second pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from sphero_lightning.commands.apply import apply_registration
from sphero_lightning.storage import pyramid, writing
from sphero_lightning.storage.writing import level_arrays, warp_stack

SHAPE = (3, 1000, 1300)  # slices longer than DENSE_MAX on both sides: one task per output chunk
BOX = [9, 990, 11, 1288]  # an odd-sized output: 981 x 1277
NAMES = ["50-4-4", "50-8-8", "50-16-16"]
REG = "images/registered/50-4-4"


def make_store(tmp_path, chunk: int, dtype=np.uint8) -> str:
    """A source stack chunked ``chunk`` x ``chunk`` and a registration of it (its attributes: what apply reads)."""
    rng = np.random.default_rng(4)
    root = str(tmp_path / "s.zarr")
    group = zarr.open_group(root, mode="w").require_group("images")
    src = group.create_array("50-4-4", shape=SHAPE, chunks=(1, chunk, chunk), dtype=dtype)
    src[:] = rng.integers(0, 200, SHAPE).astype(dtype)
    src.attrs["spacing"] = [50, 4, 4]
    reg = group.require_group("registered").create_array("50-4-4", shape=SHAPE, chunks=(1, 500, 650), dtype=dtype)
    reg.attrs.update({"spacing": [50, 4, 4], "inputs": ["images/50-4-4"], "crop_box": BOX,
                      "composed_transforms": [[[1.0, 0.003, 0.004], [-0.003, 1.0, -0.002]],
                                              [[1.0, -0.002, -0.003], [0.002, 1.0, 0.005]]]})
    return root


def reference(full: np.ndarray, levels: int, nearest: bool) -> list[np.ndarray]:
    """Each level from the one before: top-left pixels, or 2 x 2 means in float64 rounded to nearest."""
    out = [full]
    for _ in range(1, levels):
        prev = out[-1]
        h, w = prev.shape[1] // 2 * 2, prev.shape[2] // 2 * 2
        if nearest:
            out.append(prev[:, 0:h:2, 0:w:2])
        else:
            mean = prev[:, :h, :w].astype(np.float64).reshape(len(prev), h // 2, 2, w // 2, 2).mean((2, 4))
            out.append(np.rint(mean).astype(full.dtype))
    return out


def apply(root: str, mode: str, levels: int = 3, **kw) -> zarr.Group:
    apply_registration(root, "images/50-4-4", REG, dst="images/applied/50-4-4", interpolation=mode, progress=False,
                       num_workers=2, levels=levels, **kw)
    return zarr.open_group(root, mode="r")["images/applied"]


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_same_pass_levels_equal_the_second_pass_and_the_reference(tmp_path, monkeypatch, mode):
    """1000 x 1300 slices in 256 px chunks (one task per chunk), an odd-sized output, 3 levels: written by the tasks
    (the second pass is not called), chunked one task's part per chunk, equal to the reference downsampling of the
    output and to what write_levels writes from it, attributes included; listed in the OME metadata, no temporaries
    left."""
    root = make_store(tmp_path, 256)
    second = pyramid.write_levels
    monkeypatch.setattr(pyramid, "write_levels", lambda *a, **k: pytest.fail("a second pass ran"))
    group = apply(root, mode)
    monkeypatch.undo()
    full = group["50-4-4"][:]
    assert full.shape == (3, 981, 1277)
    for k, (name, ref) in enumerate(zip(NAMES, reference(full, 3, mode == "nearest"))):
        assert np.array_equal(group[name][:], ref), name
        if k:
            assert group[name].chunks == (1, 256 >> k, 256 >> k)
    assert sorted(group.array_keys()) == sorted(NAMES)  # no tmp-* arrays or flags left
    assert [d["path"] for d in group.attrs["ome"]["multiscales"][0]["datasets"]] == NAMES

    # the second pass from a copy of the output, in another group: the same bytes and attributes
    other = zarr.open_group(root, mode="a").require_group("images/second")
    copy = other.create_array("50-4-4", data=full, chunks=(1, 256, 256))
    copy.attrs.update(dict(group["50-4-4"].attrs))
    second(root, "images/second", "50-4-4", 3, nearest=mode == "nearest")
    for name in NAMES[1:]:
        assert np.array_equal(other[name][:], group[name][:]), name
        assert dict(other[name].attrs) == dict(group[name].attrs), name


def test_an_interrupted_write_resumes_with_identical_levels(tmp_path, monkeypatch, capsys):
    """A task stopped after storing its output box but before its levels (so not flagged written): the same command
    writes only the unflagged tasks, and the levels equal an uninterrupted run's. A partial write with more levels is
    not resumed by a run with fewer, though every array it needs is there (the levels are in the fingerprint)."""
    root = make_store(tmp_path, 256)
    clean = {name: a[:] for name, a in apply(root, "bilinear").arrays()}
    store = writing.store_levels
    calls = []

    def stopping(*args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("killed")
        return store(*args, **kw)

    def interrupted(levels: int) -> set[int]:
        calls.clear()
        monkeypatch.setattr(writing, "store_levels", stopping)
        with pytest.raises(RuntimeError, match="killed"):
            apply(root, "bilinear", levels=levels, overwrite=True, scheduler="synchronous")
        monkeypatch.undo()
        capsys.readouterr()
        flags = zarr.open_array(root, path="images/applied/tmp-50-4-4-partial-written", mode="r")[:]
        return set(np.flatnonzero(flags).tolist())

    interrupted(3)  # then 2 levels: another fingerprint, so everything is written again
    units = []
    write = writing.write_unit
    monkeypatch.setattr(writing, "write_unit", lambda *a: units.append(a[1]) or write(*a))
    left = apply(root, "bilinear", levels=2, overwrite=True)
    assert "resuming" not in capsys.readouterr().err and len(units) == 12  # 3 slices x 4 rows of chunks
    assert not [n for n in left.array_keys() if n.startswith("tmp-")]  # the interrupted run's level 2 too
    monkeypatch.undo()
    flagged = interrupted(3)
    assert len(flagged) == 4
    units.clear()
    monkeypatch.setattr(writing, "write_unit", lambda *a: units.append(a[1]) or write(*a))
    group = apply(root, "bilinear", overwrite=True)
    assert "resuming an interrupted apply: 4 of 12 parts of the output (rows of chunks or whole slices) are already written" in capsys.readouterr().err
    assert sorted(units) == sorted(set(range(12)) - flagged)  # the unflagged task's output box was stored: redone
    for name in NAMES:
        assert np.array_equal(group[name][:], clean[name]), name


def test_chunks_not_divisible_fall_back_to_the_second_pass(tmp_path, monkeypatch):
    """250 px chunks and 3 levels: a task's box may start at 250 (not a multiple of 4), so the levels are written by
    write_levels after the output, with its chunking; they equal the reference all the same."""
    assert level_arrays("t", (3, 981, 1277), (1, 250, 250), (1000, 1300), 3) is None
    assert [c for _, _, c in level_arrays("t", (3, 981, 1277), (1, 250, 250), (1000, 1300), 2)] == [(1, 125, 125)]
    # level chunks of a few pixels (64 px chunks, 4 levels: 8 px at level 3): a second pass keeps the output's chunks
    assert level_arrays("t", (3, 981, 1277), (1, 64, 64), (1000, 1300), 4) is None
    assert level_arrays("t", (3, 981, 1277), (1, 64, 64), (1000, 1300), 2) is not None
    # slices of at most DENSE_MAX px: one task per whole slice, always aligned
    assert [c for _, _, c in level_arrays("t", (3, 181, 277), (1, 50, 50), (200, 300), 3)] == [(1, 90, 138), (1, 45, 69)]
    root = make_store(tmp_path, 250)
    ran = []
    second = pyramid.write_levels
    monkeypatch.setattr(pyramid, "write_levels", lambda *a, **k: ran.append(a) or second(*a, **k))
    group = apply(root, "bilinear")
    assert len(ran) == 1
    full = group["50-4-4"][:]
    for name, ref in zip(NAMES, reference(full, 3, False)):
        assert np.array_equal(group[name][:], ref), name
    assert group["50-8-8"].chunks == (1, 250, 250) and group["50-16-16"].chunks == (1, 245, 250)
    assert sorted(group.array_keys()) == sorted(NAMES)


def test_warp_stack_reports_the_levels_share_of_the_writing_time(tmp_path):
    """``levels_s`` is a part of ``write_s`` (same pass); without levels there is none."""
    src = zarr.create_array(str(tmp_path / "src.zarr"), shape=(2, 64, 80), chunks=(1, 64, 80), dtype="uint16")
    src[:] = np.arange(2 * 64 * 80, dtype=np.uint16).reshape(2, 64, 80)
    theta = torch.tensor([[[1.0, 0.01, 0.0], [-0.01, 1.0, 0.0]]], dtype=torch.float64)
    out = zarr.create_array(str(tmp_path / "o.zarr"), shape=(2, 60, 70), chunks=(1, 60, 70), dtype="uint16")
    level = zarr.create_array(str(tmp_path / "l.zarr"), shape=(2, 30, 35), chunks=(1, 30, 35), dtype="uint16")
    t = warp_stack(src, out, theta, [2, 62, 5, 75], "bicubic", levels=[level], num_workers=1)
    assert 0 < t.levels_s <= t.write_s
    assert np.array_equal(level[:], pyramid.downsample2(out[:]))
    assert warp_stack(src, out, theta, [2, 62, 5, 75], "bicubic", num_workers=1).levels_s is None
