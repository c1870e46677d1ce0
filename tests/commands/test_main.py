"""commands/main.py: the ``sphero`` command's help, version and subcommands, and commands that import only what they need."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import zarr

from sphero_lightning.commands.main import main
from sphero_lightning.storage.stacks import write_zarr
from tests.conftest import assert_one_line_error, run_cli


def _modules_after(code: str) -> set[str]:
    r = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                       capture_output=True, text=True, check=True)
    return set(r.stdout.split())


def test_top_level_help_lists_our_commands_without_importing_torch():
    code = ("import sys; from sphero_lightning.commands.main import main; main(['--help']); "
            "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'heavy import'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    for cmd in ("fit", "ingest", "apply", "export", "demo"):
        assert f"  {cmd} " in r.stdout
    assert "validate" not in r.stdout and "predict" not in r.stdout


def test_each_commands_help_is_plain_text(capsys):
    for cmd in ("ingest", "apply", "export", "report", "demo"):
        try:
            main([cmd, "--help"])
        except SystemExit as exc:
            assert exc.code == 0
        out = capsys.readouterr().out
        assert f"sphero {cmd}" in out and "usage:" in out
        assert "``" not in out and ":func:" not in out and ":class:" not in out, out  # the docstring's markup out


def test_version_and_removed_subcommands(capsys):
    main(["--version"])
    from sphero_lightning import __version__

    assert capsys.readouterr().out.strip() == f"sphero {__version__}"
    for cmd in ("validate", "test", "predict", "nonsense"):
        assert_one_line_error(*run_cli([cmd]), "commands: fit, ingest, apply, export, report, demo")


def test_commands_that_do_not_fit_import_neither_torch_nor_lightning(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "s.tif", np.random.default_rng(0).integers(0, 255, (3, 32, 32), dtype=np.uint8),
                     photometric="minisblack")
    mods = _modules_after("from sphero_lightning.commands.main import main\n"
                          f"main(['ingest', {str(tmp_path / 's.tif')!r}, '--root', {str(tmp_path / 's.zarr')!r}, "
                          "'--spacing', '50', '4', '4', '--no-progress'])")
    assert "torch" not in mods and "lightning" not in mods
    # export of a registration (its attributes are all export reads)
    root = tmp_path / "r.zarr"
    write_zarr(np.zeros((3, 32, 32), np.uint8), root)
    write_zarr(np.zeros((3, 30, 30), np.uint8), root, array="images/registered/50-4-4")
    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r+")
    out.attrs.update({"composed_transforms": [[[1, 0, 0.1], [0, 1, 0]]] * 2, "crop_box": [1, 31, 1, 31], "inputs": ["images/50-4-4"]})
    mods = _modules_after("from sphero_lightning.commands.main import main\n"
                          f"main(['export', '--root', {str(root)!r}, '--transforms', 'images/registered/50-4-4', "
                          f"'--tmats', {str(tmp_path / 't.npy')!r}])")
    assert "torch" not in mods and "lightning" not in mods
    assert np.allclose(np.load(tmp_path / "t.npy")[1], [[1, 0, 0.1 * 16], [0, 1, 0], [0, 0, 1]])
    # apply warps with torch, but needs no Lightning
    assert "lightning" not in _modules_after("import sphero_lightning.commands.apply")


def test_a_command_lines_imports_run_without_the_garbage_collector_and_are_frozen_after():
    """From the command line, the collector rests while the command's modules import, and their objects are then left
    out of later collections (gc.freeze); in-process callers' collector is left as it is."""
    import gc

    from sphero_lightning.commands.main import _imports

    frozen = gc.get_freeze_count()
    try:
        with _imports(False):
            assert gc.isenabled()
        assert gc.get_freeze_count() == frozen
        with _imports(True):
            assert not gc.isenabled()
            made = [[i] for i in range(1000)]
        assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(made)
        gc.disable()
        with _imports(True):  # a caller that turned it off keeps it off
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()
