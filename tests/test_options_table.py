"""docs/options.md names, for every option of every command's ``--help``, the test that guards it: an option added
without a row, or a row naming a test that does not exist, fails here. Also the two options no other test needed."""

from __future__ import annotations

import ast
import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
import zarr

from sphero_lightning.commands.main import main
from sphero_lightning.core.synthetic import make_stack
from sphero_lightning.storage.stacks import write_zarr

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "docs" / "options.md"
COMMANDS = ("fit", "ingest", "apply", "export", "report", "demo")


def _help(command: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as exc:
        main([command, "--help-all" if command == "fit" else "--help"])
    assert exc.value.code == 0
    return out.getvalue()


def _options(command: str) -> set[str]:
    found = set(re.findall(r"^\s+(--[a-z][a-z_-]*(?:\.[a-z_]+)*)", _help(command), re.MULTILINE))
    # group switches (--data, --model: a whole group as one value) and jsonargparse's per-class help are not options
    groups = {o for o in found if any(other.startswith(o + ".") for other in found)}
    return {o for o in found if not o.endswith(".help") and o not in groups and o != "--help"}


def _rows(command: str) -> str:
    """The part of the table for ``command``: for fit everything before the other commands; for the others the rows
    that name it (`sphero apply --root`, `--array`: the command once, then its other options)."""
    text = TABLE.read_text()
    if command == "fit":
        return text.split("## The other commands", 1)[0]
    return "\n".join(ln for ln in text.splitlines() if f"`sphero {command} " in ln)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_a_row(command):
    rows = _rows(command)
    missing = sorted(o for o in _options(command) if f"`{o}`" not in rows and f"`sphero {command} {o}`" not in rows)
    assert not missing, f"options of sphero {command} without a row in docs/options.md: {missing}"


def test_every_named_test_exists():
    named = set(re.findall(r"`tests/(test_\w+\.py)::(test_\w+)`", TABLE.read_text()))
    assert len(named) > 40
    defined: dict[str, set[str]] = {}
    for file in {f for f, _ in named}:
        tree = ast.parse((REPO / "tests" / file).read_text())
        defined[file] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    absent = sorted(f"{f}::{t}" for f, t in named if t not in defined[f])
    assert not absent, f"docs/options.md names tests that do not exist: {absent}"


def test_print_config_prints_the_settings_and_fits_nothing(tmp_path, base_image):
    root = tmp_path / "s.zarr"
    write_zarr(make_stack(base_image, 3, (64, 64), seed=1).stack, root)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as exc:
        main(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--model.loss", "mae", "--print_config"])
    assert exc.value.code == 0
    text = out.getvalue()
    assert "loss: mae" in text and "transformation: rigid" in text and f"root: {root}" in text, text[:2000]
    assert "registered" not in zarr.open_group(str(root), mode="r")["images"]


def test_min_contrast_sets_what_counts_as_blank(tmp_path, base_image):
    """A slice of faint contrast (about 3 % of the others' standard deviation): blank, and bridged over, at the
    default threshold of 5 %; an ordinary slice at a threshold of 1 %."""
    s = make_stack(base_image, 5, (96, 96), seed=2)
    stack = s.stack.astype(np.float64)
    stack[2] = stack[2].mean() + (stack[2] - stack[2].mean()) * 0.03
    stack = np.clip(np.rint(stack), 0, 255).astype(np.uint8)
    statuses = {}
    for threshold in ("0.05", "0.01"):
        root = tmp_path / f"t{threshold}.zarr"
        write_zarr(stack, root)
        with contextlib.redirect_stderr(io.StringIO()):
            main(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--data.min_contrast", threshold,
                  "--pyramid.levels", "3", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"])
        log = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r").attrs["registration_log"]
        statuses[threshold] = [e["status"] for e in log]
    assert statuses["0.05"][1] == statuses["0.05"][2] == "damaged_slice", statuses
    assert "damaged_slice" not in statuses["0.01"], statuses


def test_every_range_is_checked_once_the_same_way_early_and_by_its_class():
    """options.BOUNDS is the one home of the numeric options' ranges: the early check of the command line and the
    class that takes the option (for Python callers and config files) reject the same value with the same line."""
    from sphero_lightning.commands.precheck import check_option_values
    from sphero_lightning.errors import SpheroError
    from sphero_lightning.options import BOUNDS, GROUPS, fit_options
    from sphero_lightning.training.callbacks import PairEarlyStopping, PyramidSchedule
    from sphero_lightning.training.data import ZarrPairDataModule
    from sphero_lightning.training.module import RegistrationModule
    from sphero_lightning.training.volume import VolumeSolve
    from sphero_lightning.training.writer import RegistrationWriter

    classes = {"data": lambda **kw: ZarrPairDataModule(root="x.zarr", array="a", **kw), "model": RegistrationModule,
               "solve": VolumeSolve, "pyramid": PyramidSchedule, "early_stopping": PairEarlyStopping,
               "output": RegistrationWriter}
    assert set(classes) == {g for g, _, _ in GROUPS}
    assert set(BOUNDS) <= set(fit_options())
    for key, bound in BOUNDS.items():
        group, name = key.split(".")
        bad = bound.high if bound.high is not None else (bound.low if bound.open_low else bound.low - 1)
        bad = int(bad) if fit_options()[key].kind == "int" else float(bad)
        expect = bound.message(key, bad)
        with pytest.raises(SpheroError) as early:
            check_option_values({f"--{key}": str(bad)})
        assert str(early.value) == expect
        with pytest.raises(SpheroError) as late:
            classes[group](**{name: bad})
        assert str(late.value) == expect, key


def test_every_default_lies_in_its_range():
    """The one home's ranges and the classes' defaults (what configs/reg.yaml writes out) agree."""
    from sphero_lightning.options import BOUNDS, REQUIRED, fit_options

    for key, bound in BOUNDS.items():
        default = fit_options()[key].default
        assert default is REQUIRED or bound.holds(default), (key, default)
