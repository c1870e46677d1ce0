"""Batched optimisers: one independent problem per row.

torch's optimisers treat all rows as one problem: LBFGS would share one line search and one curvature
model across every pair of a block, and a converged pair would keep moving. Here each row (a pair)
has its own state, its own step length and its own convergence, and every call evaluates all rows at
once, which is what makes blocks of pairs cheap. The parameters are small (at most 6 per pair), so
BFGS keeps a dense ``(n, n)`` inverse-Hessian per row.

Protocol, shared by both solvers (one call of each per optimisation step):

1. ``trial()`` gives the ``(R, n)`` points to evaluate;
2. the caller evaluates the loss ``(R,)`` and its gradient ``(R, n)`` there;
3. ``update(loss, grad)`` returns the rows whose evaluation was accepted as a new iterate.

Rows are frozen with ``freeze(mask)`` (converged, or no pair in that slot); a frozen row's trial point
is its current iterate and it never changes again.

``sync_free``: every update runs its branches for all rows and keeps what each row needs (``torch.where``), where
otherwise a branch no row needs is skipped after asking the device (``mask.any()``): the same results, and a fit on a
GPU never waits for the device inside a step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import SpheroError


class BatchSolver:
    """Shared state of the batched solvers: iterates, losses, the active mask."""

    def __init__(self, x0: torch.Tensor, lr: float, active: torch.Tensor | None = None, sync_free: bool = False) -> None:
        self.sync_free = sync_free
        self.x = x0.detach().double().clone()
        self.lr = float(lr)
        r = self.x.shape[0]
        self.f = torch.full((r,), float("inf"), dtype=torch.float64, device=self.x.device)
        self.active = torch.ones(r, dtype=torch.bool, device=self.x.device) if active is None else active.clone()
        self.evaluated = torch.zeros(r, dtype=torch.bool, device=self.x.device)
        self.newton = torch.zeros_like(self.evaluated)  # rows started from a Newton (Gauss-Newton) model (BFGS)
        self.trusted = torch.zeros_like(self.evaluated)  # ... from one the caller trusted (set_curvature)
        # rows whose curvature model has been checked against the loss (BFGS: see BatchBFGS); Adam has no model, so
        # its rows end a level only after several short steps in a row (callbacks.PairEarlyStopping)
        self.confirmed = torch.zeros_like(self.evaluated)

    def any(self, mask: torch.Tensor) -> bool:
        """Whether a branch is needed by any row of ``mask`` (always, sync-free: the branch is masked per row)."""
        return self.sync_free or bool(mask.any())

    def freeze(self, mask: torch.Tensor) -> None:
        """Stop the rows in ``mask`` (``(R,)`` bool) for good."""
        self.active &= ~mask

    def pending_step(self) -> torch.Tensor:
        """``(R, n)``: the step a row is about to take (its last step, for solvers without line search)."""
        return self.trial() - self.x

    def finish(self, mask: torch.Tensor) -> None:
        """Freeze converged rows; solvers whose pending step is a model minimiser take it first."""
        self.freeze(mask)

    def trial(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, loss: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class BatchAdam(BatchSolver):
    """Adam (the reference pipeline's optimiser), one moment estimate per row; every step is accepted."""

    def __init__(self, x0: torch.Tensor, lr: float, active: torch.Tensor | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, sync_free: bool = False) -> None:
        super().__init__(x0, lr, active, sync_free)
        self.m = torch.zeros_like(self.x)
        self.v = torch.zeros_like(self.x)
        self.t = torch.zeros_like(self.f)
        self.betas, self.eps = betas, eps
        self.last_step = torch.full_like(self.x, float("inf"))

    def trial(self) -> torch.Tensor:
        return self.x

    def pending_step(self) -> torch.Tensor:
        return self.last_step

    def update(self, loss: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        act = self.active
        g = grad.double()
        self.f = torch.where(act, loss.double(), self.f)
        self.evaluated |= act
        b1, b2 = self.betas
        t = self.t + act.double()
        m = b1 * self.m + (1 - b1) * g
        v = b2 * self.v + (1 - b2) * g * g
        tt = t.clamp_min(1).unsqueeze(-1)
        step = self.lr * (m / (1 - b1**tt)) / (torch.sqrt(v / (1 - b2**tt)) + self.eps)
        a = act.unsqueeze(-1)
        self.m, self.v, self.t = torch.where(a, m, self.m), torch.where(a, v, self.v), t
        self.x = torch.where(a, self.x - step, self.x)
        self.last_step = torch.where(a, step, self.last_step)
        return act.clone()


#: A BFGS row's curvature model is confirmed by an accepted step along which the slope fell by at least this fraction.
CONFIRM_SLOPE = 0.5
#: Factor a BFGS row's inverse-Hessian grows by after a full step along which the loss showed no positive curvature.
EXPAND = 4.0


class BatchBFGS(BatchSolver):
    """BFGS with a backtracking (Armijo) line search, per row.

    Each step evaluates one trial point per row. A row whose trial point decreases its loss enough
    accepts it, updates its inverse-Hessian (skipped when the curvature ``s.y`` is not positive)
    and takes a full quasi-Newton step next; a row whose trial point fails shortens its step by
    quadratic interpolation. ``lr`` is the length of the very first step (largest component,
    parameter units); later steps are scaled by the curvature the row has seen. ``max_step`` caps
    any step, which keeps a bad curvature estimate from throwing a pair out of the image;
    ``step_length(x, x + d)`` (``(R,)``, e.g. pixels) with ``max_length`` caps it in other units (a trust radius).

    ``confirmed`` tells whether a row's curvature model has been checked against the loss: after an
    accepted step, whether the slope along it fell by at least :data:`CONFIRM_SLOPE` of itself (else the
    model overestimates the curvature, and the short step it proposes next says nothing about how far the
    optimum is); before any step, rows started from a model the caller trusts (:meth:`set_curvature`).
    A stopping rule that trusts a short proposed step only where it is confirmed cannot stop a row far
    from its optimum because its model was too curved.
    """

    def __init__(self, x0: torch.Tensor, lr: float, active: torch.Tensor | None = None,
                 c1: float = 1e-4, max_step: float = 0.1, hinv: torch.Tensor | None = None,
                 step_length: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 max_length: float = float("inf"), sync_free: bool = False) -> None:
        super().__init__(x0, lr, active, sync_free)
        r, n = self.x.shape
        self.c1, self.max_step = c1, max_step
        self.step_length, self.max_length = step_length, max_length
        self.g = torch.zeros_like(self.x)
        self.d = torch.zeros_like(self.x)
        self.alpha = torch.ones_like(self.f)
        eye = torch.eye(n, dtype=torch.float64, device=self.x.device)
        self.eye = eye
        self.hinv = eye.expand(r, n, n).clone()
        self.updated = torch.zeros_like(self.evaluated)  # has the row had a curvature update yet
        self.backtracks = torch.zeros(r, dtype=torch.long, device=self.x.device)
        # A curvature model carried over (e.g. from the previous pyramid level) replaces the identity.
        self.warm = torch.zeros_like(self.evaluated) if hinv is None else torch.ones_like(self.evaluated)
        if hinv is not None:
            self.hinv = hinv.detach().double().clone()
            self.updated[:] = True
        # A carried model is right in shape but its scale only guessed (the curvature at a finer level of real
        # sections grows less than the resolution squared): the first curvature update rescales it to the curvature
        # measured along the step (self-scaling BFGS), then updates it as usual.
        self.rescale = self.warm.clone()
        self.tau = torch.ones_like(self.f)  # the factor that rescaling found (1 where none happened)

    def set_curvature(self, rows: torch.Tensor, hinv: torch.Tensor, trusted: torch.Tensor | None = None) -> None:
        """Start ``rows`` (not yet evaluated) from the inverse-Hessian ``hinv`` (``(R, n, n)``); ``trusted`` rows'
        model counts as confirmed before any step is taken."""
        rows = rows & ~self.evaluated
        if trusted is not None:
            self.trusted |= rows & trusted
            self.confirmed |= rows & trusted
        self.hinv = torch.where(rows.view(-1, 1, 1), hinv.double(), self.hinv)
        self.updated |= rows
        self.warm |= rows
        self.newton |= rows
        self.rescale &= ~rows  # a validated Newton model needs no rescaling

    def _direction(self, rows: torch.Tensor) -> None:
        """Recompute the search direction of ``rows``; reset the curvature where it is not descent."""
        d = -(self.hinv @ self.g.unsqueeze(-1)).squeeze(-1)
        bad = rows & ((d * self.g).sum(-1) >= 0) & (self.g.abs().amax(-1) > 0)
        if self.any(bad):
            scale = (self.lr / self.g.abs().amax(-1).clamp_min(1e-30)).view(-1, 1, 1)
            self.hinv = torch.where(bad.view(-1, 1, 1), scale * self.eye, self.hinv)
            self.updated &= ~bad
            d = -(self.hinv @ self.g.unsqueeze(-1)).squeeze(-1)
        # Cap the step length (largest component) at max_step.
        big = d.abs().amax(-1, keepdim=True)
        d = torch.where(big > self.max_step, d * (self.max_step / big.clamp_min(1e-30)), d)
        if self.step_length is not None:
            length = self.step_length(self.x, self.x + d).unsqueeze(-1)
            d = torch.where(length > self.max_length, d * (self.max_length / length.clamp_min(1e-30)), d)
        self.d = torch.where(rows.unsqueeze(-1), d, self.d)
        self.alpha = torch.where(rows, torch.ones_like(self.alpha), self.alpha)

    def trial(self) -> torch.Tensor:
        step = torch.where(self.active.unsqueeze(-1), self.alpha.unsqueeze(-1) * self.d, torch.zeros_like(self.d))
        return self.x + step

    def finish(self, mask: torch.Tensor) -> None:
        """Take the (tiny) pending quasi-Newton step of converged rows without evaluating it, then freeze.

        Near the optimum that step is accurate to second order, so stopping after it rather than
        before saves the evaluation that would only confirm it. ``f`` keeps the last evaluated loss.
        """
        fresh = mask & self.active & self.evaluated & (self.alpha >= 1)  # a full step, not a failed line search
        self.x = torch.where(fresh.unsqueeze(-1), self.x + self.d, self.x)
        self.freeze(mask)

    def update(self, loss: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        loss, grad = loss.double(), grad.double()
        act = self.active
        finite = torch.isfinite(loss) & torch.isfinite(grad).all(-1)
        trial = self.trial()

        # First evaluation of a row: take it as the iterate, start with a scaled identity.
        first = act & ~self.evaluated & finite
        if self.any(first):
            self.x = torch.where(first.unsqueeze(-1), trial, self.x)
            self.f = torch.where(first, loss, self.f)
            self.g = torch.where(first.unsqueeze(-1), grad, self.g)
            cold = first & ~self.warm
            scale = (self.lr / grad.abs().amax(-1).clamp_min(1e-30)).view(-1, 1, 1)
            self.hinv = torch.where(cold.view(-1, 1, 1), scale * self.eye, self.hinv)
            self.evaluated |= first
            self._direction(first)

        cont = act & self.evaluated & ~first
        slope = (self.g * self.d).sum(-1)
        armijo = finite & (loss <= self.f + self.c1 * self.alpha * slope)
        accept = cont & armijo
        reject = cont & ~armijo

        if self.any(accept):
            s = trial - self.x
            y = grad - self.g
            sy = (s * y).sum(-1)
            yy = (y * y).sum(-1)
            good = accept & (sy > 1e-12 * torch.sqrt((s * s).sum(-1) * yy).clamp_min(1e-300))
            # Before the first curvature update, rescale the identity to the observed curvature.
            fresh = good & ~self.updated
            gamma = (sy / yy.clamp_min(1e-300)).view(-1, 1, 1)
            hinv = torch.where(fresh.view(-1, 1, 1), gamma * self.eye, self.hinv)
            scale_now = good & self.rescale
            if self.any(scale_now):
                hy = (hinv @ y.unsqueeze(-1)).squeeze(-1)
                tau = (sy / (y * hy).sum(-1).clamp_min(1e-300)).clamp(0.1, 10.0)
                self.tau = torch.where(scale_now, tau, self.tau)
                tau = tau.view(-1, 1, 1)
                hinv = torch.where(scale_now.view(-1, 1, 1), tau * hinv, hinv)
                self.rescale &= ~scale_now
            rho = (1.0 / sy.where(good, torch.ones_like(sy))).view(-1, 1, 1)
            v = self.eye - rho * s.unsqueeze(-1) * y.unsqueeze(-2)
            hnew = v @ hinv @ v.transpose(-1, -2) + rho * s.unsqueeze(-1) * s.unsqueeze(-2)
            self.hinv = torch.where(good.view(-1, 1, 1), hnew, self.hinv)
            # The model is confirmed where the slope along the step fell by at least CONFIRM_SLOPE of itself (the
            # curvature along the step overestimated at most 1 / (1 - CONFIRM_SLOPE) times); a step that ends where the
            # loss still falls as steeply says the model's curvature is far too high, and its next step too short.
            slope_old, slope_new = (self.g * s).sum(-1), (grad * s).sum(-1)
            self.confirmed = torch.where(accept, slope_new >= (1 - CONFIRM_SLOPE) * slope_old, self.confirmed)
            # No positive curvature along a full step (a concave or flat stretch): BFGS cannot update; lengthen the
            # model's steps instead of crawling at the length it had
            flat = accept & ~good & (self.alpha >= 1)
            self.hinv = torch.where(flat.view(-1, 1, 1), EXPAND * self.hinv, self.hinv)
            self.updated |= good
            self.x = torch.where(accept.unsqueeze(-1), trial, self.x)
            self.f = torch.where(accept, loss, self.f)
            self.g = torch.where(accept.unsqueeze(-1), grad, self.g)
            self.backtracks = torch.where(accept, torch.zeros_like(self.backtracks), self.backtracks)
            self._direction(accept)

        if self.any(reject):
            # Minimiser of the quadratic through f(0), f'(0) and f(alpha), kept in [0.1, 0.5] alpha.
            a = self.alpha
            denom = 2 * (loss - self.f - slope * a)
            a_new = torch.where(finite & (denom > 0), -slope * a * a / denom.clamp_min(1e-300), 0.1 * a)
            a_new = torch.minimum(torch.maximum(a_new, 0.1 * a), 0.5 * a)
            self.alpha = torch.where(reject, a_new, self.alpha)
            self.backtracks = self.backtracks + reject.long()
            # After many failures the curvature model is useless: restart it from the gradient.
            restart = reject & (self.backtracks >= 8)
            if self.any(restart):
                scale = (self.lr * 1e-2 / self.g.abs().amax(-1).clamp_min(1e-30)).view(-1, 1, 1)
                self.hinv = torch.where(restart.view(-1, 1, 1), scale * self.eye, self.hinv)
                self.updated &= ~restart
                self.backtracks = torch.where(restart, torch.zeros_like(self.backtracks), self.backtracks)
                self._direction(restart)

        return first | accept


SOLVERS = {"bfgs": BatchBFGS, "adam": BatchAdam}


def make_solver(name: str, x0: torch.Tensor, lr: float, active: torch.Tensor | None = None,
                previous: BatchSolver | None = None, curvature_scale: float = 1.0, **kwargs) -> BatchSolver:
    """A batched solver by name (``bfgs`` or ``adam``).

    ``previous``: the solver of the previous pyramid level; BFGS starts from its inverse-Hessian times
    ``curvature_scale`` (the curvature in parameter units grows as the square of the resolution).
    """
    try:
        cls = SOLVERS[name]
    except KeyError:
        raise SpheroError(f"unknown optimizer {name!r}; choose one of {', '.join(SOLVERS)}") from None
    if cls is BatchBFGS and isinstance(previous, BatchBFGS):
        # the rescaling the previous level needed is the best guess for this one's (real sections: the curvature
        # grows less than the resolution squared, by a factor that is similar from level to level)
        return cls(x0, lr, active, hinv=previous.hinv * curvature_scale * previous.tau.view(-1, 1, 1), **kwargs)
    return cls(x0, lr, active, **kwargs) if cls is BatchBFGS else cls(x0, lr, active, sync_free=kwargs.get("sync_free", False))
