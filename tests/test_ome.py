"""The output group is valid OME-NGFF 0.5 for ome-zarr-py's reader and the spec's own models (ome-zarr-models)."""

from __future__ import annotations

import numpy as np
import zarr
from conftest import fit

from sphero_lightning.core.synthetic import make_stack
from sphero_lightning.storage.stacks import write_zarr


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
