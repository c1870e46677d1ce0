"""What does not move with the sample: a dark frame, curtaining stripes, detector dirt, zero padding (issue 26).

16 slices of 384 x 384 cut from one real ISBI 2012 section with known random rigid offsets (up to 8 px / 1 deg) and
noise, uint8; then a pattern identical in every slice (the detector's), or zero padding that moves with the content:

* ``none``: nothing added;
* ``frame``: the top 48 rows and left 32 columns at 0 (``--data.ignore_value 0``);
* ``stripes25`` / ``stripes60``: a constant added to each column, SD 25 / 60 grey levels (``--data.destripe vertical``);
* ``disk``: a bright disk of radius 45 px at a fixed place (``--data.mask_array``, a ``(Y, X)`` mask without it);
* ``padding``: slices cut from a section with a black border, so a border of ~12-28 px at 0 that moves with the
  content (``--data.ignore_value 0``).

Printed per case: mean and worst error of the composed transforms against the truth with the default settings, with
the matching option, and pystackreg's (``previous``, rigid); and the fitting seconds of both of ours.

    python benchmarks/static_patterns.py
    python benchmarks/static_patterns.py --cases none stripes60 --seeds 2
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from _cases import fit, parse_cases, stackreg
from _paths import ISBI_PATH

from sphero_lightning.core.synthetic import composed_error, load_isbi_slice, make_stack, render

OPTION = {"none": ["--data.destripe", "vertical"], "frame": ["--data.ignore_value", "0"],
          "stripes25": ["--data.destripe", "vertical"], "stripes60": ["--data.destripe", "vertical"],
          "disk": ["--data.mask_array", "mask"], "padding": ["--data.ignore_value", "0"]}
CENTRE, RADIUS = (150, 240), 45


def case_stack(case: str, seed: int, n: int, shape: tuple[int, int]):
    """The stack of ``case`` (its truth, the uint8 slices, the ``(Y, X)`` mask for ``disk``)."""
    base = load_isbi_slice(ISBI_PATH, 0)
    s = make_stack(base, n, shape, seed=seed)
    st = s.stack.astype(np.float64)
    rng = np.random.default_rng(1000 + seed)
    mask = None
    if case == "frame":
        st[:, :48] = 0
        st[:, :, :32] = 0
    elif case.startswith("stripes"):
        st += rng.normal(0, float(case[7:]), shape[1])[None, None, :]
    elif case == "disk":
        yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
        inside = (yy - CENTRE[0]) ** 2 + (xx - CENTRE[1]) ** 2 <= RADIUS ** 2
        st[:, inside] = 250
        mask = (~inside).astype(np.uint8)
    elif case == "padding":
        # the section with a black border: where the slice shows no part of a centred (shape - 40) square of it
        box = np.zeros(base.shape)
        hb, wb = base.shape
        box[(hb - shape[0]) // 2 + 20:(hb + shape[0]) // 2 - 20, (wb - shape[1]) // 2 + 20:(wb + shape[1]) // 2 - 20] = 1
        st[render(box, s.slice_transforms, shape) < 0.5] = 0
    return s, np.clip(np.rint(st), 0, 255).astype(np.uint8), mask


def main() -> None:
    a = parse_cases(__doc__, list(OPTION), 16)
    shape = (384, 384)
    print(f"# {a.slices} slices of 384 x 384 cut from ISBI section 0, rigid; error of the composed transforms")
    print("| case | seed | default: mean / worst | fit s | with the option | mean / worst | fit s | pystackreg |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for case in a.cases:
            for seed in range(a.seeds):
                truth, stack, mask = case_stack(case, seed, a.slices, shape)
                cells = []
                for extra in ([], OPTION[case]):
                    attrs, fit_s, _ = fit(stack, Path(tmp), extra, mask)
                    e = composed_error(np.asarray(attrs["composed_transforms"]), truth.composed, shape)
                    cells += [f"{e.mean():.4f} / {e.max():.4f} px", f"{fit_s:.2f}"]
                ref = "-"
                if not a.no_stackreg:
                    e = composed_error(stackreg(stack)[0], truth.composed, shape)
                    ref = f"{e.mean():.4f} / {e.max():.4f} px"
                print(f"| {case} | {seed} | {cells[0]} | {cells[1]} | `{' '.join(OPTION[case])}` | {cells[2]} | "
                      f"{cells[3]} | {ref} |", flush=True)


if __name__ == "__main__":
    main()
