"""report/visual.py: the alignment report (issue 16). ``sphero fit`` writes one self-contained HTML page beside its logs
(reslices before and after, straightness, curves along the stack, flagged pairs, settings); the page opens in a real
headless browser (Debian's chromium driven by playwright) with every picture loaded, no console error and no request
but ``data:`` URIs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from sphero_lightning.commands.main import main
from sphero_lightning.core.synthetic import em_like_image, make_stack, random_transforms, render
from sphero_lightning.report.reslice import intensity_window, read_reslice, read_reslices, row_steps, straightness
from sphero_lightning.report.visual import build_report
from sphero_lightning.storage.stacks import write_zarr
from tests.conftest import ISBI_PATH, OUT

CHROMIUM = "/usr/bin/chromium"


def _fit(capsys: pytest.CaptureFixture, root: Path, logs: Path, *extra: str) -> Path:
    """``sphero fit`` in-process; returns the report page it printed."""
    main(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--trainer.accelerator", "cpu",
          "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(logs), *extra])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("sphero: report ")]
    assert len(lines) == 1, err[-3000:]
    page = Path(lines[0].removeprefix("sphero: report "))
    assert page.is_file() and page.parent.parent.parent == logs, page  # logs/sphero/version_N/alignment-....html
    return page


def _browser():
    """Skip (with how to fix it) where no system chromium or no playwright is installed; CI has both (.ci/run)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no system browser at {CHROMIUM}: apt-get install chromium (as .ci/run does) to open the report")
    return pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")


def open_in_browser(page_path: Path) -> dict:
    """Load the page in headless chromium: every picture, console errors, requests and the straightness cells."""
    sync_api = _browser()
    url = page_path.resolve().as_uri()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            requests: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url, wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight,"
                                   " i.src.slice(0, 26)])")
            cells = {f"{axis}-{tag}": float(page.inner_text(f"#straightness-{axis}-{tag}"))
                     for axis in ("xz", "yz") for tag in ("before", "after")}
            headings = page.evaluate("Array.from(document.querySelectorAll('h2, h3')).map(h => h.textContent)")
        finally:
            browser.close()
    return {"url": url, "errors": errors, "requests": requests, "images": images, "cells": cells, "headings": headings}


def _check_page(page_path: Path, min_images: int) -> dict:
    text = page_path.read_text()
    assert "<script" not in text and "http://" not in text and "https://" not in text  # nothing to fetch, nothing to run
    seen = open_in_browser(page_path)
    assert not seen["errors"], seen["errors"]
    assert all(u == seen["url"] or u.startswith("data:") for u in seen["requests"]), seen["requests"]
    assert len(seen["images"]) >= min_images, seen["images"]
    for alt, complete, width, height, src in seen["images"]:
        assert complete and width > 0 and height > 0, (alt, complete, width, height)
        assert src.startswith(("data:image/png;base64", "data:image/svg+xml;base64")), (alt, src)
    cells = seen["cells"]
    assert cells["xz-after"] < cells["xz-before"] and cells["yz-after"] < cells["yz-before"], cells
    return seen


def test_fit_writes_a_page_that_opens_and_shows_a_straighter_stack(tmp_path, base_image, capsys):
    s = make_stack(base_image, 8, (160, 160), seed=2)
    stack = s.stack.copy()
    stack[5] = 120  # a damaged (constant) slice: left out, bridged over, marked
    root = tmp_path / "s.zarr"
    write_zarr(stack, root)
    page = _fit(capsys, root, tmp_path / "logs")
    seen = _check_page(page, min_images=4 + 2 + 2 * 3)  # 4 reslices, straightness and curves, 3 pairs before/after
    assert "Pairs" in seen["headings"]  # nothing flagged: the first, middle and last pairs

    out = zarr.open_array(str(root), path=OUT, mode="r")
    src = zarr.open_array(str(root), path="images/50-4-4", mode="r")
    report = build_report(out, src)
    for axis, (before, after) in report.straightness.items():
        assert after < 0.5 * before, (axis, before, after)  # measurably straighter, not by a hair
        assert abs(seen["cells"][f"{axis}-before"] - before) < 1e-4 and abs(seen["cells"][f"{axis}-after"] - after) < 1e-4
    print(f"demo stack straightness before -> after: {report.straightness}")
    # the reslice reads the row band the output's crop maps to: after = output row y, before = source row y + up
    up, _, left, right = out.attrs["crop_box"]
    r = read_reslice(out, src, out.attrs["crop_box"], "xz", 7)
    assert np.array_equal(r.before, src[:, 7 + up, left:right].astype(np.float32)) and np.array_equal(r.after, out[:, 7, :])
    # all bands of one pass over each array (blocks of 3 slices here) equal the band-by-band reads
    wanted = [("xz", 7), ("yz", 11), ("xz", 0)]
    one_pass = read_reslices(out, src, out.attrs["crop_box"], wanted, block_bytes=3 * int(np.prod(src.shape[1:])))
    for got, (axis, p) in zip(one_pass, wanted, strict=True):
        ref = read_reslice(out, src, out.attrs["crop_box"], axis, p)
        assert (got.axis, got.position, got.source_position) == (ref.axis, ref.position, ref.source_position)
        assert np.array_equal(got.before, ref.before) and np.array_equal(got.after, ref.after)
    steps = row_steps(r.before, intensity_window(r.before), skip=[5])
    assert np.isnan(steps[4]) and np.isnan(steps[5]) and np.isfinite(straightness(steps))

    # TensorBoard has the same middle reslices beside the pair overlays
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(page.parent), size_guidance={"images": 0})
    acc.Reload()
    assert {"reslices/xz_before", "reslices/xz_after", "reslices/yz_before", "reslices/yz_after"} <= set(acc.Tags()["images"])

    # on demand, with a chosen row and column, and with a flagged pair
    attrs = zarr.open_array(str(root), path=OUT, mode="r+").attrs
    log = list(attrs["registration_log"])
    log[2] = {**log[2], "qc": "outlier", "qc_z": 9.9}
    attrs["registration_log"] = log
    on_demand = tmp_path / "page.html"
    main(["report", "--root", str(root), "--array", OUT, "--position-y", "20", "--position-x", "30", "--out", str(on_demand)])
    err = capsys.readouterr().err
    assert f"sphero: report {on_demand}" in err, err
    seen = _check_page(on_demand, min_images=8 + 2 + 2)
    assert "Flagged pairs (1)" in seen["headings"] and any("slices 2 -> 3: QC outlier" in h for h in seen["headings"])

    # bad input: one line naming the problem and the fix, exit status 2
    for argv, needle in ((["--array", "images/nope"], "'images/nope' not found"),
                         (["--array", "images/50-4-4"], "not a sphero registration output"),
                         (["--array", OUT, "--position-y", "9999"], "--position-y 9999 is outside")):
        with pytest.raises(SystemExit) as stop:
            main(["report", "--root", str(root), *argv, "--out", str(tmp_path / "bad.html")])
        errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert stop.value.code == 2 and len(errors) == 1 and errors[0].startswith("sphero report: error: ") and needle in errors[0], errors
    assert not (tmp_path / "bad.html").exists()


def test_real_isbi_sections(tmp_path, capsys):
    """Six real ISBI sections (256 x 256 cut from the middle), each moved by a random rigid transform."""
    if not ISBI_PATH.exists():
        pytest.skip(f"real data not available: {ISBI_PATH} is absent (CI has ../shared/data)")
    _browser()
    import tifffile

    sections = np.asarray(tifffile.imread(str(ISBI_PATH), key=range(6)))[:, 128:448, 128:448].astype(np.float64)
    tf = random_transforms(6, np.random.default_rng(4), 6.0, 1.0)
    moved = np.stack([render(sections[k], tf[k:k + 1], (256, 256), oversample=1)[0] for k in range(6)])
    root = tmp_path / "isbi.zarr"
    write_zarr(np.clip(np.rint(moved), 0, 255).astype(np.uint8), root)
    page = _fit(capsys, root, tmp_path / "logs", "--model.transformation", "rigid")
    seen = _check_page(page, min_images=4 + 2 + 2 * 3)
    print(f"ISBI straightness (page): {seen['cells']}")
    shutil.rmtree(root)


def test_a_short_stack_s_reslices_are_drawn_tall_enough_to_see(tmp_path, capsys):
    """Issue 29: 8 slices at isotropic spacing made 8 px slivers; they are drawn at least 96 px tall, and say so."""
    import re

    from sphero_lightning.core.synthetic import em_like_image

    s = make_stack(em_like_image(256, seed=2), 8, (96, 96), seed=1)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root, spacing=(4, 4, 4))
    page = _fit(capsys, root, tmp_path / "logs", "--pyramid.levels", "3").read_text(encoding="utf-8")
    heights = [int(h) for h in re.findall(r'height="(\d+)" alt="[xy]z reslice', page)]
    assert len(heights) >= 4 and min(heights) >= 96, heights
    assert "taller than its true extent (a short stack)" in page


def test_every_line_the_run_says_about_the_data_is_on_its_page(tmp_path, capsys):
    """Issue 35: the static-pattern line, the damaged and unregistered slices and the QC outliers appeared only in the
    terminal. Every line of a run about the data or the result is in the page's warning box (opened in the browser),
    with links to the slices it names, each marked beside the reslices."""
    sync_api = _browser()
    from sphero_lightning.core.synthetic import em_like_image

    shape = (192, 192)
    s = make_stack(em_like_image(320, seed=5).astype(np.float64), 12, shape, max_shift=5, max_rot_deg=1.0, seed=6)
    stack = s.stack.copy()
    stack[6] = make_stack(em_like_image(320, seed=9).astype(np.float64), 1, shape, seed=3).stack[0]  # foreign
    stack[:, :16] = 0  # a band fixed in every slice
    stack[3] = 90  # damaged (constant)
    root = tmp_path / "s.zarr"
    write_zarr(stack, root)
    main(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--trainer.accelerator", "cpu",
          "--model.transformation", "rigid", "--trainer.enable_progress_bar", "false",
          "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")])
    err = capsys.readouterr().err
    said = [ln.removeprefix("sphero: ") for ln in err.splitlines()
            if ln.startswith("sphero: ") and ("warning" in ln or "left out" in ln or "QC:" in ln or "damaged" in ln
                                               or "stand in for" in ln)]
    assert any("left out of the loss" in ln for ln in said) and any("damaged slice" in ln for ln in said), err
    assert any("no pair agrees with" in ln for ln in said), err
    page = Path(next(ln for ln in err.splitlines() if ln.startswith("sphero: report ")).removeprefix("sphero: report "))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            tab = browser.new_page()
            tab.goto(page.resolve().as_uri(), wait_until="load")
            box = tab.inner_text("#warnings")
            links = tab.evaluate("Array.from(document.querySelectorAll('#warnings a')).map(a => a.getAttribute('href'))")
            marks = tab.evaluate("Array.from(document.querySelectorAll('a.mark[id]')).map(a => a.id)")
        finally:
            browser.close()
    for line in said:
        assert line in box, (line, box)
    assert "#mark-xz-after-6" in links and "#mark-xz-after-3" in links, links
    assert all(href.removeprefix("#") in marks for href in links), (links, marks)


def test_the_page_shows_before_and_after_side_by_side_at_a_laptop_s_width(tmp_path):
    """Item 7: at a 1300 px window the before and after reslices (640 px wide each) stacked; now they sit side by side."""
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
