"""The README's commands work when copied anywhere: run exactly as written, in a folder outside the checkout."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import zarr

from sphero_lightning.core.synthetic import make_stack

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(heading: str) -> list[str]:
    """The ``sphero`` command lines of the first ```bash block under ``heading``, comments removed."""
    text = README.read_text()
    section = text.split(f"## {heading}", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    return [ln.split("#", 1)[0].strip() for ln in block.splitlines() if ln.strip().startswith("sphero ")]


def test_readme_commands_from_a_directory_outside_the_checkout(tmp_path, base_image):
    import tifffile

    work = tmp_path / "elsewhere"
    work.mkdir()
    assert README.parent not in work.parents
    s = make_stack(base_image, 5, (128, 128), seed=7)
    tifffile.imwrite(work / "stack.tif", s.stack, photometric="minisblack")
    labels = np.repeat((np.arange(128 * 128) // 900).reshape(1, 128, 128), 5, 0).astype(np.uint16)
    tifffile.imwrite(work / "labels.tif", labels, photometric="minisblack")
    commands = readme_block("Your own data, start to finish")
    assert [c.split()[1] for c in commands] == ["ingest", "ingest", "fit", "apply", "export"]
    sphero = [sys.executable, "-m", "sphero_lightning"]  # the `sphero` console script of this interpreter
    for cmd in commands:
        r = subprocess.run(sphero + shlex.split(cmd)[1:], cwd=work, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=False)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
    out = zarr.open_array(str(work / "stack.zarr"), path="images/registered/50-4-4", mode="r")
    lab = zarr.open_array(str(work / "stack.zarr"), path="labels/registered/50-4-4", mode="r")
    assert lab.shape == out.shape and set(np.unique(lab[:])) <= set(np.unique(labels))
    assert np.load(work / "tmats.npy").shape == (5, 3, 3) and (work / "transforms.csv").read_text().count("\n") == 6
    assert (work / "logs" / "sphero").is_dir()


def test_readme_main_command_needs_no_config_file():
    text = README.read_text()
    assert "sphero fit --data.root stack.zarr --data.array images/50-4-4" in text
    assert "--config configs/reg.yaml --data.root" not in text  # a path that exists only in the checkout


def test_every_test_file_the_docs_name_exists():
    """The README, docs/, benchmarks/ and the package's docstrings name test files (``tests/<layer>/test_<module>.py``,
    and ``::test_name`` in docs/options.md): each one is there, so a moved or renamed test file fails here."""
    repo = README.parent
    texts = [README, *(repo / "docs").glob("*.md"), *(repo / "benchmarks").rglob("*.py"), *(repo / "sphero_lightning").rglob("*.py")]
    named = {m for p in texts for m in re.findall(r"\btests/(?:\w+/)*test_\w+\.py", p.read_text())}
    assert len(named) > 10, named
    missing = sorted(n for n in named if not (repo / n).is_file())
    assert not missing, f"test files named in the docs that do not exist: {missing}"
