"""core/records.py: a pair record's QC (``flag_outliers``: robust z-scores of the final losses, outliers flagged; not
assessed on short stacks), on records and end to end through ``sphero fit``."""

from __future__ import annotations

import numpy as np
import zarr

from sphero_lightning.core.records import flag_outliers
from sphero_lightning.core.synthetic import em_like_image, make_stack
from sphero_lightning.storage.stacks import write_zarr
from tests.conftest import fit


def test_outlying_pair_is_flagged(tmp_path, base_image):
    s = make_stack(base_image, 10, (128, 128), seed=2)
    st = s.stack.copy()
    other = em_like_image(512, seed=11)[100:228, 100:228]  # unrelated content: registers, but poorly
    st[6] = other
    root = tmp_path / "s.zarr"
    write_zarr(st, root)
    fit(root)
    log = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r").attrs["registration_log"]
    flagged = sorted(e["pair_index"] for e in log if e.get("qc") == "outlier")
    assert flagged == [5, 6], [(e["pair_index"], e.get("qc_z")) for e in log]


def test_flag_outliers_robust_z():
    log = [{"final_loss": v, "pair_index": i} for i, v in enumerate([0.1, 0.11, 0.09, 0.1, 0.5, 0.1])]
    out = flag_outliers(log)
    assert [e["pair_index"] for e in out] == [4]
    assert all("qc_z" in e for e in log) and np.isclose(log[0]["qc_z"], 0.0)


def test_qc_does_not_flag_outliers_on_short_or_uniform_stacks():
    short = [{"final_loss": v} for v in (0.10, 0.1001, 0.5)]
    assert flag_outliers(short) == [] and all(e["qc"] == "not_assessed" for e in short)
    uniform = [{"final_loss": 0.1 + 1e-5 * i} for i in range(8)]  # tiny spread: MAD ~ 2e-5
    assert flag_outliers(uniform) == [] and all(e["qc"] == "ok" for e in uniform)
    real = [{"final_loss": v} for v in (0.10, 0.11, 0.09, 0.10, 0.12, 0.10, 0.45, 0.11)]
    assert [e["final_loss"] for e in flag_outliers(real)] == [0.45]
