"""The Python API: the README's example runs, and register_stack gives sphero fit's transforms."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from sphero_lightning import Registration, register_stack, warp_stack
from sphero_lightning.core.synthetic import em_like_image, make_stack
from sphero_lightning.errors import SpheroError
from sphero_lightning.storage.stacks import write_zarr
from tests.conftest import fit

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    section = README.read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    scope: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), scope)  # noqa: S102 - the README example is the test
    reg, aligned, stack = scope["reg"], scope["aligned"], scope["stack"]
    assert isinstance(reg, Registration) and reg.tmats.shape == (8, 3, 3)
    y0, y1, x0, x1 = reg.crop_box
    assert aligned.shape == (8, y1 - y0, x1 - x0) and aligned.dtype == stack.dtype
    assert all(e["status"] == "ok" for e in reg.log)
    assert "sphero: wrote" not in capsys.readouterr().err  # the temporary store is not reported


def test_api_equals_sphero_fit(tmp_path):
    s = make_stack(em_like_image(256, seed=5), 6, (160, 144), seed=8)
    reg = register_stack(s.stack, transformation="rigid", options={"pyramid.levels": 3})
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    fit(root, "--model.transformation", "rigid", "--pyramid.levels", "3")
    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    for ours, theirs in ((reg.pairwise, out.attrs["pairwise_transforms"]), (reg.composed, out.attrs["composed_transforms"])):
        d = np.abs(np.asarray(ours) - np.asarray(theirs)).max() * 160 / 2  # normalized -> pixels
        assert d < 1e-6, d
    assert reg.crop_box == list(out.attrs["crop_box"])
    aligned = warp_stack(s.stack, reg)
    assert np.array_equal(aligned, np.asarray(out[:]))  # the same writer: the same bytes
    assert reg.settings["transformation"] == "rigid" and reg.settings["loss_interpolation"] == "bspline"


def test_api_errors_are_spheroerrors_not_exits():
    stack = np.zeros((1, 64, 64), np.uint8)
    with pytest.raises(SpheroError, match="at least 2"):
        register_stack(stack)
    good = make_stack(em_like_image(192, seed=1), 3, (64, 64), seed=1).stack
    with pytest.raises(SpheroError, match="model.loss"):
        register_stack(good, options={"model.loss": "nope"})
    with pytest.raises(SpheroError, match=r"pass transformation='rigid'"):  # was a TypeError from the module's constructor
        register_stack(good, options={"model.transformation": "rigid"})
    with pytest.raises(SpheroError, match="2D|3D"):
        register_stack(good[0])


def test_trainer_options_are_checked_as_sphero_fit_checks_them_and_callbacks_join_the_fits_own():
    import lightning as L

    good = make_stack(em_like_image(192, seed=1), 3, (64, 64), seed=1).stack
    with pytest.raises(SpheroError, match=r"'trainer.max_epochs' = 3 would change the registration .*use data.max_pairs"):
        register_stack(good, options={"trainer.max_epochs": 3})
    with pytest.raises(SpheroError, match="register_stack writes nothing to disk"):
        register_stack(good, options={"trainer.logger": True})

    class Blocks(L.Callback):
        ends = 0

        def on_train_epoch_end(self, trainer, pl_module):
            Blocks.ends += 1

    # a callback of the caller's used to replace the fit's own (the pyramid schedule among them): the fit never ended
    reg = register_stack(good, options={"trainer.callbacks": [Blocks()]})
    assert Blocks.ends >= 1
    np.testing.assert_array_equal(reg.composed, register_stack(good).composed)


def test_warp_stack_of_a_registration_of_the_first_slices_says_which_to_pass():
    good = make_stack(em_like_image(192, seed=1), 3, (64, 64), seed=1).stack
    first = register_stack(good, options={"data.max_pairs": 1})  # the first 2 slices
    with pytest.raises(SpheroError, match=r"the first 2 were registered: pass stack\[:2\]"):
        warp_stack(good, first)
    assert warp_stack(good[:2], first).shape[0] == 2


def test_register_stack_writes_nothing_and_needs_no_command_line(tmp_path):
    """Issue 27 must-show 1: in process and in memory: no file in the temporary folder or the working directory (the
    machine-wide core-sharing slots aside, and torch's own compile cache folder, which ``import lightning`` creates
    empty in any program), jsonargparse never imported, and the result of a second call identical."""
    code = """
import os, sys, tempfile
import numpy as np
from sphero_lightning.core.synthetic import em_like_image, make_stack
from sphero_lightning import register_stack
s = make_stack(em_like_image(256, seed=1), 4, (96, 96), seed=2)
a = register_stack(s.stack)
b = register_stack(s.stack)
print(sorted(os.listdir(".")), sorted(p for p in os.listdir(tempfile.gettempdir()) if not p.startswith(("sphero-cores", "torchinductor_"))))
print("jsonargparse" in sys.modules, float(np.abs(a.composed - b.composed).max()))
"""
    (tmp_path / "work").mkdir()
    (tmp_path / "tmp").mkdir()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path / "work",
                       env={**os.environ, "TMPDIR": str(tmp_path / "tmp")}, check=False, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    listing, state = r.stdout.strip().splitlines()[-2:]
    assert listing == "[] []", listing
    assert state.startswith("False ") and float(state.split()[1]) == 0.0, state
