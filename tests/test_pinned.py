"""Results pinned across refactorings: the transforms and the output of two fixed stacks must not change.

``tests/data/pinned.json`` was written by ``python tests/test_pinned.py --write`` (2026-11-26, commit 743c1d3,
before the layered redesign; rewritten on purpose the same day when the Gauss-Newton model took the warped slice's
gradient from the sampled derivatives: transforms moved by at most 2.3e-4 px; and again when the evaluation summed the
curvature's moments in its own pass: float32 rounding, 6.3e-6 px at most, a few output grey values; and when the tap positions were
rewritten with fewer operations: 1.2e-5 px; and when a short step ended a level only once confirmed, with coarse levels
stopping at 0.01 px of the level and steps below the coarsest level capped at 1 px of the level: 1.7e-5 px; and on
2026-12-06 when the CPU evaluation became one compiled pass with positions in float64 (core/kernels.py): 8.5e-6 px, the
outputs' sums by 1-2 grey levels). A change of the numbers is a change of the method: rewrite the file only on purpose,
and say so in the commit.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import zarr

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: tests.conftest
from sphero_lightning.core.synthetic import em_like_image, make_stack
from sphero_lightning.storage.stacks import write_zarr
from tests.conftest import fit

PINNED = Path(__file__).resolve().parent / "data" / "pinned.json"
#: name: (make_stack arguments, extra sphero fit arguments)
CASES = {
    # the plain chain (one neighbour): pinned before the solve existed, unchanged by it
    "rigid_128": ({"n_slices": 6, "shape": (128, 128), "seed": 3}, ["--model.transformation", "rigid", "--solve.neighbours", "1"]),
    "affine_160": ({"n_slices": 5, "shape": (160, 144), "seed": 5, "max_scale": 0.02, "max_shear": 0.01},
                   ["--model.transformation", "affine", "--pyramid.levels", "3", "--solve.neighbours", "1"]),
    # the default: two neighbours and the robust solve (pinned when it was added, 2026-12-03)
    "rigid_128_solve": ({"n_slices": 6, "shape": (128, 128), "seed": 3}, ["--model.transformation", "rigid"]),
}


def run_case(tmp: Path, name: str) -> dict:
    kw, extra = CASES[name]
    s = make_stack(em_like_image(256, seed=11), **kw)
    root = tmp / f"{name}.zarr"
    write_zarr(s.stack, root)
    fit(root, *extra, logs=tmp / "logs")
    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    data = np.asarray(out[:])
    return {"pairwise": np.asarray(out.attrs["pairwise_transforms"]).tolist(),
            "composed": np.asarray(out.attrs["composed_transforms"]).tolist(),
            "crop_box": list(out.attrs["crop_box"]), "shape": list(data.shape), "dtype": str(data.dtype),
            "sha256": hashlib.sha256(data.tobytes()).hexdigest(), "sum": int(data.astype(np.int64).sum())}


def _px(a: np.ndarray, shape: list[int]) -> float:
    """Largest difference of normalized 2x3 matrices, in pixels of a slice of ``shape`` (Z, Y, X)."""
    return float(np.abs(a).max() * max(shape[1:]) / 2)


def test_pinned_results(tmp_path):
    pinned = json.loads(PINNED.read_text())
    for name in CASES:
        got, want = run_case(tmp_path, name), pinned[name]
        for key in ("pairwise", "composed"):
            d = _px(np.asarray(got[key]) - np.asarray(want[key]), want["shape"])
            # float32 sums round differently with the CPU's vector width and the thread count: 5.8e-6 px seen between
            # two machines with the same code; a change of the method moves them by 1e-5 px and more
            assert d < 1e-5, f"{name}: {key} transforms moved by {d:.2e} px"
        assert got["crop_box"] == want["crop_box"] and got["shape"] == want["shape"] and got["dtype"] == want["dtype"]
        if got["sha256"] != want["sha256"]:  # another float rounding at a .5 grey level may flip a pixel by 1
            assert abs(got["sum"] - want["sum"]) <= 16, f"{name}: output changed (sum {got['sum']} vs {want['sum']})"


if __name__ == "__main__":
    import tempfile

    if "--write" in sys.argv:  # every case; --add: only the cases not pinned yet
        old = json.loads(PINNED.read_text()) if "--add" in sys.argv and PINNED.exists() else {}
        with tempfile.TemporaryDirectory() as tmp:
            new = {name: old.get(name) or run_case(Path(tmp), name) for name in CASES}
        PINNED.write_text(json.dumps(new, indent=1) + "\n")
        print(f"wrote {PINNED}")
