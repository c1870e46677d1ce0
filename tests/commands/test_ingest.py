"""commands/ingest.py: ``sphero ingest`` (a TIFF, a folder of TIFFs or PNGs) into OME-Zarr, and its user errors."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from sphero_lightning.commands.ingest import ingest
from sphero_lightning.commands.main import main
from sphero_lightning.core.synthetic import em_like_image, make_stack
from sphero_lightning.errors import SpheroError
from tests.conftest import assert_one_line_error, run_cli


@pytest.fixture()
def stack(base_image):
    return make_stack(base_image, 6, (128, 160), seed=7)


def test_ingest_reads_a_folder_of_png_slices(tmp_path, base_image):
    from PIL import Image

    s = make_stack(base_image, 3, (64, 80), seed=1)
    for name, stack, mode in (("grey8", s.stack, "L"), ("grey16", s.stack.astype(np.uint16) * 257, "I;16")):
        folder = tmp_path / name
        folder.mkdir()
        for i, sl in enumerate(stack):
            im = Image.fromarray(sl) if mode == "L" else Image.frombytes("I;16", sl.shape[::-1], sl.astype("<u2").tobytes())
            if name == "grey8" and i == 1:
                im = im.convert("LA")  # grey with an alpha channel (as the EPFL FIB-SEM PNGs)
            im.save(folder / f"s{i * 5}.png")
        root = tmp_path / f"{name}.zarr"
        assert run_cli(["ingest", str(folder), "--root", str(root), "--spacing", "5", "5", "5", "--no-progress"])[0] == 0
        arr = zarr.open_array(str(root), path="images/5-5-5", mode="r")
        assert arr.dtype == stack.dtype and np.array_equal(arr[:], stack)
    colour = tmp_path / "colour"
    colour.mkdir()
    rgb = np.stack([s.stack[0], s.stack[0] // 2, s.stack[0]], -1)
    for i in range(2):
        Image.fromarray(rgb).save(colour / f"c{i}.png")
    assert_one_line_error(*run_cli(["ingest", str(colour), "--root", str(tmp_path / "c.zarr"), "--spacing", "5", "5", "5",
                                    "--no-progress"]), "colour image")


def test_ingest_writes_ome_metadata_viewers_find(tmp_path, base_image):
    import tifffile

    s = make_stack(base_image, 3, (64, 64), seed=1)
    tifffile.imwrite(tmp_path / "s.tif", s.stack, photometric="minisblack")
    for fmt, key in ((3, "ome"), (2, "multiscales")):
        root = tmp_path / f"s{fmt}.zarr"
        assert run_cli(["ingest", str(tmp_path / "s.tif"), "--root", str(root), "--spacing", "50", "4", "4",
                        "--zarr-format", str(fmt), "--no-progress"])[0] == 0
        g = zarr.open_group(str(root), mode="r")
        assert g.metadata.zarr_format == fmt
        meta = g["images"].attrs[key]
        ms = meta["multiscales"][0] if fmt == 3 else meta[0]
        assert ms["datasets"][0]["path"] == "50-4-4"
        assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [50.0, 4.0, 4.0]
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    nodes = list(Reader(parse_url(str(tmp_path / "s3.zarr" / "images")))())
    assert any(isinstance(spec, Multiscales) for spec in nodes[0].specs)


def test_ingest_folder_in_natural_order(tmp_path, stack):
    folder = tmp_path / "slices"
    folder.mkdir()
    for i, im in enumerate(stack.stack):
        tifffile.imwrite(folder / f"s{i + 1}.tif", im)  # s1 .. s6: plain sorting would put s10 before s2 on longer stacks
    tifffile.imwrite(folder / "s10.tif", stack.stack[0])
    root = tmp_path / "f.zarr"
    code, err = run_cli(["ingest", str(folder), "--root", str(root), "--spacing", "30", "5", "5", "--no-progress"])
    assert code == 0, err
    arr = zarr.open_array(str(root), path="images/30-5-5", mode="r")
    assert arr.shape == (7, 128, 160)
    assert np.array_equal(arr[:6], stack.stack) and np.array_equal(arr[6], stack.stack[0])


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("mixed", "every slice must have the same size"),
    ("exists", "already exists"),
])
def test_ingest_user_errors(tmp_path, stack, case, message):
    src = tmp_path / "slices"
    src.mkdir()
    for i, im in enumerate(stack.stack[:3]):
        tifffile.imwrite(src / f"s{i}.tif", im)
    root = tmp_path / "e.zarr"
    if case == "missing":
        src = tmp_path / "nope"
    elif case == "mixed":
        tifffile.imwrite(src / "s9.tif", stack.stack[0][:64])
    elif case == "exists":
        assert run_cli(["ingest", str(src), "--root", str(root), "--spacing", "50", "4", "4", "--no-progress"])[0] == 0
    code, err = run_cli(["ingest", str(src), "--root", str(root), "--spacing", "50", "4", "4", "--no-progress"])
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], err


def test_ingest_chunks_and_overwrite(tmp_path):
    """Breaks caught: --chunks ignored, an existing array replaced without --overwrite."""
    stack = np.stack([em_like_image(64, seed=k)[:60, :50] for k in range(3)])
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    path = ingest(tmp_path / "s.tif", tmp_path / "i.zarr", [50, 4, 4], chunks=(32, 16), progress=False)
    arr = zarr.open_array(str(tmp_path / "i.zarr"), path=path)
    assert tuple(arr.chunks) == (1, 32, 16)
    np.testing.assert_array_equal(arr[:], stack)
    with pytest.raises(SpheroError, match="--overwrite"):
        ingest(tmp_path / "s.tif", tmp_path / "i.zarr", [50, 4, 4], progress=False)
    tifffile.imwrite(tmp_path / "t.tif", stack[::-1], photometric="minisblack")
    ingest(tmp_path / "t.tif", tmp_path / "i.zarr", [50, 4, 4], overwrite=True, progress=False)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "i.zarr"), path=path)[:], stack[::-1])


def test_ingest_suggests_apply_for_labels_and_picks_slices_with_include(tmp_path, capsys):
    """Item 5: ingesting labels suggested ``sphero fit``; a folder with other files beside the slices was refused."""
    from PIL import Image

    folder = tmp_path / "slices"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(np.full((32, 32), 10 * k, np.uint8)).save(folder / f"slice_{k}.png")
        colour = (np.arange(3 * 16 * 16) % 250).reshape(16, 16, 3).astype(np.uint8)  # a prediction beside each slice
        Image.fromarray(colour).save(folder / f"slice_{k}_predict.png")
    root = tmp_path / "s.zarr"
    with pytest.raises(SystemExit) as stop:
        main(["ingest", str(folder), "--root", str(root), "--spacing", "50", "4", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--include" in err, err
    main(["ingest", str(folder), "--root", str(root), "--spacing", "50", "4", "4", "--no-progress", "--include", "slice_?.png"])
    err = capsys.readouterr().err
    assert zarr.open_array(str(root), path="images/50-4-4", mode="r").shape == (3, 32, 32)
    assert "next: sphero fit" in err
    main(["ingest", str(folder), "--root", str(root), "--spacing", "50", "4", "4", "--no-progress", "--include", "slice_?.png",
          "--array", "labels/50-4-4"])
    err = capsys.readouterr().err
    assert "then sphero apply --root" in err and "--array labels/50-4-4 --transforms images/registered/50-4-4" in err, err
