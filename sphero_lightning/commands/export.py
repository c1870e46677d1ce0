"""``sphero export``: a registration's transforms in pixel units, for Fiji/pystackreg and spreadsheets.

    sphero export --root stack.zarr --transforms images/registered/50-4-4 --tmats tmats.npy --csv transforms.csv

* ``tmats.npy``: ``(Z, 3, 3)`` matrices in the convention of TurboReg/pystackreg (``register_stack`` output,
  input of ``StackReg.transform_stack(stack, tmats=...)``): pixel-index coordinates ``(x, y, 1)``, mapping a
  position of the aligned frame (slice 0's, or that of the slice ``--solve.reference`` named) to the position
  sampled in slice ``z``; the reference slice's is the identity. The same matrices are stored on the output array as ``composed_transforms_pixel``.
* ``transforms.csv``: per slice, the displacement of the slice centre (px), rotation (degrees), scale and
  shear of that mapping, and the registration status of the pair that ends at the slice.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from ..core.frames import composed_of_all, decompose, pixel_matrices
from ..core.records import PairRecord
from ..errors import SpheroError
from ..storage.store import open_registration
from .fit_help import plain

CSV_FIELDS = ["slice", "dx_px", "dy_px", "rotation_deg", "scale_x", "scale_y", "shear", "status"]




def write_csv(path: str | Path, tmats: np.ndarray, shape: tuple[int, int], log: list[PairRecord], reference: int) -> None:
    status = {int(e["slice_indices"][1]): e.get("status", "") for e in log}
    status[reference] = "reference"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for z, m in enumerate(tmats):
            row = {"slice": z, **{k: f"{v:.6f}" for k, v in decompose(m, shape).items()},
                   "status": status.get(z, "")}
            w.writerow(row)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="sphero export", description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="the Zarr store")
    ap.add_argument("--transforms", required=True, help="a finished registration, e.g. images/registered/50-4-4")
    ap.add_argument("--tmats", default=None, help="write the (Z, 3, 3) pystackreg/TurboReg matrices here (.npy)")
    ap.add_argument("--csv", default=None, help="write per-slice translation/rotation/scale here (.csv)")
    a = ap.parse_args(argv)
    if not a.tmats and not a.csv:
        raise SpheroError("nothing to export; give --tmats FILE.npy and/or --csv FILE.csv")
    for option, target in (("--tmats", a.tmats), ("--csv", a.csv)):
        if target and not Path(target).resolve().parent.is_dir():
            raise SpheroError(f"{option} {target}: folder {str(Path(target).parent)!r} does not exist; create it first, "
                              "or give a path in an existing folder")
    reg, src = open_registration(a.root, a.transforms)
    shape = tuple(int(s) for s in src.shape[1:])
    every = composed_of_all(reg.attrs)
    tmats = pixel_matrices(every[1:], shape, every[0])
    if a.tmats:
        np.save(a.tmats, tmats)
        print(f"sphero: wrote {a.tmats} ({len(tmats)} x 3 x 3, pystackreg tmats)", file=sys.stderr)
    if a.csv:
        write_csv(a.csv, tmats, shape, list(reg.attrs.get("registration_log", [])),
                  int((reg.attrs.get("volume_solve") or {}).get("reference") or 0))
        print(f"sphero: wrote {a.csv}", file=sys.stderr)
