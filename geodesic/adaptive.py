"""The adaptive step size (`--step-size auto`): a trust region on ε, set again after every step.

What a step size trades: a longer step reaches the goal in fewer steps, but the step is chosen to keep the
outputs on this step's probe (N inputs) and moves them elsewhere too, which the restoring pull must then undo;
and the goal's own first-order picture (its direction, the moving magnitude-pruned target of sparsify) holds
only over short distances. Measured on the MNIST sample at 98% sparsity: ε = 1 drops test accuracy to 72%
within 100 steps, while late in the walk ε = 0.05 gets closer to the target than ε = 0.2 in the same number of
steps (BENCHMARKS.md, "Adaptive step size"). So ε is grown while the walk keeps both

  * what the network computes: the share of this step's training batch on which it still gives the class it
    is kept to (the start network's; for connect, the label), which the step's restoring pass gives for free.
    Never the test set. Shrink when it falls more than `tolerance` below where the walk started;
  * the goal's model: the progress the step made toward the goal against the progress its direction promised
    (a point target's distance should fall by ‖θ‖ cos(θ, v); a new task's loss by ⟨θ, −∇L⟩), the ratio of a
    trust-region method. Shrink below RATIO_LOW; grow only above RATIO_HIGH;
  * and the functional step: shrink when √(θᵀgθ) of one step is over a tenth of the function's budget.

Each signal is averaged over a few steps (each is measured on a random batch). ε stays within
[ε₀/20, 5 ε₀] of the starting ε₀; every point records the ε it was taken with (PathPoint.step_size).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

GROW, SHRINK = 1.05, 0.7  # ε factors per step: grow slowly (the signals lag a few steps), shrink fast
MIN_FACTOR, MAX_FACTOR = 1 / 20, 1.0  # bounds on ε relative to the starting ε
RELAX, TIGHTEN = 0.97, 1.1  # restoring-pull factors per step
MIN_PULL = 1 / 30  # the restoring weight never falls below ρ₀/30
RATIO_LOW = 0.25  # progress made ÷ progress promised: stalled below
SMOOTHING = 0.8  # weight of the past in the moving averages (about five steps)
FUNCTIONAL_BUDGET = 0.05  # ½‖Δf‖² per probe input over which one step is too long (Fisher: nats of KL)


@dataclass
class TrustRegion:
    """The state of one walk's adaptive step (saved with the run, so a resumed walk adapts on from it)."""

    initial: float
    tolerance: float = 0.015  # how far the kept share may fall below its start, as a fraction of the batch
    relax_pull: bool = True  # whether the restoring pull may be relaxed (the constrained walk to a point target)
    pull: float = 1.0  # the restoring weight in force ÷ the configured ρ
    kept_start: float | None = None
    kept: float | None = None  # moving averages
    made: float = 0.0
    promised: float = 0.0
    last_reason: str = ""

    @property
    def bounds(self) -> tuple[float, float]:
        return self.initial * MIN_FACTOR, self.initial * MAX_FACTOR

    def next_step_size(self, step_size: float, radius: float, *, distance_before: float, distance_after: float,
                       step_norm: float, alignment: float, goal_norm: float | None, point_target: bool,
                       kept: float | None, functional_step: float, probe_size: int) -> float:
        """ε for the next step, from what the step just taken did (radius: the length it was allowed); updates
        `pull` too."""
        a = SMOOTHING
        if kept is not None and math.isfinite(kept):
            if self.kept_start is None:
                self.kept_start = kept
            self.kept = kept if self.kept is None else a * self.kept + (1 - a) * kept
        promised = step_norm * alignment * (1.0 if point_target else (goal_norm or 0.0))
        made = distance_before - distance_after
        if math.isfinite(promised) and math.isfinite(made):
            self.made, self.promised = a * self.made + (1 - a) * made, a * self.promised + (1 - a) * promised
        ratio = self.made / self.promised if self.promised > 0 else 0.0
        per_step = 0.5 * max(functional_step, 0.0) / max(probe_size, 1)
        slack = None if self.kept is None else self.kept - (self.kept_start - self.tolerance)
        low, high = self.bounds
        factor = 1.0
        if slack is not None and slack < 0:
            # Out of bounds: undo a relaxed pull first (that is what let the function go), then shorten the step.
            if self.pull < 1.0:
                self.last_reason, self.pull = "accuracy kept: pull tightened", min(1.0, self.pull * TIGHTEN)
            else:
                self.last_reason, factor = "accuracy kept: shorter step", SHRINK
        elif per_step > 0.1 * FUNCTIONAL_BUDGET:
            self.last_reason, factor = "functional step", SHRINK
        else:
            self.last_reason = "hold"
            if slack is None or slack > self.tolerance / 2:  # within bounds with a margin: a longer step
                self.last_reason, factor = "grow", GROW
            if ratio < RATIO_LOW and self.relax_pull:
                # The step went where the goal pointed but the goal came hardly nearer: the restoring pull cancels
                # the goal's. Relax it: the walk then settles nearer the goal (as the penalty walk's growing λ
                # lets it arrive), while the accuracy kept on the training batch guards it and tightens it again.
                self.last_reason += ", pull relaxed"
                self.pull = max(MIN_PULL, self.pull * RELAX)
        return min(max(step_size * factor, low), high)
