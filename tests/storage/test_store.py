"""storage/store.py: the stores a run reads and writes. Zarr v2 and zipped sources, a read-only source with
``--data.output_root``, the output lock, leftover temporary arrays, and the OME-NGFF metadata a viewer reads (ome-zarr-py's
``Reader`` and the specification's models)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import zarr

from sphero_lightning.core.synthetic import composed_error, make_stack
from sphero_lightning.storage.stacks import pixel_error_of_output, write_zarr
from tests.conftest import OUT, assert_one_line_error, fit, fit_argv, registered, run_cli, snapshot, sphero


def test_the_store_lists_its_images_and_the_run_names_the_path_a_viewer_opens(fitted_stack):
    """Item 9: ome-zarr's Reader found no image at the store's root. The last line names the group a viewer opens, and
    the root lists the images as OME-NGFF's bioformats2raw layout does (checked with the specification's models)."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader
    from ome_zarr_models.v05.bioformats2raw import BioFormats2RawAttrs

    root, err = fitted_stack.root, fitted_stack.err
    line = next(ln for ln in err.splitlines() if ln.startswith("sphero: wrote "))
    assert f"a viewer opens {root}/images/registered (OME-NGFF multiscales" in line, line
    top = zarr.open_group(str(root), mode="r")
    BioFormats2RawAttrs.model_validate(top.attrs["ome"])
    series = top["OME"].attrs["ome"]["series"]
    assert series == ["images/registered"], series  # write_zarr (the tests' helper) writes no OME-NGFF for the source
    for path in series:
        nodes = list(Reader(parse_url(str(root / path)))())
        assert nodes and nodes[0].load(Multiscales) is not None, path


def test_ome_zarr_reader_sees_every_registered_array_with_its_spacing(tmp_path, base_image):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader
    from ome_zarr_models.v05.image import Image

    s = make_stack(base_image, 6, (96, 96), seed=1)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    # the same stack at half the lateral resolution, registered into the same group: a second dataset
    half = s.stack.reshape(6, 48, 2, 48, 2).mean((2, 4)).astype(np.uint8)
    coarse = zarr.open_group(str(root), mode="a").create_array("images/50-8-8", shape=half.shape, dtype=half.dtype,
                                                                chunks=(1, 48, 48))
    coarse[:] = half
    coarse.attrs["spacing"] = [50, 8, 8]
    fit(root, "--pyramid.levels", "3")
    fit(root, "--pyramid.levels", "3", array="images/50-8-8")

    group = zarr.open_group(str(root), mode="r")["images/registered"]
    arrays = {name: group[name] for name in ("50-4-4", "50-8-8")}
    for arr in arrays.values():
        assert arr.metadata.dimension_names == ("z", "y", "x")

    nodes = list(Reader(parse_url(str(root / "images" / "registered")))())
    assert len(nodes) == 1, nodes
    node = nodes[0]
    assert any(isinstance(spec, Multiscales) for spec in node.specs)
    assert [a["name"] for a in node.metadata["axes"]] == ["z", "y", "x"]
    assert all(a["type"] == "space" and a["unit"] == "nanometer" for a in node.metadata["axes"])
    # finest first; the reader's transformations and data follow the datasets in that order
    transforms = node.metadata["coordinateTransformations"]
    assert len(transforms) == len(node.data) == 2
    for name, tf, data in zip(("50-4-4", "50-8-8"), transforms, node.data):
        arr = arrays[name]
        scale = next(t["scale"] for t in tf if t["type"] == "scale")
        assert scale == arr.attrs["spacing"] == [50.0, float(name[-1]), float(name[-1])]
        assert tuple(data.shape) == arr.shape
        assert np.array_equal(np.asarray(data), arr[:])
        up, _, left, _ = arr.attrs["crop_box"]
        shift = next((t["translation"] for t in tf if t["type"] == "translation"), [0.0, 0.0, 0.0])
        assert shift == [0.0, up * scale[1], left * scale[2]]

    # the specification's own models (pydantic) accept the group, dimension names included
    image = Image.from_zarr(group)
    ms = image.ome_attributes.multiscales[0]
    assert [d.path for d in ms.datasets] == ["50-4-4", "50-8-8"]


def test_zarr_v2_source_registers_end_to_end(tmp_path, base_image):
    s = make_stack(base_image, 5, (128, 128), seed=2)
    root = tmp_path / "v2.zarr"
    write_zarr(s.stack, root, truth=s.composed, zarr_format=2)
    labels = np.repeat((np.arange(128 * 128) // 700).reshape(1, 128, 128), 5, 0).astype(np.uint32)
    write_zarr(labels, root, array="labels/50-4-4", zarr_format=2)
    # what v2 cannot hold is refused before any fitting
    code, err = run_cli(fit_argv(root, "--output.chunks", "[1, 128, 128]", "--output.shards", "[2, 128, 128]",
                                   "--trainer.logger", "false"))
    assert_one_line_error(code, err, "Zarr v3", "--output.shards")
    assert not (root / "images" / "registered").exists()
    assert run_cli(fit_argv(root))[0] == 0
    out = zarr.open_array(str(root), path=OUT, mode="r")
    assert out.metadata.zarr_format == 2 and (root / OUT / ".zarray").exists()
    assert pixel_error_of_output(root, OUT) < 0.03
    ms = zarr.open_group(str(root), mode="r")["images/registered"].attrs["multiscales"]
    assert ms[0]["version"] == "0.4" and ms[0]["datasets"][0]["path"] == "50-4-4"
    assert run_cli(["apply", "--root", str(root), "--array", "labels/50-4-4", "--transforms", OUT, "--no-progress"])[0] == 0
    lab = zarr.open_array(str(root), path="labels/registered/50-4-4", mode="r")
    assert lab.metadata.zarr_format == 2 and lab.shape == out.shape and set(np.unique(lab[:])) <= set(np.unique(labels))
    assert run_cli(["export", "--root", str(root), "--transforms", OUT, "--tmats", str(tmp_path / "t.npy")])[0] == 0
    assert np.load(tmp_path / "t.npy").shape == (5, 3, 3)


def test_zipped_store_is_read_and_the_output_goes_to_a_directory_store(tmp_path, base_image):
    from zarr.storage import ZipStore

    s = make_stack(base_image, 4, (96, 96), seed=3)
    zipped = tmp_path / "s.zip"
    store = ZipStore(str(zipped), mode="w")
    arr = zarr.open_group(store, mode="w").create_array("images/50-4-4", shape=s.stack.shape, dtype=s.stack.dtype,
                                                        chunks=(1, 96, 96), attributes={"spacing": [50, 4, 4]})
    arr[:] = s.stack  # (a zip member is written once: metadata first, with its attributes)
    store.close()
    assert_one_line_error(*run_cli(fit_argv(zipped)), "is a file", "--data.output_root")
    code, err = run_cli(fit_argv(zipped, "--data.output_root", str(tmp_path / "out.zarr")))
    assert code == 0, err
    out = zarr.open_array(str(tmp_path / "out.zarr"), path=OUT, mode="r")
    assert float(composed_error(np.asarray(out.attrs["composed_transforms"]), s.composed, (96, 96)).mean()) < 0.05


def test_read_only_store_is_found_before_fitting_and_output_root_writes_elsewhere(tmp_path, base_image):
    s = make_stack(base_image, 4, (96, 96), seed=6)
    src = tmp_path / "ro.zarr"
    write_zarr(s.stack, src, truth=s.composed)
    before = snapshot(src)
    out_store = tmp_path / "out.zarr"
    if os.geteuid() == 0:
        # root writes through permission bits: mount the store read-only in a private mount namespace
        prefix = ["unshare", "-rm", "sh", "-c", f'mount --bind -o ro "{src}" "{src}" && exec "$0" "$@"']
    else:
        os.chmod(src, 0o555)
        for d in src.rglob("*"):
            if d.is_dir():
                os.chmod(d, 0o555)
        prefix = []
    r = sphero(*fit_argv(src, logs=tmp_path / "logs"), cwd=tmp_path, prefix=prefix)
    assert r.returncode == 2, r.stderr[-2000:]
    errs = [ln for ln in r.stderr.splitlines() if ": error: " in ln]
    assert len(errs) == 1 and "--data.output_root" in errs[0] and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "registering" not in r.stderr  # found before fitting
    r = sphero(*fit_argv(src, "--data.output_root", str(out_store), logs=tmp_path / "logs"), cwd=tmp_path, prefix=prefix)
    assert r.returncode == 0, r.stderr[-2000:]
    if os.geteuid() != 0:
        for d in [src, *src.rglob("*")]:
            if d.is_dir():
                os.chmod(d, 0o755)
    assert snapshot(src) == before  # the source untouched
    out = zarr.open_array(str(out_store), path=OUT, mode="r")
    assert out.attrs["source_root"] == str(src.resolve())
    assert float(composed_error(np.asarray(out.attrs["composed_transforms"]), s.composed, (96, 96)).mean()) < 0.05
    # the output store's registration still finds its source (export reads the source's slice shape)
    assert run_cli(["export", "--root", str(out_store), "--transforms", OUT, "--csv", str(tmp_path / "t.csv")])[0] == 0


def test_two_runs_on_one_output_do_not_race(tmp_path, base_image):
    s = make_stack(base_image, 3, (64, 64), seed=1)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    lock = root / "images" / "registered" / "tmp-50-4-4-journal" / "lock"
    lock.parent.mkdir(parents=True)
    # another process holds the output (what a running `sphero fit` does)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, json, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'h', 'started': 't'}).encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = sphero(*fit_argv(root), cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"being written by another sphero run (pid {holder.pid}" in r.stderr
    finally:
        holder.kill()
        holder.wait()
    code, err = run_cli(fit_argv(root, logs=tmp_path / "logs"))  # the lock dies with its holder
    assert code == 0, err[-2000:]
    assert not lock.exists()


def test_leftover_partial_output_is_replaced(tmp_path, base_image):
    """A temporary array left by a run killed while writing does not stop or corrupt the next run."""
    s = make_stack(base_image, 4, (96, 96), seed=1)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root, truth=s.composed)
    g = zarr.open_group(str(root), mode="a").require_group("images/registered")
    junk = g.create_array("tmp-50-4-4-partial", shape=(2, 5, 5), dtype="uint8", fill_value=0)
    junk[:] = 99
    fit(root)
    assert registered(root).shape[0] == 4
    assert pixel_error_of_output(root, OUT) < 0.05
    assert list(zarr.open_group(str(root), mode="r")["images/registered"].array_keys()) == ["50-4-4"]
