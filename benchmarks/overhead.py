"""Lightning's cost per optimisation step: the RegistrationModule under a Trainer against a plain loop.

Both run the same math (``RegistrationModule.pair_losses``, the same batched solver, the same pyramid)
on the same stack with early stopping off and a fixed number of steps per level, so both take exactly
the same number of steps; the difference per step is what Lightning (hooks, callbacks, data fetching,
logging) adds. Measured at B = 1 and at the default block size.

    python benchmarks/overhead.py [--size 384] [--slices 9] [--steps 10]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]  # the checkout (configs/)
from _paths import ISBI_PATH

from sphero_lightning.core.optimizers import make_solver
from sphero_lightning.core.synthetic import em_like_image, load_isbi_slice, make_stack
from sphero_lightning.storage.stacks import write_zarr
from sphero_lightning.training.cli import _PLAIN_DEFAULTS, SpheroCLI
from sphero_lightning.training.data import ZarrPairDataModule
from sphero_lightning.training.module import RegistrationModule


class StepTimer(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.steps, self.t0 = 0, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1

    def on_train_end(self, trainer, pl_module):
        self.elapsed = time.perf_counter() - self.t0


def lightning_run(root: Path, block: int, steps: int, levels: int, logdir: Path) -> tuple[float, int]:
    args = ["--config", str(REPO / "configs" / "reg.yaml"), "--data.root", str(root), "--data.array", "images/50-4-4",
            "--data.pairs_per_block", str(block), "--early_stopping.enabled", "false", "--pyramid.steps", str(steps),
            "--pyramid.levels", str(levels), "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(logdir), "--output.crop_borders", "false",
            "--model.init_translation", "none", "--data.overwrite", "true"]  # plain loop: identity start too
    with contextlib.redirect_stderr(io.StringIO()):
        cli = SpheroCLI(RegistrationModule, ZarrPairDataModule, args=args, run=False, trainer_defaults=_PLAIN_DEFAULTS,
                        seed_everything_default=0)
        timer = StepTimer()
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, cli.datamodule)
    return timer.elapsed, timer.steps


def plain_run(root: Path, block: int, steps: int, levels: int) -> tuple[float, int]:
    """The same fit as a hand-written PyTorch loop: no Trainer, no hooks, no callbacks."""
    from sphero_lightning.training.callbacks import PyramidSchedule

    dm = ZarrPairDataModule(str(root), "images/50-4-4", pairs_per_block=block, overwrite=True)
    module = RegistrationModule(pairs_per_block=block, init_translation="none")
    module.shape, module.n_pairs = dm.slice_shape, dm.n_pairs
    module.levels = PyramidSchedule(levels=levels, steps=steps).levels_for("bfgs")
    n_free = module.objective.n_params
    module.objective.shape = dm.slice_shape
    t0 = time.perf_counter()
    count = 0
    for b in range(dm.n_blocks(1)):
        item = dm.read_rank_block(b, 0, 1)
        imgs = ((item["slices"].float() - item["offset"]) / item["scale"]).unsqueeze(1)
        module.block_slices = imgs
        x = torch.zeros(imgs.shape[0] - 1, n_free, dtype=torch.float64)
        previous = None
        for i, lv in enumerate(module.levels):
            obj = module.objective
            lvl = obj.level_stack(imgs, lv.factor)
            fixed_coeffs, moving = obj.level_coeffs(lvl)
            scale = (lv.factor / module.levels[i - 1].factor) ** 2 if i else 1.0
            solver = make_solver("bfgs", x, lv.lr, previous=previous, curvature_scale=scale)
            for step in range(lv.steps):
                # the module's evaluation (same passes, same Gauss-Newton curvature at a level's first step)
                losses, g, hess = obj.evaluate(solver.trial(), lvl[:-1], moving, step == 0 and module.uses_gauss_newton,
                                               fixed_coeffs=fixed_coeffs)
                if hess is not None:
                    solver.set_curvature(torch.ones(len(x), dtype=torch.bool), torch.linalg.inv(hess))
                solver.update(losses, g)
                count += 1
            x, previous = solver.x, solver
    return time.perf_counter() - t0, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--slices", type=int, default=9)
    ap.add_argument("--steps", type=int, default=10, help="steps per level (early stopping off)")
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 8])
    a = ap.parse_args()
    base = load_isbi_slice(ISBI_PATH, 0) if ISBI_PATH.exists() else em_like_image(a.size + 128)
    s = make_stack(base, a.slices, (a.size, a.size), seed=0)
    print(f"# Lightning overhead, {a.slices - 1} pairs of {a.size}x{a.size}, {a.levels} levels x {a.steps} steps, "
          f"{torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "s.zarr"
        write_zarr(s.stack, root)
        plain_run(root, 1, 2, 1)  # warm-up (allocator, kernels)
        for block in a.blocks:
            t_l, n_l = lightning_run(root, block, a.steps, a.levels, Path(tmp) / "logs")
            t_p, n_p = plain_run(root, block, a.steps, a.levels)
            print(f"B={block:3d}: Lightning {1e3 * t_l / n_l:7.2f} ms/step ({n_l} steps)   plain loop {1e3 * t_p / n_p:7.2f} ms/step "
                  f"({n_p} steps)   overhead {100 * (t_l / n_l - t_p / n_p) / (t_p / n_p):+.1f} %", flush=True)


if __name__ == "__main__":
    main()
