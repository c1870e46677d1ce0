"""commands/report.py: ``sphero report`` writes the alignment page on demand, without torch or Lightning."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import pytest
import zarr

from sphero_lightning.commands.main import main
from sphero_lightning.core.synthetic import make_stack
from sphero_lightning.storage.stacks import write_zarr
from tests.conftest import OUT


def test_report_source_options_point_at_another_source(fitted_stack, tmp_path):
    """Break caught: --source-root/--source-array ignored (the page would show the registration's own source)."""
    root, stack = fitted_stack.root, fitted_stack.stack
    copy = tmp_path / "copy.zarr"
    write_zarr(255 - stack, copy)  # another "before": the source inverted
    pages = {}
    with contextlib.redirect_stderr(io.StringIO()):
        for name, extra in (("own", []), ("copy", ["--source-root", str(copy), "--source-array", "images/50-4-4"])):
            pages[name] = tmp_path / f"{name}.html"
            main(["report", "--root", str(root), "--array", OUT, "--out", str(pages[name]), *extra])
        with pytest.raises(SystemExit):  # a source array that is not there: one line, exit 2
            main(["report", "--root", str(root), "--array", OUT, "--source-root", str(copy), "--source-array", "nope",
                  "--out", str(tmp_path / "x.html")])
    own, other = pages["own"].read_text(), pages["copy"].read_text()
    assert len(own) > 10_000 and len(other) > 10_000 and own != other


def test_report_command_imports_neither_torch_nor_lightning(tmp_path, base_image):
    s = make_stack(base_image, 3, (64, 64), seed=1)
    root = tmp_path / "r.zarr"
    write_zarr(s.stack, root)
    write_zarr(s.stack[:, 2:62, 1:61], root, array=OUT)
    out = zarr.open_array(str(root), path=OUT, mode="r+")
    out.attrs.update({"composed_transforms": [[[1, 0, 0], [0, 1, 0]]] * 2, "crop_box": [2, 62, 1, 61],
                      "inputs": ["images/50-4-4"], "registration_log": [
                          {"pair_index": i, "slice_indices": [i, i + 1], "status": "ok", "ncc_before": 0.5, "ncc_after": 0.9}
                          for i in range(2)]})
    code = ("import sys\nfrom sphero_lightning.commands.main import main\n"
            f"main(['report', '--root', {str(root)!r}, '--array', {OUT!r}, '--out', {str(tmp_path / 'p.html')!r}])\n"
            "print(' '.join(sorted(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    mods = set(r.stdout.split())
    assert "torch" not in mods and "lightning" not in mods
    assert (tmp_path / "p.html").stat().st_size > 1000
