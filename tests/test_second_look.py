"""Issue 36's smaller items, as a new user met them the second time: records that say what was fitted, ingest's next
step and its picking of slices, counts that say what they count, progress in a log file, the page at a laptop's
width, the help's gaps, and the path a viewer opens."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from sphero_lightning.commands.main import main
from sphero_lightning.core.synthetic import em_like_image, make_stack
from sphero_lightning.storage.stacks import write_zarr

OUT = "images/registered/50-4-4"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, str]:
    """A rigid fit of 6 slices (its store and what it printed), shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("fitted")
    root = tmp / "s.zarr"
    write_zarr(make_stack(em_like_image(256, seed=2), 6, (128, 128), seed=4).stack, root)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        main(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--model.transformation", "rigid",
              "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp / "logs")])
    return root, err.getvalue()


def test_the_record_says_which_family_was_fitted(fitted):
    """Item 4: a rigid fit recorded ``scaling: true, shear: true`` (the switches) and Lightning's ``_instantiator``."""
    root, _ = fitted
    params = zarr.open_array(str(root), path=OUT, mode="r").attrs["processing"][-2]["parameters"]
    assert params["transformation"] == "rigid" and params["scaling"] is False and params["shear"] is False
    assert not any(k.startswith("_") for k in params), sorted(params)


def test_scaling_and_shear_have_their_own_help_line():
    from sphero_lightning.commands.fit_help import short_help

    text = short_help().splitlines()
    scaling = text[text.index(next(ln for ln in text if ln.startswith("  --model.scaling"))) + 1]
    shear = text[text.index(next(ln for ln in text if ln.startswith("  --model.shear"))) + 1]
    assert scaling != shear and "scale" in scaling and "shear" in shear


def test_the_help_says_how_to_turn_things_off_and_the_run_says_its_threads(fitted):
    """Item 8: the short help names the progress bar, the logger and SPHERO_NUM_THREADS; the time line the threads."""
    from sphero_lightning.commands.fit_help import short_help

    text = short_help()
    assert "--trainer.enable_progress_bar false" in text and "--trainer.logger false" in text and "SPHERO_NUM_THREADS" in text
    _, err = fitted
    line = next(ln for ln in err.splitlines() if ln.startswith("sphero: time:"))
    assert " on 1 torch thread " in line or " torch threads (" in line, line


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


def test_the_progress_bar_says_what_it_counts_and_a_log_file_gets_lines(monkeypatch):
    """Item 6: the bar counted 29 pairs where the summary said 15 (pairs over one slice counted without saying); and
    written into a log file it was one line of carriage returns."""
    from sphero_lightning.storage import tasks
    from sphero_lightning.training.callbacks import PairProgressBar

    bar = PairProgressBar()
    bar.consecutive, bar.over, bar.bridges = 15, 14, 0
    assert bar._desc() == "registering pairs (15 consecutive + 14 over one slice or more)"
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)  # not a terminal
    line = tasks.progress_bar(29, bar._desc(), "pair")
    assert isinstance(line, tasks.LineProgress)
    line.every_s = 0.0
    line.update(10)
    line.close()
    out = buf.getvalue()
    assert "\r" not in out and out.count("\n") == 2 and "10/29 pairs (34 %)" in out, out


def test_the_page_shows_before_and_after_side_by_side_at_a_laptop_s_width(tmp_path):
    """Item 7: at a 1300 px window the before and after reslices (640 px wide each) stacked; now they sit side by side."""
    from test_visual_report import CHROMIUM, _browser

    sync_api = _browser()
    from sphero_lightning.report.visual import build_report

    root = tmp_path / "w.zarr"
    stack = make_stack(em_like_image(900, seed=3), 4, (96, 800), seed=1).stack
    write_zarr(stack, root)
    write_zarr(stack[:, 2:94, 3:797], root, array=OUT)
    out = zarr.open_array(str(root), path=OUT, mode="r+")
    out.attrs.update({"composed_transforms": [[[1, 0, 0], [0, 1, 0]]] * 3, "crop_box": [2, 94, 3, 797],
                      "inputs": ["images/50-4-4"], "spacing": [4, 4, 4], "registration_log": [
                          {"pair_index": i, "slice_indices": [i, i + 1], "status": "ok", "ncc_before": 0.5, "ncc_after": 0.9}
                          for i in range(3)]})
    page = tmp_path / "page.html"
    page.write_text(build_report(out, zarr.open_array(str(root), path="images/50-4-4", mode="r")).html)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            tab = browser.new_page(viewport={"width": 1300, "height": 900})
            tab.goto(page.resolve().as_uri(), wait_until="load")
            boxes = tab.evaluate("Object.fromEntries(Array.from(document.querySelectorAll('img[alt*=reslice]')).map(i => "
                                 "{const r = i.getBoundingClientRect(); return [i.alt, [r.left, r.top, r.width]]}))")
            viewer = tab.inner_text("#viewer-path")
        finally:
            browser.close()
    before, after = boxes["xz reslice before"], boxes["xz reslice after"]
    assert after[0] > before[0] + before[2] - 1 and abs(after[1] - before[1]) < 1, boxes  # same row, after to the right
    assert after[0] + after[2] <= 1300, boxes
    assert viewer.endswith("images/registered"), viewer


def test_the_store_lists_its_images_and_the_run_names_the_path_a_viewer_opens(fitted):
    """Item 9: ome-zarr's Reader found no image at the store's root. The last line names the group a viewer opens, and
    the root lists the images as OME-NGFF's bioformats2raw layout does (checked with the specification's models)."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader
    from ome_zarr_models.v05.bioformats2raw import BioFormats2RawAttrs

    root, err = fitted
    line = next(ln for ln in err.splitlines() if ln.startswith("sphero: wrote "))
    assert f"a viewer opens {root}/images/registered (OME-NGFF multiscales" in line, line
    top = zarr.open_group(str(root), mode="r")
    BioFormats2RawAttrs.model_validate(top.attrs["ome"])
    series = top["OME"].attrs["ome"]["series"]
    assert series == ["images/registered"], series  # write_zarr (the tests' helper) writes no OME-NGFF for the source
    for path in series:
        nodes = list(Reader(parse_url(str(root / path)))())
        assert nodes and nodes[0].load(Multiscales) is not None, path
