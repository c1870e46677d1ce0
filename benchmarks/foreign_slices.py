"""Foreign slices: one bad slice must not move the rest (issue 25's first must-show).

A 40-slice stack (384 x 384) is cut from one real ISBI 2012 section with known random rigid offsets (up to
8 px / 1 deg) plus noise, so every slice has an exact truth; then slices are replaced:

* ``one``: slice 20 by a different ISBI section (a misfiled or re-imaged slice);
* ``two``: slices 20 and 21 by two different sections (no pair of two neighbours jumps them);
* ``noise``: slice 20 by uniform noise;
* ``clean``: nothing replaced (what the solve costs where there is nothing to find).

Printed per case and method: the mean and worst error of every *other* slice's composed transform against the truth,
the slices the run lists as unregistered, the fitting time (printed by the run) and the wall time. Methods: the chain
(``--solve.neighbours 1``), the default (two neighbours, the cycle check and the solve) and pystackreg (``previous``).

    python benchmarks/foreign_slices.py
    python benchmarks/foreign_slices.py --cases one --seeds 3 --no-stackreg
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from _cases import fit, parse_cases, stackreg
from _paths import ISBI_PATH

from sphero_lightning.core.synthetic import composed_error, load_isbi_slice, make_stack

CASES = {"one": [20], "two": [20, 21], "noise": [20], "clean": []}
METHODS = {"chain": ["--solve.neighbours", "1"], "default": []}


def damaged_stack(case: str, seed: int, n: int, shape: tuple[int, int]):
    s = make_stack(load_isbi_slice(ISBI_PATH, 0), n, shape, seed=seed)
    stack = s.stack.copy()
    rng = np.random.default_rng(100 + seed)
    for k, z in enumerate(CASES[case]):
        if case == "noise":
            stack[z] = rng.integers(0, 256, stack[z].shape, dtype=np.uint8)
        else:
            stack[z] = make_stack(load_isbi_slice(ISBI_PATH, 10 + 5 * k), 1, shape, seed=7 + k).stack[0]
    return s, stack


def main() -> None:
    a = parse_cases(__doc__, list(CASES), 40)
    shape = (384, 384)
    print(f"# {a.slices} slices of 384 x 384 cut from ISBI section 0, rigid; error of the other slices")
    print("| case | seed | method | mean | worst | unregistered | fitting s | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for case in a.cases:
            for seed in range(a.seeds):
                truth, stack = damaged_stack(case, seed, a.slices, shape)
                good = [z - 1 for z in range(1, a.slices) if z not in CASES[case]]
                for name, extra in METHODS.items():
                    attrs, fit_s, wall = fit(stack, Path(tmp), extra)
                    unreg = (attrs.get("volume_solve") or {}).get("unregistered", [])
                    e = composed_error(np.asarray(attrs["composed_transforms"]), truth.composed, shape)[good]
                    print(f"| {case} | {seed} | {name} | {e.mean():.4f} px | {e.max():.4f} px | {unreg} | "
                          f"{fit_s:.2f} | {wall:.1f} |", flush=True)
                if not a.no_stackreg:
                    comp, wall = stackreg(stack)
                    e = composed_error(comp, truth.composed, shape)[good]
                    print(f"| {case} | {seed} | pystackreg | {e.mean():.4f} px | {e.max():.4f} px | - | - | "
                          f"{wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
