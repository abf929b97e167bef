"""The adaptive step size (`--step-size auto`): a trust region on the step, set again after every step.

What a step size trades: a longer step reaches the goal in fewer steps, but the step is chosen to keep the
outputs on this step's probe (N inputs) and moves them elsewhere too, which the restoring pull must then undo.
Measured on the MNIST sample at 98% sparsity: ε = 1 drops test accuracy to 72% within 100 steps. And near a
point target a walk can stall whatever ε is: it settles where the restoring pull ρ∇R cancels the goal's unit
pull (from step 1,000 of the default walk, 300 more steps at ε 0.05 / 0.2 / 1.0 ended 0.75 / 0.95 / 4.4 from the
target; with ρ = 0.03 it arrived in 349 steps: BENCHMARKS.md, "Adaptive step"). So after every step:

  * the function is kept: the share of this step's training batch on which the network still gives the class it
    is kept to (the start network's; for connect, the label) comes free with the restoring pass (never the test
    set). When its average falls more than `tolerance` below where the walk started, first the restoring pull
    is tightened back (if it had been relaxed), else ε shrinks (×SHRINK). One step whose functional step
    ½θᵀgθ per probe input is over a tenth of FUNCTIONAL_BUDGET also shrinks ε;
  * otherwise, with a margin, ε grows back (×GROW), never above its starting ε₀ nor below ε₀/20;
  * and when the step went where the goal pointed but the goal came hardly nearer (progress made ÷ progress
    promised < RATIO_LOW; a point target's distance should fall by ‖θ‖ cos(θ, v), a new task's loss by
    ⟨θ, −∇L⟩), the restoring pull ρ is relaxed (×RELAX, down to ρ₀·MIN_PULL): only for the constrained walk to
    a point (sparsify, connect), as the penalty walk's growing λ lets it arrive.

The penalty walk to a point (sparsify, connect) grows its goal weight λ by a factor per step, so a shorter step there
only makes λ outgrow the distance walked, and the goal's pull overwhelm the function's (digits, sparsify 90%, seeds
0-2: end accuracy 94.2 / 95.6 / 96.9% against the fixed ε's 96.7 / 96.7 / 96.9: BENCHMARKS.md). There, what the
rule adapts is λ's growth instead: a step that would have shortened ε holds λ where it is (`held` counts those
steps), and ε stays.

Each signal is averaged over a few steps (each is measured on a random batch). Every point records the ε and ρ
it was taken with (PathPoint.step_size, restoring_weight).
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


def holds_goal_weight(solver: str, goal_weight_growth: float) -> bool:
    """Whether the adaptive step holds λ's growth instead of shortening ε: the penalty walk whose λ grows (to a
    point: sparsify, connect). One rule for the engine (walker.trust_region_for) and the sidebar's label."""
    return solver == "penalty" and goal_weight_growth != 1.0


@dataclass
class TrustRegion:
    """The state of one walk's adaptive step (saved with the run, so a resumed walk adapts on from it)."""

    initial: float
    tolerance: float = 0.015  # how far the kept share may fall below its start, as a fraction of the batch
    relax_pull: bool = True  # whether the restoring pull may be relaxed (the constrained walk to a point target)
    adapt_goal_weight: bool = False  # hold λ's growth instead of shortening ε (the penalty walk to a point target)
    held: int = 0  # steps at which λ's growth was held (λ = λ₀ · growth^(steps − held))
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
        if self.adapt_goal_weight:
            if factor < 1:
                self.held += 1
                self.last_reason += ": λ held"
            return step_size
        return min(max(step_size * factor, low), high)
