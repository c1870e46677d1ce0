"""sphero_lightning/options.py: one home for every option. configs/reg.yaml agrees with the constructors' defaults,
the help lists every choice, docs/options.md names a guarding test for every option of every command's ``--help``,
and every numeric range is checked once, the same way early and by its class."""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import re
from pathlib import Path

import pytest
import yaml

from sphero_lightning.commands.main import main
from sphero_lightning.training.callbacks import PairEarlyStopping, PyramidSchedule
from sphero_lightning.training.data import ZarrPairDataModule
from sphero_lightning.training.module import RegistrationModule
from sphero_lightning.training.volume import VolumeSolve
from sphero_lightning.training.writer import RegistrationWriter
from tests.conftest import CONFIG, REPO


def _defaults(cls):
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if p.default is not inspect.Parameter.empty}


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


def test_config_values_equal_constructor_defaults():
    cfg = yaml.safe_load(Path(CONFIG).read_text())
    groups = {"model": RegistrationModule, "data": ZarrPairDataModule, "pyramid": PyramidSchedule,
              "early_stopping": PairEarlyStopping, "output": RegistrationWriter, "solve": VolumeSolve}
    for key, cls in groups.items():
        defaults = _defaults(cls)
        for name, value in cfg[key].items():
            if name in ("root", "array"):
                assert value is None  # required, given on the command line
                continue
            assert name in defaults, f"{key}.{name} is not a parameter of {cls.__name__}"
            expect = defaults[name]
            if expect is None and value == {}:
                continue  # loss_kwargs: {} documents "no extra arguments"
            assert value == expect, f"{key}.{name}: config {value!r} != default {expect!r}"
        linked = {"model": {"pairs_per_block"}, "data": {"neighbours", "coarse_factor"}}.get(key, set())  # set from another group's option
        missing = set(defaults) - set(cfg[key]) - linked
        assert not missing, f"{key}: options not documented in configs/reg.yaml: {sorted(missing)}"


def test_help_lists_the_choices_of_every_enumerated_option():
    """Enumerated options are Literal types: jsonargparse validates them and ``sphero fit --help`` lists the choices."""
    import subprocess
    import sys
    import typing

    groups = {"model": RegistrationModule, "data": ZarrPairDataModule, "pyramid": PyramidSchedule,
              "early_stopping": PairEarlyStopping, "output": RegistrationWriter}
    out = subprocess.run([sys.executable, "-m", "sphero_lightning", "fit", "--help"], capture_output=True, text=True,
                         check=True).stdout
    enumerated = 0
    for key, cls in groups.items():
        for name, hint in typing.get_type_hints(cls.__init__).items():
            if typing.get_origin(hint) is typing.Literal:
                enumerated += 1
                choices = "{" + ",".join(typing.get_args(hint)) + "}"
                assert f"--{key}.{name} {choices}" in out, f"--{key}.{name}: choices {choices} not in sphero fit --help"
    assert enumerated >= 7  # transformation, loss, optimizer, init_translation, interpolation, curvature, output's


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_a_row(command):
    rows = _rows(command)
    missing = sorted(o for o in _options(command) if f"`{o}`" not in rows and f"`sphero {command} {o}`" not in rows)
    assert not missing, f"options of sphero {command} without a row in docs/options.md: {missing}"


def test_every_named_test_exists():
    named = set(re.findall(r"`tests/((?:\w+/)?test_\w+\.py)::(test_\w+)`", TABLE.read_text()))
    assert len(named) > 40
    defined: dict[str, set[str]] = {}
    for file in {f for f, _ in named}:
        tree = ast.parse((REPO / "tests" / file).read_text())
        defined[file] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    absent = sorted(f"{f}::{t}" for f, t in named if t not in defined[f])
    assert not absent, f"docs/options.md names tests that do not exist: {absent}"


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
