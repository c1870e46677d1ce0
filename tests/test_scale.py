"""Scale: output chunking and sharding, the parallel writer, the run's time breakdown."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from conftest import fit_argv, run_fit

from sphero_lightning.core.synthetic import make_stack
from sphero_lightning.errors import SpheroError
from sphero_lightning.storage.stacks import write_zarr
from sphero_lightning.storage.writing import output_layout
from sphero_lightning.training.writer import RegistrationWriter


def _fit(root, *extra) -> str:
    return run_fit(fit_argv(root, *extra, config=True, logs=root.parent / "logs", levels=3))


def test_sharded_tiled_parallel_output_equals_the_default(tmp_path, base_image):
    s = make_stack(base_image, 11, (160, 192), seed=5)
    roots = []
    for i, extra in enumerate(([], ["--output.chunks", "[4,64,64]", "--output.shards", "[8,128,128]",
                                    "--output.num_workers", "3"], ["--output.num_workers", "1"])):
        root = tmp_path / f"s{i}.zarr"
        write_zarr(s.stack, root)
        err = _fit(root, *extra)
        roots.append(root)
        # the time breakdown, one line
        line = next(ln for ln in err.splitlines() if ln.startswith("sphero: time:"))
        assert "fitting" in line and "waiting for data" in line and "writing" in line, line
    outs = [zarr.open_array(str(r), path="images/registered/50-4-4", mode="r") for r in roots]
    assert outs[0].chunks[0] == 1 and outs[0].shards is None
    assert outs[1].chunks == (4, 64, 64) and outs[1].shards == (8, 128, 128)
    ref = outs[0][:]
    assert ref.std() > 0
    for o in outs[1:]:
        assert o.shape == outs[0].shape
        np.testing.assert_array_equal(o[:], ref)


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
