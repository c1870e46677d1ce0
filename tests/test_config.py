"""configs/reg.yaml documents the defaults: it must agree with the constructors (the demo runs without it)."""

import inspect
from pathlib import Path

import yaml

from sphero_lightning.training.callbacks import PairEarlyStopping, PyramidSchedule
from sphero_lightning.training.data import ZarrPairDataModule
from sphero_lightning.training.module import RegistrationModule
from sphero_lightning.training.volume import VolumeSolve
from sphero_lightning.training.writer import RegistrationWriter

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "reg.yaml"


def _defaults(cls):
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if p.default is not inspect.Parameter.empty}


def test_config_values_equal_constructor_defaults():
    cfg = yaml.safe_load(CONFIG.read_text())
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
