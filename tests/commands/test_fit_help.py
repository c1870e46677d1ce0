"""commands/fit_help.py: ``sphero fit --help``: short, plain, the project's options first, read without importing torch."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import pytest

from sphero_lightning.commands.main import main


def _fit_help(flag: str) -> str:

    from sphero_lightning.commands.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as exc:
        main(["fit", flag])
    assert exc.value.code == 0
    return out.getvalue()


def test_fit_help_answers_without_torch_or_lightning():
    """Issue 36: ``sphero fit --help`` took 4.1 s (it imported the classes); it reads them from their source now."""
    code = ("import sys, contextlib, io\nfrom sphero_lightning.commands.main import main\nbuf = io.StringIO()\n"
            "try:\n    with contextlib.redirect_stdout(buf):\n        main(['fit', '--help'])\nexcept SystemExit as e:\n"
            "    print('exit', e.code, 'torch' in sys.modules, 'lightning' in sys.modules, len(buf.getvalue().splitlines()))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    exit_word, code_, torch_loaded, lightning_loaded, lines = r.stdout.split()
    assert (exit_word, code_, torch_loaded, lightning_loaded) == ("exit", "0", "False", "False") and int(lines) > 100


def test_fit_help_is_short_plain_and_advertises_nothing_refused():
    """Issue 29 item 4: ``sphero fit --help`` under 150 lines with every project option (all of --help-all's but the
    Trainer's and the linked ones), no docstring markup, and no Trainer option that fit refuses."""
    import re

    from sphero_lightning.commands.fit_help import LINKED
    from sphero_lightning.training.state import RESULT_CHANGING

    short, full = _fit_help("--help"), _fit_help("--help-all")
    assert len(short.splitlines()) < 150, len(short.splitlines())
    assert len(full.splitlines()) > 300  # the whole LightningCLI help is still there
    option = re.compile(r"^\s+(--(?:data|model|solve|pyramid|early_stopping|output)\.[a-z_]+)\b", re.MULTILINE)
    assert set(option.findall(full)) - {f"--{k}" for k in LINKED} <= set(option.findall(short))
    assert "``" not in short and not re.search(r":(class|func|meth|data|mod):", short)
    trainer = set(re.findall(r"--trainer\.([a-z_]+)", short))
    assert trainer == {"accelerator", "devices", "strategy", "num_nodes", "enable_progress_bar", "logger"}
    assert not trainer & set(RESULT_CHANGING)


def test_fit_help_shows_the_project_options_first(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    lines = text.splitlines()
    first = {opt: next(i for i, ln in enumerate(lines) if ln.strip().startswith(opt))
             for opt in ("--data.root", "--model.transformation", "--output.interpolation", "--trainer.accelerator")}
    assert first["--data.root"] < 40 and first["--trainer.accelerator"] > first["--output.interpolation"]
    assert "--optimizer" not in text and "--lr_scheduler" not in text


def test_scaling_and_shear_have_their_own_help_line():
    from sphero_lightning.commands.fit_help import short_help

    text = short_help().splitlines()
    scaling = text[text.index(next(ln for ln in text if ln.startswith("  --model.scaling"))) + 1]
    shear = text[text.index(next(ln for ln in text if ln.startswith("  --model.shear"))) + 1]
    assert scaling != shear and "scale" in scaling and "shear" in shear


def test_the_help_says_how_to_turn_things_off_and_the_run_says_its_threads(fitted_stack):
    """Item 8: the short help names the progress bar, the logger and SPHERO_NUM_THREADS; the time line the threads."""
    from sphero_lightning.commands.fit_help import short_help

    text = short_help()
    assert "--trainer.enable_progress_bar false" in text and "--trainer.logger false" in text and "SPHERO_NUM_THREADS" in text
    err = fitted_stack.err
    line = next(ln for ln in err.splitlines() if ln.startswith("sphero: time:"))
    assert " on 1 torch thread " in line or " torch threads (" in line, line
