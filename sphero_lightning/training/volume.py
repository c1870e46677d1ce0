"""The ``--solve.*`` group: redundant pairs, the robust solve of the volume, drift priors (core: :mod:`..core.volume`)."""

from __future__ import annotations

from typing import Any

import lightning as L

from ..core.settings import SOLVE, check_bounds
from ..core.stack import MAX_BRIDGE_ROUNDS
from ..core.volume import Priors
from ..errors import SpheroError
from ..storage.checks import read_anchors


class VolumeSolve(L.Callback):
    """The volume from its pairs: how many neighbours each slice is registered to, and how the composed transforms
    are found from them.

    Parameters
    ----------
    neighbours : int
        Each slice is registered to this many usable slices before it (1: the consecutive pair only, the plain
        chain). With 2 or more the composed transforms come from a robust least-squares solve over all pairs: a
        foreign, misfiled or re-imaged slice, which no neighbour agrees with, loses all its pairs (listed as
        ``unregistered``, placed between its neighbours) instead of moving every slice after it. Where every pair has
        a true answer the result is the chain's, bit for bit.
    coarse_factor : float
        Pairs further apart than consecutive slices are fitted down to this factor of the finest pyramid level only
        (4: a quarter of the resolution, about a tenth of a consecutive pair's cost): enough to tell which pairs have
        no true answer (they are off by pixels to hundreds of pixels). Those that stand in for one (a foreign slice's
        bridge) are fitted again at full resolution. 1 fits them all at full resolution.
    reference : int
        The slice whose frame the output takes (its transform is the identity).
    detrend : int, optional
        Remove a polynomial trend of this degree along z from the composed transforms (1: a linear drift of
        translation, rotation, scale and shear). Assumes the sample itself neither drifts nor tilts along z: a real
        slow change goes with the artefact. Off by default.
    highpass : float, optional
        Keep only what changes faster than this many slices (the composed transforms less their Gaussian smoothing
        along z with this sigma). Assumes every slow change is an artefact. Off by default.
    anchors : str, optional
        A JSON file ``{"<slice>": 3 x 3 pixel matrix, ...}`` of transforms known for some slices (pystackreg's
        ``tmats`` convention, to the reference slice's frame; e.g. from landmarks): hard constraints, everything else
        bends to meet them. Assumes they are right.
    """

    def __init__(self, neighbours: int = SOLVE.neighbours, coarse_factor: float = SOLVE.coarse_factor,
                 reference: int = SOLVE.reference, detrend: int | None = SOLVE.detrend,
                 highpass: float | None = SOLVE.highpass, anchors: str | None = SOLVE.anchors) -> None:
        check_bounds("solve", neighbours=neighbours, coarse_factor=coarse_factor, reference=reference, detrend=detrend,
                     highpass=highpass)
        self.neighbours, self.coarse_factor, self.reference = int(neighbours), float(coarse_factor), int(reference)
        self.detrend, self.highpass, self.anchors = detrend, highpass, anchors
        self._anchor_tmats = read_anchors(anchors) if anchors else {}

    #: Config group of these settings (``--solve.*``), for the logged hyperparameters.
    config_group = "solve"

    def fingerprint(self) -> dict[str, Any]:
        """What changes the fitted pairs (for the progress journal): which pairs there are."""
        return {"neighbours": self.neighbours, "coarse_factor": self.coarse_factor}

    def settings(self) -> dict[str, Any]:
        return {"neighbours": self.neighbours, "coarse_factor": self.coarse_factor, "reference": self.reference, "detrend": self.detrend,
                "highpass": self.highpass, "anchors": self.anchors}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        n = dm.n_slices
        if self.reference >= n:
            raise SpheroError(f"--solve.reference {self.reference} is not a slice of this stack ({n} slices: 0..{n - 1})")
        bad = [z for z in self._anchor_tmats if not 0 <= z < n]
        if bad:
            raise SpheroError(f"--solve.anchors names slice(s) {bad} outside this stack ({n} slices: 0..{n - 1})")

    #: Rounds of bridging pairs at most (each after the pairs before it are fitted).
    max_rounds = MAX_BRIDGE_ROUNDS

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rounds = 0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the last block: where the solve can keep the stack in one piece only through pairs that disagree (a run
        of slices that no pair jumps), fit bridging pairs across, as more blocks of the same fit (every rank decides
        the same from the same results)."""
        dm = trainer.datamodule
        if self.neighbours < 2 or self._rounds >= self.max_rounds or trainer.current_epoch + 1 < trainer.fit_loop.max_epochs:
            return
        if any(p not in pl_module.results for p in range(dm.n_pairs)):
            return
        from ..core.volume import bridge_pairs

        fitted = [pl_module.results[p] for p in range(dm.n_pairs)]
        bridges = bridge_pairs(dm.n_slices, fitted, dm.damaged, dm.slice_shape)
        if not bridges:
            return
        self._rounds += 1
        dm.add_pairs(bridges)
        pl_module.add_pairs(dm)
        trainer.fit_loop.max_epochs = dm.n_blocks(trainer.world_size)
        bar = getattr(trainer, "progress_bar_callback", None)
        if hasattr(bar, "set_total"):
            bar.set_total(dm.n_pairs)
        if trainer.is_global_zero:
            from .report import say

            say(getattr(dm, "notes", None), f"fitting {len(bridges)} pair(s) at full resolution that stand in for pairs "
                f"with no true answer: {', '.join(f'{i}->{j}' for i, j in bridges)}",
                {z for i, j in bridges for z in range(i + 1, j)})

    def priors(self, shape: tuple[int, int]) -> Priors:
        import torch

        from ..core.frames import Affine, Frame

        anchors = {z: Affine(torch.tensor(m, dtype=torch.float64)[None], Frame.PIXEL, shape).to(Frame.NORMALIZED).matrix[0].numpy()
                   for z, m in self._anchor_tmats.items()}
        return Priors(detrend=self.detrend, highpass=self.highpass, anchors=anchors or None)
